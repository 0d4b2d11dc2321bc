"""Every setting of the workflow, written once: one typed section per part of config.yaml, with
its default, its allowed values and what it means.

`load_settings` validates a config (config.yaml merged with `--config` and `--configfile`) and
fills in the defaults; a bad value is one line naming the key and the fix. The JSON schema
Snakemake documents the config with (workflow/schemas/config.schema.yaml) is generated from these
classes (`python -m srmil.settings`, checked by tests/test_config.py), the CLI takes its
defaults from them, and the stages take the sections as they are (`SegmentSettings`,
`TileSettings`, `TrainSettings`). No torch here: the Snakefile loads this at every parse.

The models' own hyper-parameters (`train.<model>.model`) are the fields of each model's config
dataclass (srmil.mil.models); they are checked when a training job starts (`check_model_settings`),
since that needs the model code.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from srmil.errors import InputError
from srmil.mil.catalog import MODEL_NAMES, model_info

SCHEMA_PATH = "workflow/schemas/config.schema.yaml"
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"
Device = Annotated[str, Field(pattern=DEVICE_PATTERN, description="auto, cpu, mps, cuda or cuda:N")]
Byte = Annotated[int, Field(ge=0, le=255)]
Positive = Annotated[float, Field(gt=0)]


def _null(value: Any) -> Any:
    # `--config 'tile={stride_px: null}'` reaches the Snakefile as the string 'null'.
    return None if isinstance(value, str) and value.strip().lower() in ("null", "~") else value


Nullable = BeforeValidator(_null)


class ConfigError(InputError):
    """A config value of the wrong type or out of range; the message names the key."""


class Section(BaseModel):
    """A config section: unknown keys are refused (a typo would be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- the stages --------------------------------------------------------------------------------


class DemoSettings(Section):
    """The synthetic demo cohort, generated when `samples` is its sheet and missing."""

    out_dir: str = "resources/demo"
    n_slides: int = Field(24, ge=4)
    width_px: int = Field(4096, ge=512)
    height_px: int = Field(3072, ge=512)
    mpp: Positive = 0.5
    prefix: str = Field(
        "demo",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$",
        description="slide ids are PREFIX_000, ... (cohorts with different prefixes share "
        "results/)",
    )
    tumour_fraction: tuple[
        Annotated[float, Field(gt=0, lt=1)], Annotated[float, Field(gt=0, lt=1)]
    ] = Field((0.02, 0.05), description="range of each positive slide's tumour share of its tissue")
    tumour_contrast: float = Field(
        1.0,
        gt=0,
        le=1,
        description="how far tumour differs from stroma; 1 = conspicuous, towards 0 = faint",
    )

    @field_validator("tumour_fraction")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"[{value[0]}, {value[1]}] must be [low, high], low <= high")
        return value


class SegmentSettings(Section):
    """Tissue segmentation on a low-resolution view (docs/segmentation.md). A sample-sheet column
    segment_<key> overrides a key for one slide."""

    seg_mpp: Positive = Field(8.0, description="µm/px of the view segmented (the coarsest used)")
    min_view_px: int = Field(
        1024, ge=1, description="small slides: a finer view so its longer side has this many px"
    )
    min_seg_mpp: Positive = Field(2.0, description="the finest view used for small slides")
    max_view_px: int = Field(
        8192, ge=64, description="huge slides: a coarser view, so memory stays bounded"
    )
    median_um: float = Field(32.0, ge=0, description="median filter width on the saturation")
    threshold: Literal["otsu"] | Byte = Field(
        "otsu", description='"otsu" or a fixed saturation threshold 0-255'
    )
    min_saturation: Byte = Field(8, description="floor for the Otsu threshold (empty slides)")
    close_um: float = Field(16.0, ge=0, description="morphological closing diameter")
    min_tissue_area_um2: float = Field(
        5000.0, ge=0, description="smaller tissue pieces are dropped"
    )
    min_hole_area_um2: float = Field(2000.0, ge=0, description="smaller holes are filled")
    max_holes_per_piece: int = Field(64, ge=0, description="the largest holes of a piece are kept")
    exclude_pen: bool = Field(True, description="remove blue and green pen ink (G above R)")
    pen_green_over_red: Byte = Field(10, description="G - R above this marks ink")
    exclude_dark: bool = Field(True, description="remove black ink and black scanner borders")
    dark_max_value: Byte = Field(60, description="max(R, G, B) below this marks a black area")
    ink_margin_um: float = Field(
        0.0, ge=0, description="grow excluded ink and black areas by this besides one view px"
    )


class TileSettings(Section):
    """The patch grid (docs/segmentation.md)."""

    target_mpp: Positive = Field(0.5, description="µm/px patches are read at")
    patch_px: int = Field(224, ge=16, description="patch side in px at target_mpp")
    stride_px: Annotated[int | None, Nullable] = Field(
        None, ge=1, description="null = patch_px - overlap_px"
    )
    overlap_px: int = Field(0, ge=0, description="overlap of neighbouring patches at target_mpp")
    min_tissue_fraction: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _one_stride(self) -> TileSettings:
        if self.stride_px is not None and self.overlap_px != 0:  # one would be ignored
            raise ValueError("set stride_px or overlap_px, not both")
        if self.overlap_px >= self.patch_px:
            raise ValueError(f"overlap_px {self.overlap_px} must be smaller than patch_px")
        return self

    @property
    def stride(self) -> int:
        """Grid stride in target px: stride_px, else patch_px - overlap_px."""
        return self.stride_px if self.stride_px is not None else self.patch_px - self.overlap_px


class BackboneSpec(Section):
    """A feature extractor: a timm model by name, `hf-hub:org/name`, a preset
    (srmil.features.backbones.PRESETS) or local weights."""

    model: str = Field(description="timm name, hf-hub:org/name or a preset")
    pretrained: bool | None = Field(
        None, description="load the model's published weights; null = true unless `weights`"
    )
    weights: Annotated[str | None, Nullable] = Field(
        None, description="local checkpoint (.pth/.pt/.bin/.safetensors)"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model arguments"
    )
    pool: Literal["model", "cls+mean"] = Field(
        "model",
        description="model = its pooled output; cls+mean = class token + mean of the patch "
        "tokens (Virchow-style ViTs)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> BackboneSpec:
        if self.pretrained and self.weights:
            raise ValueError("set either pretrained: true or weights: PATH, not both")
        return self


class FeatureSettings(Section):
    """Feature extraction (docs/features.md)."""

    extractors: list[str] = Field(["resnet18"], min_length=1)
    batch_size: int = Field(64, ge=1)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="reader processes; auto = 0 on CPU (one reader thread), up to "
        "16 with a GPU"
    )
    threads: int = Field(2, ge=1)
    device: Device = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    dtype: Literal["float16", "float32"] = "float16"
    read_block: int = Field(
        1, ge=1, description="read k x k neighbouring tiles in one OpenSlide call (1 = each)"
    )
    reader: Literal["auto", "openslide", "jpeg-tiles"] = Field(
        "auto",
        description="auto = the JPEG tile reader where a slide's level is plain JPEG tiles "
        "(Aperio SVS, generic tiled TIFF), else OpenSlide; openslide or jpeg-tiles force one",
    )


class GraphSettings(Section):
    window: int = Field(2, ge=1, description="1 = 8-neighbourhood, 2 = the reference's")


class CVSettings(Section):
    n_folds: int = Field(3, ge=2)
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="inner validation share of each fold's training patients"
    )
    split_file: Annotated[str | None, Nullable] = Field(
        None,
        description="fixed folds replacing k-fold: CSV with slide_id or patient_id, part "
        "(train, val, test) and optional fold, or a JSON like results/splits.json",
    )


# --- training ------------------------------------------------------------------------------------


class TrainSettings(Section):
    """Optimisation and model selection of one model. The defaults are SRMIL's reference; each
    model's departures from them are in srmil.mil.catalog (`train_settings` applies them)."""

    epochs: int = Field(100, ge=1)
    optimizer: Literal["adamw", "adam", "lookahead_radam"] = Field(
        "adamw", description="lookahead_radam: TransMIL's (srmil.mil.optim)"
    )
    lr: Positive = 5e-4
    weight_decay: float = Field(1e-5, ge=0)
    betas: tuple[
        Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]
    ] = Field((0.9, 0.999), description="Adam's (beta1, beta2)")
    scheduler: Literal["cosine", "step", "none"] = Field(
        "cosine",
        description="cosine: from lr to min_lr over the epochs; step: lr times step_gamma from "
        "epoch floor(step_at * epochs) + 1 on",
    )
    min_lr: float = Field(0.0, ge=0)
    step_at: float = Field(0.5, ge=0, le=1)
    step_gamma: Positive = 0.2
    select_after: float = Field(
        0.6, ge=0, le=1, description="share of the epochs before model selection counts"
    )
    early_stopping_patience: Annotated[int | None, Nullable] = Field(
        None, ge=1, description="epochs without a better selection, then stop; null = never"
    )
    standardize_features: bool = Field(
        True, description="z-score features with each fold's training statistics"
    )


def train_settings(model_name: str, overrides: dict[str, Any] | None = None) -> TrainSettings:
    """`model_name`'s training settings: the reference defaults, the model's own (catalog), then
    `overrides` (config.yaml's train.<model>.train)."""
    return TrainSettings(**{**model_info(model_name).train, **(overrides or {})})


class ModelSection(Section):
    """train.<model>: overrides of its hyper-parameters and of its training settings."""

    model: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the model's hyper-parameters (srmil.mil.models.default_hparams)",
    )
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the training settings (TrainSettings; each model's defaults in "
        "docs/method.md)",
    )


class _TrainBase(Section):
    """Which models to train, where; each model's settings are under its name (train.srmil, ...)."""

    models: list[Literal[MODEL_NAMES]] = Field(  # type: ignore[valid-type]
        ["srmil", "abmil"],
        min_length=1,
        description="the models to train, evaluate and compare (docs/method.md); srmil_norec, "
        "srmil_nomask and srmil_raw are SRMIL's ablations, which inherit train.srmil's settings "
        "except the one they switch",
    )
    device: Device = "auto"
    threads: int = Field(1, ge=1)
    mem_mb: Annotated[int, Field(ge=500)] | Literal["auto"] = Field(
        "auto",
        description="memory (MB) each train_fold job asks the scheduler for (doubled on a "
        "retry); auto = sized from the cohort's stores",
    )


def _model_section(name: str) -> ModelSection:
    # The demo's training length for the default models; the reference's is 100 (TrainSettings).
    return ModelSection(train={"epochs": 40}) if name in ("srmil", "abmil") else ModelSection()


TrainSection = create_model(
    "TrainSection",
    __base__=_TrainBase,
    **{name: (ModelSection, Field(default_factory=lambda n=name: _model_section(n)))
       for name in MODEL_NAMES},
)


# --- evaluation and the other targets ----------------------------------------------------------


class EvaluateSettings(Section):
    """Metrics, plots and attention heatmaps of the cross-validated models."""

    n_bootstrap: int = Field(
        1000, ge=0, description="bootstrap resamples of patients for the intervals (0 = none)"
    )
    ci_level: float = Field(0.95, gt=0, lt=1)
    top_patches: int = Field(8, ge=1, description="most attended patches beside each heatmap")
    heatmap_px: int = Field(1024, ge=128, description="longer side of the heatmap thumbnail")
    max_heatmaps: Annotated[int | None, Nullable] = Field(
        None, ge=0, description="null = a heatmap of every test slide"
    )


class AblationSettings(Section):
    """The mask-ratio ablation of SRMIL (the `ablation` target)."""

    mask_ratios: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1
    )


class StudySettings(Section):
    """The accuracy study (the `study` target)."""

    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        [0, 1, 2, 3, 4],
        min_length=1,
        description="one run of every model per seed (its own folds and initialisation)",
    )
    mask_ratio_seeds: Annotated[list[Annotated[int, Field(ge=0)]] | None, Nullable] = Field(
        None, min_length=1, description="seeds of the mask-ratio curve; null = all of seeds"
    )


class PredictSettings(Section):
    """Prediction on new slides (the `predict` target; `srmil predict` runs it too)."""

    samples: Annotated[str | None, Nullable] = Field(
        None, description="sample sheet of new slides; labels optional"
    )
    model: Literal[MODEL_NAMES] = "srmil"  # type: ignore[valid-type]
    extractor: str = Field("resnet18", description="a name under backbones; must be the model's")
    models_dir: Annotated[str | None, Nullable] = Field(
        None,
        description="a folder of fold_*.pt models to predict with; null = this workflow's "
        "results/models/{model}/{extractor}",
    )
    heatmaps: bool = Field(True, description="an attention heatmap of every new slide")


class ReportSettings(Section):
    """What the Snakemake report (`snakemake --report report.html`, or `.zip`) holds."""

    slide_images: bool = Field(
        True,
        description="each slide's QC images and attention heatmaps in the report, filed by "
        "slide (about 1 MB per slide in an html report on the demo, 0.76 MB in a zip); false "
        "keeps the report to the cohort's plots and tables, and the images stay under results/",
    )


class Settings(Section):
    """config.yaml."""

    samples: str = Field(
        "resources/demo/samples.csv",
        description="sample sheet CSV (slide_id,path,patient_id,label[,annotation,mpp])",
    )
    classes: Annotated[list[Annotated[str, Field(min_length=1)]] | None, Nullable] = Field(
        None,
        min_length=2,
        description="the labels the sample sheet may use; a label outside them stops the run "
        "(a typo would otherwise become a class of its own); null = whatever the sheet holds",
    )
    seed: int = Field(0, ge=0, description="seed for the demo, initialisation, splits, training")
    demo: DemoSettings = Field(default_factory=DemoSettings)
    mpp_fallback: Annotated[Positive | None, Nullable] = Field(
        None, description="µm/px for slides with none in the file or the sheet; null = an error"
    )
    exclude_failed_slides: bool = Field(
        False,
        description="false: a slide whose file is missing or unreadable fails its jobs and the "
        "cohort is not trained until it is fixed (--keep-going finishes the other slides). true: "
        "such a slide is excluded, training and evaluation go on without it and list it in "
        "metrics.json and the report (docs/robustness.md)",
    )
    segment: SegmentSettings = Field(default_factory=SegmentSettings)
    tile: TileSettings = Field(default_factory=TileSettings)
    backbones: dict[str, BackboneSpec] = Field(
        default_factory=lambda: {"resnet18": BackboneSpec(model="resnet18", pretrained=False)},
        min_length=1,
        description="short extractor name (used in result paths) -> timm spec",
    )
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    graph: GraphSettings = Field(default_factory=GraphSettings)
    cv: CVSettings = Field(default_factory=CVSettings)
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    ablation: AblationSettings = Field(default_factory=AblationSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    predict: PredictSettings = Field(default_factory=PredictSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)

    @model_validator(mode="after")
    def _extractors_defined(self) -> Settings:
        for name in self.features.extractors:
            if name not in self.backbones:
                raise ValueError(f"features.extractors names {name!r}, which is not under "
                                 "'backbones'")
        return self


# --- loading, errors, the schema ---------------------------------------------------------------


def load_settings(config: dict[str, Any], source: str = "config.yaml") -> Settings:
    """The validated settings with every default filled in; ConfigError (one line naming the key
    and the fix) otherwise. Strings from `--config key=value` are read as the key's type."""
    try:
        settings = Settings.model_validate(config)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None
    for name in MODEL_NAMES:  # train.<model>.train: partial, over each model's own defaults
        try:
            train_settings(name, getattr(settings.train, name).train)
        except ValidationError as err:
            raise ConfigError(_one_line(err, source, f"train.{name}.train")) from None
    return settings


S = TypeVar("S", bound=Section)


def section_from_dict(cls: type[S], values: dict[str, Any], source: str) -> S:
    """One section from a dict (`srmil segment --params`, sheet overrides over config.yaml);
    ConfigError naming `source`, the key and the fix otherwise."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


def cell_value(cls: type[Section], name: str, text: str) -> Any:
    """A sample-sheet cell typed as setting `name` of `cls` ("40" -> 40, "yes" -> True, "OTSU"
    -> "otsu"). KeyError for a name that is no setting; ConfigError saying what the setting
    allows for a value that is not one."""
    if name not in cls.model_fields:
        raise KeyError(name)
    text = text.strip()
    for candidate in (text, text.lower()):
        try:
            return getattr(cls.model_validate({name: candidate}), name)
        except ValidationError:
            continue
    raise ConfigError(f"it must be {allowed_values(cls, name)}")


def allowed_values(cls: type[Section], name: str) -> str:
    """What setting `name` of `cls` accepts, in words, from its schema ("an integer 0-255 or
    'otsu'")."""
    field = cls.model_json_schema()["properties"][name]
    options = field.get("anyOf", [field])
    words = []
    for option in options:
        if "enum" in option or "const" in option:
            words += [json.dumps(v) for v in option.get("enum", [option.get("const")])]
            continue
        kind = {"integer": "an integer", "number": "a number", "boolean": "true or false",
                "string": "a string", "null": "null"}.get(option.get("type"), "a value")
        low = option.get("minimum", option.get("exclusiveMinimum"))
        high = option.get("maximum", option.get("exclusiveMaximum"))
        if low is not None and high is not None:
            kind += f" {low:g}-{high:g}"
        elif "exclusiveMinimum" in option:
            kind += f" > {low:g}"
        elif low is not None:
            kind += f" >= {low:g}"
        words.append(kind)
    return " or ".join(words)


def _one_line(err: ValidationError, source: str, prefix: str = "") -> str:
    errors = err.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"] if not _is_union_branch(p)]
    # A value that fits no branch of a union (an integer or "auto"): the branch whose rule it
    # broke says more than the first branch's type.
    same = [e for e in errors if [str(p) for p in e["loc"] if not _is_union_branch(p)] == loc]
    ranked = [e for e in same if e["type"] in RANGE_ERRORS] or same
    first = ranked[0]
    if first["type"] == "extra_forbidden":
        loc = loc[:-1]  # the section that has the unknown key
    key = ".".join([prefix, *loc] if prefix else loc)
    where = f"{source}: {key}" if key else source
    if len(same) > 1 and first["type"] not in RANGE_ERRORS:
        what = f"{first.get('input')!r} is not valid: must be " + " or ".join(
            _rule(e) for e in same)
    else:
        what = _describe(first)
    return f"{where}: {what}; fix it (allowed values are documented in {SCHEMA_PATH})"


RANGE_ERRORS = ("greater_than_equal", "greater_than", "less_than_equal", "less_than")


def _is_union_branch(part: Any) -> bool:
    # pydantic names the branch of a union it tried: `int`, `literal['auto']`, `constrained-int`
    return isinstance(part, str) and bool(re.match(
        r"^(int|float|str|bool|none)$|^(list|literal|tuple|dict|function-\w+)\[|^constrained-",
        part))


def _rule(error: dict[str, Any]) -> str:
    """A union branch's rule, in words ("an integer", "one of 'auto'")."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    return {"int_parsing": "an integer", "int_type": "an integer", "float_parsing": "a number",
            "float_type": "a number", "bool_parsing": "a boolean", "string_type": "a string",
            "list_type": "a list"}.get(kind, error["msg"])


def _describe(error: dict[str, Any]) -> str:
    """What is wrong with a value, in words, without echoing a whole section back."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    shown = repr(value) if len(repr(value)) <= 60 else "this value"  # not a whole section
    rules = {
        "greater_than_equal": f"must be >= {_number(ctx.get('ge'))}",
        "greater_than": f"must be > {_number(ctx.get('gt'))}",
        "less_than_equal": f"must be <= {_number(ctx.get('le'))}",
        "less_than": f"must be < {_number(ctx.get('lt'))}",
        "int_parsing": "expected integer",
        "int_type": "expected integer",
        "int_from_float": "expected integer",
        "float_parsing": "expected number",
        "float_type": "expected number",
        "bool_parsing": "expected boolean",
        "bool_type": "expected boolean",
        "string_type": "expected string",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "string_pattern_mismatch": f"must match {ctx.get('pattern')}",
        "too_short": f"needs at least {ctx.get('min_length')} item(s)",
        "too_long": f"takes at most {ctx.get('max_length')} item(s)",
        "list_type": "expected a list",
        "tuple_type": "expected a list",
        "dict_type": "expected a mapping",
        "model_type": "expected a mapping",
    }
    if kind == "extra_forbidden":
        return f"unknown key ({error['loc'][-1]!r} was unexpected)"
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return f"{shown} is not valid: {rules.get(kind, error['msg'])}"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def json_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml, as Snakemake's `validate` and editors read it."""
    schema = Settings.model_json_schema()
    # train.<model>.train holds some of TrainSettings' keys (each model has its own defaults).
    train = TrainSettings.model_json_schema()
    for field in train["properties"].values():
        field.pop("default", None)
    section = schema["$defs"]["ModelSection"]["properties"]["train"]
    section.update(additionalProperties=False, properties=train["properties"])
    schema["$defs"].update(train.get("$defs", {}))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_yaml() -> str:
    return ("# Generated from srmil/settings.py by `python -m srmil.settings`; do not edit.\n"
            + yaml.safe_dump(json_schema(), sort_keys=False, allow_unicode=True, width=100))


# --- the models' own hyper-parameters (needs the model code: at the start of a training job) --


def check_model_settings(
    model_name: str,
    model_hparams: dict[str, Any] | None,
    train_hparams: dict[str, Any] | None,
    source: str = "config.yaml",
) -> None:
    """Raise ConfigError naming `train.<model>.model` or `train.<model>.train` when a setting
    is unknown, of the wrong type or out of range."""
    from srmil.mil.models import build_model, default_hparams

    try:
        train_settings(model_name, train_hparams)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source, f"train.{model_name}.train")) from None
    _check_types(f"{source}: train.{model_name}.model", model_hparams, default_hparams(model_name))
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


if __name__ == "__main__":
    print(schema_yaml(), end="")
