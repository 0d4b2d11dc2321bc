"""Tissue segmentation on a low-resolution view: saturation, threshold, morphology -> polygons.

The view is chosen by resolution (`seg_mpp`, refined for small slides, capped for huge ones) and
read in bounded chunks and processed in strips, so memory is bounded by the view cap
(`max_view_px`), not by the slide (docs/segmentation.md, Memory). Pen ink (blue, green) and black
areas (black ink, scanner borders) are found by colour and removed before thresholding, so they
neither become tissue nor pull the Otsu threshold. Every size is given in µm or µm², so a
setting means the same thing at every resolution.

Polygons are written as GeoJSON in level-0 pixels (QuPath opens them), with a QC overlay.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from srmil import __version__, store
from srmil.errors import (
    Allowed,
    InputError,
    SettingValueError,
    check_settings,
    settings_from_dict,
)
from srmil.wsi.slide import level_for_downsample, open_slide, read_region, slide_info, to_rgb

log = logging.getLogger(__name__)

# Never hold more than this many pixels per side of a level at once while building the view.
READ_CHUNK_PX = 2048
# Contours are traced on the final mask upsampled by up to this factor (bilinear, then 0.5),
# so outlines follow pixel edges to a fraction of a view pixel instead of pixel centres.
CONTOUR_SUPERSAMPLE = 4
CONTOUR_MAX_SIDE = 8192
# Polygons are rasterised this many times finer, then averaged (see polygons_mask).
RASTER_SUPERSAMPLE = 4
RASTER_MAX_SIDE = 16384
# Glass is never more saturated than this; brighter "glass" is tissue covering the whole slide.
MAX_GLASS_SATURATION = 30.0
# The view's HSV and filtered copies are made this many rows at a time.
STRIP_ROWS = 512
# QC images are at most this many px on the longer side.
QC_MAX_SIDE = 2048


class SegmentParamsError(InputError):
    """A segmentation setting that cannot be used (config.yaml or a sample-sheet column)."""


class SegmentValueError(SettingValueError, SegmentParamsError):
    """A segmentation setting outside its allowed values."""


@dataclass
class SegmentParams:
    seg_mpp: float = 8.0  # µm/px of the view segmentation runs on (the coarsest it will use)
    min_view_px: int = 1024  # small slides: a finer view so its longer side has this many px,
    min_seg_mpp: float = 2.0  # but never finer than this (cells, not tissue, at finer views)
    max_view_px: int = 8192  # huge slides: a coarser view so its longer side stays within this
    median_um: float = 32.0  # median filter width on the saturation (nuclei, JPEG noise)
    threshold: str | int = "otsu"  # "otsu" or a fixed saturation threshold 0-255
    min_saturation: int = 8  # Otsu closer than this to the glass's saturation: an empty slide
    close_um: float = 16.0  # morphological closing diameter (joins tissue torn by white gaps)
    min_tissue_area_um2: float = 5_000.0  # smaller pieces are dropped
    min_hole_area_um2: float = 2_000.0  # smaller holes are filled
    max_holes_per_piece: int = 64  # the largest holes of a piece are kept
    exclude_pen: bool = True  # blue/green ink: more green than red, which H&E never has
    pen_green_over_red: int = 10  # G - R above this (0-255) marks ink
    exclude_dark: bool = True  # black ink and black scanner borders
    dark_max_value: int = 60  # max(R, G, B) below this marks a black area
    ink_margin_um: float = 4.0  # grow ink/black areas by this much (their soft edges)

    def __post_init__(self) -> None:
        check_settings(self, SEGMENT_ALLOWED, "segment", SegmentValueError)


# What each setting may be: the same ranges as workflow/schemas/config.schema.yaml, checked here
# too because sample-sheet columns and `srmil segment --params` do not pass that schema.
BYTE = Allowed(int, 0, 255)
SEGMENT_ALLOWED = {
    "seg_mpp": Allowed(float, 0, low_open=True),
    "min_view_px": Allowed(int, 1),
    "min_seg_mpp": Allowed(float, 0, low_open=True),
    "max_view_px": Allowed(int, 64),
    "median_um": Allowed(float, 0),
    "threshold": Allowed(int, 0, 255, words=("otsu",)),
    "min_saturation": BYTE,
    "close_um": Allowed(float, 0),
    "min_tissue_area_um2": Allowed(float, 0),
    "min_hole_area_um2": Allowed(float, 0),
    "max_holes_per_piece": Allowed(int, 0),
    "exclude_pen": Allowed(bool),
    "pen_green_over_red": BYTE,
    "exclude_dark": Allowed(bool),
    "dark_max_value": BYTE,
    "ink_margin_um": Allowed(float, 0),
}


def params_from_dict(values: dict[str, Any], source: str = "config.yaml segment") -> SegmentParams:
    """SegmentParams from a dict, refusing unknown keys and values outside their range with a
    one-line error that names `source`, the setting, the value and what is allowed."""
    return settings_from_dict(SegmentParams, values, source, "segmentation", SegmentParamsError)


def parse_override(name: str, text: str) -> Any:
    """A per-slide setting from a sample-sheet cell, typed like the SegmentParams field.

    KeyError for an unknown setting; SegmentValueError (naming what is allowed) for a value
    that does not parse or lies outside the setting's range."""
    allowed = SEGMENT_ALLOWED[name]
    try:
        value = _parse_cell(text.strip(), allowed)
    except ValueError:
        raise SegmentValueError("segment", name, text, allowed) from None
    if not allowed.fits(value):
        raise SegmentValueError("segment", name, text, allowed)
    return value


def _parse_cell(text: str, allowed: Allowed) -> Any:
    if text.lower() in allowed.words:
        return text.lower()
    if allowed.kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ValueError(text)
    return allowed.kind(text)


# --- the view ---------------------------------------------------------------------------------


def view_downsample(width: int, height: int, mpp: float, params: SegmentParams) -> float:
    """Level-0 px per view px: `seg_mpp`, finer for small slides, coarser for huge ones."""
    longer = max(width, height)
    downsample = params.seg_mpp / mpp
    downsample = min(downsample, max(longer / params.min_view_px, params.min_seg_mpp / mpp))
    downsample = max(downsample, longer / params.max_view_px, 1.0)
    return float(downsample)


def thumbnail(slide, downsample: float) -> np.ndarray:
    """RGB view of the slide at `downsample` (level-0 px per output px), read in bounded chunks
    from the coarsest level that is not coarser than the view (never upsampled)."""
    level = level_for_downsample(tuple(slide.level_downsamples), downsample)
    level_ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    sx, sy = out_w / lw, out_h / lh  # output px per level px, <= 1
    out = np.empty((out_h, out_w, 3), np.uint8)
    for y0 in range(0, lh, READ_CHUNK_PX):
        for x0 in range(0, lw, READ_CHUNK_PX):
            w, h = min(READ_CHUNK_PX, lw - x0), min(READ_CHUNK_PX, lh - y0)
            ox0, oy0 = round(x0 * sx), round(y0 * sy)
            ox1, oy1 = round((x0 + w) * sx), round((y0 + h) * sy)
            if ox1 <= ox0 or oy1 <= oy0:
                continue
            chunk = to_rgb(
                read_region(slide, (round(x0 * level_ds), round(y0 * level_ds)), level, (w, h))
            )
            if chunk.shape[:2] != (oy1 - oy0, ox1 - ox0):
                chunk = cv2.resize(chunk, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
            out[oy0:oy1, ox0:ox1] = chunk
    return out


# --- the mask ---------------------------------------------------------------------------------


def _odd(px: float) -> int:
    return max(1, round(px)) | 1


def _disk(diameter_px: float) -> np.ndarray:
    d = _odd(diameter_px)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))


def view_channels(
    rgb: np.ndarray, view_mpp: float, params: SegmentParams
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


def _ink_pixels(rgb: np.ndarray, params: SegmentParams) -> np.ndarray:
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
    sat: np.ndarray, value: np.ndarray, ink: np.ndarray, params: SegmentParams
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
    sat: np.ndarray, value: np.ndarray, ink: np.ndarray, view_mpp: float, params: SegmentParams
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
    mask: np.ndarray, view_mpp: float, downsample: float, params: SegmentParams
) -> list[dict[str, Any]]:
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
        rings = [_ring(contour, scale, outer=True)]
        for _, j in sorted(holes, key=lambda t: t[1]):  # holes in contour order
            rings.append(_ring(contours[j], scale, outer=False))
        polygons.append({"type": "Polygon", "coordinates": [r for r in rings if r]})
    return polygons


def _ring(contour: np.ndarray, scale: float, outer: bool) -> list[list[float]]:
    """A closed ring in level-0 px (contour points are pixel centres), wound as RFC 7946 asks:
    exteriors counter-clockwise, holes clockwise (in x/y as written)."""
    pts = cv2.approxPolyDP(contour, 0.7, True).reshape(-1, 2)
    if len(pts) < 3:
        pts = contour.reshape(-1, 2)
    xy = (pts.astype(np.float64) + 0.5) * scale
    area2 = float(np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1]))
    if (area2 > 0) != outer:
        xy = xy[::-1]
    ring = np.round(xy, 1).tolist()
    return ring + [ring[0]]


# --- polygons in and out ----------------------------------------------------------------------


def polygons_mask(
    polygons: list[dict[str, Any]],
    shape: tuple[int, int],
    downsample: float,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Rasterise level-0 polygons (with holes) to a uint8 0/1 mask of `shape` at `downsample`;
    vertices keep 1/16 px precision.

    With `window` (y0, y1, x0, x1 in mask px), only that part of the mask is made: the same
    pixels as the whole mask's when no polygon crosses the window's edges inside the mask
    (e.g. polygons_window), in the window's memory."""
    # fillPoly also sets every pixel an edge touches (about half a pixel too much all round):
    # draw `factor` times finer and keep the pixels that are at least half covered.
    factor = max(1, min(RASTER_SUPERSAMPLE, RASTER_MAX_SIDE // max(1, *shape)))
    y0, y1, x0, x1 = window or (0, shape[0], 0, shape[1])
    if y1 <= y0 or x1 <= x0:
        return np.zeros((max(0, y1 - y0), max(0, x1 - x0)), np.uint8)
    fine = np.zeros(((y1 - y0) * factor, (x1 - x0) * factor), np.uint8)
    # A whole number of fine px in 1/16 px units: the same raster, shifted.
    shift = np.array([x0, y0], np.int32) * factor * 16
    for poly in polygons:
        rings = [r - shift for r in _pixel_rings(poly, downsample / factor)]
        cv2.fillPoly(fine, rings[:1], 1, cv2.LINE_8, 4)
        if len(rings) > 1:
            cv2.fillPoly(fine, rings[1:], 0, cv2.LINE_8, 4)
    if factor == 1:
        return fine
    fine *= 255
    coarse = cv2.resize(fine, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    del fine
    return np.greater_equal(coarse, 128).view(np.uint8)


def polygons_window(
    polygons: list[dict[str, Any]], shape: tuple[int, int], downsample: float
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the part of a `shape` mask at `downsample` that polygons_mask can set,
    i.e. the polygons' bounding box with 2 px to spare (edge pixels), within the mask."""
    points = [np.asarray(p["coordinates"][0], np.float64).reshape(-1, 2) for p in polygons
              if p["coordinates"] and len(p["coordinates"][0])]
    if not points:
        return (0, 0, 0, 0)
    xy = np.concatenate(points) / downsample
    (x0, y0), (x1, y1) = np.floor(xy.min(0)) - 2, np.ceil(xy.max(0)) + 2
    ys = np.clip([y0, y1], 0, shape[0]).astype(int)
    xs = np.clip([x0, x1], 0, shape[1]).astype(int)
    return int(ys[0]), int(ys[1]), int(xs[0]), int(xs[1])


def read_geojson_polygons(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All Polygon / MultiPolygon geometries of a GeoJSON file, as Polygon dicts."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    features = data.get("features", [data]) if isinstance(data, dict) else data
    polygons = []
    for feature in features:
        geom = feature.get("geometry", feature) or {}
        if geom.get("type") == "Polygon":
            polygons.append(geom)
        elif geom.get("type") == "MultiPolygon":
            polygons.extend({"type": "Polygon", "coordinates": c} for c in geom["coordinates"])
    return polygons


# --- QC ---------------------------------------------------------------------------------------


def _pixel_rings(poly: dict[str, Any], downsample: float) -> list[np.ndarray]:
    return [
        np.round((np.asarray(r, np.float64) / downsample - 0.5) * 16).astype(np.int32)
        for r in poly["coordinates"]
    ]


def draw_overlay(
    rgb: np.ndarray,
    downsample: float,
    tissue: list[dict[str, Any]],
    annotation: list[dict[str, Any]] | None = None,
    excluded: np.ndarray | None = None,
) -> np.ndarray:
    """Thumbnail with tissue outlines (green), holes (blue), excluded ink and black areas
    (orange) and the tumour annotation (red)."""
    out = rgb.copy()
    thick = max(1, round(max(out.shape[:2]) / 500))
    if excluded is not None and excluded.any():
        edges = cv2.morphologyEx(excluded, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        out[edges > 0] = (255, 140, 0)
    for poly in tissue:
        rings = _pixel_rings(poly, downsample)
        cv2.polylines(out, rings[:1], True, (0, 160, 0), thick, cv2.LINE_AA, 4)
        cv2.polylines(out, rings[1:], True, (0, 80, 255), thick, cv2.LINE_AA, 4)
    for poly in annotation or []:
        cv2.polylines(out, _pixel_rings(poly, downsample), True, (220, 0, 0), thick, cv2.LINE_AA, 4)
    return out


def qc_scale(rgb: np.ndarray, downsample: float) -> tuple[np.ndarray, float]:
    """The view shrunk to at most QC_MAX_SIDE px, with its downsample."""
    longer = max(rgb.shape[:2])
    if longer <= QC_MAX_SIDE:
        return rgb, downsample
    f = QC_MAX_SIDE / longer
    size = (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return small, downsample * rgb.shape[1] / size[0]


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 2])
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    with store.atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def read_png(path: str | os.PathLike) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"{path}: not a readable PNG; rerun the segment step for this slide")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --- the stage --------------------------------------------------------------------------------


def segment_slide(
    slide_path: str | os.PathLike,
    out_geojson: str | os.PathLike,
    out_qc_png: str | os.PathLike,
    params: SegmentParams | None = None,
    annotation: str | os.PathLike | None = None,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Segment one slide; write tissue polygons (GeoJSON, level-0 px) and a QC overlay PNG."""
    params = params or SegmentParams()
    with open_slide(slide_path) as slide:
        info = slide_info(slide, slide_path, mpp_override, mpp_fallback)
        downsample = view_downsample(info.width, info.height, info.mpp, params)
        rgb = thumbnail(slide, downsample)
    downsample = info.width / rgb.shape[1]  # the exact scale after rounding the view size
    view_mpp = info.mpp * downsample
    qc_rgb, qc_downsample = qc_scale(rgb, downsample)
    sat, value, ink = view_channels(rgb, view_mpp, params)
    small_view = qc_rgb is rgb
    del rgb  # the largest array: free it before the mask's temporaries (QC keeps a copy)
    mask = mask_from_channels(sat, value, ink, view_mpp, params)
    del sat, value
    polygons = mask_to_polygons(mask, view_mpp, downsample, params)
    del mask
    tissue_area_um2 = sum(_polygon_area(p) for p in polygons) * info.mpp**2
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
        "params": asdict(params),
        "srmil_version": __version__,
    }
    features = [
        {
            "type": "Feature",
            "geometry": poly,
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}},
        }
        for poly in polygons
    ]
    # Compact JSON: outlines have many vertices, and QuPath does not need indentation.
    collection = {"type": "FeatureCollection", "features": features, "properties": summary}
    text = json.dumps(collection, sort_keys=True, separators=(",", ":"))
    store.write_text(out_geojson, text + "\n")
    tumour = read_geojson_polygons(annotation) if annotation else None
    if not small_view:
        ink = cv2.resize(ink, qc_rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    write_png(out_qc_png, draw_overlay(qc_rgb, qc_downsample, polygons, tumour, ink))
    return summary


def _polygon_area(poly: dict[str, Any]) -> float:
    """Area in level-0 px² (exterior minus holes, shoelace)."""
    total = 0.0
    for i, ring in enumerate(poly["coordinates"]):
        xy = np.asarray(ring, np.float64)
        a = 0.5 * abs(float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1])))
        total += a if i == 0 else -a
    return total
