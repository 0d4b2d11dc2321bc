"""Evaluate cross-validated models on their test folds: metrics with bootstrap intervals,
predictions, plots, attention heatmaps and diagnostics; compare models; summarise the mask-ratio
ablation."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from srmil.catalog import model_info
from srmil.data import Bag, load_bag
from srmil.errors import InputError
from srmil.exclusion import excluded_slides, write_left_out_html
from srmil.store import atomic_path, read_json, read_store_attrs, write_json, write_text

log = logging.getLogger(__name__)

METRICS = ("auc", "accuracy", "balanced_accuracy", "macro_f1")
METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                "macro_f1": "macro F1"}


@torch.no_grad()
def predict_bags(model: torch.nn.Module, bags: list[Bag],
                 device: str | torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, C) and per-patch attention of each bag, nothing masked."""
    model.eval()
    probs, attention = [], []
    for bag in bags:
        out = model(bag.x.to(device), bag.edge_index.to(device))
        probs.append(torch.softmax(out.logits.float(), dim=-1).cpu().numpy())
        attention.append(out.attention.float().cpu().numpy())
    if not probs:
        n_classes = int(getattr(model, "n_classes", 0))
        return np.zeros((0, n_classes), dtype=np.float32), []
    return np.stack(probs), attention


# --- metrics ---------------------------------------------------------------------------------


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           n_classes: int) -> dict[str, float | None]:
    """AUC (binary: P(class 1); multiclass: mean of the one-vs-rest AUCs), accuracy, balanced
    accuracy (mean recall over the classes in `y_true`) and macro F1 (over the classes in
    `y_true` or predicted) from the argmax. AUC is None unless every class occurs in `y_true`;
    all are None for an empty input. Equal to scikit-learn's, without its per-call overhead
    (the bootstrap calls this thousands of times)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), n_classes)
    if len(y_true) == 0:
        return dict.fromkeys(METRICS)
    y_pred = probs.argmax(axis=1)
    present = np.unique(y_true)
    f1 = []
    for c in np.union1d(present, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "auc": _auc(y_true, probs, n_classes, present),
        "accuracy": float(np.mean(y_pred == y_true)),
        "balanced_accuracy": float(np.mean([np.mean(y_pred[y_true == c] == c) for c in present])),
        "macro_f1": float(np.mean(f1)),
    }


def _auc(y_true: np.ndarray, probs: np.ndarray, n_classes: int,
         present: np.ndarray) -> float | None:
    if len(present) < n_classes:
        return None
    if n_classes == 2:
        return _binary_auc(y_true == 1, probs[:, 1])
    return float(np.mean([_binary_auc(y_true == c, probs[:, c]) for c in range(n_classes)]))


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg), ties counting one half (= the ROC area)."""
    ranks = rankdata(score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_intervals(y_true: np.ndarray, probs: np.ndarray, n_classes: int,
                        groups: Sequence[Any] | None = None, n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of every metric, resampling groups (patients: their slides
    are not independent) with replacement; without `groups`, single slides.

    Resample b draws `rng.integers(0, n_groups, n_groups)` from `np.random.default_rng(seed)`,
    in order. Resamples where a metric is undefined (AUC without every class) are left out of
    that metric's interval; None when no resample defines it.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), n_classes)
    if len(y_true) == 0 or n_boot < 1:
        return dict.fromkeys(METRICS)
    members = _group_members(groups, len(y_true))
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    for _ in range(n_boot):
        draw = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in draw])
        for name, value in classification_metrics(y_true[idx], probs[idx], n_classes).items():
            if value is not None:
                values[name].append(value)
    tail = (1 - level) / 2 * 100
    return {name: ([float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
                   if v else None) for name, v in values.items()}


def _group_members(groups: Sequence[Any] | None, n: int) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n)]
    codes, uniques = pd.factorize(pd.Series(list(groups)), sort=True)
    if len(codes) != n:
        raise ValueError(f"{len(codes)} groups for {n} slides")
    return [np.flatnonzero(codes == g) for g in range(len(uniques))]


# --- evaluate one model ----------------------------------------------------------------------


def evaluate_model(model_name: str, models_dir: str | os.PathLike, splits: dict,
                   samples: pd.DataFrame, features_dir: str | os.PathLike,
                   graphs_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   device: str = "auto", threads: int | None = None,
                   tiles_dir: str | os.PathLike | None = None, n_bootstrap: int = 1000,
                   ci_level: float = 0.95, seed: int = 0, top_patches: int = 8,
                   heatmap_px: int = 1024, max_heatmaps: int | None = None,
                   exclude_failed: bool = False) -> dict[str, Any]:
    """Predict every fold's test slides with `{models_dir}/fold_{k}.pt`; write metrics.json,
    predictions.csv, roc.png, confusion.png, training_curves.png, attention_diagnostics.png (when
    the models have `fold_{k}.attention.json`) and, with `tiles_dir`, heatmaps/{slide}.png
    (of at most `max_heatmaps` slides, classes taking turns, if given; none for models without
    attention, srmil.catalog). With `exclude_failed`, slides excluded after a failure
    (srmil.exclusion) are left out and listed with their reasons; without it, they are refused.

    Returns the metrics written to metrics.json.
    """
    from srmil.train import torch_threads  # imported here: train imports this module

    models_dir, out_dir = Path(models_dir), Path(out_dir)
    classes = list(splits["classes"])
    n_folds = len(splits["folds"])
    predictions, per_fold, skipped, attention = [], [], [], {}
    with torch_threads(threads):
        for k, membership in enumerate(splits["folds"]):
            rows, empty, fold_attention = _predict_fold(
                model_name, models_dir / f"fold_{k}.pt", k, membership, classes, samples,
                features_dir, graphs_dir, device, exclude_failed)
            table = pd.DataFrame(rows)
            y, probs = _labels_and_probs(table, classes)
            groups = table["patient_id"].tolist() if len(table) else None
            per_fold.append({"fold": k, "n_slides": len(rows),
                             **classification_metrics(y, probs, len(classes)),
                             "ci": bootstrap_intervals(y, probs, len(classes), groups,
                                                       n_bootstrap, ci_level, seed + k)})
            predictions += rows
            skipped += empty
            attention.update(fold_attention)

    table = pd.DataFrame(predictions)
    y_all, p_all = _labels_and_probs(table, classes)
    groups = table["patient_id"].tolist() if len(table) else None
    metrics = {
        "model": model_name,
        "classes": classes,
        "per_fold": per_fold,
        "pooled": classification_metrics(y_all, p_all, len(classes)),
        "pooled_ci": bootstrap_intervals(y_all, p_all, len(classes), groups, n_bootstrap,
                                         ci_level, seed),
        "bootstrap": {"n": n_bootstrap, "level": ci_level, "unit": "patient", "seed": seed},
        **_mean_std(per_fold),
        "n_slides": len(table),
        "skipped": sorted(skipped),
        # why each skipped slide has no patches, as tiling recorded it
        "skipped_reasons": {sid: read_store_attrs(Path(features_dir) / f"{sid}.zarr").get(
            "skipped", "no patches") for sid in sorted(skipped)},
        # slides of any part of any fold left out after a failure (exclude_failed_slides)
        **_excluded(features_dir, splits),
    }
    attention_logs = _attention_logs(models_dir, n_folds)
    if attention_logs:
        metrics["attention_last_epoch"] = {
            f"fold_{k}": _last_summary(record) for k, record in attention_logs.items()}
    write_text(out_dir / "predictions.csv", table.to_csv(index=False))
    write_json(out_dir / "metrics.json", metrics)
    plot_roc(table, classes, out_dir / "roc.png", title=f"ROC: {model_name}")
    plot_confusion(y_all, p_all, classes, out_dir / "confusion.png")
    plot_training_curves([models_dir / f"fold_{k}.csv" for k in range(n_folds)],
                         out_dir / "training_curves.png")
    plot_attention_diagnostics({model_name: list(attention_logs.values())},
                               out_dir / "attention_diagnostics.png")
    if tiles_dir is not None:
        shown = table if max_heatmaps is None else _heatmap_selection(table, max_heatmaps)
        if not model_info(model_name).attention:  # mean pooling: uniform, an empty folder
            shown = shown.iloc[:0]
        write_heatmaps(shown, attention, samples, tiles_dir, out_dir / "heatmaps", model_name,
                       classes, top_patches, heatmap_px)
    return metrics


def _excluded(features_dir: str | os.PathLike, splits: dict) -> dict[str, Any]:
    slide_ids = [s for fold in splits["folds"] for part in ("train", "val", "test")
                 for s in fold.get(part, [])]
    reasons = excluded_slides(features_dir, slide_ids)
    return {"excluded": sorted(reasons), "excluded_reasons": reasons}


def _heatmap_selection(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """At most n slides: the first of each class by slide id, then the second, and so on."""
    if table.empty:
        return table
    ordered = table.sort_values("slide_id")
    turn = ordered.groupby("label").cumcount()
    return ordered.assign(_turn=turn).sort_values(["_turn", "label"]).head(n).drop(
        columns="_turn")


def _predict_fold(model_name: str, pt_path: Path, fold: int, membership: dict,
                  classes: list[str], samples: pd.DataFrame, features_dir: str | os.PathLike,
                  graphs_dir: str | os.PathLike, device: str, exclude_failed: bool = False
                  ) -> tuple[list[dict[str, Any]], list[str], dict[str, np.ndarray]]:
    """Prediction rows for the fold's test slides, the ids of those skipped as empty, and each
    slide's attention (excluded slides are left out: `_excluded` lists them)."""
    from srmil.train import load_model, resolve_device

    if not pt_path.is_file():
        raise InputError(f"{pt_path}: model of fold {fold} not found; run the train step")
    dev = resolve_device(device)
    model, meta = load_model(pt_path, device=dev)
    _check_model_matches(meta, model_name, classes, membership, pt_path)
    bags = [load_bag(features_dir, graphs_dir, sid, exclude_failed) for sid in membership["test"]]
    bags = [b for b in bags if not b.excluded]
    empty = [b.slide_id for b in bags if len(b) == 0]
    for slide_id in empty:
        log.warning("slide %s has no patches; skipped", slide_id)
    bags = [b for b in bags if len(b) > 0]
    probs, attention = predict_bags(model, bags, dev)
    rows = _prediction_rows(bags, probs, attention, fold, classes, samples.set_index("slide_id"))
    return rows, empty, {b.slide_id: a for b, a in zip(bags, attention, strict=True)}


def _check_model_matches(meta: dict, model_name: str, classes: list[str], membership: dict,
                         path: Path) -> None:
    # A model trained on another split would be tested on its own training slides.
    if meta["model"] != model_name:
        raise InputError(f"{path}: holds a {meta['model']!r} model, not {model_name!r}")
    if list(meta["classes"]) != classes or set(meta["split"]["test"]) != set(membership["test"]):
        raise InputError(f"{path}: trained on other classes or another split than the one given; "
                         "retrain with these splits")


def _prediction_rows(bags: list[Bag], probs: np.ndarray, attention: list[np.ndarray], fold: int,
                     classes: list[str], sample_rows: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for bag, p, att in zip(bags, probs, attention, strict=True):
        row = {"slide_id": bag.slide_id, "patient_id": sample_rows.at[bag.slide_id, "patient_id"],
               "fold": fold, "label": str(sample_rows.at[bag.slide_id, "label"])}
        row.update({f"prob_{c}": float(v) for c, v in zip(classes, p, strict=True)})
        row["prediction"] = classes[int(np.argmax(p))]
        # The largest attention weight: near 1 means one patch decides the slide (paper Fig. 3).
        row["attention_max"] = float(att.max()) if att.size else float("nan")
        rows.append(row)
    return rows


def _labels_and_probs(table: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if table.empty:
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(classes)))
    y = table["label"].map(classes.index).to_numpy(dtype=np.int64)
    return y, table[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)


def _mean_std(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and population standard deviation over folds; folds where a metric is None are left
    out."""
    mean, std = {}, {}
    for name in METRICS:
        values = [f[name] for f in per_fold if f[name] is not None]
        mean[name] = float(np.mean(values)) if values else None
        std[name] = float(np.std(values)) if values else None
    return {"mean": mean, "std": std}


def _attention_logs(models_dir: Path, n_folds: int) -> dict[int, dict[str, Any]]:
    paths = {k: models_dir / f"fold_{k}.attention.json" for k in range(n_folds)}
    return {k: read_json(p) for k, p in paths.items() if p.is_file()}


def _last_summary(record: dict[str, Any]) -> dict[str, Any]:
    from srmil.attention import epoch_summaries

    table = epoch_summaries(record)
    if table.empty:
        return {}
    last = table.iloc[-1].to_dict()
    counts = ("epoch", "n_slides", "n_positive_slides")
    return {k: (int(v) if k in counts else None if np.isnan(v) else float(v))
            for k, v in last.items()}


def write_heatmaps(table: pd.DataFrame, attention: dict[str, np.ndarray], samples: pd.DataFrame,
                   tiles_dir: str | os.PathLike, out_dir: Path, model_name: str,
                   classes: list[str], top_patches: int = 8, heatmap_px: int = 1024) -> None:
    """One heatmap PNG per predicted slide into `out_dir` (a folder replaced as a whole)."""
    from srmil.heatmaps import draw_heatmap

    sample_rows = samples.set_index("slide_id")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for row in table.itertuples(index=False):
            probs = ", ".join(f"{c} {getattr(row, f'prob_{c}', float('nan')):.2f}"
                              for c in classes if f"prob_{c}" in table.columns)
            label = f"true {row.label} · " if "label" in table.columns else ""
            fold = f"fold {row.fold} · " if "fold" in table.columns else ""
            draw_heatmap(tmp / f"{row.slide_id}.png", sample_rows.at[row.slide_id, "path"],
                         Path(tiles_dir) / f"{row.slide_id}.json", attention[row.slide_id],
                         annotation=sample_rows.at[row.slide_id, "annotation"] or None,
                         title=f"{row.slide_id} · {model_name} · {fold}{label}P: {probs}",
                         top_k=top_patches, max_px=heatmap_px)


# --- comparing models, the mask-ratio ablation -----------------------------------------------


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
            logs[model] = list(_attention_logs(Path(models_dirs[i]),
                                               len(metrics["per_fold"])).values())
            summary = [_last_summary(r) for r in logs[model]]
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


# --- plots -----------------------------------------------------------------------------------


def _figure(ncols: int = 1, width: float = 5.0, height: float = 4.5, nrows: int = 1):
    # A bare Figure renders with Agg and touches no pyplot state (safe in workers and tests).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


FPR_GRID = np.linspace(0, 1, 101)


def plot_roc(table: pd.DataFrame, classes: list[str], path: Path, title: str = "ROC") -> None:
    """One panel per positive class (binary: class 1; more: each one-vs-rest): a thin curve per
    fold, the mean of the fold curves (vertical averaging) with a ±1 std band."""
    targets = [1] if len(classes) == 2 else list(range(len(classes)))
    fig, axes = _figure(ncols=len(targets), width=4.6, height=4.4)
    y, probs = _labels_and_probs(table, classes)
    folds = sorted(table["fold"].unique()) if "fold" in table.columns and len(table) else []
    for ax, c in zip(axes[0], targets, strict=True):
        curves = []
        for k in folds:
            idx = np.flatnonzero(table["fold"].to_numpy() == k)
            positive = y[idx] == c
            if positive.all() or not positive.any():  # a ROC needs both classes
                ax.plot([], [], lw=0.9, label=f"fold {k} (AUC n/a)")
                continue
            fpr, tpr, auc = _roc(positive, probs[idx, c])
            ax.plot(fpr, tpr, lw=0.9, alpha=0.7, label=f"fold {k} (AUC {auc:.3f})")
            curve = np.interp(FPR_GRID, fpr, tpr)
            curve[0] = 0.0
            curves.append((curve, auc))
        if curves:
            stack = np.stack([c for c, _ in curves])
            mean, std = stack.mean(axis=0), stack.std(axis=0)
            mean[-1] = 1.0
            aucs = [a for _, a in curves]
            ax.plot(FPR_GRID, mean, color="black", lw=2.2,
                    label=f"mean (AUC {np.mean(aucs):.3f} ± {np.std(aucs):.3f})")
            ax.fill_between(FPR_GRID, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1),
                            color="grey", alpha=0.25, label="± 1 std")
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        name = title if len(targets) == 1 else f"{title}: {classes[c]} vs rest"
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
               ylim=(0, 1.02), title=name)
        ax.legend(loc="lower right", fontsize="x-small")
    _save(fig, path)


def _roc(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(positive, score)
    return fpr, tpr, _binary_auc(positive, score)


def plot_confusion(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> None:
    from sklearn.metrics import confusion_matrix

    counts = confusion_matrix(y, probs.argmax(axis=1) if len(y) else y,
                              labels=range(len(classes)))
    fig, axes = _figure(width=1.2 * len(classes) + 3, height=1.2 * len(classes) + 2.5)
    ax = axes[0, 0]
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center",
                color="white" if n > counts.max() / 2 else "black")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion (pooled test folds)")
    _save(fig, path)


def plot_training_curves(csv_paths: list[Path], path: Path) -> None:
    """One panel per train loss part and per validation metric, one line per fold."""
    logs = {int(p.stem.split("_")[-1]): pd.read_csv(p) for p in csv_paths if p.is_file()}
    columns = sorted({c for t in logs.values() for c in t.columns
                      if c.startswith("train_") and c != "train_acc"})
    columns += ["train_acc", "val_loss", "val_acc", "val_auc"]
    fig, axes = _figure(ncols=len(columns), width=3.2, height=3.0)
    for ax, column in zip(axes[0], columns, strict=True):
        for fold, t in sorted(logs.items()):
            if column in t.columns:
                ax.plot(t["epoch"], t[column], label=f"fold {fold}", lw=1)
                chosen = t[t["selected"] == 1]
                ax.plot(chosen["epoch"], chosen[column], "o", ms=4, color="black")
        ax.set(title=column, xlabel="epoch")
    if logs:
        axes[0, 0].legend(fontsize="small")
    _save(fig, path)


MODEL_COLOURS = {"srmil": "tab:blue", "abmil": "tab:red"}


def plot_attention_diagnostics(logs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Paper Fig. 3 on the training set across epochs, one colour per model (folds pooled by
    their mean): (a) the distribution of each slide's maximum attention weight (median, quartile
    band, 5-95% band), (b) the share of slides with a weight >= 0.5, (c) the share of the top-1,
    top-5 and highly attended patches of positive slides that are positive."""
    from srmil.attention import HIGH_ATTENTION, epoch_summaries

    fig, axes = _figure(ncols=3, width=4.4, height=3.8)
    ax_max, ax_high, ax_pos = axes[0]
    styles = {"top1_positive": "-", "top5_positive": "--", "high_positive": ":"}
    any_positive = False
    for i, (model, records) in enumerate(logs.items()):
        colour = MODEL_COLOURS.get(model, f"C{i + 2}")
        if not records:
            continue
        weights = _max_weight_by_epoch(records)
        epochs = np.array(sorted(weights))
        q = np.array([np.percentile(weights[e], [5, 25, 50, 75, 95]) for e in epochs])
        ax_max.fill_between(epochs, q[:, 0], q[:, 4], color=colour, alpha=0.12, lw=0)
        ax_max.fill_between(epochs, q[:, 1], q[:, 3], color=colour, alpha=0.3, lw=0)
        ax_max.plot(epochs, q[:, 2], color=colour, lw=1.8, label=model)
        summary = pd.concat([epoch_summaries(r) for r in records]).groupby("epoch").mean(
            numeric_only=True)
        ax_high.plot(summary.index, summary["share_high"], color=colour, lw=1.8, label=model)
        for key, style in styles.items():
            if summary[key].notna().any():
                any_positive = True
                ax_pos.plot(summary.index, summary[key], color=colour, ls=style, lw=1.5,
                            label=f"{model} {key.split('_')[0].replace('high', 'weight ≥ 0.5')}")
    ax_max.set(xlabel="epoch", ylabel="max attention weight per slide", ylim=(0, 1.02),
               title="(a) max attention weight")
    ax_max.axhline(HIGH_ATTENTION, color="grey", ls=":", lw=0.8)
    ax_high.set(xlabel="epoch", ylabel=f"share of slides with a weight ≥ {HIGH_ATTENTION}",
                ylim=(-0.02, 1.02), title="(b) slides with a dominant patch")
    ax_pos.set(xlabel="epoch", ylabel="share of those patches that are positive",
               ylim=(-0.02, 1.02), title="(c) attended patches in the tumour")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_max, ax_high, ax_pos):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_max, ax_high):
        if logs and any(logs.values()):
            ax.legend(fontsize="small")
    if any_positive:
        ax_pos.legend(fontsize="x-small")
    else:
        ax_pos.text(0.5, 0.5, "no annotated positive\ntraining slides", ha="center",
                    va="center", transform=ax_pos.transAxes, color="grey")
    _save(fig, path)


def _max_weight_by_epoch(records: list[dict[str, Any]]) -> dict[int, np.ndarray]:
    """Every fold's per-slide maximum weights, pooled per epoch."""
    pooled: dict[int, list[float]] = {}
    for record in records:
        for row in record["epochs"]:
            pooled.setdefault(int(row["epoch"]), []).extend(row["max_weight"])
    return {e: np.asarray(v, dtype=np.float64) for e, v in pooled.items() if v}


def plot_ablation(table: pd.DataFrame, path: Path) -> None:
    """AUC and accuracy against the mask ratio: pooled with its bootstrap interval, and the mean
    ± std over folds."""
    fig, axes = _figure(ncols=2, width=4.4, height=3.8)
    levels = table["ci_level"].dropna() if "ci_level" in table.columns else pd.Series([])
    level = f"{100 * levels.iloc[0]:g}%" if len(levels) else "bootstrap"
    for ax, name in zip(axes[0], ("auc", "accuracy"), strict=True):
        x = table["mask_ratio"].to_numpy(dtype=float)
        value = pd.to_numeric(table[name], errors="coerce").to_numpy(dtype=float)
        low = pd.to_numeric(table[f"{name}_ci_low"], errors="coerce").to_numpy(dtype=float)
        high = pd.to_numeric(table[f"{name}_ci_high"], errors="coerce").to_numpy(dtype=float)
        ax.errorbar(x, value, yerr=[np.nan_to_num(value - low), np.nan_to_num(high - value)],
                    fmt="o-", color="tab:blue", capsize=3, label=f"pooled ({level} CI)")
        mean = pd.to_numeric(table[f"{name}_fold_mean"], errors="coerce").to_numpy(dtype=float)
        std = pd.to_numeric(table[f"{name}_fold_std"], errors="coerce").to_numpy(dtype=float)
        ax.errorbar(x + 0.006, mean, yerr=np.nan_to_num(std), fmt="s--", color="tab:orange",
                    capsize=3, ms=4, label="fold mean ± std")
        ax.set(xlabel="mask ratio", ylabel=METRIC_NAMES[name], ylim=(0, 1.02),
               title=f"SRMIL {METRIC_NAMES[name]} vs mask ratio")
        ax.legend(fontsize="small")
    _save(fig, path)
