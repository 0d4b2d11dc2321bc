"""Training one fold: files written, checkpoint reload, determinism, the model-selection rule,
the reconstruction loss falling, and the memory a training job asks for."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_data import FEATURE_ATTRS, STRIDE_PX, synthetic_cohort

from srmil.cohort.splits import make_splits
from srmil.device import torch_threads
from srmil.errors import InputError
from srmil.graph import grid_edges
from srmil.mil.bags import load_bag
from srmil.mil.inference import load_model, predict_bags
from srmil.mil.metrics import classification_metrics
from srmil.mil.train import first_selectable_epoch, select_epoch, train_fold
from srmil.settings import TileSettings, train_settings
from srmil.store import read_json, write_feature_store, write_graph_store
from srmil.workflow import MIN_TRAIN_MIB, train_memory_mb

QUICK = {"epochs": 3, "select_after": 0.5}
# One thread: these bags are tiny, and more threads only add contention on a shared CPU.
EMPTY = "p03s0"  # a slide without patches, in fold 0's training set
SMALL_SRMIL = {"heads": 2, "hidden_per_head": 8}  # keep the GAT layers tiny on the CPU


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    samples, features_dir, graphs_dir = synthetic_cohort(root, n_patients=9,
                                                         empty_slides=(EMPTY,))
    splits = make_splits(samples, n_folds=3, val_fraction=0.34, seed=0)
    return samples, splits, features_dir, graphs_dir


def _train(cohort, out_path, model_name="abmil", **kwargs):
    samples, splits, features_dir, graphs_dir = cohort
    kwargs.setdefault("train_hparams", QUICK)
    return train_fold(model_name, splits, 0, samples, features_dir, graphs_dir, out_path,
                      device="cpu", threads=1, **kwargs)


# --- the selection rule on hand-made epoch tables ---------------------------------------------


def test_first_selectable_epoch():
    assert first_selectable_epoch(100, 0.6) == 61
    assert first_selectable_epoch(3, 0.6) == 2
    assert first_selectable_epoch(10, 0.0) == 1
    assert first_selectable_epoch(5, 1.0) == 5


def test_select_epoch_best_accuracy_after_warmup_ties_by_auc_then_earlier():
    table = pd.DataFrame({
        "epoch": range(1, 11),
        "val_acc": [0.5, 0.9, 1.0, 0.6, 0.7, 0.8, 0.8, 0.9, 0.9, 0.9],
        "val_auc": [0.5, 0.9, 1.0, 0.6, 0.7, 0.8, 0.85, 0.80, 0.90, 0.90],
    })
    # Epoch 3 is best overall but before 60% of the epochs; 8, 9, 10 tie on accuracy,
    # 9 and 10 tie on AUC, and the earlier wins.
    assert select_epoch(table, epochs=10, select_after=0.6) == 9
    assert select_epoch(table, epochs=10, select_after=0.0) == 3
    assert select_epoch(table.iloc[:5], epochs=10, select_after=0.6) is None


def test_select_epoch_missing_auc_ranks_last_and_no_validation_takes_the_last_epoch():
    rows = [{"epoch": 1, "val_acc": 0.5, "val_auc": None},
            {"epoch": 2, "val_acc": 0.5, "val_auc": 0.6},
            {"epoch": 3, "val_acc": 0.5, "val_auc": math.nan}]
    assert select_epoch(rows, epochs=3, select_after=0.0) == 2
    no_val = [{"epoch": e, "val_acc": math.nan, "val_auc": math.nan} for e in (1, 2, 3, 4)]
    assert select_epoch(no_val, epochs=4, select_after=0.5) == 4


# --- configuration ----------------------------------------------------------------------------


def test_default_train_configs_follow_the_reference():
    srmil = train_settings("srmil").model_dump(mode="json")
    assert (srmil["optimizer"], srmil["lr"], srmil["weight_decay"]) == ("adamw", 5e-4, 1e-5)
    assert (srmil["epochs"], srmil["scheduler"], srmil["select_after"]) == (100, "cosine", 0.6)
    abmil = train_settings("abmil").model_dump(mode="json")
    assert (abmil["optimizer"], abmil["lr"], abmil["weight_decay"]) == ("adam", 2e-4, 1e-5)
    with pytest.raises(ValueError, match="unknown model"):
        train_settings("clam").model_dump(mode="json")
    with pytest.raises(ValueError, match="epoch\n  Extra inputs are not permitted"):
        train_settings("srmil", {"epoch": 3})
    with pytest.raises(ValueError, match="optimizer"):
        train_settings("srmil", {"optimizer": "sgd"})


# --- train_fold -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["abmil", "srmil"])
def test_train_fold_writes_checkpoint_json_and_log(cohort, tmp_path, model_name, caplog):
    samples, splits, features_dir, graphs_dir = cohort
    out = tmp_path / "models" / model_name / "fold_0.pt"
    hparams = SMALL_SRMIL if model_name == "srmil" else None
    with caplog.at_level(logging.WARNING):
        meta = _train(cohort, out, model_name, model_hparams=hparams)

    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not list(out.parent.glob(".*"))  # no temporary files left behind
    state = torch.load(out, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())

    saved = read_json(out.with_suffix(".json"))
    assert saved == meta
    assert saved["model"] == model_name and saved["in_dim"] == 16 and saved["fold"] == 0
    assert saved["classes"] == ["class0", "class1"]
    assert saved["split"] == splits["folds"][0]
    assert saved["train_config"]["epochs"] == 3 and saved["seed"] == 0
    assert saved["provenance"]["features"] == {"backbone": "toy", "weights_hash": "0" * 8,
                                                "mpp": 0.5, "patch_px": 224}
    assert {"srmil_version", "torch_version"} <= set(saved["provenance"])
    assert saved["provenance"]["graph"] == {"window": 1}  # the graph stores' parameters
    assert saved["selected_epoch"] >= first_selectable_epoch(3, 0.5)

    epochs = pd.read_csv(out.with_suffix(".csv"))
    assert list(epochs["epoch"]) == [1, 2, 3]
    assert {"lr", "train_loss", "train_ce", "train_acc", "val_loss", "val_acc", "val_auc",
            "selected"} <= set(epochs.columns)
    if model_name == "srmil":
        assert {"train_rec", "train_ce_masked", "train_ce_full"} <= set(epochs.columns)
    assert epochs["selected"].sum() == 1
    assert int(epochs.loc[epochs["selected"] == 1, "epoch"].iloc[0]) == saved["selected_epoch"]
    assert epochs["lr"].iloc[0] == pytest.approx(train_settings(model_name).lr)
    assert epochs["lr"].is_monotonic_decreasing  # cosine annealing

    assert EMPTY in splits["folds"][0]["train"]
    assert saved["skipped_empty"] == [EMPTY] and f"slide {EMPTY} has no patches" in caplog.text


def test_load_model_reproduces_the_selected_epoch(cohort, tmp_path):
    samples, splits, features_dir, graphs_dir = cohort
    out = tmp_path / "fold_0.pt"
    # Select early so that the saved state is not simply the last one.
    meta = _train(cohort, out, "srmil", model_hparams=SMALL_SRMIL,
                  train_hparams={"epochs": 4, "select_after": 0.0})
    model, loaded_meta = load_model(out)
    assert loaded_meta == meta and not model.training
    assert loaded_meta["model_hparams"]["hidden_per_head"] == 8

    val_bags = [load_bag(features_dir, graphs_dir, sid) for sid in splits["folds"][0]["val"]]
    val_bags = [b for b in val_bags if len(b)]
    labels = samples.set_index("slide_id").loc[[b.slide_id for b in val_bags], "label"]
    y = labels.map(meta["classes"].index).to_numpy()
    probs, attention = predict_bags(model, val_bags, "cpu")
    assert np.mean(probs.argmax(axis=1) == y) == pytest.approx(meta["selected_val"]["val_acc"])
    val_loss = -np.log(probs[np.arange(len(y)), y]).mean()
    assert val_loss == pytest.approx(meta["selected_val"]["val_loss"], rel=1e-5)
    assert [len(a) for a in attention] == [len(b) for b in val_bags]


def test_training_is_deterministic(cohort, tmp_path):
    first = _train(cohort, tmp_path / "a.pt", "srmil", model_hparams=SMALL_SRMIL)
    second = _train(cohort, tmp_path / "b.pt", "srmil", model_hparams=SMALL_SRMIL)
    state_a = torch.load(tmp_path / "a.pt", weights_only=True)
    state_b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # The files too, whatever their names: a rerun's checkpoint is byte for byte the same.
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))
    assert first["selected_epoch"] == second["selected_epoch"]
    assert not torch.are_deterministic_algorithms_enabled()  # global flag restored


def test_early_stopping_stops_after_patience(cohort, tmp_path):
    meta = _train(cohort, tmp_path / "fold_0.pt", "abmil",
                  train_hparams={"epochs": 30, "select_after": 0.0, "early_stopping_patience": 2,
                                 "lr": 1e-2})
    assert meta["epochs_run"] < 30
    assert meta["epochs_run"] == meta["selected_epoch"] + 2


def test_train_fold_refuses_graphs_built_with_different_parameters(tmp_path):
    samples, features_dir, graphs_dir = synthetic_cohort(tmp_path, n_patients=6)
    splits = make_splits(samples, n_folds=2, val_fraction=0.0, seed=0)
    other = splits["folds"][0]["train"][-1]
    coords = load_bag(features_dir, graphs_dir, other).coords
    write_graph_store(graphs_dir / f"{other}.zarr", grid_edges(coords, STRIDE_PX, window=2),
                      {"window": 2, "radius_cells": 2.84, "self_loops": True})
    with pytest.raises(InputError, match=rf"{other} have graphs built with different "
                                         r"parameters \({'window': 1} vs {'window': 2, "):
        train_fold("abmil", splits, 0, samples, features_dir, graphs_dir, tmp_path / "m.pt",
                   train_hparams=QUICK, device="cpu", threads=1)
    assert not (tmp_path / "m.pt").exists()


def smooth_cohort(root, n_patients: int = 9, dim: int = 16, seed: int = 0):
    """Stores whose features vary smoothly over the patch grid (per-slide phases of low-frequency
    sines, a little noise), so that neighbours predict a masked patch; class 1 is shifted."""
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.2, 0.6, size=(2, dim))  # radians per grid cell
    rows = []
    for p in range(n_patients):
        slide_id, label = f"p{p:02d}s0", p % 2
        n = int(rng.integers(30, 61))
        cells = rng.choice(100, size=n, replace=False)
        grid = np.stack([cells % 10, cells // 10], axis=1)
        x = np.sin(grid @ freq + rng.uniform(0, 2 * np.pi, size=dim))
        x += 0.1 * rng.normal(size=(n, dim)) + (1.0 if label else 0.0) * (np.arange(dim) < 4)
        coords = grid * STRIDE_PX
        write_feature_store(root / "features" / f"{slide_id}.zarr", x.astype(np.float32),
                            coords, FEATURE_ATTRS, dtype="float32")
        write_graph_store(root / "graphs" / f"{slide_id}.zarr",
                          grid_edges(coords, STRIDE_PX, window=1), {"window": 1})
        rows.append({"slide_id": slide_id, "path": "", "patient_id": f"P{p:02d}",
                     "label": f"class{label}", "annotation": "", "mpp": float("nan")})
    return pd.DataFrame(rows), root / "features", root / "graphs"


def test_reconstruction_loss_falls_under_the_default_joint_loss(tmp_path):
    """The label-free task is learned on a tiny cohort with SRMIL's defaults (w_rec 1.8, mask
    ratio 0.7, full-size layers): seen 0.50 to 0.66 of the first epochs' loss over seeds 0-5."""
    samples, features_dir, graphs_dir = smooth_cohort(tmp_path)
    splits = make_splits(samples, n_folds=3, val_fraction=0.34, seed=0)
    meta = train_fold("srmil", splits, 0, samples, features_dir, graphs_dir, tmp_path / "m.pt",
                      train_hparams={"epochs": 10}, device="cpu", threads=1)
    assert meta["model_hparams"]["w_rec"] == 1.8 and meta["model_hparams"]["mask_ratio"] == 0.7
    rec = pd.read_csv(tmp_path / "m.csv")["train_rec"]
    assert rec.iloc[-3:].mean() < 0.8 * rec.iloc[:3].mean(), rec.tolist()


# --- the memory a train_fold job asks for ------------------------------------------------------


def _shaped_store(path, name: str, shape: tuple[int, int]) -> None:
    """A Zarr store whose array has `shape` but no chunks written: only its metadata is read."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    group.create_array(name, shape=shape, dtype="float16" if name == "features" else "int64",
                       chunks=(min(shape[0], 4096), shape[1]))


def test_train_memory_covers_a_100k_patch_bag(tmp_path):
    features, graphs = tmp_path / "f.zarr", tmp_path / "g.zarr"
    _shaped_store(features, "features", (100_000, 512))
    _shaped_store(graphs, "edge_index", (2, 2_471_978))
    srmil = train_memory_mb("srmil", [features], [graphs])
    # docs/method.md: SRMIL peaks at 8.3 GiB (8500 MiB) on this bag, ABMIL at 2.6 GiB.
    assert 8500 < srmil < 10_500
    assert 2700 < train_memory_mb("abmil", [features], [graphs]) < srmil
    # Twice the patches in another slide: the step on the largest bag grows with it.
    _shaped_store(tmp_path / "big.zarr", "features", (200_000, 512))
    assert train_memory_mb("srmil", [features, tmp_path / "big.zarr"], [graphs]) > 1.8 * srmil
    # Stores not written yet (the workflow asks before the features exist): the minimum.
    assert train_memory_mb("srmil", [tmp_path / "missing.zarr"], []) == MIN_TRAIN_MIB


# --- learning the demo cohort -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory):
    """24 small demo slides through the real stages: segment, tile, features, graph.

    Small patches (112 px at 0.5 µm/px) so that the demo's small tumour regions fill a few of
    them, embedded by a randomly initialised resnet18 at 64 x 64 px to keep the CPU time low.
    """
    from srmil.cohort.samples import read_sample_sheet
    from srmil.demo.write import write_demo
    from srmil.features.backbones import load_backbone
    from srmil.features.extract import extract_features
    from srmil.graph import build_graph
    from srmil.wsi.segment import segment_slide
    from srmil.wsi.tiling import tile_slide

    root = tmp_path_factory.mktemp("demo_learning")
    sheet = write_demo(root / "demo", n_slides=24, seed=0, width_px=2048, height_px=1536,
                       progress=False)
    backbone = load_backbone({"model": "resnet18", "pretrained": False, "kwargs": {
        "pretrained_cfg_overlay": {"input_size": [3, 64, 64]}}})
    samples = read_sample_sheet(sheet)
    with torch_threads(1):
        for slide_id, slide in zip(samples["slide_id"], samples["path"], strict=True):
            tissue, tiles = root / f"{slide_id}.geojson", root / f"{slide_id}.tiles.json"
            segment_slide(slide, tissue, root / f"{slide_id}.qc.png")
            tile_slide(slide, tissue, tiles, TileSettings(patch_px=112))
            extract_features(slide, tiles, root / "features" / f"{slide_id}.zarr", backbone,
                             "resnet18", num_workers=0, device="cpu", amp="none",
                             progress=False)
            build_graph(tiles, root / "graphs" / f"{slide_id}.zarr")
    splits = make_splits(samples, n_folds=3, val_fraction=0.25, seed=0)
    return samples, splits, root / "features", root / "graphs", root


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["abmil", "srmil"])
def test_both_models_learn_the_demo_cohort_deterministically(demo_cohort, model_name):
    samples, splits, features_dir, graphs_dir, root = demo_cohort
    label_of = samples.set_index("slide_id")["label"]
    settings = {"train_hparams": {"epochs": 20}, "device": "cpu", "threads": 1, "seed": 0}
    y, probs = [], []
    for fold, membership in enumerate(splits["folds"]):
        out = root / model_name / f"fold_{fold}.pt"
        train_fold(model_name, splits, fold, samples, features_dir, graphs_dir, out, **settings)
        model, _ = load_model(out)
        bags = [load_bag(features_dir, graphs_dir, s) for s in membership["test"]]
        probs.append(predict_bags(model, bags, "cpu")[0])
        y += [splits["classes"].index(label_of[s]) for s in membership["test"]]
    metrics = classification_metrics(np.array(y), np.concatenate(probs), 2)
    # Held-out slides of all folds (chance: 0.5). Seen here: ABMIL 1.0; SRMIL 0.85 to 0.99.
    assert metrics["auc"] >= 0.75, metrics
    if model_name == "srmil":  # the label-free task is learned too
        for fold in range(len(splits["folds"])):
            rec = pd.read_csv(root / model_name / f"fold_{fold}.csv")["train_rec"]
            assert rec.iloc[-3:].mean() < 0.85 * rec.iloc[:3].mean(), rec.tolist()

    rerun = root / model_name / "rerun.pt"
    train_fold(model_name, splits, 0, samples, features_dir, graphs_dir, rerun, **settings)
    first = torch.load(root / model_name / "fold_0.pt", weights_only=True)
    second = torch.load(rerun, weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    pd.testing.assert_frame_equal(pd.read_csv(rerun.with_suffix(".csv")),
                                  pd.read_csv(root / model_name / "fold_0.csv"))
