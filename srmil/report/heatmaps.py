"""Attention heatmaps: a slide's attention over its thumbnail, the tumour annotation outline, and
the top-attended patches read from the slide through OpenSlide with the tiling's read plan."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from srmil.errors import InputError
from srmil.store import atomic_path
from srmil.wsi.qc import write_png
from srmil.wsi.tiling import ReadPlan, read_tiles

HEATMAP_PX = 1024  # longer side of the thumbnail the heatmap is drawn on
HEATMAP_DPI = 80  # ~1500 px wide: patches stay legible; a palette PNG of ~150 KB (write_png)


def attention_grid(coords_level0: np.ndarray, attention: np.ndarray,
                   stride_level0: float) -> np.ndarray:
    """Attention on the patch grid: (rows, cols) float, NaN where there is no patch. Cell (i, j)
    covers level-0 px [j * stride, (j + 1) * stride) x [i * stride, (i + 1) * stride)."""
    cells = np.rint(np.asarray(coords_level0, dtype=np.float64) / stride_level0).astype(np.int64)
    if len(cells) == 0:
        return np.full((1, 1), np.nan)
    grid = np.full((int(cells[:, 1].max()) + 1, int(cells[:, 0].max()) + 1), np.nan)
    grid[cells[:, 1], cells[:, 0]] = attention
    return grid


def read_patches(slide_path: str | os.PathLike, coords_level0: np.ndarray,
                 plan: ReadPlan) -> list[np.ndarray]:
    """RGB uint8 patches at the target resolution, read as the features step read them."""
    import cv2

    from srmil.wsi.slide import open_slide, read_region, to_rgb

    level, read_px, patch_px = int(plan.level), int(plan.read_px), int(plan.patch_px)
    patches = []
    with open_slide(slide_path) as slide:
        for x, y in np.asarray(coords_level0, dtype=np.int64):
            # a damaged tile: one line naming the file, as in the features step
            region = read_region(slide, (int(x), int(y)), level, (read_px, read_px), slide_path)
            rgb = to_rgb(region)
            if read_px != patch_px:
                rgb = cv2.resize(rgb, (patch_px, patch_px), interpolation=cv2.INTER_AREA)
            patches.append(rgb)
    return patches


def slide_thumbnail(slide_path: str | os.PathLike,
                    max_px: int = HEATMAP_PX) -> tuple[np.ndarray, float]:
    """RGB thumbnail whose longer side is at most `max_px`, and its downsample from level 0."""
    from srmil.wsi.slide import open_slide, thumbnail

    with open_slide(slide_path) as slide:
        downsample = max(1.0, max(slide.dimensions) / max_px)
        return thumbnail(slide, downsample), downsample


def draw_heatmap(out_png: str | os.PathLike, slide_path: str | os.PathLike,
                 tiles_path: str | os.PathLike, attention: np.ndarray,
                 annotation: str | os.PathLike | None = None, title: str = "",
                 top_k: int = 8, max_px: int = HEATMAP_PX) -> dict[str, Any]:
    """Write one PNG: the thumbnail with the annotation outline, the attention over it, and a
    montage of the `top_k` most attended patches (red frame: positive by the annotation).

    `attention` (N,) follows the tile order of `tiles_path` (= the feature rows). Returns the
    top patches' indices, weights and positivity.
    """
    from matplotlib.figure import Figure

    from srmil.mil.attention import positive_patches
    from srmil.wsi.geometry import read_geojson_polygons

    coords, _, plan = read_tiles(tiles_path)
    attention = np.asarray(attention, dtype=np.float64).ravel()
    if len(attention) != len(coords):
        raise InputError(f"{tiles_path}: {len(coords)} tiles but {len(attention)} attention "
                         "weights; the tiles changed after the features were extracted, rerun "
                         "the features step")
    thumb, ds = slide_thumbnail(slide_path, max_px)
    polygons = read_geojson_polygons(annotation) if annotation else []
    positive = (positive_patches(coords, plan.patch_level0, annotation) if annotation
                else np.zeros(len(coords), dtype=bool))
    top = np.argsort(-attention, kind="stable")[:top_k]
    patches = read_patches(slide_path, coords[top], plan)

    # Three panels of equal height: the slide, the attention, the montage (columns per row times
    # the slide's aspect wide).
    n_cols = max(1, min(4, len(top)))
    n_rows = max(1, int(np.ceil(len(top) / n_cols)))
    aspect = thumb.shape[0] / thumb.shape[1]
    montage_ratio = n_cols / n_rows * aspect * 1.1
    panel_w = 5.0
    fig = Figure(figsize=(panel_w * (2 + montage_ratio) + 0.4, panel_w * aspect + 1.9))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, montage_ratio])
    ax_slide, ax_heat = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    for ax in (ax_slide, ax_heat):
        _draw_slide(ax, thumb, polygons, ds)
    ax_slide.set_title("slide" + (" and tumour annotation" if polygons else ""), fontsize=9)
    _draw_attention(fig, ax_heat, thumb.shape, coords, attention, plan, ds, top)
    montage = grid[0, 2].subgridspec(n_rows, n_cols, wspace=0.08, hspace=0.25)
    _draw_montage(fig, montage, n_cols, top, patches, attention, positive)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.07, top=0.86 if title else 0.92,
                        wspace=0.06)
    write_png(out_png, _render(fig))
    return {"top_index": top.tolist(), "top_weight": attention[top].tolist(),
            "top_positive": positive[top].tolist()}


def _render(fig) -> np.ndarray:
    """The figure's pixels (RGB) at HEATMAP_DPI, for the palette PNG writer."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=HEATMAP_DPI, format="png")
    buf.seek(0)
    with Image.open(buf) as image:
        return np.asarray(image.convert("RGB"))


def _draw_slide(ax, thumb: np.ndarray, polygons: list[dict[str, Any]], ds: float) -> None:
    """The thumbnail with the annotation's rings (exteriors and holes) in red."""
    ax.imshow(thumb)
    ax.set_axis_off()
    for poly in polygons:
        for ring in poly["coordinates"]:
            xy = np.asarray(ring) / ds
            ax.plot(xy[:, 0], xy[:, 1], color="red", lw=1.0)


def _draw_attention(fig, ax, thumb_shape: tuple[int, ...], coords: np.ndarray,
                    attention: np.ndarray, plan: ReadPlan, ds: float,
                    top: np.ndarray) -> None:
    """The attention on the patch grid over the thumbnail (its colour bar below), the `top`
    patches framed in cyan with their rank."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    stride = float(plan.stride_level0)
    cells = attention_grid(coords, attention, stride)
    vmax = float(attention.max()) if attention.size else 1.0
    extent = (0, cells.shape[1] * stride / ds, cells.shape[0] * stride / ds, 0)
    image = ax.imshow(np.ma.masked_invalid(cells), cmap=colormaps["inferno"], vmin=0,
                      vmax=vmax if vmax > 0 else 1.0, alpha=0.75, extent=extent,
                      interpolation="nearest")
    ax.set_xlim(0, thumb_shape[1])
    ax.set_ylim(thumb_shape[0], 0)
    size = float(plan.patch_level0) / ds
    for rank, i in enumerate(top, start=1):
        x, y = coords[i] / ds
        ax.add_patch(Rectangle((x, y), size, size, fill=False, color="cyan", lw=0.8))
        ax.text(x, y, str(rank), color="cyan", fontsize=6, va="bottom")
    fig.colorbar(image, ax=ax, orientation="horizontal", fraction=0.05, pad=0.03,
                 label="attention weight")
    ax.set_title(f"attention ({len(coords)} patches, max {vmax:.3g})", fontsize=9)


def _draw_montage(fig, montage, n_cols: int, top: np.ndarray, patches: list[np.ndarray],
                  attention: np.ndarray, positive: np.ndarray) -> None:
    """The top patches in rank order, `n_cols` a row, framed red when positive."""
    for rank, (i, patch) in enumerate(zip(top, patches, strict=True), start=1):
        ax = fig.add_subplot(montage[(rank - 1) // n_cols, (rank - 1) % n_cols])
        ax.imshow(patch)
        ax.set_xticks([])
        ax.set_yticks([])
        colour = "red" if positive[i] else "0.6"
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(2.0 if positive[i] else 0.8)
        ax.set_title(f"#{rank} {attention[i]:.3g}", fontsize=7)


def write_heatmaps(table: pd.DataFrame, attention: dict[str, np.ndarray], samples: pd.DataFrame,
                   tiles_dir: str | os.PathLike, out_dir: Path, model_name: str,
                   classes: list[str], top_patches: int = 8, heatmap_px: int = 1024) -> None:
    """One heatmap PNG per predicted slide into `out_dir` (a folder replaced as a whole)."""
    sample_rows = samples.set_index("slide_id")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for row in table.itertuples(index=False):
            if not sample_rows.at[row.slide_id, "path"]:  # known by its feature file alone
                continue
            probs = ", ".join(f"{c} {getattr(row, f'prob_{c}', float('nan')):.2f}"
                              for c in classes if f"prob_{c}" in table.columns)
            label = f"true {row.label} · " if "label" in table.columns else ""
            fold = f"fold {row.fold} · " if "fold" in table.columns else ""
            draw_heatmap(tmp / f"{row.slide_id}.png", sample_rows.at[row.slide_id, "path"],
                         Path(tiles_dir) / f"{row.slide_id}.json", attention[row.slide_id],
                         annotation=sample_rows.at[row.slide_id, "annotation"] or None,
                         title=f"{row.slide_id} · {model_name} · {fold}{label}P: {probs}",
                         top_k=top_patches, max_px=heatmap_px)
