"""Predict new slides with a trained model's folds: the same segmentation, tiling, features and
graph as in training, then the fold ensemble (the mean of the folds' class probabilities).

The features must come from the extractor recorded in the model's provenance (the same name and
the same weights), and the graphs from the same graph parameters (`window`, `radius_cells`,
`self_loops`); anything else is refused and nothing is written, because a classifier applied to
another feature space or another neighbourhood returns confident nonsense. A slide without
patches gets a row with no probabilities and the reason in its `skipped` column.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from srmil.errors import InputError
from srmil.mil.bags import graph_params, load_bag
from srmil.store import write_text

log = logging.getLogger(__name__)

FOLD_FILE = re.compile(r"^fold_(\d+)\.pt$")
# Tiling settings the features depend on; they must match the model's.
TILE_KEYS = (("mpp", "target_mpp"), ("patch_px", "patch_px"), ("stride_px", "stride_px"))


class PredictError(InputError):
    """A model, extractor or store that does not fit; one line naming the file and the fix."""


def load_ensemble(models_dir: str | os.PathLike,
                  device: str | torch.device = "cpu") -> tuple[list[torch.nn.Module],
                                                              list[dict[str, Any]]]:
    """Every `fold_{k}.pt` of `models_dir` in fold order, with its metadata; the folds must be
    one model on one set of classes and one extractor."""
    from srmil.mil.inference import load_model

    models_dir = Path(models_dir)
    paths = sorted((p for p in models_dir.glob("fold_*.pt") if FOLD_FILE.match(p.name)),
                   key=lambda p: int(FOLD_FILE.match(p.name).group(1)))
    if not paths:
        raise PredictError(f"{models_dir}: no fold_*.pt models; train them first or fix "
                           "predict.model / predict.extractor in config.yaml")
    models, metas = [], []
    for path in paths:
        model, meta = load_model(path, device=device)
        models.append(model)
        metas.append(meta)
    first = metas[0]
    for path, meta in zip(paths[1:], metas[1:], strict=True):
        if (meta["model"], meta["classes"], _features(meta).get("weights_hash"),
                model_graph(meta)) != (first["model"], first["classes"],
                                       _features(first).get("weights_hash"), model_graph(first)):
            raise PredictError(f"{path}: a different model, classes, extractor or graph than "
                               f"{paths[0].name}; retrain all folds of {models_dir} together")
    return models, metas


def _features(meta: dict[str, Any]) -> dict[str, Any]:
    return (meta.get("provenance") or {}).get("features") or {}


def model_graph(meta: dict[str, Any]) -> dict[str, Any]:
    """The graph parameters the model was trained on ({} for models that predate them)."""
    return dict((meta.get("provenance") or {}).get("graph") or {})


def model_extractor(meta: dict[str, Any], models_dir: str | os.PathLike = "") -> dict[str, Any]:
    """The model's feature provenance (extractor, backbone, weights_hash, mpp, patch_px, ...)."""
    features = _features(meta)
    if "weights_hash" not in features:
        raise PredictError(f"{models_dir}: the model records no feature extractor in its "
                           "provenance; retrain it with this version of srmil")
    return features


def check_extractor(meta: dict[str, Any], extractor: str | None,
                    models_dir: str | os.PathLike) -> str:
    """The extractor name to use: `extractor` if it is the model's, else a PredictError."""
    trained = model_extractor(meta, models_dir)
    name = trained.get("extractor")
    if extractor is not None and name is not None and extractor != name:
        raise PredictError(
            f"{models_dir}: the model was trained on features from extractor {name!r}, not "
            f"{extractor!r}; predict with extractor {name!r} or pick a model trained on "
            f"{extractor!r} (predict.extractor in config.yaml, --extractor on the command line)")
    return extractor or name


def check_store(meta: dict[str, Any], attrs: dict[str, Any], store: str | os.PathLike,
                models_dir: str | os.PathLike) -> None:
    """Refuse a feature store made by another extractor (name or weights) or tiling."""
    trained = model_extractor(meta, models_dir)
    if attrs.get("weights_hash") != trained["weights_hash"] or (
            trained.get("extractor") and attrs.get("extractor") != trained["extractor"]):
        raise PredictError(
            f"{store}: features from extractor {attrs.get('extractor')!r} (weights "
            f"{str(attrs.get('weights_hash'))[:12]}), but the model in {models_dir} was trained "
            f"on {trained.get('extractor')!r} (weights {trained['weights_hash'][:12]}); extract "
            "the features with the model's extractor")
    for key, _ in TILE_KEYS:
        if key in trained and key in attrs and not np.isclose(float(attrs[key]),
                                                               float(trained[key])):
            raise PredictError(
                f"{store}: tiles with {key}={attrs[key]}, but the model in {models_dir} was "
                f"trained with {key}={trained[key]}; tile the slides with the model's settings")


def check_graph(meta: dict[str, Any], graph_attrs: dict[str, Any], store: str | os.PathLike,
                models_dir: str | os.PathLike) -> None:
    """Refuse a graph store built with other parameters than the model's training graphs."""
    trained, built = model_graph(meta), graph_params(graph_attrs)
    differ = [k for k in trained if k in built and not _same_value(built[k], trained[k])]
    if differ:
        raise PredictError(
            f"{store}: graph built with {_format(built, differ)}, but the model in {models_dir} "
            f"was trained on graphs with {_format(trained, differ)}; rebuild the graphs with "
            f"the model's settings (graph.window: {trained.get('window')} in config.yaml)")


def graph_window(meta: dict[str, Any], settings: dict[str, Any],
                 models_dir: str | os.PathLike) -> int:
    """The window to build new slides' graphs with: the model's; a config asking for another
    window is refused (models that predate graph provenance take the config's, default 2)."""
    trained = model_graph(meta).get("window")
    configured = (settings.get("graph") or {}).get("window")
    if trained is None:
        return int(configured if configured is not None else 2)
    if configured is not None and int(configured) != int(trained):
        raise PredictError(
            f"graph.window={configured} in the config, but the model in {models_dir} was trained "
            f"on graphs with window={trained}; set graph.window: {trained} or pick a model "
            f"trained with window {configured}")
    return int(trained)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    return bool(np.isclose(float(a), float(b)))


def _format(params: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={params[k]}" for k in keys)


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
                reason = str(bag.attrs.get("skipped") or "no patches")
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


def prepare_slides(samples: pd.DataFrame, meta: dict[str, Any], work_dir: str | os.PathLike,
                   settings: dict[str, Any] | None = None, extractor: str | None = None,
                   models_dir: str | os.PathLike = "", seed: int = 0) -> dict[str, Path]:
    """Segment, tile, extract features and build graphs for every slide of `samples` under
    `work_dir` (segment/, tiles/, features/, graphs/), as the workflow's stages do.

    `settings` holds config.yaml sections (`segment`, `tile`, `backbones`, `features`, `graph`,
    `mpp_fallback`); missing ones take the stage defaults, and the tiling and backbone default
    to the model's provenance. Graphs are built with the model's graph parameters. The backbone
    and the graph window are checked against the model before any slide is read. Returns the
    folders.
    """
    from srmil.cohort.samples import segment_overrides
    from srmil.features.backbones import load_backbone
    from srmil.features.extract import extract_features
    from srmil.graph import build_graph
    from srmil.wsi.segment import params_from_dict as segment_params
    from srmil.wsi.segment import segment_slide
    from srmil.wsi.tiling import params_from_dict as tile_params
    from srmil.wsi.tiling import tile_slide

    settings = settings or {}
    trained = model_extractor(meta, models_dir)
    name = check_extractor(meta, extractor, models_dir)
    window = graph_window(meta, settings, models_dir)
    spec = (settings.get("backbones") or {}).get(name) or trained.get("backbone")
    if not isinstance(spec, dict):
        raise PredictError(f"{models_dir}: extractor {name!r} is neither under 'backbones' in "
                           "the config nor recorded in the model; add it to the config")
    backbone = load_backbone(spec, seed=seed)
    if backbone.weights_hash != trained["weights_hash"]:
        raise PredictError(
            f"backbone {spec.get('model')!r} (extractor {name!r}) has weights "
            f"{backbone.weights_hash[:12]}, but the model in {models_dir} was trained on "
            f"weights {trained['weights_hash'][:12]}; use the backbone the model was trained on")
    tile = {key: trained[pkey] for pkey, key in TILE_KEYS if trained.get(pkey) is not None}
    tile.update(settings.get("tile") or {})
    feature_settings = _accepted(extract_features, settings.get("features") or {})
    fallback = settings.get("mpp_fallback")

    work = Path(work_dir)
    dirs = {name_: work / name_ for name_ in ("segment", "tiles", "features", "graphs")}
    for _, sample in samples.iterrows():
        sid = sample.slide_id
        mpp = None if pd.isna(sample.mpp) else float(sample.mpp)
        log.info("predict: preparing %s", sid)
        # config.yaml's segment section with the sheet's per-slide segment_<key> overrides
        segment = {**(settings.get("segment") or {}), **segment_overrides(sample)}
        segment_slide(sample.path, dirs["segment"] / f"{sid}.geojson",
                      dirs["segment"] / f"{sid}.qc.png", segment_params(segment),
                      annotation=sample.annotation or None, mpp_override=mpp,
                      mpp_fallback=fallback)
        tile_slide(sample.path, dirs["segment"] / f"{sid}.geojson",
                   dirs["tiles"] / f"{sid}.json", tile_params(tile), mpp_override=mpp,
                   mpp_fallback=fallback)
        extract_features(sample.path, dirs["tiles"] / f"{sid}.json",
                         dirs["features"] / f"{sid}.zarr", backbone, extractor=name,
                         **feature_settings)
        build_graph(dirs["tiles"] / f"{sid}.json", dirs["graphs"] / f"{sid}.zarr",
                    window=window)
    return dirs


def _accepted(function: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of a config section that `function` takes as keyword arguments."""
    params = inspect.signature(function).parameters
    skip = {"slide_path", "tiles_path", "out_path", "backbone", "extractor"}
    return {k: v for k, v in values.items() if k in params and k not in skip}


def run_predict(samples_path: str | os.PathLike, models_dir: str | os.PathLike,
                out_dir: str | os.PathLike, settings: dict[str, Any] | None = None,
                extractor: str | None = None, device: str = "auto", threads: int | None = None,
                heatmaps: bool = True, top_patches: int = 8, heatmap_px: int = 1024,
                seed: int = 0) -> pd.DataFrame:
    """The whole chain for a sample sheet (labels optional): stores under `out_dir`/work, then
    `out_dir`/predictions.csv and heatmaps/."""
    from srmil.cohort.samples import read_sample_sheet
    from srmil.mil.inference import load_model

    samples = read_sample_sheet(samples_path, require_labels=False)
    first = _first_model(models_dir)
    _, meta = load_model(first, device="cpu")
    check_extractor(meta, extractor, models_dir)
    dirs = prepare_slides(samples, meta, Path(out_dir) / "work", settings, extractor,
                          models_dir, seed)
    return predict_slides(samples, models_dir, dirs["features"], dirs["graphs"], out_dir,
                          extractor, device, threads, dirs["tiles"] if heatmaps else None,
                          top_patches, heatmap_px)


def _first_model(models_dir: str | os.PathLike) -> Path:
    paths = sorted(p for p in Path(models_dir).glob("fold_*.pt") if FOLD_FILE.match(p.name))
    if not paths:
        raise PredictError(f"{models_dir}: no fold_*.pt models; train them first or fix "
                           "predict.model / predict.extractor in config.yaml")
    return paths[0]
