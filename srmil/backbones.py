"""Feature extractors: one front door from a spec to a timm model and its preprocessing.

A spec names a timm model (`resnet18`), a Hugging Face hub model (`hf-hub:org/name`, resolved
from the local cache when offline), or either of those plus a local weights file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from srmil.errors import InputError

# Classifier parameters a checkpoint may carry that a feature extractor (num_classes=0) lacks.
HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.", "last_linear.")
# Wrappers that training frameworks put around a state dict or its keys.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "teacher")
KEY_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


class BackboneError(InputError):
    """A backbone that cannot be built or loaded, phrased as one line naming the fix."""


@dataclass
class BackboneSpec:
    model: str  # timm name, or "hf-hub:org/name"
    pretrained: bool = False  # load the weights timm/hub knows for `model`
    weights: str | None = None  # local checkpoint (.pth/.pt/.bin/.safetensors) instead
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class Backbone:
    model: torch.nn.Module
    spec: BackboneSpec
    feature_dim: int
    data_config: dict[str, Any]  # input_size, mean, std, interpolation (from timm)
    weights_hash: str  # sha256 of the loaded parameters


def load_backbone(spec: BackboneSpec | dict[str, Any], seed: int = 0) -> Backbone:
    """Build the model with no classifier head, in eval mode, with its preprocessing config."""
    if isinstance(spec, dict):
        spec = BackboneSpec(**spec)
    if spec.pretrained and spec.weights:
        raise BackboneError(
            f"backbone {spec.model}: set either pretrained: true or weights: PATH, not both"
        )
    torch.manual_seed(seed)  # random initialisation (pretrained: false) is reproducible
    try:
        model = timm.create_model(
            spec.model, pretrained=spec.pretrained, num_classes=0, **spec.kwargs
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(
                f"backbone {spec.model!r}: unknown to timm; use a name from "
                "timm.list_models() or 'hf-hub:org/name'"
            ) from err
        raise
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"backbone {spec.model!r}: weights not available offline ({err}); "
            "put them in the Hugging Face cache or set weights: PATH"
        ) from err
    if spec.weights:
        load_weights(model, spec.weights, spec.model)
    model.eval()
    data_config = timm.data.resolve_data_config({}, model=model)
    return Backbone(
        model=model,
        spec=spec,
        feature_dim=int(model.num_features),
        data_config=dict(data_config),
        weights_hash=state_dict_hash(model),
    )


def load_weights(model: torch.nn.Module, path: str | os.PathLike, model_name: str) -> None:
    """Load a local checkpoint without unpickling objects; strict apart from the classifier."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"{path}: weights file not found; fix 'weights' of backbone {model_name} in config.yaml"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
            raise BackboneError(
                f"{path}: not a loadable tensor checkpoint ({err}); save a plain state dict"
            ) from err
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {_strip(k): v for k, v in state.items() if torch.is_tensor(v)}
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if keys
        )
        raise BackboneError(
            f"{path}: checkpoint does not match {model_name} ({detail}); set the "
            "model name these weights were trained with"
        )
    model.load_state_dict(state, strict=True)


def _strip(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 of parameter names and bytes: names the weights whatever file they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def spec_dict(spec: BackboneSpec) -> dict[str, Any]:
    return asdict(spec)
