"""Workflow configuration checks: config.yaml against its JSON schema, as one-line errors."""

from __future__ import annotations

import os
from typing import Any

import jsonschema
import yaml

from srmil.errors import InputError


class ConfigError(InputError):
    """A config value of the wrong type or out of range; the message names the key."""


def validate_config(
    config: dict[str, Any], schema_path: str | os.PathLike, source: str = "config.yaml"
) -> None:
    """Raise ConfigError naming the first offending key (`tile.patch_px`) and what is allowed."""
    with open(schema_path, encoding="utf-8") as f:
        schema = yaml.safe_load(f)
    validator = jsonschema.Draft202012Validator(schema)
    _read_command_line_strings(config, validator)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), list(e.path)))
    if not errors:
        return
    error = jsonschema.exceptions.best_match(errors)
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        message = error.message.replace("Additional properties are not allowed", "unknown key")
    elif error.validator == "required":
        message = error.message
    else:
        message = f"{error.instance!r} is not valid: {_short(error)}"
    raise ConfigError(
        f"{source}: {key}: {message}; fix it (allowed values are documented in "
        "workflow/schemas/config.schema.yaml)"
    )


def _read_command_line_strings(config: dict[str, Any], validator: Any) -> None:
    """Snakemake reads `--config key=value` with YAML's base loader, which keeps `true` and every
    scalar inside a mapping a string (`tile={patch_px: 256}` gives '256'). Where such a string
    breaks the schema and its YAML reading (a number, a boolean, null) fits, it is replaced by
    that reading, in place."""
    for _ in range(100):  # each pass fixes what the errors show; nested values take a few
        changed = False
        for error in validator.iter_errors(config):
            if not isinstance(error.instance, str) or not error.absolute_path:
                continue
            value = _yaml_scalar(error.instance)
            if isinstance(value, str) or not validator.evolve(schema=error.schema).is_valid(value):
                continue
            *parents, key = error.absolute_path
            target = config
            for part in parents:
                target = target[part]
            target[key] = value
            changed = True
        if not changed:
            return


def _yaml_scalar(text: str) -> Any:
    """`text` read as YAML; a float in exponent form without a dot (1e-3, which YAML 1.1 keeps a
    string) as a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(text)
        except ValueError:
            return text
    return value


def _short(error: jsonschema.ValidationError) -> str:
    """The schema rule that failed, without echoing the whole instance back."""
    rule = error.validator_value
    return {
        "type": f"expected {rule}",
        "minimum": f"must be >= {rule}",
        "maximum": f"must be <= {rule}",
        "exclusiveMinimum": f"must be > {rule}",
        "exclusiveMaximum": f"must be < {rule}",
        "enum": f"must be one of {rule}",
        "minItems": f"needs at least {rule} item(s)",
        "pattern": f"must match {rule}",
    }.get(str(error.validator), error.message)


def check_model_settings(
    model_name: str,
    model_hparams: dict[str, Any] | None,
    train_hparams: dict[str, Any] | None,
    source: str = "config.yaml",
) -> None:
    """Raise ConfigError naming `train.<model>.model` or `train.<model>.train` when a setting
    is unknown, of the wrong type or out of range. The model settings are checked here, in the
    training job, rather than against the schema: checking them needs the model classes, whose
    imports would slow down every Snakemake start."""
    from srmil.mil.models import build_model, default_hparams
    from srmil.mil.train import default_train_config, make_train_config

    _check_types(
        f"{source}: train.{model_name}.train", train_hparams, default_train_config(model_name)
    )
    _check_types(f"{source}: train.{model_name}.model", model_hparams, default_hparams(model_name))
    try:
        make_train_config(model_name, train_hparams)
    except (InputError, ValueError, TypeError) as err:
        raise ConfigError(f"{source}: train.{model_name}.train: {err}; fix it") from err
    try:  # a tiny model: cheap, and it runs every check the real one would
        build_model(model_name, in_dim=4, n_classes=2, hparams=model_hparams)
    except (InputError, ValueError, TypeError) as err:
        raise ConfigError(
            f"{source}: train.{model_name}.model: {err}; fix it (the defaults "
            "are srmil.mil.models.default_hparams)"
        ) from err


def _check_types(where: str, values: dict[str, Any] | None, defaults: dict[str, Any]) -> None:
    """Each value must have its default's type (an int where a float is expected is fine);
    a None default accepts anything. Unknown keys are left to the constructors' checks."""
    for key, value in (values or {}).items():
        if key not in defaults or defaults[key] is None or value is None:
            continue
        default = defaults[key]
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "boolean"
        elif isinstance(default, int):
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "integer"
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            expected = "number"
        elif isinstance(default, str):
            ok, expected = isinstance(value, str), "string"
        else:
            continue
        if not ok:
            raise ConfigError(f"{where}.{key}: {value!r} is not valid: expected {expected}; fix it")
