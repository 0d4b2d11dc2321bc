"""Every model of the catalogue through the real workflow: the tiny run's features and graphs,
copied, then `snakemake evaluate` with `train.models` set to all of them (a few epochs): one
comparison table, the same folds, checkpoints that load with weights_only, `srmil predict`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import snakemake

from srmil.mil.catalog import MODEL_NAMES, model_info


@pytest.fixture(scope="module")
def all_models(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("all_models")
    # The stages before training and the SRMIL and ABMIL models, as the tiny run made them
    # (times kept: nothing reruns); the other models train here, 3 epochs each (SRMIL's
    # ablations inherit train.srmil's 4), TransMIL with 8 landmarks (256 cost seconds per bag).
    shutil.copytree(run / "resources", work / "resources")
    for part in ("segment", "tiles", "features", "graphs", "models/srmil", "models/abmil",
                 "eval/srmil", "eval/abmil"):
        shutil.copytree(run / "results" / part, work / "results" / part)
    shutil.copy2(run / "results/splits.json", work / "results/splits.json")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["models"] = list(MODEL_NAMES)
    for name in MODEL_NAMES:
        if name not in config["train"] and model_info(name).base == name:
            config["train"][name] = {"model": {}, "train": {"epochs": 3}}
    config["train"]["transmil"]["model"] = {"landmarks": 8}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(work, "evaluate")
    return work


@pytest.mark.slow
def test_every_model_in_one_comparison_on_the_same_folds(all_models: Path) -> None:
    table = pd.read_csv(all_models / "results/eval/resnet18/comparison.csv")
    assert list(dict.fromkeys(table["model"])) == list(MODEL_NAMES)
    auc = table[table["metric"] == "auc"].set_index("model")
    assert auc["pooled"].between(0, 1).all() and auc["ci_low"].notna().all()
    markdown = (all_models / "results/eval/resnet18/comparison.md").read_text()
    assert "| metric | " + " | ".join(MODEL_NAMES) + " |" in markdown
    splits = json.loads((all_models / "results/splits.json").read_text())
    slides = None
    for name in MODEL_NAMES:
        for k, fold in enumerate(splits["folds"]):
            path = all_models / f"results/models/{name}/resnet18/fold_{k}.pt"
            meta = json.loads(path.with_suffix(".json").read_text())
            assert meta["split"] == fold and meta["model"] == name
            assert meta["provenance"]["features"]["weights_hash"]
            state = torch.load(path, weights_only=True)
            assert all(isinstance(v, torch.Tensor) for v in state.values())
        out = all_models / f"results/eval/{name}/resnet18"
        predictions = pd.read_csv(out / "predictions.csv")
        slides = slides or sorted(predictions["slide_id"])
        assert sorted(predictions["slide_id"]) == slides  # every model tests every slide once
        heatmaps = list((out / "heatmaps").glob("*.png"))
        assert len(heatmaps) == (4 if model_info(name).attention else 0)  # max_heatmaps 4
    # SRMIL's ablations inherit train.srmil and switch their one setting.
    norec = json.loads((all_models / "results/models/srmil_norec/resnet18/fold_0.json")
                       .read_text())
    assert norec["model_hparams"]["w_rec"] == 0.0 and norec["train_config"]["epochs"] == 4
    raw = json.loads((all_models / "results/models/srmil_raw/resnet18/fold_0.json").read_text())
    assert raw["train_config"]["standardize_features"] is False


@pytest.mark.slow
def test_predict_works_with_every_model(all_models: Path, tmp_path: Path) -> None:
    from srmil.cohort.samples import read_sample_sheet
    from srmil.mil.predict import predict_slides

    samples = read_sample_sheet(all_models / "resources/demo/samples.csv", check_files=False)
    samples = samples.iloc[:2]
    for name in MODEL_NAMES:
        models = all_models / f"results/models/{name}/resnet18"
        table = predict_slides(samples, models, all_models / "results/features/resnet18",
                               all_models / "results/graphs", tmp_path / name, device="cpu",
                               threads=1).set_index("slide_id")
        evaluated = pd.read_csv(all_models / f"results/eval/{name}/resnet18/predictions.csv")
        for row in evaluated[evaluated["slide_id"].isin(table.index)].itertuples():
            # The fold model that held the slide out gives evaluate's probability.
            assert table.at[row.slide_id, f"prob_tumour_fold{row.fold}"] == pytest.approx(
                row.prob_tumour, abs=1e-4), name
