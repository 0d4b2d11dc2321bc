"""DSMIL: dual-stream multiple-instance learning (Li, Li and Eliceiri, CVPR 2021;
github.com/binli123/dsmil-wsi, `dsmil.py` and `train_tcga.py`).

Two streams on the patch features x_i (N, D), with K outputs (K = 1 for two classes, as the
reference's `--num_classes 1`; K = C otherwise):

    instance stream:  c_i = W x_i                      max score  m = max_i c_i        (K,)
    bag stream:       the critical patch of output k is argmax_i c_ik; with the queries
                      q_i = tanh(W2 relu(W1 x_i)) (128-d),
                      A_ik = softmax_i( <q_i, q_crit(k)> / sqrt(128) ),   B_k = sum_i A_ik v_i
                      b = Conv1d(B) (K,)       (v_i = x_i unless passing_v)
    loss = 0.5 BCE(b, y) + 0.5 BCE(m, y)        (y one-hot; for two classes y = label)

At inference the reference scores a bag sigmoid(b) (or the mean of sigmoid(b) and sigmoid(m)
with `average`). Our logits are the logarithms of those probabilities, [log(1 - p), log p] for
two classes, so that softmax(logits) is that probability (normalised over the classes for more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srmil.mil.models.base import FeatureScaler, MILOutput, check_bag


@dataclass
class DSMILConfig:
    q_dim: int = 128  # query size of the bag stream
    nonlinear: bool = True  # queries through Linear-ReLU-Linear-Tanh (reference default)
    passing_v: bool = False  # values through Dropout-Linear-ReLU instead of the features
    dropout_v: float = 0.0  # dropout of that value projection (--dropout_node)
    dropout_patch: float = 0.0  # share of patches dropped from a training bag (--dropout_patch)
    average: bool = False  # inference score: mean of the bag and max streams (--average)

    def __post_init__(self) -> None:
        if self.q_dim < 1:
            raise ValueError("q_dim must be positive")
        for name in ("dropout_v", "dropout_patch"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class DSMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, config: DSMILConfig | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = cfg = config or DSMILConfig()
        self.n_classes = n_classes
        k = 1 if n_classes == 2 else n_classes
        self.scaler = FeatureScaler(in_dim)
        self.instance_classifier = nn.Linear(in_dim, k)
        self.q = (nn.Sequential(nn.Linear(in_dim, cfg.q_dim), nn.ReLU(),
                                nn.Linear(cfg.q_dim, cfg.q_dim), nn.Tanh())
                  if cfg.nonlinear else nn.Linear(in_dim, cfg.q_dim))
        self.v = (nn.Sequential(nn.Dropout(cfg.dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())
                  if cfg.passing_v else nn.Identity())
        self.fcc = nn.Conv1d(k, k, kernel_size=in_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The reference's `apply_sparse_init`: orthogonal weights, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv1d):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def streams(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Standardised features x (N, D) -> instance scores (N, K), bag scores (K,),
        bag-stream attention A (N, K)."""
        c = self.instance_classifier(x)
        v = self.v(x)
        q = self.q(x)
        critical = x[c.argmax(dim=0)]  # (K, D): the top-scoring patch of each output
        # The reference divides by a float32 square root; kept so that float64 runs agree.
        scale = torch.tensor(float(q.shape[1]), dtype=torch.float32, device=x.device).sqrt()
        attention = torch.softmax((q @ self.q(critical).t()) / scale, dim=0)  # (N, K)
        bag = self.fcc((attention.t() @ v).unsqueeze(0)).view(-1)  # (K,)
        return c, bag, attention

    def _logits(self, scores: Tensor, max_scores: Tensor) -> Tensor:
        if self.config.average:
            log_p = torch.log((torch.sigmoid(scores) + torch.sigmoid(max_scores)) / 2)
            log_q = torch.log((torch.sigmoid(-scores) + torch.sigmoid(-max_scores)) / 2)
        else:
            log_p, log_q = F.logsigmoid(scores), F.logsigmoid(-scores)
        return torch.cat([log_q, log_p]) if self.n_classes == 2 else log_p

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> MILOutput:
        """x: (N, D) patch features; edge_index is ignored. Returns logits (C,) (see the module
        docstring) and the bag stream's attention (N,), averaged over the outputs."""
        check_bag(x)
        c, bag, attention = self.streams(self.scaler(x))
        return MILOutput(self._logits(bag, c.max(dim=0).values), attention.mean(dim=1))

    def training_loss(self, x: Tensor, edge_index: Tensor | None,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """0.5 BCE(bag) + 0.5 BCE(max); parts loss, bag, max."""
        n = check_bag(x)
        label = int(label)
        if not 0 <= label < self.n_classes:
            raise ValueError(f"label {label} outside [0, {self.n_classes})")
        x = self.scaler(x)
        p = self.config.dropout_patch
        if p > 0 and self.training:  # keep int(N (1 - p)) random patches, as the reference
            x = x[torch.randperm(n)[: max(1, int(n * (1 - p)))].to(x.device)]
        c, bag, _ = self.streams(x)
        if self.n_classes == 2:
            target = x.new_full((1,), float(label))
        else:
            target = F.one_hot(torch.tensor(label), self.n_classes).to(x)
        bag_loss = F.binary_cross_entropy_with_logits(bag, target)
        max_loss = F.binary_cross_entropy_with_logits(c.max(dim=0).values, target)
        loss = 0.5 * bag_loss + 0.5 * max_loss
        parts = torch.stack([loss, bag_loss, max_loss]).detach().tolist()
        return loss, dict(zip(("loss", "bag", "max"), parts, strict=True))
