"""Segmentation + tiling side by side with CLAM's create_patches_fp.py on generated slides.

For each slide: wall time and peak memory (RSS) of our two commands as processes (`srmil segment`
then `srmil tile`, as Snakemake runs them) and of CLAM's `create_patches_fp.py --seg --patch` on
the same slide, and the tissue IoU of both against the generator's ground truth (downsample 16),
the tissue each finds outside the truth (pen ink, black borders, glass), and the share of real
holes each keeps. CLAM comes from its public source (mahmoodlab/CLAM) in its own environment:

    CLAM_DIR=/path/to/CLAM CLAM_PYTHON=/path/to/clam-venv/bin/python \\
        python benchmarks/segment_tile.py

Without CLAM_DIR (or --clam-dir) only our side runs. Slides are generated once into --work
(reused by name: use another --work after changing --large); `--slides demo biopsy` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from srmil.demo.artifacts import Artifacts
from srmil.demo.geometry import BIOPSY
from srmil.demo.plan import NEGATIVE, POSITIVE
from srmil.demo.render import BANDED_MIN_PX, MASK_DOWNSAMPLE
from srmil.demo.write import write_slide
from srmil.settings import SegmentSettings
from srmil.wsi.geometry import polygons_mask, read_geojson_polygons

HERE = Path(__file__).resolve().parent
MASK_DS = MASK_DOWNSAMPLE


def cohort(large: tuple[int, int] | None) -> dict[str, dict]:
    """name -> write_slide arguments (label, size, µm/px, shape, artifacts)."""
    specs = {
        # the demo's own slides: 2 x 1.5 mm, i.e. a small biopsy filling the slide
        "demo": dict(width_px=4096, height_px=3072, mpp=0.5),
        "demo_pen": dict(
            width_px=4096,
            height_px=3072,
            mpp=0.5,
            artifacts=Artifacts(pen_strokes=3, black_border=True),
        ),
        # biopsy fragments within 2 x 1.5 mm on a 4 x 3 mm slide
        "biopsy": dict(width_px=16384, height_px=12288, mpp=0.25, tissue_shape=BIOPSY),
    }
    if large:
        specs["large_pen"] = dict(
            width_px=large[0],
            height_px=large[1],
            mpp=0.25,
            artifacts=Artifacts(pen_strokes=2, black_border=True),
        )
    return specs


def generate(work: Path, specs: dict[str, dict], only: set[str] | None = None) -> None:
    for index, (name, spec) in enumerate(specs.items()):
        mask = work / "masks" / f"{name}.tissue.png"
        # `only` skips slides but keeps each one's index (its label and seed) as in the cohort
        if mask.exists() or (only is not None and name not in only):
            continue
        row = {
            "slide_id": name,
            "path": f"slides/{name}.svs",
            "patient_id": name,
            "label": POSITIVE if index % 2 else NEGATIVE,
            "annotation": f"annotations/{name}.geojson" if index % 2 else "",
        }
        t = time.perf_counter()
        big = spec["width_px"] * spec["height_px"] > BANDED_MIN_PX
        write_slide(work, row, index, 11, banded=True if big else None, **spec)
        print(
            f"generated {name} ({spec['width_px']} x {spec['height_px']}) in "
            f"{time.perf_counter() - t:.0f} s",
            flush=True,
        )


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process, from its start to its exit.

    Peak RSS is the kernel's high-water mark (VmHWM) of the process, polled every few ms:
    getrusage would report the benchmark's own memory too, since a child starts as its copy.
    """
    with tempfile.TemporaryFile() as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak_kib = 0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.003)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{log.read().decode()[-3000:]}")
    return seconds, peak_kib / 1024


def ours(slide: Path, out: Path) -> tuple[float, float, Path]:
    srmil = str(Path(sys.executable).with_name("srmil"))
    out.mkdir(parents=True, exist_ok=True)
    geojson, qc = out / f"{slide.stem}.geojson", out / f"{slide.stem}.qc.png"
    t1, m1 = run([srmil, "segment", "--slide", str(slide), "--out", str(geojson), "--qc", str(qc)])
    t2, m2 = run(
        [
            srmil,
            "tile",
            "--slide",
            str(slide),
            "--tissue",
            str(geojson),
            "--out",
            str(out / f"{slide.stem}.tiles.json"),
            "--seg-qc",
            str(qc),
            "--qc",
            str(out / f"{slide.stem}.tiles.png"),
        ]
    )
    return t1 + t2, max(m1, m2), geojson


def clam(
    slide: Path, out: Path, clam_dir: Path, clam_python: str, mpp: float
) -> tuple[float, float, dict]:
    """CLAM on one slide (its own source folder, so the process handles just this slide),
    patches of the same level-0 size as ours (224 px at 0.5 µm/px)."""
    source = out / "source" / slide.stem
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    (source / slide.name).symlink_to(slide)
    save = out / "clam" / slide.stem
    shutil.rmtree(save, ignore_errors=True)
    patch = str(round(224 * 0.5 / mpp))
    env = {**os.environ, "PYTHONPATH": str(clam_dir)}
    seconds, rss = run(
        [
            clam_python,
            "create_patches_fp.py",
            "--source",
            str(source),
            "--save_dir",
            str(save),
            "--seg",
            "--patch",
            "--patch_size",
            patch,
            "--step_size",
            patch,
        ],
        cwd=clam_dir,
        env=env,
    )
    contours = subprocess.run(
        [clam_python, str(HERE / "clam_contours.py"), str(slide)],
        cwd=clam_dir,
        env=env,
        capture_output=True,
        check=True,
        text=True,
    )
    return seconds, rss, json.loads(contours.stdout)


def clam_mask(result: dict, shape: tuple[int, int]) -> np.ndarray:
    polygons = [
        {"coordinates": [p["outer"] + p["outer"][:1]] + [h + h[:1] for h in p["holes"]]}
        for p in result["pieces"]
    ]
    return rasterise(polygons, shape)


def rasterise(polygons: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """bool mask at downsample 16, majority of each cell, like the ground truth."""
    return polygons_mask(polygons, shape, float(MASK_DS)) > 0


def holes_kept(truth: np.ndarray, found: np.ndarray, mpp: float) -> tuple[int, int]:
    """(kept, all) real holes of at least twice min_hole_area_um2."""
    min_cells = 2 * SegmentSettings().min_hole_area_um2 / (MASK_DS * mpp) ** 2
    contours, hierarchy = cv2.findContours(
        truth.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE
    )
    kept = total = 0
    for i in range(len(contours)):
        if hierarchy is None or hierarchy[0][i][3] == -1:
            continue
        hole = np.zeros(truth.shape, np.uint8)
        cv2.drawContours(hole, contours, i, 1, -1)
        hole &= ~truth
        if hole.sum() < min_cells:
            continue
        y, x = np.unravel_index(
            int(np.argmax(cv2.distanceTransform(hole, cv2.DIST_L2, 3))), hole.shape
        )
        total += 1
        kept += int(not found[y, x])
    return kept, total


def scores(truth: np.ndarray, found: np.ndarray, mpp: float) -> dict:
    inter, union = (truth & found).sum(), (truth | found).sum()
    kept, total = holes_kept(truth, found, mpp)
    return {
        "iou": float(inter / union) if union else 1.0,
        "recall": float(inter / truth.sum()) if truth.sum() else 1.0,
        "false_tissue": float((found & ~truth).sum() / max(1, truth.sum())),
        "holes": f"{kept}/{total}",
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark with these command-line arguments; return the rows and the totals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/srmil-bench-segment"))
    parser.add_argument("--clam-dir", type=Path, default=os.environ.get("CLAM_DIR"))
    parser.add_argument("--clam-python", default=os.environ.get("CLAM_PYTHON", "python3"))
    parser.add_argument(
        "--large", default="32768x24576", help="size of the large slide at 0.25 µm/px, or 'none'"
    )
    parser.add_argument(
        "--slides", nargs="+", default=None, help="a subset of the cohort's slides, by name"
    )
    args = parser.parse_args(argv)
    large = None if args.large == "none" else tuple(int(v) for v in args.large.split("x"))
    specs = cohort(large)
    if args.slides:
        unknown = sorted(set(args.slides) - set(specs))
        if unknown:
            parser.error(f"unknown slides {unknown}; the cohort has {sorted(specs)}")
    generate(args.work, specs, set(args.slides) if args.slides else None)
    if args.slides:
        specs = {name: spec for name, spec in specs.items() if name in args.slides}
    use_clam = args.clam_dir is not None and (args.clam_dir / "create_patches_fp.py").is_file()
    if not use_clam:
        print(
            "CLAM not found: set CLAM_DIR (and CLAM_PYTHON) or pass --clam-dir to compare "
            "with create_patches_fp.py; running srmil only",
            flush=True,
        )
    rows = []
    for name, spec in specs.items():
        slide = (args.work / "slides" / f"{name}.svs").resolve()
        truth = (
            cv2.imread(str(args.work / "masks" / f"{name}.tissue.png"), cv2.IMREAD_GRAYSCALE) > 127
        )
        row = {"slide": name, "size": f"{spec['width_px']}x{spec['height_px']}", "mpp": spec["mpp"]}
        seconds, rss, geojson = ours(slide, args.work / "out")
        row["srmil"] = {
            "seconds": round(seconds, 2),
            "rss_mib": round(rss),
            **scores(truth, rasterise(read_geojson_polygons(geojson), truth.shape), spec["mpp"]),
        }
        if use_clam:
            seconds, rss, result = clam(
                slide, args.work / "out", args.clam_dir, args.clam_python, spec["mpp"]
            )
            row["clam"] = {
                "seconds": round(seconds, 2),
                "rss_mib": round(rss),
                **scores(truth, clam_mask(result, truth.shape), spec["mpp"]),
            }
            row["time_ratio"] = round(row["srmil"]["seconds"] / row["clam"]["seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print()
    head = (
        f"{'slide':<10} {'size':>12} {'tool':<6} {'time s':>7} {'RSS MiB':>8} {'IoU':>6} "
        f"{'recall':>7} {'false':>6} {'holes':>6}"
    )
    print(head)
    for row in rows:
        for tool in ("srmil", "clam"):
            if tool in row:
                r = row[tool]
                print(
                    f"{row['slide']:<10} {row['size']:>12} {tool:<6} {r['seconds']:>7.2f} "
                    f"{r['rss_mib']:>8} {r['iou']:>6.3f} {r['recall']:>7.3f} "
                    f"{r['false_tissue']:>6.3f} {r['holes']:>6}"
                )
    totals = {
        "srmil_seconds": sum(r["srmil"]["seconds"] for r in rows),
        "srmil_rss_mib": max(r["srmil"]["rss_mib"] for r in rows),
        "srmil_mean_iou": float(np.mean([r["srmil"]["iou"] for r in rows])),
    }
    if use_clam:
        ours_s = totals["srmil_seconds"]
        clam_s = totals["clam_seconds"] = sum(r["clam"]["seconds"] for r in rows)
        totals["clam_rss_mib"] = max(r["clam"]["rss_mib"] for r in rows)
        totals["clam_mean_iou"] = float(np.mean([r["clam"]["iou"] for r in rows]))
        totals["time_ratio"] = ours_s / clam_s
        print(
            f"\ntime ratio srmil/CLAM over all slides: {ours_s / clam_s:.2f} "
            f"({ours_s:.1f} s vs {clam_s:.1f} s)"
        )
        print(
            "mean IoU: srmil {:.3f}, CLAM {:.3f}".format(
                totals["srmil_mean_iou"], totals["clam_mean_iou"]
            )
        )
    return {"rows": rows, "clam": use_clam, **totals}


if __name__ == "__main__":
    main()
