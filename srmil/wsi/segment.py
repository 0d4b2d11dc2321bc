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
from collections.abc import Callable
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(saturation, value, ink, stained) of an RGB view as uint8 arrays: saturation and value
    median-filtered over `median_um`, ink a 0/1 mask (_ink_pixels, grow_ink), stained a 0/1
    mask of px that look like H&E (_stained_pixels).

    Computed in strips of STRIP_ROWS rows, each read with enough rows around it for the median
    filters, so the result is exactly that of the whole view at once while the HSV and
    filtered copies never exceed a strip."""
    height = rgb.shape[0]
    k = min(_odd(params.median_um / view_mpp), 255)
    pad = k // 2 + 1  # >= the radius of both median filters (k and 3)
    sat = np.empty(rgb.shape[:2], np.uint8)
    value = np.empty(rgb.shape[:2], np.uint8)
    ink = np.zeros(rgb.shape[:2], np.uint8)
    stained = np.zeros(rgb.shape[:2], np.uint8)
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
            smooth = cv2.medianBlur(rgb[a:b], 3)
            ink[y0:y1] = _ink_pixels(smooth, params)[inner]
            stained[y0:y1] = _stained_pixels(smooth, params)[inner]
            del smooth
    if ink.any():
        ink = grow_ink(ink, view_mpp, params)
    return sat, value, ink, stained


def grow_ink(ink: np.ndarray, view_mpp: float, params: SegmentSettings) -> np.ndarray:
    """Ink grown by one view px, plus `ink_margin_um`.

    The one px is the stroke's edge: a view px the stroke only partly covers mixes ink with
    tissue and fails the colour tests, but always touches a px it covers (nearly) whole. A
    cross, not a square, so a slanted edge is not grown by sqrt(2) px."""
    radius_px = 1 + round(params.ink_margin_um / view_mpp)
    return cv2.dilate(ink, _disk(2 * radius_px + 1))


def _ink_pixels(smooth: np.ndarray, params: SegmentSettings) -> np.ndarray:
    """uint8 0/1 mask of ink and black pixels (before grow_ink) of a view median-filtered 3 x 3.

    H&E absorbs green at least as strongly as red (both stains do), so tissue never shows more
    green than red; blue and green inks do. Black ink and scanner borders are simply dark: no
    stained tissue is that dark at a few µm/px.
    """
    ink = np.zeros(smooth.shape[:2], np.uint8)
    if params.exclude_pen:
        # Saturating G - R (0 where red wins): the same test as a signed difference, since
        # pen_green_over_red >= 0, without int16 copies.
        green_minus_red = cv2.subtract(smooth[..., 1], smooth[..., 0])
        ink |= green_minus_red > params.pen_green_over_red
    if params.exclude_dark:
        value = cv2.max(cv2.max(smooth[..., 0], smooth[..., 1]), smooth[..., 2])
        ink |= value < params.dark_max_value
    return ink


def _stained_pixels(smooth: np.ndarray, params: SegmentSettings) -> np.ndarray:
    """uint8 0/1 mask of px that look like H&E: red over green by more than ink is green over
    red (`pen_green_over_red`). Glass (grey) and ink (green over red, if too dark or faint for
    the ink test) do not."""
    return (cv2.subtract(smooth[..., 0], smooth[..., 1]) > params.pen_green_over_red).view(np.uint8)


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
    mask: np.ndarray,
    view_mpp: float,
    downsample: float,
    params: SegmentSettings,
    ink: np.ndarray | None = None,
    stained: np.ndarray | None = None,
) -> list[Polygon]:
    """Tissue pieces with their holes as GeoJSON polygons in level-0 px; small holes filled, at
    most `max_holes_per_piece` (the largest) kept per piece; pieces under `min_tissue_area_um2`
    dropped, unless ink cut them from enough tissue (`ink`, `stained`: cut_piece_areas)."""
    factor = max(1, min(CONTOUR_SUPERSAMPLE, CONTOUR_MAX_SIDE // max(mask.shape)))
    fine = mask
    if factor > 1:
        h, w = mask.shape
        fine = cv2.resize(mask * 255, (w * factor, h * factor), interpolation=cv2.INTER_LINEAR)
        fine = (fine >= 128).astype(np.uint8)
    contours, hierarchy = cv2.findContours(fine, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    del fine
    if hierarchy is None:
        return []
    px_area_um2 = (view_mpp / factor) ** 2
    outers = [i for i in range(len(contours)) if hierarchy[0][i][3] == -1]  # holes: by parent
    holes = [_kept_holes(contours, hierarchy[0], i, px_area_um2, params) for i in outers]
    areas = np.array(
        [
            cv2.contourArea(contours[i]) * px_area_um2 - sum(a for a, _ in kept)
            for i, kept in zip(outers, holes, strict=True)
        ]
    )
    if ink is not None and stained is not None and (areas < params.min_tissue_area_um2).any():
        pieces = [contours[i] for i in outers]
        areas = cut_piece_areas(mask, ink, stained, pieces, factor, areas, params)
    scale = downsample / factor  # level-0 px per fine px
    polygons = []
    for i, kept, area in zip(outers, holes, areas, strict=True):
        if area < params.min_tissue_area_um2:
            continue
        rings = [contour_ring(contours[i], scale, outer=True)]
        for _, j in sorted(kept, key=lambda t: t[1]):  # holes in contour order
            rings.append(contour_ring(contours[j], scale, outer=False))
        polygons.append({"type": "Polygon", "coordinates": [r for r in rings if r]})
    return polygons


def _kept_holes(
    contours: tuple,
    hierarchy: np.ndarray,
    parent: int,
    px_area_um2: float,
    params: SegmentSettings,
) -> list[tuple[float, int]]:
    """(area µm², contour index) of the holes of one piece that are kept: the largest
    `max_holes_per_piece` of those of at least `min_hole_area_um2`."""
    holes = []
    child = hierarchy[parent][2]
    while child != -1:
        area = cv2.contourArea(contours[child]) * px_area_um2
        if area >= params.min_hole_area_um2:
            holes.append((area, child))
        child = hierarchy[child][0]
    holes.sort(key=lambda t: (-t[0], t[1]))
    return holes[: params.max_holes_per_piece]


def cut_piece_areas(
    mask: np.ndarray,
    ink: np.ndarray,
    stained: np.ndarray,
    pieces: list[np.ndarray],
    factor: int,
    areas: np.ndarray,
    params: SegmentSettings,
) -> np.ndarray:
    """The area each piece is judged by: its own, or, for a small piece that ink cut from
    others, the area of all the pieces of its connected component of tissue-or-ink
    (8-connected view px): the tissue it belonged to before the cut.

    Only if the small piece looks like tissue (most of its px `stained`): bits of glass next to
    ink (the median filter spreads ink's saturation into concave corners) and ink too dark or
    faint for the colour tests (where strokes overlap) are cut off by ink too, but are not.
    `pieces`: their outer contours on the mask `factor` times finer than the view."""
    if not ink.any():
        return areas
    n, labels = cv2.connectedComponents(mask | ink, connectivity=8)
    inside = np.array([contour[0, 0] for contour in pieces])  # one px of each, fine (x, y)
    label = _view_labels(labels, mask, inside, factor)
    inked = _labels_meeting(labels, n, lambda rows: ink[rows] > 0)[label]
    del labels
    before = np.bincount(label, weights=areas, minlength=n)[label]
    small = areas < params.min_tissue_area_um2
    rescue = small & inked & (before >= params.min_tissue_area_um2)
    for k in np.nonzero(rescue)[0]:
        rescue[k] = _stained_share(pieces[k], stained, factor) >= 0.5
    return np.where(rescue, before, areas)


def _stained_share(contour: np.ndarray, stained: np.ndarray, factor: int) -> float:
    """The share of a piece's px (its outer contour, `factor` times finer than the view) whose
    view px are stained."""
    x, y, w, h = cv2.boundingRect(contour)
    piece = np.zeros((h, w), np.uint8)
    cv2.drawContours(piece, [contour - (x, y)], -1, 1, -1)
    fy, fx = np.nonzero(piece)
    vx = np.minimum((fx + x) // factor, stained.shape[1] - 1)  # the view px holding each
    vy = np.minimum((fy + y) // factor, stained.shape[0] - 1)
    return float(stained[vy, vx].mean()) if fx.size else 0.0


def _labels_meeting(labels: np.ndarray, n: int, where: Callable[[slice], np.ndarray]) -> np.ndarray:
    """bool per label: whether any of its px is where `where(rows)` (bool, those rows) holds;
    a strip of rows at a time, so no view-sized copy of the labels is made."""
    hit = np.zeros(n, bool)
    for y0 in range(0, labels.shape[0], STRIP_ROWS):
        rows = slice(y0, y0 + STRIP_ROWS)
        hit[labels[rows][where(rows)]] = True
    return hit


def _view_labels(
    labels: np.ndarray, mask: np.ndarray, points_fine: np.ndarray, factor: int
) -> np.ndarray:
    """The component label of view px under fine px (x, y). A fine px is tissue when the
    bilinear mix of its 2 x 2 view px is, so one of them is tissue; being 8-neighbours, the
    tissue ones share a label."""
    h, w = mask.shape
    centre = (points_fine + 0.5) / factor - 0.5  # cv2.resize's mapping, fine -> view
    x0 = np.clip(np.floor(centre[:, 0]).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(centre[:, 1]).astype(int), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ys, xs = np.stack([y0, y0, y1, y1]), np.stack([x0, x1, x0, x1])
    return np.where(mask[ys, xs] > 0, labels[ys, xs], 0).max(axis=0)


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
    sat, value, ink, stained = view_channels(rgb, view_mpp, params)
    small_view = qc_rgb is rgb
    del rgb  # the largest array: free it before the mask's temporaries (QC keeps a copy)
    mask = mask_from_channels(sat, value, ink, view_mpp, params)
    del sat, value
    polygons = mask_to_polygons(mask, view_mpp, downsample, params, ink, stained)
    del mask, stained
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
