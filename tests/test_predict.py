"""Prediction with the fold ensemble: it reproduces the evaluate stage's probabilities, works
without labels, records slides without patches, and refuses features from another extractor and
graphs built with another window. (The whole chain from slide files, through Snakemake and
`srmil predict`, runs in test_workflow.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from srmil.cli import main
from srmil.cohort.splits import make_splits
from srmil.graph import grid_edges
from srmil.mil.evaluate import evaluate_model
from srmil.mil.predict import PredictError, check_store, predict_slides
from srmil.mil.train import train_fold
from srmil.store import read_json, write_feature_store, write_graph_store
from srmil.workflow import predict_config

STRIDE = 224
ATTRS = {"extractor": "toy", "backbone": {"model": "toy"}, "weights_hash": "ab" * 32,
         "mpp": 0.5, "patch_px": 224, "stride_px": 224, "patch_level0": 224.0}


def write_cohort(root: Path, n_patients: int = 8, attrs: dict | None = None,
                 seed: int = 0, window: int = 1) -> tuple[pd.DataFrame, Path, Path]:
    """Stores of a learnable toy task (class 1: a shifted cluster of patches) with `attrs`, and
    graphs of `window`."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        slide_id, label = f"s{p:02d}", p % 2
        n = int(rng.integers(15, 30))
        cells = rng.choice(64, size=n, replace=False)
        coords = np.stack([cells % 8, cells // 8], axis=1) * STRIDE
        x = rng.normal(size=(n, 8)).astype(np.float32)
        if label:
            x[:6, :4] += 3.0
        write_feature_store(root / "features" / f"{slide_id}.zarr", x, coords, attrs or ATTRS,
                            dtype="float32")
        write_graph_store(root / "graphs" / f"{slide_id}.zarr",
                          grid_edges(coords, STRIDE, window=window), {"window": window})
        rows.append({"slide_id": slide_id, "path": "", "patient_id": f"P{p:02d}",
                     "label": f"class{label}", "annotation": "", "mpp": float("nan")})
    return pd.DataFrame(rows), root / "features", root / "graphs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    samples, features_dir, graphs_dir = write_cohort(root)
    splits = make_splits(samples, n_folds=2, val_fraction=0.0, seed=0)
    models_dir = root / "models"
    for k in range(2):
        train_fold("abmil", splits, k, samples, features_dir, graphs_dir,
                   models_dir / f"fold_{k}.pt", model_hparams={"hidden_dim": 16, "attn_dim": 8},
                   train_hparams={"epochs": 3}, device="cpu", threads=1)
    evaluate_model("abmil", models_dir, splits, samples, features_dir, graphs_dir,
                   root / "eval", device="cpu", threads=1, n_bootstrap=0)
    return root, samples, splits, models_dir


def test_predict_reproduces_evaluate_and_averages_the_folds(trained, tmp_path):
    root, samples, _, models_dir = trained
    table = predict_slides(samples, models_dir, root / "features", root / "graphs", tmp_path,
                           extractor="toy", device="cpu", threads=1)
    assert table.equals(pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False))
    assert (table["skipped"] == "").all()
    evaluated = pd.read_csv(root / "eval" / "predictions.csv").set_index("slide_id")
    table = table.set_index("slide_id")
    for slide_id, row in evaluated.iterrows():
        # The fold model that held the slide out gives the evaluate stage's probability.
        assert table.at[slide_id, f"prob_class1_fold{row['fold']}"] == pytest.approx(
            row["prob_class1"], abs=1e-6)
    for c in ("class0", "class1"):
        folds = table[[f"prob_{c}_fold0", f"prob_{c}_fold1"]].to_numpy()
        assert table[f"prob_{c}"].to_numpy() == pytest.approx(folds.mean(axis=1))
    assert (table["n_models"] == 2).all()
    assert list(table["prediction"]) == [
        "class1" if p > 0.5 else "class0" for p in table["prob_class1"]]
    assert list(table["label"]) == list(samples["label"])


def test_predict_without_labels(trained, tmp_path):
    root, samples, _, models_dir = trained
    unlabelled = samples.assign(label="")
    table = predict_slides(unlabelled, models_dir, root / "features", root / "graphs",
                           tmp_path, device="cpu")
    assert "label" not in table.columns and len(table) == len(samples)


def test_predict_refuses_another_extractor(trained, tmp_path):
    root, samples, _, models_dir = trained
    with pytest.raises(PredictError, match="trained on features from extractor 'toy', not 'uni'"):
        predict_slides(samples, models_dir, root / "features", root / "graphs", tmp_path,
                       extractor="uni")
    # Stores of the right name but other weights, or another patch size, are refused too.
    other, _, _ = write_cohort(tmp_path / "other", n_patients=2,
                               attrs={**ATTRS, "weights_hash": "cd" * 32})
    with pytest.raises(PredictError, match=r"s00\.zarr: features from extractor 'toy' \(weights "
                                           r"cdcdcdcdcdcd\).*\(weights abababababab\)"):
        predict_slides(other, models_dir, tmp_path / "other" / "features",
                       tmp_path / "other" / "graphs", tmp_path / "out")
    meta = read_json(models_dir / "fold_0.json")
    with pytest.raises(PredictError, match="patch_px=256"):
        check_store(meta, {**ATTRS, "patch_px": 256}, "x.zarr", models_dir)


def test_standalone_predict_refuses_another_backbone_before_reading(trained, tmp_path):
    """`srmil predict` on slide files runs the workflow with the model's extractor, tiling and
    graph; a config asking for other weights is refused before any slide is read."""
    _, _, _, models_dir = trained
    config = {"backbones": {"toy": {"model": "resnet18", "pretrained": False}}}
    with pytest.raises(PredictError, match="use the backbone the model was trained on"):
        predict_config(models_dir, tmp_path / "new.csv", config)


def test_cli_refuses_another_extractor_in_one_line(trained, tmp_path, capsys):
    root, samples, _, models_dir = trained
    sheet = tmp_path / "new.csv"
    samples.drop(columns=["label"]).assign(path="missing.svs").to_csv(sheet, index=False)
    code = main(["predict", "--samples", str(sheet), "--models-dir", str(models_dir),
                 "--out-dir", str(tmp_path / "out"), "--extractor", "uni",
                 "--features-dir", str(root / "features"), "--graphs-dir", str(root / "graphs"),
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith("srmil predict: error:") and "'toy', not 'uni'" in err


def test_predict_records_a_slide_without_patches(trained, tmp_path):
    _, _, _, models_dir = trained
    samples, features_dir, graphs_dir = write_cohort(tmp_path, n_patients=2)
    # An empty bag as the stages leave it: empty stores, tiling's reason in the feature store.
    write_feature_store(features_dir / "blank.zarr", np.zeros((0, 8), np.float32),
                        np.zeros((0, 2)), {**ATTRS, "skipped": "no tissue found"},
                        dtype="float32")
    write_graph_store(graphs_dir / "blank.zarr", np.zeros((2, 0)), {"window": 1})
    blank = {"slide_id": "blank", "path": "", "patient_id": "PB", "label": "",
             "annotation": "", "mpp": float("nan")}
    sheet = pd.concat([samples.iloc[:1], pd.DataFrame([blank]), samples.iloc[1:]])
    table = predict_slides(sheet.assign(label=""), models_dir, features_dir, graphs_dir,
                           tmp_path / "out", device="cpu", threads=1)

    saved = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert list(saved["slide_id"]) == ["s00", "blank", "s01"]  # every slide, in sheet order
    assert list(saved["skipped"]) == ["", "no tissue found", ""]
    assert list(saved["prediction"])[1] == "" and list(saved["n_models"]) == [2, 0, 2]
    empty = table.set_index("slide_id").loc["blank"]
    assert np.isnan(empty.filter(like="prob_").to_numpy(dtype=float)).all()
    assert table.drop(index=1).filter(like="prob_").notna().all().all()
    assert list(saved.columns)[-1] == "skipped"


def test_predict_refuses_graphs_built_with_another_window(trained, tmp_path):
    _, _, _, models_dir = trained
    meta = read_json(models_dir / "fold_0.json")
    assert meta["provenance"]["graph"] == {"window": 1}
    samples, features_dir, graphs_dir = write_cohort(tmp_path, n_patients=2, window=2)
    with pytest.raises(PredictError, match=r"s00\.zarr: graph built with window=2, but the model "
                                           r"in .* was trained on graphs with window=1"):
        predict_slides(samples, models_dir, features_dir, graphs_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_standalone_predict_takes_the_models_tiling_and_window(trained, tmp_path):
    _, _, _, models_dir = trained
    with pytest.raises(PredictError, match=r"graph\.window=2 in the config, but the model in .* "
                                           r"was trained on graphs with window=1"):
        predict_config(models_dir, tmp_path / "new.csv", {"graph": {"window": 2}})
    with pytest.raises(PredictError, match=r"tile\.patch_px: 256 in the config"):
        predict_config(models_dir, tmp_path / "new.csv", {"tile": {"patch_px": 256}})


def test_workflow_predict_refuses_other_settings_while_it_parses(trained):
    """`snakemake predict` checks the config against the model's files before any slide is
    read (srmil.workflow.check_predict_settings, called by the Snakefile); folds not trained
    yet pass, to be checked when they predict."""
    from srmil.settings import load_settings
    from srmil.workflow import check_predict_settings

    _, _, _, models_dir = trained
    fits = {"backbones": {"toy": {"model": "toy"}}, "features": {"extractors": ["toy"]},
            "tile": {"target_mpp": 0.5, "patch_px": 224}, "graph": {"window": 1},
            "predict": {"samples": "new.csv", "model": "abmil", "extractor": "toy",
                        "models_dir": str(models_dir)}}
    check_predict_settings(load_settings(fits))
    for change, message in (
        ({"tile": {"target_mpp": 0.25, "patch_px": 224}},
         r"tile\.target_mpp: 0\.25 in the config, but the model in .* was trained on 0\.5; "
         r"set tile\.target_mpp: 0\.5"),
        ({"tile": {"target_mpp": 0.5, "patch_px": 224, "overlap_px": 32}},
         r"tile\.stride_px: 192 in the config, .* trained on 224"),
        ({"graph": {"window": 2}}, r"graph\.window=2 in the config, .* set graph\.window: 1"),
        ({"backbones": {"toy": {"model": "resnet18"}}},
         r"backbones\.toy: model=resnet18, but the model in .* was trained on model=toy"),
    ):
        with pytest.raises(PredictError, match=message) as err:
            check_predict_settings(load_settings({**fits, **change}))
        assert "\n" not in str(err.value)
    untrained = {**fits, "predict": {**fits["predict"], "models_dir": str(models_dir / "none")}}
    check_predict_settings(load_settings({**untrained, "graph": {"window": 2}}))


def test_a_config_spec_leaving_defaults_out_is_the_same_backbone():
    """config.yaml writes a backbone as {model, pretrained}; the model file records the whole
    spec (kwargs, pool, weights): the defaults are the same backbone, another pool is not."""
    from srmil.mil.provenance import check_settings

    recorded = {"kwargs": {}, "model": "resnet18", "pool": "model", "pretrained": False,
                "weights": None}
    meta = {"provenance": {"features": {"weights_hash": "ab" * 32, "backbone": recorded,
                                        "mpp": 0.5, "patch_px": 224, "stride_px": 224}}}
    tile = {"target_mpp": 0.5, "patch_px": 224, "stride_px": None}
    check_settings(meta, "models", "r18", {"model": "resnet18", "pretrained": False}, tile, None)
    with pytest.raises(PredictError, match=r"backbones\.r18: pool=cls\+mean, but .* pool=model"):
        check_settings(meta, "models", "r18",
                       {"model": "resnet18", "pretrained": False, "pool": "cls+mean"}, tile, None)
