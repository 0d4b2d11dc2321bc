"""Metrics against hand-computed values, and a cross-validated run end to end on a toy task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from test_data import synthetic_cohort

from srmil.data import make_splits
from srmil.evaluate import classification_metrics, evaluate_model
from srmil.store import read_json
from srmil.train import train_fold

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
    "srmil": ({"heads": 2, "hidden_per_head": 8}, {"epochs": 8, "lr": 2e-3}),
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
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000


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
