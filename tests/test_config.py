"""The settings layer (srmil/settings.py): config.yaml is its defaults; bad values name their key in
one line; the JSON schema is generated from it; the CLI's defaults are its defaults."""

import copy
from pathlib import Path

import pytest
import yaml
from conftest import deep_update

from srmil.settings import ConfigError, Settings, load_settings, schema_yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


def test_shipped_config_is_the_defaults() -> None:
    """config.yaml restates the defaults (with comments for the user); they cannot drift."""
    assert load_settings(DEFAULT) == Settings()


def test_schema_is_generated_from_the_settings() -> None:
    """workflow/schemas/config.schema.yaml is `python -m srmil.settings`'s output, and it agrees
    with the settings on config.yaml and on a bad value."""
    import jsonschema

    assert SCHEMA.read_text() == schema_yaml(), "regenerate: python -m srmil.settings > " + str(
        SCHEMA.relative_to(REPO))
    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA.read_text()))
    assert not list(validator.iter_errors(DEFAULT))
    bad = copy.deepcopy(DEFAULT)
    bad["tile"]["patch_px"] = 8
    assert list(validator.iter_errors(bad))
    with pytest.raises(ConfigError, match=r"tile\.patch_px: 8 is not valid: must be >= 16"):
        load_settings(bad)


def test_cli_defaults_are_the_settings() -> None:
    """`srmil <stage> --help` shows the settings' defaults: one definition for both."""
    from srmil.cli import build_parser
    from srmil.settings import CVSettings, DemoSettings, EvaluateSettings, FeatureSettings

    sub = build_parser()._subparsers._group_actions[0].choices
    checks = [("demo", "n_slides", DemoSettings().n_slides),
              ("demo", "tumour_fraction", DemoSettings().tumour_fraction),
              ("features", "batch_size", FeatureSettings().batch_size),
              ("features", "reader", FeatureSettings().reader),
              ("splits", "val_fraction", CVSettings().val_fraction),
              ("evaluate", "n_bootstrap", EvaluateSettings().n_bootstrap),
              ("predict", "heatmap_px", EvaluateSettings().heatmap_px)]
    for command, dest, default in checks:
        assert sub[command].get_default(dest) == default, (command, dest)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (None, "seed", "abc", r"seed: 'abc' is not valid: expected integer"),
        ("tile", "patch_px", -3, r"tile\.patch_px: -3 is not valid: must be >= 16"),
        ("tile", "target_mpp", 0, r"tile\.target_mpp: 0 is not valid"),
        ("features", "dtype", "int8", r"features\.dtype: 'int8' is not valid: must be one of"),
        ("cv", "n_folds", 1, r"cv\.n_folds: 1 is not valid: must be >= 2"),
        ("tile", "patch_sizes", 3, r"tile: unknown key \('patch_sizes' was unexpected\)"),
    ],
)
def test_bad_values_name_the_key(section, key, value, expected) -> None:
    config = copy.deepcopy(DEFAULT)
    (config[section] if section else config)[key] = value
    with pytest.raises(ConfigError, match=expected) as err:
        load_settings(config)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            ("train", "srmil", "train", "epochs"),
            "ten",
            r"train\.srmil\.train\.epochs: 'ten' .*integer",
        ),
        (("train", "abmil", "train", "optimizer"), "sgd", r"train\.abmil\.train\.optimizer: 'sgd'"),
        (("train", "srmil", "train", "lr"), -1, r"train\.srmil\.train\.lr: -1 is not valid"),
        (("train", "srmil", "train", "select_after"), 1.5, r"train\.srmil\.train\.select_after"),
        (("train", "srmil", "train", "epoch"), 3, r"train\.srmil\.train: unknown key"),
        (("classes",), ["tumour"], r"classes: \['tumour'\] is not valid: needs at least 2"),
        (("classes",), "tumour", r"classes: 'tumour' is not valid: expected"),
        (("mpp_fallback",), -0.5, r"mpp_fallback: -0\.5 is not valid: must be > 0"),
        (("features", "batch_size"), 0, r"features\.batch_size: 0 is not valid: must be >= 1"),
        (("features", "num_workers"), "many", r"features\.num_workers: 'many' is not valid"),
        (
            ("tile", "min_tissue_fraction"),
            2,
            r"tile\.min_tissue_fraction: 2 is not valid: must be <= 1",
        ),
        (("segment", "threshold"), 300, r"segment\.threshold: 300 is not valid"),
        (("evaluate", "ci_level"), 1.5, r"evaluate\.ci_level: 1\.5 is not valid: must be < 1"),
        (("cv", "val_fraction"), "a fifth", r"cv\.val_fraction: 'a fifth' is not valid: expected"),
        (("features", "device"), "gpu", r"features\.device: 'gpu' is not valid: must match"),
        (("train", "device"), "cuda0", r"train\.device: 'cuda0' is not valid: must match"),
        (("train", "device"), "cuda:", r"train\.device: 'cuda:' is not valid: must match"),
    ],
)
def test_nested_bad_values_name_the_key(path, value, expected) -> None:
    config = copy.deepcopy(DEFAULT)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=expected) as err:
        load_settings(config)
    assert "\n" not in str(err.value)


def test_classes_list_is_valid() -> None:
    load_settings({**copy.deepcopy(DEFAULT), "classes": ["normal", "tumour"]})


@pytest.mark.parametrize("device", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"])
def test_devices_are_valid(device: str) -> None:
    config = copy.deepcopy(DEFAULT)
    config["features"]["device"] = config["train"]["device"] = device
    load_settings(config)


def test_schema_lists_every_training_setting() -> None:
    """The schema documents train.<model>.train: every TrainSettings key, no defaults (each
    model has its own)."""
    from srmil.settings import TrainSettings

    schema = yaml.safe_load(SCHEMA.read_text())
    listed = schema["$defs"]["ModelSection"]["properties"]["train"]["properties"]
    assert set(listed) == set(TrainSettings.model_fields)
    assert not any("default" in field for field in listed.values())


@pytest.mark.parametrize(
    ("model", "model_params", "train_params", "expected"),
    [
        (
            "srmil",
            {"heads": "four"},
            {},
            r"train\.srmil\.model\.heads: 'four' is not valid: expected integer",
        ),
        ("srmil", {"residual": 1}, {}, r"train\.srmil\.model\.residual: 1 .*expected boolean"),
        ("srmil", {"pooling": "max"}, {}, r"train\.srmil\.model: pooling must be one of"),
        ("abmil", {"heads": 4}, {}, r"train\.abmil\.model: unknown hyper-parameter 'heads'"),
        ("abmil", {"dropout": 1.5}, {}, r"train\.abmil\.model: dropout must be in \[0, 1\)"),
        (
            "abmil",
            {},
            {"lr": "fast"},
            r"train\.abmil\.train\.lr: 'fast' is not valid: expected number",
        ),
        ("srmil", {}, {"epochs": 0}, r"train\.srmil\.train\.epochs: 0 is not valid: must be >= 1"),
    ],
)
def test_model_settings_name_the_key(model, model_params, train_params, expected) -> None:
    """Model hyper-parameters are checked when `srmil train` starts, before any bag is read."""
    from srmil.settings import check_model_settings

    with pytest.raises(ConfigError, match=expected) as err:
        check_model_settings(model, model_params, train_params)
    assert "\n" not in str(err.value)
    check_model_settings(model, {}, {})  # the defaults pass


def test_command_line_strings_are_read_as_their_types(tmp_path: Path) -> None:
    """`--config exclude_failed_slides=true 'tile={patch_px: 256}'` reaches the Snakefile as
    strings (Snakemake's YAML base loader); they are read as the schema's types, in place, and a
    string that is no such value still names its key."""
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    args = ["exclude_failed_slides=true", "tile={patch_px: 256, stride_px: null}",
            "segment={exclude_pen: false, threshold: 40}"]
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "--quiet",
         "--config", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "srmil: error" not in proc.stderr, proc.stderr[-2000:]
    config = copy.deepcopy(DEFAULT)
    config.update(exclude_failed_slides="true", seed="3")
    config["tile"].update(patch_px="256", stride_px="null", min_tissue_fraction="0.25")
    config["segment"].update(exclude_pen="false", threshold="40")
    config["train"]["srmil"]["train"].update(lr="1e-3", epochs="7")
    settings = load_settings(config)
    assert settings.exclude_failed_slides is True and settings.seed == 3
    assert settings.tile.model_dump() == {**DEFAULT["tile"], "patch_px": 256, "stride_px": None,
                                          "min_tissue_fraction": 0.25}
    assert settings.segment.exclude_pen is False and settings.segment.threshold == 40
    from srmil.settings import train_settings

    trained = train_settings("srmil", settings.train.srmil.train)
    assert (trained.epochs, trained.lr) == (7, 0.001)
    config["tile"]["patch_px"] = "big"
    with pytest.raises(ConfigError, match=r"tile\.patch_px: 'big' is not valid"):
        load_settings(config)


def test_parsing_the_workflow_imports_no_torch_opencv_or_tifffile(tmp_path: Path) -> None:
    """Every Snakemake start and every cluster job parses the workflow: `snakemake -n` on the
    demo (its sheet planned, its slides not written yet) stays clear of the heavy libraries."""
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "snakemake", "-s", str(REPO / "Snakefile"),
         "-n", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "srmil.settings" in imported and "srmil.cohort.splits" in imported
    assert not imported & {"torch", "cv2", "tifffile", "sklearn", "timm", "zarr"}


def test_keep_going_is_read_from_the_command_line_and_from_profiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the workflow sees while it is parsed (srmil.workflow.keep_going_requested): the
    command line's -k or --keep-going, and `keep-going: true` in a profile, as Snakemake reads
    them; the repository's own workflow/profiles/default does not keep going."""
    from srmil.workflow import keep_going_requested

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SNAKEMAKE_PROFILE", raising=False)
    snakefile = str(REPO / "Snakefile")
    assert keep_going_requested(["-s", snakefile, "-n"]) is False
    assert keep_going_requested(["-s", snakefile, "-nk"]) is True
    assert keep_going_requested(["-s", snakefile, "--keep-going", "all"]) is True
    profile = tmp_path / "my profile"
    profile.mkdir()
    (profile / "config.yaml").write_text("keep-going: true\ncores: 2\n")
    assert keep_going_requested(["-s", snakefile, "--profile", str(profile)]) is True
    monkeypatch.setenv("SNAKEMAKE_PROFILE", str(profile))
    assert keep_going_requested(["-s", snakefile]) is True
    assert keep_going_requested(["-s", snakefile, "--profile", "none"]) is False
    assert keep_going_requested() is False  # pytest is not Snakemake's command line


STUDIES = sorted(p.name for p in (REPO / "workflow/studies").glob("*.yaml"))


@pytest.mark.parametrize("study", STUDIES)
def test_study_configs_are_valid_over_config_yaml(study: str) -> None:
    """Each study file, merged over config.yaml alone and with all-models.yaml after it, as the
    docs run them, gives valid settings."""
    studies = REPO / "workflow/studies"
    config = deep_update(copy.deepcopy(DEFAULT), yaml.safe_load((studies / study).read_text()))
    load_settings(config)
    load_settings(deep_update(config, yaml.safe_load((studies / "all-models.yaml").read_text())))
