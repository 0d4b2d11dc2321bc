"""Feature extractors: one front door from a spec to a model and its preprocessing.

A spec names a timm model (`resnet50.tv_in1k`), a Hugging Face hub model (`hf-hub:org/name`,
always resolved from the local cache, never downloaded here), or a named preset
(`clam_resnet50_trunc`); weights come from timm/the hub cache (`pretrained: true`), a local
checkpoint file (`weights: PATH`), or a seeded random initialisation (`pretrained: false`, only
when stated).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from srmil.errors import InputError
from srmil.settings import BackboneSpec, section_from_dict

# Classifier parameters a checkpoint may carry that a feature extractor (num_classes=0) lacks.
HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.", "last_linear.")
# Wrappers that training frameworks put around a state dict or its keys.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "teacher")
KEY_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
HF_PREFIX = "hf-hub:"
# kwargs values naming a layer class (Virchow2 needs mlp_layer/act_layer), e.g. "torch.nn.SiLU".
IMPORTABLE = re.compile(r"^(timm|torch)(\.\w+)+$")


class BackboneError(InputError):
    """A backbone that cannot be built or loaded, phrased as one line naming the fix."""


@dataclass
class Backbone:
    model: torch.nn.Module
    spec: BackboneSpec
    feature_dim: int
    data_config: dict[str, Any]  # input_size, mean, std, interpolation, crop_pct (from timm)
    weights_hash: str  # sha256 of the loaded parameters


class TruncatedResNet(torch.nn.Module):
    """A timm ResNet up to layer3, global average pooled: CLAM's 1024-d ResNet50 features.

    Submodules keep timm's names, so a full ResNet checkpoint maps onto it minus layer4/fc.
    """

    def __init__(self, resnet: torch.nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, name, getattr(resnet, name))
        self.num_features = int(self.layer3[-1].conv3.out_channels)
        self.pretrained_cfg = dict(resnet.pretrained_cfg)  # preprocessing of the base weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


class TokenPool(torch.nn.Module):
    """Class token concatenated with the mean patch token (the model's head returns tokens)."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit
        self.prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.num_features = 2 * int(vit.num_features)
        self.pretrained_cfg = dict(vit.pretrained_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix :].mean(dim=1)], dim=1)


@dataclass(frozen=True)
class Preset:
    base: str  # timm architecture
    base_pretrained: str  # timm name whose weights `pretrained: true` loads
    wrap: Any  # base model -> extractor
    ignore_missing: tuple[str, ...]  # base parameters a checkpoint of the extractor lacks


PRESETS = {
    # CLAM (Lu et al. 2021, Nat. Biomed. Eng.): ImageNet ResNet50, layer-3 output, pooled.
    "clam_resnet50_trunc": Preset("resnet50", "resnet50.tv_in1k", TruncatedResNet, ("layer4.",)),
}


def load_backbone(spec: BackboneSpec | dict[str, Any], seed: int = 0) -> Backbone:
    """Build the model with no classifier head, in eval mode, with its preprocessing config."""
    if isinstance(spec, dict):
        spec = section_from_dict(BackboneSpec, spec, f"backbone {spec.get('model')!r}")
    pretrained = spec.pretrained if spec.pretrained is not None else not spec.weights
    kwargs = {k: _resolve_kwarg(spec.model, k, v) for k, v in spec.kwargs.items()}
    torch.manual_seed(seed)  # random initialisation (pretrained: false) is reproducible
    preset = PRESETS.get(spec.model)
    if preset:
        model = _create(preset.base_pretrained if pretrained else preset.base, pretrained, kwargs)
        if spec.weights:
            load_weights(model, spec.weights, spec.model, ignore_missing=preset.ignore_missing)
        model = preset.wrap(model)
    else:
        model = _create(spec.model, pretrained, kwargs)
        if spec.weights:
            load_weights(model, spec.weights, spec.model)
    if spec.pool == "cls+mean":
        model = TokenPool(model)
    model.eval()
    data_config = dict(timm.data.resolve_data_config({}, model=model))
    with torch.inference_mode():  # the output's width, or tokens: then the config needs `pool`
        probe = model(torch.zeros(1, *data_config["input_size"]))
    if probe.ndim != 2:
        raise BackboneError(
            f"backbone {spec.model}: the model returns tokens, not one vector per patch "
            "(its global_pool is empty); set pool: cls+mean, or kwargs: {global_pool: token}"
        )
    return Backbone(
        model=model,
        spec=spec,
        feature_dim=int(probe.shape[1]),  # num_features can differ (a head's hidden layer)
        data_config=data_config,
        weights_hash=state_dict_hash(model),
    )


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    """timm.create_model with every download replaced by a lookup in the local HF cache."""
    kwargs = dict(kwargs)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)  # e.g. a model card's mean/std
    if name.startswith(HF_PREFIX):
        # timm's own "local-dir:" loader reads config.json and the weights from the snapshot.
        name = "local-dir:" + _hub_snapshot(name[len(HF_PREFIX) :], name)
    elif pretrained:
        try:
            hub_id = timm.models.get_pretrained_cfg(name, allow_unregistered=False).hf_hub_id
        except RuntimeError:
            hub_id = None  # an unknown name fails below with its own message
        if hub_id:
            local = {"source": "local-dir", "file": _hub_snapshot(hub_id, name)}
            overlay = {**(overlay or {}), **local}
    try:
        model = timm.create_model(
            name, pretrained=pretrained, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError(
                f"backbone {name!r}: unknown to timm; use a name from timm.list_models(), "
                f"'hf-hub:org/name', or a preset ({', '.join(PRESETS)})"
            ) from err
        if "state_dict" in str(err) or "size mismatch" in str(err):
            raise BackboneError(
                f"backbone {name}: its pretrained weights do not fit the architecture "
                f"({str(err).splitlines()[0]}); check kwargs"
            ) from err
        raise BackboneError(f"backbone {name}: {str(err).splitlines()[0]}") from err
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"backbone {name!r}: weights not available offline ({err}); put them in the "
            "Hugging Face cache, set weights: PATH, or pretrained: false"
        ) from err
    return model


def hf_cache_dir() -> str | None:
    """The hub cache the environment names now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _hub_snapshot(repo_id: str, model: str) -> str:
    """Local snapshot folder of a hub repo; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
        where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
        raise BackboneError(
            f"backbone {model}: {repo_id} is not in {where}; run `hf download {repo_id}` on a "
            "machine with network (or point HF_HUB_CACHE at a copy), set weights: PATH, or "
            "pretrained: false"
        ) from err


def _resolve_kwarg(model: str, key: str, value: Any) -> Any:
    if isinstance(value, str) and IMPORTABLE.match(value) and key.endswith("_layer"):
        module, _, attr = value.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise BackboneError(
                f"backbone {model}: kwargs.{key} = {value!r} cannot be imported"
            ) from err
    return value


def load_weights(
    model: torch.nn.Module,
    path: str | os.PathLike,
    model_name: str,
    ignore_missing: tuple[str, ...] = (),
) -> None:
    """Load a local checkpoint without unpickling objects; strict apart from the classifier
    (and `ignore_missing` prefixes, parameters the extractor will drop)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"{path}: weights file not found; fix 'weights' of backbone {model_name} in config.yaml"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
            raise BackboneError(f"{path}: not a readable safetensors file ({err})") from err
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
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: holds no state dict; save model.state_dict()")
    state = {_strip(k): v for k, v in state.items() if torch.is_tensor(v)}
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(ignore_missing))
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
    model.load_state_dict(state, strict=not ignore_missing)


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
    return spec.model_dump()
