"""Pen ink against the generator's ground truth: the band removed along a stroke, and tissue on
heavily marked slides.

1. A straight stroke 40 µm wide drawn across the demo's tissue (blue, green, black ink; upright
   and at 30°; views of 2 and 8 µm/px): per side of the stroke, the mean width of tissue lost
   beyond the stroke and of ink left as tissue, in µm (from the generator's stroke mask).
2. Slides with six pen strokes and a black border each: tissue recall and false tissue against
   the ground truth (downsample 16), and the number of pieces.

Run it with each checkout on PYTHONPATH to compare code (the slides are made once in --work):

    PYTHONPATH=CHECKOUT python benchmarks/segment_ink.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import openslide

from srmil.demo.artifacts import PEN_INKS, Artifacts, PenStroke, apply_artifacts
from srmil.demo.geometry import TissueShape
from srmil.demo.plan import NEGATIVE
from srmil.demo.write import write_flat_tiff, write_slide
from srmil.settings import SegmentSettings
from srmil.wsi.geometry import polygons_mask, read_geojson_polygons
from srmil.wsi.segment import segment_slide

MPP, W, H = 0.5, 2048, 1536
VIEWS = {"2 um": {}, "8 um": {"min_view_px": 256, "min_seg_mpp": 8.0}}


def demo_slide(work: Path, name: str, index: int, seed: int, **spec) -> Path:
    row = {
        "slide_id": name,
        "path": f"{name}.tif",
        "patient_id": name,
        "label": NEGATIVE,
        "annotation": "",
    }
    if not (work / "masks" / f"{name}.tissue.png").exists():
        write_slide(work, row, index, seed, W, H, MPP, **spec)
    return work / row["path"]


def found_mask(slide: Path, work: Path, params: SegmentSettings, shape: tuple, ds: float) -> tuple:
    summary = segment_slide(slide, work / "out.geojson", work / "out.png", params)
    return polygons_mask(read_geojson_polygons(work / "out.geojson"), shape, ds) > 0, summary


def stroke_band(work: Path) -> list[dict]:
    base = demo_slide(
        work, "tissue", 0, 7, tissue_shape=TissueShape(n_pieces=(1, 1), holes_per_piece=(0, 0))
    )
    with openslide.OpenSlide(base) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    truth = cv2.imread(str(work / "masks" / "tissue.tissue.png"), cv2.IMREAD_GRAYSCALE) > 127
    tissue = cv2.resize(truth.astype(np.uint8), (W, H), interpolation=cv2.INTER_NEAREST)
    interior = cv2.erode(tissue, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (121, 121))) > 0
    rows = []
    for ink in ("blue", "green", "black"):
        for angle in (0, 30):
            t = np.tan(np.radians(angle))
            points = np.array([[1024.3 - 800 * t, -32.0], [1024.3 + 800 * t, H + 32.0]])
            inked = rgb.copy()
            stroke = apply_artifacts(
                inked,
                0,
                H,
                [PenStroke(points, 80.0, PEN_INKS[ink], 0.9)],
                None,
                np.random.default_rng(0),
            )
            slide = work / "stroke.tif"
            write_flat_tiff(slide, inked, MPP)
            near = cv2.dilate(stroke.astype(np.uint8), np.ones((81, 81), np.uint8)) > 0
            zone = near & interior
            # one px outside the stroke along its length: the length of both sides, in px
            sides = zone & ~stroke & (cv2.dilate(stroke.astype(np.uint8), np.ones((3, 3))) > 0)
            for view, settings in VIEWS.items():
                found, _ = found_mask(slide, work, SegmentSettings(**settings), (H, W), 1.0)
                rows.append(
                    {
                        "ink": ink,
                        "angle": angle,
                        "view": view,
                        "lost_beyond_um": round(
                            float((zone & ~stroke & ~found).sum() / sides.sum() * MPP), 2
                        ),
                        "ink_left_um": round(
                            float((zone & stroke & found).sum() / sides.sum() * MPP), 2
                        ),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def marked_slides(work: Path, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        slide = demo_slide(
            work,
            f"pen{i}",
            i,
            3,
            artifacts=Artifacts(pen_strokes=6, black_border=True),
            tissue_shape=TissueShape(n_pieces=(1, 3)),
        )
        truth = cv2.imread(str(work / "masks" / f"pen{i}.tissue.png"), cv2.IMREAD_GRAYSCALE) > 127
        found, summary = found_mask(slide, work, SegmentSettings(), truth.shape, 16.0)
        rows.append(
            {
                "slide": f"pen{i}",
                "pieces": summary["n_pieces"],
                "recall": float((truth & found).sum() / truth.sum()),
                "false_tissue": float((found & ~truth).sum() / truth.sum()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/srmil-bench-ink"))
    parser.add_argument("--slides", type=int, default=12, help="heavily marked slides")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    band = stroke_band(args.work)
    marked = marked_slides(args.work, args.slides)
    print()
    for view in VIEWS:
        part = [r for r in band if r["view"] == view]
        print(
            f"view {view}: lost beyond the stroke "
            f"{np.mean([r['lost_beyond_um'] for r in part]):.2f}"
            f" µm per side (max {max(r['lost_beyond_um'] for r in part):.2f}), ink left "
            f"{np.mean([r['ink_left_um'] for r in part]):.2f} µm per side "
            f"(max {max(r['ink_left_um'] for r in part):.2f})"
        )
    print(
        f"{len(marked)} marked slides: recall {np.mean([r['recall'] for r in marked]):.4f}, "
        f"false tissue {np.mean([r['false_tissue'] for r in marked]):.4f}, "
        f"pieces {sum(r['pieces'] for r in marked)}"
    )


if __name__ == "__main__":
    main()
