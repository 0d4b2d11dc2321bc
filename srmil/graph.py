"""Spatial graphs over the aligned patch grid: which patches are neighbours of which.

Patch origins are multiples of the patch stride in level-0 pixels, so `rint(coords / stride)` puts
every patch on an integer grid cell. Two patches are neighbours when the Euclidean distance between
their cells is at most `radius_cells(window) = 1.42 * window`, the radius the SRMIL reference uses
(`dgl.radius_graph(pos / patch_size, w_size * 1.42)` followed by `add_self_loop`):

- window 1 (radius 1.42): the 8-neighbourhood, offsets with |dx|, |dy| <= 1.
- window 2 (radius 2.84, the reference default): the full 5x5 square, 24 neighbours. The far
  corners (+-2, +-2) lie at 2.83 < 2.84, so they are included; (0, +-3) at 3.0 is not.

Edges are found without an N x N matrix or distance computations: each cell becomes one int64
key, the keys are sorted once (O(N log N)), and each row of the fixed neighbour offsets is one
vectorised binary search (`np.searchsorted`) in them, then a gather and a compare per offset. No
hashing is involved; the build time is linear in practice (`benchmarks/graph.py`: a slope of 0.96
in CPU time from 10k to 1M patches, docs/method.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from srmil import __version__, store
from srmil.wsi.tiling import read_tiles

# Reference: radius = w_size * 1.42 in patch widths (slightly above sqrt(2), so diagonals count).
RADIUS_PER_WINDOW = 1.42


def radius_cells(window: int) -> float:
    """Neighbour radius in grid cells (patch strides) for a window size."""
    return RADIUS_PER_WINDOW * window


def neighbour_offsets(window: int, self_loops: bool = True) -> np.ndarray:
    """(K, 2) int64 cell offsets (dx, dy) within `radius_cells(window)`, sorted; (0, 0) if loops."""
    if int(window) != window or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    radius = radius_cells(int(window))
    reach = math.floor(radius)
    d = np.arange(-reach, reach + 1)
    dx, dy = (a.ravel() for a in np.meshgrid(d, d, indexing="ij"))
    keep = dx * dx + dy * dy <= radius * radius
    if not self_loops:
        keep &= (dx != 0) | (dy != 0)
    return np.stack([dx[keep], dy[keep]], axis=1).astype(np.int64)


def grid_edges(coords_level0: np.ndarray, stride_level0: float, window: int = 2,
               self_loops: bool = True) -> np.ndarray:
    """(2, E) int64 edge index (row 0 source, row 1 target), both directions, sorted by (src, dst).

    `coords_level0` is (N, 2) patch origins in level-0 px; `stride_level0` the grid step in level-0
    px (may be fractional). Two patches on the same grid cell are an error: the grid is not aligned.
    """
    coords = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
    if not stride_level0 > 0:
        raise ValueError(f"stride_level0 must be positive, got {stride_level0!r}")
    offsets = neighbour_offsets(window, self_loops)
    n = len(coords)
    if n == 0:
        return np.zeros((2, 0), dtype=np.int64)
    keys, width = _cell_keys(coords, stride_level0, int(np.abs(offsets).max()))
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if n > 1 and np.any(sorted_keys[1:] == sorted_keys[:-1]):
        dup = order[np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])[0]]
        raise ValueError(f"patches share a grid cell (e.g. patch {dup} at {coords[dup].tolist()}): "
                         f"coords are not aligned to a grid of stride {stride_level0}")
    return _sorted_edges(_neighbour_ranks(sorted_keys, offsets, width), order)


def _cell_keys(coords: np.ndarray, stride_level0: float, reach: int) -> tuple[np.ndarray, int]:
    """One int64 key per patch, i * width + j for its grid cell (i, j), and the width."""
    cells = np.rint(coords / stride_level0).astype(np.int64)
    # Shift cells so that every queried neighbour (cell + offset) has non-negative coordinates and
    # a column inside [0, width): then key = i * width + j is unique and never aliases across rows.
    i = cells[:, 0] - cells[:, 0].min() + reach
    j = cells[:, 1] - cells[:, 1].min() + reach
    width = int(j.max()) + reach + 1
    return i * width + j, width


def _neighbour_ranks(sorted_keys: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """by_rank[k, r]: the sorted position of the neighbour at offsets[k] of the r-th patch in
    key order, n where there is none."""
    # Cells with the same dx lie in one grid row, at consecutive keys. Per dx, one searchsorted
    # finds for every patch (taken in sorted-key order, so memory access stays sequential) the
    # first key >= its leftmost neighbour; walking dy upwards, that pointer moves forward by one
    # exactly on a match, so each further offset costs a gather and a compare, not a search.
    n = len(sorted_keys)
    index_dtype = np.int32 if n < 2**31 - 1 else np.int64
    by_rank = np.empty((len(offsets), n), dtype=index_dtype)
    wanted = {(int(dx), int(dy)): k for k, (dx, dy) in enumerate(offsets)}
    at = np.empty(n, dtype=np.int64)
    found = np.empty(n, dtype=np.int64)
    hit = np.empty(n, dtype=bool)
    gap = np.empty(n, dtype=np.int64)
    for dx in np.unique(offsets[:, 0]).tolist():
        row_dy = offsets[offsets[:, 0] == dx, 1]
        dy_min, dy_max = int(row_dy.min()), int(row_dy.max())
        target = sorted_keys + (dx * width + dy_min)
        pointer = np.searchsorted(sorted_keys, target)
        for dy in range(dy_min, dy_max + 1):
            np.minimum(pointer, n - 1, out=at)
            np.take(sorted_keys, at, out=found)
            np.equal(found, target, out=hit)
            if (dx, dy) in wanted:
                # at where hit else n, as arithmetic: masked copies are several times slower here.
                np.subtract(n, at, out=gap)
                gap *= ~hit
                gap += at
                by_rank[wanted[(dx, dy)]] = gap
            pointer += hit
            target += 1
    return by_rank


def _sorted_edges(by_rank: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The (2, E) edges, sorted by (source, target), from `_neighbour_ranks`' table (modified
    in place) and the patches' key order."""
    n = len(order)
    index_dtype = by_rank.dtype
    # Sorted positions -> patch indices (n stays n), then one row per patch: neighbours[node, k].
    # Tilers emit patches in raster order, where the two coincide and the relabelling is skipped.
    if np.array_equal(order, np.arange(n)):
        neighbours = np.ascontiguousarray(by_rank.T)
    else:
        rank_to_node = np.append(order, n).astype(index_dtype)
        for row in by_rank:
            row[:] = rank_to_node[row]
        neighbours = np.empty((n, len(by_rank)), dtype=index_dtype)
        neighbours[order] = by_rank.T
    del by_rank

    # Sorting each row puts targets in ascending order and the "none" marker (n) last; reading the
    # valid entries row by row then yields edges sorted by (source, target).
    neighbours.sort(axis=1)
    valid = neighbours < n
    degree = np.count_nonzero(valid, axis=1)
    edges = np.empty((2, int(degree.sum())), dtype=np.int64)
    edges[0] = np.repeat(np.arange(n, dtype=np.int64), degree)
    edges[1] = neighbours[valid]
    return edges


def build_graph(tiles_path: str | Path, out_path: str | Path, window: int = 2) -> dict[str, Any]:
    """Build the spatial graph of one tile set and write it as a graph store; return its attrs."""
    coords, _fraction, plan = read_tiles(tiles_path)
    stride = float(plan.stride_level0)
    edges = grid_edges(coords, stride, window=window, self_loops=True)
    attrs = {
        "window": int(window),
        "radius_cells": radius_cells(window),
        "stride_level0": stride,
        "n_nodes": int(len(coords)),
        "n_edges": int(edges.shape[1]),
        "self_loops": True,
        "srmil_version": __version__,
    }
    store.write_graph_store(out_path, edges, attrs)
    return attrs
