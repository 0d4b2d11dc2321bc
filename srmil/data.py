"""Bags from the stores, and patient-level stratified cross-validation splits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold

from srmil.errors import InputError
from srmil.store import read_feature_store, read_graph_store


@dataclass
class Bag:
    """One slide as a MIL bag: patch features, spatial edges, patch origins, store attributes."""

    slide_id: str
    x: torch.Tensor  # (N, D) float32
    edge_index: torch.Tensor  # (2, E) int64, source row 0, target row 1
    coords: np.ndarray  # (N, 2) int64, level-0 px
    attrs: dict[str, Any] = field(default_factory=dict)  # the feature store's attributes

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> Bag:
        return Bag(self.slide_id, self.x.to(device), self.edge_index.to(device), self.coords,
                   self.attrs)


def load_bag(features_dir: str | os.PathLike, graphs_dir: str | os.PathLike,
             slide_id: str) -> Bag:
    """Read `{features_dir}/{slide_id}.zarr` and `{graphs_dir}/{slide_id}.zarr` into a Bag."""
    features_path = Path(features_dir) / f"{slide_id}.zarr"
    graph_path = Path(graphs_dir) / f"{slide_id}.zarr"
    for path, step in ((features_path, "features"), (graph_path, "graphs")):
        if not path.is_dir():
            raise InputError(f"{path}: store of slide {slide_id!r} not found; run the {step} step")
    features, coords, attrs = read_feature_store(features_path)
    edge_index, _ = read_graph_store(graph_path)
    n = len(features)
    # A graph built from another feature store would index the wrong patches silently.
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n):
        raise InputError(f"{graph_path}: edges reference node {int(edge_index.max())} but the "
                         f"feature store has {n} patches; rerun the graphs step")
    return Bag(slide_id, torch.from_numpy(features), torch.from_numpy(edge_index), coords, attrs)


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
