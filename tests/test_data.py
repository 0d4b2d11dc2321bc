"""Splits and bags: patient grouping, stratification, determinism, store round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from srmil.cli import main as cli_main
from srmil.cohort.splits import fold_count, make_splits, read_split_file
from srmil.errors import InputError
from srmil.mil.bags import load_bag
from srmil.store import read_json, write_feature_store, write_graph_store, write_json

STRIDE_PX = 224
FEATURE_ATTRS = {"backbone": "toy", "weights_hash": "0" * 8, "mpp": 0.5, "patch_px": 224}


def synthetic_cohort(root: Path, n_patients: int = 12, slides_per_patient: int = 1,
                     n_classes: int = 2, dim: int = 16, seed: int = 0,
                     empty_slides: tuple[str, ...] = ()) -> tuple[pd.DataFrame, Path, Path]:
    """Feature and graph stores for a learnable toy task, plus the samples table.

    Class c > 0 slides hold a spatial cluster of patches whose features 4c..4c+3 are shifted
    upwards; class 0 slides are pure noise. Slides named in `empty_slides` have no patches.
    """
    from srmil.graph import grid_edges

    rng = np.random.default_rng(seed)
    features_dir, graphs_dir = root / "features", root / "graphs"
    rows = []
    for p in range(n_patients):
        label = p % n_classes
        for s in range(slides_per_patient):
            slide_id = f"p{p:02d}s{s}"
            n = 0 if slide_id in empty_slides else int(rng.integers(20, 61))
            cells = rng.choice(100, size=n, replace=False)
            coords = np.stack([cells % 10, cells // 10], axis=1) * STRIDE_PX
            x = rng.normal(size=(n, dim)).astype(np.float32)
            if label > 0 and n:
                near = np.argsort(np.abs(coords - coords[0]).sum(axis=1))[:8]
                x[np.ix_(near, range(4 * label, 4 * label + 4))] += 2.5
            write_feature_store(features_dir / f"{slide_id}.zarr", x, coords, FEATURE_ATTRS,
                                dtype="float32")
            write_graph_store(graphs_dir / f"{slide_id}.zarr",
                              grid_edges(coords, STRIDE_PX, window=1), {"window": 1})
            rows.append({"slide_id": slide_id, "path": "", "patient_id": f"P{p:02d}",
                         "label": f"class{label}", "annotation": "", "mpp": float("nan")})
    return pd.DataFrame(rows), features_dir, graphs_dir


def samples_table(n_per_class: dict[str, int], max_slides: int = 3, seed: int = 0) -> pd.DataFrame:
    """A samples table (no stores) with 1..max_slides slides per patient."""
    rng = np.random.default_rng(seed)
    rows, p = [], 0
    for label, n in n_per_class.items():
        for _ in range(n):
            for s in range(int(rng.integers(1, max_slides + 1))):
                rows.append({"slide_id": f"s{p:03d}_{s}", "patient_id": f"P{p:03d}",
                             "label": label})
            p += 1
    return pd.DataFrame(rows)


# --- make_splits ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_per_class", [{"neg": 18, "pos": 12}, {"a": 9, "b": 7, "c": 6}])
def test_splits_are_grouped_stratified_and_cover_every_slide(n_per_class):
    samples = samples_table(n_per_class)
    splits = make_splits(samples, n_folds=3, val_fraction=0.25, seed=1)
    assert splits["classes"] == sorted(n_per_class)
    assert splits["n_folds"] == 3 and len(splits["folds"]) == 3

    all_slides = set(samples["slide_id"])
    test_slides = [s for f in splits["folds"] for s in f["test"]]
    assert sorted(test_slides) == sorted(all_slides)  # every slide in exactly one test fold

    patient_of = dict(zip(samples["slide_id"], samples["patient_id"], strict=True))
    label_of = samples.groupby("patient_id")["label"].first()
    for fold in splits["folds"]:
        parts = {name: set(fold[name]) for name in ("train", "val", "test")}
        assert set.union(*parts.values()) == all_slides
        assert sum(map(len, parts.values())) == len(all_slides)  # disjoint
        patients = {name: {patient_of[s] for s in ids} for name, ids in parts.items()}
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]
        for label, n in n_per_class.items():
            n_test = sum(label_of[p] == label for p in patients["test"])
            assert abs(n_test - n / 3) <= 1  # stratified at patient level
            assert any(label_of[p] == label for p in patients["val"])
            assert any(label_of[p] == label for p in patients["train"])


def test_splits_are_deterministic_and_ignore_row_order():
    samples = samples_table({"neg": 10, "pos": 8})
    first = make_splits(samples, seed=3)
    assert make_splits(samples.sample(frac=1, random_state=7), seed=3) == first
    assert make_splits(samples, seed=4) != first


def test_splits_without_validation():
    splits = make_splits(samples_table({"neg": 6, "pos": 6}), val_fraction=0.0)
    assert all(fold["val"] == [] for fold in splits["folds"])


@pytest.mark.parametrize(("n_per_class", "message"), [
    ({"pos": 10}, "only one class"),
    ({"neg": 10, "pos": 2}, "class 'pos' has 2 patient"),
])
def test_splits_refuse_impossible_cohorts(n_per_class, message):
    with pytest.raises(ValueError, match=message):
        make_splits(samples_table(n_per_class), n_folds=3)


def test_splits_refuse_a_patient_with_two_labels():
    samples = samples_table({"neg": 5, "pos": 5}, max_slides=1)
    samples.loc[0, "patient_id"] = samples.loc[9, "patient_id"]
    with pytest.raises(ValueError, match="different labels"):
        make_splits(samples)


# --- fixed split files -----------------------------------------------------------------------


@pytest.fixture
def sheet() -> pd.DataFrame:
    """8 patients (P000-P003 neg, P004-P007 pos); P001 and P005 have two slides."""
    rows = []
    for p in range(8):
        for s in range(2 if p in (1, 5) else 1):
            rows.append({"slide_id": f"s{p}{'ab'[s]}", "patient_id": f"P{p:03d}",
                         "label": "neg" if p < 4 else "pos"})
    return pd.DataFrame(rows)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def test_split_csv_by_slide_with_folds(tmp_path, sheet):
    lines = ["slide_id,part,fold"]
    for fold, test in enumerate([("s0a", "s4a"), ("s2a", "s6a")]):
        for slide in sheet["slide_id"]:
            part = "test" if slide in test else "val" if slide in ("s3a", "s7a") else "train"
            lines.append(f"{slide},{part},{fold}")
    path = write_csv(tmp_path / "split.csv", "\n".join(lines))
    assert fold_count(path) == 2
    splits = read_split_file(path, sheet)
    assert splits["classes"] == ["neg", "pos"] and splits["n_folds"] == 2
    assert splits["split_file"] == str(path)
    assert splits["folds"][0] == {"test": ["s0a", "s4a"], "val": ["s3a", "s7a"],
                                  "train": ["s1a", "s1b", "s2a", "s5a", "s5b", "s6a"]}
    assert splits["folds"][1]["test"] == ["s2a", "s6a"]


def test_split_csv_by_patient_one_fold_draws_validation(tmp_path, sheet):
    path = write_csv(tmp_path / "split.csv", """
patient_id,part
P000,test
P004,test
P001,train
P002,train
P003,train
P005,train
P006, Train
P007,train
""")
    assert fold_count(path) == 1
    splits = read_split_file(path, sheet, val_fraction=0.25, seed=1)
    (fold,) = splits["folds"]
    assert fold["test"] == ["s0a", "s4a"]
    # One validation patient per class drawn from training; a patient's slides move together.
    val_patients = {s[1] for s in fold["val"]}
    assert len(val_patients) == 2 and {int(p) < 4 for p in val_patients} == {True, False}
    assert not set(fold["val"]) & set(fold["train"])
    assert sorted(fold["val"] + fold["train"]) == ["s1a", "s1b", "s2a", "s3a", "s5a", "s5b",
                                                   "s6a", "s7a"]
    assert read_split_file(path, sheet, val_fraction=0.25, seed=1) == splits  # seeded
    assert read_split_file(path, sheet, val_fraction=0.0)["folds"][0]["val"] == []


def test_split_json_and_reusing_a_splits_file(tmp_path, sheet):
    made = make_splits(sheet, n_folds=2, val_fraction=0.25, seed=0)
    write_json(tmp_path / "splits.json", made)
    again = read_split_file(tmp_path / "splits.json", sheet)
    assert again["folds"] == made["folds"] and again["classes"] == made["classes"]
    assert fold_count(tmp_path / "splits.json") == 2


@pytest.mark.parametrize(("text", "message"), [
    ("slide_id,part\ns0a,test\nnope,train", "slide_id 'nope' not in the sample sheet"),
    ("slide_id,part\ns1a,test\ns1b,train\ns4a,train\ns0a,train",
     "patient 'P001' has slides in both the train and the test part of fold 0"),
    ("slide_id,part\ns0a,test\ns0a,train", "'s0a' appears twice in fold 0"),
    ("slide_id,part\ns0a,testing", "row 2 has part 'testing'"),
    ("slide_id,part,fold\ns0a,test,0\ns4a,train,2", "fold 1 has no rows"),
    ("slide_id,part,fold\ns0a,test,x", "row 2 has fold 'x'"),
    ("slide_id,part\ns0a,train\ns4a,train", "fold 0 has no test slides"),
    ("slide_id,part\ns0a,test\ns1a,train\ns2a,train", "holds only class 'neg'"),
    ("slide,part\ns0a,test", "needs one id column"),
    ("slide_id,patient_id,part\ns0a,P000,test", "needs one id column"),
])
def test_split_csv_errors_name_the_file_and_the_fix(tmp_path, sheet, text, message):
    path = write_csv(tmp_path / "split.csv", text)
    with pytest.raises(InputError, match=message) as err:
        read_split_file(path, sheet)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "cannot read the split file as JSON"),
    ('{"folds": []}', 'needs "folds"'),
    ('{"folds": [{"train": ["s0a"], "test": "s4a"}]}', "fold 0 must map"),
    ('{"folds": [{"train": ["s0a"], "test": ["s0a"]}]}', "'s0a' appears twice"),
])
def test_split_json_errors(tmp_path, sheet, content, message):
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_split_file(path, sheet)
    with pytest.raises(InputError, match="split file not found"):
        fold_count(tmp_path / "missing.csv")


def test_cli_splits_with_a_split_file(tmp_path, sheet, capsys):
    sheet_path = tmp_path / "samples.csv"
    sheet.assign(path="x.svs").to_csv(sheet_path, index=False)
    split = write_csv(tmp_path / "split.csv", "patient_id,part\nP000,test\nP004,test\n" + "\n".join(
        f"P{p:03d},train" for p in (1, 2, 3, 5, 6, 7)))
    out = tmp_path / "splits.json"
    assert cli_main(["splits", "--samples", str(sheet_path), "--out", str(out),
                     "--split-file", str(split), "--val-fraction", "0.25"]) == 0
    assert read_json(out)["folds"][0]["test"] == ["s0a", "s4a"]
    bad = write_csv(tmp_path / "bad.csv", "patient_id,part\nP999,test")
    assert cli_main(["splits", "--samples", str(sheet_path), "--out", str(out),
                     "--split-file", str(bad)]) == 1
    assert "P999" in capsys.readouterr().err


# --- load_bag ---------------------------------------------------------------------------------


def test_load_bag_round_trip_and_empty_slide(tmp_path):
    samples, features_dir, graphs_dir = synthetic_cohort(tmp_path, n_patients=2,
                                                         empty_slides=("p01s0",))
    bag = load_bag(features_dir, graphs_dir, "p00s0")
    assert bag.slide_id == "p00s0"
    assert bag.x.dtype == torch.float32 and bag.x.shape[1] == 16
    assert bag.edge_index.dtype == torch.int64 and bag.edge_index.shape[0] == 2
    assert int(bag.edge_index.max()) < len(bag) == len(bag.coords)
    assert bag.attrs["backbone"] == "toy"

    empty = load_bag(features_dir, graphs_dir, "p01s0")
    assert len(empty) == 0 and tuple(empty.x.shape) == (0, 16)
    assert tuple(empty.edge_index.shape) == (2, 0)


def test_load_bag_refuses_a_graph_of_another_slide(tmp_path):
    samples, features_dir, graphs_dir = synthetic_cohort(tmp_path, n_patients=1)
    write_graph_store(graphs_dir / "p00s0.zarr", np.array([[0, 500], [500, 0]]), {})
    with pytest.raises(ValueError, match="rerun the graphs step"):
        load_bag(features_dir, graphs_dir, "p00s0")
    with pytest.raises(ValueError, match="run the features step"):
        load_bag(features_dir, graphs_dir, "nope")
