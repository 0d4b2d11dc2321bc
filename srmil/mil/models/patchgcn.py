"""Patch-GCN for classification (Chen et al., MICCAI 2021; github.com/mahmoodlab/Patch-GCN,
`PatchGCN_Surv` in `models/model_graph_mil.py`), on the spatial graph of the `graph` stage.

    h0 = dropout(relu(W x))                                       (N, 128)
    h1 = GENConv(h0)
    h_l = h_{l-1} + dropout(relu(LayerNorm(GENConv(h_{l-1}))))   (l = 2, 3: DeepGCN "res" blocks)
    z = [h0 | h1 | h2 | h3]                                        (N, 512), every depth kept
    z = dropout(relu(W_phi z));  a = softmax(gated attention(z));  logits = W_c relu(W_rho a^T z)

GENConv (Li et al. 2020; torch-geometric's layer, as in the reference, with the memory-lean
aggregation of `srmil.mil.models.genconv`) aggregates softmax-weighted messages relu(h_j) + eps over
the neighbours j (a learnable temperature per layer) and passes the sum with h_i through a
2-layer MLP with LayerNorm. No reconstruction: the
graph network SRMIL is compared with when asking what the graph alone buys. The reference
predicts discrete-time survival; here the same network ends in C class logits trained with
cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import DeepGCNLayer

from srmil.mil.models.base import (
    FeatureScaler,
    GatedAttention,
    MILOutput,
    check_bag,
    cross_entropy_loss,
)
from srmil.mil.models.gat import SparseGraph
from srmil.mil.models.genconv import SparseGENConv


@dataclass
class PatchGCNConfig:
    hidden_dim: int = 128
    num_layers: int = 4  # the input projection plus num_layers - 1 GENConv layers
    dropout: float = 0.25  # after the input projection, phi and in the attention branches
    layer_dropout: float = 0.1  # after each residual GCN block
    # Recompute every GENConv in the backward pass (the reference checkpoints one of the three);
    # same results, less memory on large bags.
    checkpoint_layers: bool = False

    def __post_init__(self) -> None:
        if self.hidden_dim < 1 or self.num_layers < 2:
            raise ValueError("hidden_dim must be positive and num_layers >= 2")
        for name in ("dropout", "layer_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class PatchGCN(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, config: PatchGCNConfig | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = cfg = config or PatchGCNConfig()
        hidden, width = cfg.hidden_dim, cfg.hidden_dim * cfg.num_layers
        self.scaler = FeatureScaler(in_dim)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        # The first block's conv is applied alone (its norm is unused), as in the reference.
        self.layers = nn.ModuleList(
            DeepGCNLayer(SparseGENConv(hidden, hidden, aggr="softmax", t=1.0, learn_t=True,
                                       num_layers=2, norm="layer"),
                         nn.LayerNorm(hidden, elementwise_affine=True), nn.ReLU(inplace=True),
                         block="res", dropout=cfg.layer_dropout,
                         ckpt_grad=cfg.checkpoint_layers or i % 3)
            for i in range(1, cfg.num_layers))
        self.phi = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attention = GatedAttention(width, width, cfg.dropout)
        self.rho = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, x: Tensor, edge_index: Tensor) -> MILOutput:
        """x: (N, D) patch features; edge_index: (2, E) the spatial graph (self-loops as stored).
        Returns logits (C,) and the gated attention (N,)."""
        n = check_bag(x)
        graph = SparseGraph.from_edge_index(edge_index.to(device=x.device, dtype=torch.long), n)
        h = self.fc(self.scaler(x))
        conv = self.layers[0].conv
        if self.config.checkpoint_layers and self.training and torch.is_grad_enabled():
            out = checkpoint(conv, h, graph, use_reentrant=False)
        else:
            out = conv(h, graph)
        depths = [h, out]
        for layer in self.layers[1:]:
            out = layer(out, graph)
            depths.append(out)
        z = self.phi(torch.cat(depths, dim=1))
        attention = self.attention(z)
        return MILOutput(self.classifier(self.rho(attention @ z)), attention)

    def training_loss(self, x: Tensor, edge_index: Tensor,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of one bag; returns (loss to backpropagate, {"loss", "ce"})."""
        return cross_entropy_loss(self(x, edge_index), label)
