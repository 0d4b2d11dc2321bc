"""Writing the demo: pyramidal Aperio-style SVS and generic tiled TIFF (JPEG, 256 px tiles,
factor-4 pyramid) that OpenSlide reads with a µm/px, ground-truth masks at downsample 16,
QuPath-style GeoJSON of the tumour regions, and `samples.csv` last.

Level 0 goes to tifffile tile by tile as `SlideRenderer` renders it; every page leaves out the
DateTime tag and tifffile's JSON, so a rerun writes the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from srmil.demo.artifacts import ARTIFACT_STREAM, Artifacts, plan_artifacts
from srmil.demo.geometry import TissueShape, TumourShape, slide_fields
from srmil.demo.plan import POSITIVE, SHEET_COLUMNS, planned_sheet
from srmil.demo.render import (
    ANNOTATION_DOWNSAMPLE,
    BANDED_MIN_PX,
    LEVEL_DOWNSAMPLE,
    MASK_DOWNSAMPLE,
    TILE_PX,
    SlideRenderer,
)
from srmil.errors import InputError
from srmil.store import atomic_path, write_text

JPEG_QUALITY = 85
APERIO_THUMBNAIL_PX = 512
APP_MAG = 20
# Every page: JPEG tiles/strips, no DateTime tag (reruns are byte-identical), no tifffile JSON.
TIFF_OPTIONS = {"photometric": "rgb", "compression": "jpeg",
                "compressionargs": {"level": JPEG_QUALITY}, "datetime": False,
                "software": "srmil.demo", "metadata": None}
# write_slide's defaults (frozen dataclasses, safe to share).
DEFAULT_TISSUE, DEFAULT_TUMOUR, NO_ARTIFACTS = TissueShape(), TumourShape(), Artifacts()


def write_svs(path: str | Path, level0: SlideRenderer, mpp: float, file_mpp: bool = True) -> None:
    """Aperio-style: level 0, a stripped thumbnail, then the reduced levels (what OpenSlide's
    aperio driver expects), with AppMag and MPP (unless file_mpp is False) in the first page's
    description."""
    h0, w0 = level0.shape[:2]
    head = f"Aperio Image Library v12.0.0 \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({TILE_PX}x{TILE_PX})"
    tail = f"JPEG/RGB Q={JPEG_QUALITY}|AppMag = {APP_MAG}" + (f"|MPP = {mpp:g}" if file_mpp else "")
    scale = min(1.0, APERIO_THUMBNAIL_PX / max(h0, w0))
    thumb_size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    if level0.banded and max(1, w0 // LEVEL_DOWNSAMPLE) < thumb_size[0]:
        # The thumbnail is made from the coarsest level at least as wide; level 0 of a banded
        # slide is never held whole.
        raise ValueError(f"a banded .svs needs level 1 at least as wide as its thumbnail "
                         f"({thumb_size[0]} px), got {w0} x {h0}; write a .tif instead")
    bigtiff = level0.nbytes > 2**32 - 2**28
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        tif.write(level0.tiles(), shape=level0.shape, dtype=np.uint8, tile=(TILE_PX, TILE_PX),
                  description=f"{head} {tail}", **TIFF_OPTIONS)
        reduced = level0.reduced()
        source = next((lv for lv in reversed(reduced) if lv.shape[1] >= thumb_size[0]),
                      level0.pixels)
        thumbnail = cv2.resize(source, thumb_size, interpolation=cv2.INTER_AREA)
        tif.write(thumbnail, rowsperstrip=16,
                  description=f"{head} -> {thumb_size[0]}x{thumb_size[1]} {tail}",
                  **TIFF_OPTIONS)
        for level in reduced:
            h, w = level.shape[:2]
            tif.write(level, tile=(TILE_PX, TILE_PX), subfiletype=0,
                      description=f"{head} -> {w}x{h} {tail}", **TIFF_OPTIONS)


def write_tiled_tiff(path: str | Path, level0: SlideRenderer, mpp: float,
                     file_mpp: bool = True) -> None:
    """Generic tiled TIFF: µm/px in the resolution tags (none if file_mpp is False), reduced
    levels as subfiletype-1 pages (OpenSlide does not see a pyramid kept in SubIFDs)."""
    w0 = level0.shape[1]
    px_per_cm = 1e4 / mpp

    def resolution(width: int) -> dict:
        downsample = w0 / width
        return ({"resolution": (px_per_cm / downsample, px_per_cm / downsample),
                 "resolutionunit": "CENTIMETER"} if file_mpp else {})

    bigtiff = level0.nbytes > 2**32 - 2**28
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        tif.write(level0.tiles(), shape=level0.shape, dtype=np.uint8, tile=(TILE_PX, TILE_PX),
                  subfiletype=0, description="srmil synthetic demo slide", **resolution(w0),
                  **TIFF_OPTIONS)
        for level in level0.reduced():
            tif.write(level, tile=(TILE_PX, TILE_PX), subfiletype=1,
                      **resolution(level.shape[1]), **TIFF_OPTIONS)


def write_flat_tiff(path: str | Path, rgb: np.ndarray, mpp: float,
                    compression: str = "jpeg") -> None:
    """One level of RGB pixels as a tiled generic TIFF (no pyramid) with µm/px in its resolution
    tags, which OpenSlide opens: slides drawn by hand in tests and benchmarks."""
    options = {**TIFF_OPTIONS, "compression": compression}
    if compression != "jpeg":
        options.pop("compressionargs")
    tifffile.imwrite(path, rgb, tile=(TILE_PX, TILE_PX), resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER", **options)


def tumour_geojson(tumour_small: np.ndarray, downsample: int = ANNOTATION_DOWNSAMPLE) -> dict:
    """QuPath-style FeatureCollection of tumour Polygons (with holes) in level-0 px, from the
    tumour mask at `downsample` (bool)."""
    contours, hierarchy = cv2.findContours(tumour_small.astype(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return {"type": "FeatureCollection", "features": []}
    rings = [_ring(c, downsample) for c in contours]
    features = []
    for i, ring in enumerate(rings):
        if hierarchy[0][i][3] != -1 or ring is None:
            continue  # holes are attached to their outer contour below
        holes = [rings[j] for j in range(len(rings))
                 if hierarchy[0][j][3] == i and rings[j] is not None]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [_oriented(ring, True)]
                         + [_oriented(r, False) for r in holes]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        })
    return {"type": "FeatureCollection", "features": features}


def _ring(contour: np.ndarray, downsample: int) -> list[list[float]] | None:
    """A closed ring in level-0 px (contour points are pixel centres at `downsample`)."""
    pts = cv2.approxPolyDP(contour, 0.75, True).reshape(-1, 2)
    if len(pts) < 3:
        return None
    ring = [[(float(x) + 0.5) * downsample, (float(y) + 0.5) * downsample] for x, y in pts]
    return ring + [ring[0]]


def _oriented(ring: list[list[float]], counter_clockwise: bool) -> list[list[float]]:
    """RFC 7946 winding: exterior counter-clockwise, holes clockwise (in x/y as written)."""
    xy = np.asarray(ring)
    area2 = float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))
    return ring if (area2 > 0) == counter_clockwise else ring[::-1]


def _write_png(path: Path, mask: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", mask)
    if not ok:
        raise OSError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def write_slide(out_dir: Path, row: dict[str, str], index: int, seed: int, width_px: int,
                height_px: int, mpp: float, tissue_shape: TissueShape = DEFAULT_TISSUE,
                artifacts: Artifacts = NO_ARTIFACTS, file_mpp: bool = True,
                banded: bool | None = None, tumour_shape: TumourShape = DEFAULT_TUMOUR) -> None:
    """Generate one slide and its masks (and annotation, for positives) under out_dir.

    `masks/{slide_id}.tissue.png` is the tissue not covered by pen ink or a black border.
    `file_mpp=False` leaves the µm/px out of the file; `banded` (default: by size) renders
    in bands of rows so memory stays bounded (width and height must be multiples of 16).
    """
    if banded is None:
        banded = width_px * height_px > BANDED_MIN_PX
    if banded and (width_px % MASK_DOWNSAMPLE or height_px % MASK_DOWNSAMPLE):
        raise ValueError(f"banded slides need width and height divisible by "
                         f"{MASK_DOWNSAMPLE}, got {width_px} x {height_px}")
    rng = np.random.default_rng([seed, index])
    art_rng = np.random.default_rng([seed, index, ARTIFACT_STREAM])
    fields = slide_fields(rng, width_px, height_px, mpp, row["label"] == POSITIVE, tissue_shape,
                          tumour_shape)
    strokes, border = plan_artifacts(art_rng, fields.pieces, width_px, height_px, mpp, artifacts)
    level0 = SlideRenderer(seed, index, fields, mpp, rng, art_rng, strokes, border, banded)
    path = out_dir / row["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    (write_svs if path.suffix == ".svs" else write_tiled_tiff)(path, level0, mpp, file_mpp)
    masks = out_dir / "masks"
    _write_png(masks / f"{row['slide_id']}.tissue.png", level0.tissue16)
    _write_png(masks / f"{row['slide_id']}.tumour.png", level0.tumour16)
    if row["annotation"]:
        write_text(out_dir / row["annotation"], json.dumps(tumour_geojson(level0.tumour4)) + "\n")


def write_demo(out_dir: str | Path, n_slides: int = 24, seed: int = 0, width_px: int = 4096,
               height_px: int = 3072, mpp: float = 0.5, progress: bool = True,
               prefix: str = "demo",
               tumour_fraction: tuple[float, float] = TumourShape.fraction,
               tumour_contrast: float = 1.0) -> Path:
    """Generate the cohort; return the path of samples.csv. `tumour_fraction`: the range of
    each positive slide's tumour share of its tissue (drawn uniformly); `tumour_contrast`:
    1 = conspicuous tumour, towards 0 = barely distinguishable from stroma."""
    low, high = tumour_fraction
    if not 0 < low <= high < 1:  # the schema checks each bound, not their order
        raise InputError(
            f"config.yaml: demo.tumour_fraction [{low}, {high}] must be [low, high] with "
            "0 < low <= high < 1; fix it (srmil demo: --tumour-fraction LOW HIGH)"
        )
    if not 0 < tumour_contrast <= 1:
        raise ValueError(f"tumour_contrast must be in (0, 1], got {tumour_contrast}")
    out_dir = Path(out_dir)
    rows = planned_sheet(out_dir, n_slides, seed, prefix)
    tumour_shape = TumourShape(fraction=(float(low), float(high)),
                               contrast=float(tumour_contrast))
    for index, row in enumerate(tqdm(rows, desc="demo slides", unit="slide",
                                     disable=not progress)):
        write_slide(out_dir, row, index, seed, width_px, height_px, mpp,
                    tumour_shape=tumour_shape)
    # The sheet goes last: its presence means the cohort is complete.
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SHEET_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sheet = out_dir / "samples.csv"
    write_text(sheet, buffer.getvalue())
    return sheet
