"""CLAM-SB: clustering-constrained attention MIL, single attention branch (Lu et al., Nat Biomed Eng
2021; github.com/mahmoodlab/CLAM, `CLAM_SB`).

Gated attention pooling (as ABMIL, with dropout in the attention branches) plus an instance-level
"clustering" task: the k most and k least attended patches of a bag are pseudo-labelled
positive and negative for the bag's class, and a per-class linear instance classifier learns
them:

    h_i = relu(W x_i)                    a = softmax_i(gated(h_i))        logits = W_c sum_i a_i h_i
    top = topk(a, k), bottom = topk(-a, k)
    L_inst = loss(I_y(h_top), 1) + loss(I_y(h_bottom), 0)       (I_y: instance classifier of y)
    loss = bag_weight * CE(logits, y) + (1 - bag_weight) * L_inst

With `subtyping` (more than two classes, as CLAM's subtyping task) the other classes' instance
classifiers also learn the top-k patches as negatives, and L_inst is averaged over the classes.
The instance loss is the smooth top-1 SVM (Berrada et al. 2018, tau = alpha = 1) of CLAM's
published commands (`--inst_loss svm`), or cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srmil.mil.models.base import (
    FeatureScaler,
    GatedAttention,
    MILOutput,
    bag_cross_entropy,
    check_bag,
)

INSTANCE_LOSSES = ("svm", "ce")


@dataclass
class CLAMConfig:
    hidden_dim: int = 512  # CLAM's "small" size: [D, 512, 256]
    attn_dim: int = 256
    dropout: float = 0.25  # on the embeddings and both attention branches
    k_sample: int = 8  # patches pseudo-labelled per side (CLAM's --B)
    bag_weight: float = 0.7
    inst_loss: str = "svm"  # "svm" (smooth top-1 SVM) or "ce"
    subtyping: bool | None = None  # None: true for more than two classes

    def __post_init__(self) -> None:
        if self.inst_loss not in INSTANCE_LOSSES:
            raise ValueError(f"inst_loss must be one of {', '.join(INSTANCE_LOSSES)}, got "
                             f"{self.inst_loss!r}")
        if self.hidden_dim < 1 or self.attn_dim < 1 or self.k_sample < 1:
            raise ValueError("hidden_dim, attn_dim and k_sample must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in [0, 1], got {self.bag_weight}")
        if self.subtyping not in (None, True, False):
            raise ValueError(f"subtyping must be true, false or null, got {self.subtyping!r}")


def smooth_top1_svm(logits: Tensor, target: Tensor, alpha: float = 1.0, tau: float = 1.0,
                    thresh: float = 1e3) -> Tensor:
    """Smooth top-1 multiclass SVM loss (Berrada, Zisserman, Kumar, ICLR 2018), batch mean.

    loss_n = tau * log sum_j exp((s_j + alpha [j != y] - s_y) / tau); rows whose two largest
    scores differ by at least tau * log(thresh) take the hard max instead (max_j (s_j + alpha
    [j != y]) - s_y), as the authors' implementation does to avoid overflow.
    """
    margin = alpha * (torch.arange(logits.shape[1], device=logits.device) != target[:, None])
    z = logits + margin.to(logits.dtype) - logits.gather(1, target[:, None])
    top2 = logits.topk(2, dim=1).values
    hard = (top2[:, 0] - top2[:, 1]) >= tau * math.log(thresh)
    loss = torch.where(hard, z.max(dim=1).values, tau * torch.logsumexp(z / tau, dim=1))
    return loss.sum() / len(logits)


class CLAMSB(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, config: CLAMConfig | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = cfg = config or CLAMConfig()
        self.n_classes = n_classes
        self.subtyping = n_classes > 2 if cfg.subtyping is None else cfg.subtyping
        self.scaler = FeatureScaler(in_dim)
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.ReLU(),
                                   nn.Dropout(cfg.dropout))
        self.attention = GatedAttention(cfg.hidden_dim, cfg.attn_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(
            nn.Linear(cfg.hidden_dim, 2) for _ in range(n_classes))

    def _pool(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (N, D) -> logits (C,), attention (N,), embeddings h (N, hidden_dim)."""
        check_bag(x)
        h = self.embed(self.scaler(x))
        attention = self.attention(h)
        return self.classifier(attention @ h), attention, h

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> MILOutput:
        """x: (N, D) patch features; edge_index is ignored. Returns logits (C,) and the
        attention (N,) that pools the bag."""
        logits, attention, _ = self._pool(x)
        return MILOutput(logits, attention)

    def _instance_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.config.inst_loss == "svm":
            return smooth_top1_svm(logits, target)
        return F.cross_entropy(logits, target)

    def instance_loss(self, attention: Tensor, h: Tensor, label: int) -> Tensor:
        """The clustering loss of one bag (0 for classes without a term)."""
        k = min(self.config.k_sample, len(h))  # CLAM needs k patches; smaller bags use all
        top = torch.topk(attention, k).indices
        bottom = torch.topk(-attention, k).indices
        ones = torch.ones(k, dtype=torch.long, device=h.device)
        total = h.new_zeros(())
        for c, classifier in enumerate(self.instance_classifiers):
            if c == label:  # in the class: top-k positive, bottom-k negative
                total = total + self._instance_loss(classifier(h[torch.cat([top, bottom])]),
                                                    torch.cat([ones, 0 * ones]))
            elif self.subtyping:  # out of the class: its top-k are negatives for class c
                total = total + self._instance_loss(classifier(h[top]), 0 * ones)
        return total / self.n_classes if self.subtyping else total

    def training_loss(self, x: Tensor, edge_index: Tensor | None,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """bag_weight * CE + (1 - bag_weight) * instance loss; parts loss, ce, inst."""
        logits, attention, h = self._pool(x)
        ce = bag_cross_entropy(logits, label)
        inst = self.instance_loss(attention, h, int(label))
        w = self.config.bag_weight
        loss = w * ce + (1.0 - w) * inst
        parts = torch.stack([loss, ce, inst]).detach().tolist()
        return loss, dict(zip(("loss", "ce", "inst"), parts, strict=True))
