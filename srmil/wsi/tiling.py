"""Patch grid at a target µm/px, aligned globally to multiples of the stride, filtered by tissue.

Only coordinates and a read plan are written; patches are read from the slide when features are
extracted. Global alignment (origin 0,0 for every tissue piece) keeps lattice neighbours at grid
distance 1, which the spatial graph relies on. The read plan picks the coarsest pyramid level
that is still at least as fine as the target, so a patch is only ever downsampled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import shapely

from srmil import __version__, store
from srmil.errors import InputError
from srmil.settings import TileSettings
from srmil.wsi import qc
from srmil.wsi.geometry import (
    Polygon,
    exterior_bounds,
    polygon_union,
    polygons_mask,
    polygons_window,
    read_geojson_polygons,
    read_regions,
    region_fractions,
)
from srmil.wsi.slide import (
    SlideError,
    SlideInfo,
    level_for_downsample,
    open_slide,
    slide_info,
    thumbnail,
)

log = logging.getLogger(__name__)

# Tissue fraction is measured on a mask where one patch spans about this many pixels per side.
MASK_PX_PER_PATCH = 16
MAX_MASK_SIDE = 8192
# Tissue fractions are summed this many mask rows of patches at a time.
SUM_STRIP_ROWS = 256
# With regions of interest, a patch is kept when at least this share of it lies inside them.
ROI_MIN_FRACTION = 0.5


@dataclass(frozen=True)
class ReadPlan:
    """How one slide's patches are read, saved with its tiles (`write_tiles`, `read_tiles`): the
    target resolution and grid, the pyramid level read and every size in level-0 px, which the
    features, the graph and the heatmaps all go by."""

    target_mpp: float  # µm/px of the patches
    patch_px: int  # patch side at target_mpp
    stride_px: int  # grid step at target_mpp
    slide_mpp: float  # the slide's level-0 µm/px
    mpp_source: str  # "file", "sample sheet" or "config fallback"
    patch_level0: float  # patch side in level-0 px
    stride_level0: float  # grid step in level-0 px: origins are multiples of it
    level: int  # the pyramid level read
    level_downsample: float
    # px read at `level` for one patch, >= patch_px: the level is never coarser than the
    # target, so reads only shrink
    read_px: int
    slide_width: int  # level-0 px
    slide_height: int
    min_tissue_fraction: float
    srmil_version: str = __version__
    params: dict[str, Any] = field(default_factory=dict)  # the tile settings used
    n_tiles: int = 0
    skipped: str | None = None  # why the slide has no patch (kept as an empty bag)


def read_plan(info: SlideInfo, params: TileSettings) -> ReadPlan:
    """How to read a patch: level, size at that level, and sizes in level-0 px."""
    scale = params.target_mpp / info.mpp  # level-0 px per target px
    if scale < 1 - 1e-3:
        raise SlideError(
            f"{info.path}: slide resolution {info.mpp:.4g} µm/px is coarser than the "
            f"target {params.target_mpp} µm/px; raise tile.target_mpp in config.yaml"
        )
    level = level_for_downsample(info.level_downsamples, scale)
    level_ds = info.level_downsamples[level]
    return ReadPlan(
        target_mpp=params.target_mpp,
        patch_px=params.patch_px,
        stride_px=params.stride,
        slide_mpp=info.mpp,
        mpp_source=info.mpp_source,
        patch_level0=params.patch_px * scale,
        stride_level0=params.stride * scale,
        level=level,
        level_downsample=level_ds,
        read_px=max(params.patch_px, round(params.patch_px * scale / level_ds)),
        slide_width=info.width,
        slide_height=info.height,
        min_tissue_fraction=params.min_tissue_fraction,
        params=params.model_dump(),
    )


def write_tiles(
    path: str | os.PathLike,
    coords_level0: np.ndarray,
    tissue_fraction: np.ndarray,
    plan: ReadPlan,
) -> None:
    """A tile set (JSON): the read plan, then one column each for the origins' x and y (level-0
    px) and their tissue fractions, written a chunk at a time (`store.write_json_columns`).
    The plan's n_tiles is the number of origins."""
    coords_level0 = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    plan = replace(plan, n_tiles=len(coords_level0))
    store.write_json_columns(path, {"plan": asdict(plan)}, {
        "x": coords_level0[:, 0],
        "y": coords_level0[:, 1],
        "tissue_fraction": np.round(np.asarray(tissue_fraction, dtype=float), 4),
    })


def read_tiles(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, ReadPlan]:
    """(coords_level0 N x 2 int64, tissue_fraction N float, plan) of a tile set; a one-line
    error for a file this version did not write."""
    data = store.read_json(path)
    try:
        plan = ReadPlan(**data["plan"])
        if "coords_level0" in data:  # tile sets written before 2026-12-07 held rows [[x, y], ...]
            coords = np.asarray(data.pop("coords_level0"), dtype=np.int64).reshape(-1, 2)
        else:
            coords = np.stack([np.asarray(data.pop(k), dtype=np.int64) for k in "xy"], 1)
        fraction = np.asarray(data.pop("tissue_fraction"), dtype=np.float64)
        if not len(coords) == len(fraction) == plan.n_tiles:
            raise ValueError(f"{len(coords)} origins, {len(fraction)} tissue fractions and "
                             f"n_tiles {plan.n_tiles} differ")
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a tile set of this srmil version ({err}); rerun the tile "
                         "step") from None
    return coords.reshape(-1, 2), fraction, plan


def grid_shape(plan: ReadPlan) -> tuple[int, int]:
    """(columns, rows) of the slide's grid; 0 when not even one patch fits."""
    stride, size = plan.stride_level0, plan.patch_level0
    nx = int(np.floor((plan.slide_width - size) / stride)) + 1
    ny = int(np.floor((plan.slide_height - size) / stride)) + 1
    return max(nx, 0), max(ny, 0)


def grid_coords(
    plan: ReadPlan, boxes: list[tuple[float, float, float, float]] | None = None
) -> np.ndarray:
    """Every grid origin (x, y) in level-0 px whose patch lies inside the slide, row-major.

    With `boxes` (x0, y0, x1, y1 in level-0 px), only the origins whose patch overlaps one of
    them: the same lattice and order, without a coordinate for every cell of a huge slide."""
    stride, size = plan.stride_level0, plan.patch_level0
    nx, ny = grid_shape(plan)
    if nx == 0 or ny == 0:
        return np.zeros((0, 2), np.int64)
    if boxes is None:
        iy, ix = np.divmod(np.arange(nx * ny), nx)  # row-major: y then x
    else:
        # One byte per grid cell (cells, not pixels: 1.7 MB for a 250 x 200 mm slide).
        cells = np.zeros((ny, nx), bool)
        for x0, y0, x1, y1 in boxes:
            # Conservative cell ranges (one extra each side): the exact test is left to the
            # tissue fraction, which is 0 for a patch outside every box.
            cx0, cy0 = (max(0, int(np.floor((v - size) / stride))) for v in (x0, y0))
            cx1, cy1 = (max(0, int(np.ceil(v / stride)) + 1) for v in (x1, y1))
            cells[cy0:cy1, cx0:cx1] = True
        iy, ix = np.nonzero(cells)
    coords = np.stack([np.rint(ix * stride), np.rint(iy * stride)], 1).astype(np.int64)
    # Rounding a fractional stride may push the last patch past the edge by a pixel.
    inside = (coords[:, 0] + size <= plan.slide_width + 1e-6) & (
        coords[:, 1] + size <= plan.slide_height + 1e-6
    )
    return coords[inside]


def mask_downsample(plan: ReadPlan) -> float:
    """Level-0 px per px of the mask tissue fractions are measured on."""
    w, h = plan.slide_width, plan.slide_height
    return max(plan.patch_level0 / MASK_PX_PER_PATCH, max(w, h) / MAX_MASK_SIDE, 1.0)


def tissue_boxes(polygons: list[Polygon], margin: float) -> list[tuple[float, float, float, float]]:
    """Bounding box (x0, y0, x1, y1) of each polygon in level-0 px, grown by `margin`."""
    bounds = exterior_bounds(polygons) + np.array([-margin, -margin, margin, margin])
    return [tuple(float(v) for v in box) for box in bounds]


def tissue_fractions(
    coords: np.ndarray, plan: ReadPlan, polygons: list[Polygon]
) -> np.ndarray:
    """Fraction of each patch covered by tissue polygons, from summed-area tables.

    The mask is made only over the polygons' bounding box (it is 0 elsewhere), and summed in
    strips of SUM_STRIP_ROWS rows, so memory stays near that of the mask itself."""
    if len(coords) == 0 or not polygons:
        return np.zeros(len(coords))
    w, h = plan.slide_width, plan.slide_height
    ds = mask_downsample(plan)
    shape = (int(np.ceil(h / ds)), int(np.ceil(w / ds)))
    window = polygons_window(polygons, shape, ds)
    mask = polygons_mask(polygons, shape, ds, window)

    def px(v: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.rint(v / ds).astype(np.int64), 0, limit)

    x0, y0 = px(coords[:, 0], shape[1]), px(coords[:, 1], shape[0])
    x1 = px(coords[:, 0] + plan.patch_level0, shape[1])
    y1 = px(coords[:, 1] + plan.patch_level0, shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    # Boxes in window px: the mask outside the window is 0, so clipping loses nothing.
    wy0, wy1, wx0, wx1 = window
    boxes = [np.clip(x0 - wx0, 0, wx1 - wx0), np.clip(y0 - wy0, 0, wy1 - wy0),
             np.clip(x1 - wx0, 0, wx1 - wx0), np.clip(y1 - wy0, 0, wy1 - wy0)]
    return box_sums(mask, *boxes) / area


def box_sums(
    mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
) -> np.ndarray:
    """Sum of a uint8 mask over each box [y0, y1) x [x0, x1), with a summed-area table per
    strip of boxes (sorted by y0) instead of one int32 table the size of the mask."""
    sums = np.zeros(len(x0), np.int64)
    order = np.argsort(y0, kind="stable")
    starts = y0[order]
    for top in range(0, mask.shape[0], SUM_STRIP_ROWS):
        lo, hi = np.searchsorted(starts, [top, top + SUM_STRIP_ROWS])
        if lo == hi:
            continue
        idx = order[lo:hi]
        bottom = int(y1[idx].max())
        strip = mask[top:bottom]
        sat = np.zeros((strip.shape[0] + 1, strip.shape[1] + 1), np.int32)
        np.cumsum(strip, 0, dtype=np.int32, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], 1, out=sat[1:, 1:])
        a, b, c, d = x0[idx], y0[idx] - top, x1[idx], y1[idx] - top
        sums[idx] = sat[d, c] - sat[b, c] - sat[d, a] + sat[b, a]
    return sums


def skip_reason(plan: ReadPlan, n_grid: int, polygons: list[Polygon]) -> str:
    """Why a slide has no patches, in words (recorded in its tile set as `skipped`)."""
    if n_grid == 0:
        return (
            f"slide of {plan.slide_width} x {plan.slide_height} px is smaller than one "
            f"patch ({plan.patch_level0:.0f} level-0 px)"
        )
    if not polygons:
        return "no tissue found"
    return f"no patch reaches tile.min_tissue_fraction {plan.min_tissue_fraction:g}"


def tile_slide(
    slide_path: str | os.PathLike,
    tissue_geojson: str | os.PathLike,
    out_path: str | os.PathLike,
    params: TileSettings | None = None,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
    out_qc_png: str | os.PathLike | None = None,
    seg_qc_png: str | os.PathLike | None = None,
    roi: str | os.PathLike | None = None,
    roi_exclude: str | os.PathLike | None = None,
) -> ReadPlan:
    """Write the kept patch origins (level-0 px), their tissue fraction and the read plan.

    With `roi` (a GeoJSON of regions to keep, QuPath's export in level-0 px) only patches at
    least ROI_MIN_FRACTION inside those regions are kept, less any region of `roi_exclude`.
    With `out_qc_png`, also a QC image: the segmentation QC image `seg_qc_png` (thumbnail,
    tissue, holes, annotation) with the regions and the kept tile grid drawn on it.
    """
    params = params or TileSettings()
    with open_slide(slide_path) as slide:
        info = slide_info(slide, slide_path, mpp_override, mpp_fallback)
    plan = read_plan(info, params)
    regions = _regions(roi, roi_exclude, plan)
    polygons = read_geojson_polygons(tissue_geojson)
    if params.min_tissue_fraction > 0:
        # Only cells near tissue can pass. The mask is 0 beyond 2 px around the polygons'
        # boxes, and a patch's box in mask px may reach half a px further: 4 px to spare.
        coords = grid_coords(plan, tissue_boxes(polygons, 4 * mask_downsample(plan) + 1))
    else:  # every cell passes
        coords = grid_coords(plan)
    fraction = tissue_fractions(coords, plan, polygons)
    keep = fraction >= params.min_tissue_fraction
    if regions is not None:
        boxes = np.c_[coords, coords + plan.patch_level0]
        keep &= region_fractions(boxes, regions.area) >= ROI_MIN_FRACTION
    n_grid = int(np.prod(grid_shape(plan)))
    skipped = skip_reason(plan, n_grid, polygons) if not keep.any() else None
    if skipped and regions is not None and (fraction >= params.min_tissue_fraction).any():
        skipped = "no tissue patch inside the regions of interest"
    coords, fraction = coords[keep], fraction[keep]
    if skipped:
        # Not an error: the slide stays in the cohort as an empty bag, which training skips
        # and evaluation lists under `skipped` in metrics.json.
        log.warning("%s: %s; the slide is skipped (empty bag)", slide_path, skipped)
    plan = replace(plan, n_tiles=int(len(coords)), skipped=skipped)
    write_tiles(out_path, coords, fraction, plan)
    if out_qc_png is not None:
        _write_qc(slide_path, tissue_geojson, polygons, seg_qc_png, out_qc_png, coords, plan,
                  regions)
    return plan


@dataclass(frozen=True)
class Regions:
    """Regions of interest of one slide: the polygons kept and left out, and the area between."""

    keep: list[Polygon]
    exclude: list[Polygon]
    area: Any  # shapely geometry: keep minus exclude


def _regions(roi: str | os.PathLike | None, roi_exclude: str | os.PathLike | None,
             plan: ReadPlan) -> Regions | None:
    if not roi and not roi_exclude:
        return None
    size = (plan.slide_width, plan.slide_height)
    keep = read_regions(roi, *size) if roi else []
    exclude = read_regions(roi_exclude, *size, what="regions to exclude") if roi_exclude else []
    area = polygon_union(keep) if keep else shapely.box(0, 0, *size)
    return Regions(keep, exclude, area.difference(polygon_union(exclude)) if exclude else area)


def _write_qc(
    slide_path: str | os.PathLike,
    tissue_geojson: str | os.PathLike,
    polygons: list[Polygon],
    seg_qc_png: str | os.PathLike | None,
    out_qc_png: str | os.PathLike,
    coords: np.ndarray,
    plan: ReadPlan,
    regions: Regions | None = None,
) -> None:
    if seg_qc_png is not None:
        image = qc.read_png(seg_qc_png)
        downsample = plan.slide_width / image.shape[1]
    else:  # no segmentation QC image: draw one on a fresh thumbnail
        summary = store.read_json(tissue_geojson).get("properties", {})
        with open_slide(slide_path) as slide:
            view = thumbnail(slide, float(summary.get("seg_downsample", 32.0)))
        image, downsample = qc.qc_scale(view, plan.slide_width / view.shape[1])
        image = qc.draw_overlay(image, downsample, polygons)
    if regions is not None:
        image = qc.draw_regions(image, downsample, regions.keep, regions.exclude)
    qc.write_png(out_qc_png, qc.draw_tile_grid(image, downsample, coords, plan.patch_level0))
