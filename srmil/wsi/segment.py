"""Tissue segmentation on a low-resolution view: saturation, threshold, morphology -> polygons.

The view is chosen by resolution (`seg_mpp`, refined for small slides, capped for huge ones) and
read in bounded chunks and processed in strips, so memory is bounded by the view cap
(`max_view_px`), not by the slide (docs/segmentation.md, Memory). Pen ink (blue, green) and black
areas (black ink, scanner borders) are found by colour and removed before thresholding, so they
neither become tissue nor pull the Otsu threshold. Every size is given in µm or µm², so a
setting means the same thing at every resolution.

Polygons are written as GeoJSON in level-0 pixels (QuPath opens them), with a QC overlay
(geometry.py and qc.py, which tiling, the attention diagnostics and the heatmaps share).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import cv2
import numpy as np

from srmil import __version__
from srmil.settings import SegmentSettings
from srmil.wsi import qc
from srmil.wsi.geometry import (
    Polygon,
    contour_ring,
    polygon_area,
    read_geojson_polygons,
    write_geojson_polygons,
)
from srmil.wsi.slide import open_slide, slide_info, thumbnail

log = logging.getLogger(__name__)

# Contours are traced on the final mask upsampled by up to this factor (bilinear, then 0.5),
# so outlines follow pixel edges to a fraction of a view pixel instead of pixel centres.
CONTOUR_SUPERSAMPLE = 4
CONTOUR_MAX_SIDE = 8192
# Glass is never more saturated than this; brighter "glass" is tissue covering the whole slide.
MAX_GLASS_SATURATION = 30.0
# The view's HSV and filtered copies are made this many rows at a time.
STRIP_ROWS = 512


# --- the view ---------------------------------------------------------------------------------


def view_downsample(width: int, height: int, mpp: float, params: SegmentSettings) -> float:
    """Level-0 px per view px: `seg_mpp`, finer for small slides, coarser for huge ones."""
    longer = max(width, height)
    downsample = params.seg_mpp / mpp
    downsample = min(downsample, max(longer / params.min_view_px, params.min_seg_mpp / mpp))
    downsample = max(downsample, longer / params.max_view_px, 1.0)
    return float(downsample)


# --- the mask ---------------------------------------------------------------------------------


def _odd(px: float) -> int:
    return max(1, round(px)) | 1


def _disk(diameter_px: float) -> np.ndarray:
    d = _odd(diameter_px)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def view_channels(
    rgb: np.ndarray, view_mpp: float, params: SegmentSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(saturation, value, ink) of an RGB view as uint8 arrays: saturation and value
    median-filtered over `median_um`, ink a 0/1 mask (see ink_mask).

    Computed in strips of STRIP_ROWS rows, each read with enough rows around it for the median
    filters, so the result is exactly that of the whole view at once while the HSV and
    filtered copies never exceed a strip."""
    height = rgb.shape[0]
    k = min(_odd(params.median_um / view_mpp), 255)
    pad = k // 2 + 1  # >= the radius of both median filters (k and 3)
    sat = np.empty(rgb.shape[:2], np.uint8)
    value = np.empty(rgb.shape[:2], np.uint8)
    ink = np.zeros(rgb.shape[:2], np.uint8)
    for y0 in range(0, height, STRIP_ROWS):
        y1 = min(height, y0 + STRIP_ROWS)
        a, b = max(0, y0 - pad), min(height, y1 + pad)
        inner = slice(y0 - a, y1 - a)
        hsv = cv2.cvtColor(rgb[a:b], cv2.COLOR_RGB2HSV)
        for channel, out in ((1, sat), (2, value)):
            filtered = cv2.medianBlur(hsv[..., channel], k) if k > 1 else hsv[..., channel]
            out[y0:y1] = filtered[inner]
        del hsv
        if params.exclude_pen or params.exclude_dark:
            ink[y0:y1] = _ink_pixels(rgb[a:b], params)[inner]
    if params.ink_margin_um > 0 and ink.any():
        ink = cv2.dilate(ink, _disk(2 * params.ink_margin_um / view_mpp))
    return sat, value, ink


def _ink_pixels(rgb: np.ndarray, params: SegmentSettings) -> np.ndarray:
    """uint8 0/1 mask of ink and black pixels (before growing by the margin).

    H&E absorbs green at least as strongly as red (both stains do), so tissue never shows more
    green than red; blue and green inks do. Black ink and scanner borders are simply dark: no
    stained tissue is that dark at a few µm/px.
    """
    smooth = cv2.medianBlur(rgb, 3)
    ink = np.zeros(rgb.shape[:2], np.uint8)
    if params.exclude_pen:
        # Saturating G - R (0 where red wins): the same test as a signed difference, since
        # pen_green_over_red >= 0, without int16 copies.
        green_minus_red = cv2.subtract(smooth[..., 1], smooth[..., 0])
        ink |= green_minus_red > params.pen_green_over_red
    if params.exclude_dark:
        value = cv2.max(cv2.max(smooth[..., 0], smooth[..., 1]), smooth[..., 2])
        ink |= value < params.dark_max_value
    return ink


def saturation_threshold(
    sat: np.ndarray, value: np.ndarray, ink: np.ndarray, params: SegmentSettings
) -> int:
    """Otsu on the saturation outside ink (ink would pull it up), at least `min_saturation`
    above the glass, whose saturation is read off the brightest pixels: on a slide without
    tissue, Otsu would otherwise split the background's noise in two."""
    if params.threshold != "otsu":
        return int(params.threshold)
    if ink.any():
        clean = ink == 0
        values, bright = sat[clean], value[clean]
        del clean
    else:
        values, bright = sat.ravel(), value.ravel()
    if values.size == 0:
        return 255
    thr, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    glass = values[bright >= np.percentile(bright, 99)]
    floor = min(float(np.median(glass)), MAX_GLASS_SATURATION) + params.min_saturation
    return int(max(thr, floor))


def mask_from_channels(
    sat: np.ndarray, value: np.ndarray, ink: np.ndarray, view_mpp: float, params: SegmentSettings
) -> np.ndarray:
    """uint8 0/1 tissue mask from view_channels' output: threshold, closing, ink removed."""
    threshold = saturation_threshold(sat, value, ink, params)
    mask = np.greater(sat, threshold).view(np.uint8)  # bool is 0/1 bytes: no copy
    if params.close_um > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(params.close_um / view_mpp))
    # Ink goes after closing, so closing cannot bridge a stroke drawn across tissue.
    cv2.subtract(mask, ink, dst=mask)
    return mask


def mask_to_polygons(
    mask: np.ndarray, view_mpp: float, downsample: float, params: SegmentSettings
) -> list[Polygon]:
    """Tissue pieces with their holes as GeoJSON polygons in level-0 px; small pieces dropped,
    small holes filled, at most `max_holes_per_piece` (the largest) kept per piece."""
    factor = max(1, min(CONTOUR_SUPERSAMPLE, CONTOUR_MAX_SIDE // max(mask.shape)))
    fine = mask
    if factor > 1:
        h, w = mask.shape
        fine = cv2.resize(mask * 255, (w * factor, h * factor), interpolation=cv2.INTER_LINEAR)
        fine = (fine >= 128).astype(np.uint8)
    contours, hierarchy = cv2.findContours(fine, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    px_area_um2 = (view_mpp / factor) ** 2
    scale = downsample / factor  # level-0 px per fine px
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1:  # a hole: handled with its parent
            continue
        holes = []
        child = hierarchy[0][i][2]
        while child != -1:
            area = cv2.contourArea(contours[child]) * px_area_um2
            if area >= params.min_hole_area_um2:
                holes.append((area, child))
            child = hierarchy[0][child][0]
        holes.sort(key=lambda t: (-t[0], t[1]))
        holes = holes[: params.max_holes_per_piece]
        area = cv2.contourArea(contour) * px_area_um2 - sum(a for a, _ in holes)
        if area < params.min_tissue_area_um2:
            continue
        rings = [contour_ring(contour, scale, outer=True)]
        for _, j in sorted(holes, key=lambda t: t[1]):  # holes in contour order
            rings.append(contour_ring(contours[j], scale, outer=False))
        polygons.append({"type": "Polygon", "coordinates": [r for r in rings if r]})
    return polygons


# --- the stage --------------------------------------------------------------------------------


def segment_slide(
    slide_path: str | os.PathLike,
    out_geojson: str | os.PathLike,
    out_qc_png: str | os.PathLike,
    params: SegmentSettings | None = None,
    annotation: str | os.PathLike | None = None,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Segment one slide; write tissue polygons (GeoJSON, level-0 px) and a QC overlay PNG."""
    params = params or SegmentSettings()
    with open_slide(slide_path) as slide:
        info = slide_info(slide, slide_path, mpp_override, mpp_fallback)
        downsample = view_downsample(info.width, info.height, info.mpp, params)
        rgb = thumbnail(slide, downsample)
    downsample = info.width / rgb.shape[1]  # the exact scale after rounding the view size
    view_mpp = info.mpp * downsample
    qc_rgb, qc_downsample = qc.qc_scale(rgb, downsample)
    sat, value, ink = view_channels(rgb, view_mpp, params)
    small_view = qc_rgb is rgb
    del rgb  # the largest array: free it before the mask's temporaries (QC keeps a copy)
    mask = mask_from_channels(sat, value, ink, view_mpp, params)
    del sat, value
    polygons = mask_to_polygons(mask, view_mpp, downsample, params)
    del mask
    tissue_area_um2 = sum(polygon_area(p) for p in polygons) * info.mpp**2
    if not polygons:
        log.warning("%s: no tissue found; the slide will have no patches", slide_path)
    summary = {
        "slide": str(slide_path),
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "seg_downsample": round(downsample, 6),
        "seg_view_mpp": round(view_mpp, 6),
        "qc_downsample": round(qc_downsample, 6),
        "n_pieces": len(polygons),
        "n_holes": sum(len(p["coordinates"]) - 1 for p in polygons),
        "tissue_area_mm2": round(tissue_area_um2 / 1e6, 4),
        "excluded_ink_fraction": round(float(ink.mean()), 4),
        "params": params.model_dump(),
        "srmil_version": __version__,
    }
    write_geojson_polygons(out_geojson, polygons, "Tissue", summary)
    tumour = read_geojson_polygons(annotation) if annotation else None
    if not small_view:
        ink = cv2.resize(ink, qc_rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    qc.write_png(out_qc_png, qc.draw_overlay(qc_rgb, qc_downsample, polygons, tumour, ink))
    return summary
