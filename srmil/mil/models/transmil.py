"""TransMIL: transformer-based correlated MIL (Shao et al., NeurIPS 2021;
github.com/szc19990412/TransMIL, `models/TransMIL.py`).

    h = relu(W x)                        (N, 512)
    pad to a square: append the first S^2 - N tokens again (S = ceil(sqrt N)); prepend [CLS]
    h = h + NystromAttention(LayerNorm(h))                       (layer 1)
    PPEG: the S x S token grid (in bag order) + depthwise convs 7x7, 5x5, 3x3 of it
    h = h + NystromAttention(LayerNorm(h))                       (layer 2)
    logits = W_c LayerNorm(h)[CLS]

The attention returned is the [CLS] token's row of layer 2's Nyström attention matrix, averaged
over heads, with each duplicated padding token's weight added back to its patch, negative
entries (the approximation allows them) set to 0, and normalised to sum to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from srmil.mil.models.base import FeatureScaler, MILOutput, check_bag, cross_entropy_loss
from srmil.mil.models.nystrom import NystromAttention


@dataclass
class TransMILConfig:
    dim: int = 512
    heads: int = 8  # dim_head = dim // heads
    landmarks: int = 256  # dim // 2 in the reference
    pinv_iterations: int = 6
    residual_kernel: int = 33  # depthwise convolution of the values along the sequence
    attn_dropout: float = 0.1  # after the attention's output projection

    def __post_init__(self) -> None:
        if self.dim < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of heads "
                             f"({self.heads})")
        if self.landmarks < 1 or self.pinv_iterations < 0 or self.residual_kernel < 0:
            raise ValueError("landmarks must be positive; pinv_iterations and residual_kernel "
                             "non-negative")
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {self.attn_dropout}")


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x))."""

    def __init__(self, cfg: TransMILConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.attn = NystromAttention(cfg.dim, heads=cfg.heads, dim_head=cfg.dim // cfg.heads,
                                     landmarks=cfg.landmarks,
                                     pinv_iterations=cfg.pinv_iterations,
                                     residual_kernel=cfg.residual_kernel,
                                     dropout=cfg.attn_dropout)

    def forward(self, x: Tensor, query: int | None = None) -> tuple[Tensor, Tensor | None]:
        out, row = self.attn(self.norm(x), query)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding: the tokens as an S x S image plus three depthwise convs."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, side: int) -> Tensor:
        """x: (B, 1 + side^2, dim), [CLS] first -> the same shape."""
        b, _, c = x.shape
        cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, side, side)
        grid = self.proj7(grid) + grid + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, config: TransMILConfig | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = cfg = config or TransMILConfig()
        self.scaler = FeatureScaler(in_dim)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, cfg.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.layer1 = TransLayer(cfg)
        self.ppeg = PPEG(cfg.dim)
        self.layer2 = TransLayer(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self.fc2 = nn.Linear(cfg.dim, n_classes)

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> MILOutput:
        """x: (N, D) patch features; edge_index is ignored. Returns logits (C,) and the [CLS]
        token's attention over the patches (N,) in the last layer (see the module docstring)."""
        n = check_bag(x)
        h = self.fc1(self.scaler(x)).unsqueeze(0)  # (1, N, dim)
        side = math.ceil(math.sqrt(n))
        h = torch.cat([self.cls_token, h, h[:, : side * side - n]], dim=1)
        h, _ = self.layer1(h)
        h, row = self.layer2(self.ppeg(h, side), query=0)
        logits = self.fc2(self.norm(h)[:, 0]).squeeze(0)
        weights = row[0].mean(dim=0)[1:]  # heads averaged, [CLS] itself left out
        attention = weights[:n].index_add(0, torch.arange(side * side - n, device=x.device),
                                          weights[n:]).clamp_min(0)
        total = attention.sum()
        attention = (attention / total if total > 0
                     else torch.full_like(attention, 1.0 / n)).detach()
        return MILOutput(logits, attention)

    def training_loss(self, x: Tensor, edge_index: Tensor | None,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of one bag; returns (loss to backpropagate, {"loss", "ce"})."""
        return cross_entropy_loss(self(x), label)
