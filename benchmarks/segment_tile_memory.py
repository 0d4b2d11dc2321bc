"""Peak memory (RSS) of segment + tile by physical slide size, on synthetic slide objects.

A full-size slide (100 x 75 mm at 0.25 µm/px is 400,000 x 300,000 px) takes long to generate
and gigabytes to store, and memory only depends on the view and grid sizes, not on the pixels.
So each size runs in a fresh process on a stand-in for an OpenSlide object: a pyramid with
downsamples 1, 4, 16, 64, 256 whose `read_region` draws an elliptical tissue piece with a hole
on glass, chunk by chunk as OpenSlide would return it. `segment_slide` and `tile_slide` run
unchanged on it (default settings), writing their GeoJSON, tile set and QC images.

    python benchmarks/segment_tile_memory.py                   # 8x6 25x20 50x25 100x75 mm
    python benchmarks/segment_tile_memory.py --sizes 250x200   # mm at --mpp µm/px

Prints, per size, the process's peak RSS after the imports, after segmentation and after
tiling (getrusage high-water marks, MiB: the last is the peak of both steps), and the seconds
taken. Figures and their reading: docs/segmentation.md, section Memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOWNSAMPLES = (1.0, 4.0, 16.0, 64.0, 256.0)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SyntheticSlide:
    """Enough of openslide.OpenSlide for srmil: an ellipse of pink tissue with a round hole."""

    def __init__(self, width: int, height: int, mpp: float) -> None:
        import numpy as np

        self.np = np
        self.dimensions = (width, height)
        self.level_downsamples = DOWNSAMPLES
        self.level_dimensions = tuple((int(width // d), int(height // d)) for d in DOWNSAMPLES)
        self.level_count = len(DOWNSAMPLES)
        self.properties = {"openslide.mpp-x": str(mpp), "openslide.mpp-y": str(mpp)}

    def __enter__(self) -> SyntheticSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        from PIL import Image

        np = self.np
        ds, (w, h) = DOWNSAMPLES[level], size
        width, height = self.dimensions
        # Relative coordinates as a row and a column: broadcasting keeps temporaries small.
        x = ((location[0] + (np.arange(w) + 0.5) * ds) / width)[None, :]
        y = ((location[1] + (np.arange(h) + 0.5) * ds) / height)[:, None]
        tissue = ((x - 0.5) / 0.4) ** 2 + ((y - 0.5) / 0.35) ** 2 < 1
        tissue &= ((x - 0.4) / 0.03) ** 2 + ((y - 0.5) / 0.03) ** 2 >= 1
        rgba = np.full((h, w, 4), 255, np.uint8)
        rgba[tissue, :3] = (215, 140, 185)
        return Image.fromarray(rgba, "RGBA")


def measure_one(width_mm: float, height_mm: float, mpp: float) -> dict:
    """Segment and tile one synthetic slide in this process; peak RSS at each step."""
    import srmil.wsi.segment as segment
    import srmil.wsi.tiling as tiling

    width, height = round(width_mm * 1000 / mpp), round(height_mm * 1000 / mpp)
    slide = SyntheticSlide(width, height, mpp)
    segment.open_slide = tiling.open_slide = lambda path: slide
    after_import = peak_mib()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        summary = segment.segment_slide("synthetic.svs", out / "s.geojson", out / "s.png")
        after_segment = peak_mib()
        plan = tiling.tile_slide(
            "synthetic.svs",
            out / "s.geojson",
            out / "s.tiles.json",
            out_qc_png=out / "t.png",
            seg_qc_png=out / "s.png",
        )
    return {
        "size_mm": f"{width_mm:g}x{height_mm:g}",
        "size_px": f"{width}x{height}",
        "view_px": f"{round(width / summary['seg_downsample'])}x"
        f"{round(height / summary['seg_downsample'])}",
        "n_pieces": summary["n_pieces"],
        "n_tiles": plan.n_tiles,
        "rss_import_mib": round(after_import),
        "rss_segment_mib": round(after_segment),
        "rss_tile_mib": round(peak_mib()),
        "seconds": round(time.perf_counter() - t, 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["8x6", "25x20", "50x25", "100x75"], help="mm, WxH"
    )
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        w, h = (float(v) for v in args.one.split("x"))
        print(json.dumps(measure_one(w, h, args.mpp)))
        return []
    rows = []
    print(f"{'size mm':>9} {'level-0 px':>15} {'view px':>10} {'tiles':>8} "
          f"{'import':>7} {'segment':>8} {'tile':>6} {'s':>5}   (peak RSS, MiB)")
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", size, "--mpp", str(args.mpp)]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        rows.append(row)
        print(
            f"{row['size_mm']:>9} {row['size_px']:>15} {row['view_px']:>10} "
            f"{row['n_tiles']:>8} {row['rss_import_mib']:>7} {row['rss_segment_mib']:>8} "
            f"{row['rss_tile_mib']:>6} {row['seconds']:>5}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
