"""Metrics, bootstrap intervals and attention diagnostics against hand-computed values; a
cross-validated toy run end to end with its plots, the model comparison and the ablation summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import toy_plan
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_data import synthetic_cohort

from srmil.cohort.splits import make_splits
from srmil.demo.plan import NEGATIVE
from srmil.demo.write import write_slide
from srmil.errors import InputError
from srmil.mil.attention import (
    POSITIVE_AREA,
    AttentionRecorder,
    epoch_summaries,
    patch_annotation_fractions,
    positive_patches,
    slide_attention_stats,
    summarise_stats,
)
from srmil.mil.evaluate import evaluate_model
from srmil.mil.metrics import bootstrap_intervals, classification_metrics
from srmil.mil.train import train_fold
from srmil.report.heatmaps import draw_heatmap, read_patches
from srmil.report.plots import plot_roc
from srmil.report.summaries import compare_models, summarise_ablation
from srmil.store import read_json
from srmil.wsi.tiling import write_tiles

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- classification_metrics -------------------------------------------------------------------


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1), 2)
    # Positive/negative pairs ranked correctly: 0.4 > 0.1; 0.8 and 0.9 beat both -> 5 of 6.
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # F1 0.5 and 2/3


def test_three_class_metrics_by_hand():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6],
                      [0.3, 0.4, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    m = classification_metrics(y, probs, 3)
    # One-vs-rest AUCs 7/8, 6.5/8 (one tie counts half) and 1.
    assert m["auc"] == pytest.approx((7 / 8 + 6.5 / 8 + 1) / 3)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_metrics_with_a_missing_class_or_no_slides():
    m = classification_metrics(np.array([0, 0]), np.array([[0.8, 0.2], [0.3, 0.7]]), 2)
    assert m["auc"] is None
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5
    assert all(v is None for v in classification_metrics(np.zeros(0), np.zeros((0, 3)), 3).values())


# --- evaluate_model on a toy cohort -----------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    samples, features_dir, graphs_dir = synthetic_cohort(root, n_patients=18,
                                                         empty_slides=("p04s0",))
    splits = make_splits(samples, n_folds=3, val_fraction=0.2, seed=0)
    return root, samples, splits, features_dir, graphs_dir


TOY_SETTINGS = {
    "abmil": ({"hidden_dim": 32, "attn_dim": 16}, {"epochs": 8, "lr": 1e-3}),
    "srmil": ({"heads": 2, "hidden_per_head": 8}, {"epochs": 16, "lr": 2e-3}),
}


@pytest.fixture(scope="module")
def evaluated(cohort):
    root, samples, splits, features_dir, graphs_dir = cohort
    results = {}
    for model_name, (model_hparams, train_hparams) in TOY_SETTINGS.items():
        models_dir = root / "models" / model_name
        for k in range(splits["n_folds"]):
            train_fold(model_name, splits, k, samples, features_dir, graphs_dir,
                       models_dir / f"fold_{k}.pt", model_hparams=model_hparams,
                       train_hparams=train_hparams, device="cpu", threads=1)
        out_dir = root / "eval" / model_name
        results[model_name] = (evaluate_model(model_name, models_dir, splits, samples,
                                              features_dir, graphs_dir, out_dir, device="cpu",
                                              threads=1),
                               out_dir)
    return results


@pytest.mark.parametrize("model_name", ["abmil", "srmil"])
def test_evaluate_model_writes_metrics_predictions_and_plots(cohort, evaluated, model_name):
    _, samples, splits, _, _ = cohort
    metrics, out_dir = evaluated[model_name]
    assert read_json(out_dir / "metrics.json") == metrics
    assert metrics["model"] == model_name and metrics["skipped"] == ["p04s0"]
    assert metrics["n_slides"] == len(samples) - 1
    assert [f["fold"] for f in metrics["per_fold"]] == [0, 1, 2]
    for block in [metrics["pooled"], metrics["mean"], *metrics["per_fold"]]:
        assert all(0 <= block[k] <= 1 for k in ("auc", "accuracy", "balanced_accuracy",
                                                "macro_f1"))
    assert all(v >= 0 for v in metrics["std"].values())

    table = pd.read_csv(out_dir / "predictions.csv")
    assert sorted(table["slide_id"]) == sorted(set(samples["slide_id"]) - {"p04s0"})
    assert np.allclose(table[["prob_class0", "prob_class1"]].sum(axis=1), 1, atol=1e-5)
    assert set(table["prediction"]) <= {"class0", "class1"}
    for k, fold in enumerate(splits["folds"]):
        assert set(table.loc[table["fold"] == k, "slide_id"]) <= set(fold["test"])
    truth = samples.set_index("slide_id").loc[table["slide_id"], ["patient_id", "label"]]
    assert list(table["patient_id"]) == list(truth["patient_id"])
    assert list(table["label"]) == list(truth["label"])

    for name in ("roc.png", "confusion.png", "training_curves.png"):
        _image(out_dir / name)


@pytest.mark.parametrize("model_name", ["abmil", "srmil"])
def test_both_models_learn_the_toy_task(evaluated, model_name):
    metrics, _ = evaluated[model_name]
    assert metrics["pooled"]["auc"] > 0.8, metrics["pooled"]


def test_evaluate_refuses_a_model_trained_on_another_split(cohort, evaluated, tmp_path):
    root, samples, splits, features_dir, graphs_dir = cohort
    other = make_splits(samples, n_folds=3, seed=1)
    with pytest.raises(ValueError, match="another split"):
        evaluate_model("abmil", root / "models" / "abmil", other, samples, features_dir,
                       graphs_dir, tmp_path)


def test_evaluate_three_classes(tmp_path):
    samples, features_dir, graphs_dir = synthetic_cohort(tmp_path, n_patients=9, n_classes=3)
    splits = make_splits(samples, n_folds=3, val_fraction=0.0, seed=0)
    for k in range(3):
        train_fold("abmil", splits, k, samples, features_dir, graphs_dir,
                   tmp_path / "models" / f"fold_{k}.pt", train_hparams={"epochs": 2},
                   device="cpu", threads=1)
    metrics = evaluate_model("abmil", tmp_path / "models", splits, samples, features_dir,
                             graphs_dir, tmp_path / "eval", device="cpu", threads=1)
    assert metrics["classes"] == ["class0", "class1", "class2"] and metrics["n_slides"] == 9
    table = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    probs = table[[f"prob_class{c}" for c in range(3)]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert (tmp_path / "eval" / "roc.png").read_bytes().startswith(PNG_MAGIC)


# --- bootstrap intervals ----------------------------------------------------------------------


def test_bootstrap_of_a_perfect_classifier_is_a_point():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    ci = bootstrap_intervals(y, probs, 2, n_boot=200, seed=0)
    assert all(ci[name] == [1.0, 1.0] for name in ("auc", "accuracy", "balanced_accuracy",
                                                  "macro_f1"))


def test_bootstrap_by_hand_two_patients_one_right_one_wrong():
    # Two patients (two slides each): resampling patients gives accuracy 0, 1/2 or 1 with
    # probability 1/4, 1/2, 1/4. The 95% interval spans [0, 1]; the central 40% is 1/2.
    y = np.array([1, 1, 0, 0])
    probs = np.array([[0.2, 0.8], [0.3, 0.7], [0.1, 0.9], [0.4, 0.6]])  # P1 right, P2 wrong
    groups = ["P1", "P1", "P2", "P2"]
    wide = bootstrap_intervals(y, probs, 2, groups, n_boot=2000, level=0.95, seed=1)
    assert wide["accuracy"] == [0.0, 1.0]
    narrow = bootstrap_intervals(y, probs, 2, groups, n_boot=2000, level=0.4, seed=1)
    assert narrow["accuracy"] == [0.5, 0.5]
    # AUC needs both classes: only the mixed resamples count, and each of them has AUC 0.5.
    assert narrow["auc"] == [0.5, 0.5]


def test_bootstrap_replays_its_documented_draws():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 12)
    p1 = rng.random(12)
    probs = np.stack([1 - p1, p1], axis=1)
    groups = [f"P{i // 2}" for i in range(12)]
    ci = bootstrap_intervals(y, probs, 2, groups, n_boot=300, level=0.9, seed=7)
    draws = np.random.default_rng(7)
    members = [np.array([2 * g, 2 * g + 1]) for g in range(6)]
    accuracy = []
    for _ in range(300):
        idx = np.concatenate([members[g] for g in draws.integers(0, 6, 6)])
        accuracy.append(classification_metrics(y[idx], probs[idx], 2)["accuracy"])
    assert ci["accuracy"] == pytest.approx(list(np.percentile(accuracy, [5, 95])))
    assert ci == bootstrap_intervals(y, probs, 2, groups, n_boot=300, level=0.9, seed=7)
    assert ci != bootstrap_intervals(y, probs, 2, groups, n_boot=300, level=0.9, seed=8)


def test_metrics_equal_scikit_learn_on_random_inputs():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 4):
        for _ in range(50):
            n = int(rng.integers(3, 25))
            y = rng.integers(0, n_classes, n)
            probs = np.round(rng.dirichlet(np.ones(n_classes), n), 1)  # ties included
            probs /= probs.sum(axis=1, keepdims=True)
            m = classification_metrics(y, probs, n_classes)
            assert m["macro_f1"] == pytest.approx(
                f1_score(y, probs.argmax(1), average="macro", zero_division=0))
            if len(np.unique(y)) == n_classes:
                ref = (roc_auc_score(y, probs[:, 1]) if n_classes == 2
                       else roc_auc_score(y, probs, multi_class="ovr"))
                assert m["auc"] == pytest.approx(ref)


# --- attention diagnostics --------------------------------------------------------------------


HAND_ATTENTION = {
    # A: one dominant negative patch; top-5 holds 2 positives.
    "A": (np.array([0.6, 0.2, 0.1, 0.05, 0.03, 0.02]),
          np.array([False, True, True, False, False, True])),
    # B: uniform weights; ties go to the lower index, so the top-5 are patches 0-4 (3 positive).
    "B": (np.full(10, 0.1), np.array([True] * 3 + [False] * 7)),
    # C: a negative slide (no positive patch) with a dominant patch.
    "C": (np.array([0.9, 0.1]), None),
}


def test_slide_attention_stats_by_hand():
    a = slide_attention_stats(*HAND_ATTENTION["A"])
    assert a == {"max_weight": 0.6, "n_high": 1, "top1_positive": 0, "top1_n": 1,
                 "top5_positive": 2, "top5_n": 5, "high_positive": 0}
    b = slide_attention_stats(*HAND_ATTENTION["B"])
    assert (b["n_high"], b["top1_positive"], b["top5_positive"]) == (0, 1, 3)
    assert slide_attention_stats(*HAND_ATTENTION["C"]) == {"max_weight": 0.9, "n_high": 1}


def test_summary_and_recorder_by_hand():
    stats = [slide_attention_stats(*HAND_ATTENTION[s]) for s in "ABC"]
    summary = summarise_stats(stats)
    assert summary["share_high"] == pytest.approx(2 / 3)  # A and C
    assert summary["n_positive_slides"] == 2
    assert summary["top1_positive"] == pytest.approx(1 / 2)  # B's top patch only
    assert summary["top5_positive"] == pytest.approx(5 / 10)
    assert summary["high_positive"] == 0.0  # A's one highly attended patch is negative
    assert summary["max_weight_median"] == pytest.approx(0.6)

    positives = {s: HAND_ATTENTION[s][1] for s in "AB"}
    recorder = AttentionRecorder(list("ABC"), positives)
    recorder.add(1, [HAND_ATTENTION[s][0] for s in "ABC"])
    recorder.add(2, [np.array([0.1, 0.9, 0, 0, 0, 0]), np.full(10, 0.1), np.array([0.5, 0.5])])
    record = json.loads(json.dumps(recorder.to_json()))
    assert record["positive_slides"] == ["A", "B"]
    table = epoch_summaries(record)
    assert list(table["epoch"]) == [1, 2]
    first = table.iloc[0]
    for key in ("share_high", "top1_positive", "top5_positive", "high_positive"):
        assert first[key] == pytest.approx(summary[key])
    second = table.iloc[1]
    assert second["share_high"] == pytest.approx(2 / 3)  # A (0.9) and C (0.5, 0.5); not B
    assert second["high_positive"] == 1.0  # A's highly attended patch 1 is positive
    assert second["top1_positive"] == 1.0


def test_patch_annotation_fractions_by_hand(tmp_path):
    coords = np.array([[0, 0], [100, 0], [200, 0]])
    square = {"type": "Polygon", "coordinates": [[[50, 0], [250, 0], [250, 100], [50, 100],
                                                  [50, 0]]]}
    assert patch_annotation_fractions(coords, 100, [square]).tolist() == [0.5, 1, 0.5]
    thin = {"type": "Polygon", "coordinates": [[[0, 0], [115, 0], [115, 100], [0, 100],
                                                [0, 0]]]}
    path = tmp_path / "tumour.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": thin, "properties": {}}]}))
    # 100% of the first patch, 15% of the second (not over 20%), none of the third.
    assert positive_patches(coords, 100, path).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="annotation not found"):
        positive_patches(coords, 100, tmp_path / "missing.geojson")


def _box(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1],
                                                [x0, y0]]]}


@pytest.mark.parametrize(("width", "offset", "positive"),
                         [(19, 3.5, False), (19, 9.8, False), (21, 4.9, True), (21, 11.2, True)])
def test_the_20_percent_rule_is_exact_off_the_raster_grid(width, offset, positive):
    # A strip over `width`% of the middle patch, starting `offset` px in: off the tiling's
    # raster grid (100/16 px), which alone would read 19% as 25% and 21% as 18.75%.
    coords = np.array([[0, 0], [100, 0], [200, 0], [100, 100]])
    x0 = 100 + offset
    fractions = patch_annotation_fractions(coords, 100, [_box(x0, 0, x0 + width, 100)])
    assert fractions == pytest.approx([0, width / 100, 0, 0], rel=1e-12, abs=1e-12)
    assert (fractions > POSITIVE_AREA).tolist() == [False, positive, False, False]
    # The same strip lying along y, in the patch below.
    across = patch_annotation_fractions(coords, 100, [_box(100, 100 + offset, 200,
                                                           100 + offset + width)])
    assert across == pytest.approx([0, 0, 0, width / 100], rel=1e-12, abs=1e-12)


def test_a_thin_strip_and_a_hole_are_measured_exactly():
    # 2% of a patch inside one raster cell (14 px), and a square with a hole cut out.
    coords = np.array([[0, 0], [224, 0]])
    strip = _box(290.5, 0, 294.98, 224)
    donut = {"type": "Polygon", "coordinates": [_box(0, 0, 224, 224)["coordinates"][0],
                                                _box(56, 56, 168, 168)["coordinates"][0]]}
    assert patch_annotation_fractions(coords, 224, [strip, donut]) == pytest.approx(
        [0.75, 0.02], rel=1e-12)


def test_overlapping_and_self_crossing_annotations():
    coords = np.array([[0, 0], [100, 0], [0, 100]])
    # Two annotations over the same 30% of the first patch: counted once, not 60%.
    left = _box(0, 0, 30, 100)
    again = _box(0, 0, 30, 100)
    # A hole of one annotation does not erase another annotation under it.
    frame = {"type": "Polygon", "coordinates": [_box(100, 0, 200, 100)["coordinates"][0],
                                                _box(120, 20, 180, 80)["coordinates"][0]]}
    island = _box(140, 40, 160, 60)
    # A bow tie (the outline crosses itself): both triangles count, 2 x 1/4 of the patch.
    bow_tie = {"type": "Polygon", "coordinates": [[[0, 100], [100, 200], [100, 100],
                                                   [0, 200], [0, 100]]]}
    fractions = patch_annotation_fractions(coords, 100, [left, again, frame, island, bow_tie])
    assert fractions == pytest.approx([0.3, 1 - 0.36 + 0.04, 0.5], rel=1e-12)
    # No polygons, no patches, a degenerate ring: zeros, not errors.
    assert patch_annotation_fractions(coords, 100, []).tolist() == [0, 0, 0]
    assert patch_annotation_fractions(np.zeros((0, 2)), 100, [left]).shape == (0,)
    line = {"type": "Polygon", "coordinates": [[[0, 0], [50, 50], [0, 0]]]}
    assert patch_annotation_fractions(coords, 100, [line]).tolist() == [0, 0, 0]


# --- evaluation outputs, comparison, ablation -------------------------------------------------


def _image(path):
    import cv2

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, path
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.std() > 5, f"{path}: a blank image"
    return image


@pytest.mark.parametrize("model_name", ["abmil", "srmil"])
def test_evaluate_writes_intervals_and_attention_diagnostics(evaluated, model_name):
    metrics, out_dir = evaluated[model_name]
    assert metrics["bootstrap"] == {"n": 1000, "level": 0.95, "unit": "patient", "seed": 0}
    for name, value in metrics["pooled"].items():
        low, high = metrics["pooled_ci"][name]
        assert low <= value <= high, (name, low, value, high)
    for fold in metrics["per_fold"]:
        assert fold["ci"]["accuracy"][0] <= fold["accuracy"] <= fold["ci"]["accuracy"][1]
    # The toy cohort has no annotations: max weights and the share >= 0.5, no positives.
    last = metrics["attention_last_epoch"]["fold_0"]
    epochs = TOY_SETTINGS[model_name][1]["epochs"]
    assert last["epoch"] == epochs and last["n_positive_slides"] == 0
    assert 0 < last["max_weight_median"] <= 1 and last["top1_positive"] is None
    _image(out_dir / "attention_diagnostics.png")
    _image(out_dir / "roc.png")


def test_compare_models_side_by_side(cohort, evaluated, tmp_path):
    root = cohort[0]
    names = ["srmil", "abmil"]
    table = compare_models([evaluated[m][1] / "metrics.json" for m in names],
                           tmp_path / "comparison.csv", tmp_path / "comparison.md",
                           [root / "models" / m for m in names], tmp_path / "attention.png")
    assert list(dict.fromkeys(table["model"])) == names
    auc = table[table["metric"] == "auc"].set_index("model")
    for m in names:
        assert auc.at[m, "pooled"] == pytest.approx(evaluated[m][0]["pooled"]["auc"])
        assert auc.at[m, "ci_low"] == pytest.approx(evaluated[m][0]["pooled_ci"]["auc"][0])
    attention_rows = {f"attention_{k}" for k in ("max_weight_median", "share_high",
                                                  "top1_positive", "top5_positive",
                                                  "high_positive")}
    assert attention_rows <= set(table["metric"])
    md = (tmp_path / "comparison.md").read_text()
    assert "| metric | srmil | abmil |" in md and "| AUC |" in md
    # The toy cohort has no annotations, so the positive shares are undefined.
    assert "| attention: highly attended patches positive | n/a | n/a |" in md
    assert pd.read_csv(tmp_path / "comparison.csv").shape == table.shape
    _image(tmp_path / "attention.png")


def test_ablation_summary_sorted_by_ratio(evaluated, tmp_path):
    paths = [evaluated["srmil"][1] / "metrics.json", evaluated["abmil"][1] / "metrics.json"]
    table = summarise_ablation(paths, [0.9, 0.3], tmp_path / "ablation.csv",
                               tmp_path / "ablation.png")
    assert list(table["mask_ratio"]) == [0.3, 0.9]
    assert table.iloc[0]["auc"] == pytest.approx(evaluated["abmil"][0]["pooled"]["auc"])
    assert {"auc_ci_low", "accuracy_fold_std"} <= set(table.columns)
    _image(tmp_path / "ablation.png")
    with pytest.raises(ValueError, match="2 metrics files for 1 ratios"):
        summarise_ablation(paths, [0.5], tmp_path / "a.csv", tmp_path / "a.png")


def test_three_class_roc_has_a_panel_per_class(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    rows = []
    for i in range(30):
        p = rng.dirichlet([1, 1, 1])
        rows.append({"fold": i % 2, "label": classes[i % 3],
                     **{f"prob_{c}": v for c, v in zip(classes, p, strict=True)}})
    plot_roc(pd.DataFrame(rows), classes, tmp_path / "roc.png")
    assert _image(tmp_path / "roc.png").shape[1] > 3 * 400  # three panels side by side


# --- heatmaps ---------------------------------------------------------------------------------


def test_heatmap_of_a_hand_made_slide(tmp_path):
    row = {"slide_id": "s", "path": "slides/s.tif", "patient_id": "p", "label": NEGATIVE,
           "annotation": ""}
    write_slide(tmp_path, row, 0, 7, width_px=1024, height_px=768, mpp=0.5)
    slide = tmp_path / "slides" / "s.tif"
    # Six 128 px patches read at level 0, two rows of three on the grid, over the tissue.
    origin = np.array([384, 256])
    coords = origin + np.array([[0, 0], [128, 0], [256, 0], [0, 128], [128, 128], [256, 128]])
    plan = toy_plan(read_px=128, patch_px=128, patch_level0=128.0, stride_level0=128.0,
                    slide_width=1024, slide_height=768)
    write_tiles(tmp_path / "s.json", coords, np.ones(len(coords)), plan)
    # Annotated: all of patch 1, 30% of patch 5 (positive) and 10% of patch 3 (not).
    annotation = tmp_path / "s.geojson"
    boxes = origin[[0, 1, 0, 1]] + np.array([[128, 0, 256, 128], [256, 128, 294.4, 256],
                                             [0, 128, 12.8, 256]])
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": _box(*box)} for box in boxes.tolist()]}))
    attention = np.array([0.05, 0.3, 0.1, 0.15, 0.05, 0.35])

    top = draw_heatmap(tmp_path / "s.png", slide, tmp_path / "s.json", attention, annotation,
                       title="s · srmil", top_k=8, max_px=256)
    # All six (fewer than top_k), by weight; the tie 0.05 goes to the lower index.
    assert top["top_index"] == [5, 1, 3, 2, 0, 4]
    assert top["top_weight"] == pytest.approx([0.35, 0.3, 0.15, 0.1, 0.05, 0.05])
    assert top["top_positive"] == [True, True, False, False, False, False]
    assert positive_patches(coords, 128, annotation).tolist() == [False, True, False, False,
                                                                   False, True]
    # The annotation outline and the positive patches' frames are the image's pure red.
    assert _red_pixels(_image(tmp_path / "s.png")) > 1000
    with Image.open(tmp_path / "s.png") as image:  # compact: a palette PNG (report size)
        assert image.mode == "P"
    # The montage shows the patches as read from the slide at level 0.
    level0 = tifffile.imread(slide)
    patches = read_patches(slide, coords, plan)
    for (x, y), patch in zip(coords, patches, strict=True):
        assert np.array_equal(patch, level0[y:y + 128, x:x + 128])
    assert max(patch.std() for patch in patches) > 20  # some tissue, not only background

    top3 = draw_heatmap(tmp_path / "t.png", slide, tmp_path / "s.json", attention, top_k=3)
    assert top3["top_index"] == [5, 1, 3] and top3["top_positive"] == [False] * 3
    assert _red_pixels(_image(tmp_path / "t.png")) == 0  # no annotation, nothing red
    with pytest.raises(InputError, match=r"s\.json: 6 tiles but 5 attention weights"):
        draw_heatmap(tmp_path / "u.png", slide, tmp_path / "s.json", attention[:5])
    assert not (tmp_path / "u.png").exists()


def _red_pixels(bgr):
    b, g, r = (bgr[..., i].astype(int) for i in range(3))
    return int(((r > 200) & (g < 60) & (b < 60)).sum())
