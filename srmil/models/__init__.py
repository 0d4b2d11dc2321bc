"""MIL models: SRMIL (spatially regularised, graph attention) and the gated ABMIL baseline.

One front door, `build_model(name, in_dim, n_classes, hparams)`; every model takes one bag:

    model(x, edge_index) -> MILOutput(logits (C,), attention (N,))      # nothing masked
    model.training_loss(x, edge_index, label) -> (loss, {part: float})  # what to backpropagate
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from torch import nn

from srmil.models.abmil import ABMIL, ABMILConfig
from srmil.models.base import MILOutput
from srmil.models.srmil import SRMIL, SRMILConfig

__all__ = ["MODEL_NAMES", "MILOutput", "SRMIL", "SRMILConfig", "ABMIL", "ABMILConfig",
           "default_hparams", "build_model"]

MODEL_NAMES = ("srmil", "abmil")
_REGISTRY: dict[str, tuple[type, type]] = {
    "srmil": (SRMIL, SRMILConfig),
    "abmil": (ABMIL, ABMILConfig),
}


def _lookup(name: str) -> tuple[type, type]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name]


def default_hparams(name: str) -> dict[str, Any]:
    """The model's hyper-parameters with their (reference) defaults, as a JSON-able dict."""
    return asdict(_lookup(name)[1]())


def build_model(name: str, in_dim: int, n_classes: int,
                hparams: dict[str, Any] | None = None) -> nn.Module:
    """Build a model for bags of `in_dim`-dim features and `n_classes` >= 2 classes.

    `hparams` overrides `default_hparams(name)`; an unknown key raises ValueError naming it.
    The model keeps its hyper-parameters as the dataclass `model.config`.
    """
    model_cls, config_cls = _lookup(name)
    known = {f.name for f in fields(config_cls)}
    for key in hparams or {}:
        if key not in known:
            raise ValueError(f"unknown hyper-parameter {key!r} for model {name!r}; "
                             f"known: {', '.join(sorted(known))}")
    return model_cls(int(in_dim), int(n_classes), config_cls(**(hparams or {})))
