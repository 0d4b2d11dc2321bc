"""GENConv with softmax aggregation that fits slides of 100,000 patches in CPU memory.

torch-geometric's `GENConv` (Li et al. 2020, "DeeperGCN"; Patch-GCN's layer) builds every edge's
message and softmax weight as (E, channels) tensors and keeps several of them for the backward
pass: about 1.3 GB each for a 128-wide layer on the window-2 graph of 100k patches (2.5M edges).
Without edge features the message of edge j -> i depends on j alone, m_j = relu(x_j) + eps, so

    out_i = sum_{j -> i} w_ij m_j,   w_ij = exp(t m_j - M_i) / (S_i + 1e-16)     (per channel)
    M_i = max_{j -> i} t m_j,        S_i = sum_{j -> i} exp(t m_j - M_i)

needs only node-sized tensors to be kept. `SparseGENConv` computes these sums over bounded edge
chunks and its backward pass from the saved node tensors:

    d out_i / d m_k = w_ik (1 + t (m_k - out_i)),     d out_i / d t = sum_j w_ij m_j (m_j - out_i)

It is `GENConv` (same parameters, state-dict keys and maths, checked against
`GENConv.forward` in the tests) for its homogeneous case: one input, no edge features, in =
out channels, softmax aggregation; anything else falls back to `GENConv.forward`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch_geometric.nn import GENConv
from torch_geometric.nn.aggr import SoftmaxAggregation

from srmil.mil.models.gat import NoTemplateFiles, SparseGraph

# Elements per edge chunk (64 MB of float32).
CHUNK_ELEMENTS = 2**24


def _parts(n_edges: int, channels: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, channels))
    for start in range(0, n_edges, step):
        yield slice(start, start + step)


class _SoftmaxAggregate(torch.autograd.Function):
    """out_i = softmax-weighted sum of m_j over edges j -> i, per channel; saves node tensors."""

    @staticmethod
    def forward(ctx, m: Tensor, t: Tensor, graph: SparseGraph) -> Tensor:
        n, c = m.shape
        src, dst = graph.src, graph.dst
        tm = m * t
        top = torch.full_like(m, -torch.inf)
        for part in _parts(len(src), c):  # the largest score per target (a constant shift)
            top.scatter_reduce_(0, dst[part, None].expand(-1, c), tm[src[part]], "amax")
        total, weighted = torch.zeros_like(m), torch.zeros_like(m)
        for part in _parts(len(src), c):
            e = torch.exp(tm[src[part]] - top[dst[part]])
            total.index_add_(0, dst[part], e)
            weighted.index_add_(0, dst[part], e * m[src[part]])
        total += 1e-16  # as torch_geometric.utils.softmax
        out = weighted / total
        ctx.save_for_backward(m, t, top, total, out)
        ctx.graph = graph
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        m, t, top, total, out = ctx.saved_tensors
        graph: SparseGraph = ctx.graph
        src, dst = graph.src, graph.dst
        c = m.shape[1]
        tm = m * t
        per_total = grad_out / total  # g_i / S_i
        grad_m = torch.zeros_like(m)
        grad_t = torch.zeros((), dtype=m.dtype, device=m.device)
        for part in _parts(len(src), c):
            m_j, out_i = m[src[part]], out[dst[part]]
            coef = per_total[dst[part]] * torch.exp(tm[src[part]] - top[dst[part]])  # g_i w_ij
            if ctx.needs_input_grad[0]:
                grad_m.index_add_(0, src[part], coef * (1 + t * (m_j - out_i)))
            if ctx.needs_input_grad[1]:
                grad_t += (coef * m_j * (m_j - out_i)).sum()
        return (grad_m if ctx.needs_input_grad[0] else None,
                grad_t.reshape(t.shape) if ctx.needs_input_grad[1] else None, None)


class SparseGENConv(NoTemplateFiles, GENConv):
    """`torch_geometric.nn.GENConv` with memory-lean softmax aggregation.

    Takes a `SparseGraph` (or an edge index, which falls back to GENConv's own aggregation).
    """

    def _lean(self, x: Tensor, graph: object, edge_attr: Tensor | None) -> bool:
        aggr = self.aggr_module
        return (isinstance(graph, SparseGraph) and isinstance(x, Tensor) and edge_attr is None
                and isinstance(aggr, SoftmaxAggregation) and aggr.channels == 1
                and not aggr.semi_grad and not hasattr(self, "lin_src")
                and not hasattr(self, "msg_norm") and not hasattr(self, "lin_aggr_out"))

    def forward(self, x: Tensor, graph: SparseGraph | Tensor,  # type: ignore[override]
                edge_attr: Tensor | None = None) -> Tensor:
        """x: (N, C) -> (N, C): MLP(softmax aggregation of relu(x_j) + eps over j -> i, + x_i)."""
        if not self._lean(x, graph, edge_attr):
            index = graph.edge_index if isinstance(graph, SparseGraph) else graph
            return super().forward(x, index, edge_attr)
        t = self.aggr_module.t
        if not isinstance(t, Tensor):
            t = x.new_full((1,), float(t))
        out = _SoftmaxAggregate.apply(x.relu() + self.eps, t, graph)
        return self.mlp(out + x)
