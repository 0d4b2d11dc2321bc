"""Patch readers side by side: OpenSlide's read_region against the JPEG tile reader, in patches
per CPU-second, then the whole pipeline against the backbone alone with the automatic reader.

In one run:
1. Decoders (the measurement behind the choice of library): CPU time per tile of each JPEG
   decoder that is installed, on the tissue tiles of a generated demo SVS, at full size and at
   1/2, and whether it refuses a tile whose data is cut short (OpenSlide does).
2. Readers: patches per CPU-second of the process (both readers decode in the calling thread),
   reading each tile set in the pipeline's order and chunks from a fresh reader, alternating
   the two readers `--repeats` times, on (a) a 0.5 µm/px JPEG SVS at 224 px, (b) a 0.25 µm/px
   SVS read at 0.5 µm/px (448 px shrunk to 224), (c) a generic tiled TIFF. Median ratio
   reported. tiffslide and fastslide, where installed, read the same patches for reference.
3. Pipeline: the CPU time per patch the pipeline spends around the backbone (a free backbone,
   both readers, on the (a) and (c) slides) against each model's forward CPU time per patch,
   which bounds the pipeline / forward-only ratio; then benchmarks/features.py's measured
   pipeline / forward-only ratio (reader auto), per model.

Freed memory is retained as in `srmil features` (srmil.device.retain_freed_memory), for both
readers. CPU time, not wall time, so other load on a shared machine matters less.

    python benchmarks/readers.py                              # all three, resnet18 + resnet50
    python benchmarks/readers.py --models                     # decoders and readers only
    python benchmarks/readers.py --no-ratio                   # all but features.py's ratio
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import features as bench  # a sibling: benchmarks/ is on sys.path when run as a script
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESNET_CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
}

from srmil.cohort.samples import read_sample_sheet  # noqa: E402
from srmil.demo.write import write_demo  # noqa: E402
from srmil.device import retain_freed_memory  # noqa: E402
from srmil.features.backbones import Backbone, BackboneSpec, load_backbone  # noqa: E402
from srmil.features.extract import (  # noqa: E402
    THREAD_CHUNK,
    ChunkDataset,
    extract_features,
    plan_batches,
    split_chunks,
)
from srmil.features.readers import choose_reader  # noqa: E402
from srmil.settings import TileSettings  # noqa: E402
from srmil.wsi.segment import segment_slide  # noqa: E402
from srmil.wsi.slide import open_slide  # noqa: E402
from srmil.wsi.tiling import read_tiles, tile_slide  # noqa: E402


def tissue_tiles(slide: str, tiles_json: Path) -> tuple[list[bytes], Any]:
    """The JPEG streams of the level-0 tiles the tile set touches, and the level."""
    coords, _, plan = read_tiles(tiles_json)
    level = choose_reader(slide, open_slide(slide), coords, plan).level
    size = int(plan.read_px)
    ids = sorted(
        {
            row * level.across + col
            for x, y in coords.tolist()
            for col in range(x // level.tile_w, min(level.across, -(-(x + size) // level.tile_w)))
            for row in range(y // level.tile_h, min(level.down, -(-(y + size) // level.tile_h)))
        }
    )
    with open(slide, "rb") as f:
        raw = []
        for t in ids:
            f.seek(int(level.offsets[t]))
            raw.append(f.read(int(level.counts[t])))
    return [level.stream(b) for b in raw], level


def decoders(streams: list[bytes], level, slide: str, rounds: int) -> list[dict[str, Any]]:
    """Tiles per CPU-second of each installed decoder (median of interleaved rounds), and
    whether a stream cut in half is refused (an error) or decoded into garbage silently."""
    import cv2
    import torch

    # One thread each (CPU time of the decode itself); restored for the pipeline after.
    threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        return _decoders(streams, level, slide, rounds)
    finally:
        cv2.setNumThreads(threads[0])
        torch.set_num_threads(threads[1])


def _decoders(streams: list[bytes], level, slide: str, rounds: int) -> list[dict[str, Any]]:
    candidates: dict[str, Any] = {}
    th, tw = level.tile_h, level.tile_w

    def add(name: str, module: str, make) -> None:
        try:
            candidates[name] = make(importlib.import_module(module))
        except ImportError:
            print(f"{name}: not installed, skipped", flush=True)

    add("simplejpeg", "simplejpeg", lambda m: lambda b: m.decode_jpeg(b, "rgb", strict=True))
    add(
        "simplejpeg 1/2 (DCT scaling)",
        "simplejpeg",
        lambda m: (
            lambda b: m.decode_jpeg(
                b, "rgb", min_height=th // 2, min_width=tw // 2, min_factor=2, strict=True
            )
        ),
    )
    add("imagecodecs", "imagecodecs", lambda m: lambda b: m.jpeg8_decode(b))
    out = np.empty((th, tw, 3), np.uint8)
    add("imagecodecs, out= buffer", "imagecodecs", lambda m: lambda b: m.jpeg8_decode(b, out=out))
    add(
        "OpenCV imdecode",
        "cv2",
        lambda m: lambda b: m.imdecode(np.frombuffer(b, np.uint8), m.IMREAD_COLOR_RGB),
    )
    add(
        "OpenCV imdecode 1/2",
        "cv2",
        lambda m: lambda b: m.imdecode(np.frombuffer(b, np.uint8), m.IMREAD_REDUCED_COLOR_2),
    )

    def torchvision_decode(m):
        import torch

        return lambda b: m.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))

    add("torchvision.io.decode_jpeg (CPU)", "torchvision.io", torchvision_decode)

    def pillow(m, draft: bool = False):
        def decode(b):
            image = m.open(io.BytesIO(b))
            if draft:
                image.draft("RGB", (tw // 2, th // 2))
            return np.asarray(image.convert("RGB"))

        return decode

    add("Pillow", "PIL.Image", pillow)
    add("Pillow 1/2 (draft)", "PIL.Image", lambda m: pillow(m, True))
    import openslide

    handle = openslide.OpenSlide(slide)
    positions = [(t % level.across * tw, t // level.across * th) for t in range(len(streams))]
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    rates["OpenSlide read_region of the tile"] = []
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.thread_time()
            for b in streams:
                fn(b)
            rates[name].append(len(streams) / (time.thread_time() - start))
        start = time.thread_time()
        for xy in positions:
            handle.read_region(xy, 0, (tw, th))
        seconds = time.thread_time() - start
        rates["OpenSlide read_region of the tile"].append(len(streams) / seconds)
    rows = []
    for name, values in rates.items():
        refuses = "yes (libjpeg warnings are errors)" if name.startswith("OpenSlide") else None
        if refuses is None:
            try:
                result = candidates[name](streams[0][: len(streams[0]) // 2])
                refuses = "no (decodes)" if result is not None else "yes (returns None)"
            except Exception as err:  # noqa: BLE001 - any error is a refusal
                refuses = f"yes ({type(err).__name__})"
        rows.append(
            {
                "decoder": name,
                "tiles_per_cpu_s": statistics.median(values),
                "refuses_cut_tile": refuses,
            }
        )
        print(
            f"{name:40s} {statistics.median(values):7.0f} tiles/CPU-s   refuses a cut "
            f"tile: {refuses}",
            flush=True,
        )
    return rows


def read_cpu_s(slide: str, coords, plan, chunks, reader) -> float:
    """Process CPU seconds to read every patch of a tile set, from a fresh reader (both of
    srmil's readers decode in the calling thread; other readers may use threads of their own)."""
    data = ChunkDataset(slide, coords, plan, chunks, reader=reader)
    start = time.process_time()
    for i in range(len(data)):
        data[i]
    return time.process_time() - start


def other_reader_cpu_s(name: str, slide: str, coords, plan) -> float | None:
    """The same patches through another whole-slide reader where installed (tiffslide,
    fastslide): its read_region at the plan's level and size, INTER_AREA to patch_px."""
    import cv2

    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    level, read_px, patch_px = int(plan.level), int(plan.read_px), int(plan.patch_px)
    if name == "fastslide":
        handle = module.FastSlide.from_file_path(slide, cache=96 << 20)
        ds = handle.level_downsamples[level]

        def read(x: int, y: int) -> np.ndarray:
            xy = (round(x / ds), round(y / ds))  # fastslide takes level coordinates
            return handle.read_region(xy, level, (read_px, read_px)).numpy()[..., :3]
    else:
        handle = module.TiffSlide(slide)

        def read(x: int, y: int) -> np.ndarray:
            return np.asarray(handle.read_region((x, y), level, (read_px, read_px)))[..., :3]

    start = time.process_time()
    for x, y in coords.tolist():
        rgb = read(x, y)
        if read_px != patch_px:
            cv2.resize(rgb, (patch_px, patch_px), interpolation=cv2.INTER_AREA)
    return time.process_time() - start


def compare_readers(case: str, slide: str, tiles_json: Path, repeats: int) -> dict[str, Any]:
    coords, _, plan = read_tiles(tiles_json)
    choice = choose_reader(slide, open_slide(slide), coords, plan)
    chunks = split_chunks(plan_batches(coords, plan, 64, 1), THREAD_CHUNK)
    read_cpu_s(slide, coords, plan, chunks, choice)  # page cache, allocator
    rates: dict[str, list[float]] = {"openslide": [], "jpeg-tiles": []}
    others: dict[str, list[float]] = {"tiffslide": [], "fastslide": []}
    for r in range(repeats):
        order = ("openslide", "jpeg-tiles") if r % 2 == 0 else ("jpeg-tiles", "openslide")
        for name in order:
            reader = choice if name == "jpeg-tiles" else None
            seconds = read_cpu_s(slide, coords, plan, chunks, reader)
            rates[name].append(len(coords) / seconds)
        for name, values in others.items():
            seconds = other_reader_cpu_s(name, slide, coords, plan)
            if seconds:
                values.append(len(coords) / seconds)
    ratios = [t / o for t, o in zip(rates["jpeg-tiles"], rates["openslide"], strict=True)]
    row = {
        "case": case,
        "slide": Path(slide).name,
        "patches": len(coords),
        "read_px": plan.read_px,
        "patch_px": plan.patch_px,
        "dct_scale": choice.dct_scale,
        "openslide_per_cpu_s": statistics.median(rates["openslide"]),
        "tiles_per_cpu_s": statistics.median(rates["jpeg-tiles"]),
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "others_per_cpu_s": {k: statistics.median(v) for k, v in others.items() if v},
    }
    print(
        f"{case}: {len(coords)} patches, read {plan.read_px} -> {plan.patch_px} px, "
        f"DCT 1/{choice.dct_scale}: OpenSlide {row['openslide_per_cpu_s']:.0f}, tile reader "
        f"{row['tiles_per_cpu_s']:.0f} patches/CPU-s, ratio {row['ratio_median']:.2f} "
        f"({', '.join(f'{x:.2f}' for x in ratios)})"
        + "".join(f"; {k} {v:.0f}" for k, v in row["others_per_cpu_s"].items()),
        flush=True,
    )
    return row


class MeanColour(torch.nn.Module):
    """A backbone that costs nothing: the pipeline's own CPU time is all that is left."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def pipeline_overhead(tile_sets, work: Path, repeats: int, models: list[str]) -> dict[str, Any]:
    """Process CPU ms per patch of the whole pipeline (read, preprocess, store) around a free
    backbone, per reader, and each model's forward CPU ms per patch (random tensors, batch
    32): forward / (forward + overhead) is the pipeline ratio's ceiling, measured in CPU time
    (load from other processes changes it less than wall-clock ratios)."""
    free = Backbone(MeanColour(), BackboneSpec("mean-colour"), 3, RESNET_CONFIG, "none")
    patches = sum(len(read_tiles(t)[0]) for _, t in tile_sets)
    ms: dict[str, list[float]] = {"openslide": [], "auto": []}
    # One torch thread: around a free backbone OpenMP's spin-waits between the small ops would
    # be most of the CPU time; beside a real forward pass they are a small part of its own.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(repeats + 1):  # the first round warms up
            for reader in ("openslide", "auto") if r % 2 == 0 else ("auto", "openslide"):
                start = time.process_time()
                for slide, tiles in tile_sets:
                    extract_features(
                        slide,
                        tiles,
                        work / "free.zarr",
                        free,
                        "free",
                        batch_size=32,
                        progress=False,
                        reader=reader,
                    )
                if r:
                    ms[reader].append(1e3 * (time.process_time() - start) / patches)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {
        "patches": patches,
        "overhead_ms": {k: statistics.median(v) for k, v in ms.items()},
    }
    print(
        f"pipeline CPU per patch around a free backbone ({patches} patches): "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in out["overhead_ms"].items()),
        flush=True,
    )
    for name in models:
        backbone = load_backbone({"model": name, "pretrained": False}, seed=0)
        bench.forward_only(backbone, 64, 32, torch.device("cpu"), "none")  # warm-up
        cpu = [
            bench.forward_only(backbone, 256, 32, torch.device("cpu"), "none")[1]
            for _ in range(repeats)
        ]
        forward = 1e3 * statistics.median(cpu) / 256
        out[name] = {
            "forward_ms": forward,
            "ceiling": {k: forward / (forward + v) for k, v in out["overhead_ms"].items()},
        }
        print(
            f"{name}: forward {forward:.1f} ms CPU per patch; ceiling of the pipeline ratio "
            + ", ".join(f"{k} {v:.3f}" for k, v in out[name]["ceiling"].items()),
            flush=True,
        )
    return out


def prepare(work: Path, name: str, mpp: float, width: int, height: int, target: float):
    """Two demo slides (an SVS and a tiled TIFF) at `mpp`, segmented and tiled at `target`."""
    sheet = write_demo(work / name, 2, width_px=width, height_px=height, mpp=mpp, progress=False)
    out = {}
    for row in read_sample_sheet(sheet).itertuples():
        stem = work / f"{name}_{row.slide_id}"
        geojson, tiles = stem.with_suffix(".geojson"), stem.with_suffix(".json")
        segment_slide(row.path, geojson, stem.with_suffix(".png"))
        tile_slide(row.path, geojson, tiles, params=TileSettings(target_mpp=target))
        out[Path(row.path).suffix] = (row.path, tiles)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--height", type=int, default=6144)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", nargs="*", default=["resnet18", "resnet50"])
    p.add_argument(
        "--pipeline-args",
        default="--slides 2 --width 8192 --height 6144 --max-patches 200 --repeats 5",
        help="benchmarks/features.py arguments",
    )
    p.add_argument("--no-ratio", action="store_true", help="skip benchmarks/features.py's run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    retain_freed_memory()  # as `srmil features` runs, for both readers
    result: dict[str, Any] = {"python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="srmil-readers-") as tmp:
        work = Path(tmp)
        half = prepare(work, "mpp050", 0.5, args.width, args.height, 0.5)
        quarter = prepare(work, "mpp025", 0.25, args.width, args.height, 0.5)
        streams, level = tissue_tiles(*half[".svs"])
        print(f"decoders: {len(streams)} tissue tiles of {half['.svs'][0]}", flush=True)
        result["decoders"] = decoders(streams, level, half[".svs"][0], args.repeats)
        result["readers"] = [
            compare_readers("(a) 0.5 µm/px SVS, 224 px", *half[".svs"], args.repeats),
            compare_readers("(b) 0.25 µm/px SVS read at 0.5 µm/px", *quarter[".svs"], args.repeats),
            compare_readers("(c) generic tiled TIFF, 224 px", *half[".tif"], args.repeats),
        ]
        if args.models:
            sets = [half[".svs"], half[".tif"]]
            result["overhead"] = pipeline_overhead(sets, work, args.repeats, args.models)
    if args.models and not args.no_ratio:
        result["pipeline"] = bench.main(
            ["--models", *args.models, "--reader", "auto", *args.pipeline_args.split()]
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
