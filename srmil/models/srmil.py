"""SRMIL: spatially regularised multiple-instance learning (Wu et al., WACV 2026).

A slide is a graph: patch nodes joined to their grid neighbours, plus one learnable super-node
joined both ways to every patch. A graph-attention encoder feeds two heads:

    project -> mask -> encode -> decode -> cosine error on the masked patches   (no labels)
                              -> pool (super-node) -> classify                  (slide label)

Hiding 70% of the patches and rebuilding them from their spatial neighbours is a task that depends
only on the tissue, so it regularises the shared encoder without label noise. Defaults follow the
public reference implementation (github.com/wwyi1828/SRMIL); where we differ it says so below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv
from torch_geometric.utils import add_remaining_self_loops

from srmil.models.base import FeatureScaler, GatedAttention, MILOutput, bag_cross_entropy, check_bag


@dataclass
class SRMILConfig:
    # graph attention encoder / decoder
    heads: int = 4
    hidden_per_head: int = 64  # encoder width = heads * hidden_per_head = 256
    encoder_layers: int = 2
    decoder_layers: int = 2  # the last one has decoder_out_heads heads and outputs D features
    decoder_out_heads: int = 1
    feat_dropout: float = 0.11  # on each GAT layer's input
    attn_dropout: float = 0.15  # on the attention coefficients
    negative_slope: float = 0.2  # LeakyReLU inside the attention scores
    residual: bool = True
    # masked reconstruction
    mask_ratio: float = 0.7  # share of patch nodes hidden in training (never the super-node)
    token_init_std: float = 0.01  # mask tokens and super-node token start near zero
    rec_alpha: float = 1.0  # scaled cosine error exponent: mean((1 - cos)^alpha)
    # classification
    pooling: str = "supernode"  # "supernode" (reference default) or "attention" (gated)
    cls_hidden: int = 128
    cls_dropout: float = 0.059
    # joint loss: ce = (2 - w_ce) ce_masked + w_ce ce_full; loss = (2 - w_rec) ce + w_rec rec
    w_ce: float = 1.0
    w_rec: float = 1.8
    init_gain: float = 1.414  # Xavier gain for the projection and the GAT / decoder weights

    def __post_init__(self) -> None:
        if self.pooling not in ("supernode", "attention"):
            raise ValueError(f"pooling must be 'supernode' or 'attention', got {self.pooling!r}")
        for name in ("heads", "hidden_per_head", "encoder_layers", "decoder_layers",
                     "decoder_out_heads", "cls_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("feat_dropout", "attn_dropout", "cls_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {self.mask_ratio}")
        for name in ("w_ce", "w_rec"):
            if not 0.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [0, 2], got {getattr(self, name)}")


class GATLayer(nn.Module):
    """Feature dropout -> multi-head GATConv + residual -> LayerNorm -> PReLU.

    Heads are concatenated (or averaged with concat=False, for an output layer of a fixed width).

    Self-loops come with the edge index (the model adds any missing ones), so the super-node gets
    none, as in the reference. Residual: identity when the width is unchanged, else a bias-free
    linear map (the reference's layer silently drops the identity residual; we keep it).
    """

    def __init__(self, in_dim: int, out_per_head: int, heads: int, config: SRMILConfig,
                 concat: bool = True, norm_act: bool = True, residual: bool = True):
        super().__init__()
        out_dim = heads * out_per_head if concat else out_per_head
        self.dropout = nn.Dropout(config.feat_dropout)
        self.conv = GATConv(in_dim, out_per_head, heads=heads, concat=concat,
                            negative_slope=config.negative_slope, dropout=config.attn_dropout,
                            add_self_loops=False)
        self.residual = None
        if residual:
            self.residual = (nn.Identity() if in_dim == out_dim
                             else nn.Linear(in_dim, out_dim, bias=False))
        self.norm = nn.LayerNorm(out_dim) if norm_act else nn.Identity()
        self.act = nn.PReLU() if norm_act else nn.Identity()

    def reset_parameters(self, gain: float) -> None:
        self.conv.reset_parameters()
        nn.init.xavier_normal_(self.conv.lin.weight, gain=gain)
        nn.init.xavier_normal_(self.conv.att_src, gain=gain)
        nn.init.xavier_normal_(self.conv.att_dst, gain=gain)
        if isinstance(self.residual, nn.Linear):
            nn.init.xavier_normal_(self.residual.weight, gain=gain)

    def forward(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """x: (M, in_dim), edge_index: (2, E) -> (M, out_dim), attention (E, heads)."""
        h = self.dropout(x)
        out, (_, alpha) = self.conv(h, edge_index, return_attention_weights=True)
        if self.residual is not None:
            out = out + self.residual(h)
        return self.act(self.norm(out)), alpha


class SRMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, config: SRMILConfig | None = None):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.config = cfg = config or SRMILConfig()
        width, per_head = cfg.heads * cfg.hidden_per_head, cfg.hidden_per_head

        # Tokens live in the input feature space and pass through the input projection, like
        # patches. The reference calls the projection its "reformer".
        self.scaler = FeatureScaler(in_dim)  # standardised features are also the rec. target
        self.input_proj = nn.Linear(in_dim, in_dim)
        self.enc_mask_token = nn.Parameter(torch.zeros(1, in_dim))
        self.super_token = (nn.Parameter(torch.zeros(1, in_dim))
                            if cfg.pooling == "supernode" else None)

        self.encoder = nn.ModuleList(
            GATLayer(in_dim if i == 0 else width, per_head, cfg.heads, cfg, residual=cfg.residual)
            for i in range(cfg.encoder_layers))

        self.encoder_to_decoder = nn.Linear(width, width, bias=False)
        self.dec_mask_token = nn.Parameter(torch.zeros(1, width))
        # Hidden decoder layers as in the encoder; the output layer is a plain GATConv to D.
        self.decoder = nn.ModuleList(
            GATLayer(width, per_head, cfg.heads, cfg, residual=cfg.residual)
            for _ in range(cfg.decoder_layers - 1))
        self.decoder.append(GATLayer(width, in_dim, cfg.decoder_out_heads, cfg, concat=False,
                                     norm_act=False, residual=False))

        self.attention_pool = (GatedAttention(per_head, cfg.cls_hidden)
                               if cfg.pooling == "attention" else None)
        self.classifier = nn.Sequential(
            nn.Linear(per_head, cfg.cls_hidden), nn.ReLU(), nn.Dropout(cfg.cls_dropout),
            nn.Linear(cfg.cls_hidden, n_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gain = self.config.init_gain
        nn.init.xavier_uniform_(self.input_proj.weight, gain=gain)
        nn.init.zeros_(self.input_proj.bias)
        nn.init.xavier_normal_(self.encoder_to_decoder.weight, gain=gain)
        for layer in [*self.encoder, *self.decoder]:
            layer.reset_parameters(gain)
        for token in (self.enc_mask_token, self.dec_mask_token, self.super_token):
            if token is not None:
                nn.init.normal_(token, std=self.config.token_init_std)

    # --- graph and masking -----------------------------------------------------------------

    def _graphs(self, edge_index: Tensor, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(patch graph with a self-loop on every patch, same graph plus the super-node's edges).

        The super-node is node n; its edges are appended last, patch -> super-node first, so that
        the last encoder layer's attention over them sits at a known slice (see `_attention`).
        """
        edge_index = edge_index.to(device=device, dtype=torch.long)
        patch_graph, _ = add_remaining_self_loops(edge_index, num_nodes=n)
        if self.super_token is None:
            return patch_graph, patch_graph
        patches = torch.arange(n, device=device)
        hub = torch.full_like(patches, n)
        with_super = torch.cat(
            [patch_graph, torch.stack([patches, hub]), torch.stack([hub, patches])], dim=1)
        return patch_graph, with_super

    def n_masked(self, n: int) -> int:
        return min(n, round(self.config.mask_ratio * n))

    def mask_nodes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Indices (CPU, int64) of round(mask_ratio * n) distinct random patch nodes out of n.

        Drawn on the CPU (global RNG unless a generator is given) so that torch.manual_seed fixes
        the mask on any device.
        """
        return torch.randperm(n, generator=generator)[: self.n_masked(n)]

    # --- encoder, pooling, decoder ---------------------------------------------------------

    def _encode(self, nodes: Tensor, graph: Tensor) -> tuple[Tensor, Tensor]:
        """nodes: (M, D) raw features -> (M, heads * hidden), last layer's attention (E, heads)."""
        h = self.input_proj(nodes)
        for layer in self.encoder:
            h, alpha = layer(h, graph)
        return h, alpha

    def _classify(self, h: Tensor, n: int, alpha: Tensor) -> MILOutput:
        """Bag logits from encoder outputs h (M, heads * hidden) of n patches [+ super-node]."""
        per_node = h.view(h.shape[0], self.config.heads, -1).mean(dim=1)  # (M, hidden)
        if self.super_token is not None:
            bag = per_node[n]
            # Last layer's attention from each patch to the super-node, averaged over heads.
            attention = alpha[-2 * n: -n].mean(dim=1)
            attention = attention / attention.sum().clamp_min(1e-12)
        else:
            attention = self.attention_pool(per_node[:n])
            bag = attention @ per_node[:n]
        return MILOutput(self.classifier(bag), attention)

    def _decode(self, h: Tensor, masked: Tensor, graph: Tensor) -> Tensor:
        """Encoder output (N, width) -> reconstructed features (N, D); masked nodes re-masked."""
        z = self.encoder_to_decoder(h)
        z = torch.where(masked.unsqueeze(1), self.dec_mask_token, z)
        for layer in self.decoder:
            z, _ = layer(z, graph)
        return z

    def _with_super(self, nodes: Tensor) -> Tensor:
        return nodes if self.super_token is None else torch.cat([nodes, self.super_token])

    # --- public interface ------------------------------------------------------------------

    def forward(self, x: Tensor, edge_index: Tensor) -> MILOutput:
        """Predict one bag, nothing masked.

        x: (N, D) float patch features; edge_index: (2, E) patch-patch edges (node ids < N).
        Returns logits (C,) and attention (N,) summing to 1: with super-node pooling the last
        encoder layer's attention of the super-node over the patches (mean over heads), with
        attention pooling the gated pooling weights.
        """
        n = check_bag(x)
        x = self.scaler(x)
        _, graph = self._graphs(edge_index, n, x.device)
        h, alpha = self._encode(self._with_super(x), graph)
        return self._classify(h, n, alpha)

    def training_loss(self, x: Tensor, edge_index: Tensor,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """Joint loss of one bag: (2 - w_rec) * CE + w_rec * reconstruction.

        Returns the scalar loss and its parts as floats: loss, ce, ce_masked, ce_full, rec.
        As in the reference, reconstruction runs on the patch graph alone (the super-node would
        otherwise leak global context into every masked patch), and the masked classification
        re-encodes the same masked bag with the super-node attached.
        """
        cfg = self.config
        n = check_bag(x)
        x = self.scaler(x)
        patch_graph, graph = self._graphs(edge_index, n, x.device)
        masked_ids = self.mask_nodes(n).to(x.device)
        masked = torch.zeros(n, dtype=torch.bool, device=x.device)
        masked[masked_ids] = True
        x_masked = torch.where(masked.unsqueeze(1), self.enc_mask_token, x)

        h_masked, alpha = self._encode(x_masked, patch_graph)
        if len(masked_ids) > 0:
            x_hat = self._decode(h_masked, masked, patch_graph)
            cos = F.cosine_similarity(x_hat[masked_ids], x[masked_ids], dim=-1)
            rec = (1.0 - cos).pow(cfg.rec_alpha).mean()
        else:
            rec = x.new_zeros(())

        if self.super_token is not None:
            h_masked, alpha = self._encode(self._with_super(x_masked), graph)
        ce_masked = bag_cross_entropy(self._classify(h_masked, n, alpha).logits, label)

        h_full, alpha = self._encode(self._with_super(x), graph)
        ce_full = bag_cross_entropy(self._classify(h_full, n, alpha).logits, label)

        ce = (2.0 - cfg.w_ce) * ce_masked + cfg.w_ce * ce_full
        loss = (2.0 - cfg.w_rec) * ce + cfg.w_rec * rec
        parts = torch.stack([loss, ce, ce_masked, ce_full, rec]).detach().tolist()
        return loss, dict(zip(("loss", "ce", "ce_masked", "ce_full", "rec"), parts, strict=True))
