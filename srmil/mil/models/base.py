"""What the MIL models share: their output type, gated attention pooling, the feature scaler, the
bag loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MILOutput(NamedTuple):
    logits: Tensor  # (C,) unnormalised class scores for the bag
    attention: Tensor  # (N,) weights over the bag's patches, summing to 1


class GatedAttention(nn.Module):
    """Gated attention pooling weights (Ilse et al. 2018).

    a = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ): the sigmoid gate lets a patch switch its
    tanh score off, which plain tanh attention cannot do for features near zero. With `dropout`
    each branch's output is dropped out (CLAM's and Patch-GCN's variant; tanh branch first).
    """

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.tanh_branch = nn.Linear(in_dim, hidden_dim)
        self.sigmoid_branch = nn.Linear(in_dim, hidden_dim)
        self.score = nn.Linear(hidden_dim, 1)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def scores(self, h: Tensor) -> Tensor:
        """h: (N, in_dim) -> unnormalised scores (N,)."""
        a, b = torch.tanh(self.tanh_branch(h)), torch.sigmoid(self.sigmoid_branch(h))
        if self.dropout is not None:
            a, b = self.dropout(a), self.dropout(b)
        return self.score(a * b).squeeze(-1)

    def forward(self, h: Tensor) -> Tensor:
        """h: (N, in_dim) -> weights (N,), softmax over the N patches."""
        return torch.softmax(self.scores(h), dim=0)


class FeatureScaler(nn.Module):
    """Per-dimension standardisation of patch features, fitted on a fold's training bags.

    Backbone features are often far from zero-mean/unit-scale (a randomly initialised CNN's vary
    by ~1% around a large shared offset), which stalls MIL training and makes a cosine
    reconstruction target trivial. The statistics are buffers, so checkpoints carry them.
    Until `fit` is called it is the identity.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, bags: list[Tensor], eps: float = 1e-6) -> None:
        """Set mean and std from all patches of `bags` (each (N, D)), one bag at a time in
        float64 (Chan et al.'s pairwise update), so no copy of the whole cohort is made."""
        n, mean = 0, torch.zeros_like(self.mean, dtype=torch.float64)
        m2 = torch.zeros_like(mean)
        for bag in bags:
            if len(bag) == 0:
                continue
            x = bag.to(mean.device, torch.float64)
            k, bag_mean = len(x), x.mean(0)
            delta, total = bag_mean - mean, n + k
            mean += delta * (k / total)
            m2 += ((x - bag_mean) ** 2).sum(0) + delta**2 * (n * k / total)
            n = total
        if n == 0:
            return
        self.mean.copy_(mean.float())
        self.std.copy_((m2 / n).sqrt().clamp_min(eps).float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def check_bag(x: Tensor) -> int:
    """Return N for a bag x of shape (N, D), N >= 1; raise ValueError otherwise."""
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"a bag must have shape (N >= 1, D), got {tuple(x.shape)}")
    return x.shape[0]


def bag_cross_entropy(logits: Tensor, label: int | Tensor) -> Tensor:
    """Cross-entropy of one bag's logits (C,) against its integer class label."""
    label = int(label)
    if not 0 <= label < logits.shape[-1]:
        raise ValueError(f"label {label} outside [0, {logits.shape[-1]})")
    target = torch.tensor([label], device=logits.device)
    return F.cross_entropy(logits.unsqueeze(0), target)


def cross_entropy_loss(output: MILOutput, label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
    """The training loss of a model trained on the bag's cross-entropy alone: (loss to
    backpropagate, {"loss", "ce"})."""
    ce = bag_cross_entropy(output.logits, label)
    value = ce.item()
    return ce, {"loss": value, "ce": value}
