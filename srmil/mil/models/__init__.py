"""MIL models: SRMIL, its ablations and the baselines it is compared with.

One front door, `build_model(name, in_dim, n_classes, hparams)` over the catalogue in
`srmil.mil.catalog` (names, citations, reference code, defaults); one file per model family. Every
model takes one bag:

    model(x, edge_index) -> MILOutput(logits (C,), attention (N,))      # nothing masked
    model.training_loss(x, edge_index, label) -> (loss, {part: float})  # what to backpropagate

A model may also define `clip_gradients()`, which the trainer calls between the backward pass
and the optimiser step (DTFD-MIL clips each module's gradient).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from torch import nn

from srmil.mil.catalog import MODEL_NAMES, model_info
from srmil.mil.models.abmil import ABMIL, ABMILConfig
from srmil.mil.models.base import MILOutput
from srmil.mil.models.clam import CLAMSB, CLAMConfig
from srmil.mil.models.dsmil import DSMIL, DSMILConfig
from srmil.mil.models.dtfd import DTFD, DTFDConfig
from srmil.mil.models.patchgcn import PatchGCN, PatchGCNConfig
from srmil.mil.models.pooling import PoolingConfig, PoolingMIL
from srmil.mil.models.srmil import SRMIL, SRMILConfig
from srmil.mil.models.transmil import TransMIL, TransMILConfig

__all__ = ["MODEL_NAMES", "MILOutput", "SRMIL", "SRMILConfig", "ABMIL", "ABMILConfig",
           "default_hparams", "build_model"]

# Model family (srmil.mil.catalog.ModelInfo.family) -> (module, its hyper-parameter dataclass).
FAMILIES: dict[str, tuple[type, type]] = {
    "srmil": (SRMIL, SRMILConfig),
    "abmil": (ABMIL, ABMILConfig),
    "pooling": (PoolingMIL, PoolingConfig),
    "clam": (CLAMSB, CLAMConfig),
    "dsmil": (DSMIL, DSMILConfig),
    "transmil": (TransMIL, TransMILConfig),
    "patchgcn": (PatchGCN, PatchGCNConfig),
    "dtfd": (DTFD, DTFDConfig),
}


def _lookup(name: str) -> tuple[type, type, dict[str, Any]]:
    info = model_info(name)
    model_cls, config_cls = FAMILIES[info.family]
    return model_cls, config_cls, info.hparams


def default_hparams(name: str) -> dict[str, Any]:
    """The model's hyper-parameters with their (reference) defaults, as a JSON-able dict; a
    variant's are its family's with the variant's settings."""
    _, config_cls, fixed = _lookup(name)
    return asdict(config_cls(**fixed))


def build_model(name: str, in_dim: int, n_classes: int,
                hparams: dict[str, Any] | None = None) -> nn.Module:
    """Build a model for bags of `in_dim`-dim features and `n_classes` >= 2 classes.

    `hparams` overrides `default_hparams(name)`; an unknown key raises ValueError naming it.
    The model keeps its hyper-parameters as the dataclass `model.config`.
    """
    model_cls, config_cls, fixed = _lookup(name)
    known = {f.name for f in fields(config_cls)}
    for key in hparams or {}:
        if key not in known:
            raise ValueError(f"unknown hyper-parameter {key!r} for model {name!r}; "
                             f"known: {', '.join(sorted(known))}")
    return model_cls(int(in_dim), int(n_classes), config_cls(**{**fixed, **(hparams or {})}))
