"""DTFD-MIL: double-tier feature distillation MIL (Zhang et al., CVPR 2022;
github.com/hrzhang1123/DTFD-MIL, `Main_DTFD_MIL.py`, `Model/`).

Tier 1 splits a bag at random into G pseudo-bags (np.array_split of a permutation) that inherit
the bag's label; each is pooled by gated attention and classified:

    h_i = relu(W x_i) (512)     a_i = softmax_{i in g}(gated(h_i))     f_g = sum_{i in g} a_i h_i
    loss0 = mean_g CE(W1 f_g + b1, y)

and distils a few features per pseudo-bag for tier 2: "AFS" f_g itself; "MaxS" / "MaxMinS" the
patches of highest (and lowest) last-class probability under the pseudo-bag classifier's
class activation, softmax_c(W1 a_i h_i). Tier 2 pools the distilled features by gated attention
and classifies the bag: loss1 = CE(logits, y).

Training follows the reference's two optimisers, which are one Adam here (same settings,
per-parameter state): tier 1 learns from loss0 only (the distilled features are detached, as
the reference steps tier 1 before tier 2's backward and discards what it leaves in tier 1's
gradients), tier 2 from loss1; `clip_gradients` clips each of the reference's four modules to
norm 5. At inference the pseudo-bags come from a fixed seed (the reference shuffles at random).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from srmil.mil.models.base import (
    FeatureScaler,
    GatedAttention,
    MILOutput,
    bag_cross_entropy,
    check_bag,
)

DISTILLS = ("AFS", "MaxS", "MaxMinS")


@dataclass
class DTFDConfig:
    hidden_dim: int = 512  # mDim
    attn_dim: int = 128
    n_groups: int = 4  # pseudo-bags per bag (numGroup)
    total_instance: int = 4  # MaxS / MaxMinS: total_instance // n_groups patches per side
    distill: str = "AFS"  # the reference's default distillation
    dropout: float = 0.0  # before the tier-1 classifier (droprate)
    dropout_2: float = 0.0  # before the tier-2 classifier (droprate_2)
    n_res_blocks: int = 0  # residual blocks after the dimension reduction (numLayer_Res)
    grad_clip: float = 5.0  # max gradient norm of each module
    eval_seed: int = 0  # seed of the pseudo-bags at inference

    def __post_init__(self) -> None:
        if self.distill not in DISTILLS:
            raise ValueError(f"distill must be one of {', '.join(DISTILLS)}, got "
                             f"{self.distill!r}")
        if min(self.hidden_dim, self.attn_dim, self.n_groups) < 1 or self.n_res_blocks < 0:
            raise ValueError("hidden_dim, attn_dim and n_groups must be positive")
        if self.distill != "AFS" and self.total_instance < self.n_groups:
            raise ValueError("total_instance must be >= n_groups for MaxS and MaxMinS")
        for name in ("dropout", "dropout_2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(),
                                   nn.Linear(dim, dim, bias=False), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class DTFD(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, config: DTFDConfig | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = cfg = config or DTFDConfig()
        self.scaler = FeatureScaler(in_dim)
        self.dim_reduction = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim, bias=False),
                                           nn.ReLU(),
                                           *(ResidualBlock(cfg.hidden_dim)
                                             for _ in range(cfg.n_res_blocks)))
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attn_dim)
        # (The reference skips its dropout when the rate is 0: no random draw.)
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity(),
                                        nn.Linear(cfg.hidden_dim, n_classes))
        self.tier2_attention = GatedAttention(cfg.hidden_dim, cfg.attn_dim)
        self.tier2_classifier = nn.Sequential(
            nn.Dropout(cfg.dropout_2) if cfg.dropout_2 else nn.Identity(),
            nn.Linear(cfg.hidden_dim, n_classes))

    def groups(self, n: int) -> list[Tensor]:
        """Patch indices of the pseudo-bags: a random permutation split into min(G, n) nearly
        equal parts (the first n mod G one longer, as np.array_split). Training draws from the
        global generator; inference from `eval_seed`."""
        generator = None if self.training else torch.Generator().manual_seed(
            self.config.eval_seed)
        perm = torch.randperm(n, generator=generator)
        return list(torch.tensor_split(perm, min(self.config.n_groups, n)))

    def _tier1(self, x: Tensor, groups: list[Tensor]
               ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Standardised x (N, D) -> pseudo-bag logits (G, C), distilled features (P, hidden),
        each pseudo-bag's attention and the patches behind the distilled features."""
        cfg = self.config
        h = self.dim_reduction(x)
        scores = self.attention.scores(h)
        weight = self.classifier[1].weight  # the class activation uses the weights, no bias
        per_side = cfg.total_instance // cfg.n_groups
        sub_logits, distilled, within, members = [], [], [], []
        for idx in groups:
            idx = idx.to(x.device)
            h_g, a_g = h[idx], torch.softmax(scores[idx], dim=0)
            weighted = h_g * a_g.unsqueeze(1)
            pooled = weighted.sum(dim=0)
            sub_logits.append(self.classifier(pooled))
            within.append(a_g)
            if cfg.distill == "AFS":
                distilled.append(pooled.unsqueeze(0))
                members.append(idx)
                continue
            cam = torch.softmax(weighted @ weight.t(), dim=1)[:, -1]
            order = torch.sort(cam, descending=True).indices
            pick = order[:per_side]
            if cfg.distill == "MaxMinS":
                pick = torch.cat([pick, order[-per_side:]])
            distilled.append(h_g[pick])
            members.append(idx[pick])
        return torch.stack(sub_logits), torch.cat(distilled), within, members

    def _tier2(self, distilled: Tensor, within: list[Tensor], members: list[Tensor],
               n: int) -> tuple[Tensor, Tensor]:
        """Distilled features (P, hidden) -> bag logits (C,), patch attention (N,)."""
        a2 = self.tier2_attention(distilled)
        logits = self.tier2_classifier(a2 @ distilled)
        attention = distilled.new_zeros(n)
        if self.config.distill == "AFS":  # a patch's share: its group's weight x its own
            for g, (idx, a_g) in enumerate(zip(members, within, strict=True)):
                attention = attention.index_add(0, idx, a2[g] * a_g)
        else:  # the distilled patches carry tier 2's weights
            attention = attention.index_add(0, torch.cat(members), a2)
        return logits, attention

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> MILOutput:
        """x: (N, D) patch features; edge_index is ignored. Returns tier 2's logits (C,) and the
        patch attention (N,): with AFS each patch's tier-1 weight in its pseudo-bag times that
        pseudo-bag's tier-2 weight; with MaxS / MaxMinS tier 2's weights on the distilled
        patches."""
        n = check_bag(x)
        _, distilled, within, members = self._tier1(self.scaler(x), self.groups(n))
        return MILOutput(*self._tier2(distilled, within, members, n))

    def training_loss(self, x: Tensor, edge_index: Tensor | None,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """loss0 (tier 1, mean over pseudo-bags) + loss1 (tier 2 on detached distilled
        features); parts loss, loss0, loss1."""
        n = check_bag(x)
        sub_logits, distilled, within, members = self._tier1(self.scaler(x), self.groups(n))
        bag_cross_entropy(sub_logits[0].detach(), label)  # checks the label's range
        target = torch.full((len(sub_logits),), int(label), device=sub_logits.device)
        loss0 = torch.nn.functional.cross_entropy(sub_logits, target)
        logits, _ = self._tier2(distilled.detach(), within, members, n)
        loss1 = bag_cross_entropy(logits, label)
        loss = loss0 + loss1
        parts = torch.stack([loss, loss0, loss1]).detach().tolist()
        return loss, dict(zip(("loss", "loss0", "loss1"), parts, strict=True))

    def clip_gradients(self) -> None:
        """Clip the gradient norm of each of the reference's modules to `grad_clip` (called by
        the trainer between backward and the optimiser step)."""
        clip = self.config.grad_clip
        for module in (self.dim_reduction, self.attention, self.classifier):
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        torch.nn.utils.clip_grad_norm_([*self.tier2_attention.parameters(),
                                        *self.tier2_classifier.parameters()], clip)
