"""Bags from the stores; patient-level stratified cross-validation splits, or a fixed split file.

Both kinds of splits come out in one format (`results/splits.json`): the classes and, per fold, the
sorted slide ids of its `train`, `val` (model selection) and `test` parts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold

from srmil.catalog import MODELS
from srmil.errors import InputError
from srmil.exclusion import EXCLUDED, SlideExcluded
from srmil.store import read_feature_store, read_graph_store, read_json


@dataclass
class Bag:
    """One slide as a MIL bag: patch features, spatial edges, patch origins, store attributes."""

    slide_id: str
    x: torch.Tensor  # (N, D) float32
    edge_index: torch.Tensor  # (2, E) int64, source row 0, target row 1
    coords: np.ndarray  # (N, 2) int64, level-0 px
    attrs: dict[str, Any] = field(default_factory=dict)  # the feature store's attributes
    # The graph store's attributes (window, radius_cells, self_loops, ...): how edges were built.
    graph_attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def excluded(self) -> str | None:
        """Why the slide was left out (srmil.exclusion), or None."""
        return self.attrs.get(EXCLUDED) or self.graph_attrs.get(EXCLUDED)

    def to(self, device: torch.device | str) -> Bag:
        return Bag(self.slide_id, self.x.to(device), self.edge_index.to(device), self.coords,
                   self.attrs, self.graph_attrs)


# The graph store attributes that say how edges were built (not per-slide counts or strides):
# a model is tied to them as to its feature extractor.
GRAPH_PARAM_KEYS = ("window", "radius_cells", "self_loops")


def graph_params(graph_attrs: dict[str, Any]) -> dict[str, Any]:
    """The graph-building parameters among a graph store's attributes."""
    return {k: graph_attrs[k] for k in GRAPH_PARAM_KEYS if k in graph_attrs}


def load_bag(features_dir: str | os.PathLike, graphs_dir: str | os.PathLike,
             slide_id: str, exclude_failed: bool = False) -> Bag:
    """Read `{features_dir}/{slide_id}.zarr` and `{graphs_dir}/{slide_id}.zarr` into a Bag.

    A slide excluded after a failure (srmil.exclusion) comes back as an empty bag whose
    `excluded` gives the reason with `exclude_failed`, and is refused without it.
    """
    features_path = Path(features_dir) / f"{slide_id}.zarr"
    graph_path = Path(graphs_dir) / f"{slide_id}.zarr"
    for path, step in ((features_path, "features"), (graph_path, "graphs")):
        if not path.is_dir():
            raise InputError(f"{path}: store of slide {slide_id!r} not found; run the {step} step")
    features, coords, attrs = read_feature_store(features_path)
    edge_index, graph_attrs = read_graph_store(graph_path)
    reason = attrs.get(EXCLUDED) or graph_attrs.get(EXCLUDED)
    if reason:
        if not exclude_failed:
            raise SlideExcluded(f"slide {slide_id!r}", reason)
        # Its graph may be a normal one (features fail after tiling): the bag is empty.
        return Bag(slide_id, torch.zeros(0, 0), torch.zeros(2, 0, dtype=torch.int64),
                   np.zeros((0, 2), dtype=np.int64), {**attrs, EXCLUDED: reason}, graph_attrs)
    n = len(features)
    # A graph built from another feature store would index the wrong patches silently.
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n):
        raise InputError(f"{graph_path}: edges reference node {int(edge_index.max())} but the "
                         f"feature store has {n} patches; rerun the graphs step")
    return Bag(slide_id, torch.from_numpy(features), torch.from_numpy(edge_index), coords, attrs,
               graph_attrs)


# Resident memory of a training job (docs/method.md, "Memory"), in MiB. One SRMIL step (forward,
# backward, AdamW) on a 100k-patch bag measured 7.1 GiB above the process's start at D = 512 and
# 9.7 GiB at D = 1024 (benchmarks/mil.py, CPU), ABMIL 1.5 and 1.6 GiB: per 100k patches, an
# intercept plus a slope per feature dimension, linear in the patches between 1k and 100k.
# Each model's figures are in srmil.catalog (ModelInfo.step_mib_per_100k).
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


def make_splits(samples: pd.DataFrame, n_folds: int = 3, val_fraction: float = 0.2,
                seed: int = 0) -> dict:
    """Patient-level stratified k-fold splits with an inner validation split per fold.

    Every patient's slides stay together in one part, every slide is in exactly one test fold,
    and the validation patients are drawn per class from each fold's training patients. The result
    depends only on the patients, labels and seed, not on the row order of `samples`.
    """
    if n_folds < 2:
        raise InputError(f"n_folds={n_folds}: cross-validation needs at least 2 folds")
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction={val_fraction}: must be in [0, 1)")
    patients = _patient_labels(samples)
    classes = sorted(patients.unique())
    if len(classes) < 2:
        raise InputError(f"only one class ({classes[0]!r}) in the sample sheet; a classifier "
                         "needs at least two labels")
    per_class = patients.value_counts()
    if per_class.min() < n_folds:
        label = per_class.idxmin()
        raise InputError(f"class {label!r} has {per_class.min()} patient(s), fewer than "
                         f"n_folds={n_folds}; use fewer folds or add patients")

    slides_of = samples.groupby("patient_id")["slide_id"].apply(sorted)
    kfold = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    rng = np.random.default_rng(seed)
    folds = []
    for train_idx, test_idx in kfold.split(patients.index, patients.to_numpy()):
        train_patients = patients.iloc[train_idx]
        val_ids = _validation_patients(train_patients, val_fraction, rng)
        parts = {
            "train": [p for p in train_patients.index if p not in val_ids],
            "val": [p for p in train_patients.index if p in val_ids],
            "test": list(patients.index[test_idx]),
        }
        folds.append({name: sorted(s for p in pats for s in slides_of[p])
                      for name, pats in parts.items()})
    return {"classes": classes, "n_folds": n_folds, "seed": seed, "val_fraction": val_fraction,
            "folds": folds}


PARTS = ("train", "val", "test")
ID_COLUMNS = ("slide_id", "patient_id")


def fold_count(split_file: str | os.PathLike) -> int:
    """The number of folds a split file defines (checks its format, not its ids)."""
    _, folds = _read_assignments(Path(split_file))
    return len(folds)


def read_split_file(split_file: str | os.PathLike, samples: pd.DataFrame,
                    val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Fixed splits from a file, checked against the sample sheet, in `make_splits`' format.

    The file is a CSV with a `slide_id` or a `patient_id` column (a patient stands for all its
    slides), a `part` column (train, val or test) and an optional integer `fold` column (0, 1,
    ...; without it the file is one fold); or a JSON `{"folds": [{"train": [slide ids],
    "val": [...], "test": [...]}, ...]}` such as a `splits.json` written before. Sheet slides a
    fold does not name take no part in it. A fold without validation slides gets them drawn from
    its training patients, per class, as in `make_splits` (none with val_fraction 0).

    Raises InputError naming the file for unknown ids, a patient split across parts of a fold,
    a slide named twice in a fold, a fold without training or test slides, or a training set of
    one class.
    """
    path = Path(split_file)
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction={val_fraction}: must be in [0, 1)")
    kind, folds = _read_assignments(path)
    patients = _patient_labels(samples)
    classes = sorted(patients.unique())
    patient_of = dict(zip(samples["slide_id"].astype(str), samples["patient_id"].astype(str),
                          strict=True))
    slides_of = samples.groupby("patient_id")["slide_id"].apply(sorted)
    known = set(patient_of) if kind == "slide_id" else set(slides_of.index)
    rng = np.random.default_rng(seed)
    out = []
    for k, fold in enumerate(folds):
        unknown = sorted({i for ids in fold.values() for i in ids} - known)
        if unknown:
            raise InputError(f"{path}: {kind} {', '.join(map(repr, unknown[:3]))}"
                             f"{' and more' if len(unknown) > 3 else ''} not in the sample "
                             "sheet; fix the ids or the sheet")
        parts = {part: sorted(fold.get(part, [])) if kind == "slide_id"
                 else sorted(s for p in fold.get(part, []) for s in slides_of[p])
                 for part in PARTS}
        owner: dict[str, str] = {}  # patient -> the part it was first seen in
        for part in PARTS:
            for slide_id in parts[part]:
                patient = patient_of[slide_id]
                if owner.setdefault(patient, part) != part:
                    raise InputError(f"{path}: patient {patient!r} has slides in both the "
                                     f"{owner[patient]} and the {part} part of fold {k}; keep a "
                                     "patient's slides in one part")
        for part in ("train", "test"):
            if not parts[part]:
                raise InputError(f"{path}: fold {k} has no {part} slides; name at least one")
        train_patients = patients[sorted({patient_of[s] for s in parts["train"]})]
        if train_patients.nunique() < 2:
            raise InputError(f"{path}: the training part of fold {k} holds only class "
                             f"{train_patients.iloc[0]!r}; it needs at least two classes")
        if not parts["val"] and val_fraction > 0:
            val_ids = _validation_patients(train_patients, val_fraction, rng)
            parts["val"] = sorted(s for p in val_ids for s in slides_of[p])
            parts["train"] = [s for s in parts["train"] if patient_of[s] not in val_ids]
        out.append(parts)
    return {"classes": classes, "n_folds": len(out), "seed": seed, "val_fraction": val_fraction,
            "split_file": str(path), "folds": out}


def _read_assignments(path: Path) -> tuple[str, list[dict[str, list[str]]]]:
    """(id column, per fold {part: ids}) from a split CSV or JSON; format errors name the file."""
    if not path.is_file():
        raise InputError(f"{path}: split file not found; fix cv.split_file or set it to null")
    if path.suffix.lower() == ".json":
        return "slide_id", _json_assignments(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the split file as CSV ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    id_columns = [c for c in ID_COLUMNS if c in table.columns]
    if len(id_columns) != 1 or "part" not in table.columns:
        raise InputError(f"{path}: a split CSV needs one id column (slide_id or patient_id), a "
                         f"part column and optionally fold; found {', '.join(table.columns)}")
    if table.empty:
        raise InputError(f"{path}: the split file has no rows")
    kind = id_columns[0]
    ids = table[kind].str.strip()
    parts = table["part"].str.strip().str.lower()
    bad = ~parts.isin(PARTS)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: row {row + 2} has part {table['part'].iloc[row]!r}; use "
                         f"one of {', '.join(PARTS)}")
    if (ids == "").any():
        raise InputError(f"{path}: row {int(np.flatnonzero(ids == '')[0]) + 2} has no {kind}")
    folds = pd.Series(0, index=table.index)
    if "fold" in table.columns:
        folds = pd.to_numeric(table["fold"].str.strip(), errors="coerce")
        if folds.isna().any() or (folds % 1 != 0).any() or (folds < 0).any():
            row = int(np.flatnonzero(folds.isna() | (folds % 1 != 0) | (folds < 0))[0])
            raise InputError(f"{path}: row {row + 2} has fold {table['fold'].iloc[row]!r}; "
                             "folds are integers 0, 1, ...")
        folds = folds.astype(int)
        missing = sorted(set(range(folds.max() + 1)) - set(folds))
        if missing:
            raise InputError(f"{path}: folds are numbered 0 to {folds.max()} but fold "
                             f"{missing[0]} has no rows")
    duplicated = pd.DataFrame({"fold": folds, "id": ids}).duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise InputError(f"{path}: {kind} {ids.iloc[row]!r} appears twice in fold "
                         f"{folds.iloc[row]} (row {row + 2}); name it once per fold")
    assignments = [{part: ids[(folds == k) & (parts == part)].tolist() for part in PARTS}
                   for k in range(int(folds.max()) + 1)]
    return kind, assignments


def _json_assignments(path: Path) -> list[dict[str, list[str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the split file as JSON ({err})") from err
    folds = data.get("folds") if isinstance(data, dict) else None
    if not isinstance(folds, list) or not folds:
        raise InputError(f'{path}: a split JSON needs "folds": a list of {{"train": [...], '
                         '"val": [...], "test": [...]}} of slide ids')
    out = []
    for k, fold in enumerate(folds):
        if (not isinstance(fold, dict) or set(fold) - set(PARTS)
                or not all(isinstance(v, list) and all(isinstance(i, str) for i in v)
                           for v in fold.values())):
            raise InputError(f"{path}: fold {k} must map train, val and test to lists of slide "
                             "ids")
        ids = [i for v in fold.values() for i in v]
        if len(ids) != len(set(ids)):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"{path}: slide {dup!r} appears twice in fold {k}; name it once "
                             "per fold")
        out.append({part: list(fold.get(part, [])) for part in PARTS})
    return out


def _patient_labels(samples: pd.DataFrame) -> pd.Series:
    """One label per patient, indexed by sorted patient id (so row order does not matter)."""
    missing = {"slide_id", "patient_id", "label"} - set(samples.columns)
    if missing:
        raise InputError(f"samples lack column(s) {', '.join(sorted(missing))}")
    labels = samples.groupby("patient_id")["label"]
    mixed = labels.nunique()
    if (mixed > 1).any():
        raise InputError(f"patient {mixed[mixed > 1].index[0]!r} has slides with different "
                         "labels; give each patient one label")
    return labels.first().astype(str).sort_index()


def _validation_patients(train_patients: pd.Series, val_fraction: float,
                         rng: np.random.Generator) -> set[str]:
    """Draw round(val_fraction * n) patients of each class (at least one, while one stays)."""
    chosen: set[str] = set()
    if val_fraction == 0:
        return chosen
    for label in sorted(train_patients.unique()):
        ids = train_patients.index[train_patients == label].to_numpy()
        n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
        chosen.update(rng.permutation(ids)[:n_val].tolist())
    return chosen
