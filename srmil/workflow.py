"""The workflow seen from Python: what it computes while Snakemake parses (no torch, OpenCV or
tifffile at import, since every Snakemake start and every cluster job's imports this), and
`srmil predict`'s run of its predict target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from srmil.errors import InputError
from srmil.mil.catalog import MODELS
from srmil.store import atomic_path, read_json

if TYPE_CHECKING:
    from srmil.settings import Settings

# Resident memory of a training job (docs/method.md, "Memory"), in MiB. One SRMIL step (forward,
# backward, AdamW) on a 100k-patch bag measured 7.1 GiB above the process's start at D = 512 and
# 9.7 GiB at D = 1024 (benchmarks/mil.py, CPU), ABMIL 1.5 and 1.6 GiB: per 100k patches, an
# intercept plus a slope per feature dimension, linear in the patches between 1k and 100k.
# Each model's figures are in srmil.mil.catalog (ModelInfo.step_mib_per_100k).
STEP_MIB_PER_100K = {name: info.step_mib_per_100k for name, info in MODELS.items()}
LIBRARIES_MIB = 2000  # torch and torch-geometric before the first step (1.7 GiB measured)
MIN_TRAIN_MIB = 4000


def train_memory_mb(model_name: str, feature_stores: list[str | os.PathLike],
                    graph_stores: list[str | os.PathLike], setting: int | str = "auto") -> int:
    """MiB a `train_fold` job of `model_name` needs on the CPU with these stores (all slides the
    job may load), from the arrays' shapes alone (no data is read); a number as `setting`
    (config.yaml's train.mem_mb) is returned as it is.

    The peak is the libraries, every bag held as float32 with its int64 edges, and the larger of
    one step on the largest bag and the scaler's float64 pass over it. Stores not written
    yet are left out (at least MIN_TRAIN_MIB), so the workflow can ask before the features exist
    and again when they do.
    """
    if setting != "auto":
        return int(setting)
    shapes = (_array_shape(Path(p), "features") for p in feature_stores)
    sizes = [shape for shape in shapes if shape is not None]
    edges = (_array_shape(Path(p), "edge_index") for p in graph_stores)
    n_edges = sum(shape[1] for shape in edges if shape is not None)
    if not sizes:
        return MIN_TRAIN_MIB
    values = sum(n * d for n, d in sizes)
    held = (4 * values + 16 * n_edges + 16 * sum(n for n, _ in sizes)) / 2**20
    n_max, d_max = max(n for n, _ in sizes), max(d for _, d in sizes)
    intercept, per_dim = STEP_MIB_PER_100K.get(model_name, STEP_MIB_PER_100K["srmil"])
    step = n_max / 1e5 * (intercept + per_dim * d_max)
    scaler = 24 * n_max * d_max / 2**20  # float64 copies of one bag at a time (FeatureScaler)
    return max(MIN_TRAIN_MIB, int(np.ceil(LIBRARIES_MIB + held + max(step, scaler))))


def _array_shape(store: Path, name: str) -> tuple[int, ...] | None:
    """The shape of array `name` of a Zarr store (written atomically, so a store that exists is
    complete), read from its metadata; None while the store is not written."""
    meta = store / name / "zarr.json"
    if not (store / "zarr.json").is_file() or not meta.is_file():
        return None
    return tuple(int(n) for n in read_json(meta)["shape"])


def keep_going_requested(argv: list[str] | None = None) -> bool:
    """Whether the Snakemake run that is parsing the workflow keeps going past failed jobs:
    `--keep-going` (`-k`) on its command line or `keep-going: true` in a profile it uses
    (`--profile`, `$SNAKEMAKE_PROFILE`, `--workflow-profile`, workflow/profiles/default).

    Snakemake sets its execution settings only after the parse, so its own argument parser reads
    `argv` (default: this process's) again, with the profiles, as it did at the start. A process
    that is not Snakemake's command line (its Python API, a test runner) reads as False."""
    import contextlib
    import io

    if argv is None:
        start = Path(sys.argv[0])
        if "snakemake" not in (start.name, start.parent.name):
            return False
        argv = sys.argv[1:]
    from snakemake.cli import parse_args

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # "Using profile ..." was said once
            _, args = parse_args(argv)
    except (Exception, SystemExit):  # arguments Snakemake itself has refused by now
        return False
    return bool(args.keep_going)


# --- `srmil predict` on new slide files: the workflow's predict target -------------------------

# The workflow that `srmil predict` runs (the package is used from its checkout: pip install -e).
SNAKEFILE = Path(__file__).resolve().parents[1] / "Snakefile"


def check_predict_settings(settings: Settings) -> None:
    """Refuse, while the workflow is parsed, a `snakemake predict` whose settings would extract
    features or build graphs that predict.model was not trained on (another backbone, tiling or
    graph window), before any slide is read. Folds not trained yet are checked when they predict."""
    from srmil.mil.provenance import check_extractor, check_settings, first_model_meta

    predict = settings.predict
    models_dir = predict.models_dir or f"results/models/{predict.model}/{predict.extractor}"
    try:
        meta = first_model_meta(models_dir)
    except (InputError, OSError, ValueError):  # not trained yet, or written by hand: the job says
        return
    check_extractor(meta, predict.extractor, models_dir)
    backbone = settings.backbones.get(predict.extractor)
    if backbone is not None:
        tile = {"target_mpp": settings.tile.target_mpp, "patch_px": settings.tile.patch_px,
                "stride_px": settings.tile.stride}
        check_settings(meta, models_dir, predict.extractor, backbone.model_dump(), tile,
                       settings.graph.window)


def predict_config(models_dir: str | os.PathLike, samples: str | os.PathLike,
                   config: dict[str, Any] | None = None, extractor: str | None = None,
                   heatmaps: bool = True) -> dict[str, Any]:
    """The config that runs new slides through the workflow's `predict` target with the fold
    models of `models_dir`: `config` (config.yaml's sections, optional) with the extractor,
    tiling and graph the model was trained on wherever `config` leaves them out. A `config`
    that asks for another backbone (other weights), tiling or graph window is refused here,
    before any slide is read."""
    from srmil.features.backbones import load_backbone
    from srmil.mil.provenance import (
        PredictError,
        check_extractor,
        check_settings,
        first_model_meta,
        model_extractor,
        model_graph,
    )

    meta = first_model_meta(models_dir)
    name = check_extractor(meta, extractor, models_dir)
    trained = model_extractor(meta, models_dir)
    cfg = json.loads(json.dumps(config or {}))  # a copy
    cfg.setdefault("seed", meta.get("seed", 0))  # random-initialisation backbones depend on it
    spec = cfg.setdefault("backbones", {}).setdefault(name, trained.backbone)
    cfg["features"] = {**cfg.get("features", {}), "extractors": [name]}
    tile = cfg.setdefault("tile", {})
    tile.setdefault("target_mpp", trained.mpp)
    tile.setdefault("patch_px", trained.patch_px)
    if "stride_px" not in tile and "overlap_px" not in tile:
        tile["stride_px"] = trained.stride_px
    window = model_graph(meta).get("window")
    if window is not None:
        cfg.setdefault("graph", {}).setdefault("window", window)
    check_settings(meta, models_dir, name, spec, tile, cfg.get("graph", {}).get("window"))
    weights = load_backbone(spec, seed=int(cfg["seed"])).weights_hash
    if weights != trained.weights_hash:
        raise PredictError(
            f"backbone {spec.get('model')!r} (extractor {name!r}) has weights {weights[:12]}, "
            f"but the model in {models_dir} was trained on weights "
            f"{trained.weights_hash[:12]}; use the backbone the model was trained on")
    cfg["predict"] = {**cfg.get("predict", {}), "samples": str(Path(samples).resolve()),
                      "models_dir": str(Path(models_dir).resolve()), "model": meta["model"],
                      "extractor": name, "heatmaps": heatmaps}
    return cfg


def run_predict(samples: str | os.PathLike, models_dir: str | os.PathLike,
                out_dir: str | os.PathLike, config: dict[str, Any] | None = None,
                extractor: str | None = None, cores: int | None = None, heatmaps: bool = True,
                device: str | None = None, threads: int | None = None) -> Any:
    """New slides through the workflow's `predict` target (the cohort's own stage rules), run by
    Snakemake in `out_dir`: predictions.csv and heatmaps/ at its top, every stage's output and log
    under results/ and logs/, reused by a rerun. Returns the predictions."""
    import pandas as pd

    from srmil.settings import load_settings

    cfg = predict_config(models_dir, samples, config, extractor, heatmaps)
    for section in ("features", "train"):
        if device:
            cfg.setdefault(section, {})["device"] = device
        if threads:
            cfg.setdefault(section, {})["threads"] = threads
    settings = load_settings(cfg)  # unknown keys and bad values stop here, in one line
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "srmil-predict.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    if not SNAKEFILE.is_file():
        raise InputError(f"{SNAKEFILE}: the workflow is missing; run srmil from its checkout")
    # The target before --configfile, which takes several values.
    command = [sys.executable, "-m", "snakemake", "predict", "-s", str(SNAKEFILE), "-d", str(out),
               "--cores", str(cores or os.cpu_count() or 1), "--configfile", str(config_path)]
    if subprocess.run(command).returncode != 0:
        raise InputError(f"{out}: the predict workflow failed; the failed job's log under "
                         f"{out / 'logs'} names the problem")
    # The results at the top of out_dir, where a user looks; the workflow's copy stays for reruns.
    result = out / "results/predict" / settings.predict.model / settings.predict.extractor
    with atomic_path(out / "predictions.csv") as tmp:
        shutil.copyfile(result / "predictions.csv", tmp)
    with atomic_path(out / "heatmaps") as tmp:
        if (result / "heatmaps").is_dir():
            shutil.copytree(result / "heatmaps", tmp)
        else:
            tmp.mkdir()
    print(f"srmil predict: {out / 'predictions.csv'}")
    return pd.read_csv(out / "predictions.csv")
