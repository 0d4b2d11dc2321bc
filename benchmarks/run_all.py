"""Run the five CPU benchmarks at one size and write one summary table.

Each benchmark (features.py, readers.py, segment_tile.py, graph.py, mil.py) still measures
srmil and its comparison side by side in one run, so that load from other jobs hits both sides;
this script only picks their settings per size, runs them in turn (in this process; mil.py
starts its own processes), and writes one row per figure with the exact command that
reproduces it.

    python benchmarks/run_all.py --size small          # about 5 minutes on 2 cores
    python benchmarks/run_all.py --size medium         # the docs' settings, about 20 minutes
    python benchmarks/run_all.py --only graph mil --out /tmp/summary.md

The table goes to stdout and to --out; each benchmark's own output and raw numbers go to a
folder beside it (`summary_logs/{name}.log`, `.json`). CLAM, for segment_tile.py, comes from
--clam-dir / CLAM_DIR and --clam-python / CLAM_PYTHON (see docs/segmentation.md); without it
that row has srmil's figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCHMARKS = ("features", "readers", "segment_tile", "graph", "mil")

# Command-line arguments of each benchmark per size. "medium" is what docs/*.md quote; "tiny"
# (hidden) only checks that everything runs, for tests/test_benchmarks.py.
SIZES: dict[str, dict[str, list[str]]] = {
    "tiny": {
        "features": "--models resnet18 --slides 1 --width 2048 --height 1536 --max-patches 16 "
        "--batch-size 8 --repeats 1".split(),
        "readers": "--width 2048 --height 1536 --repeats 1 --models".split(),
        "segment_tile": "--slides demo --large none --unseen none --repeats 1".split(),
        "graph": "--sizes 1000 10000 --repeats 1".split(),
        "mil": "--models srmil abmil --sizes 1000 --repeats 1".split(),
    },
    "small": {
        "features": "--models resnet18 --slides 2 --max-patches 100 --repeats 5".split(),
        "readers": "--width 4096 --height 3072 --repeats 3 --models".split(),
        "segment_tile": "--slides demo demo_pen biopsy --large none".split(),
        "graph": "--sizes 10000 30000 100000 300000".split(),
        "mil": "--models srmil abmil --sizes 1000 10000".split(),
    },
    "medium": {
        "features": "--models resnet18 resnet50 --slides 2 --width 8192 --height 6144 "
        "--max-patches 200 --repeats 5".split(),
        "readers": ["--no-ratio"],
        "segment_tile": [],
        "graph": [],
        "mil": "--models srmil abmil".split(),
    },
    "large": {
        "features": "--models resnet18 resnet50 --slides 2 --width 8192 --height 6144 "
        "--repeats 5".split(),
        "readers": ["--no-ratio"],
        "segment_tile": [],
        "graph": "--sizes 10000 100000 1000000 3000000 --shuffled".split(),
        "mil": "--models srmil abmil --sizes 1000 10000 100000 --repeats 5".split(),
    },
}

Row = dict[str, str]


def load(name: str) -> ModuleType:
    """A benchmark script as a module, by path (benchmarks/ is not a package, and names such as
    `features` or `graph` must not shadow anything)."""
    spec = importlib.util.spec_from_file_location(f"srmil_bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def command(name: str, argv: list[str]) -> str:
    return shlex.join(["python", f"benchmarks/{name}.py", *argv])


def features_rows(result: dict[str, Any], argv: list[str], module: ModuleType) -> list[Row]:
    env = result["environment"]
    rows = []
    for r in result["results"]:
        rows.append(
            {
                "measured": f"feature extraction, {r['model']}, {env['device_name']} "
                f"({env['torch_threads']} torch threads, batch {env['batch_size']}, allocator "
                f"{env['allocator']}): the whole "
                f"pipeline (reader {env.get('reader', 'auto')}, reads to Zarr store) against "
                "the forward pass alone, "
                f"{r['patches_per_repeat']} patches x {len(r['repeats'])} repeat(s), alternated "
                "slide by slide",
                "srmil": f"pipeline {r['pipeline_median']:.1f} patches/s",
                "comparison": f"forward only {r['forward_median']:.1f} patches/s",
                "ratio": f"**{r['ratio_median']:.3f}** pipeline / forward (CPU time "
                f"{r['cpu_ratio_median']:.3f}; per repeat "
                + ", ".join(f"{x['ratio']:.3f}" for x in r["repeats"])
                + ")",
            }
        )
    return rows


def readers_rows(result: dict[str, Any], argv: list[str], module: ModuleType) -> list[Row]:
    cases = result["readers"]
    return [
        {
            "measured": "patch reading, patches per CPU-second of the reading thread: the JPEG "
            "tile reader against OpenSlide's read_region, "
            + "; ".join(f"{r['case']} ({r['patches']} patches)" for r in cases),
            "srmil": ", ".join(f"{r['tiles_per_cpu_s']:.0f}" for r in cases) + " patches/CPU-s",
            "comparison": "OpenSlide "
            + ", ".join(f"{r['openslide_per_cpu_s']:.0f}" for r in cases)
            + " patches/CPU-s",
            "ratio": f"**{min(r['ratio_median'] for r in cases):.2f}** (lowest of "
            + ", ".join(f"{r['ratio_median']:.2f}" for r in cases)
            + ") tile reader / OpenSlide",
        }
    ]


def segment_tile_rows(result: dict[str, Any], argv: list[str], module: ModuleType) -> list[Row]:
    names = ", ".join(f"{r['slide']} {r['size']}" for r in result["rows"])
    row = {
        "measured": f"segmentation + tiling of {len(result['rows'])} generated slide(s) "
        f"({names}), median of {result['repeats']}: total wall time with a process per slide "
        "(srmil: segment + tile, CLAM: create_patches_fp.py each), and over a folder in one "
        "process (srmil: the library; CLAM: create_patches_fp.py per µm/px), peak RSS, mean "
        "tissue IoU against the generator's ground truth",
        "srmil": f"{result['srmil_seconds']:.1f} s per slide, "
        f"{result['folder_srmil_seconds']:.1f} s one process, {result['srmil_rss_mib']} MiB, "
        f"IoU {result['srmil_mean_iou']:.3f}",
        "comparison": "CLAM not run (set `--clam-dir` or `CLAM_DIR`)",
        "ratio": "-",
    }
    if result["clam"]:
        row["comparison"] = (
            f"CLAM `create_patches_fp.py` {result['clam_seconds']:.1f} s per slide, "
            f"{result['folder_clam_seconds']:.1f} s over the folder, "
            f"{result['clam_rss_mib']} MiB, IoU {result['clam_mean_iou']:.3f}"
        )
        row["ratio"] = (
            f"**{result['time_ratio']:.2f}** time srmil / CLAM per slide, "
            f"**{result['folder_time_ratio']:.2f}** over a folder"
        )
    return [row]


def graph_rows(result: dict[str, Any], argv: list[str], module: ModuleType) -> list[Row]:
    rows, args = result["rows"], module.parse_args(argv)
    big = rows[-1]
    row = {
        "measured": f"spatial graph build (window {result['window']}) at {big['patches']:,} "
        f"patches ({big['edges']:,} edges), {len(rows)} sizes from {rows[0]['patches']:,}: grid "
        f"lookup against scipy's KD-tree radius search (identical edges, checked), best of "
        f"{args.repeats}",
        "srmil": f"grid lookup {big['grid_s']:.3f} s (CPU {big['grid_cpu_s']:.3f} s); scaling "
        f"exponent {result['scaling_exponent']:.2f} wall, {result['scaling_exponent_cpu']:.2f} "
        "CPU (1 = linear)",
        "comparison": "KD-tree not run (`--no-kdtree`)",
        "ratio": "-",
    }
    if "kdtree_s" in big:
        row["comparison"] = f"KD-tree {big['kdtree_s']:.2f} s"
        row["ratio"] = (
            f"**{big['grid_s'] / big['kdtree_s']:.2f}** time grid / KD-tree (per size: "
            + ", ".join(f"{r['grid_s'] / r['kdtree_s']:.2f}" for r in rows)
            + ")"
        )
    return [row]


def mil_rows(result: dict[str, Any], argv: list[str], module: ModuleType) -> list[Row]:
    by = {(r["model"], r["patches"]): r for r in result["rows"]}
    sizes = sorted({r["patches"] for r in result["rows"]})
    n = sizes[-1]

    def cell(r: dict[str, Any]) -> str:
        return (
            f"{r['epoch_s']:.3g} s (CPU {r['epoch_cpu_s']:.3g} s), "
            f"{r['peak_above_start_gib']:.2f} GiB above start"
        )

    first = next(r for r in result["rows"] if r["patches"] == n)
    row = {
        "measured": f"one epoch (training step + evaluation forward) on a {n:,}-patch bag "
        f"({first['edges']:,} edges), D = {first['dim']}, {first['threads']} torch thread(s), "
        "each model in its own process; peak RSS above the process's start",
        "srmil": f"SRMIL {cell(by['srmil', n])}" if ("srmil", n) in by else "-",
        "comparison": f"ABMIL {cell(by['abmil', n])}" if ("abmil", n) in by else "-",
        "ratio": "-",
    }
    if ("srmil", n) in by and ("abmil", n) in by:
        s, a = by["srmil", n], by["abmil", n]
        per_size = ", ".join(
            f"{m:,}: {by['srmil', m]['epoch_s'] / by['abmil', m]['epoch_s']:.1f}" for m in sizes
        )
        # Below ~10 MiB above start (small bags) the memory ratio is noise: left out.
        memory = (
            f", {s['peak_above_start_gib'] / a['peak_above_start_gib']:.1f} memory"
            if min(s["peak_above_start_gib"], a["peak_above_start_gib"]) >= 0.01
            else ""
        )
        row["ratio"] = (
            f"**{s['epoch_s'] / a['epoch_s']:.1f}** time, {s['epoch_cpu_s'] / a['epoch_cpu_s']:.1f}"
            f" CPU time{memory}, SRMIL / ABMIL (time per size: {per_size})"
        )
    return [row]


ROWS: dict[str, Callable[[dict[str, Any], list[str], ModuleType], list[Row]]] = {
    "features": features_rows,
    "readers": readers_rows,
    "segment_tile": segment_tile_rows,
    "graph": graph_rows,
    "mil": mil_rows,
}


def benchmark_argv(name: str, size: str, args: argparse.Namespace) -> tuple[list[str], str]:
    """(arguments for the benchmark's main, the command line that reproduces it)."""
    argv = list(SIZES[size][name])
    if name == "segment_tile":
        argv = ["--work", str(args.work), *argv]
        if args.clam_dir:
            argv += ["--clam-dir", str(args.clam_dir), "--clam-python", args.clam_python]
    return argv, command(name, argv)


def progress(text: str) -> None:
    # stderr, so that the table on stdout can be redirected on its own
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def run_one(name: str, argv: list[str], log_dir: Path) -> tuple[dict[str, Any], ModuleType]:
    """Run one benchmark's main with its output in log_dir/{name}.log."""
    with open(log_dir / f"{name}.log", "w") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            module = load(name)
            result = module.main(argv)
    (log_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result, module


def git_version() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def markdown(rows: list[Row], header: list[str], footer: list[str]) -> str:
    cols = ["benchmark", "what is measured", "srmil", "comparison", "ratio", "reproduce"]
    keys = ["benchmark", "measured", "srmil", "comparison", "ratio", "command"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [row[k].replace("|", "\\|") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *footer]) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """A reader sees the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the summary from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size",
        choices=list(SIZES),
        default="small",
        metavar="{small,medium,large}",
        help="small: about 5 min on 2 cores; medium: the docs' settings, about 20 min; "
        "large: more patches, sizes and repeats, roughly 30-45 min",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=BENCHMARKS,
        default=list(BENCHMARKS),
        help="run these benchmarks only (default: all five)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/benchmarks/summary.md"),
        help="the markdown table (also on stdout); logs and raw numbers go to OUT's folder, "
        "under {stem}_logs/",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where segment_tile.py generates its slides, kept for reruns "
        "(default: srmil-bench-segment-SIZE in the temporary folder)",
    )
    p.add_argument("--clam-dir", type=Path, default=os.environ.get("CLAM_DIR") or None)
    p.add_argument("--clam-python", default=os.environ.get("CLAM_PYTHON", "python3"))
    args = p.parse_args(argv)
    if args.work is None:
        args.work = Path(tempfile.gettempdir()) / f"srmil-bench-segment-{args.size}"
    if args.clam_dir and not (args.clam_dir / "create_patches_fp.py").is_file():
        p.error(f"--clam-dir {args.clam_dir} has no create_patches_fp.py (CLAM's checkout)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in BENCHMARKS if n in args.only]
    log_dir = args.out.parent / f"{args.out.stem}_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    load_start, started = os.getloadavg(), datetime.datetime.now(datetime.UTC)
    rows: list[Row] = []
    walls, failed = [], []
    for i, name in enumerate(names, 1):
        bench_argv, cmd = benchmark_argv(name, args.size, args)
        progress(f"[{i}/{len(names)}] {name}: started ({cmd})")
        t = time.perf_counter()
        try:
            result, module = run_one(name, bench_argv, log_dir)
            new = ROWS[name](result, bench_argv, module)
            status = "done"
        except Exception as error:  # one failed benchmark should not lose the others' figures
            with open(log_dir / f"{name}.log", "a") as log:
                traceback.print_exc(file=log)
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            new = [{"measured": f"failed: {reason}", "srmil": "-", "comparison": "-", "ratio": "-"}]
            status, failed = "FAILED", [*failed, name]
        wall = time.perf_counter() - t
        walls.append(f"{name} {wall:.0f} s")
        progress(f"[{i}/{len(names)}] {name}: {status} in {wall:.1f} s (log {log_dir / name}.log)")
        rows += [{"benchmark": f"`{name}.py`", "command": f"`{cmd}`", **r} for r in new]
    load_end = os.getloadavg()
    header = [
        f"# srmil benchmarks, `--size {args.size}`",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, load average "
        f"(1/5/15 min) {' / '.join(f'{x:.2f}' for x in load_start)} at the start, "
        f"{' / '.join(f'{x:.2f}' for x in load_end)} at the end; Python "
        f"{platform.python_version()}, torch {version('torch')}, srmil {git_version()}.",
        "",
        "Each benchmark ran srmil and its comparison side by side in one run (alternated or "
        "back to back), so other load hits both: read the ratios first. Commands run from the "
        "repository root.",
    ]
    footer = [
        f"Wall time: {', '.join(walls)}. Full output and raw numbers: `{log_dir}/`.",
    ]
    text = markdown(rows, header, footer)
    sys.stdout.write(text)
    write_atomic(args.out, text)
    progress(f"summary written to {args.out}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
