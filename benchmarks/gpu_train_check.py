"""SRMIL and ABMIL training on a GPU, checked and timed in one short run (a lent GPU's time is
scarce).

A cohort of random feature and graph stores (written with srmil.store's writers on tissue-like
patch grids, 200 to 5,000 patches per slide, class 1 with a shifted spatial cluster) is trained
through `srmil.mil.train.train_fold`, the function `srmil train` calls, with `device` set to
the GPU. Checks, per model: the steps run on the GPU (parameters and bags on it, as seen by the
model's `training_loss`); the determinism settings train_fold leaves in force during training
(what it sets and what it does not); two runs with the same seed give byte-identical
checkpoints, epoch logs (losses) and attention statistics, and which operations warned that
they have no deterministic implementation; the GPU run against a CPU run of the same seed with
dropout off (CPU and GPU draw dropout from different generators; SRMIL's masks come from the
CPU generator in both), as the max abs difference of logits, probabilities and weights, and the
CPU-trained checkpoint evaluated on both devices; whether training uses AMP. Timings: train_fold
seconds per epoch on the cohort, and benchmarks/mil.py's epoch (one training step and one
evaluation forward on one bag) at `--sizes` patches, default and deterministic mode, with the
peak of allocated GPU memory. Writes gpu_train_check.json (after every check) and
gpu_train_check.md to --out; every check is recorded, none stops the run.

    python benchmarks/gpu_train_check.py --out $OUT                # on the GPU, a few minutes
    python benchmarks/gpu_train_check.py --small --out /tmp/gpu_train_check  # rehearsal, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("TQDM_DISABLE", "1")  # one progress bar per training run is noise here

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


# Run as `python benchmarks/gpu_train_check.py`, so benchmarks/ is on sys.path: its siblings
# import plainly.
import graph as graph_bench  # noqa: E402 (tissue-like patch grids)
import mil as mil_bench  # noqa: E402 (the per-epoch timing, in this process)
from checks import record  # noqa: E402

import srmil.mil.train as train_module  # noqa: E402
from srmil import __version__  # noqa: E402
from srmil.cohort.splits import make_splits  # noqa: E402
from srmil.device import resolve_device  # noqa: E402
from srmil.graph import grid_edges, radius_cells  # noqa: E402
from srmil.mil.bags import Bag, load_bag  # noqa: E402
from srmil.mil.inference import load_model  # noqa: E402
from srmil.mil.models import default_hparams  # noqa: E402
from srmil.mil.train import train_fold  # noqa: E402
from srmil.settings import TrainSettings  # noqa: E402
from srmil.store import write_feature_store, write_graph_store, write_json  # noqa: E402

STRIDE_PX = 224
GiB = 2**30
# Tiny SRMIL layers for the CPU rehearsal (as tests/test_train.py).
SMALL_SRMIL = {"heads": 2, "hidden_per_head": 8, "cls_hidden": 16}
NONDETERMINISTIC = "does not have a deterministic implementation"


# --- the cohort ------------------------------------------------------------------------------


def write_cohort(root: Path, n_slides: int, patches: tuple[int, int], dim: int,
                 seed: int = 0) -> tuple[pd.DataFrame, dict, Path, Path]:
    """Feature and graph stores of `n_slides` slides (one per patient, alternating classes),
    patch counts log-uniform in `patches`; class 1 slides shift 8 features of a spatial cluster
    (a tenth of their patches) by +1. Returns (samples, splits, features_dir, graphs_dir)."""
    rng = np.random.default_rng(seed)
    features_dir, graphs_dir = root / "features", root / "graphs"
    rows = []
    for i in range(n_slides):
        slide_id, label = f"s{i:03d}", i % 2
        n = int(round(np.exp(rng.uniform(np.log(patches[0]), np.log(patches[1])))))
        coords = graph_bench.tissue_cells(n, seed=seed + i) * STRIDE_PX
        n = len(coords)
        x = rng.standard_normal((n, dim), dtype=np.float32)
        if label:
            centre = coords[rng.integers(n)]
            near = np.argsort(np.abs(coords - centre).sum(axis=1))[: max(4, n // 10)]
            x[np.ix_(near, range(8))] += 1.0
        attrs = {"extractor": "random", "backbone": {"model": "random"},
                 "weights_hash": "0" * 8, "feature_dim": dim, "n_patches": n, "mpp": 0.5,
                 "patch_px": STRIDE_PX, "stride_px": STRIDE_PX, "srmil_version": __version__}
        # float16, as `srmil features` writes by default; bags are read back as float32.
        write_feature_store(features_dir / f"{slide_id}.zarr", x, coords, attrs)
        edges = grid_edges(coords, STRIDE_PX, window=2)
        write_graph_store(graphs_dir / f"{slide_id}.zarr", edges, {
            "window": 2, "radius_cells": radius_cells(2), "stride_level0": float(STRIDE_PX),
            "n_nodes": n, "n_edges": int(edges.shape[1]), "self_loops": True,
            "srmil_version": __version__})
        rows.append({"slide_id": slide_id, "path": "", "patient_id": f"P{i:03d}",
                     "label": f"class{label}", "annotation": "", "mpp": float("nan")})
    samples = pd.DataFrame(rows)
    return samples, make_splits(samples, n_folds=3, val_fraction=0.25, seed=seed), \
        features_dir, graphs_dir


# --- training through train_fold, watched ---------------------------------------------------


def determinism_flags() -> dict[str, Any]:
    """Every global setting that decides whether CUDA kernels are reproducible."""
    return {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


@contextlib.contextmanager
def watched_training(seen: dict[str, Any]) -> Iterator[None]:
    """While train_fold runs, record at its first training step where the bag and the model's
    parameters are and which determinism settings are in force, and every warning.

    train_fold keeps its model to itself, so the model it builds gets a `training_loss` that
    looks first and then calls the real one; nothing else changes."""
    build = train_module.build_model

    def build_watched(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = build(*args, **kwargs)
        step = model.training_loss

        def training_loss(x: torch.Tensor, edge_index: torch.Tensor, label: int) -> Any:
            if "x_device" not in seen:
                seen.update({
                    "x_device": str(x.device),
                    "edge_index_device": str(edge_index.device),
                    "parameter_devices": sorted({str(p.device) for p in model.parameters()}),
                    "buffer_devices": sorted({str(b.device) for b in model.buffers()}),
                    "flags_during_training": determinism_flags(),
                })
            seen["steps"] = seen.get("steps", 0) + 1
            return step(x, edge_index, label)

        model.training_loss = training_loss
        return model

    with warnings.catch_warnings(record=True) as caught, \
            mock.patch.object(train_module, "build_model", build_watched):
        warnings.simplefilter("always")
        yield
    seen["warnings"] = sorted({str(w.message)[:300] for w in caught})


def no_dropout(model_name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """`hparams` with every dropout of the model at 0: the CPU and the GPU draw dropout masks
    from different generators, so only without dropout can their training runs agree."""
    return {**hparams, **{k: 0.0 for k in default_hparams(model_name) if "dropout" in k}}


class Cohort:
    """The stores, the split and the training settings every run of the check shares."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.samples, self.splits, self.features, self.graphs = write_cohort(
            root, args.slides, (args.min_patches, args.max_patches), args.dim)
        # select_after 1.0: the last epoch is the checkpoint, so runs compare epoch for epoch.
        self.train_hparams = {"epochs": args.epochs, "select_after": 1.0}
        self.args = args
        # The sheet and the split as files, for `srmil train` in a process of its own (it
        # opens no slide, but the sheet needs a path per slide).
        sheet = self.samples[["slide_id", "patient_id", "label"]].copy()
        sheet.insert(1, "path", [f"slides/{s}.svs" for s in sheet["slide_id"]])
        sheet.to_csv(root / "samples.csv", index=False)
        write_json(root / "splits.json", self.splits)

    def hparams(self, model_name: str) -> dict[str, Any]:
        return dict(SMALL_SRMIL) if self.args.small and model_name == "srmil" else {}

    def train(self, model_name: str, run: str, device: str, hparams: dict[str, Any],
              threads: int | None = None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        """train_fold on fold 0; returns (checkpoint, its metadata, what was seen)."""
        out = self.root / "models" / model_name / run / "fold_0.pt"
        seen: dict[str, Any] = {}
        with watched_training(seen):
            meta = train_fold(model_name, self.splits, 0, self.samples, self.features,
                              self.graphs, out, model_hparams=hparams,
                              train_hparams=self.train_hparams, seed=0, device=device,
                              threads=threads)
        return out, meta, seen

    def train_cli(self, model_name: str, run: str, device: str, hparams: dict[str, Any],
                  env_at_start: dict[str, str]) -> tuple[Path, float]:
        """`srmil train` on fold 0 in a new process with this process's starting environment
        (train_fold has since set CUBLAS_WORKSPACE_CONFIG here); returns (checkpoint, wall s)."""
        out = self.root / "models" / model_name / run / "fold_0.pt"
        cmd = [sys.executable, "-m", "srmil.cli", "train", "--model", model_name,
               "--splits", str(self.root / "splits.json"),
               "--samples", str(self.root / "samples.csv"),
               "--features-dir", str(self.features), "--graphs-dir", str(self.graphs),
               "--fold", "0", "--out", str(out), "--model-params", json.dumps(hparams),
               "--train-params", json.dumps(self.train_hparams), "--seed", "0",
               "--device", device]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env_at_start, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"srmil train failed: {proc.stderr[-2000:]}")
        return out, time.perf_counter() - start

    def bags(self) -> list[Bag]:
        return [load_bag(self.features, self.graphs, s) for s in self.samples["slide_id"]]


@torch.no_grad()
def outputs(pt: Path, device: torch.device | str, bags: list[Bag]) -> tuple[np.ndarray, ...]:
    """(logits, probabilities) of a checkpoint on every bag, in float64 on the CPU."""
    model, _ = load_model(pt, device)
    logits = np.stack([model(b.x.to(device), b.edge_index.to(device)).logits.double().cpu()
                       .numpy() for b in bags])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return logits, probs / probs.sum(1, keepdims=True)


def max_weight_diff(a: Path, b: Path) -> float:
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    return max(float((sa[k].double() - sb[k].double()).abs().max()) if sa[k].numel() else 0.0
               for k in sa)


# --- the checks ------------------------------------------------------------------------------


def model_checks(model_name: str, cohort: Cohort, device: torch.device,
                 check: Callable[[str, Callable[[], dict[str, Any]]], None],
                 env_at_start: dict[str, str]) -> None:
    """One model's checks on `device`: on the device, reruns, `srmil train`, against the CPU."""
    hparams = cohort.hparams(model_name)
    runs: dict[str, tuple[Path, dict[str, Any], dict[str, Any]]] = {}

    def on_device() -> dict[str, Any]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs["a"] = cohort.train(model_name, "a", str(device), hparams)
        _, meta, seen = runs["a"]
        on = {seen["x_device"], seen["edge_index_device"], *seen["parameter_devices"],
              *seen["buffer_devices"]}
        out = {"device": meta["device"], "device_name": meta["device_name"],
               "bag_and_model_devices": sorted(on), "steps": seen["steps"],
               "epochs": meta["epochs_run"], "train_fold_s": meta["time_s"],
               "train_fold_s_per_epoch": round(meta["time_s"] / meta["epochs_run"], 3),
               "flags_during_training": seen["flags_during_training"],
               "flags_after": determinism_flags()}
        if device.type == "cuda":
            out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 3)
        # One device for all, of the kind asked for ("cuda" is cuda:0 on the tensors).
        return {"ok": len(on) == 1 and torch.device(on.pop()).type == device.type, **out}

    check(f"{model_name}_on_device", on_device)

    def reruns() -> dict[str, Any]:
        runs["b"] = cohort.train(model_name, "b", str(device), hparams)
        (a, _, seen_a), (b, meta_b, seen_b) = runs["a"], runs["b"]
        sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
        same = {
            "checkpoint_bytes": a.read_bytes() == b.read_bytes(),
            "state_dict_tensors": sa.keys() == sb.keys()
            and all(torch.equal(sa[k], sb[k]) for k in sa),
            "epoch_log_losses": a.with_suffix(".csv").read_bytes()
            == b.with_suffix(".csv").read_bytes(),
            "attention_stats": a.with_suffix(".attention.json").read_bytes()
            == b.with_suffix(".attention.json").read_bytes(),
        }
        warned = sorted(set(seen_a["warnings"]) | set(seen_b["warnings"]))
        losses = pd.read_csv(a.with_suffix(".csv"))["train_loss"].round(5).tolist()
        return {"ok": all(same.values()), "identical": same,
                "max_weight_diff": max_weight_diff(a, b), "train_loss": losses,
                # The first run of the process pays CUDA's start-up; this one is warm.
                "train_fold_s_per_epoch_warm": round(meta_b["time_s"] / meta_b["epochs_run"], 3),
                "nondeterministic_op_warnings": [w for w in warned if NONDETERMINISTIC in w],
                "other_warnings": [w for w in warned if NONDETERMINISTIC not in w][:5]}

    check(f"{model_name}_deterministic_reruns", reruns)

    def new_process() -> dict[str, Any]:
        # What a rerun of the workflow's job does: the CLI sets everything itself.
        c, wall = cohort.train_cli(model_name, "cli", str(device), hparams, env_at_start)
        a = runs["a"][0]
        same = {"checkpoint_bytes": a.read_bytes() == c.read_bytes(),
                "epoch_log_losses": a.with_suffix(".csv").read_bytes()
                == c.with_suffix(".csv").read_bytes()}
        return {"ok": all(same.values()), "identical_to_first_run": same,
                "max_weight_diff": max_weight_diff(a, c), "process_wall_s": round(wall, 1),
                "CUBLAS_WORKSPACE_CONFIG_given": env_at_start.get("CUBLAS_WORKSPACE_CONFIG")}

    check(f"{model_name}_rerun_srmil_train_cli", new_process)

    def versus_cpu() -> dict[str, Any]:
        plain = no_dropout(model_name, hparams)
        gpu, _, _ = cohort.train(model_name, "no_dropout_device", str(device), plain)
        cpu, _, _ = cohort.train(model_name, "no_dropout_cpu", "cpu", plain,
                                 threads=cohort.args.cpu_threads)
        bags = cohort.bags()
        logits_gpu, probs_gpu = outputs(gpu, device, bags)
        logits_cpu, probs_cpu = outputs(cpu, "cpu", bags)
        # The same (CPU-trained) weights on both devices: the forward pass alone.
        logits_cpu_on_gpu, probs_cpu_on_gpu = outputs(cpu, device, bags)
        loss = [pd.read_csv(p.with_suffix(".csv"))["train_loss"].to_numpy() for p in (gpu, cpu)]
        out = {
            "trained_max_abs_logit_diff": float(np.abs(logits_gpu - logits_cpu).max()),
            "trained_max_abs_prob_diff": float(np.abs(probs_gpu - probs_cpu).max()),
            "trained_max_abs_weight_diff": max_weight_diff(gpu, cpu),
            "train_loss_max_abs_diff": float(np.abs(loss[0] - loss[1]).max()),
            "forward_only_max_abs_logit_diff": float(np.abs(logits_cpu_on_gpu - logits_cpu).max()),
            "forward_only_max_abs_prob_diff": float(np.abs(probs_cpu_on_gpu - probs_cpu).max()),
            "bags": len(bags),
            "dropout_off": {k: v for k, v in plain.items() if "dropout" in k},
        }
        ok = (out["forward_only_max_abs_prob_diff"] < 1e-4
              and out["trained_max_abs_prob_diff"] < 1e-2)
        return {"ok": ok, **out}

    check(f"{model_name}_device_vs_cpu", versus_cpu)


def run_checks(cohort: Cohort, device: torch.device, models: list[str],
               report: dict[str, Any], save: Callable[[], None]) -> None:
    checks = report["checks"]
    env_at_start = dict(os.environ)

    def check(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        record(checks, name, fn)
        save()

    def amp() -> dict[str, Any]:
        # Training has no AMP switch: nothing to compare with fp32, only to record.
        switch = "amp" in TrainSettings.model_fields
        autocast = "autocast" in inspect.getsource(train_module)
        used = switch or autocast
        return {"ok": not used, "amp_in_training": used,
                "note": "AMP used in training: this check does not compare it with fp32 yet"
                if used else
                "AMP not used in training (TrainSettings has no amp key, train_fold no "
                "autocast): float32 throughout"}

    check("amp", amp)
    report["environment"]["flags_before_training"] = determinism_flags()
    for model_name in models:
        model_checks(model_name, cohort, device, check, env_at_start)

    def settings() -> dict[str, Any]:
        """What train_fold set for the steps, read from the first run; gaps named."""
        seen = next((c for n, c in checks.items() if n.endswith("_on_device")
                     and "flags_during_training" in c), None)
        if seen is None:
            return {"ok": False, "error": "no training run recorded its settings"}
        during = seen["flags_during_training"]
        gaps = []
        if not during["use_deterministic_algorithms"]:
            gaps.append("use_deterministic_algorithms is off during training")
        if during["warn_only"]:
            gaps.append("warn_only=True: an op without a deterministic CUDA kernel warns "
                        "(listed per model under nondeterministic_op_warnings) instead of "
                        "failing")
        if device.type == "cuda" and during["CUBLAS_WORKSPACE_CONFIG"] not in (":4096:8",
                                                                               ":16:8"):
            gaps.append("CUBLAS_WORKSPACE_CONFIG not set for cuBLAS")
        if not during["cudnn.deterministic"]:
            gaps.append("cudnn.deterministic not set (the MIL models run no cuDNN kernels, "
                        "and use_deterministic_algorithms makes cuDNN pick deterministic "
                        "algorithms anyway)")
        if during["cudnn.benchmark"]:
            gaps.append("cudnn.benchmark is on")
        if during["matmul.allow_tf32"]:
            gaps.append("TF32 matmuls allowed: GPU results drift further from the CPU's")
        ok = (during["use_deterministic_algorithms"] and not during["cudnn.benchmark"]
              and (device.type != "cuda" or bool(during["CUBLAS_WORKSPACE_CONFIG"])))
        return {"ok": ok, "during_training": during, "not_set_or_partial": gaps}

    check("determinism_settings", settings)


# --- timings ---------------------------------------------------------------------------------


def timings(args: argparse.Namespace, device: torch.device, report: dict[str, Any],
            save: Callable[[], None]) -> None:
    """benchmarks/mil.py's epoch (one step + one evaluation forward on one bag) per model, bag
    size and mode, in this process (CUDA is warm; peak GPU memory is reset for each)."""
    rows = report["timings"]
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    threads = torch.get_num_threads()
    for n in args.sizes:
        for model_name in args.models:
            for deterministic in (False, True):
                argv = ["--child", "--model", model_name, "--n", str(n), "--dim",
                        str(args.dim), "--device", str(device), "--repeats", str(args.repeats),
                        "--threads", str(threads if device.type == "cuda" else args.cpu_threads)]
                if args.small and model_name == "srmil":
                    argv += ["--hparams", json.dumps(SMALL_SRMIL)]
                argv += ["--deterministic"] if deterministic else []
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    row = mil_bench.child(mil_bench.parse_args(argv))
                    # The process's peak RSS is not this measurement's in this process.
                    row = {k: v for k, v in row.items() if "rss" not in k
                           and k != "peak_above_start_gib"}
                except Exception as err:  # noqa: BLE001 - keep the other timings
                    traceback.print_exc()
                    row = {"model": model_name, "patches": n, "deterministic": deterministic,
                           "error": f"{type(err).__name__}: {err}"}
                finally:
                    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
                    torch.set_num_threads(threads)
                rows.append(row)
                print(f"timing: {json.dumps(row)}", flush=True)
                save()


# --- the report ------------------------------------------------------------------------------


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import torch_geometric

    env = {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
           "srmil": __version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "device": str(device), "cuda_available":
           torch.cuda.is_available(), "small": args.small,
           "cohort": {"slides": args.slides, "patches": [args.min_patches, args.max_patches],
                      "dim": args.dim, "epochs": args.epochs},
           "CUBLAS_WORKSPACE_CONFIG_at_start": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    if device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(device),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                "cuda": torch.version.cuda}
    return env


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU training check ({env.get('gpu', env['device'])})", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if not isinstance(v, dict)), "",
             f"Cohort: {json.dumps(env['cohort'])}", "", "## Checks", ""]
    for name, c in report["checks"].items():
        # The flags around a run are in the JSON; determinism_settings shows those in force.
        detail = ", ".join(f"{k}={json.dumps(v)}" for k, v in c.items()
                           if k not in ("ok", "seconds") and not k.startswith("flags_"))
        lines.append(f"- {name}: {'ok' if c['ok'] else 'FAILED'} ({detail})")
    lines += ["", "## Epoch times (one training step + one evaluation forward per bag)", "",
              "| patches | model | mode | step (s) | eval (s) | epoch (s) | GPU peak (GiB) |",
              "|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        mode = "deterministic" if r.get("deterministic") else "default"
        if "error" in r:
            lines.append(f"| {r['patches']:,} | {r['model']} | {mode} | failed: "
                         f"{r['error'][:80]} | | | |")
            continue
        gpu = f"{r['gpu_peak_gib']:.2f}" if "gpu_peak_gib" in r else "-"
        lines.append(f"| {r['patches']:,} | {r['model']} | {mode} | {r['step_s']:.3g} | "
                     f"{r['eval_s']:.3g} | {r['epoch_s']:.3g} | {gpu} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto", help="auto (the GPU where there is one), cuda, "
                   "cpu")
    p.add_argument("--small", action="store_true", help="CPU rehearsal: tiny sizes")
    p.add_argument("--models", nargs="+", default=["srmil", "abmil"])
    p.add_argument("--slides", type=int, default=24)
    p.add_argument("--min-patches", type=int, default=200)
    p.add_argument("--max-patches", type=int, default=5000)
    p.add_argument("--dim", type=int, default=512, help="feature size (resnet18: 512)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                   help="patches per bag for the epoch timings")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs after a warm-up")
    p.add_argument("--cpu-threads", type=int, default=min(8, os.cpu_count() or 1),
                   help="torch threads of the CPU training run")
    args = p.parse_args(argv)
    if args.small:
        args.device, args.slides, args.min_patches, args.max_patches = "cpu", 8, 30, 80
        args.dim, args.epochs, args.sizes, args.repeats, args.cpu_threads = 16, 2, [300], 1, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device, "--device")
    report: dict[str, Any] = {"environment": environment(args, device), "checks": {},
                              "timings": []}
    print(json.dumps(report["environment"]), flush=True)

    def save() -> None:
        (args.out / "gpu_train_check.json").write_text(json.dumps(report, indent=2))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="srmil-gpu-train-") as tmp:
        # The determinism checks come first: train_fold sets cuBLAS's workspace before any
        # CUDA product of this process, as in a fresh `srmil train`.
        cohort = Cohort(Path(tmp), args)
        report["environment"]["cohort"]["patches_per_slide"] = [
            len(load_bag(cohort.features, cohort.graphs, s)) for s in cohort.samples["slide_id"]]
        run_checks(cohort, device, args.models, report, save)
    timings(args, device, report, save)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    save()
    text = markdown(report)
    (args.out / "gpu_train_check.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
