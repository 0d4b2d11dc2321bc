"""Evaluate cross-validated models on their test folds: metrics with bootstrap intervals,
predictions, plots, attention heatmaps and diagnostics."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from srmil.cohort.exclusion import excluded_slides
from srmil.device import torch_threads
from srmil.errors import InputError
from srmil.mil.attention import attention_logs, last_summary
from srmil.mil.bags import Bag, load_bag
from srmil.mil.catalog import model_info
from srmil.mil.inference import load_model, predict_bags
from srmil.mil.metrics import (
    METRICS,
    bootstrap_intervals,
    classification_metrics,
    labels_and_probs,
)
from srmil.report.heatmaps import write_heatmaps
from srmil.report.plots import (
    plot_attention_diagnostics,
    plot_confusion,
    plot_roc,
    plot_training_curves,
)
from srmil.store import read_store_attrs, write_json, write_text

log = logging.getLogger(__name__)


def evaluate_model(model_name: str, models_dir: str | os.PathLike, splits: dict,
                   samples: pd.DataFrame, features_dir: str | os.PathLike,
                   graphs_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   device: str = "auto", threads: int | None = None,
                   tiles_dir: str | os.PathLike | None = None, n_bootstrap: int = 1000,
                   ci_level: float = 0.95, seed: int = 0, top_patches: int = 8,
                   heatmap_px: int = 1024, max_heatmaps: int | None = None,
                   exclude_failed: bool = False) -> dict[str, Any]:
    """Predict every fold's test slides with `{models_dir}/fold_{k}.pt`; write metrics.json,
    predictions.csv, roc.png, confusion.png, training_curves.png, attention_diagnostics.png (when
    the models have `fold_{k}.attention.json`) and, with `tiles_dir`, heatmaps/{slide}.png
    (of at most `max_heatmaps` slides, classes taking turns, if given; none for models without
    attention, srmil.mil.catalog). With `exclude_failed`, slides excluded after a failure
    (srmil.cohort.exclusion) are left out and listed with their reasons; without it, they are
    refused.

    Returns the metrics written to metrics.json.
    """
    models_dir, out_dir = Path(models_dir), Path(out_dir)
    classes = list(splits["classes"])
    n_folds = len(splits["folds"])
    with torch_threads(threads):
        predictions, per_fold, skipped, attention = _predict_folds(
            model_name, models_dir, splits, samples, features_dir, graphs_dir, device,
            exclude_failed, n_bootstrap, ci_level, seed)
    table = pd.DataFrame(predictions)
    y_all, p_all = labels_and_probs(table, classes)
    groups = table["patient_id"].tolist() if len(table) else None
    metrics = {
        "model": model_name,
        "classes": classes,
        "per_fold": per_fold,
        "pooled": classification_metrics(y_all, p_all, len(classes)),
        "pooled_ci": bootstrap_intervals(y_all, p_all, len(classes), groups, n_bootstrap,
                                         ci_level, seed),
        "bootstrap": {"n": n_bootstrap, "level": ci_level, "unit": "patient", "seed": seed},
        **_mean_std(per_fold),
        "n_slides": len(table),
        "skipped": sorted(skipped),
        # why each skipped slide has no patches, as tiling recorded it
        "skipped_reasons": {sid: read_store_attrs(Path(features_dir) / f"{sid}.zarr").get(
            "skipped", "no patches") for sid in sorted(skipped)},
        # slides of any part of any fold left out after a failure (exclude_failed_slides)
        **_excluded(features_dir, splits),
    }
    logs = attention_logs(models_dir, n_folds)
    if logs:
        metrics["attention_last_epoch"] = {
            f"fold_{k}": last_summary(record) for k, record in logs.items()}
    write_text(out_dir / "predictions.csv", table.to_csv(index=False))
    write_json(out_dir / "metrics.json", metrics)
    plot_roc(table, classes, out_dir / "roc.png", title=f"ROC: {model_name}")
    plot_confusion(y_all, p_all, classes, out_dir / "confusion.png")
    plot_training_curves([models_dir / f"fold_{k}.csv" for k in range(n_folds)],
                         out_dir / "training_curves.png")
    plot_attention_diagnostics({model_name: list(logs.values())},
                               out_dir / "attention_diagnostics.png")
    if tiles_dir is not None:
        # Slides known by their feature file alone have no image to draw on.
        with_file = set(samples.loc[samples["path"] != "", "slide_id"])
        drawable = table[table["slide_id"].isin(with_file)] if len(table) else table
        shown = drawable if max_heatmaps is None else _heatmap_selection(drawable, max_heatmaps)
        if not model_info(model_name).attention:  # mean pooling: uniform, an empty folder
            shown = shown.iloc[:0]
        write_heatmaps(shown, attention, samples, tiles_dir, out_dir / "heatmaps", model_name,
                       classes, top_patches, heatmap_px)
    return metrics


def _predict_folds(model_name: str, models_dir: Path, splits: dict, samples: pd.DataFrame,
                   features_dir: str | os.PathLike, graphs_dir: str | os.PathLike, device: str,
                   exclude_failed: bool, n_bootstrap: int, ci_level: float,
                   seed: int) -> tuple[list[dict], list[dict], list[str], dict[str, Any]]:
    """Each fold's model on its test slides: the prediction rows of all folds, each fold's
    metrics with bootstrap intervals, the slides without patches, and the attention."""
    classes = list(splits["classes"])
    predictions, per_fold, skipped, attention = [], [], [], {}
    for k, membership in enumerate(splits["folds"]):
        rows, empty, fold_attention = _predict_fold(
            model_name, models_dir / f"fold_{k}.pt", k, membership, classes, samples,
            features_dir, graphs_dir, device, exclude_failed)
        table = pd.DataFrame(rows)
        y, probs = labels_and_probs(table, classes)
        groups = table["patient_id"].tolist() if len(table) else None
        per_fold.append({"fold": k, "n_slides": len(rows),
                         **classification_metrics(y, probs, len(classes)),
                         "ci": bootstrap_intervals(y, probs, len(classes), groups,
                                                   n_bootstrap, ci_level, seed + k)})
        predictions += rows
        skipped += empty
        attention.update(fold_attention)
    return predictions, per_fold, skipped, attention


def _excluded(features_dir: str | os.PathLike, splits: dict) -> dict[str, Any]:
    slide_ids = [s for fold in splits["folds"] for part in ("train", "val", "test")
                 for s in fold.get(part, [])]
    reasons = excluded_slides(features_dir, slide_ids)
    return {"excluded": sorted(reasons), "excluded_reasons": reasons}


def _heatmap_selection(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """At most n slides: the first of each class by slide id, then the second, and so on."""
    if table.empty:
        return table
    ordered = table.sort_values("slide_id")
    turn = ordered.groupby("label").cumcount()
    return ordered.assign(_turn=turn).sort_values(["_turn", "label"]).head(n).drop(
        columns="_turn")


def _predict_fold(model_name: str, pt_path: Path, fold: int, membership: dict,
                  classes: list[str], samples: pd.DataFrame, features_dir: str | os.PathLike,
                  graphs_dir: str | os.PathLike, device: str, exclude_failed: bool = False
                  ) -> tuple[list[dict[str, Any]], list[str], dict[str, np.ndarray]]:
    """Prediction rows for the fold's test slides, the ids of those skipped as empty, and each
    slide's attention (excluded slides are left out: `_excluded` lists them)."""
    from srmil.mil.train import resolve_device

    if not pt_path.is_file():
        raise InputError(f"{pt_path}: model of fold {fold} not found; run the train step")
    dev = resolve_device(device)
    model, meta = load_model(pt_path, device=dev)
    _check_model_matches(meta, model_name, classes, membership, pt_path)
    bags = [load_bag(features_dir, graphs_dir, sid, exclude_failed) for sid in membership["test"]]
    bags = [b for b in bags if not b.excluded]
    empty = [b.slide_id for b in bags if len(b) == 0]
    for slide_id in empty:
        log.warning("slide %s has no patches; skipped", slide_id)
    bags = [b for b in bags if len(b) > 0]
    probs, attention = predict_bags(model, bags, dev)
    rows = _prediction_rows(bags, probs, attention, fold, classes, samples.set_index("slide_id"))
    return rows, empty, {b.slide_id: a for b, a in zip(bags, attention, strict=True)}


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


def _mean_std(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and population standard deviation over folds; folds where a metric is None are left
    out."""
    mean, std = {}, {}
    for name in METRICS:
        values = [f[name] for f in per_fold if f[name] is not None]
        mean[name] = float(np.mean(values)) if values else None
        std[name] = float(np.std(values)) if values else None
    return {"mean": mean, "std": std}
