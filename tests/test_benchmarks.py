"""benchmarks/run_all.py at its hidden tiny size: every benchmark runs and lands in the table.

It checks that the scripts still run and fit together, not their figures (about 30 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_ALL = REPO / "benchmarks" / "run_all.py"


def run_all(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CLAM_DIR", "CLAM_PYTHON")}
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--size", "tiny", *args],
        cwd=REPO,
        env=env,  # without CLAM: only srmil's side of segment_tile.py, as in CI
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split(" | ")]
        for line in text.splitlines()
        if line.startswith("| `")
    ]


def test_run_all_tiny_writes_one_row_per_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "out" / "summary.md"
    proc = run_all("--out", str(out), "--work", str(tmp_path / "work"))
    text = out.read_text()
    assert proc.stdout == text
    rows = table_rows(text)
    assert [r[0] for r in rows] == [
        "`features.py`",
        "`readers.py`",
        "`segment_tile.py`",
        "`graph.py`",
        "`mil.py`",
    ]
    for row in rows:
        assert len(row) == 6 and not row[1].startswith("failed"), row
        assert row[5].startswith(f"`python benchmarks/{row[0].strip('`')}"), row
    # A measured ratio wherever the comparison ran (CLAM is absent here).
    ratios = {r[0]: r[4] for r in rows}
    for name in ("`features.py`", "`readers.py`", "`graph.py`", "`mil.py`"):
        assert re.match(r"\*\*\d+\.\d+\*\*", ratios[name]), ratios[name]
    assert ratios["`segment_tile.py`"] == "-"
    # One progress line as each benchmark starts and one as it ends.
    assert len(re.findall(r"\] \w+: started", proc.stderr)) == 5
    assert len(re.findall(r"\] \w+: done in \d+\.\d s", proc.stderr)) == 5
    logs = out.parent / "summary_logs"
    assert {p.name for p in logs.iterdir()} >= {"graph.log", "graph.json", "mil.json"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["summary.md", "summary_logs"]


def test_run_all_only_replaces_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "summary.md"
    out.write_text("old\n")
    run_all("--only", "graph", "--out", str(out))
    rows = table_rows(out.read_text())
    assert [r[0] for r in rows] == ["`graph.py`"]
    assert not list(tmp_path.glob(".summary.md.*"))  # the temporary file was renamed


def test_compare_runs_tells_equal_outputs_from_different_ones(tmp_path: Path) -> None:
    """benchmarks/compare_runs.py: timings, run folders and checkpoint file names aside, equal
    outputs agree; a changed value, a missing file and another tensor do not."""
    import json

    import torch

    runs = [tmp_path / "run A", tmp_path / "run B"]
    for i, run in enumerate(runs):
        (run / "results/models").mkdir(parents=True)
        (run / "results/logs").mkdir()
        (run / "results/logs/x.log").write_text(f"run {i}")  # left out
        meta = {"time_s": 10.0 + i, "slide": f"{run}/slide.svs", "auc": 0.75}
        (run / "results/models/fold_0.json").write_text(json.dumps(meta))
        # torch.save names the archive after its file: other bytes, the same tensors
        torch.save({"w": torch.arange(4.0)}, run / f"results/models/tmp{i}.pt")
        (run / f"results/models/tmp{i}.pt").rename(run / "results/models/fold_0.pt")

    def compare() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "benchmarks/compare_runs.py"), *map(str, runs)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    proc = compare()
    assert proc.returncode == 0 and proc.stdout.startswith("2 files agree, 0 do not"), proc.stdout
    (runs[1] / "results/models/fold_0.json").write_text(json.dumps({"auc": 0.5}))
    torch.save({"w": torch.arange(4.0) + 1}, runs[1] / "results/models/fold_0.pt")
    (runs[1] / "results/models/fold_1.json").write_text("{}")
    proc = compare()
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout.splitlines()[1:] == [
        f"  only in {runs[1]}: results/models/fold_1.json",
        "  differs: results/models/fold_0.json",
        "  differs: results/models/fold_0.pt",
    ]


def test_memory_benchmark_real_file_matches_its_stand_in(tmp_path: Path) -> None:
    """benchmarks/segment_tile_memory.py --file writes its drawing as a real TIFF, which srmil's
    commands segment and tile into as many patches as the in-memory stand-in gives."""
    script = REPO / "benchmarks" / "segment_tile_memory.py"

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, timeout=300,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    row = json.loads(run("--file", "8192x6144", "--work", str(tmp_path)))
    assert row["segment_mib"] > 0 and row["tile_mib"] > 0
    stand_in = run("--sizes", "2.048x1.536").splitlines()[1].split()
    assert stand_in[1] == "8192x6144" and int(stand_in[3]) == row["n_tiles"] > 50


def test_gpu_check_rehearsal_passes_every_check(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py --small: the GPU feature-extraction check rehearsed on the CPU
    (about 35 s), so a change to the readers or tile sets cannot break it unseen before a GPU
    is lent (the decode checks once broke on the tile sets' typed read plan)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--small", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert {"cuda", "amp", "extract_cuda_vs_cpu", "gpu_decode_pixels", "gpu_decode_corrupt_tile",
            "features_readers"} <= set(checks)
    assert all(c["ok"] is True for c in checks.values()), checks
    assert all(v["max_diff"] == 0 for v in checks["gpu_decode_pixels"].values()
               if isinstance(v, dict))


def test_gpu_train_check_rehearsal_records_every_check(tmp_path: Path) -> None:
    """benchmarks/gpu_train_check.py --small: the GPU training check rehearsed on the CPU (SRMIL
    only, to keep it short; the checks are the same per model). Every check ends with a status,
    and on the CPU all pass: train_fold, two reruns and `srmil train` in a new process agree
    byte for byte (about 25 s)."""
    import json

    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_train_check.py"), "--small", "--models",
         "srmil", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_train_check.json").read_text())
    checks = report["checks"]
    assert list(checks) == ["amp", "srmil_on_device", "srmil_deterministic_reruns",
                            "srmil_rerun_srmil_train_cli", "srmil_device_vs_cpu",
                            "determinism_settings"]
    assert all(c["ok"] is True for c in checks.values()), checks
    assert checks["amp"]["amp_in_training"] is False
    assert checks["srmil_deterministic_reruns"]["identical"]["checkpoint_bytes"]
    during = checks["determinism_settings"]["during_training"]
    assert during["use_deterministic_algorithms"] and not during["cudnn.benchmark"]
    assert checks["srmil_device_vs_cpu"]["forward_only_max_abs_prob_diff"] == 0.0
    rows = report["timings"]
    assert [(r["model"], r["deterministic"]) for r in rows] == [("srmil", False),
                                                               ("srmil", True)]
    assert all(r["epoch_s"] > 0 for r in rows)
    text = (tmp_path / "gpu_train_check.md").read_text()
    assert "- srmil_deterministic_reruns: ok" in text and "| 300 | srmil | deterministic |" in text


@pytest.mark.slow
def test_cohort_stats_reads_the_shared_run(run: Path) -> None:
    """benchmarks/cohort_stats.py on the shared end-to-end run: its slide and patch counts agree
    with the run's stores, and the probe gives AUCs."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/cohort_stats.py"), str(run),
         "--samples", "resources/demo/samples.csv"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sheet = (run / "resources/demo/samples.csv").read_text().splitlines()[1:]
    assert f"slides: {len(sheet)} ({sum(bool(r.split(',')[-1]) for r in sheet)} annotated" in (
        proc.stdout)
    aucs = re.search(r"patch AUC ([\d.]+), slide AUC by the highest patch ([\d.]+)", proc.stdout)
    assert aucs and all(0 <= float(a) <= 1 for a in aucs.groups())
