"""QC images: the slide's view with tissue, holes, excluded ink and the tumour annotation drawn
on it (segmentation), the kept tile grid on top (tiling); PNG in and out (palette PNGs, small
enough for a cohort's report).

Everything is drawn with OpenCV in fixed point (geometry.fixed_point_rings), so outlines keep
1/16 px precision on a view of any size.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np

from srmil import store
from srmil.errors import InputError
from srmil.wsi.geometry import SHIFT, Polygon, fixed_point_rings

# QC images are at most this many px on the longer side (about a screen's width).
QC_MAX_SIDE = 2048
# Colours of a QC image or heatmap PNG (a palette PNG holds at most 256).
PNG_COLOURS = 256
# Colours (RGB).
TISSUE_RGB = (0, 160, 0)
HOLE_RGB = (0, 80, 255)
EXCLUDED_RGB = (255, 140, 0)
ANNOTATION_RGB = (220, 0, 0)
TILE_RGB = (255, 210, 0)
ROI_RGB = (200, 0, 200)  # regions of interest kept
ROI_EXCLUDED_RGB = (60, 60, 60)  # regions of interest left out


def qc_scale(rgb: np.ndarray, downsample: float) -> tuple[np.ndarray, float]:
    """The view shrunk to at most QC_MAX_SIDE px, with its downsample."""
    longer = max(rgb.shape[:2])
    if longer <= QC_MAX_SIDE:
        return rgb, downsample
    f = QC_MAX_SIDE / longer
    size = (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return small, downsample * rgb.shape[1] / size[0]


def draw_overlay(
    rgb: np.ndarray,
    downsample: float,
    tissue: list[Polygon],
    annotation: list[Polygon] | None = None,
    excluded: np.ndarray | None = None,
) -> np.ndarray:
    """Thumbnail with tissue outlines (green), holes (blue), excluded ink and black areas
    (orange) and the tumour annotation (red)."""
    out = rgb.copy()
    thick = max(1, round(max(out.shape[:2]) / 500))
    if excluded is not None and excluded.any():
        edges = cv2.morphologyEx(excluded, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        out[edges > 0] = EXCLUDED_RGB
    for poly in tissue:
        rings = fixed_point_rings(poly, downsample)
        cv2.polylines(out, rings[:1], True, TISSUE_RGB, thick, cv2.LINE_AA, SHIFT)
        cv2.polylines(out, rings[1:], True, HOLE_RGB, thick, cv2.LINE_AA, SHIFT)
    for poly in annotation or []:
        rings = fixed_point_rings(poly, downsample)
        cv2.polylines(out, rings, True, ANNOTATION_RGB, thick, cv2.LINE_AA, SHIFT)
    return out


def draw_regions(rgb: np.ndarray, downsample: float, keep: list[Polygon],
                 exclude: list[Polygon]) -> np.ndarray:
    """The QC image with the regions of interest outlined: kept in magenta, left out in grey."""
    out = rgb.copy()
    thick = max(2, round(max(out.shape[:2]) / 300))
    for polygons, colour in ((keep, ROI_RGB), (exclude, ROI_EXCLUDED_RGB)):
        for poly in polygons:
            rings = fixed_point_rings(poly, downsample)
            cv2.polylines(out, rings, True, colour, thick, cv2.LINE_AA, SHIFT)
    return out


def draw_tile_grid(
    qc_rgb: np.ndarray, qc_downsample: float, coords: np.ndarray, patch_level0: float
) -> np.ndarray:
    """The QC image with each kept patch outlined in yellow, blended so the outlines under it
    (tissue, holes, annotation) stay visible; patches under 4 QC px are tinted instead."""
    one = 1 << SHIFT  # one px in fixed point
    layer = np.zeros(qc_rgb.shape[:2], np.uint8)
    size = patch_level0 / qc_downsample
    for x, y in np.asarray(coords, np.float64) / qc_downsample:
        p0 = (round(x * one), round(y * one))
        p1 = (round((x + size) * one) - one, round((y + size) * one) - one)
        cv2.rectangle(layer, p0, p1, 1, -1 if size < 4 else 1, cv2.LINE_8, SHIFT)
    out = qc_rgb.copy()
    drawn = layer > 0
    alpha = 0.3 if size < 4 else 0.6
    tint = np.array(TILE_RGB, np.float32)
    out[drawn] = np.rint((1 - alpha) * out[drawn] + alpha * tint).astype(np.uint8)
    return out


def encode_png(rgb: np.ndarray) -> bytes:
    """An RGB image as a palette PNG of at most PNG_COLOURS colours.

    QC images and heatmaps are photographic thumbnails under flat-colour outlines: 256 colours
    (Pillow's fast octree, no dithering) keep both legible at about a quarter of the bytes of a
    24-bit PNG (demo: 880 KB -> 200 KB a QC image), which is what keeps a cohort's report small.
    The same pixels give the same bytes.
    """
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), "RGB")
    indexed = image.quantize(PNG_COLOURS, method=Image.Quantize.FASTOCTREE,
                             dither=Image.Dither.NONE)
    buf = io.BytesIO()
    indexed.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """An RGB image as a palette PNG (encode_png), written atomically."""
    data = encode_png(rgb)
    with store.atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A QC PNG as RGB; an InputError naming the file when it cannot be read."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"{path}: not a readable PNG; rerun the segment step for this slide")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
