"""The workflow on a real SLURM cluster through snakemake-executor-plugin-slurm and the project's
slurm profile, compared with the session's local run (conftest `run`): same config and seed, so
the same tiles, features, graphs, splits, models and metrics.

Skipped where no cluster answers (`sinfo` missing or failing), unless CI=true: .ci/run starts a
one-node cluster on localhost (.ci/slurm-start.sh) and there the test must run."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import zarr
from conftest import REPO, snakemake

# The plugin can wait forever on a status command that fails (no accounting): bound the run.
TIMEOUT_S = int(os.environ.get("SRMIL_SLURM_TEST_TIMEOUT", "1500"))


def slurm_missing() -> str | None:
    """Why SLURM cannot be used here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client commands (sinfo, sbatch) not found"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    if proc.returncode != 0:
        return f"no SLURM cluster answers: {proc.stderr.strip() or proc.stdout.strip()}"
    if not {"idle", "mix", "alloc"} & set(proc.stdout.split()):
        return f"no SLURM node is up (states: {' '.join(proc.stdout.split()) or 'none'})"
    return None


def node_cpus() -> int:
    """CPUs of the smallest node of the default partition (a grouped job must fit on one)."""
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=20
    ).stdout
    return min(int(re.sub(r"\D", "", c)) for c in out.split() if re.sub(r"\D", "", c))


def accounting_works() -> bool:
    """sacct answers (slurmdbd present); without it the plugin must poll with squeue."""
    if shutil.which("sacct") is None:
        return False
    proc = subprocess.run(["sacct", "-n", "-X"], capture_output=True, text=True, timeout=20)
    return proc.returncode == 0


class SlurmRun(NamedTuple):
    local: Path  # the session's local run of the same config
    workdir: Path  # the run through SLURM
    output: str  # Snakemake's output
    n_groups: int  # grouped per-slide jobs expected


@pytest.fixture(scope="module")
def slurm_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SlurmRun:
    reason = slurm_missing()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but SLURM is unusable: {reason} (.ci/slurm-start.sh starts it)")
        pytest.skip(reason)
    run: Path = request.getfixturevalue("run")  # the local run, only once SLURM answers
    workdir = tmp_path_factory.mktemp("slurm")
    shutil.copy(run / "config.yaml", workdir / "config.yaml")
    n_slides = len((run / "resources/demo/samples.csv").read_text().splitlines()) - 1
    # A grouped job runs its steps one after another: one group of slides per CPU of the node.
    per_group = -(-n_slides // min(node_cpus(), n_slides))
    status = [] if accounting_works() else ["--slurm-status-command", "squeue"]
    cmd = [
        "timeout", "-k", "10", str(TIMEOUT_S),
        sys.executable, "-m", "snakemake",
        "-s", str(REPO / "Snakefile"),
        "-d", str(workdir),
        "--profile", str(REPO / "workflow/profiles/slurm"),
        # Same CPU code path as the local run (and no GPUs here): features and training on CPU.
        "--set-resources", "extract_features:gpu=0", "train_fold:gpu=0",
        # Several slides per grouped job (each job costs a status-poll round), one CPU each.
        "--group-components", f"slide={per_group}",
        "--cores", "1",
        "--retries", "0",
        "--slurm-init-seconds-before-status-checks", "2",
        *status,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        logs = sorted((workdir / ".snakemake/slurm_logs").rglob("*.log"))
        tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs[-4:])
        what = "timed out" if proc.returncode in (124, 137) else f"exit {proc.returncode}"
        pytest.fail(f"{' '.join(cmd)}: {what}\n{output[-6000:]}\n{tails}")
    return SlurmRun(run, workdir, output, -(-n_slides // per_group))


@pytest.mark.slow
def test_jobs_went_through_slurm_grouped_per_slide(slurm_run: SlurmRun) -> None:
    _, workdir, output, n_groups = slurm_run
    submitted = re.findall(r"has been submitted with SLURM jobid \d+ \(log: ([^)]+)\)", output)
    # .snakemake/slurm_logs/rule_<rule>/[<wildcards>/]<jobid>.log or group_<group>_<rules>/...
    kinds = [Path(log).relative_to(workdir / ".snakemake/slurm_logs").parts[0] for log in submitted]
    # demo, splits, 2 models x 2 folds, 2 evaluations, and the per-slide steps in groups
    assert kinds.count("rule_demo") == 1 and kinds.count("rule_splits") == 1, kinds
    assert kinds.count("rule_train_fold") == 4 and kinds.count("rule_evaluate_model") == 2, kinds
    grouped = [kind for kind in kinds if kind.startswith("group_slide")]
    assert len(grouped) == n_groups, kinds
    for rule in ("segment_slide", "tile_slide", "extract_features", "build_graph"):
        assert all(rule in kind for kind in grouped), kinds
        assert f"rule_{rule}" not in kinds, kinds
    out = snakemake(workdir, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


def same_json(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> bool:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ignore}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(a.read_text())) == strip(json.loads(b.read_text()))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp:UserWarning")
def test_slurm_results_match_the_local_run(slurm_run: SlurmRun) -> None:
    local, remote = slurm_run.local / "results", slurm_run.workdir / "results"
    slides = sorted(p.stem for p in (local / "tiles").glob("*.json"))
    assert len(slides) == 8
    for slide in slides:
        # Paths in these files name each run's own folder; everything else must agree.
        assert same_json(local / f"segment/{slide}.geojson", remote / f"segment/{slide}.geojson",
                         ignore=("slide",))  # fmt: skip
        assert same_json(local / f"tiles/{slide}.json", remote / f"tiles/{slide}.json",
                         ignore=("slide",))  # fmt: skip
        for store in (f"features/resnet18/{slide}.zarr", f"graphs/{slide}.zarr"):
            a = zarr.open_group(str(local / store), mode="r")
            b = zarr.open_group(str(remote / store), mode="r")
            assert sorted(a.array_keys()) == sorted(b.array_keys()), store
            for name in a.array_keys():
                assert np.array_equal(a[name][...], b[name][...]), (store, name)
            assert dict(a.attrs) == dict(b.attrs), store
    assert filecmp.cmp(local / "splits.json", remote / "splits.json", shallow=False)
    for model in ("srmil", "abmil"):
        for fold in (0, 1):
            path = f"models/{model}/resnet18/fold_{fold}.pt"
            a = torch.load(local / path, weights_only=True)
            b = torch.load(remote / path, weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
        for name in ("metrics.json", "predictions.csv"):
            path = f"eval/{model}/resnet18/{name}"
            assert filecmp.cmp(local / path, remote / path, shallow=False), path
