"""Evaluate cross-validated models on their test folds: metrics, predictions, plots."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from srmil.data import Bag, load_bag
from srmil.errors import InputError
from srmil.store import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

METRICS = ("auc", "accuracy", "balanced_accuracy", "macro_f1")


@torch.no_grad()
def predict_bags(model: torch.nn.Module, bags: list[Bag],
                 device: str | torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, C) and per-patch attention of each bag, nothing masked."""
    model.eval()
    probs, attention = [], []
    for bag in bags:
        out = model(bag.x.to(device), bag.edge_index.to(device))
        probs.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
        attention.append(out.attention.float().cpu().numpy())
    if not probs:
        n_classes = int(getattr(model, "n_classes", 0))
        return np.zeros((0, n_classes), dtype=np.float32), []
    return np.stack(probs), attention


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           n_classes: int) -> dict[str, float | None]:
    """AUC (binary: P(class 1); multiclass: one-vs-rest macro), accuracy, balanced accuracy and
    macro F1 from the argmax. AUC is None unless every class occurs in `y_true`; all are None
    for an empty input."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), n_classes)
    if len(y_true) == 0:
        return dict.fromkeys(METRICS)
    y_pred = probs.argmax(axis=1)
    return {
        "auc": _auc(y_true, probs, n_classes),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Mean recall over the classes present in y_true (as sklearn's, without its warning when
        # a fold lacks a class).
        "balanced_accuracy": float(np.mean([np.mean(y_pred[y_true == c] == c)
                                            for c in np.unique(y_true)])),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def _auc(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> float | None:
    if len(np.unique(y_true)) < n_classes:
        return None
    if n_classes == 2:
        return float(roc_auc_score(y_true == 1, probs[:, 1]))
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in range(n_classes)]))


def evaluate_model(model_name: str, models_dir: str | os.PathLike, splits: dict,
                   samples: pd.DataFrame, features_dir: str | os.PathLike,
                   graphs_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   device: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Predict every fold's test slides with `{models_dir}/fold_{k}.pt`; write metrics.json,
    predictions.csv, roc.png, confusion.png and training_curves.png to `out_dir`.

    Returns the metrics written to metrics.json.
    """
    from srmil.train import torch_threads  # imported here: train imports this module

    models_dir, out_dir = Path(models_dir), Path(out_dir)
    classes = list(splits["classes"])
    predictions, per_fold, skipped = [], [], []
    with torch_threads(threads):
        for k, membership in enumerate(splits["folds"]):
            rows, empty = _predict_fold(model_name, models_dir / f"fold_{k}.pt", k, membership,
                                        classes, samples, features_dir, graphs_dir, device)
            y, probs = _labels_and_probs(pd.DataFrame(rows), classes)
            per_fold.append({"fold": k, "n_slides": len(rows),
                             **classification_metrics(y, probs, len(classes))})
            predictions += rows
            skipped += empty

    table = pd.DataFrame(predictions)
    y_all, p_all = _labels_and_probs(table, classes)
    metrics = {
        "model": model_name,
        "classes": classes,
        "per_fold": per_fold,
        "pooled": classification_metrics(y_all, p_all, len(classes)),
        **_mean_std(per_fold),
        "n_slides": len(table),
        "skipped": sorted(skipped),
    }
    write_text(out_dir / "predictions.csv", table.to_csv(index=False))
    write_json(out_dir / "metrics.json", metrics)
    _plot_roc(table, classes, out_dir / "roc.png")
    _plot_confusion(y_all, p_all, classes, out_dir / "confusion.png")
    _plot_training_curves([models_dir / f"fold_{k}.csv" for k in range(len(splits["folds"]))],
                          out_dir / "training_curves.png")
    return metrics


def _predict_fold(model_name: str, pt_path: Path, fold: int, membership: dict,
                  classes: list[str], samples: pd.DataFrame, features_dir: str | os.PathLike,
                  graphs_dir: str | os.PathLike,
                  device: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Prediction rows for the fold's test slides, and the ids of those skipped as empty."""
    from srmil.train import load_model, resolve_device

    dev = resolve_device(device)
    model, meta = load_model(pt_path, device=dev)
    _check_model_matches(meta, model_name, classes, membership, pt_path)
    bags = [load_bag(features_dir, graphs_dir, sid) for sid in membership["test"]]
    empty = [b.slide_id for b in bags if len(b) == 0]
    for slide_id in empty:
        log.warning("slide %s has no patches; skipped", slide_id)
    bags = [b for b in bags if len(b) > 0]
    probs, attention = predict_bags(model, bags, dev)
    return _prediction_rows(bags, probs, attention, fold, classes,
                            samples.set_index("slide_id")), empty


def _check_model_matches(meta: dict, model_name: str, classes: list[str], membership: dict,
                         path: Path) -> None:
    # A model trained on another split would be tested on its own training slides.
    if meta["model"] != model_name:
        raise InputError(f"{path}: holds a {meta['model']!r} model, not {model_name!r}")
    if list(meta["classes"]) != classes or set(meta["split"]["test"]) != set(membership["test"]):
        raise InputError(f"{path}: trained on other classes or another split than the one given; "
                         "retrain with these splits")


def _prediction_rows(bags: list[Bag], probs: np.ndarray, attention: list[np.ndarray], fold: int,
                     classes: list[str], sample_rows: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for bag, p, att in zip(bags, probs, attention, strict=True):
        row = {"slide_id": bag.slide_id, "patient_id": sample_rows.at[bag.slide_id, "patient_id"],
               "fold": fold, "label": str(sample_rows.at[bag.slide_id, "label"])}
        row.update({f"prob_{c}": float(v) for c, v in zip(classes, p, strict=True)})
        row["prediction"] = classes[int(np.argmax(p))]
        # The largest attention weight: near 1 means one patch decides the slide (paper Fig. 3).
        row["attention_max"] = float(att.max()) if att.size else float("nan")
        rows.append(row)
    return rows


def _labels_and_probs(table: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if table.empty:
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(classes)))
    y = table["label"].map(classes.index).to_numpy(dtype=np.int64)
    return y, table[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)


def _mean_std(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and population standard deviation over folds; folds where a metric is None are left
    out."""
    mean, std = {}, {}
    for name in METRICS:
        values = [f[name] for f in per_fold if f[name] is not None]
        mean[name] = float(np.mean(values)) if values else None
        std[name] = float(np.std(values)) if values else None
    return {"mean": mean, "std": std}


# --- plots -----------------------------------------------------------------------------------


def _figure(ncols: int = 1, width: float = 5.0, height: float = 4.5):
    # A bare Figure renders with Agg and touches no pyplot state (safe in workers and tests).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    return fig, fig.subplots(1, ncols, squeeze=False)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def _plot_roc(table: pd.DataFrame, classes: list[str], path: Path) -> None:
    """Binary: one curve per fold and the pooled one. Multiclass: pooled one-vs-rest per class."""
    fig, axes = _figure()
    ax = axes[0, 0]
    y, probs = _labels_and_probs(table, classes)
    if len(classes) == 2:
        curves = [(f"fold {k}", part.index) for k, part in table.groupby("fold")]
        curves.append(("pooled", table.index))
        for name, idx in curves:
            _roc_line(ax, y[idx] == 1, probs[idx, 1], name, lw=2.5 if name == "pooled" else 1.2)
    else:
        for c, label in enumerate(classes):
            _roc_line(ax, y == c, probs[:, c], f"{label} vs rest", lw=1.5)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02),
           title="ROC")
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def _roc_line(ax, positive: np.ndarray, score: np.ndarray, name: str, lw: float) -> None:
    if positive.all() or not positive.any():  # ROC needs both classes
        ax.plot([], [], label=f"{name} (AUC n/a)")
        return
    fpr, tpr, _ = roc_curve(positive, score)
    ax.plot(fpr, tpr, lw=lw, label=f"{name} (AUC {roc_auc_score(positive, score):.3f})")


def _plot_confusion(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> None:
    counts = confusion_matrix(y, probs.argmax(axis=1) if len(y) else y,
                              labels=range(len(classes)))
    fig, axes = _figure(width=1.2 * len(classes) + 3, height=1.2 * len(classes) + 2.5)
    ax = axes[0, 0]
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center",
                color="white" if n > counts.max() / 2 else "black")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion (pooled test folds)")
    _save(fig, path)


def _plot_training_curves(csv_paths: list[Path], path: Path) -> None:
    """One panel per train loss part and per validation metric, one line per fold."""
    logs = {int(p.stem.split("_")[-1]): pd.read_csv(p) for p in csv_paths if p.is_file()}
    columns = sorted({c for t in logs.values() for c in t.columns
                      if c.startswith("train_") and c != "train_acc"})
    columns += ["train_acc", "val_loss", "val_acc", "val_auc"]
    fig, axes = _figure(ncols=len(columns), width=3.2, height=3.0)
    for ax, column in zip(axes[0], columns, strict=True):
        for fold, t in sorted(logs.items()):
            if column in t.columns:
                ax.plot(t["epoch"], t[column], label=f"fold {fold}", lw=1)
                chosen = t[t["selected"] == 1]
                ax.plot(chosen["epoch"], chosen[column], "o", ms=4, color="black")
        ax.set(title=column, xlabel="epoch")
    if logs:
        axes[0, 0].legend(fontsize="small")
    _save(fig, path)
