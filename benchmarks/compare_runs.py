"""Are two workflow runs the same? Every file under `results/` and `resources/` of run A against
the same path in run B: equal bytes, or, where bytes cannot be equal across folders and times,
equal content (model checkpoints: the same tensors and dtypes; JSON and GeoJSON: the same values
once the training time `time_s` is dropped and each run's own folder is read as one name).
Benchmark timings and logs are left out. Exits 1 if any file differs or exists in one run only.

    python benchmarks/compare_runs.py RUN_A RUN_B

Used to show that a refactoring leaves every output of the default demo and of the tiny test
cohort as it was (docs/architecture.md): run both checkouts' workflows in two folders, then this.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
from pathlib import Path
from typing import Any

LEFT_OUT = ("benchmarks", "logs")  # timings and log lines differ from run to run
TIMING_KEYS = ("time_s",)


def outputs(run: Path) -> set[Path]:
    return {
        p.relative_to(run)
        for folder in ("results", "resources")
        for p in (run / folder).rglob("*")
        if p.is_file() and not set(LEFT_OUT) & set(p.relative_to(run).parts)
    }


def _normalised(value: Any, run: Path) -> Any:
    if isinstance(value, dict):
        return {k: _normalised(v, run) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_normalised(v, run) for v in value]
    if isinstance(value, str):
        return value.replace(str(run.resolve()), "RUN").replace(str(run), "RUN")
    return value


def same_content(a: Path, b: Path, run_a: Path, run_b: Path) -> bool:
    """Whether two files of the same name hold the same outputs (see the module's docstring)."""
    if filecmp.cmp(a, b, shallow=False):
        return True
    if a.suffix == ".pt":
        import torch

        x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        return x.keys() == y.keys() and all(
            x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x
        )
    if a.suffix in (".json", ".geojson"):
        return _normalised(json.loads(a.read_text()), run_a) == _normalised(
            json.loads(b.read_text()), run_b
        )
    return False


def compare_runs(run_a: Path, run_b: Path) -> tuple[int, list[str]]:
    """(files that agree, lines naming each file that differs or exists in one run only)."""
    in_a, in_b = outputs(run_a), outputs(run_b)
    problems = [f"only in {run_a}: {p}" for p in sorted(in_a - in_b)]
    problems += [f"only in {run_b}: {p}" for p in sorted(in_b - in_a)]
    agree = 0
    for rel in sorted(in_a & in_b):
        if same_content(run_a / rel, run_b / rel, run_a, run_b):
            agree += 1
        else:
            problems.append(f"differs: {rel}")
    return agree, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    agree, problems = compare_runs(args.run_a, args.run_b)
    print(f"{agree} files agree, {len(problems)} do not")
    for line in problems:
        print(f"  {line}")
    return 1 if problems or not agree else 0


if __name__ == "__main__":
    sys.exit(main())
