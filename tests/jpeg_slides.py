"""JPEG-tiled slides the demo generator does not write, made with tifffile from tiles encoded
here: shared JPEGTables (abbreviated tile streams, as Aperio and most scanners store them),
Aperio's RGB-encoded JPEG whose stream does not say it is RGB, odd sizes with partial edge
tiles, and a pyramid. OpenSlide reads each; tests compare the tile reader with it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import tifffile

# JPEG markers: define quantisation / Huffman tables, start of frame (baseline), start of scan.
DQT, DHT, SOF0, SOS = 0xDB, 0xC4, 0xC0, 0xDA


def segments(stream: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """(marker, whole segment) up to the start of scan, and the rest (scan data and EOI)."""
    out, pos = [], 2
    while True:
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if marker == SOS:
            return out, stream[pos:]
        out.append((marker, stream[pos : pos + 2 + length]))
        pos += 2 + length


def aperio_rgb(frame: bytes, scan: bytes) -> tuple[bytes, bytes]:
    """Start of frame and scan with component ids 0, 1, 2 (not 'R', 'G', 'B'): libjpeg then
    takes the stream for YCbCr unless told otherwise, as with Aperio's RGB JPEG tiles."""
    frame, scan = bytearray(frame), bytearray(scan)
    for c in range(frame[9]):
        frame[10 + 3 * c] = c
    for c in range(scan[4]):
        scan[5 + 2 * c] = c
    return bytes(frame), bytes(scan)


def encode_tiles(
    level: np.ndarray, tile: int, colorspace: str, quality: int = 80
) -> tuple[list[bytes], bytes]:
    """Abbreviated JPEG streams of the level's tiles (row-major, edge tiles padded by repeating
    the last row and column) and the tables they share (SOI, DQT, DHT, EOI)."""
    h, w = level.shape[:2]
    ph, pw = -(-h // tile) * tile, -(-w // tile) * tile
    padded = np.pad(level, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    kwargs = {"colorspace": "RGB", "outcolorspace": colorspace}
    if colorspace == "YCbCr":
        kwargs["subsampling"] = "420"
    tiles, tables = [], None
    for y in range(0, ph, tile):
        for x in range(0, pw, tile):
            stream = imagecodecs.jpeg8_encode(padded[y : y + tile, x : x + tile], quality, **kwargs)
            parts, scan = segments(bytes(stream))
            shared = b"".join(s for m, s in parts if m in (DQT, DHT))
            # Tables go to the level's JPEGTables; JFIF and Adobe markers are dropped.
            kept = [(m, s) for m, s in parts if m not in (DQT, DHT) and not 0xE0 <= m <= 0xEF]
            rest = [s for _, s in kept]
            if colorspace == "RGB":
                frame = next(i for i, (m, _) in enumerate(kept) if m == SOF0)
                rest[frame], scan = aperio_rgb(rest[frame], scan)
            tables = tables or shared
            assert shared == tables, "tiles do not share their tables"
            tiles.append(b"\xff\xd8" + b"".join(rest) + scan)
    return tiles, b"\xff\xd8" + tables + b"\xff\xd9"


def write_jpeg_slide(
    path: str | Path,
    level0: np.ndarray,
    colorspace: str = "RGB",
    tile: int = 240,
    aperio: bool = True,
    mpp: float = 0.5,
    n_levels: int = 2,
) -> Path:
    """An Aperio-style SVS (or, with aperio=False, a generic tiled TIFF) whose levels (factor
    4, INTER_AREA) are JPEG tiles with shared tables; colorspace RGB is Aperio's convention
    (photometric RGB, RGB-encoded tiles, no marker saying so), YCbCr the usual one."""
    path = Path(path)
    levels = [level0]
    for _ in range(n_levels - 1):
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // 4, h // 4), interpolation=cv2.INTER_AREA))
    h0, w0 = level0.shape[:2]
    head = f"Aperio Image Library v12.0.0 \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile})"
    photometric = "rgb" if colorspace == "RGB" else "ycbcr"
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            h, w = level.shape[:2]
            streams, tables = encode_tiles(level, tile, colorspace)
            options = {
                "shape": level.shape,
                "dtype": np.uint8,
                "tile": (tile, tile),
                "compression": "jpeg",
                "photometric": photometric,
                "jpegtables": tables,
                "metadata": None,
            }
            if colorspace == "YCbCr":
                options["subsampling"] = (2, 2)
            else:  # tifffile would name the tiles YCbCr otherwise
                options["subsampling"] = (1, 1)
                options["compressionargs"] = {"outcolorspace": "RGB"}
            if aperio:
                desc = f"{head} -> {w}x{h} " if i else f"{head} "
                options["description"] = desc + f"JPEG/RGB Q=80|AppMag = 20|MPP = {mpp:g}"
            else:
                options["subfiletype"] = 1 if i else 0
                px_per_cm = 1e4 / mpp * w / w0
                options["resolution"] = (px_per_cm, px_per_cm)
                options["resolutionunit"] = "CENTIMETER"
            tif.write(iter(streams), **options)
            if aperio and i == 0:  # Aperio's second page: a stripped thumbnail
                thumb = cv2.resize(level0, (max(1, w0 // 8), max(1, h0 // 8)))
                tif.write(thumb, description=f"{head} -> thumbnail", metadata=None)
    return path


def damage_tile(src: Path, dst: Path, index: int) -> tuple[int, int]:
    """Overwrite the second half of one level-0 tile's entropy-coded data with noise: the file
    still opens, and that tile cannot be decoded. Returns the tile's (column, row)."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        across = -(-page.imagewidth // page.tilewidth)
    noise = np.random.default_rng(1).integers(0, 256, count - count // 2, dtype=np.uint8)
    noise = noise.tobytes()
    data[offset + count // 2 : offset + count] = noise
    dst.write_bytes(bytes(data))
    return index % across, index // across
