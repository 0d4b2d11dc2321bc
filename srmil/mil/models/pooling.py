"""Mean and max pooling: the floor every MIL model must clear.

Each patch is embedded and scored on its own, s_i = W relu(V x_i + c) + b (C class scores), and
the bag takes the mean or the per-class maximum of its patches' scores:

    mean: logits = (1/N) sum_i s_i             max: logits[c] = max_i s_i[c]

(for the mean, the same as classifying the mean embedding). Layout, initialisation and optimiser
follow MIL_BASELINE's MEAN_MIL and MAX_MIL (github.com/lingxitong/MIL_BASELINE); no graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from srmil.mil.models.base import FeatureScaler, MILOutput, check_bag, cross_entropy_loss

POOLS = ("mean", "max")


@dataclass
class PoolingConfig:
    pool: str = "mean"  # "mean" or "max" over the patches' class scores
    hidden_dim: int = 512
    dropout: float = 0.1  # on the patch embeddings (MIL_BASELINE's configs)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.hidden_dim < 1:
            raise ValueError("hidden_dim must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class PoolingMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, config: PoolingConfig | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = config = config or PoolingConfig()
        self.scaler = FeatureScaler(in_dim)
        self.embed = nn.Sequential(nn.Linear(in_dim, config.hidden_dim), nn.ReLU(),
                                   nn.Dropout(config.dropout))
        self.classifier = nn.Linear(config.hidden_dim, n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-normal weights and zero biases (CLAM's initialisation, which MIL_BASELINE uses)
        for layer in (self.embed[0], self.classifier):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> MILOutput:
        """x: (N, D) patch features; edge_index is ignored. Returns logits (C,) and attention
        (N,): uniform for the mean; for the max, each class gives weight 1/C to the patch that
        sets its score (the patches that decide)."""
        n = check_bag(x)
        scores = self.classifier(self.embed(self.scaler(x)))  # (N, C)
        if self.config.pool == "mean":
            return MILOutput(scores.mean(dim=0), x.new_full((n,), 1.0 / n))
        logits, winners = scores.max(dim=0)
        attention = torch.zeros(n, dtype=x.dtype, device=x.device)
        attention.index_add_(0, winners, x.new_full(winners.shape, 1.0 / len(winners)))
        return MILOutput(logits, attention)

    def training_loss(self, x: Tensor, edge_index: Tensor | None,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of one bag; returns (loss to backpropagate, {"loss", "ce"})."""
        return cross_entropy_loss(self(x), label)
