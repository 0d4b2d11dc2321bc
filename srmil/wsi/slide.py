"""Open a slide, resolve its µm/px, choose pyramid levels by resolution, read a view of it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide

from srmil.errors import InputError, one_line

# A view is read in chunks of at most this many px per side of a level.
READ_CHUNK_PX = 2048


class SlideError(InputError):
    """A slide that cannot be used, phrased as one line naming the file and the fix."""


@dataclass(frozen=True)
class SlideInfo:
    path: str
    width: int  # level-0 px
    height: int
    mpp: float  # level-0 µm/px
    mpp_source: str  # "file", "sample sheet" or "config fallback"
    level_downsamples: tuple[float, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    vendor: str


def slide_file_problem(path: str | os.PathLike, sheet: str | os.PathLike = "the sample sheet"
                       ) -> str | None:
    """Why `path` is not a slide file OpenSlide can open (missing, empty, a format it does not
    know), as one line naming the file and the fix; None if it looks fine. Cheap: the sheet
    check runs it for every slide while the workflow parses."""
    p = Path(path)
    if not p.is_file():
        return f"{p}: slide file not found; fix its path in {sheet}"
    if p.stat().st_size == 0:
        return f"{p}: empty file (0 bytes); copy the slide again or remove its row from {sheet}"
    try:
        fmt = openslide.OpenSlide.detect_format(str(p))
    except (OSError, openslide.OpenSlideError):
        fmt = None
    if fmt is None:
        return (f"{p}: not a slide OpenSlide can read (another format, or a truncated copy); "
                f"replace the file or remove its row from {sheet}")
    return None


def open_slide(path: str | os.PathLike) -> openslide.OpenSlide:
    problem = slide_file_problem(path)
    if problem:
        raise SlideError(problem)
    p = Path(path)
    try:
        return openslide.OpenSlide(str(p))
    except (openslide.OpenSlideError, OSError) as err:
        # A recognised format that fails to open is usually a truncated or damaged copy.
        raise SlideError(
            f"{p}: OpenSlide cannot open it ({one_line(err)}); the file may be truncated or "
            "damaged: copy it again, or remove its row from the sample sheet"
        ) from err


def read_region(
    slide: openslide.OpenSlide,
    location: tuple[int, int],
    level: int,
    size: tuple[int, int],
    path: str | os.PathLike | None = None,
):
    """`slide.read_region`, with unreadable pixel data (a truncated or damaged file opens, then
    fails here) raised as a one-line SlideError naming the file and where it failed."""
    try:
        return slide.read_region(location, level, size)
    except openslide.OpenSlideError as err:
        path = path or getattr(slide, "_filename", "the slide")
        raise damaged_pixels(path, level, location, one_line(err)) from err


def damaged_pixels(
    path: str | os.PathLike, level: int, location: tuple[int, int], reason: str
) -> SlideError:
    """The one-line error of pixel data that cannot be decoded, whichever reader met it;
    `location` is the level-0 origin of the read."""
    return SlideError(
        f"{path}: pixel data at level {level}, x={location[0]} y={location[1]} cannot be "
        f"read ({reason}); the file is truncated or damaged: copy it again, or "
        "remove its row from the sample sheet"
    )


def slide_info(
    slide: openslide.OpenSlide,
    path: str | os.PathLike,
    mpp_override: float | None = None,
    mpp_fallback: float | None = None,
) -> SlideInfo:
    """Level-0 µm/px from the file, else the sample sheet's `mpp`, else the config fallback."""
    mpp, source = _file_mpp(slide), "file"
    if mpp_override is not None and math.isfinite(mpp_override):
        mpp, source = float(mpp_override), "sample sheet"  # an explicit per-slide value wins
    elif mpp is None and mpp_fallback is not None:
        mpp, source = float(mpp_fallback), "config fallback"
    if mpp is None:
        raise SlideError(
            f"{path}: no µm/px in the file; add an 'mpp' column to the sample sheet "
            "or set 'mpp_fallback' in config.yaml"
        )
    width, height = slide.dimensions
    return SlideInfo(
        path=str(path),
        width=width,
        height=height,
        mpp=mpp,
        mpp_source=source,
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        level_dimensions=tuple(tuple(d) for d in slide.level_dimensions),
        vendor=slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
    )


def _file_mpp(slide: openslide.OpenSlide) -> float | None:
    props = slide.properties
    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            values.append(float(props[key]))
        except (KeyError, ValueError):
            pass
    values = [v for v in values if 0 < v < 100]
    return float(np.mean(values)) if values else None


def level_for_downsample(level_downsamples: tuple[float, ...], downsample: float) -> int:
    """The coarsest level whose downsample does not exceed `downsample` (never upsample)."""
    ok = [i for i, d in enumerate(level_downsamples) if d <= downsample * (1 + 1e-3)]
    return max(ok, key=lambda i: level_downsamples[i]) if ok else 0


def thumbnail(slide: openslide.OpenSlide, downsample: float) -> np.ndarray:
    """RGB view of the slide at `downsample` (level-0 px per output px), read in bounded chunks
    from the coarsest level that is not coarser than the view (never upsampled)."""
    import cv2

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


def to_rgb(region) -> np.ndarray:
    """RGBA PIL image from read_region -> RGB uint8 array; transparent areas become white."""
    rgba = np.asarray(region)
    if rgba[..., 3].min() == 255:  # opaque (the usual case): no compositing needed
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)
