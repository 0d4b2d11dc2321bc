"""What a trained model was made from, and whether new inputs fit it: the model's feature
extractor, tiling and graph as its files record them, checked against a config's settings (before
any slide is read), against feature stores and against graph stores (before a model predicts).

No torch here: the workflow checks `snakemake predict`'s settings while it parses.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from srmil.errors import InputError
from srmil.store import FeatureProvenance, fold_checkpoints, read_json

# The graph store attributes that say how edges were built (not per-slide counts or strides):
# a model is tied to them as to its feature extractor.
GRAPH_PARAM_KEYS = ("window", "radius_cells", "self_loops")


class PredictError(InputError):
    """A model, extractor or store that does not fit; one line naming the file and the fix."""


def first_model_meta(models_dir: str | os.PathLike) -> dict[str, Any]:
    """The metadata (JSON beside the checkpoint) of the first fold model; no model is loaded."""
    return read_json(fold_checkpoints(models_dir)[0].with_suffix(".json"))


def model_features(meta: dict[str, Any]) -> FeatureProvenance:
    """The model's feature provenance as its file records it (empty for a model without)."""
    return FeatureProvenance.from_attrs((meta.get("provenance") or {}).get("features") or {})


def model_graph(meta: dict[str, Any]) -> dict[str, Any]:
    """The graph parameters the model was trained on ({} for models that predate them)."""
    return dict((meta.get("provenance") or {}).get("graph") or {})


def model_extractor(meta: dict[str, Any],
                    models_dir: str | os.PathLike = "") -> FeatureProvenance:
    """The model's feature provenance (extractor, backbone, weights_hash, mpp, patch_px, ...)."""
    features = model_features(meta)
    if features.weights_hash is None:
        raise PredictError(f"{models_dir}: the model records no feature extractor in its "
                           "provenance; retrain it with this version of srmil")
    return features


def check_extractor(meta: dict[str, Any], extractor: str | None,
                    models_dir: str | os.PathLike) -> str:
    """The extractor name to use: `extractor` if it is the model's, else a PredictError."""
    name = model_extractor(meta, models_dir).extractor
    if extractor is not None and name is not None and extractor != name:
        raise PredictError(
            f"{models_dir}: the model was trained on features from extractor {name!r}, not "
            f"{extractor!r}; predict with extractor {name!r} or pick a model trained on "
            f"{extractor!r} (predict.extractor in config.yaml, --extractor on the command line)")
    return extractor or name


def check_settings(meta: dict[str, Any], models_dir: str | os.PathLike, extractor: str,
                   backbone: dict[str, Any], tile: dict[str, Any],
                   window: int | None) -> None:
    """Refuse settings that would make features or graphs the model was not trained on: the
    extractor's backbone (`backbone`, a backbone spec: another model, pretrained switch, options
    or pooling; the weights themselves are compared by hash once they are loaded), the tiling
    (`tile`: target_mpp, patch_px, stride_px) or the graph window. Each refusal names the key
    and the value that fits."""
    from srmil.settings import BackboneSpec, section_from_dict

    trained = model_extractor(meta, models_dir)
    spec = trained.backbone if isinstance(trained.backbone, dict) else {}  # {}: not recorded
    # As the workflow reads it: a config's spec may leave defaults out (kwargs, pool).
    backbone = section_from_dict(BackboneSpec, backbone, f"backbones.{extractor}").model_dump()

    def pretrained(s: dict[str, Any]) -> bool:  # null means: published weights unless a file
        value = s.get("pretrained")
        return bool(value if value is not None else not s.get("weights"))

    differ = [k for k in ("model", "kwargs", "pool") if k in spec and backbone.get(k) != spec[k]]
    if spec and pretrained(backbone) != pretrained(spec):
        differ.append("pretrained")
    if differ:
        raise PredictError(
            f"backbones.{extractor}: {_format(backbone, differ, missing='unset')}, but the "
            f"model in {models_dir} was trained on {_format(spec, differ, missing='unset')}; "
            "use the backbone the model was trained on")
    for key, value in (("target_mpp", trained.mpp), ("patch_px", trained.patch_px),
                       ("stride_px", trained.stride_px)):
        if value is not None and tile.get(key) is not None and not _same_value(tile[key], value):
            raise PredictError(f"tile.{key}: {tile[key]} in the config, but the model in "
                               f"{models_dir} was trained on {value}; set tile.{key}: {value}")
    trained_window = model_graph(meta).get("window")
    if trained_window is not None and window is not None and int(window) != int(trained_window):
        raise PredictError(f"graph.window={window} in the config, but the model in {models_dir} "
                           f"was trained on graphs with window={trained_window}; set "
                           f"graph.window: {trained_window}")


def check_store(meta: dict[str, Any], attrs: dict[str, Any], store: str | os.PathLike,
                models_dir: str | os.PathLike) -> None:
    """Refuse a feature store made by another extractor (name or weights) or tiling."""
    trained = model_extractor(meta, models_dir)
    made = FeatureProvenance.from_attrs(attrs)
    if made.weights_hash != trained.weights_hash or (
            trained.extractor and made.extractor != trained.extractor):
        raise PredictError(
            f"{store}: features from extractor {made.extractor!r} (weights "
            f"{str(made.weights_hash)[:12]}), but the model in {models_dir} was trained "
            f"on {trained.extractor!r} (weights {trained.weights_hash[:12]}); extract "
            "the features with the model's extractor")
    for key in FeatureProvenance.TILE_KEYS:
        value, expected = getattr(made, key), getattr(trained, key)
        if value is not None and expected is not None and not np.isclose(float(value),
                                                                          float(expected)):
            raise PredictError(
                f"{store}: tiles with {key}={value}, but the model in {models_dir} was "
                f"trained with {key}={expected}; tile the slides with the model's settings")


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


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    return bool(np.isclose(float(a), float(b)))


def _format(params: dict[str, Any], keys: list[str], missing: str = "") -> str:
    return ", ".join(f"{k}={params.get(k, missing)}" for k in keys)


def graph_params(graph_attrs: dict[str, Any]) -> dict[str, Any]:
    """The graph-building parameters among a graph store's attributes."""
    return {k: graph_attrs[k] for k in GRAPH_PARAM_KEYS if k in graph_attrs}
