"""Patch grid at a target µm/px, aligned globally to multiples of the stride, filtered by tissue.

Only coordinates and a read plan are written; patches are read from the slide when features are
extracted. Global alignment (origin 0,0 for every tissue piece) keeps lattice neighbours at grid
distance 1, which the spatial graph relies on. The read plan picks the coarsest pyramid level
that is still at least as fine as the target, so a patch is only ever downsampled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from srmil import __version__, store
from srmil.errors import InputError, settings_from_dict
from srmil.segment import polygons_mask, read_geojson_polygons
from srmil.slide import SlideError, SlideInfo, level_for_downsample, open_slide, slide_info

log = logging.getLogger(__name__)

# Tissue fraction is measured on a mask where one patch spans about this many pixels per side.
MASK_PX_PER_PATCH = 16
MAX_MASK_SIDE = 8192


class TileParamsError(InputError):
    """A tiling setting that cannot be used."""


@dataclass
class TileParams:
    target_mpp: float = 0.5
    patch_px: int = 224  # patch side at target_mpp
    stride_px: int | None = None  # default: patch_px - overlap_px
    overlap_px: int = 0  # used when stride_px is not given
    min_tissue_fraction: float = 0.5


def params_from_dict(values: dict[str, Any], source: str = "config.yaml tile") -> TileParams:
    """TileParams from a dict, refusing unknown keys with a one-line error naming them."""
    return settings_from_dict(TileParams, values, source, "tiling", TileParamsError)


def stride_of(params: TileParams) -> int:
    if params.stride_px is not None:
        return int(params.stride_px)
    stride = params.patch_px - params.overlap_px
    if stride < 1 or params.overlap_px < 0:
        raise TileParamsError(
            f"tile.overlap_px {params.overlap_px} must be >= 0 and smaller than tile.patch_px "
            f"{params.patch_px}; fix it in config.yaml"
        )
    return stride


def read_plan(info: SlideInfo, params: TileParams) -> dict[str, Any]:
    """How to read a patch: level, size at that level, and sizes in level-0 px."""
    scale = params.target_mpp / info.mpp  # level-0 px per target px
    if scale < 1 - 1e-3:
        raise SlideError(
            f"{info.path}: slide resolution {info.mpp:.4g} µm/px is coarser than the "
            f"target {params.target_mpp} µm/px; raise tile.target_mpp in config.yaml"
        )
    stride_px = stride_of(params)
    level = level_for_downsample(info.level_downsamples, scale)
    level_ds = info.level_downsamples[level]
    return {
        "target_mpp": params.target_mpp,
        "patch_px": params.patch_px,
        "stride_px": stride_px,
        "slide_mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "patch_level0": params.patch_px * scale,
        "stride_level0": stride_px * scale,
        "level": level,
        "level_downsample": level_ds,
        # >= patch_px: the level is never coarser than the target, so reads only shrink
        "read_px": max(params.patch_px, round(params.patch_px * scale / level_ds)),
        "slide_width": info.width,
        "slide_height": info.height,
        "min_tissue_fraction": params.min_tissue_fraction,
        "srmil_version": __version__,
    }


def grid_coords(plan: dict[str, Any]) -> np.ndarray:
    """Every grid origin (x, y) in level-0 px whose patch lies inside the slide, row-major."""
    stride, size = plan["stride_level0"], plan["patch_level0"]
    nx = int(np.floor((plan["slide_width"] - size) / stride)) + 1
    ny = int(np.floor((plan["slide_height"] - size) / stride)) + 1
    if nx <= 0 or ny <= 0:
        return np.zeros((0, 2), np.int64)
    ix, iy = np.meshgrid(np.arange(nx), np.arange(ny))  # row-major: y then x
    coords = np.stack([np.rint(ix.ravel() * stride), np.rint(iy.ravel() * stride)], 1)
    coords = coords.astype(np.int64)
    # Rounding a fractional stride may push the last patch past the edge by a pixel.
    inside = (coords[:, 0] + size <= plan["slide_width"] + 1e-6) & (
        coords[:, 1] + size <= plan["slide_height"] + 1e-6
    )
    return coords[inside]


def tissue_fractions(
    coords: np.ndarray, plan: dict[str, Any], polygons: list[dict[str, Any]]
) -> np.ndarray:
    """Fraction of each patch covered by tissue polygons, from a summed-area table."""
    if len(coords) == 0 or not polygons:
        return np.zeros(len(coords))
    w, h = plan["slide_width"], plan["slide_height"]
    ds = max(plan["patch_level0"] / MASK_PX_PER_PATCH, max(w, h) / MAX_MASK_SIDE, 1.0)
    mask = polygons_mask(polygons, (int(np.ceil(h / ds)), int(np.ceil(w / ds))), ds)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    np.cumsum(mask, 0, dtype=np.int32, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], 1, out=sat[1:, 1:])

    def px(v: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.rint(v / ds).astype(np.int64), 0, limit)

    x0, y0 = px(coords[:, 0], mask.shape[1]), px(coords[:, 1], mask.shape[0])
    x1 = px(coords[:, 0] + plan["patch_level0"], mask.shape[1])
    y1 = px(coords[:, 1] + plan["patch_level0"], mask.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return inside / area


def draw_tile_grid(
    qc_rgb: np.ndarray, qc_downsample: float, coords: np.ndarray, patch_level0: float
) -> np.ndarray:
    """The QC image with each kept patch outlined in yellow, blended so the outlines under it
    (tissue, holes, annotation) stay visible; patches under 4 QC px are tinted instead."""
    import cv2

    layer = np.zeros(qc_rgb.shape[:2], np.uint8)
    size = patch_level0 / qc_downsample
    for x, y in np.asarray(coords, np.float64) / qc_downsample:
        p0 = (round(x * 16), round(y * 16))
        p1 = (round((x + size) * 16) - 16, round((y + size) * 16) - 16)
        cv2.rectangle(layer, p0, p1, 1, -1 if size < 4 else 1, cv2.LINE_8, 4)
    out = qc_rgb.copy()
    drawn = layer > 0
    alpha = 0.3 if size < 4 else 0.6
    tint = np.array([255, 210, 0], np.float32)
    out[drawn] = np.rint((1 - alpha) * out[drawn] + alpha * tint).astype(np.uint8)
    return out


def skip_reason(plan: dict[str, Any], n_grid: int, polygons: list[dict[str, Any]]) -> str:
    """Why a slide has no patches, in words (recorded in its tile set as `skipped`)."""
    if n_grid == 0:
        return (
            f"slide of {plan['slide_width']} x {plan['slide_height']} px is smaller than one "
            f"patch ({plan['patch_level0']:.0f} level-0 px)"
        )
    if not polygons:
        return "no tissue found"
    return f"no patch reaches tile.min_tissue_fraction {plan['min_tissue_fraction']:g}"


def tile_slide(
    slide_path: str | os.PathLike,
    tissue_geojson: str | os.PathLike,
    out_path: str | os.PathLike,
    params: TileParams | None = None,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
    out_qc_png: str | os.PathLike | None = None,
    seg_qc_png: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the kept patch origins (level-0 px), their tissue fraction and the read plan.

    With `out_qc_png`, also a QC image: the segmentation QC image `seg_qc_png` (thumbnail,
    tissue, holes, annotation) with the kept tile grid drawn on it.
    """
    params = params or TileParams()
    with open_slide(slide_path) as slide:
        info = slide_info(slide, slide_path, mpp_override, mpp_fallback)
    plan = read_plan(info, params)
    coords = grid_coords(plan)
    polygons = read_geojson_polygons(tissue_geojson)
    fraction = tissue_fractions(coords, plan, polygons)
    keep = fraction >= params.min_tissue_fraction
    skipped = skip_reason(plan, len(coords), polygons) if not keep.any() else None
    coords, fraction = coords[keep], fraction[keep]
    if skipped:
        # Not an error: the slide stays in the cohort as an empty bag, which training skips
        # and evaluation lists under `skipped` in metrics.json.
        log.warning("%s: %s; the slide is skipped (empty bag)", slide_path, skipped)
    plan["params"] = asdict(params)
    plan["n_tiles"] = int(len(coords))
    plan["skipped"] = skipped
    store.write_tiles(out_path, coords, fraction, plan)
    if out_qc_png is not None:
        _write_qc(slide_path, tissue_geojson, polygons, seg_qc_png, out_qc_png, coords, plan)
    return plan


def _write_qc(
    slide_path: str | os.PathLike,
    tissue_geojson: str | os.PathLike,
    polygons: list[dict[str, Any]],
    seg_qc_png: str | os.PathLike | None,
    out_qc_png: str | os.PathLike,
    coords: np.ndarray,
    plan: dict[str, Any],
) -> None:
    from srmil.segment import draw_overlay, qc_scale, read_png, thumbnail, write_png

    if seg_qc_png is not None:
        qc = read_png(seg_qc_png)
        downsample = plan["slide_width"] / qc.shape[1]
    else:  # no segmentation QC image: draw one on a fresh thumbnail
        summary = store.read_json(tissue_geojson).get("properties", {})
        with open_slide(slide_path) as slide:
            view = thumbnail(slide, float(summary.get("seg_downsample", 32.0)))
        qc, downsample = qc_scale(view, plan["slide_width"] / view.shape[1])
        qc = draw_overlay(qc, downsample, polygons)
    write_png(out_qc_png, draw_tile_grid(qc, downsample, coords, plan["patch_level0"]))
