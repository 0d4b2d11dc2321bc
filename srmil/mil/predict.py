"""Predict new slides with a trained model's folds: the fold ensemble (the mean of the folds'
class probabilities) on the new slides' feature and graph stores, which the workflow's predict
target makes with the cohort's own stage rules (`srmil predict` runs it: srmil.workflow).

The features must come from the extractor recorded in the model's provenance (the same name and
the same weights), and the graphs from the same graph parameters (`window`, `radius_cells`,
`self_loops`); anything else is refused and nothing is written, because a classifier applied to
another feature space or another neighbourhood returns confident nonsense. A slide without
patches gets a row with no probabilities and the reason in its `skipped` column.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from srmil.mil.bags import load_bag
from srmil.mil.provenance import (
    PredictError,
    check_extractor,
    check_graph,
    check_store,
    model_features,
    model_graph,
)
from srmil.store import fold_checkpoints, write_text

log = logging.getLogger(__name__)


def load_ensemble(models_dir: str | os.PathLike,
                  device: str | torch.device = "cpu") -> tuple[list[torch.nn.Module],
                                                              list[dict[str, Any]]]:
    """Every `fold_{k}.pt` of `models_dir` in fold order, with its metadata; the folds must be
    one model on one set of classes and one extractor."""
    from srmil.mil.inference import load_model

    paths = fold_checkpoints(models_dir)
    models, metas = [], []
    for path in paths:
        model, meta = load_model(path, device=device)
        models.append(model)
        metas.append(meta)
    first = metas[0]
    for path, meta in zip(paths[1:], metas[1:], strict=True):
        if (meta["model"], meta["classes"], model_features(meta).weights_hash,
                model_graph(meta)) != (first["model"], first["classes"],
                                       model_features(first).weights_hash, model_graph(first)):
            raise PredictError(f"{path}: a different model, classes, extractor or graph than "
                               f"{paths[0].name}; retrain all folds of {models_dir} together")
    return models, metas


@torch.no_grad()
def predict_slides(samples: pd.DataFrame, models_dir: str | os.PathLike,
                   features_dir: str | os.PathLike, graphs_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, extractor: str | None = None,
                   device: str = "auto", threads: int | None = None,
                   tiles_dir: str | os.PathLike | None = None, top_patches: int = 8,
                   heatmap_px: int = 1024, exclude_failed: bool = False) -> pd.DataFrame:
    """Fold-ensemble predictions of every slide in `samples` from its feature and graph stores;
    writes `out_dir`/predictions.csv and, with `tiles_dir`, heatmaps/{slide}.png of the
    ensemble's mean attention.

    Columns: slide_id, patient_id, label (when the sheet has labels), prob_{class} (the mean over
    folds), prediction, n_models, attention_max, prob_{class}_fold{k} (each fold's), skipped
    (empty, or why a slide without patches has no prediction: its row has no probabilities and
    n_models 0). Every slide of `samples` has a row, in the sheet's order. With
    `exclude_failed`, a slide excluded after a failure (srmil.cohort.exclusion) gets such a row too
    (`skipped`: "excluded: <reason>"); without it, it is refused.
    """
    from srmil.device import torch_threads
    from srmil.mil.inference import predict_bags
    from srmil.mil.train import resolve_device
    from srmil.report.heatmaps import write_heatmaps

    dev = resolve_device(device)
    out_dir = Path(out_dir)
    with torch_threads(threads):
        models, metas = load_ensemble(models_dir, dev)
        check_extractor(metas[0], extractor, models_dir)
        classes = list(metas[0]["classes"])
        folds = [int(m.get("fold", k)) for k, m in enumerate(metas)]
        rows, attention = [], {}
        for sample in samples.itertuples(index=False):
            bag = load_bag(features_dir, graphs_dir, sample.slide_id, exclude_failed)
            row = {"slide_id": sample.slide_id, "patient_id": sample.patient_id}
            label = str(getattr(sample, "label", "") or "")
            if label:
                row["label"] = label
            if bag.excluded:
                log.warning("slide %s excluded (%s); no prediction", sample.slide_id,
                            bag.excluded)
                rows.append({**row, "n_models": 0, "skipped": f"excluded: {bag.excluded}"})
                continue
            check_store(metas[0], bag.attrs, Path(features_dir) / f"{sample.slide_id}.zarr",
                        models_dir)
            check_graph(metas[0], bag.graph_attrs, Path(graphs_dir) / f"{sample.slide_id}.zarr",
                        models_dir)
            if len(bag) == 0:
                # Recorded, not dropped: the reason tiling gave travels with the feature store.
                reason = str(bag.provenance.skipped or "no patches")
                log.warning("slide %s has no patches (%s); no prediction", sample.slide_id,
                            reason)
                rows.append({**row, "n_models": 0, "skipped": reason})
                continue
            per_fold, weights = [], []
            for model in models:
                probs, att = predict_bags(model, [bag], dev)
                per_fold.append(probs[0])
                weights.append(att[0])
            mean = np.mean(per_fold, axis=0)
            attention[sample.slide_id] = np.mean(weights, axis=0)
            row.update({f"prob_{c}": float(v) for c, v in zip(classes, mean, strict=True)})
            row["prediction"] = classes[int(np.argmax(mean))]
            row["n_models"] = len(models)
            row["attention_max"] = float(attention[sample.slide_id].max())
            for k, probs in zip(folds, per_fold, strict=True):
                row.update({f"prob_{c}_fold{k}": float(v)
                            for c, v in zip(classes, probs, strict=True)})
            row["skipped"] = ""
            rows.append(row)
    table = pd.DataFrame(rows, columns=_prediction_columns(rows, classes, folds))
    for column in ("label", "prediction", "skipped"):
        if column in table.columns:
            table[column] = table[column].fillna("")
    write_text(out_dir / "predictions.csv", table.to_csv(index=False))
    if tiles_dir is not None:
        write_heatmaps(table[table["skipped"] == ""], attention, samples, tiles_dir,
                       out_dir / "heatmaps",
                       f"{metas[0]['model']} ({len(models)}-fold ensemble)", classes,
                       top_patches, heatmap_px)
    return table


def _prediction_columns(rows: list[dict[str, Any]], classes: list[str],
                        folds: list[int]) -> list[str]:
    label = ["label"] if any("label" in row for row in rows) else []
    return ["slide_id", "patient_id", *label, *(f"prob_{c}" for c in classes), "prediction",
            "n_models", "attention_max",
            *(f"prob_{c}_fold{k}" for k in folds for c in classes), "skipped"]


