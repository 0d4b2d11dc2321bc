"""Classification metrics (AUC, accuracy, balanced accuracy, macro F1) and their patient-level
bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

METRICS = ("auc", "accuracy", "balanced_accuracy", "macro_f1")


METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                "macro_f1": "macro F1"}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           n_classes: int) -> dict[str, float | None]:
    """AUC (binary: P(class 1); multiclass: mean of the one-vs-rest AUCs), accuracy, balanced
    accuracy (mean recall over the classes in `y_true`) and macro F1 (over the classes in
    `y_true` or predicted) from the argmax. AUC is None unless every class occurs in `y_true`;
    all are None for an empty input. Equal to scikit-learn's, without its per-call overhead
    (the bootstrap calls this thousands of times)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), n_classes)
    if len(y_true) == 0:
        return dict.fromkeys(METRICS)
    y_pred = probs.argmax(axis=1)
    present = np.unique(y_true)
    f1 = []
    for c in np.union1d(present, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "auc": _auc(y_true, probs, n_classes, present),
        "accuracy": float(np.mean(y_pred == y_true)),
        "balanced_accuracy": float(np.mean([np.mean(y_pred[y_true == c] == c) for c in present])),
        "macro_f1": float(np.mean(f1)),
    }


def _auc(y_true: np.ndarray, probs: np.ndarray, n_classes: int,
         present: np.ndarray) -> float | None:
    if len(present) < n_classes:
        return None
    if n_classes == 2:
        return binary_auc(y_true == 1, probs[:, 1])
    return float(np.mean([binary_auc(y_true == c, probs[:, c]) for c in range(n_classes)]))


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg), ties counting one half (= the ROC area)."""
    ranks = rankdata(score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_intervals(y_true: np.ndarray, probs: np.ndarray, n_classes: int,
                        groups: Sequence[Any] | None = None, n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of every metric, resampling groups (patients: their slides
    are not independent) with replacement; without `groups`, single slides.

    Resample b draws `rng.integers(0, n_groups, n_groups)` from `np.random.default_rng(seed)`,
    in order. Resamples where a metric is undefined (AUC without every class) are left out of
    that metric's interval; None when no resample defines it.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), n_classes)
    if len(y_true) == 0 or n_boot < 1:
        return dict.fromkeys(METRICS)
    members = group_members(groups, len(y_true))
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    for _ in range(n_boot):
        draw = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in draw])
        for name, value in classification_metrics(y_true[idx], probs[idx], n_classes).items():
            if value is not None:
                values[name].append(value)
    tail = (1 - level) / 2 * 100
    return {name: ([float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
                   if v else None) for name, v in values.items()}


def group_members(groups: Sequence[Any] | None, n: int) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n)]
    codes, uniques = pd.factorize(pd.Series(list(groups)), sort=True)
    if len(codes) != n:
        raise ValueError(f"{len(codes)} groups for {n} slides")
    return [np.flatnonzero(codes == g) for g in range(len(uniques))]


def labels_and_probs(table: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if table.empty:
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(classes)))
    y = table["label"].map(classes.index).to_numpy(dtype=np.int64)
    return y, table[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
