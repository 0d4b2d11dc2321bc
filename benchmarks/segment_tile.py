"""Segmentation + tiling side by side with CLAM's create_patches_fp.py on generated slides.

Each tool runs two ways, side by side in one run, repeated (--repeats, default 3) with the
order of the tools alternating; medians are reported.

per slide  one process per slide: `srmil segment` then `srmil tile` (two processes, as the
           workflow runs them), and one `create_patches_fp.py --seg --patch` whose source
           folder holds just that slide (so each slide pays CLAM's imports).
folder     each tool once over a folder of slides. CLAM the usual way: one
           `create_patches_fp.py` over the folder (one run per µm/px in it, since its patch size
           is in level-0 px). srmil in one process through the library (`segment_slide`, then
           `tile_slide`, slide after slide), the like-for-like with CLAM's single process.
           srmil's usual way over a cohort, the workflow, runs one process per slide per stage:
           the per-slide processes above, whose sum is reported for each folder.

The folders: "original" (the first four slides) and "unseen" (two slides with their own seeds
and tissue shapes, which the project never tuned on). Accuracy against the generator's ground
truth (tissue not under ink or border, downsample 16), from the last repetition's outputs (both
tools are deterministic): each tool's tissue mask (srmil: its GeoJSON; CLAM: the contours that
create_patches_fp.py draws on masks/{slide}.jpg, read back, since it saves no contour file) and
the area its kept patches cover (srmil: tiles JSON; CLAM: patches/{slide}.h5).

    CLAM_DIR=/path/to/CLAM CLAM_PYTHON=/path/to/clam-venv/bin/python \\
        python benchmarks/segment_tile.py

Without CLAM_DIR (or --clam-dir) only srmil's side runs. Slides are generated once into --work
(reused by name: use another --work after changing --large or --unseen); `--slides demo biopsy`
runs a subset.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np

from srmil.demo.artifacts import Artifacts
from srmil.demo.geometry import BIOPSY, TissueShape
from srmil.demo.plan import NEGATIVE, POSITIVE
from srmil.demo.render import BANDED_MIN_PX, MASK_DOWNSAMPLE
from srmil.demo.write import write_slide
from srmil.settings import SegmentSettings
from srmil.wsi.geometry import polygons_mask, read_geojson_polygons
from srmil.wsi.tiling import read_tiles

HERE = Path(__file__).resolve().parent
MASK_DS = MASK_DOWNSAMPLE
SEED = 11  # the generator seed of the first four slides
FRAGMENTS = TissueShape(
    n_pieces=(4, 7),
    fill=(0.45, 0.8),
    irregularity=0.22,
    edge_noise_um=90.0,
    holes_per_piece=(2, 6),
    hole_radius_um=(40.0, 160.0),
)
RAGGED = TissueShape(
    n_pieces=(1, 2),
    fill=(0.7, 0.95),
    irregularity=0.3,
    edge_noise_um=150.0,
    margin_fraction=0.03,
    holes_per_piece=(4, 9),
    hole_radius_um=(60.0, 220.0),
)


def cohort(large: tuple[int, int] | None, unseen: tuple[int, int] | None = None) -> dict[str, dict]:
    """name -> write_slide arguments (size, µm/px, seed, shape, artifacts)."""
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
    if unseen:
        # slides the project never tuned on: their own seeds and tissue shapes (more, rougher
        # pieces with more and larger holes; one large ragged piece), 6.1 x 4.6 mm at 0.25 µm/px
        w, h = unseen
        specs["unseen_frag"] = dict(
            width_px=w,
            height_px=h,
            mpp=0.25,
            seed=2027,
            tissue_shape=FRAGMENTS,
            artifacts=Artifacts(pen_strokes=3),
        )
        specs["unseen_ragged"] = dict(
            width_px=w,
            height_px=h,
            mpp=0.25,
            seed=4099,
            tissue_shape=RAGGED,
            artifacts=Artifacts(pen_strokes=1, black_border=True),
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
        spec = {k: v for k, v in spec.items() if k != "seed"} | {"seed": spec.get("seed", SEED)}
        write_slide(work, row, index, banded=True if big else None, **spec)
        print(
            f"generated {name} ({spec['width_px']} x {spec['height_px']}) in "
            f"{time.perf_counter() - t:.0f} s",
            flush=True,
        )


ORIGINAL = ("demo", "demo_pen", "biopsy", "large_pen")
# CLAM's settings compared: its defaults (no --preset), and the preset it ships for biopsies
# (presets/bwh_biopsy.csv: saturation threshold 15, minimum area 1 reference patch)
CLAM_VARIANTS = {"clam": None, "clam_biopsy": "bwh_biopsy.csv"}
# Whose tissue mask is read back from masks/{slide}.jpg. The preset draws its contours 50
# level-0 px wide, 0 to 3 px on these masks (1 px lines lose half their colour in the JPEG),
# and its holes between pen loops and tissue leave regions no fill from the edge gets right:
# for it only the patches count (patches/{slide}.h5, exact).
CLAM_MASK_READ_BACK = {"clam"}
# srmil over a folder in one process, through the library: slides after the output folder
IN_PROCESS = """
import sys
from pathlib import Path
from srmil.settings import SegmentSettings, TileSettings
from srmil.wsi.segment import segment_slide
from srmil.wsi.tiling import tile_slide
out = Path(sys.argv[1])
for slide in map(Path, sys.argv[2:]):
    geojson, qc = out / f"{slide.stem}.geojson", out / f"{slide.stem}.qc.png"
    segment_slide(slide, geojson, qc, SegmentSettings())
    tile_slide(slide, geojson, out / f"{slide.stem}.tiles.json", TileSettings(),
               out_qc_png=out / f"{slide.stem}.tiles.png", seg_qc_png=qc)
"""


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


def srmil_slide(slide: Path, out: Path) -> tuple[float, float]:
    """`srmil segment` then `srmil tile` on one slide, as the workflow runs them."""
    srmil = str(Path(sys.executable).with_name("srmil"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / slide.stem
    geojson, qc = f"{stem}.geojson", f"{stem}.qc.png"
    t1, m1 = run([srmil, "segment", "--slide", str(slide), "--out", geojson, "--qc", qc])
    t2, m2 = run(
        [srmil, "tile", "--slide", str(slide), "--tissue", geojson, "--out", f"{stem}.tiles.json"]
        + ["--seg-qc", qc, "--qc", f"{stem}.tiles.png"]
    )
    return t1 + t2, max(m1, m2)


def srmil_folder(slides: list[Path], out: Path) -> tuple[float, float]:
    """srmil over the slides in one process (the library, same outputs as the commands)."""
    out.mkdir(parents=True, exist_ok=True)
    return run([sys.executable, "-c", IN_PROCESS, str(out), *map(str, slides)])


def clam_patch_px(mpp: float) -> int:
    """CLAM's patch size in level-0 px for the same patches as ours (224 px at 0.5 µm/px)."""
    return round(224 * 0.5 / mpp)


def clam_run(
    slides: list[Path],
    source: Path,
    save: Path,
    patch_px: int,
    args: argparse.Namespace,
    preset: str | None,
) -> tuple[float, float]:
    """One `create_patches_fp.py --seg --patch` over a source folder holding these slides."""
    for folder in (source, save):
        shutil.rmtree(folder, ignore_errors=True)  # a saved patch file would make CLAM skip
    source.mkdir(parents=True)
    for slide in slides:
        (source / slide.name).symlink_to(slide)
    return run(
        [args.clam_python, "create_patches_fp.py", "--source", str(source)]
        + ["--save_dir", str(save), "--seg", "--patch"]
        + ["--patch_size", str(patch_px), "--step_size", str(patch_px)]
        + (["--preset", preset] if preset else []),
        cwd=args.clam_dir,
        env={**os.environ, "PYTHONPATH": str(args.clam_dir)},
    )


def clam_folder(
    slides: list[Path], mpps: list[float], out: Path, args: argparse.Namespace, preset: str | None
) -> tuple[float, float, int]:
    """CLAM over a folder: one create_patches_fp.py per µm/px. (seconds, peak MiB, processes)."""
    seconds, peak, groups = 0.0, 0.0, sorted(set(mpps))
    for mpp in groups:
        group = [s for s, m in zip(slides, mpps, strict=True) if m == mpp]
        s, m = clam_run(
            group, out / f"src_{mpp}", out / f"save_{mpp}", clam_patch_px(mpp), args, preset
        )
        seconds, peak = seconds + s, max(peak, m)
    return seconds, peak, len(groups)


def enclosed(lines: np.ndarray, half_px: int) -> np.ndarray:
    """What closed drawn lines enclose: everything not reachable from the image's edge without
    crossing a line, then shrunk by half the line's width to land on the contour itself."""
    lines = cv2.dilate(lines.astype(np.uint8), np.ones((3, 3), np.uint8))  # close JPEG gaps
    _, labels = cv2.connectedComponents(1 - lines, connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    region = ~np.isin(labels, edge[edge > 0])
    size = 2 * (half_px + 1) + 1  # +1: the dilation above
    return cv2.erode(region.astype(np.uint8), np.ones((size, size), np.uint8)) > 0


def clam_tissue(save: Path, name: str, width_px: int, shape: tuple[int, int]) -> np.ndarray:
    """CLAM's tissue read back from masks/{name}.jpg, where create_patches_fp.py draws its
    tissue contours in pure green and their holes in pure blue on the slide at its
    segmentation level, lines `line_thickness` level-0 px wide (from the process list it saves);
    bool at downsample 16. The generator's inks are darker than either colour."""
    bgr = cv2.imread(str(save / "masks" / f"{name}.jpg")).astype(np.int16)
    b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    line_px = int(line_thickness(save / "process_list_autogen.csv", name) * bgr.shape[1] / width_px)
    green = (g > 150) & (g - r > 80) & (g - b > 80)
    blue = (b > 190) & (b - r > 120) & (b - g > 120)
    tissue = enclosed(green, line_px // 2) & ~enclosed(blue, line_px // 2)
    return cv2.resize(tissue.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST) > 0


def line_thickness(process_list: Path, name: str) -> float:
    """The contour line width (level-0 px) create_patches_fp.py used for this slide."""
    with open(process_list, newline="") as f:
        for row in csv.DictReader(f):
            if Path(row["slide_id"]).stem == name:
                return float(row["line_thickness"])
    raise KeyError(f"{name} not in {process_list}")


def clam_patches(h5: Path) -> tuple[np.ndarray, float]:
    """(coords N x 2 level-0 px, patch side level-0 px) CLAM kept; none if it wrote no file."""
    if not h5.is_file():
        return np.zeros((0, 2), np.int64), 0.0
    with h5py.File(h5, "r") as f:
        coords = f["coords"]
        return coords[:], float(coords.attrs["patch_size"] * coords.attrs["downsample"][0])


def covered(coords: np.ndarray, patch_level0: float, shape: tuple[int, int]) -> np.ndarray:
    """bool at downsample 16: the cells the patches cover."""
    mask = np.zeros(shape, bool)
    for x, y in coords:
        y0, x0 = max(0, round(y / MASK_DS)), max(0, round(x / MASK_DS))
        mask[y0 : round((y + patch_level0) / MASK_DS), x0 : round((x + patch_level0) / MASK_DS)] = 1
    return mask


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


def overlap(truth: np.ndarray, found: np.ndarray) -> dict:
    inter, union = (truth & found).sum(), (truth | found).sum()
    return {
        "iou": float(inter / union) if union else 1.0,
        "recall": float(inter / truth.sum()) if truth.sum() else 1.0,
        "false_tissue": float((found & ~truth).sum() / max(1, truth.sum())),
    }


def scores(truth: np.ndarray, tissue: np.ndarray | None, patches: np.ndarray, mpp: float) -> dict:
    """Tissue mask and patch cover against the truth (no mask: None for its scores)."""
    if tissue is None:
        mask: dict = {"iou": None, "recall": None, "false_tissue": None, "holes": "-"}
    else:
        kept, total = holes_kept(truth, tissue, mpp)
        mask = {**overlap(truth, tissue), "holes": f"{kept}/{total}"}
    return {**mask, "patches": {k: round(v, 4) for k, v in overlap(truth, patches).items()}}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def measure(
    args: argparse.Namespace, specs: dict[str, dict], folders: dict[str, list[str]], tools: list
) -> dict[tuple, list[tuple[float, float]]]:
    """(mode, tool, slide or folder) -> [(seconds, peak MiB)] over the repetitions; each
    repetition starts with another tool."""
    out = args.work / "out"
    slides = {name: (args.work / "slides" / f"{name}.svs").resolve() for name in specs}
    times: dict[tuple, list[tuple[float, float]]] = {}
    for rep in range(args.repeats):
        order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
        for name, slide in slides.items():
            for tool in order:
                if tool == "srmil":
                    result = srmil_slide(slide, out / "srmil_slide")
                else:
                    result = clam_run(
                        [slide],
                        out / tool / "slide_src" / name,
                        out / tool / "slide" / name,
                        clam_patch_px(specs[name]["mpp"]),
                        args,
                        CLAM_VARIANTS[tool],
                    )
                times.setdefault(("slide", tool, name), []).append(result)
        for folder, names in folders.items():
            paths = [slides[n] for n in names]
            for tool in order:
                if tool == "srmil":
                    s, m = srmil_folder(paths, out / "srmil_folder" / folder)
                    n = 1
                else:
                    s, m, n = clam_folder(
                        paths,
                        [specs[n]["mpp"] for n in names],
                        out / tool / "folder" / folder,
                        args,
                        CLAM_VARIANTS[tool],
                    )
                times.setdefault(("folder", tool, folder), []).append((s, m))
                times[("processes", tool, folder)] = [(n, 0)]
        print(f"repetition {rep + 1}/{args.repeats} done", flush=True)
    return times


def summarise(
    times: dict, specs: dict[str, dict], folders: dict[str, list[str]], tools: list[str]
) -> dict:
    """Medians per folder, and per mode the median of each repetition's total."""
    reps = len(times[("slide", "srmil", next(iter(specs)))])

    def total(mode: str, tool: str, keys: list[str]) -> float:
        return median([sum(times[(mode, tool, k)][r][0] for k in keys) for r in range(reps)])

    def peak(mode: str, tool: str, keys: list[str]) -> int:
        return round(max(m for k in keys for _, m in times[(mode, tool, k)]))

    out: dict = {"repeats": reps, "folders": {}}
    for folder, names in folders.items():
        srmil = {
            "workflow_seconds": total("slide", "srmil", names),
            "one_process_seconds": total("folder", "srmil", [folder]),
            "one_process_rss_mib": peak("folder", "srmil", [folder]),
        }
        entry: dict = {"slides": names, "srmil": srmil}
        for tool in tools[1:]:
            seconds = total("folder", tool, [folder])
            per_slide = total("slide", tool, names)
            entry[tool] = {
                "seconds": seconds,
                "processes": times[("processes", tool, folder)][0][0],
                "rss_mib": peak("folder", tool, [folder]),
                "per_slide_seconds": per_slide,
                "ratio_per_slide": round(srmil["workflow_seconds"] / per_slide, 2),
                "ratio_workflow": round(srmil["workflow_seconds"] / seconds, 2),
                "ratio_one_process": round(srmil["one_process_seconds"] / seconds, 2),
            }
        out["folders"][folder] = entry
    names = list(specs)
    out["srmil_seconds"] = total("slide", "srmil", names)
    out["folder_srmil_seconds"] = total("folder", "srmil", list(folders))
    for tool in tools[1:]:
        out[f"{tool}_seconds"] = total("slide", tool, names)
        out[f"folder_{tool}_seconds"] = total("folder", tool, list(folders))
    if "clam" in tools:  # CLAM with its defaults: the figures run_all.py quotes
        out["time_ratio"] = out["srmil_seconds"] / out["clam_seconds"]
        out["folder_time_ratio"] = out["folder_srmil_seconds"] / out["folder_clam_seconds"]
    return out


def accuracy(args: argparse.Namespace, name: str, spec: dict, tools: list[str]) -> dict:
    """Each tool's tissue and patch cover against the truth, from the per-slide outputs."""
    truth = cv2.imread(str(args.work / "masks" / f"{name}.tissue.png"), cv2.IMREAD_GRAYSCALE) > 127
    out, mpp = args.work / "out", spec["mpp"]
    coords, _, plan = read_tiles(out / "srmil_slide" / f"{name}.tiles.json")
    polygons = read_geojson_polygons(out / "srmil_slide" / f"{name}.geojson")
    result = {
        "srmil": {
            "patches_kept": len(coords),
            **scores(
                truth,
                rasterise(polygons, truth.shape),
                covered(coords, plan.patch_level0, truth.shape),
                mpp,
            ),
        }
    }
    for tool in tools[1:]:
        save = out / tool / "slide" / name
        coords, patch = clam_patches(save / "patches" / f"{name}.h5")
        result[tool] = {
            "patches_kept": len(coords),
            **scores(
                truth,
                clam_tissue(save, name, spec["width_px"], truth.shape)
                if tool in CLAM_MASK_READ_BACK
                else None,
                covered(coords, patch, truth.shape),
                mpp,
            ),
        }
    return result


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
        "--unseen",
        default="24576x18432",
        help="size of the two unseen slides at 0.25 µm/px, or 'none'",
    )
    parser.add_argument(
        "--slides", nargs="+", default=None, help="a subset of the cohort's slides, by name"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of everything; medians")
    parser.add_argument(
        "--clam-variants",
        nargs="+",
        choices=list(CLAM_VARIANTS),
        default=list(CLAM_VARIANTS),
        help="CLAM with its defaults (clam), with its bwh_biopsy preset (clam_biopsy)",
    )
    args = parser.parse_args(argv)

    def size(text: str) -> tuple[int, int] | None:
        return None if text == "none" else tuple(int(v) for v in text.split("x"))

    specs = cohort(size(args.large), size(args.unseen))
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
    tools = ["srmil", *(args.clam_variants if use_clam else [])]
    folders = {
        folder: names
        for folder, names in (
            ("original", [n for n in specs if n in ORIGINAL]),
            ("unseen", [n for n in specs if n not in ORIGINAL]),
        )
        if names
    }
    times = measure(args, specs, folders, tools)
    summary = summarise(times, specs, folders, tools)
    rows = []
    for name, spec in specs.items():
        row = {
            "slide": name,
            "size": f"{spec['width_px']}x{spec['height_px']}",
            "mpp": spec["mpp"],
            **accuracy(args, name, spec, tools),
        }
        for tool in tools:
            runs = times[("slide", tool, name)]
            row[tool]["seconds"] = median([s for s, _ in runs])
            row[tool]["rss_mib"] = round(max(m for _, m in runs))
            if tool != "srmil":
                row[tool]["time_ratio"] = round(row["srmil"]["seconds"] / row[tool]["seconds"], 2)
        rows.append(row)
    print_tables(rows, summary, tools)
    result = {"rows": rows, "clam": "clam" in tools, "tools": tools, **summary}
    for tool in tools:
        result[f"{tool}_rss_mib"] = max(r[tool]["rss_mib"] for r in rows)
        ious = [r[tool]["iou"] for r in rows]
        result[f"{tool}_mean_iou"] = None if None in ious else float(np.mean(ious))
        result[f"{tool}_mean_patch_iou"] = float(np.mean([r[tool]["patches"]["iou"] for r in rows]))
    (args.work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def num(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def print_tables(rows: list[dict], summary: dict, tools: list[str]) -> None:
    print(f"\nper slide, one process each (time: median of {summary['repeats']}):")
    print(
        f"{'slide':<14} {'size':>12} {'tool':<11} {'time s':>7} {'RSS MiB':>8} {'IoU':>6} "
        f"{'recall':>7} {'false':>6} {'holes':>6} {'patches':>8} {'p.IoU':>6} {'p.rec':>6} "
        f"{'p.false':>7}"
    )
    for row in rows:
        for tool in tools:
            r, p = row[tool], row[tool]["patches"]
            print(
                f"{row['slide']:<14} {row['size']:>12} {tool:<11} {r['seconds']:>7.2f} "
                f"{r['rss_mib']:>8} {num(r['iou'], 6)} {num(r['recall'], 7)} "
                f"{num(r['false_tissue'], 6)} {r['holes']:>6} {r['patches_kept']:>8} "
                f"{p['iou']:>6.3f} {p['recall']:>6.3f} {p['false_tissue']:>7.3f}"
            )
    print(f"\nover a folder (median of {summary['repeats']}), seconds:")
    for folder, e in summary["folders"].items():
        s = e["srmil"]
        print(
            f"{folder} ({len(e['slides'])} slides): srmil workflow (a process per slide and "
            f"stage) {s['workflow_seconds']:.2f}, srmil one process {s['one_process_seconds']:.2f}"
        )
        for tool in tools[1:]:
            c = e[tool]
            print(
                f"  {tool}: create_patches_fp.py over the folder ({c['processes']} run(s)) "
                f"{c['seconds']:.2f}, a process per slide {c['per_slide_seconds']:.2f}; "
                f"srmil/{tool}: per slide {c['ratio_per_slide']:.2f}, workflow vs folder "
                f"{c['ratio_workflow']:.2f}, one process vs folder {c['ratio_one_process']:.2f}"
            )
    if "time_ratio" in summary:
        print(
            f"\nall slides, srmil/CLAM (defaults): per slide {summary['time_ratio']:.2f} "
            f"({summary['srmil_seconds']:.1f} s vs {summary['clam_seconds']:.1f} s); over "
            f"folders, one process each {summary['folder_time_ratio']:.2f} "
            f"({summary['folder_srmil_seconds']:.1f} s vs {summary['folder_clam_seconds']:.1f} s)"
        )


if __name__ == "__main__":
    main()
