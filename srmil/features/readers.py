"""Patch readers: OpenSlide for every slide, and `jpeg-tiles` for pyramid levels stored as
baseline JPEG tiles in a TIFF (Aperio SVS, generic tiled TIFF).

OpenSlide stays the front door: it opens each slide, gives its levels and µm/px, and reads
whatever the tile reader does not take (NDPI, MRXS, JPEG 2000 or LZW levels, other vendors).
The tile reader exists because OpenSlide's `read_region` costs several times the JPEG decoding
it needs: every tile is composited through cairo/pixman in floating point (docs/features.md),
and a 224-px patch grid over 256-px tiles decodes most tiles for several patches. Here the
compressed bytes of the tiles a chunk of patches needs are read with `os.pread`, each tile is
decoded once while it stays in a small cache, and the patches are cut from the decoded tiles.

Same pixels as OpenSlide: a tile is decoded as OpenSlide decodes it (the level's JPEGTables, the
colour space the TIFF photometric tag names, libjpeg's default IDCT and fancy upsampling, any
libjpeg warning taken as an error), and pixels beyond the level's edge are white, as OpenSlide's
transparent ones become in `srmil.wsi.slide.to_rgb`. Reads that shrink (a level finer than the
target) let libjpeg-turbo's DCT scaling do whole halvings, then an area resize the rest.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openslide
import simplejpeg
import tifffile

from srmil.errors import one_line
from srmil.wsi.slide import SlideError, damaged_pixels
from srmil.wsi.tiling import ReadPlan

READERS = ("auto", "openslide", "jpeg-tiles")
# OpenSlide drivers whose levels are one plain tile grid per TIFF page (no overlaps, no
# per-tile offsets, no missing tiles to paint), so a page's tiles are the level's pixels.
TILE_VENDORS = ("aperio", "generic-tiff")
# Decoded tiles one reader keeps (per process): about two rows of tiles across a 40,000-px
# wide tissue region at 256 px, so the next grid row reuses the tiles it shares with this one.
CACHE_BYTES = 96 << 20
SOI, EOI = b"\xff\xd8", b"\xff\xd9"
# An Adobe APP14 segment whose transform flag names the colour space; libjpeg honours it where
# a stream carries no JFIF marker. Used where a level's photometric tag says RGB but the stream
# does not (Aperio), the case OpenSlide handles by setting libjpeg's colour space itself.
ADOBE = {
    "RGB": b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00",
    "YCbCr": b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01",
}


@dataclass(frozen=True)
class JpegLevel:
    """Where one pyramid level's JPEG tiles lie in the file, and how to make each a stream any
    libjpeg-based decoder reads as OpenSlide does: `prefix` (SOI, an Adobe marker where needed,
    the level's tables) replaces each tile's own SOI."""

    level: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray = field(repr=False)
    counts: np.ndarray = field(repr=False)
    prefix: bytes = field(repr=False)
    colorspace: str = "YCbCr"

    @property
    def across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def down(self) -> int:
        return -(-self.height // self.tile_h)

    def stream(self, data: bytes) -> bytes:
        return data if self.prefix == SOI else self.prefix + data[2:]


@dataclass(frozen=True)
class ReaderChoice:
    """The reader a slide's patches go through, and why (logged, and kept in the store)."""

    name: str  # "openslide" or "jpeg-tiles"
    requested: str
    reason: str
    level: JpegLevel | None = None
    dct_scale: int = 1  # tiles decoded at 1/dct_scale (libjpeg-turbo's DCT scaling)

    def provenance(self, gpu: bool = False) -> dict[str, Any]:
        if self.name == "openslide":
            decoder = f"OpenSlide {openslide.__library_version__} read_region"
        elif gpu:
            import torchvision

            decoder = f"torchvision {torchvision.__version__} decode_jpeg on CUDA (nvJPEG)"
        else:
            decoder = f"simplejpeg {simplejpeg.__version__} (libjpeg-turbo)"
        return {
            "name": self.name,
            "requested": self.requested,
            "reason": self.reason,
            "decoder": decoder,
            "dct_scale": self.dct_scale,
        }


def inspect_level(path: str, slide: openslide.OpenSlide, level: int) -> JpegLevel | str:
    """The level's JPEG tile layout, or a short reason why the tile reader cannot read it."""
    vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
    if vendor not in TILE_VENDORS:
        return f"OpenSlide format {vendor!r}; the tile reader takes {', '.join(TILE_VENDORS)}"
    width, height = slide.level_dimensions[level]
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [
                p
                for p in tif.pages
                if p.is_tiled and (p.imagewidth, p.imagelength) == (width, height)
            ]
            if len(pages) != 1:
                return f"{len(pages)} tiled TIFF pages of {width} x {height} px for level {level}"
            page = pages[0]
            layout = (
                int(page.compression),
                int(page.planarconfig),
                int(page.bitspersample),
                int(page.samplesperpixel),
                int(page.photometric),
                int(page.imagedepth),
            )
            tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            tables = page.jpegtables
            tif.filehandle.seek(int(offsets[0]))
            first = tif.filehandle.read(int(counts[0]))
    except Exception as err:  # any surprise in the file: OpenSlide reads it, as before
        return f"TIFF structure not readable by tifffile ({one_line(err)})"
    compression, planar, bits, samples, photometric, depth = layout
    if compression != 7:
        names = {c.value: c.name for c in tifffile.COMPRESSION}
        return f"level {level} is compressed with {names.get(compression, compression)}, not JPEG"
    if (planar, bits, samples, depth) != (1, 8, 3, 1) or photometric not in (2, 6):
        return f"level {level} is not 8-bit interleaved RGB/YCbCr JPEG"
    if len(counts) != -(-width // tile_w) * -(-height // tile_h) or (counts <= 0).any():
        return f"level {level} has missing tiles"
    if tables is not None and not (tables.startswith(SOI) and tables.endswith(EOI)):
        return f"level {level} has malformed JPEGTables"
    colorspace = "YCbCr" if photometric == 6 else "RGB"
    segments = tables[2:-2] if tables else b""
    # The colour space libjpeg would guess from the stream; where it is not the one the TIFF
    # names, an Adobe marker says it (and where even that does not take, OpenSlide reads it).
    for prefix in (SOI + segments, SOI + ADOBE[colorspace] + segments):
        try:
            h, w, guessed, _ = simplejpeg.decode_jpeg_header(prefix + first[2:])
        except ValueError as err:
            return f"level {level}'s first tile is not a readable JPEG ({one_line(err)})"
        if (h, w) != (tile_h, tile_w):
            return f"level {level}'s JPEG tiles are {w} x {h} px, not {tile_w} x {tile_h}"
        if guessed == colorspace:
            break
    else:
        return f"level {level}'s JPEG colour space cannot be set to {colorspace}"
    return JpegLevel(level, width, height, tile_w, tile_h, offsets, counts, prefix, colorspace)


def choose_reader(
    path: str,
    slide: openslide.OpenSlide,
    coords_level0: np.ndarray,
    plan: ReadPlan,
    requested: str = "auto",
) -> ReaderChoice:
    """`auto`: the tile reader where it reads the plan's level exactly, else OpenSlide.
    `jpeg-tiles` on a slide it cannot read is a one-line SlideError naming the reason."""
    if requested not in READERS:
        raise SlideError(
            f"config.yaml: features.reader {requested!r} is not a reader; use one of "
            + ", ".join(READERS)
        )
    if requested == "openslide":
        return ReaderChoice("openslide", requested, "requested")
    level = int(plan.level)
    found = inspect_level(str(path), slide, level)
    if isinstance(found, JpegLevel):
        ds = float(slide.level_downsamples[level])
        xy = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2) / ds
        # OpenSlide interpolates a read that starts between pixels of a level; the tile
        # reader cuts whole pixels only, so such plans stay with OpenSlide.
        if not np.allclose(xy, np.rint(xy), rtol=0, atol=1e-6):
            found = f"patch origins fall between pixels of level {level}"
    if isinstance(found, str):
        if requested == "jpeg-tiles":
            raise SlideError(
                f"{path}: features.reader jpeg-tiles cannot read this slide ({found}); set "
                "features.reader to auto or openslide in config.yaml"
            )
        return ReaderChoice("openslide", requested, found)
    xy = np.rint(xy).astype(np.int64)
    scale = dct_scale(found, int(plan.read_px), int(plan.patch_px), xy)
    what = f"level {level} is {found.tile_w} x {found.tile_h} px {found.colorspace} JPEG tiles"
    return ReaderChoice("jpeg-tiles", requested, what, found, scale)


def dct_scale(level: JpegLevel, read_px: int, patch_px: int, xy_level: np.ndarray) -> int:
    """The largest of 8, 4, 2 that libjpeg-turbo can decode tiles at while the patch stays at
    least as fine as the target (read_px / s >= patch_px) and whole pixels land on whole
    pixels (tile sizes, patch size and origins divisible by s); 1 otherwise."""
    for s in (8, 4, 2):
        if (
            read_px % s == 0
            and read_px // s >= patch_px
            and level.tile_w % s == 0
            and level.tile_h % s == 0
            and not (xy_level % s).any()
        ):
            return s
    return 1


@dataclass
class EncodedTiles:
    """One chunk's tiles as JPEG streams (for a GPU decoder) and how patches are cut from them:
    patch i covers tiles `grid[i]` (rows x columns, -1 beyond the level), starting `offsets[i]`
    (x, y) px into its top-left tile; px from `valid[i]` (x, y) on are beyond the level's edge."""

    streams: list[Any]  # uint8 tensors
    grid: Any  # (n, ky, kx) int64 tensor
    offsets: Any  # (n, 2) int64 tensor
    valid: Any  # (n, 2) int64 tensor
    size: int  # patch side, px at the level
    origins_level0: np.ndarray  # (n, 2), for error messages


class TileReader:
    """Decoded tiles of one JPEG level: bytes read with `os.pread` (no shared file position, so
    reader threads share the file), each tile decoded at most once while it stays in a bounded
    cache (least recently used out, and rows above the patches being read, which raster order
    never asks for again). Each thread has its own cache, so a buffer one thread decodes into
    is never one another thread is still copying from; a process gets its own copy.

    Buffers of tiles that leave the cache are decoded into again: a fresh 192-KiB array costs
    its page faults on first touch, a third of the decoding time of a 256-px tile here.
    """

    def __init__(self, path: str, level: JpegLevel, scale: int = 1, cache_bytes: int = CACHE_BYTES):
        self.path, self.level, self.scale = str(path), level, int(scale)
        self.tile_w, self.tile_h = level.tile_w // self.scale, level.tile_h // self.scale
        # px of the level (at this scale) that exist; a pixel straddling the edge counts out
        self.valid_w, self.valid_h = level.width // self.scale, level.height // self.scale
        self.capacity = max(16, cache_bytes // (self.tile_w * self.tile_h * 3))
        self.decoded = 0  # tiles decoded so far (the cache's effect, for tests and benchmarks)
        self._setup()

    def _setup(self) -> None:
        self._fd: int | None = None
        self._lock = threading.Lock()  # the file descriptor and the count
        self._local = threading.local()  # per thread: `cache` (index -> tile), `spare` buffers

    def __getstate__(self) -> dict[str, Any]:  # to a reader process: no fd, lock or caches
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_lock", "_local")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self._local = threading.local()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _caches(self) -> tuple[collections.OrderedDict[int, np.ndarray], list[np.ndarray]]:
        local = self._local
        if not hasattr(local, "cache"):
            local.cache, local.spare = collections.OrderedDict(), []
        return local.cache, local.spare

    def cached(self) -> int:
        """Tiles held by this thread's cache."""
        return len(self._caches()[0])

    def _bytes(self, index: int, where: tuple[int, int]) -> bytes:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        offset, count = int(self.level.offsets[index]), int(self.level.counts[index])
        try:
            data = os.pread(self._fd, count, offset)
        except OSError as err:
            raise self._damaged(where, one_line(err)) from err
        if len(data) != count:
            raise self._damaged(where, f"tile {index} has {len(data)} of {count} bytes")
        return self.level.stream(data)

    def _damaged(self, where: tuple[int, int], reason: str) -> SlideError:
        return damaged_pixels(self.path, self.level.level, where, reason)

    def tile(self, col: int, row: int, where: tuple[int, int]) -> np.ndarray:
        """Tile (col, row) as (tile_h, tile_w, 3) RGB at this reader's scale; `where`, the
        level-0 origin of the patch asking, goes into the error of a damaged tile."""
        index = row * self.level.across + col
        cache, spare = self._caches()
        hit = cache.get(index)
        if hit is not None:
            cache.move_to_end(index)
            return hit
        if len(cache) >= self.capacity:
            spare.append(cache.popitem(last=False)[1])
        data = self._bytes(index, where)
        s = self.scale
        try:
            px = simplejpeg.decode_jpeg(
                data,
                "rgb",
                min_height=self.tile_h if s > 1 else 0,
                min_width=self.tile_w if s > 1 else 0,
                min_factor=s,
                buffer=spare.pop() if spare else None,
                strict=True,  # a libjpeg warning (corrupt or short data) is an error
            )
        except ValueError as err:
            raise self._damaged(where, one_line(err)) from err
        if px.shape != (self.tile_h, self.tile_w, 3):
            size = f"{px.shape[1]} x {px.shape[0]}"
            raise self._damaged(where, f"tile {index} decodes to {size} px")
        cache[index] = px
        with self._lock:
            self.decoded += 1
        return px

    def read(self, xy: np.ndarray, size: int, out: np.ndarray, origins_level0: np.ndarray) -> None:
        """Patches of `size` px (at this scale) with top-left corners `xy` (px of the level at
        this scale) into `out[i]`; px beyond the level's edge are white."""
        tw, th = self.tile_w, self.tile_h
        last_col, last_row = self.level.across - 1, self.level.down - 1
        xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        if len(xy):
            self._forget_rows_above(int(xy[:, 1].min()) // th)
        for i, (x, y) in enumerate(xy.tolist()):
            dst = out[i]
            where = tuple(int(v) for v in origins_level0[i])
            x1, y1 = min(x + size, self.valid_w), min(y + size, self.valid_h)
            for row in range(y // th, min((y + size - 1) // th, last_row) + 1):
                ty0, ty1 = max(y, row * th), min(y1, (row + 1) * th)
                if ty1 <= ty0:
                    continue
                for col in range(x // tw, min((x + size - 1) // tw, last_col) + 1):
                    tx0, tx1 = max(x, col * tw), min(x1, (col + 1) * tw)
                    if tx1 <= tx0:
                        continue
                    tile = self.tile(col, row, where)
                    dst[ty0 - y : ty1 - y, tx0 - x : tx1 - x] = tile[
                        ty0 - row * th : ty1 - row * th, tx0 - col * tw : tx1 - col * tw
                    ]
            if x1 < x + size:
                dst[:, max(0, x1 - x) :] = 255
            if y1 < y + size:
                dst[max(0, y1 - y) :] = 255

    def _forget_rows_above(self, row: int) -> None:
        """Move this thread's tiles of rows above `row` to its spare buffers."""
        cache, spare = self._caches()
        for index in [i for i in cache if i // self.level.across < row]:
            spare.append(cache.pop(index))

    def encoded(self, xy: np.ndarray, size: int, origins_level0: np.ndarray) -> EncodedTiles:
        """The chunk's tiles as JPEG streams, each once, and where each patch lies in them (for
        decoding on a GPU; full-size tiles only: the GPU decoder has no DCT scaling)."""
        import torch

        if self.scale != 1:
            raise ValueError("encoded tiles are for full-size decoding (scale 1)")
        xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        tw, th = self.tile_w, self.tile_h
        across, down = self.level.across, self.level.down
        kx, ky = (size + tw - 2) // tw + 1, (size + th - 2) // th + 1
        cols = xy[:, :1] // tw + np.arange(kx)  # (n, kx)
        rows = xy[:, 1:] // th + np.arange(ky)  # (n, ky)
        inside = (rows[:, :, None] < down) & (cols[:, None, :] < across)
        index = np.where(inside, rows[:, :, None] * across + cols[:, None, :], -1)
        unique = np.unique(index[index >= 0])
        grid = np.where(index >= 0, np.searchsorted(unique, index), -1)
        streams = []
        for t in unique.tolist():
            patch = int(np.argmax((index == t).any(axis=(1, 2))))  # a patch that needs it
            where = tuple(int(v) for v in origins_level0[patch])
            streams.append(torch.frombuffer(bytearray(self._bytes(t, where)), dtype=torch.uint8))
        offsets = xy - np.stack([cols[:, 0] * tw, rows[:, 0] * th], axis=1)
        valid = np.stack(
            [np.clip(self.valid_w - xy[:, 0], 0, size), np.clip(self.valid_h - xy[:, 1], 0, size)],
            axis=1,
        )
        return EncodedTiles(
            streams,
            torch.from_numpy(grid),
            torch.from_numpy(offsets),
            torch.from_numpy(valid),
            size,
            np.asarray(origins_level0, dtype=np.int64).reshape(-1, 2),
        )
