"""Every MIL model side by side: time per epoch and peak memory at bag sizes of 1k, 10k and 100k
patches (SRMIL, its ablations and the baselines of srmil.mil.catalog; `--models` picks some).

Each (model, bag size) runs in its own process, so that its peak resident memory (ru_maxrss) is
its own: the process builds one bag (D-dim random features on a tissue-like patch grid with its
window-2 graph, as the graph stage writes it), the model with its reference defaults and its
reference optimiser, and times what one epoch does per slide in `srmil.mil.train`: a training step
(forward, backward, the model's gradient clipping, optimiser step) plus the unmasked evaluation
forward. Times are the best of
`--repeats` after one warm-up epoch (on the CPU, bags of 50k patches and more run once, cold, as
the first epoch of a real run does); wall clock and the process's CPU time, which other jobs on
a shared machine disturb less (hence one torch thread by default). Memory: the peak RSS of the
process, and the part above its RSS before the first step (the bag, model and libraries). On
CUDA also the peak of allocated GPU memory. Training in `srmil.mil.train` runs in deterministic
mode, which on CUDA makes SRMIL take a slower exact path (see docs/method.md); this measures the
default mode, and with `--deterministic` the mode `srmil train` sets.

    python benchmarks/mil.py                          # every model, 1k, 10k, 100k at D=512
    python benchmarks/mil.py --models srmil abmil dsmil --sizes 1000 10000
    python benchmarks/mil.py --sizes 100000 --dim 1024 --models srmil
    python benchmarks/mil.py --sizes 100000 --dim 1024 --models srmil \
        --hparams '{"checkpoint_layers": true}'
    python benchmarks/mil.py --device cuda --sizes 1000 10000 100000 300000
    python benchmarks/mil.py --device cuda --deterministic --models srmil abmil
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
sys.path.insert(0, str(HERE.parents[1]))

from srmil.mil.catalog import MODEL_NAMES  # noqa: E402 (torch-free)
from srmil.settings import train_settings  # noqa: E402

GiB = 2**30


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    from graph import tissue_cells

    from srmil.graph import grid_edges
    from srmil.mil.models import build_model
    from srmil.mil.optim import build_optimizer
    from srmil.mil.train import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.deterministic:
        # As srmil.mil.train.train_fold sets it; cuBLAS reads its workspace setting when it
        # starts, so set it before the first CUDA product.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(0)
    cells = tissue_cells(args.n)
    edges = torch.from_numpy(grid_edges(cells, 1.0, window=2)).to(device)
    x = torch.randn(len(cells), args.dim, generator=torch.Generator().manual_seed(1)).to(device)
    hparams = model_hparams(args, args.model)
    model = build_model(args.model, args.dim, 2, hparams).to(device)
    config = train_settings(args.model)
    optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay,
                                config.betas)
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
        if hasattr(model, "clip_gradients"):
            model.clip_gradients()
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
        "hparams": hparams,
        "device": str(device),
        "threads": args.threads,
        "deterministic": bool(args.deterministic),
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
        *[a for item in args.model_hparams for a in ("--model-hparams", item)],
        "--warmup",
        str(int(warm)),
        *(["--deterministic"] if args.deterministic else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_hparams(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """--hparams for SRMIL and its ablations; --model-hparams NAME=JSON for any model."""
    from srmil.mil.catalog import model_info

    hparams = json.loads(args.hparams) if model_info(model).family == "srmil" else {}
    for item in args.model_hparams:
        name, _, text = item.partition("=")
        if name == model:
            hparams.update(json.loads(text))
    return hparams


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """One row per bag size and model; ratios to SRMIL (and to ABMIL) where both ran."""
    by = {(r["model"], r["patches"]): r for r in rows}
    sizes = sorted({r["patches"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    gpu = any("gpu_peak_gib" in r for r in rows)
    cols = ["patches", "model", "epoch (s)", "CPU (s)", "peak RSS (GiB)", "above start (GiB)"]
    cols += ["GPU peak (GiB)"] if gpu else []
    cols += ["time / SRMIL", "memory above start / SRMIL", "time / ABMIL"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def ratio(a: float | None, b: float | None, floor: float = 0.0) -> str:
        return "-" if a is None or b is None or b <= floor else f"{a / b:.2g}"

    for n in sizes:
        srmil, abmil = by.get(("srmil", n)), by.get(("abmil", n))
        for m in models:
            r = by.get((m, n))
            if r is None:
                continue
            cells = [f"{n:,}", m, f"{r['epoch_s']:.3g}",
                     f"{r.get('epoch_cpu_s', float('nan')):.3g}", f"{r['peak_rss_gib']:.2f}",
                     f"{r['peak_above_start_gib']:.2f}"]
            cells += [f"{r.get('gpu_peak_gib', float('nan')):.2f}"] if gpu else []
            # Below ~10 MiB above start (small bags) the memory ratio is noise: left out.
            cells += [ratio(r["epoch_s"], srmil and srmil["epoch_s"]),
                      ratio(r["peak_above_start_gib"], srmil and srmil["peak_above_start_gib"],
                            0.01) if r["peak_above_start_gib"] >= 0.01 else "-",
                      ratio(r["epoch_s"], abmil and abmil["epoch_s"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
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
        help="SRMIL's (and its ablations') hyper-parameters as JSON, e.g. "
        "'{\"checkpoint_layers\": true}'",
    )
    p.add_argument("--model-hparams", action="append", default=[], metavar="NAME=JSON",
                   help="one model's hyper-parameters, e.g. "
                   "'patchgcn={\"checkpoint_layers\": true}'")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms, as `srmil train` runs (on CUDA SRMIL's exact "
                   "aggregation)")
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
    variant += "".join(f", {item}" for item in args.model_hparams)
    variant += ", deterministic mode" if args.deterministic else ""
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
