"""Summarise the accuracy study (`snakemake study`): models trained with several seeds, each on
its own patient-level folds. Gives the mean and spread over seeds of the pooled test AUC and
accuracy, every model's paired difference to SRMIL with intervals (over seeds, and over
patients by a paired bootstrap), each model's attention diagnostics (does attention collapse onto
single patches, paper Fig. 3) and SRMIL's mask-ratio curve (paper Fig. 5)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from srmil.errors import InputError
from srmil.mil.attention import HIGH_ATTENTION
from srmil.mil.catalog import MODEL_NAMES
from srmil.mil.metrics import classification_metrics, group_members
from srmil.report.plots import figure, save_png
from srmil.store import read_json, write_text

SMALL_ATTENTION = 0.1  # the paper's SRMIL keeps most slides' largest weight below this
REFERENCE = "srmil"  # the model every other one is compared with, seed by seed


@dataclass(frozen=True)
class Run:
    """One model trained with one seed: its evaluation folder (metrics.json, predictions.csv)."""

    model: str
    mask_ratio: float | None  # SRMIL's ratio; None for models without masking
    seed: int
    eval_dir: Path


def parse_run(model: str, ratio: str, seed: str, eval_dir: str) -> Run:
    """A run from the CLI's `--run MODEL RATIO SEED EVAL_DIR` ("-" = no mask ratio)."""
    return Run(model, None if ratio == "-" else float(ratio), int(seed), Path(eval_dir))


def read_run(run: Run) -> tuple[dict, pd.DataFrame]:
    """The run's metrics.json and predictions.csv."""
    metrics_path = run.eval_dir / "metrics.json"
    predictions_path = run.eval_dir / "predictions.csv"
    for path in (metrics_path, predictions_path):
        if not path.is_file():
            raise InputError(f"{path}: not found; run `snakemake study` to evaluate this run")
    return read_json(metrics_path), pd.read_csv(predictions_path)


def run_row(run: Run, metrics: dict, predictions: pd.DataFrame) -> dict[str, object]:
    """One row of runs.csv: pooled test metrics, and the attention of the test slides (final
    models) and of the training slides (last epoch, with the share of top-1 patches in tumour)."""
    att = predictions["attention_max"].to_numpy(dtype=float)
    att = att[np.isfinite(att)]
    row: dict[str, object] = {
        "model": run.model, "mask_ratio": run.mask_ratio, "seed": run.seed,
        "n_slides": metrics["n_slides"],
        "auc": metrics["pooled"]["auc"], "accuracy": metrics["pooled"]["accuracy"],
        "auc_fold_mean": metrics["mean"]["auc"],
        "test_max_attention_median": float(np.median(att)) if att.size else None,
        "test_share_max_ge_0.5": float(np.mean(att >= HIGH_ATTENTION)) if att.size else None,
        "test_share_max_lt_0.1": float(np.mean(att < SMALL_ATTENTION)) if att.size else None,
    }
    last = metrics.get("attention_last_epoch") or {}
    for key in ("max_weight_median", "share_high", "top1_positive", "top5_positive"):
        values = [f[key] for f in last.values() if f.get(key) is not None]
        row[f"train_{key}"] = float(np.mean(values)) if values else None
    return row


def _with_sd(mean: str, sd: float) -> str:
    """'mean ± sd', or the mean alone where the sd is undefined (one seed: a "± 0.000" would
    claim a spread)."""
    return mean if pd.isna(sd) else f"{mean} ± {sd:.3f}"


def _mean_sd(values: pd.Series) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "n/a"
    return _with_sd(f"{values.mean():.3f}", values.std(ddof=1))  # NaN for one value


def _is_main(table: pd.DataFrame, main_ratio: float | None) -> pd.Series:
    """The main model of each name: SRMIL at its configured ratio, other models as they are."""
    return (table["model"] != "srmil") | (table["mask_ratio"] == main_ratio)


def curve_runs(table: pd.DataFrame) -> pd.DataFrame:
    """SRMIL's runs for the mask-ratio curve: only seeds trained at every ratio, so that each
    point averages the same seeds (the curve may use fewer seeds than the comparison)."""
    srmil = table[table["model"] == "srmil"].dropna(subset=["mask_ratio"])
    n_ratios = srmil["mask_ratio"].nunique()
    complete = srmil.groupby("seed")["mask_ratio"].nunique() == n_ratios
    return srmil[srmil["seed"].isin(complete[complete].index)]


def model_order(models: object) -> list[str]:
    """Models in the catalogue's order (SRMIL, its variants, the baselines), unknown ones last."""
    known = {m: i for i, m in enumerate(MODEL_NAMES)}
    return sorted(set(models), key=lambda m: (known.get(m, len(known)), m))


def _t_interval(diff: pd.Series, level: float) -> tuple[float, float] | None:
    """Student-t interval of the mean of per-seed differences (None for fewer than 2 seeds)."""
    diff = diff.dropna()
    if len(diff) < 2:
        return None
    half = stats.t.ppf(0.5 + level / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return float(diff.mean() - half), float(diff.mean() + half)


def _aligned(predictions: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    classes = [c.removeprefix("prob_") for c in predictions.columns if c.startswith("prob_")]
    return predictions.sort_values("slide_id").reset_index(drop=True), classes


def paired_bootstrap(pairs: list[tuple[pd.DataFrame, pd.DataFrame]], n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """Percentile interval of the seed-mean difference (model - reference) of pooled AUC and
    accuracy, resampling patients with replacement; one resample applies to every seed, whose
    test folds together hold each slide once. `pairs`: (model, reference) predictions per seed."""
    tables = []
    for ours, ref in pairs:
        (ours, classes), (ref, _) = _aligned(ours), _aligned(ref)
        if list(ours["slide_id"]) != list(ref["slide_id"]):
            raise InputError("paired runs predicted different slides; rerun the study")
        y = ours["label"].astype(str).map(classes.index).to_numpy()
        prob = [t[[f"prob_{c}" for c in classes]].to_numpy(dtype=float) for t in (ours, ref)]
        tables.append((ours["patient_id"].astype(str).tolist(), y, *prob, len(classes)))
    if not tables or len({tuple(t[0]) for t in tables}) != 1:
        return {"auc": None, "accuracy": None}
    members = group_members(tables[0][0], len(tables[0][0]))
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {"auc": [], "accuracy": []}
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        per_seed: dict[str, list[float]] = {"auc": [], "accuracy": []}
        for _, y, p_model, p_ref, n_classes in tables:
            a = classification_metrics(y[idx], p_model[idx], n_classes)
            b = classification_metrics(y[idx], p_ref[idx], n_classes)
            for name in per_seed:
                if a[name] is not None and b[name] is not None:
                    per_seed[name].append(a[name] - b[name])
        for name, values in per_seed.items():
            if len(values) == len(tables):
                diffs[name].append(float(np.mean(values)))
    tail = (1 - level) / 2 * 100
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
            if v else None for name, v in diffs.items()}


def paired_differences(main: pd.DataFrame, predictions: dict[tuple[str, int], pd.DataFrame],
                       n_boot: int = 1000, level: float = 0.95) -> pd.DataFrame:
    """Each model minus SRMIL, paired by seed: mean, sd, the t-interval over seeds, the paired
    patient bootstrap interval, and the seeds where the model is better / equal / worse."""
    if REFERENCE not in set(main["model"]):
        return pd.DataFrame()
    rows = []
    ref_rows = main[main["model"] == REFERENCE].set_index("seed")
    for model in model_order(main["model"]):
        if model == REFERENCE:
            continue
        ours = main[main["model"] == model].set_index("seed")
        seeds = sorted(set(ours.index) & set(ref_rows.index))
        if not seeds:
            continue
        boot = paired_bootstrap([(predictions[(model, s)], predictions[(REFERENCE, s)])
                                 for s in seeds if (model, s) in predictions
                                 and (REFERENCE, s) in predictions], n_boot, level)
        row: dict[str, object] = {"model": model, "n_seeds": len(seeds)}
        for name in ("auc", "accuracy"):
            diff = (pd.to_numeric(ours.loc[seeds, name], errors="coerce")
                    - pd.to_numeric(ref_rows.loc[seeds, name], errors="coerce"))
            seeds_ci = _t_interval(diff, level) or (None, None)
            patients_ci = boot[name] or (None, None)
            row.update({f"{name}_diff_mean": diff.mean(), f"{name}_diff_sd": diff.std(ddof=1),
                        f"{name}_ci_seeds_low": seeds_ci[0],
                        f"{name}_ci_seeds_high": seeds_ci[1],
                        f"{name}_ci_patients_low": patients_ci[0],
                        f"{name}_ci_patients_high": patients_ci[1],
                        f"{name}_better": int((diff > 0).sum()),
                        f"{name}_equal": int((diff == 0).sum()),
                        f"{name}_worse": int((diff < 0).sum())})
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(low: object, high: object) -> str:
    return "n/a" if low is None or pd.isna(low) else f"[{low:+.3f}, {high:+.3f}]"


def summary_markdown(table: pd.DataFrame, main: pd.DataFrame,
                     differences: pd.DataFrame | None = None, level: float = 0.95) -> str:
    """Mean ± sd over seeds (sample sd) of each main model, every model's paired difference to
    SRMIL, and SRMIL's mask-ratio curve."""
    n_seeds = main["seed"].nunique()
    lines = [f"Seeds: {n_seeds} ({', '.join(str(s) for s in sorted(main['seed'].unique()))}); "
             f"slides per run: {int(main['n_slides'].iloc[0])}. "
             f"{'Mean ± sd over seeds' if n_seeds > 1 else 'One seed, no sd'}; AUC and "
             "accuracy pooled over each seed's test folds.", "",
             "| model | AUC | accuracy | test slides: median max attention | share >= 0.5 | "
             "share < 0.1 | training slides: top-1 patch in tumour |",
             "|---|---|---|---|---|---|---|"]
    for model in model_order(main["model"]):
        rows = main[main["model"] == model]
        lines.append(
            f"| {model} | {_mean_sd(rows['auc'])} | {_mean_sd(rows['accuracy'])} | "
            f"{_mean_sd(rows['test_max_attention_median'])} | "
            f"{_mean_sd(rows['test_share_max_ge_0.5'])} | "
            f"{_mean_sd(rows['test_share_max_lt_0.1'])} | "
            f"{_mean_sd(rows['train_top1_positive'])} |")
    if differences is not None and not differences.empty:
        pct = f"{100 * level:g}%"
        lines += ["", f"Each model minus SRMIL, paired by seed (same folds): mean ± sd over "
                  f"seeds, the {pct} t-interval over seeds (training and fold variation) and the "
                  f"{pct} paired bootstrap interval over patients (which slides happen to be in "
                  "the cohort) of the seed-mean difference; seeds better / equal / worse than "
                  "SRMIL.", "",
                  "| model | AUC - SRMIL | seeds CI | patients CI | better/equal/worse | "
                  "accuracy - SRMIL | seeds CI | patients CI | better/equal/worse |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in differences.itertuples(index=False):
            cells = []
            for name in ("auc", "accuracy"):
                mean, sd = getattr(row, f"{name}_diff_mean"), getattr(row, f"{name}_diff_sd")
                cells += ["n/a" if pd.isna(mean) else _with_sd(f"{mean:+.3f}", sd),
                          _interval(getattr(row, f"{name}_ci_seeds_low"),
                                    getattr(row, f"{name}_ci_seeds_high")),
                          _interval(getattr(row, f"{name}_ci_patients_low"),
                                    getattr(row, f"{name}_ci_patients_high")),
                          "/".join(str(getattr(row, f"{name}_{k}"))
                                   for k in ("better", "equal", "worse"))]
            lines.append(f"| {row.model} | " + " | ".join(cells) + " |")
    ratios = curve_runs(table)
    if ratios["mask_ratio"].nunique() > 1:
        seeds = ", ".join(str(s) for s in sorted(ratios["seed"].unique()))
        lines += ["", f"SRMIL against the mask ratio (seeds {seeds}):", "",
                  "| mask ratio | AUC | accuracy | test slides: median max attention |",
                  "|---|---|---|---|"]
        for ratio, rows in ratios.groupby("mask_ratio", sort=True):
            lines.append(f"| {ratio:g} | {_mean_sd(rows['auc'])} | "
                         f"{_mean_sd(rows['accuracy'])} | "
                         f"{_mean_sd(rows['test_max_attention_median'])} |")
    return "\n".join(lines) + "\n"


def colours(i: int) -> tuple[float, ...]:
    """Distinct colours for up to 20 models."""
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def plot_study(table: pd.DataFrame, main: pd.DataFrame, max_weights: dict[str, pd.DataFrame],
               path: Path) -> None:
    """(a) AUC per seed of each main model; (b) the test slides' largest attention weights,
    pooled over seeds, by true label; (c) SRMIL's AUC against the mask ratio, mean ± sd over
    seeds."""
    models = model_order(main["model"])
    fig, axes = figure(ncols=3, width=max(4.2, 0.45 * len(models) + 1.5), height=3.8)
    ax_auc, ax_att, ax_ratio = axes[0]
    for i, model in enumerate(models):
        rows = main[main["model"] == model].sort_values("seed")
        auc = pd.to_numeric(rows["auc"], errors="coerce").to_numpy(dtype=float)
        ax_auc.scatter(np.full(len(auc), i) + np.linspace(-0.1, 0.1, len(auc)), auc, s=18)
        ax_auc.errorbar(i + 0.25, np.nanmean(auc), yerr=np.nanstd(auc, ddof=1) if len(auc) > 1
                        else 0, fmt="k_", capsize=4)
    ax_auc.set(xticks=range(len(models)), ylim=(0, 1.02), ylabel="AUC",
               title="(a) test AUC per seed")
    ax_auc.set_xticklabels(models, rotation=45 if len(models) > 3 else 0, ha="right"
                           if len(models) > 3 else "center")
    bins = np.logspace(-3, 0, 31)
    for i, model in enumerate(models):
        weights = max_weights.get(model)
        if weights is None or weights.empty:
            continue
        # One colour per model; solid lines the slides of one label, dashed the others'.
        for j, (label, rows) in enumerate(weights.groupby("label", sort=True)):
            ax_att.hist(np.clip(rows["attention_max"], bins[0], 1), bins=bins, histtype="step",
                        lw=1.5, color=colours(i), ls="-" if j == 0 else "--",
                        label=f"{model}, {label}")
    ax_att.axvline(HIGH_ATTENTION, color="grey", ls="--", lw=0.8)
    ax_att.axvline(SMALL_ATTENTION, color="grey", ls=":", lw=0.8)
    ax_att.set(xscale="log", xlabel="largest attention weight of a slide", ylabel="slides",
               title="(b) attention collapse (test slides)")
    ax_att.legend(fontsize="x-small" if len(models) > 4 else "small", ncols=2
                  if len(models) > 6 else 1)
    ratios = curve_runs(table)
    if ratios["mask_ratio"].nunique() < 2:
        ax_ratio.text(0.5, 0.5, "one mask ratio only\n(ablation.mask_ratios)", ha="center",
                      va="center", transform=ax_ratio.transAxes)
    else:
        grouped = ratios.groupby("mask_ratio")["auc"]
        x = np.array(sorted(ratios["mask_ratio"].unique()), dtype=float)
        mean = grouped.mean().reindex(x).to_numpy(dtype=float)
        sd = grouped.std(ddof=1).reindex(x).fillna(0).to_numpy(dtype=float)
        ax_ratio.errorbar(x, mean, yerr=sd, fmt="o-", capsize=3)
    ax_ratio.set(xlabel="mask ratio", ylabel="AUC", ylim=(0, 1.02),
                 title="(c) SRMIL AUC vs mask ratio")
    save_png(fig, path)


def summarise_study(runs: Sequence[Run], out_dir: str | os.PathLike,
                    main_ratio: float | None = None, n_boot: int = 1000) -> pd.DataFrame:
    """Write runs.csv, differences.csv (each model minus SRMIL), summary.md and study.png into
    `out_dir`; return the runs table. `main_ratio`: SRMIL's configured mask ratio (default:
    that of the first SRMIL run); `n_boot`: patient resamples of the paired bootstrap."""
    if not runs:
        raise ValueError("no runs to summarise")
    out_dir = Path(out_dir)
    loaded = [read_run(r) for r in runs]
    table = pd.DataFrame([run_row(r, *files) for r, files in zip(runs, loaded, strict=True)])
    if main_ratio is None:
        srmil = [r for r in runs if r.model == "srmil"]
        main_ratio = srmil[0].mask_ratio if srmil else None
    is_main = _is_main(table, main_ratio)
    main = table[is_main]
    # The main runs' test slides: each one's largest attention weight and true label.
    slides = pd.concat([predictions[["label", "attention_max"]].assign(model=run.model)
                        for run, (_, predictions), keep in zip(runs, loaded, is_main, strict=True)
                        if keep])
    max_weights = dict(tuple(slides.dropna().groupby("model")))
    main_predictions = {(run.model, run.seed): predictions
                        for run, (_, predictions), keep in zip(runs, loaded, is_main, strict=True)
                        if keep}
    differences = paired_differences(main, main_predictions, n_boot=n_boot)
    write_text(out_dir / "runs.csv", table.to_csv(index=False))
    write_text(out_dir / "differences.csv", differences.to_csv(index=False))
    write_text(out_dir / "summary.md", summary_markdown(table, main, differences))
    plot_study(table, main, max_weights, out_dir / "study.png")
    return table
