"""Summaries across models and runs: the comparison table and the mask-ratio ablation (the
accuracy study is srmil.report.study)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from srmil.cohort.exclusion import write_left_out_html
from srmil.mil.attention import attention_logs, last_summary
from srmil.mil.metrics import METRIC_NAMES, METRICS
from srmil.report.plots import plot_ablation, plot_attention_diagnostics
from srmil.store import read_json, write_text

# The attention diagnostics in the comparison (last epoch, training set, mean over folds).
ATTENTION_ROWS = {"max_weight_median": "attention: median of slides' max weight",
                  "share_high": "attention: share of slides with a weight >= 0.5",
                  "top1_positive": "attention: top-1 patch positive",
                  "top5_positive": "attention: top-5 patches positive",
                  "high_positive": "attention: highly attended patches positive"}


def compare_models(metrics_paths: Sequence[str | os.PathLike],
                   out_csv: str | os.PathLike, out_md: str | os.PathLike,
                   models_dirs: Sequence[str | os.PathLike] = (),
                   out_png: str | os.PathLike | None = None,
                   out_left_out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Side-by-side table of models' metrics (pooled value with its bootstrap interval, mean and
    std over folds) as CSV and Markdown; with the models' folders, the attention diagnostics of
    all models in one figure; with `out_left_out`, an HTML table of the slides left out (excluded
    or skipped) and why. Returns the table (one row per model and metric)."""
    rows, logs, all_metrics = [], {}, []
    for i, path in enumerate(metrics_paths):
        metrics = read_json(path)
        all_metrics.append(metrics)
        model = metrics["model"]
        for name in METRICS:
            ci = (metrics.get("pooled_ci") or {}).get(name) or [None, None]
            rows.append({"model": model, "metric": name, "pooled": metrics["pooled"][name],
                         "ci_low": ci[0], "ci_high": ci[1], "fold_mean": metrics["mean"][name],
                         "fold_std": metrics["std"][name], "n_slides": metrics["n_slides"],
                         "ci_level": _ci_level(metrics)})
        if i < len(models_dirs):
            logs[model] = list(attention_logs(Path(models_dirs[i]),
                                               len(metrics["per_fold"])).values())
            summary = [last_summary(r) for r in logs[model]]
            for key in ATTENTION_ROWS:
                values = [s[key] for s in summary if s.get(key) is not None]
                rows.append({"model": model, "metric": f"attention_{key}",
                             "pooled": float(np.mean(values)) if values else None,
                             "n_slides": metrics["n_slides"]})
    table = pd.DataFrame(rows)
    write_text(out_csv, table.to_csv(index=False))
    write_text(out_md, _comparison_markdown(table))
    if out_png is not None:
        plot_attention_diagnostics(logs, Path(out_png))
    if out_left_out is not None:
        write_left_out_html(all_metrics, out_left_out)
    return table


def _comparison_markdown(table: pd.DataFrame) -> str:
    models = list(dict.fromkeys(table["model"]))
    levels = table["ci_level"].dropna()
    level = f"{100 * levels.iloc[0]:g}% " if len(levels) else ""
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for metric in dict.fromkeys(table["metric"]):
        cells = []
        for model in models:
            row = table[(table["model"] == model) & (table["metric"] == metric)]
            cells.append(_cell(row.iloc[0]) if len(row) else "")
        key = metric.removeprefix("attention_")
        name = METRIC_NAMES.get(metric) or ATTENTION_ROWS.get(key) or metric.replace("_", " ")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return ("Pooled over the test folds, with the patient-level bootstrap "
            f"{level}interval; then mean ± std over folds. Attention rows: the training set at "
            "the last epoch, mean over folds.\n\n" + "\n".join(lines) + "\n")


def _ci_level(metrics: dict[str, Any]) -> float | None:
    return (metrics.get("bootstrap") or {}).get("level")


def _cell(row: pd.Series) -> str:
    def fmt(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"

    text = fmt(row["pooled"])
    if "ci_low" in row and pd.notna(row.get("ci_low")):
        text += f" [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
    if "fold_mean" in row and pd.notna(row.get("fold_mean")):
        text += f"; {fmt(row['fold_mean'])} ± {fmt(row['fold_std'])}"
    return text


def summarise_ablation(metrics_paths: Sequence[str | os.PathLike], mask_ratios: Sequence[float],
                       out_csv: str | os.PathLike, out_png: str | os.PathLike) -> pd.DataFrame:
    """Metrics of SRMIL trained at each mask ratio (paper Fig. 5) as a CSV and a plot of AUC and
    accuracy against the ratio (pooled with the bootstrap interval; fold mean ± std)."""
    if len(metrics_paths) != len(mask_ratios):
        raise ValueError(f"{len(metrics_paths)} metrics files for {len(mask_ratios)} ratios")
    rows = []
    for ratio, path in sorted(zip(mask_ratios, metrics_paths, strict=True)):
        metrics = read_json(path)
        row = {"mask_ratio": float(ratio), "n_slides": metrics["n_slides"],
               "ci_level": _ci_level(metrics)}
        for name in METRICS:
            ci = (metrics.get("pooled_ci") or {}).get(name) or [None, None]
            row.update({name: metrics["pooled"][name], f"{name}_ci_low": ci[0],
                        f"{name}_ci_high": ci[1], f"{name}_fold_mean": metrics["mean"][name],
                        f"{name}_fold_std": metrics["std"][name]})
        rows.append(row)
    table = pd.DataFrame(rows)
    write_text(out_csv, table.to_csv(index=False))
    plot_ablation(table, Path(out_png))
    return table
