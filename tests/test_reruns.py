"""Rerunning single stages: target rules, `--until`, `--forcerun`, and reruns after a change to one
stage's settings (that stage and what depends on it, nothing upstream). Dry runs (`-n`) against
the session's completed tiny run (conftest `run`) show which jobs Snakemake would run; one real
forced rerun shows it on disk."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, deep_update, snakemake

PER_SLIDE = ("segment_slide", "tile_slide", "extract_features", "build_graph")
N_SLIDES, N_FOLDS, N_MODELS = 8, 2, 2  # conftest.TINY


def job_counts(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs ({} when nothing is to do)."""
    out = proc.stdout + proc.stderr
    if "Job stats:" not in out:
        assert "Nothing to be done" in out, out[-3000:]
        return {}
    lines = out.split("Job stats:", 1)[1].splitlines()[3:]
    counts = {}
    for line in lines:
        name, _, count = line.strip().rpartition(" ")
        if name.strip() == "total" or not count.isdigit():
            break
        counts[name.strip()] = int(count)
    return counts


def reasons(proc: subprocess.CompletedProcess) -> dict[str, set[str]]:
    """The 'Reasons' summary of a dry run: reason -> rules it applies to."""
    text = (proc.stdout + proc.stderr).rsplit("Reasons:", 1)[-1]
    found: dict[str, set[str]] = {}
    for reason, rules in re.findall(r"\n    (\w[^\n]*):\n        ([^\n]+)", text):
        found[reason] = {r.strip() for r in rules.split(",")}
    return found


def write_config(path: Path, base: Path, change: dict) -> Path:
    """base's config.yaml with `change` applied, written to path."""
    config = deep_update(yaml.safe_load((base / "config.yaml").read_text()), change)
    path.write_text(yaml.safe_dump(config))
    return path


# A change to one stage's section -> (jobs that must run again, rules that must not run).
CHANGES = {
    "segment": (
        {"segment": {"min_saturation": 9}},
        {
            "segment_slide": N_SLIDES,
            "tile_slide": N_SLIDES,
            "extract_features": N_SLIDES,
            "build_graph": N_SLIDES,
            "train_fold": N_MODELS * N_FOLDS,
            "evaluate_model": N_MODELS,
        },
        {"demo", "splits"},
    ),
    "tile": (
        {"tile": {"min_tissue_fraction": 0.6}},
        {
            "tile_slide": N_SLIDES,
            "extract_features": N_SLIDES,
            "build_graph": N_SLIDES,
            "train_fold": N_MODELS * N_FOLDS,
            "evaluate_model": N_MODELS,
        },
        {"demo", "segment_slide", "splits"},
    ),
    "features": (
        {"features": {"dtype": "float32"}},
        {
            "extract_features": N_SLIDES,
            "train_fold": N_MODELS * N_FOLDS,
            "evaluate_model": N_MODELS,
        },
        {"demo", "segment_slide", "tile_slide", "build_graph", "splits"},
    ),
    "graph": (
        {"graph": {"window": 3}},
        {"build_graph": N_SLIDES, "train_fold": N_MODELS * N_FOLDS, "evaluate_model": N_MODELS},
        {"demo", "segment_slide", "tile_slide", "extract_features", "splits"},
    ),
    "cv": (
        {"cv": {"val_fraction": 0.3}},
        {"splits": 1, "train_fold": N_MODELS * N_FOLDS, "evaluate_model": N_MODELS},
        {"demo", *PER_SLIDE},
    ),
    # One model's training settings: that model's folds and evaluation, not the other model's.
    "train.srmil": (
        {"train": {"srmil": {"train": {"epochs": 5}}}},
        {"train_fold": N_FOLDS, "evaluate_model": 1},
        {"demo", "splits", *PER_SLIDE},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CHANGES))
def test_changed_settings_rerun_that_stage_and_downstream_only(
    run: Path, tmp_path: Path, stage: str
) -> None:
    change, must_run, must_not = CHANGES[stage]
    config = write_config(tmp_path / "changed.yaml", run, change)
    proc = snakemake(run, "-n", "--configfile", str(config))
    counts = job_counts(proc)
    for rule, n in must_run.items():
        assert counts.get(rule) == n, (stage, rule, counts)
    assert not must_not & set(counts), (stage, counts)
    # The stage's own rule runs because its params changed; the rest because their inputs will.
    first = next(iter(must_run))
    assert reasons(proc).get("params have changed since last execution") == {first}, (
        stage,
        reasons(proc),
    )


@pytest.mark.slow
def test_forcerun_reruns_a_stage_and_what_depends_on_it(run: Path) -> None:
    counts = job_counts(snakemake(run, "-n", "--forcerun", "tile_slide"))
    for rule in ("tile_slide", "extract_features", "build_graph"):
        assert counts.get(rule) == N_SLIDES, counts
    assert counts.get("train_fold") == N_MODELS * N_FOLDS, counts
    assert counts.get("evaluate_model") == N_MODELS, counts
    assert not {"demo", "segment_slide", "splits"} & set(counts), counts


@pytest.mark.slow
def test_forcerun_until_reruns_one_stage_for_real(run: Path) -> None:
    """`--forcerun build_graph --until build_graph` rewrites the graphs, touches nothing upstream
    or downstream, and gives the same bytes (the stage is deterministic)."""
    results = run / "results"

    def snapshot() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}

    graph_bytes = {p: p.read_bytes() for p in (results / "graphs").rglob("*") if p.is_file()}
    before = snapshot()
    proc = snakemake(run, "--forcerun", "build_graph", "--until", "build_graph")
    after = snapshot()
    changed = {p.relative_to(results) for p in after if after[p] != before.get(p)}
    assert {c.parts[0] for c in changed} == {"graphs", "benchmarks"}, changed
    assert all(c.parts[0] == "graphs" or c.parts[:2] == ("benchmarks", "graph") for c in changed)
    assert job_counts(proc) == {"build_graph": N_SLIDES}
    assert {p: p.read_bytes() for p in graph_bytes} == graph_bytes
    # The graphs are now newer than the models built from them; the models are what the same
    # graphs give, so mark them up to date rather than retrain (keeps the shared run complete).
    assert job_counts(snakemake(run, "-n")).get("train_fold") == N_MODELS * N_FOLDS
    snakemake(run, "--touch")
    assert job_counts(snakemake(run, "-n")) == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "must_run", "must_not"),
    [
        ("segment", {"demo", "segment_slide"}, {"tile_slide", "extract_features", "splits"}),
        ("tile", {"segment_slide", "tile_slide"}, {"extract_features", "build_graph"}),
        ("features", {"tile_slide", "extract_features"}, {"build_graph", "train_fold"}),
        ("graphs", {"tile_slide", "build_graph"}, {"extract_features", "train_fold"}),
        ("train", {"extract_features", "build_graph", "splits", "train_fold"}, {"evaluate_model"}),
    ],
)
def test_target_rules_stop_after_their_stage(
    tmp_path: Path, target: str, must_run: set[str], must_not: set[str]
) -> None:
    config = deep_update(yaml.safe_load((REPO / "config.yaml").read_text()), TINY)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    counts = job_counts(snakemake(tmp_path, "-n", target))
    assert must_run <= set(counts) and not must_not & set(counts), (target, counts)


@pytest.mark.slow
def test_until_stops_after_a_job_rule(tmp_path: Path) -> None:
    config = deep_update(yaml.safe_load((REPO / "config.yaml").read_text()), TINY)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    counts = job_counts(snakemake(tmp_path, "-n", "--until", "extract_features"))
    assert {"demo", "segment_slide", "tile_slide", "extract_features"} <= set(counts), counts
    assert not {"build_graph", "splits", "train_fold", "evaluate_model"} & set(counts), counts
