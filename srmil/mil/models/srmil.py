"""SRMIL: spatially regularised multiple-instance learning (Wu et al., WACV 2026).

A slide is a graph: patch nodes joined to their grid neighbours, plus one learnable super-node
joined both ways to every patch. A graph-attention encoder feeds two heads:

    project -> mask -> encode -> decode -> cosine error on the masked patches   (no labels)
                              -> pool (super-node) -> classify                  (slide label)

Hiding 70% of the patches and rebuilding them from their spatial neighbours is a task that depends
only on the tissue, so it regularises the shared encoder without label noise. Defaults follow the
public reference implementation (github.com/wwyi1828/SRMIL); docs/method.md lists every
hyper-parameter and each place where we differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.utils import add_remaining_self_loops

from srmil.mil.models.base import (
    FeatureScaler,
    GatedAttention,
    MILOutput,
    bag_cross_entropy,
    check_bag,
)
from srmil.mil.models.gat import SparseGATConv, SparseGraph

POOLINGS = ("supernode", "gat", "gated")
REC_NODES = ("masked", "all")


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
    residual: bool = True  # a bias-free linear residual on layers that change the width
    # The reference's layers drop the residual where the width is unchanged (its projection
    # would be square); True adds an identity residual there.
    identity_residual: bool = False
    # masked reconstruction
    mask_ratio: float = 0.7  # share of patch nodes hidden in training (never the super-node)
    token_init_std: float = 0.01  # mask tokens and super-node token start near zero
    rec_alpha: float = 1.0  # scaled cosine error exponent: mean((1 - cos)^alpha)
    # Patches the reconstruction loss counts: "masked" (the reference) or "all" (with
    # mask_ratio 0: an autoencoder on the unmasked graph, the "no masking" ablation).
    rec_nodes: str = "masked"
    # classification
    # "supernode" (reference default), "gat" (the reference's alternative: a 2-layer graph
    # attention network scores the patches) or "gated" (gated attention, Ilse et al.)
    pooling: str = "supernode"
    cls_hidden: int = 128  # classifier hidden size; also the "gat" and "gated" scorers' width
    cls_dropout: float = 0.059
    # joint loss: ce = (2 - w_ce) ce_masked + w_ce ce_full; loss = (2 - w_rec) ce + w_rec rec.
    # w_rec = 0 switches reconstruction off: the decoder is not run (the ablation).
    w_ce: float = 1.0
    w_rec: float = 1.8
    init_gain: float = 1.414  # Xavier gain for the projection and the GAT / decoder weights
    # Recompute each GAT layer in the backward pass instead of keeping its activations: less
    # memory for very large bags, more time. Same results.
    checkpoint_layers: bool = False

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name in ("heads", "hidden_per_head", "encoder_layers", "decoder_layers",
                     "decoder_out_heads", "cls_hidden"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("feat_dropout", "attn_dropout", "cls_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.rec_nodes not in REC_NODES:
            raise ValueError(f"rec_nodes must be one of {', '.join(REC_NODES)}, "
                             f"got {self.rec_nodes!r}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {self.mask_ratio}")
        if not self.rec_alpha > 0:
            raise ValueError(f"rec_alpha must be > 0, got {self.rec_alpha}")
        for name in ("w_ce", "w_rec"):
            if not 0.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [0, 2], got {getattr(self, name)}")


class GATLayer(nn.Module):
    """Feature dropout -> multi-head graph attention + residual -> norm -> activation.

    Heads are concatenated (or averaged with concat=False, for an output layer of a fixed width).
    Self-loops come with the graph (the model adds any missing ones), so the super-node gets
    none, as in the reference. Residual (when `residual`): a bias-free linear map when the width
    changes; when it does not, the identity if `identity_residual`, else none (the reference).
    """

    def __init__(self, in_dim: int, out_per_head: int, heads: int, config: SRMILConfig,
                 concat: bool = True, norm: bool = True, activation: str | None = "prelu",
                 residual: bool = True):
        super().__init__()
        out_dim = heads * out_per_head if concat else out_per_head
        self.dropout = nn.Dropout(config.feat_dropout)
        self.conv = SparseGATConv(in_dim, out_per_head, heads=heads, concat=concat,
                                  negative_slope=config.negative_slope,
                                  dropout=config.attn_dropout)
        self.residual: nn.Module | None = None
        if residual and in_dim != out_dim:
            self.residual = nn.Linear(in_dim, out_dim, bias=False)
        elif residual and config.identity_residual:
            self.residual = nn.Identity()
        self.norm = nn.LayerNorm(out_dim) if norm else nn.Identity()
        self.act = {"prelu": nn.PReLU, "relu": nn.ReLU, None: nn.Identity}[activation]()

    def reset_parameters(self, gain: float) -> None:
        self.conv.reset_parameters()
        nn.init.xavier_normal_(self.conv.lin.weight, gain=gain)
        nn.init.xavier_normal_(self.conv.att_src, gain=gain)
        nn.init.xavier_normal_(self.conv.att_dst, gain=gain)
        if isinstance(self.residual, nn.Linear):
            nn.init.xavier_normal_(self.residual.weight, gain=gain)

    def forward(self, x: Tensor, graph: SparseGraph) -> tuple[Tensor, Tensor]:
        """x: (M, in_dim) on M = graph.n_nodes nodes -> (M, out_dim), attention (E, heads)."""
        h = self.dropout(x)
        out, alpha = self.conv(h, graph, return_attention_weights=True)
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

        self.scaler = FeatureScaler(in_dim)  # standardised features are also the rec. target
        # Tokens live in the input feature space and pass through the input projection, like
        # patches. The reference calls the projection its "reformer".
        self.input_proj = nn.Linear(in_dim, in_dim)
        self.enc_mask_token = nn.Parameter(torch.zeros(1, in_dim))
        self.super_token = (nn.Parameter(torch.zeros(1, in_dim))
                            if cfg.pooling == "supernode" else None)

        self.encoder = nn.ModuleList(
            GATLayer(in_dim if i == 0 else width, per_head, cfg.heads, cfg, residual=cfg.residual)
            for i in range(cfg.encoder_layers))

        self.encoder_to_decoder = nn.Linear(width, width, bias=False)
        self.dec_mask_token = nn.Parameter(torch.zeros(1, width))
        # Hidden decoder layers as in the encoder; the output layer is a plain GAT layer to D.
        self.decoder = nn.ModuleList(
            GATLayer(width, per_head, cfg.heads, cfg, residual=cfg.residual)
            for _ in range(cfg.decoder_layers - 1))
        self.decoder.append(GATLayer(width, in_dim, cfg.decoder_out_heads, cfg, concat=False,
                                     norm=False, activation=None, residual=False))

        # Pooling alternatives to the super-node (reference "attender": GAT, ReLU, GAT to 1).
        self.attention_pool = (GatedAttention(per_head, cfg.cls_hidden)
                               if cfg.pooling == "gated" else None)
        self.attention_gat = (nn.ModuleList([
            GATLayer(per_head, cfg.cls_hidden, 1, cfg, norm=False, activation="relu",
                     residual=cfg.residual),
            GATLayer(cfg.cls_hidden, 1, 1, cfg, norm=False, activation=None, residual=False),
        ]) if cfg.pooling == "gat" else None)
        self.classifier = nn.Sequential(
            nn.Linear(per_head, cfg.cls_hidden), nn.ReLU(), nn.Dropout(cfg.cls_dropout),
            nn.Linear(cfg.cls_hidden, n_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gain = self.config.init_gain
        nn.init.xavier_uniform_(self.input_proj.weight, gain=gain)
        nn.init.zeros_(self.input_proj.bias)
        nn.init.xavier_normal_(self.encoder_to_decoder.weight, gain=gain)
        for layer in [*self.encoder, *self.decoder, *(self.attention_gat or [])]:
            layer.reset_parameters(gain)
        for token in (self.enc_mask_token, self.dec_mask_token, self.super_token):
            if token is not None:
                nn.init.normal_(token, std=self.config.token_init_std)

    # --- graph and masking -----------------------------------------------------------------

    def _graphs(self, edge_index: Tensor, n: int,
                device: torch.device) -> tuple[SparseGraph, SparseGraph]:
        """(patch graph with a self-loop on every patch, same graph plus the super-node's edges).

        The super-node is node n, the last node: in the graph's target-major edge order its n
        incoming edges (patch -> super-node, by patch) come last, see `_classify`.
        """
        edge_index = edge_index.to(device=device, dtype=torch.long)
        patch_edges, _ = add_remaining_self_loops(edge_index, num_nodes=n)
        patch_graph = SparseGraph.from_edge_index(patch_edges, n)
        if self.super_token is None:
            return patch_graph, patch_graph
        patches = torch.arange(n, device=device)
        hub = torch.full_like(patches, n)
        with_super = torch.cat(
            [patch_edges, torch.stack([patches, hub]), torch.stack([hub, patches])], dim=1)
        del patch_edges
        return patch_graph, SparseGraph.from_edge_index(with_super, n + 1)

    def n_masked(self, n: int) -> int:
        """floor(mask_ratio * n), as the reference (the epsilon absorbs 0.7 * 10 = 6.999...)."""
        return min(n, math.floor(self.config.mask_ratio * n + 1e-9))

    def mask_nodes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Indices (CPU, int64) of floor(mask_ratio * n) distinct random patch nodes out of n.

        Drawn on the CPU (global RNG unless a generator is given) so that torch.manual_seed fixes
        the mask on any device.
        """
        return torch.randperm(n, generator=generator)[: self.n_masked(n)]

    # --- encoder, pooling, decoder ---------------------------------------------------------

    def _layer(self, layer: GATLayer, h: Tensor, graph: SparseGraph) -> tuple[Tensor, Tensor]:
        if self.config.checkpoint_layers and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, graph, use_reentrant=False)
        return layer(h, graph)

    def _encode(self, h: Tensor, graph: SparseGraph) -> tuple[Tensor, Tensor]:
        """h: (M, D) projected node inputs -> (M, heads * hidden), last layer's attention
        (E, heads)."""
        for layer in self.encoder:
            h, alpha = self._layer(layer, h, graph)
        return h, alpha

    def _classify(self, h: Tensor, n: int, alpha: Tensor, graph: SparseGraph) -> MILOutput:
        """Bag logits from encoder outputs h (M, heads * hidden) of n patches [+ super-node].

        `alpha` is the last encoder layer's attention on `graph`, the patch graph for "gat"
        pooling.
        """
        per_node = h.view(h.shape[0], self.config.heads, -1).mean(dim=1)  # (M, hidden)
        if self.super_token is not None:
            bag = per_node[n]
            # Last layer's attention of the super-node over the patches, averaged over heads.
            attention = alpha[-n:].mean(dim=1)
            attention = attention / attention.sum().clamp_min(1e-12)
        else:
            if self.attention_gat is not None:
                scores = per_node
                for layer in self.attention_gat:
                    scores, _ = self._layer(layer, scores, graph)
                attention = torch.softmax(scores.squeeze(-1), dim=0)
            else:
                attention = self.attention_pool(per_node)
            bag = attention @ per_node
        return MILOutput(self.classifier(bag), attention)

    def _decode(self, h: Tensor, masked: Tensor, graph: SparseGraph) -> Tensor:
        """Encoder output (N, width) -> reconstructed features (N, D); masked nodes re-masked."""
        z = self.encoder_to_decoder(h)
        z = torch.where(masked.unsqueeze(1), self.dec_mask_token, z)
        for layer in self.decoder:
            z, _ = self._layer(layer, z, graph)
        return z

    def _with_super(self, projected: Tensor) -> Tensor:
        """Append the projected super-node token to projected patch inputs (N, D)."""
        if self.super_token is None:
            return projected
        return torch.cat([projected, self.input_proj(self.super_token)])

    # --- public interface ------------------------------------------------------------------

    def forward(self, x: Tensor, edge_index: Tensor) -> MILOutput:
        """Predict one bag, nothing masked.

        x: (N, D) float patch features; edge_index: (2, E) patch-patch edges (node ids < N).
        Returns logits (C,) and attention (N,) summing to 1: with super-node pooling the last
        encoder layer's attention of the super-node over the patches (mean over heads), else
        the pooling weights.
        """
        n = check_bag(x)
        x = self.scaler(x)
        patch_graph, graph = self._graphs(edge_index, n, x.device)
        h, alpha = self._encode(self._with_super(self.input_proj(x)), graph)
        return self._classify(h, n, alpha, patch_graph)

    def training_loss(self, x: Tensor, edge_index: Tensor,
                      label: int | Tensor) -> tuple[Tensor, dict[str, float]]:
        """Joint loss of one bag: (2 - w_rec) * CE + w_rec * reconstruction.

        Returns the scalar loss and its parts as floats: loss, ce, ce_masked, ce_full, rec.
        As in the reference, reconstruction runs on the patch graph alone (the super-node would
        otherwise leak global context into every masked patch), and the masked classification
        re-encodes the same masked bag with the super-node attached. Without a super-node the
        reconstruction pass's encoding is classified directly (the reference encodes it twice,
        differing only in dropout). With w_rec = 0 the decoder is not run and `rec` is 0.
        """
        cfg = self.config
        n = check_bag(x)
        x = self.scaler(x)
        patch_graph, graph = self._graphs(edge_index, n, x.device)
        masked_ids = self.mask_nodes(n).to(x.device)
        masked = torch.zeros(n, dtype=torch.bool, device=x.device)
        masked[masked_ids] = True
        x_masked = torch.where(masked.unsqueeze(1), self.enc_mask_token, x)
        # Projected once, used by both masked passes (the projection is row-wise).
        p_masked = self.input_proj(x_masked)
        del x_masked

        target = masked_ids if cfg.rec_nodes == "masked" else torch.arange(n, device=x.device)
        reconstruct = cfg.w_rec > 0 and len(target) > 0
        h_masked = alpha = None
        if reconstruct or self.super_token is None:  # else this pass would only feed the decoder
            h_masked, alpha = self._encode(p_masked, patch_graph)
        if reconstruct:
            x_hat = self._decode(h_masked, masked, patch_graph)
            cos = F.cosine_similarity(x_hat[target], x[target], dim=-1)
            rec = (1.0 - cos).pow(cfg.rec_alpha).mean()
            del x_hat
        else:
            rec = x.new_zeros(())

        if self.super_token is not None:
            h_masked, alpha = self._encode(self._with_super(p_masked), graph)
        ce_masked = bag_cross_entropy(self._classify(h_masked, n, alpha, patch_graph).logits,
                                      label)
        del h_masked, alpha, p_masked

        h_full, alpha = self._encode(self._with_super(self.input_proj(x)), graph)
        ce_full = bag_cross_entropy(self._classify(h_full, n, alpha, patch_graph).logits, label)

        ce = (2.0 - cfg.w_ce) * ce_masked + cfg.w_ce * ce_full
        loss = (2.0 - cfg.w_rec) * ce + cfg.w_rec * rec
        parts = torch.stack([loss, ce, ce_masked, ce_full, rec]).detach().tolist()
        return loss, dict(zip(("loss", "ce", "ce_masked", "ce_full", "rec"), parts, strict=True))
