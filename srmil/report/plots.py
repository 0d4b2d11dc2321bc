"""The evaluation's plots: ROC, confusion matrix, training curves, attention diagnostics and the
mask-ratio curve. Figures are bare matplotlib Figures (Agg, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from srmil.mil.metrics import METRIC_NAMES, binary_auc, labels_and_probs
from srmil.store import atomic_path


def figure(ncols: int = 1, width: float = 5.0, height: float = 4.5, nrows: int = 1):
    # A bare Figure renders with Agg and touches no pyplot state (safe in workers and tests).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_png(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


FPR_GRID = np.linspace(0, 1, 101)


def plot_roc(table: pd.DataFrame, classes: list[str], path: Path, title: str = "ROC") -> None:
    """One panel per positive class (binary: class 1; more: each one-vs-rest): a thin curve per
    fold, the mean of the fold curves (vertical averaging) with a ±1 std band."""
    targets = [1] if len(classes) == 2 else list(range(len(classes)))
    fig, axes = figure(ncols=len(targets), width=4.6, height=4.4)
    y, probs = labels_and_probs(table, classes)
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
    save_png(fig, path)


def _roc(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(positive, score)
    return fpr, tpr, binary_auc(positive, score)


def plot_confusion(y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path) -> None:
    from sklearn.metrics import confusion_matrix

    counts = confusion_matrix(y, probs.argmax(axis=1) if len(y) else y,
                              labels=range(len(classes)))
    fig, axes = figure(width=1.2 * len(classes) + 3, height=1.2 * len(classes) + 2.5)
    ax = axes[0, 0]
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center",
                color="white" if n > counts.max() / 2 else "black")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion (pooled test folds)")
    save_png(fig, path)


def plot_training_curves(csv_paths: list[Path], path: Path) -> None:
    """One panel per train loss part and per validation metric, one line per fold."""
    logs = {int(p.stem.split("_")[-1]): pd.read_csv(p) for p in csv_paths if p.is_file()}
    columns = sorted({c for t in logs.values() for c in t.columns
                      if c.startswith("train_") and c != "train_acc"})
    columns += ["train_acc", "val_loss", "val_acc", "val_auc"]
    fig, axes = figure(ncols=len(columns), width=3.2, height=3.0)
    for ax, column in zip(axes[0], columns, strict=True):
        for fold, t in sorted(logs.items()):
            if column in t.columns:
                ax.plot(t["epoch"], t[column], label=f"fold {fold}", lw=1)
                chosen = t[t["selected"] == 1]
                ax.plot(chosen["epoch"], chosen[column], "o", ms=4, color="black")
        ax.set(title=column, xlabel="epoch")
    if logs:
        axes[0, 0].legend(fontsize="small")
    save_png(fig, path)


MODEL_COLOURS = {"srmil": "tab:blue", "abmil": "tab:red"}


def plot_attention_diagnostics(logs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Paper Fig. 3 on the training set across epochs, one colour per model (folds pooled by
    their mean): (a) the distribution of each slide's maximum attention weight (median, quartile
    band, 5-95% band), (b) the share of slides with a weight >= 0.5, (c) the share of the top-1,
    top-5 and highly attended patches of positive slides that are positive."""
    from srmil.mil.attention import HIGH_ATTENTION, epoch_summaries

    fig, axes = figure(ncols=3, width=4.4, height=3.8)
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
    save_png(fig, path)


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
    fig, axes = figure(ncols=2, width=4.4, height=3.8)
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
    save_png(fig, path)
