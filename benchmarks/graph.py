"""Spatial graph build time from 10k to 1M patches: linear in the number of patches.

Patches lie on a tissue-like region of the patch grid (an ellipse with holes, in the raster order
the tiler writes; `--shuffled` also times a random order, which adds the relabelling step). For
each size: the time of `srmil.graph.grid_edges` (best of the repeats), microseconds per patch, and,
side by side, scipy's KD-tree radius search (`cKDTree.query_pairs`, what one would write without
a grid lookup, made into the same sorted two-way edge list with self-loops) on the same cells, as a
ratio; the two graphs are checked to be identical. The scaling exponent is the slope of log(time)
against log(patches): 1.0 is linear. Times are the best of `--repeats` (wall clock, and the
process's CPU time, which other jobs on a shared machine disturb less).

    python benchmarks/graph.py                       # 10k ... 1M, window 2 (a minute or two)
    python benchmarks/graph.py --sizes 1000000 4000000 --no-kdtree
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from srmil.graph import grid_edges, radius_cells

STRIDE_LEVEL0 = 448.0  # 224 px patches at 0.5 µm/px on a 0.25 µm/px scan


def tissue_cells(n: int, seed: int = 0) -> np.ndarray:
    """About n grid cells (row-major raster order) of an elliptical tissue piece with holes."""
    rng = np.random.default_rng(seed)
    # An ellipse of aspect 1.5 covering ~n cells once ~8% are removed as holes.
    b = np.sqrt(n / 0.92 / (np.pi * 1.5))
    a = 1.5 * b
    y, x = np.mgrid[-int(b) - 2 : int(b) + 3, -int(a) - 2 : int(a) + 3]
    inside = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    for _ in range(max(1, n // 2000)):  # round holes (lumina, tears)
        cy, cx = rng.uniform(-b, b), rng.uniform(-a, a)
        r = rng.uniform(1.0, 6.0)
        inside &= (x - cx) ** 2 + (y - cy) ** 2 > r * r
    cells = np.argwhere(inside)[:, ::-1]  # (x, y), raster order: y major
    return cells[:n].astype(np.int64)


def best_of(fn, repeats: int) -> tuple[float, float, Any]:
    """(best wall time, best CPU time of this process, last result) over `repeats` calls.

    The best rather than the median: on a shared machine the slower repeats measure the
    neighbours. CPU time counts every thread of this process.
    """
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), out


def kdtree_edges(cells: np.ndarray, window: int) -> np.ndarray:
    """The same graph in the same format from a KD-tree: both directions, self-loops, sorted."""
    pairs = cKDTree(cells).query_pairs(radius_cells(window), output_type="ndarray")
    loops = np.arange(len(cells))
    src = np.concatenate([pairs[:, 0], pairs[:, 1], loops])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0], loops])
    order = np.lexsort((dst, src))
    return np.stack([src[order], dst[order]])


def bench_size(n: int, window: int, repeats: int, kdtree: bool, shuffled: bool) -> dict[str, Any]:
    cells = tissue_cells(n)
    coords = np.rint(cells * STRIDE_LEVEL0).astype(np.int64)
    wall, cpu, edges = best_of(lambda: grid_edges(coords, STRIDE_LEVEL0, window=window), repeats)
    row: dict[str, Any] = {
        "patches": len(cells),
        "edges": int(edges.shape[1]),
        "grid_s": wall,
        "grid_cpu_s": cpu,
        "us_per_patch": wall / len(cells) * 1e6,
    }
    if shuffled:
        order = np.random.default_rng(1).permutation(len(coords))
        row["grid_shuffled_s"], _, _ = best_of(
            lambda: grid_edges(coords[order], STRIDE_LEVEL0, window=window), repeats
        )
    if kdtree:
        row["kdtree_s"], row["kdtree_cpu_s"], reference = best_of(
            lambda: kdtree_edges(cells, window), repeats
        )
        if not np.array_equal(reference, edges):
            raise AssertionError(f"{n} patches: the KD-tree graph differs from the grid lookup")
        row["kdtree_ratio"] = row["kdtree_s"] / wall
    return row


def scaling_exponent(rows: list[dict[str, Any]], key: str = "grid_s") -> float:
    """Slope of log(time) on log(patches); 1.0 is linear."""
    n = np.log([r["patches"] for r in rows])
    t = np.log([r[key] for r in rows])
    return float(np.polyfit(n, t, 1)[0]) if len(rows) > 1 else float("nan")


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
    }


def markdown(env: dict[str, Any], window: int, rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    cols = [
        "patches",
        "edges",
        "grid lookup (s)",
        "CPU (s)",
        "µs / patch",
        "time ratio to smallest",
        "size ratio to smallest",
    ]
    if "grid_shuffled_s" in base:
        cols.append("random order (s)")
    if "kdtree_s" in base:
        cols += ["KD-tree (s)", "KD-tree / grid"]
    lines = [
        f"window {window} (radius {radius_cells(window):.2f} cells), {env['cpus']} CPUs, "
        f"load {env['load_avg_1min']:.1f}, numpy {env['numpy']}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [
            f"{r['patches']:,}",
            f"{r['edges']:,}",
            f"{r['grid_s']:.3f}",
            f"{r['grid_cpu_s']:.3f}",
            f"{r['us_per_patch']:.2f}",
            f"{r['grid_s'] / base['grid_s']:.1f}",
            f"{r['patches'] / base['patches']:.1f}",
        ]
        if "grid_shuffled_s" in r:
            cells.append(f"{r['grid_shuffled_s']:.3f}")
        if "kdtree_s" in r:
            cells += [f"{r['kdtree_s']:.2f}", f"{r['kdtree_ratio']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"scaling exponent (slope of log time on log patches): {scaling_exponent(rows):.2f} "
        f"wall clock, {scaling_exponent(rows, 'grid_cpu_s'):.2f} CPU time",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000, 1_000_000]
    )
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--no-kdtree", dest="kdtree", action="store_false", help="skip the KD-tree comparison"
    )
    p.add_argument("--shuffled", action="store_true", help="also time a random patch order")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = environment()
    rows = []
    for n in sorted(args.sizes):
        rows.append(bench_size(n, args.window, args.repeats, args.kdtree, args.shuffled))
        print(json.dumps(rows[-1]), flush=True)
    text = markdown(env, args.window, rows)
    print(text)
    result = {
        "environment": env,
        "window": args.window,
        "rows": rows,
        "scaling_exponent": scaling_exponent(rows),
        "scaling_exponent_cpu": scaling_exponent(rows, "grid_cpu_s"),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(text)
    return result


if __name__ == "__main__":
    main()
