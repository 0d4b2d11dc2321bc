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
taken.

    python benchmarks/segment_tile_memory.py --file 100000x80000 --work /tmp/large

writes the same drawing at that size (level-0 px) as a real pyramidal TIFF (JPEG tiles, levels
1/4/16/64/256, µm/px in its resolution tags; a few minutes and about 0.3 GB the first time,
reused after) and runs `srmil segment` and `srmil tile` on it as separate processes, as the
workflow's jobs do, printing each process's own peak RSS (from wait4) and seconds.
Figures and their reading: docs/segmentation.md, section Memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DOWNSAMPLES = (1.0, 4.0, 16.0, 64.0, 256.0)
TILE_PX = 256


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

    def tissue(self, x0: float, y0: float, ds: float, w: int, h: int):
        """Tissue at the centres of w x h px of size ds level-0 px from (x0, y0), as a mask."""
        np = self.np
        width, height = self.dimensions
        # Relative coordinates as a row and a column: broadcasting keeps temporaries small.
        x = ((x0 + (np.arange(w) + 0.5) * ds) / width)[None, :]
        y = ((y0 + (np.arange(h) + 0.5) * ds) / height)[:, None]
        tissue = ((x - 0.5) / 0.4) ** 2 + ((y - 0.5) / 0.35) ** 2 < 1
        return tissue & (((x - 0.4) / 0.03) ** 2 + ((y - 0.5) / 0.03) ** 2 >= 1)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        from PIL import Image

        tissue = self.tissue(*location, DOWNSAMPLES[level], *size)
        rgba = self.np.full((size[1], size[0], 4), 255, self.np.uint8)
        rgba[tissue, :3] = (215, 140, 185)
        return Image.fromarray(rgba, "RGBA")

    def tiles(self, level: int) -> Iterator:
        """The level's RGB tiles, row-major, as a tiled TIFF holds them. A tile whose 16 x 16
        probe is all glass or all tissue is taken as flat (the shapes are smooth and large)."""
        ds = DOWNSAMPLES[level]
        w, h = self.level_dimensions[level]
        flat = {value: self.np.full((TILE_PX, TILE_PX, 3), colour, self.np.uint8)
                for value, colour in ((False, 255), (True, (215, 140, 185)))}
        for y in range(0, h, TILE_PX):
            for x in range(0, w, TILE_PX):
                probe = self.tissue(x * ds, y * ds, ds * TILE_PX / 16, 16, 16)
                if probe.all() or not probe.any():
                    yield flat[bool(probe[0, 0])]
                else:
                    yield self.np.asarray(self.read_region(
                        (round(x * ds), round(y * ds)), level, (TILE_PX, TILE_PX)))[..., :3]


def write_slide_file(path: Path, slide: SyntheticSlide, mpp: float) -> None:
    """`slide` as a generic pyramidal TIFF that OpenSlide reads (the demo's TIFF options)."""
    import numpy as np
    import tifffile

    from srmil.demo.write import TIFF_OPTIONS
    from srmil.store import atomic_path

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level, ds in enumerate(DOWNSAMPLES):
            w, h = slide.level_dimensions[level]
            tif.write(slide.tiles(level), shape=(h, w, 3), dtype=np.uint8,
                      tile=(TILE_PX, TILE_PX), subfiletype=1 if level else 0,
                      resolution=(1e4 / (mpp * ds),) * 2, resolutionunit="CENTIMETER",
                      **TIFF_OPTIONS)


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one process, its own high-water mark from wait4."""
    t = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        pid = subprocess.Popen(cmd, stdout=devnull, stderr=subprocess.PIPE).pid
    _, status, usage = os.wait4(pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed (status {status})")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def measure_file(width: int, height: int, mpp: float, work: Path) -> dict:
    """Segment and tile a real slide file of that size with srmil's commands, as the jobs do."""
    slide_path = work / f"synthetic_{width}x{height}.tif"
    t = time.perf_counter()
    if not slide_path.exists():
        write_slide_file(slide_path, SyntheticSlide(width, height, mpp), mpp)
    written = time.perf_counter() - t
    srmil = [sys.executable, "-m", "srmil.cli"]
    out = work / f"out_{width}x{height}"
    geojson, seg_qc = out / "s.geojson", out / "s.qc.png"
    seg_s, seg_mib = run_measured(srmil + ["segment", "--slide", str(slide_path), "--out",
                                           str(geojson), "--qc", str(seg_qc)])
    tile_s, tile_mib = run_measured(srmil + [
        "tile", "--slide", str(slide_path), "--tissue", str(geojson), "--seg-qc", str(seg_qc),
        "--qc", str(out / "t.qc.png"), "--out", str(out / "s.tiles.json")])
    n_tiles = json.loads((out / "s.tiles.json").read_text())["plan"]["n_tiles"]
    return {"size_px": f"{width}x{height}", "file_gb": round(slide_path.stat().st_size / 1e9, 2),
            "write_s": round(written, 1), "n_tiles": n_tiles,
            "segment_mib": round(seg_mib), "segment_s": round(seg_s, 1),
            "tile_mib": round(tile_mib), "tile_s": round(tile_s, 1)}


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
    parser.add_argument("--file", default=None, metavar="WxH",
                        help="a real TIFF of this many level-0 px instead (see above)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/memory"),
                        help="where --file writes the slide (reused) and the outputs")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.file:
        w, h = (int(v) for v in args.file.split("x"))
        row = measure_file(w, h, args.mpp, args.work)
        print(json.dumps(row))
        return [row]
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
