"""Graph attention that fits slides of 100,000 patches in CPU memory.

torch-geometric's `GATConv` gathers every edge's source features into an (E, heads, channels)
tensor and keeps it for the backward pass: with the window-2 grid graph (about 25 edges per
patch) that is ~2.6 GB per 256-wide layer and ~10 GB for a decoder layer that outputs 1024-d
features, at 100k patches. `SparseGATConv` is the same layer (same parameters, same maths, checked
against `GATConv` in the tests) that aggregates with a sparse CSR matrix product instead:

    out[i, h] = sum_j alpha[j -> i, h] * W_h x_j      as one (N x N) CSR matrix per head @ (N, C)

and computes the gradient of the attention weights with a sampled dense-dense product. Only
(E, heads)-sized tensors are kept per edge; nothing (E, heads, channels)-sized exists. On CUDA in
deterministic mode, where cuSPARSE is not reproducible, it gathers and index-adds bounded edge
chunks instead: the same sums, bit-identical between runs, nothing large kept either.
"""

from __future__ import annotations

import tempfile
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torch_geometric.nn
from torch import Tensor
from torch_geometric.utils import softmax


class SparseGraph(NamedTuple):
    """A directed graph (edge j -> i: messages flow from source j to target i) in the two
    compressed-row layouts that attention needs: rows = targets (forward), rows = sources
    (backward). Build it once per bag with `SparseGraph.from_edge_index`."""

    n_nodes: int
    src: Tensor  # (E,) int64 source of each edge; edges sorted by (target, source)
    dst: Tensor  # (E,) int64 target of each edge, non-decreasing
    crow: Tensor  # (N + 1,) int64 row pointers of the target-major layout
    t_crow: Tensor  # (N + 1,) int64 row pointers of the source-major (transposed) layout
    t_col: Tensor  # (E,) int64 target of each edge in source-major order
    t_perm: Tensor  # (E,) int64 position in the target-major order of each source-major entry

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, n_nodes: int) -> SparseGraph:
        """From a (2, E) edge index (row 0 source, row 1 target, any order, no duplicates)."""
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
        edge_index = edge_index.long()
        if edge_index.numel() and (int(edge_index.min()) < 0
                                   or int(edge_index.max()) >= n_nodes):
            raise ValueError(f"edge_index refers to nodes outside [0, {n_nodes})")
        src, dst = edge_index
        order = _argsort(dst * n_nodes + src)
        src, dst = src[order], dst[order]
        crow = _row_pointers(dst, n_nodes)
        t_perm = _argsort(src * n_nodes + dst)
        return cls(n_nodes, src, dst, crow, _row_pointers(src[t_perm], n_nodes), dst[t_perm],
                   t_perm)

    @property
    def edge_index(self) -> Tensor:
        """(2, E) in this graph's edge order (the order of the attention weights)."""
        return torch.stack([self.src, self.dst])

    def to(self, device: torch.device | str) -> SparseGraph:
        return SparseGraph(self.n_nodes, *(t.to(device) for t in self[1:]))


def _argsort(keys: Tensor) -> Tensor:
    # numpy's stable sort (timsort) is several times faster on the CPU than torch's for edge
    # lists, which arrive as long sorted runs.
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.argsort(keys, stable=True)


def _row_pointers(rows: Tensor, n: int) -> Tensor:
    crow = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n), dim=0, out=crow[1:])
    return crow


def _csr(crow: Tensor, col: Tensor, values: Tensor, n: int) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we test what we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=(n, n))


def _head_products(crow: Tensor, col: Tensor, weights: Tensor, x: Tensor, n: int) -> Tensor:
    """out[:, h] = CSR(crow, col, weights[:, h]) @ x[:, h] for every head; x: (N, H, C)."""
    return torch.stack([_csr(crow, col, weights[:, h].contiguous(), n) @ x[:, h].contiguous()
                        for h in range(x.shape[1])], dim=1)


# Elements per edge chunk in the index-based aggregation (64 MB of float32).
CHUNK_ELEMENTS = 2**24
# cuSPARSE's products promise no bit-wise reproducibility, so on CUDA in deterministic mode
# (training) the aggregation gathers and index-adds edge chunks instead, which torch makes
# deterministic there. Both give the same sums up to rounding.
INDEX_ON_DETERMINISTIC_CUDA = True


def _by_index(x: Tensor) -> bool:
    return (INDEX_ON_DETERMINISTIC_CUDA and x.is_cuda
            and torch.are_deterministic_algorithms_enabled())


def _index_products(src: Tensor, dst: Tensor, weights: Tensor, x: Tensor, n: int) -> Tensor:
    """out[dst[e], h] += weights[e, h] * x[src[e], h], edge chunk by edge chunk."""
    out = x.new_zeros((n, *x.shape[1:]))
    step = max(1, CHUNK_ELEMENTS // (x.shape[1] * x.shape[2]))
    for start in range(0, len(src), step):
        part = slice(start, start + step)
        out.index_add_(0, dst[part], x[src[part]] * weights[part].unsqueeze(-1))
    return out


def _edge_dots(src: Tensor, dst: Tensor, grad_out: Tensor, x: Tensor) -> Tensor:
    """(E, H): <grad_out[dst[e], h], x[src[e], h]>, edge chunk by edge chunk."""
    out = x.new_empty((len(src), x.shape[1]))
    step = max(1, CHUNK_ELEMENTS // (x.shape[1] * x.shape[2]))
    for start in range(0, len(src), step):
        part = slice(start, start + step)
        out[part] = (grad_out[dst[part]] * x[src[part]]).sum(dim=-1)
    return out


class _AttentionAggregate(torch.autograd.Function):
    """out[i, h] = sum over edges j -> i of alpha[e, h] * x[j, h]; saves only alpha and x."""

    @staticmethod
    def forward(ctx, alpha: Tensor, x: Tensor, graph: SparseGraph) -> Tensor:
        ctx.save_for_backward(alpha, x)
        ctx.graph = graph
        ctx.by_index = _by_index(x)
        if ctx.by_index:
            return _index_products(graph.src, graph.dst, alpha, x, graph.n_nodes)
        return _head_products(graph.crow, graph.src, alpha, x, graph.n_nodes)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        alpha, x = ctx.saved_tensors
        graph: SparseGraph = ctx.graph
        grad_out = grad_out.contiguous()
        grad_alpha = grad_x = None
        if ctx.needs_input_grad[1]:  # transposed product: each source collects from its targets
            if ctx.by_index:
                grad_x = _index_products(graph.dst, graph.src, alpha, grad_out, graph.n_nodes)
            else:
                grad_x = _head_products(graph.t_crow, graph.t_col, alpha[graph.t_perm],
                                        grad_out, graph.n_nodes)
        if ctx.needs_input_grad[0]:  # d out / d alpha[e] = <grad_out[target], x[source]>
            if ctx.by_index:
                grad_alpha = _edge_dots(graph.src, graph.dst, grad_out, x)
            else:
                pattern = torch.ones(len(graph.src), dtype=x.dtype, device=x.device)
                structure = _csr(graph.crow, graph.src, pattern, graph.n_nodes)
                grad_alpha = torch.stack([
                    torch.sparse.sampled_addmm(structure, grad_out[:, h].contiguous(),
                                               x[:, h].t().contiguous(), beta=0.0).values()
                    for h in range(x.shape[1])], dim=1)
        return grad_alpha, grad_x, None


class NoTemplateFiles:
    """Mixin for torch-geometric layers. On a class's first use in each process, PyG renders its
    `propagate` and `edge_updater` into .py files under the temp directory and never deletes
    them: a few hundred pile up in /tmp over a study, more over a cluster's jobs. Render them
    into a directory removed at once; the modules are loaded by then and nothing reads the files
    again (we never `torch.jit.script`), only tracebacks through them lose their source lines."""

    def _set_jittable_templates(self, raise_on_error: bool = False) -> None:
        with tempfile.TemporaryDirectory(prefix="srmil-pyg-") as folder:
            saved, tempfile.tempdir = tempfile.tempdir, folder
            try:
                super()._set_jittable_templates(raise_on_error)  # type: ignore[misc]
            finally:
                tempfile.tempdir = saved


class SparseGATConv(NoTemplateFiles, torch_geometric.nn.GATConv):
    """`torch_geometric.nn.GATConv` (same parameters and maths) with memory-lean aggregation.

    Takes a `SparseGraph` instead of an edge index; add self-loops to the graph beforehand (the
    layer adds none). Supports the homogeneous case only: one input, no edge features.
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, concat: bool = True,
                 negative_slope: float = 0.2, dropout: float = 0.0, bias: bool = True):
        super().__init__(in_channels, out_channels, heads=heads, concat=concat,
                         negative_slope=negative_slope, dropout=dropout, add_self_loops=False,
                         bias=bias)

    def forward(self, x: Tensor, graph: SparseGraph,  # type: ignore[override]
                return_attention_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x: (N, in_channels) -> (N, heads * out_channels), or (N, out_channels) averaged over
        heads with concat=False; with return_attention_weights also alpha (E, heads) in the
        graph's edge order (softmax over each target's incoming edges, after dropout)."""
        heads, channels = self.heads, self.out_channels
        h = self.lin(x).view(-1, heads, channels)
        score_src = (h * self.att_src).sum(dim=-1)  # (N, H)
        score_dst = (h * self.att_dst).sum(dim=-1)
        logits = F.leaky_relu(score_src[graph.src] + score_dst[graph.dst], self.negative_slope)
        alpha = softmax(logits, graph.dst, num_nodes=graph.n_nodes)  # (E, H)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        out = _AttentionAggregate.apply(alpha, h, graph)  # (N, H, C)
        out = out.reshape(-1, heads * channels) if self.concat else out.mean(dim=1)
        if self.bias is not None:
            out = out + self.bias
        return (out, alpha) if return_attention_weights else out
