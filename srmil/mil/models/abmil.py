"""ABMIL: gated attention multiple-instance learning (Ilse, Tomczak and Welling, ICML 2018).

The baseline SRMIL is compared with: embed each patch, weight patches by gated attention, classify
the weighted mean. No graph, no auxiliary loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from srmil.mil.models.base import (
    FeatureScaler,
    GatedAttention,
    MILOutput,
    check_bag,
    cross_entropy_loss,
)


@dataclass
class ABMILConfig:
    hidden_dim: int = 512  # patch embedding size after Linear(D, hidden_dim) + ReLU
    attn_dim: int = 256  # hidden size of the tanh and sigmoid attention branches
    dropout: float = 0.25  # on the patch embeddings

    def __post_init__(self) -> None:
        if self.hidden_dim < 1 or self.attn_dim < 1:
            raise ValueError("hidden_dim and attn_dim must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class ABMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, config: ABMILConfig | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = config = config or ABMILConfig()
        self.scaler = FeatureScaler(in_dim)
        self.embed = nn.Sequential(
            nn.Linear(in_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout))
        self.attention = GatedAttention(config.hidden_dim, config.attn_dim)
        self.classifier = nn.Linear(config.hidden_dim, n_classes)

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> MILOutput:
        """x: (N, D) patch features; edge_index is ignored. Returns logits (C,), attention (N,)."""
        check_bag(x)
        h = self.embed(self.scaler(x))  # (N, hidden_dim)
        weights = self.attention(h)  # (N,)
        return MILOutput(self.classifier(weights @ h), weights)

    def training_loss(self, x: Tensor, edge_index: Tensor | None,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of one bag; returns (loss to backpropagate, {"loss", "ce"})."""
        return cross_entropy_loss(self(x), label)
