"""Tissue segmentation on a low-resolution view: saturation, Otsu, morphology -> polygons.

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
from srmil.slide import level_for_downsample, open_slide, slide_info, to_rgb

log = logging.getLogger(__name__)

# Never hold more than this many pixels of a level at once while building the thumbnail.
READ_CHUNK_PX = 4096


@dataclass
class SegmentParams:
    seg_mpp: float = 8.0  # µm/px of the view segmentation runs on
    median_blur: int = 7  # px at that view, odd
    threshold: str | int = "otsu"  # "otsu" or a fixed saturation threshold 0-255
    min_saturation: int = 8  # Otsu below this means an empty (white) slide, not faint tissue
    close_um: float = 32.0  # morphological closing diameter
    min_tissue_area_um2: float = 10_000.0
    min_hole_area_um2: float = 2_000.0


def thumbnail(slide, downsample: float) -> np.ndarray:
    """RGB view of the slide at `downsample` (level-0 px per output px), read in bounded chunks."""
    level = level_for_downsample(tuple(slide.level_downsamples), downsample)
    level_ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    scale = level_ds / downsample  # output px per level px, <= 1
    out_w, out_h = max(1, round(lw * scale)), max(1, round(lh * scale))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for y0 in range(0, lh, READ_CHUNK_PX):
        for x0 in range(0, lw, READ_CHUNK_PX):
            w, h = min(READ_CHUNK_PX, lw - x0), min(READ_CHUNK_PX, lh - y0)
            chunk = to_rgb(
                slide.read_region((round(x0 * level_ds), round(y0 * level_ds)), level, (w, h))
            )
            ox0, oy0 = round(x0 * scale), round(y0 * scale)
            ox1, oy1 = round((x0 + w) * scale), round((y0 + h) * scale)
            if ox1 > ox0 and oy1 > oy0:
                out[oy0:oy1, ox0:ox1] = cv2.resize(
                    chunk, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA
                )
    return out


def tissue_mask(rgb: np.ndarray, view_mpp: float, params: SegmentParams) -> np.ndarray:
    """Binary uint8 mask (0/1) of tissue on an RGB view whose pixels are `view_mpp` µm wide."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    k = params.median_blur | 1
    sat = cv2.medianBlur(sat, k) if k > 1 else sat
    if params.threshold == "otsu":
        thr, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thr = max(thr, params.min_saturation)
    else:
        thr = int(params.threshold)
    mask = (sat > thr).astype(np.uint8)
    d = max(1, round(params.close_um / view_mpp)) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d))
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)


def mask_to_polygons(
    mask: np.ndarray, view_mpp: float, downsample: float, params: SegmentParams
) -> list[dict[str, Any]]:
    """Tissue pieces with their holes as GeoJSON polygons in level-0 px, small ones dropped."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    px_area_um2 = view_mpp**2
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[0][i][3] != -1:  # a hole: handled with its parent
            continue
        if cv2.contourArea(contour) * px_area_um2 < params.min_tissue_area_um2:
            continue
        rings = [_ring(contour, downsample)]
        child = hierarchy[0][i][2]
        while child != -1:
            if cv2.contourArea(contours[child]) * px_area_um2 >= params.min_hole_area_um2:
                rings.append(_ring(contours[child], downsample))
            child = hierarchy[0][child][0]
        polygons.append({"type": "Polygon", "coordinates": rings})
    return polygons


def _ring(contour: np.ndarray, downsample: float) -> list[list[float]]:
    pts = (contour.reshape(-1, 2).astype(np.float64) + 0.5) * downsample
    pts = np.round(pts, 1).tolist()
    return pts + [pts[0]]  # GeoJSON rings are closed


def polygons_mask(
    polygons: list[dict[str, Any]], shape: tuple[int, int], downsample: float
) -> np.ndarray:
    """Rasterise level-0 polygons (with holes) to a uint8 0/1 mask of `shape` at `downsample`."""
    mask = np.zeros(shape, np.uint8)
    for poly in polygons:
        rings = [
            np.round(np.asarray(r) / downsample - 0.5).astype(np.int32) for r in poly["coordinates"]
        ]
        cv2.fillPoly(mask, rings[:1], 1)
        if len(rings) > 1:
            cv2.fillPoly(mask, rings[1:], 0)
    return mask


def read_geojson_polygons(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All Polygon / MultiPolygon geometries of a GeoJSON file, as Polygon dicts."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    features = data.get("features", [data]) if isinstance(data, dict) else data
    polygons = []
    for feature in features:
        geom = feature.get("geometry", feature)
        if geom.get("type") == "Polygon":
            polygons.append(geom)
        elif geom.get("type") == "MultiPolygon":
            polygons.extend({"type": "Polygon", "coordinates": c} for c in geom["coordinates"])
    return polygons


def draw_overlay(
    rgb: np.ndarray,
    downsample: float,
    tissue: list[dict[str, Any]],
    annotation: list[dict[str, Any]] | None = None,
) -> np.ndarray:
    """Thumbnail with tissue outlines (green), holes (blue) and tumour annotation (red)."""
    out = rgb.copy()
    thick = max(1, round(max(out.shape[:2]) / 400))
    for poly in tissue:
        rings = [
            np.round(np.asarray(r) / downsample - 0.5).astype(np.int32) for r in poly["coordinates"]
        ]
        cv2.polylines(out, rings[:1], True, (0, 160, 0), thick)
        cv2.polylines(out, rings[1:], True, (0, 80, 255), thick)
    for poly in annotation or []:
        rings = [
            np.round(np.asarray(r) / downsample - 0.5).astype(np.int32) for r in poly["coordinates"]
        ]
        cv2.polylines(out, rings, True, (220, 0, 0), thick)
    return out


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    with store.atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


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
        downsample = max(1.0, params.seg_mpp / info.mpp)
        rgb = thumbnail(slide, downsample)
    view_mpp = info.mpp * downsample
    polygons = mask_to_polygons(tissue_mask(rgb, view_mpp, params), view_mpp, downsample, params)
    tissue_area_mm2 = float(
        polygons_mask(polygons, rgb.shape[:2], downsample).sum() * view_mpp**2 / 1e6
    )
    if not polygons:
        log.warning("%s: no tissue found; the slide will have no patches", slide_path)
    summary = {
        "slide": str(slide_path),
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "seg_downsample": downsample,
        "n_pieces": len(polygons),
        "n_holes": sum(len(p["coordinates"]) - 1 for p in polygons),
        "tissue_area_mm2": round(tissue_area_mm2, 4),
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
    store.write_json(
        out_geojson, {"type": "FeatureCollection", "features": features, "properties": summary}
    )
    tumour = read_geojson_polygons(annotation) if annotation else None
    write_png(out_qc_png, draw_overlay(rgb, downsample, polygons, tumour))
    return summary
