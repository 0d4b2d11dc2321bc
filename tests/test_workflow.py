"""End-to-end: the real Snakemake workflow on a tiny demo cohort, run once and checked by many
assertions. Marked slow; it is the test that shows a fresh clone produces trained models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
import zarr

from srmil.segment import polygons_mask, read_geojson_polygons

REPO = Path(__file__).resolve().parents[1]
# Tiny: 8 small slides, 2 folds, a few epochs. Same workflow and config keys as the demo.
TINY = {
    "demo": {"n_slides": 8, "width_px": 2048, "height_px": 1536},
    "cv": {"n_folds": 2},
    "features": {"threads": 1, "batch_size": 32, "num_workers": 0},
    "train": {
        "srmil": {"model": {}, "train": {"epochs": 4}},
        "abmil": {"model": {}, "train": {"epochs": 4}},
    },
}


def deep_update(base: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--cores",
        "2",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    config = deep_update(yaml.safe_load((REPO / "config.yaml").read_text()), TINY)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    # A first stage-limited run: `features` must stop after features.
    snakemake(workdir, "features")
    assert not (workdir / "results" / "models").exists()
    assert not (workdir / "results" / "graphs").exists()
    snakemake(workdir)
    return workdir


@pytest.mark.slow
def test_dry_run_on_fresh_config_lists_every_stage(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "-n").stdout
    for rule in (
        "demo",
        "segment_slide",
        "tile_slide",
        "extract_features",
        "build_graph",
        "splits",
        "train_fold",
        "evaluate_model",
    ):
        assert rule in out, rule


@pytest.mark.slow
def test_feature_stores_open_with_plain_zarr(run: Path) -> None:
    sheet = pd.read_csv(run / "resources/demo/samples.csv")
    for slide_id in sheet["slide_id"]:
        group = zarr.open_group(str(run / f"results/features/resnet18/{slide_id}.zarr"), mode="r")
        n = group["features"].shape[0]
        assert group["features"].shape == (n, 512) and group["coords"].shape == (n, 2)
        attrs = dict(group.attrs)
        assert attrs["backbone"]["model"] == "resnet18" and attrs["backbone"]["pretrained"] is False
        assert len(attrs["weights_hash"]) == 64 and attrs["mpp"] == 0.5


@pytest.mark.slow
def test_coordinates_lie_inside_tissue(run: Path) -> None:
    sheet = pd.read_csv(run / "resources/demo/samples.csv")
    for slide_id in sheet["slide_id"]:
        group = zarr.open_group(str(run / f"results/features/resnet18/{slide_id}.zarr"), mode="r")
        coords, size = group["coords"][...], group.attrs["patch_level0"]
        polygons = read_geojson_polygons(run / f"results/segment/{slide_id}.geojson")
        mask = polygons_mask(polygons, (1536 // 4, 2048 // 4), 4.0)
        centres = ((coords + size / 2) / 4).astype(int)
        assert mask[centres[:, 1], centres[:, 0]].mean() >= 0.9, slide_id


@pytest.mark.slow
def test_metrics_are_numbers_in_range(run: Path) -> None:
    for model in ("srmil", "abmil"):
        metrics = json.loads((run / f"results/eval/{model}/resnet18/metrics.json").read_text())
        for key in ("auc", "accuracy", "balanced_accuracy", "macro_f1"):
            value = metrics["pooled"][key]
            assert value is not None and 0.0 <= value <= 1.0, (model, key, value)
        predictions = pd.read_csv(run / f"results/eval/{model}/resnet18/predictions.csv")
        assert len(predictions) == 8
        probs = predictions.filter(like="prob_").to_numpy()
        assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
        for plot in ("roc.png", "confusion.png", "training_curves.png"):
            assert (run / f"results/eval/{model}/resnet18/{plot}").stat().st_size > 1000


@pytest.mark.slow
def test_models_load_with_weights_only(run: Path) -> None:
    for model in ("srmil", "abmil"):
        for fold in (0, 1):
            state = torch.load(
                run / f"results/models/{model}/resnet18/fold_{fold}.pt", weights_only=True
            )
            assert state and all(torch.is_tensor(v) for v in state.values())
            meta = json.loads(
                (run / f"results/models/{model}/resnet18/fold_{fold}.json").read_text()
            )
            assert meta["classes"] == ["normal", "tumour"]


@pytest.mark.slow
def test_every_job_has_a_log(run: Path) -> None:
    logs = list((run / "logs").rglob("*.log"))
    assert len(logs) >= 1 + 8 * 4 + 1 + 4 + 2


@pytest.mark.slow
def test_complete_run_has_nothing_left_to_do(run: Path) -> None:
    assert "Nothing to be done" in snakemake(run, "-n").stdout + snakemake(run, "-n").stderr


@pytest.mark.slow
def test_missing_slide_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "sheet.csv").write_text("slide_id,path,patient_id,label\na,missing.svs,p,x\n")
    proc = snakemake(tmp_path, "-n", "--config", "samples=sheet.csv", check=False)
    assert proc.returncode != 0
    assert "missing.svs: slide file not found" in proc.stdout + proc.stderr
