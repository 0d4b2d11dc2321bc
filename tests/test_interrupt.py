"""Interruption: a writer or the whole workflow killed with SIGKILL (no chance to clean up, like a
power cut or the OOM killer) loses nothing that was finished, never leaves an output that looks
complete, and the rerun gives results identical to a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import REPO, TINY, deep_update, snakemake

from srmil import store
from srmil.store import StoreError, read_feature_store, read_store_attrs, write_feature_store

PROFILE = REPO / "workflow" / "profiles" / "default"

WRITER = """
import sys, time
import zarr
from srmil import store
with store.atomic_path(sys.argv[1], ".zarr") as tmp:
    group = zarr.open_group(str(tmp), mode="w")
    group.create_array("features", shape=(100, 8), dtype="float16")[...] = 1
    print("half written", flush=True)
    time.sleep(120)
"""


def test_killed_writer_leaves_no_store_and_the_next_write_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "slide.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "half written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not target.exists()  # never moved into place
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".slide.zarr.")]
    with pytest.raises(StoreError, match="incomplete feature store"):
        read_feature_store(leftover)  # the half-written copy is not complete either

    write_feature_store(target, np.ones((3, 8)), np.zeros((3, 2)), {"extractor": "x"})
    assert read_feature_store(target)[0].shape == (3, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["slide.zarr"]  # the stale copy is gone


def test_incomplete_or_foreign_stores_are_refused(tmp_path: Path) -> None:
    features = tmp_path / "features"
    group = zarr.open_group(str(features / "a.zarr"), mode="w")  # written, never completed
    group.create_array("features", shape=(2, 4), dtype="float16")[...] = 0
    group.create_array("coords", shape=(2, 2), dtype="int64")[...] = 0
    (features / "b.zarr").mkdir(parents=True)  # an empty folder in its place
    for slide_id, message in (
        ("a", "incomplete feature store"),
        ("b", "not a readable feature store"),
    ):
        with pytest.raises(StoreError, match=message) as err:
            read_feature_store(features / f"{slide_id}.zarr")
        assert "rerun the features step" in str(err.value) and "\n" not in str(err.value)


# --- the workflow, killed twice ---------------------------------------------------------------


def _start(workdir: Path, log: Path, *args: str) -> subprocess.Popen:
    """Snakemake in a process group of its own, so SIGKILL reaches it and every job."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*cmd, "--cores", "2", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill:\n{log.read_text()[-3000:]}")
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the moment to kill never came:\n{log.read_text()[-3000:]}")


def _names(folder: Path, pattern: str) -> set[str]:
    """Stems of the visible files matching `pattern` (hidden ones are temporaries)."""
    if not folder.is_dir():
        return set()
    return {p.name.split(".")[0] for p in folder.rglob(pattern) if not p.name.startswith(".")}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_sigkill_during_features_and_training_then_rerun_equals_uninterrupted(
    run: Path, tmp_path: Path
) -> None:
    """The tiny workflow killed (the whole process group, SIGKILL) during feature extraction and
    again during training, then rerun the documented way. Compared with the session's run of
    the same config (conftest `run`), it is also the second of two full runs with one seed."""
    workdir = tmp_path / "killed"
    workdir.mkdir()
    config = deep_update(yaml.safe_load((REPO / "config.yaml").read_text()), TINY)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    features = workdir / "results/features/resnet18"

    # 1. Killed while extracting features: one store done, another job under way.
    def extracting() -> bool:
        done = _names(features, "*.zarr")
        return bool(done) and bool(_names(workdir / "logs/features", "*.log") - done)

    proc = _start(workdir, tmp_path / "first.log")
    _kill_when(proc, extracting, tmp_path / "first.log")
    done = _names(features, "*.zarr")
    assert done and len(done) < 8
    for slide_id in done:  # whatever is in place is complete
        assert read_store_attrs(features / f"{slide_id}.zarr")["n_patches"] > 0

    # 2. The rerun: the lock the killed run left is reported with its fix (--unlock). A store
    # may be complete on disk while Snakemake never recorded its job as finished: without
    # --rerun-incomplete (set by the profile) Snakemake would stop at it.
    locked = snakemake(workdir, "--profile", str(PROFILE), check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    snakemake(workdir, "--unlock")

    # 3. The documented rerun (the local profile sets rerun-incomplete), killed while training.
    models = workdir / "results/models"

    def training() -> bool:
        finished = len(list(models.rglob("fold_*.attention.json")))
        started = len(list((workdir / "logs/train").rglob("fold_*.log")))
        return finished >= 1 and started > finished

    proc = _start(workdir, tmp_path / "second.log", "--profile", str(PROFILE))
    _kill_when(proc, training, tmp_path / "second.log")
    # Killed with training unfinished. (A model whose folds all finished may already have
    # started its evaluation: with 2 folds, ABMIL's can finish together on a quiet machine.)
    all_folds = len(list((run / "results/models").rglob("fold_*.attention.json")))
    assert 1 <= len(list(models.rglob("fold_*.attention.json"))) < all_folds
    assert _names(features, "*.zarr") == _names(run / "results/features/resnet18", "*.zarr")

    # 4. Unlock and rerun to the end.
    snakemake(workdir, "--unlock")
    snakemake(workdir, "--profile", str(PROFILE))
    final = snakemake(workdir, "-n", "--profile", str(PROFILE))
    assert "Nothing to be done" in final.stdout + final.stderr

    # 5. The same bytes as the session's uninterrupted run (same seed, same settings): the demo
    # slides, every feature and graph store; the same models and metrics.
    for part in ("resources/demo", "results/features", "results/graphs"):
        ours, theirs = _tree(workdir / part), _tree(run / part)
        assert ours.keys() == theirs.keys(), part  # no temporaries left behind either
        assert [k for k in ours if ours[k] != theirs[k]] == [], part
    for model in ("srmil", "abmil"):
        out = f"results/eval/{model}/resnet18"
        assert json.loads((workdir / out / "metrics.json").read_text()) == json.loads(
            (run / out / "metrics.json").read_text()
        )
        assert (workdir / out / "predictions.csv").read_bytes() == (
            run / out / "predictions.csv"
        ).read_bytes()
        for fold in (0, 1):
            pt = f"results/models/{model}/resnet18/fold_{fold}.pt"
            ours = torch.load(workdir / pt, weights_only=True)
            theirs = torch.load(run / pt, weights_only=True)
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), pt
    assert store.read_json(workdir / "results/splits.json") == store.read_json(
        run / "results/splits.json"
    )
