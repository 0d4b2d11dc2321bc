"""How large is the Snakemake report of a finished run, and how much of it is per slide?

Builds the report of RUN (a folder where this checkout's workflow ran, its config.yaml in it)
four ways: one HTML page and a zip folder (`--report report.zip`), each with and without the
slides' images (`report: {slide_images: false}`), and prints their sizes, the bytes each slide
adds (the difference over the slides of the sheet), and the per-slide images' bytes on disk.

    python benchmarks/report_size.py RUN [--keep DIR]

The reports are written to a temporary folder (to DIR with --keep) and RUN is left as it was.
The README's and docs/report.md's figures come from this on the default demo.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
# The per-slide images, by kind, relative to the run (docs/report.md).
SLIDE_IMAGES = {
    "segmentation QC": "results/segment/*.qc.png",
    "tiling QC": "results/tiles/*.qc.png",
    "attention heatmaps": "results/eval/*/*/heatmaps/*.png",
}


def build_report(run: Path, out: Path, slide_images: bool) -> int:
    """The report of `run` written to `out` (.html or .zip); its size in bytes."""
    command = [sys.executable, "-m", "snakemake", "-s", str(CHECKOUT / "Snakefile"),
               "-d", str(run), "--quiet", "--report", str(out)]
    if not slide_images:
        command += ["--config", "report={slide_images: false}"]
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return out.stat().st_size


def slide_count(run: Path) -> int:
    """The slides that have a segmentation QC image (those the report can show)."""
    return len(list(run.glob(SLIDE_IMAGES["segmentation QC"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--keep", type=Path, help="write the reports here, not to a temp folder")
    args = parser.parse_args()
    run = args.run.resolve()
    n = slide_count(run)
    if n == 0:
        sys.exit(f"{run}: no results/segment/*.qc.png; run the workflow there first")

    print(f"{n} slides\n\n| per-slide images | files | bytes per slide |\n|---|---|---|")
    for kind, pattern in SLIDE_IMAGES.items():
        files = list(run.glob(pattern))
        print(f"| {kind} | {len(files)} | {sum(f.stat().st_size for f in files) / n:,.0f} |")

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        print("\n| report | with slide images | without | bytes per slide |\n|---|---|---|---|")
        for suffix in ("html", "zip"):
            sizes = [build_report(run, out_dir / f"report_{label}.{suffix}", flag)
                     for label, flag in (("slides", True), ("cohort", False))]
            print(f"| {suffix} | {sizes[0]:,} | {sizes[1]:,} | {(sizes[0] - sizes[1]) / n:,.0f} |")


if __name__ == "__main__":
    main()
