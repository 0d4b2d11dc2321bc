"""What the workflow computes while Snakemake parses it: no torch, OpenCV or tifffile here, since
every Snakemake start (and every cluster job's) imports this."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from srmil.mil.catalog import MODELS
from srmil.store import read_json

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
