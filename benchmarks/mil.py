"""SRMIL against ABMIL: time per epoch and peak memory at bag sizes of 1k, 10k and 100k patches.

Each (model, bag size) runs in its own process, so that its peak resident memory (ru_maxrss) is
its own: the process builds one bag (D-dim random features on a tissue-like patch grid with its
window-2 graph, as the graph stage writes it), the model with its reference defaults and its
reference optimiser, and times what one epoch does per slide in `srmil.train`: a training step
(forward, backward, optimiser step) plus the unmasked evaluation forward. Times are the best of
`--repeats` after one warm-up epoch (on the CPU, bags of 50k patches and more run once, cold, as
the first epoch of a real run does); wall clock and the process's CPU time, which other jobs on
a shared machine disturb less (hence one torch thread by default). Memory: the peak RSS of the
process, and the part above its RSS before the first step (the bag, model and libraries). On
CUDA also the peak of allocated GPU memory. Training in `srmil.train` runs in deterministic
mode, which on CUDA makes SRMIL take a slower exact path (see docs/method.md); this measures the
default mode.

    python benchmarks/mil.py                          # 1k, 10k, 100k at D=512 (minutes)
    python benchmarks/mil.py --sizes 100000 --dim 1024 --models srmil
    python benchmarks/mil.py --sizes 100000 --dim 1024 --models srmil \
        --hparams '{"checkpoint_layers": true}'
    python benchmarks/mil.py --device cuda --sizes 1000 10000 100000 300000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
GiB = 2**30


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    from graph import tissue_cells

    from srmil.graph import grid_edges
    from srmil.models import build_model
    from srmil.train import make_train_config, resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    cells = tissue_cells(args.n)
    edges = torch.from_numpy(grid_edges(cells, 1.0, window=2)).to(device)
    x = torch.randn(len(cells), args.dim, generator=torch.Generator().manual_seed(1)).to(device)
    hparams = json.loads(args.hparams) if args.model == "srmil" else {}
    model = build_model(args.model, args.dim, 2, hparams).to(device)
    config = make_train_config(args.model)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = kind(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def epoch() -> tuple[float, float, float]:
        """(training step s, evaluation forward s, CPU s of both)."""
        cpu, t = time.process_time(), time.perf_counter()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(x, edges, 1)
        loss.backward()
        optimizer.step()
        del loss
        sync()
        step = time.perf_counter() - t
        t = time.perf_counter()
        model.eval()
        with torch.inference_mode():
            model(x, edges)
        sync()
        return step, time.perf_counter() - t, time.process_time() - cpu

    runs = []
    if args.warmup:
        epoch()
    for _ in range(args.repeats):
        runs.append(epoch())
    best = min(runs, key=lambda run: run[0] + run[1])
    out = {
        "model": args.model,
        "patches": len(cells),
        "edges": int(edges.shape[1]),
        "dim": args.dim,
        "srmil_hparams": args.hparams,
        "device": str(device),
        "threads": args.threads,
        "step_s": best[0],
        "eval_s": best[1],
        "epoch_s": best[0] + best[1],
        "epoch_cpu_s": min(run[2] for run in runs),
        "repeats": len(runs),
        "warmup": bool(args.warmup),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
        "rss_before_gib": rss_before / GiB,
    }
    out["peak_above_start_gib"] = out["peak_rss_gib"] - out["rss_before_gib"]
    if device.type == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


def measure(model: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    # On a GPU a warm-up epoch is cheap and keeps CUDA's one-off set-up out of the timing.
    cold_from = args.no_warmup_from or (float("inf") if args.device.startswith("cuda") else 50_000)
    warm = n < cold_from
    cmd = [
        sys.executable,
        str(HERE),
        "--child",
        "--model",
        model,
        "--n",
        str(n),
        "--dim",
        str(args.dim),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--repeats",
        str(args.repeats if warm else 1),
        "--hparams",
        args.hparams,
        "--warmup",
        str(int(warm)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    by = {(r["model"], r["patches"]): r for r in rows}
    sizes = sorted({r["patches"] for r in rows})
    models = [m for m in ("srmil", "abmil") if any(r["model"] == m for r in rows)]
    both = len(models) == 2
    gpu = any("gpu_peak_gib" in r for r in rows)
    cols = ["patches", "edges"]
    for m in models:
        cols += [f"{m} epoch (s)", f"{m} CPU (s)", f"{m} peak RSS (GiB)", f"{m} above start (GiB)"]
        cols += [f"{m} GPU peak (GiB)"] if gpu else []
    if both:
        cols += ["time SRMIL / ABMIL", "CPU SRMIL / ABMIL", "memory above start SRMIL / ABMIL"]
        cols += ["GPU memory SRMIL / ABMIL"] if gpu else []
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for n in sizes:
        first = by[(models[0], n)]
        cells = [f"{n:,}", f"{first['edges']:,}"]
        for m in models:
            r = by[(m, n)]
            cells += [
                f"{r['epoch_s']:.3g}",
                f"{r.get('epoch_cpu_s', float('nan')):.3g}",
                f"{r['peak_rss_gib']:.2f}",
                f"{r['peak_above_start_gib']:.2f}",
            ]
            cells += [f"{r.get('gpu_peak_gib', float('nan')):.2f}"] if gpu else []
        if both:
            s, a = by[("srmil", n)], by[("abmil", n)]
            cells += [
                f"{s['epoch_s'] / a['epoch_s']:.1f}",
                f"{s.get('epoch_cpu_s', float('nan')) / a.get('epoch_cpu_s', float('nan')):.1f}",
                f"{s['peak_above_start_gib'] / max(a['peak_above_start_gib'], 1e-3):.1f}",
            ]
            if gpu:
                cells += [f"{s['gpu_peak_gib'] / a['gpu_peak_gib']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--models", nargs="+", default=["srmil", "abmil"], choices=["srmil", "abmil"])
    p.add_argument("--dim", type=int, default=512, help="feature size D (resnet18: 512)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: least disturbed by other jobs on a shared machine)",
    )
    p.add_argument(
        "--hparams",
        default="{}",
        help="SRMIL hyper-parameters as JSON, e.g. '{\"checkpoint_layers\": true}'",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--no-warmup-from",
        type=int,
        default=None,
        help="bags this large run one cold epoch (default: 50000 on the CPU, never on CUDA)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    # A measurement process (internal).
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="srmil", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return None
    rows = []
    for n in sorted(args.sizes):
        for model in args.models:
            rows.append(measure(model, n, args))
            print(json.dumps(rows[-1]), flush=True)
    device = rows[0].get("device_name", rows[0]["device"])
    variant = f", SRMIL {args.hparams}" if args.hparams != "{}" else ""
    header = (
        f"D = {args.dim}{variant}, {device}, {args.threads} torch threads, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}; epoch = one training step + one evaluation "
        "forward per bag"
    )
    text = markdown(rows, header)
    print(text)
    result = {"rows": rows, "header": header}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(text)
    return result


if __name__ == "__main__":
    main()
