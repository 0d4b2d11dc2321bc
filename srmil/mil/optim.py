"""The optimisers the models' references train with: Adam, AdamW, and TransMIL's Lookahead(RAdam).

TransMIL's `lookahead_radam` (its copy of timm's optimiser factory) is RAdam (Liu et al. 2020)
with decoupled weight decay, none on biases and 1-d parameters, wrapped in Lookahead (Zhang et
al. 2019, alpha 0.5, k 6). torch's RAdam with `decoupled_weight_decay` does the same update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class Lookahead(torch.optim.Optimizer):
    """Every k steps of `base`, move the slow weights alpha of the way to the (fast) weights and
    restart the fast weights from there.

    As in the reference implementation, a parameter's slow weights are first taken at its first
    synchronisation (step k), which therefore leaves the weights unchanged.
    """

    def __init__(self, base: torch.optim.Optimizer, alpha: float = 0.5, k: int = 6):
        if not 0.0 <= alpha <= 1.0 or k < 1:
            raise ValueError(f"Lookahead needs alpha in [0, 1] and k >= 1, got {alpha}, {k}")
        self.base = base
        # The base's parameter groups themselves, so that schedulers reach its learning rate.
        super().__init__(base.param_groups,
                         {"lookahead_alpha": alpha, "lookahead_k": k, "lookahead_step": 0})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self.base.step(closure)
        for group in self.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"]:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "slow" not in state:
                    state["slow"] = p.detach().clone()
                slow = state["slow"]
                slow.add_(p - slow, alpha=group["lookahead_alpha"])
                p.copy_(slow)
        return loss


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's `add_weight_decay`: no weight decay on biases and 1-d parameters (norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """adamw, adam (L2 penalty in the gradient, as torch.optim.Adam) or lookahead_radam."""
    betas = (float(betas[0]), float(betas[1]))
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                 betas=betas)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay,
                                betas=betas)
    if name == "lookahead_radam":
        groups = decay_groups(model, weight_decay) if weight_decay else model.parameters()
        return Lookahead(torch.optim.RAdam(groups, lr=lr, betas=betas, weight_decay=0.0,
                                           decoupled_weight_decay=True))
    raise ValueError(f"unknown optimizer {name!r}")
