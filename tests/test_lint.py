"""The project's own checks: ruff, snakefmt and `snakemake --lint`."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff() -> None:
    proc = run(sys.executable, "-m", "ruff", "check", "srmil", "tests", "benchmarks")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt() -> None:
    proc = run(sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakemake_lint(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    proc = run(
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--lint", cwd=tmp_path
    )
    assert proc.returncode == 0 and "Lints for" not in proc.stdout, proc.stdout + proc.stderr
