"""The study summary's paired differences to SRMIL: per-seed differences, the t-interval over
seeds and the paired patient bootstrap, on hand-made predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from srmil.mil.metrics import classification_metrics
from srmil.report.study import (
    Run,
    model_order,
    paired_bootstrap,
    paired_differences,
    summarise_study,
)


def predictions(seed: int, quality: float, n_patients: int = 20) -> pd.DataFrame:
    """Two slides per patient, label by patient; class-1 probability `quality` apart."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = p % 2
        for s in range(2):
            p1 = float(np.clip(0.5 + (quality if label else -quality) + rng.normal(0, 0.2),
                               0.01, 0.99))
            rows.append({"slide_id": f"s{p:02d}_{s}", "patient_id": f"P{p:02d}",
                         "label": f"c{label}", "prob_c0": 1 - p1, "prob_c1": p1,
                         "fold": p % 3, "attention_max": 0.2})
    return pd.DataFrame(rows).sample(frac=1, random_state=seed)  # row order must not matter


def test_model_order_follows_the_catalogue():
    assert model_order(["dsmil", "abmil", "srmil_norec", "srmil", "custom"]) == [
        "srmil", "srmil_norec", "abmil", "dsmil", "custom"]


def test_paired_bootstrap_of_identical_runs_is_zero_and_of_better_runs_positive():
    a, b = predictions(0, 0.3), predictions(1, 0.05)
    same = paired_bootstrap([(a, a)], n_boot=50)
    assert same == {"auc": (0.0, 0.0), "accuracy": (0.0, 0.0)}
    better = paired_bootstrap([(a, b)], n_boot=200)
    assert 0 < better["auc"][0] < better["auc"][1]
    assert paired_bootstrap([(a, b)], n_boot=200) == better  # seeded: reproducible


def make_runs(tmp_path, seeds: list[int]) -> tuple[list[Run], pd.DataFrame, dict]:
    """SRMIL, ABMIL (better) and mean pooling on `seeds`: evaluation folders as the study's."""
    runs, main_rows, preds = [], [], {}
    for model, quality in (("srmil", 0.1), ("abmil", 0.3), ("meanpool", 0.1)):
        for seed in seeds:
            table = predictions(10 * seed + len(model), quality)
            folder = tmp_path / model / str(seed)
            folder.mkdir(parents=True)
            table.to_csv(folder / "predictions.csv", index=False)
            y = table["label"].str[1].astype(int).to_numpy()
            m = classification_metrics(y, table[["prob_c0", "prob_c1"]].to_numpy(), 2)
            metrics = {"n_slides": len(table), "pooled": m, "mean": m}
            (folder / "metrics.json").write_text(json.dumps(metrics))
            runs.append(Run(model, 0.7 if model == "srmil" else None, seed, folder))
            main_rows.append({"model": model, "seed": seed, "auc": m["auc"],
                              "accuracy": m["accuracy"]})
            preds[(model, seed)] = table
    return runs, pd.DataFrame(main_rows), preds


def test_paired_differences_and_summary(tmp_path):
    runs, main, preds = make_runs(tmp_path, [0, 1, 2])
    diffs = paired_differences(main, preds, n_boot=100).set_index("model")
    assert list(diffs.index) == ["abmil", "meanpool"]  # catalogue order, SRMIL left out
    auc = main.pivot(index="seed", columns="model", values="auc")
    expected = (auc["abmil"] - auc["srmil"]).mean()
    assert diffs.at["abmil", "auc_diff_mean"] == pytest.approx(expected)
    low, high = diffs.at["abmil", "auc_ci_seeds_low"], diffs.at["abmil", "auc_ci_seeds_high"]
    assert low < expected < high and diffs.at["abmil", "auc_better"] == 3
    assert diffs.at["abmil", "auc_ci_patients_low"] > 0  # clearly better on these patients

    table = summarise_study(runs, tmp_path / "out", main_ratio=0.7, n_boot=50)
    assert len(table) == 9
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Each model minus SRMIL, paired by seed" in summary
    assert "| abmil | +" in summary and "| meanpool |" in summary
    assert set(pd.read_csv(tmp_path / "out" / "differences.csv")["model"]) == {"abmil",
                                                                                 "meanpool"}
    assert (tmp_path / "out" / "study.png").stat().st_size > 5000


def test_one_seed_summary_claims_no_spread(tmp_path):
    """With one seed there is no sd over seeds: the summary shows the means alone."""
    runs, _, _ = make_runs(tmp_path, [0])
    summarise_study(runs, tmp_path / "out", main_ratio=0.7, n_boot=50)
    rows = [line for line in (tmp_path / "out" / "summary.md").read_text().splitlines()
            if line.startswith(("| srmil |", "| abmil |", "| meanpool |"))]
    assert len(rows) == 5 and not any("±" in row for row in rows)  # 3 models, 2 differences
    assert any(row.startswith("| abmil | +") and "| n/a |" in row for row in rows)
