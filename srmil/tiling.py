"""Patch grid at a target µm/px, aligned globally to multiples of the stride, filtered by tissue.

Only coordinates and a read plan are written; patches are read from the slide when features are
extracted. Global alignment (origin 0,0 for every tissue piece) keeps lattice neighbours at grid
distance 1, which the spatial graph relies on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from srmil import __version__, store
from srmil.segment import polygons_mask, read_geojson_polygons
from srmil.slide import SlideError, SlideInfo, level_for_downsample, open_slide, slide_info

log = logging.getLogger(__name__)

# Tissue fraction is measured on a mask where one patch spans about this many pixels per side.
MASK_PX_PER_PATCH = 16
MAX_MASK_SIDE = 8192


@dataclass
class TileParams:
    target_mpp: float = 0.5
    patch_px: int = 224  # patch side at target_mpp
    stride_px: int | None = None  # default: patch_px (no overlap)
    min_tissue_fraction: float = 0.5


def read_plan(info: SlideInfo, params: TileParams) -> dict[str, Any]:
    """How to read a patch: level, size at that level, and sizes in level-0 px."""
    scale = params.target_mpp / info.mpp  # level-0 px per target px
    if scale < 1 - 1e-3:
        raise SlideError(
            f"{info.path}: slide resolution {info.mpp:.4g} µm/px is coarser than the "
            f"target {params.target_mpp} µm/px; raise tile.target_mpp in config.yaml"
        )
    stride_px = params.stride_px or params.patch_px
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
        "read_px": max(1, round(params.patch_px * scale / level_ds)),
        "slide_width": info.width,
        "slide_height": info.height,
        "min_tissue_fraction": params.min_tissue_fraction,
        "srmil_version": __version__,
    }


def grid_coords(plan: dict[str, Any]) -> np.ndarray:
    """Every grid origin (x, y) in level-0 px whose patch lies inside the slide."""
    stride, size = plan["stride_level0"], plan["patch_level0"]
    nx = int(np.floor((plan["slide_width"] - size) / stride)) + 1
    ny = int(np.floor((plan["slide_height"] - size) / stride)) + 1
    if nx <= 0 or ny <= 0:
        return np.zeros((0, 2), np.int64)
    ix, iy = np.meshgrid(np.arange(nx), np.arange(ny))  # row-major: y then x
    return np.stack([np.rint(ix.ravel() * stride), np.rint(iy.ravel() * stride)], 1).astype(
        np.int64
    )


def tissue_fractions(
    coords: np.ndarray, plan: dict[str, Any], polygons: list[dict[str, Any]]
) -> np.ndarray:
    """Fraction of each patch covered by tissue polygons, from a summed-area table."""
    if len(coords) == 0:
        return np.zeros(0)
    w, h = plan["slide_width"], plan["slide_height"]
    ds = max(plan["patch_level0"] / MASK_PX_PER_PATCH, max(w, h) / MAX_MASK_SIDE, 1.0)
    mask = polygons_mask(polygons, (int(np.ceil(h / ds)), int(np.ceil(w / ds))), ds)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    x0 = np.clip(np.rint(coords[:, 0] / ds).astype(int), 0, mask.shape[1])
    y0 = np.clip(np.rint(coords[:, 1] / ds).astype(int), 0, mask.shape[0])
    x1 = np.clip(np.rint((coords[:, 0] + plan["patch_level0"]) / ds).astype(int), 0, mask.shape[1])
    y1 = np.clip(np.rint((coords[:, 1] + plan["patch_level0"]) / ds).astype(int), 0, mask.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return inside / area


def tile_slide(
    slide_path: str | os.PathLike,
    tissue_geojson: str | os.PathLike,
    out_path: str | os.PathLike,
    params: TileParams | None = None,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> dict[str, Any]:
    """Write the kept patch origins (level-0 px), their tissue fraction and the read plan."""
    params = params or TileParams()
    with open_slide(slide_path) as slide:
        info = slide_info(slide, slide_path, mpp_override, mpp_fallback)
    plan = read_plan(info, params)
    coords = grid_coords(plan)
    fraction = tissue_fractions(coords, plan, read_geojson_polygons(tissue_geojson))
    keep = fraction >= params.min_tissue_fraction
    coords, fraction = coords[keep], fraction[keep]
    if len(coords) == 0:
        log.warning(
            "%s: no patch reaches tissue fraction %.2f; the bag will be empty",
            slide_path,
            params.min_tissue_fraction,
        )
    plan["params"] = asdict(params)
    plan["n_tiles"] = int(len(coords))
    store.write_tiles(out_path, coords, fraction, plan)
    return plan
