"""Spatial grid graphs: hand-made grids, invariants, a KD-tree cross-check, the store round trip."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import toy_plan
from scipy.spatial import cKDTree

import srmil
from srmil import store
from srmil.graph import build_graph, grid_edges, neighbour_offsets, radius_cells
from srmil.wsi.tiling import write_tiles

STRIDE = 224


def grid_coords(rows: int, cols: int, stride: float = STRIDE) -> np.ndarray:
    """Origins (x, y) of a full rows x cols grid, raster order, level-0 px."""
    cells = np.argwhere(np.ones((rows, cols), dtype=bool))
    return np.rint(cells * stride).astype(np.int64)


def degrees(edges: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(edges[0], minlength=n)


def reference_edges(cells: np.ndarray, window: int, self_loops: bool) -> np.ndarray:
    """Same graph from scipy's KD-tree, sorted by (source, target)."""
    pairs = cKDTree(cells).query_pairs(radius_cells(window), output_type="ndarray")
    edges = np.concatenate([pairs, pairs[:, ::-1]]).reshape(-1, 2)
    if self_loops:
        loops = np.arange(len(cells))
        edges = np.concatenate([edges, np.stack([loops, loops], axis=1)])
    return edges[np.lexsort((edges[:, 1], edges[:, 0]))].T.astype(np.int64)


def test_window_offsets():
    # window 1: the 8-neighbourhood; window 2: radius 2.84 > 2 * sqrt(2), the full 5x5 square.
    assert len(neighbour_offsets(1, self_loops=False)) == 8
    assert np.abs(neighbour_offsets(1)).max() == 1
    offsets = {tuple(o) for o in neighbour_offsets(2, self_loops=False).tolist()}
    assert len(offsets) == 24
    assert offsets == {(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)} - {(0, 0)}
    assert (0, 0) in {tuple(o) for o in neighbour_offsets(2).tolist()}
    assert radius_cells(2) == pytest.approx(2.84)
    with pytest.raises(ValueError):
        neighbour_offsets(0)


def test_3x3_window1_degrees():
    edges = grid_edges(grid_coords(3, 3), STRIDE, window=1)
    deg = degrees(edges, 9)
    assert deg[4] == 8 + 1  # centre: 8 neighbours + self loop
    assert deg[[0, 2, 6, 8]].tolist() == [3 + 1] * 4  # corners
    assert deg[[1, 3, 5, 7]].tolist() == [5 + 1] * 4  # edge midpoints
    no_loops = grid_edges(grid_coords(3, 3), STRIDE, window=1, self_loops=False)
    assert degrees(no_loops, 9)[4] == 8
    assert not np.any(no_loops[0] == no_loops[1])


def test_5x5_window2_degrees():
    edges = grid_edges(grid_coords(5, 5), STRIDE, window=2, self_loops=False)
    deg = degrees(edges, 25).reshape(5, 5)
    assert deg[2, 2] == 24  # the centre sees the whole 5x5 square, corners included
    assert deg[0, 0] == 8  # a corner sees the 3x3 block of cells towards the centre, less itself


@pytest.mark.parametrize(("window", "interior_degree"), [(1, 9), (2, 25), (3, 61)])
def test_interior_degree_by_window(window, interior_degree):
    # Counted by hand, self-loop included: window 1 is the 3x3 square; window 2 (radius 2.84) the
    # whole 5x5 square, corners at 2.83 included; window 3 (radius 4.26) the whole 7x7 square
    # (corners at 4.24) plus (0, +-4) and (+-1, +-4) on each of the four sides: 49 + 12.
    n = 11
    edges = grid_edges(grid_coords(n, n), STRIDE, window=window)
    deg = degrees(edges, n * n).reshape(n, n)
    assert deg[n // 2, n // 2] == interior_degree
    assert deg.max() == interior_degree and deg.min() >= 1


def test_hand_made_l_shape():
    # An L of 5 cells, window 1:   x . .      cells (0,0) (1,0) (2,0) (2,1) (2,2) as (row, col);
    #                              x . .      (1,0) and (2,1) are diagonal neighbours.
    #                              x x x
    cells = np.array([[0, 0], [1, 0], [2, 0], [2, 1], [2, 2]])
    edges = grid_edges(cells * STRIDE, STRIDE, window=1, self_loops=False)
    pairs = {(int(s), int(t)) for s, t in edges.T}
    undirected = {tuple(sorted(p)) for p in pairs}
    assert undirected == {(0, 1), (1, 2), (1, 3), (2, 3), (3, 4)}
    assert len(pairs) == 2 * len(undirected)
    # Window 2 (radius 2.84) joins all 5 cells: the farthest pair, (0, 0)-(2, 2), is
    # sqrt(8) = 2.83 apart.
    full = grid_edges(cells * STRIDE, STRIDE, window=2, self_loops=False)
    assert full.shape[1] == 5 * 4


def test_format_symmetry_no_duplicates_sorted():
    rng = np.random.default_rng(0)
    cells = np.argwhere(rng.random((20, 30)) < 0.6)
    cells = cells[rng.permutation(len(cells))]
    edges = grid_edges(cells * STRIDE, STRIDE, window=2)
    assert edges.dtype == np.int64 and edges.shape[0] == 2
    pairs = {(int(s), int(t)) for s, t in edges.T}
    assert len(pairs) == edges.shape[1]  # no duplicates
    assert all((t, s) in pairs for s, t in pairs)  # every edge has its reverse
    order = np.lexsort((edges[1], edges[0]))
    assert np.array_equal(order, np.arange(edges.shape[1]))  # sorted by (source, target)


def test_holes_in_grid():
    # A 3x3 grid without its centre: with window 1 the ring is connected only along its sides.
    coords = np.delete(grid_coords(3, 3), 4, axis=0)
    deg = degrees(grid_edges(coords, STRIDE, window=1, self_loops=False), 8)
    # Original cells 0..8 minus 4: corners keep 2 neighbours, edge midpoints keep 4.
    assert deg.tolist() == [2, 4, 2, 4, 4, 2, 4, 2]


def test_non_integer_stride():
    stride = 447.3
    cells = np.argwhere(np.ones((4, 6), dtype=bool))
    coords = np.rint(cells * stride).astype(np.int64)  # origins rounded to whole pixels
    edges = grid_edges(coords, stride, window=1)
    assert np.array_equal(edges, reference_edges(cells, 1, self_loops=True))


def test_empty_and_single():
    assert grid_edges(np.zeros((0, 2)), STRIDE).shape == (2, 0)
    assert grid_edges(np.zeros((0, 2)), STRIDE).dtype == np.int64
    assert grid_edges(np.array([[448, 896]]), STRIDE).tolist() == [[0], [0]]
    assert grid_edges(np.array([[448, 896]]), STRIDE, self_loops=False).shape == (2, 0)


def test_rejects_misaligned_and_bad_stride():
    with pytest.raises(ValueError, match="share a grid cell"):
        grid_edges(np.array([[0, 0], [10, 0]]), STRIDE)
    with pytest.raises(ValueError):
        grid_edges(grid_coords(2, 2), 0.0)


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("self_loops", [True, False])
def test_matches_kdtree_on_random_grids(window, self_loops):
    rng = np.random.default_rng(window * 10 + self_loops)
    for _ in range(20):
        shape = rng.integers(1, 25, size=2)
        cells = np.argwhere(rng.random(shape) < rng.uniform(0.1, 1.0))
        cells = cells[rng.permutation(len(cells))] + rng.integers(-100, 100, size=2)
        stride = rng.uniform(100, 600)
        coords = np.rint(cells * stride).astype(np.int64)
        edges = grid_edges(coords, stride, window=window, self_loops=self_loops)
        assert np.array_equal(edges, reference_edges(cells, window, self_loops))


def test_build_graph_round_trip(tmp_path):
    stride = 447.3
    cells = np.argwhere(np.random.default_rng(1).random((6, 7)) < 0.7)
    coords = np.rint(cells * stride).astype(np.int64)
    tiles = tmp_path / "tiles.json"
    write_tiles(tiles, coords, np.ones(len(coords)), toy_plan(stride_level0=stride))

    attrs = build_graph(tiles, tmp_path / "graph.zarr", window=2)
    edges, stored = store.read_graph_store(tmp_path / "graph.zarr")
    assert np.array_equal(edges, grid_edges(coords, stride, window=2))
    assert attrs == {k: stored[k] for k in attrs}
    assert attrs["window"] == 2 and attrs["radius_cells"] == pytest.approx(2.84)
    assert attrs["stride_level0"] == stride and attrs["self_loops"] is True
    assert attrs["n_nodes"] == len(coords) and attrs["n_edges"] == edges.shape[1]
    assert attrs["srmil_version"] == srmil.__version__


def test_build_graph_empty_slide(tmp_path):
    tiles = tmp_path / "tiles.json"
    write_tiles(tiles, np.zeros((0, 2)), np.zeros(0), toy_plan())
    attrs = build_graph(tiles, tmp_path / "graph.zarr")
    edges, _ = store.read_graph_store(tmp_path / "graph.zarr")
    assert edges.shape == (2, 0) and attrs["n_nodes"] == 0 and attrs["n_edges"] == 0
