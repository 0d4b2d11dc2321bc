"""Nyström self-attention (Xiong et al., AAAI 2021), as TransMIL uses it (the `nystrom-attention`
package's `NystromAttention`, github.com/lucidrains/nystrom-attention).

Softmax attention softmax(Q K^T / sqrt(d)) V costs O(n^2); Nyström replaces it with m landmark
queries and keys (means of n/m consecutive tokens), O(n m):

    softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V  +  DepthwiseConv_seq(V)

The sequence is zero-padded at the front to a multiple of m; the pseudo-inverse is the
Moore-Penrose iteration Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4 started at
A^T / (max column sum * max row sum) (over all heads); the depthwise convolution along the
sequence (kernel 33) is a residual on the values. With m >= n the landmarks are the tokens and,
once the iteration has converged, this is exact softmax attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Approximate Moore-Penrose pseudo-inverse of a batch of square matrices (..., m, m)."""
    abs_a = a.abs()
    # One scale for the whole batch (all heads), as the reference.
    z = a.transpose(-1, -2) / (abs_a.sum(dim=-1).max() * abs_a.sum(dim=-2).max())
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float = 0.0):
        super().__init__()
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)
        self.value_conv = (nn.Conv2d(heads, heads, (residual_kernel, 1),
                                     padding=(residual_kernel // 2, 0), groups=heads, bias=False)
                           if residual_kernel else None)

    def forward(self, x: Tensor, query: int | None = None) -> tuple[Tensor, Tensor | None]:
        """x: (B, n, dim) -> (B, n, dim); with `query` (a token index) also that token's
        approximate attention over the n tokens, (B, heads, n), else None."""
        b, n, _ = x.shape
        h, m = self.heads, self.landmarks
        pad = (m - n % m) % m
        x = F.pad(x, (0, 0, pad, 0))  # zeros in front, so the landmarks group evenly
        q, k, v = (t.reshape(b, n + pad, h, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))  # (B, h, n + pad, d)
        q = q * self.scale
        group = math.ceil(n / m)  # tokens per landmark
        q_land = q.reshape(b, h, m, group, -1).sum(dim=3) / group
        k_land = k.reshape(b, h, m, group, -1).sum(dim=3) / group
        attn1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)  # (B, h, n + pad, m)
        attn2_inv = iterative_pinv(torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1),
                                   self.pinv_iterations)
        attn3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)  # (B, h, m, n + pad)
        out = (attn1 @ attn2_inv) @ (attn3 @ v)
        if self.value_conv is not None:
            out = out + self.value_conv(v)
        out = self.dropout(self.out(out.transpose(1, 2).reshape(b, n + pad, -1)))[:, -n:]
        row = None
        if query is not None:  # one row of attn1 pinv(attn2) attn3, without the padding
            row = ((attn1[:, :, pad + query: pad + query + 1] @ attn2_inv) @ attn3)[..., pad:]
            row = row.squeeze(2)
        return out, row
