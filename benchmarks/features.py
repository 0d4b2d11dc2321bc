"""Feature extraction: the backbone's forward-only throughput vs the whole pipeline's.

In one run, per model: forward passes on random tensors at the extraction batch size (the
physical limit), and `srmil.features.extract.extract_features` on generated demo slides (OpenSlide
reads, preprocessing, forward, Zarr write); the ratio says how much of the forward speed the
pipeline keeps. The two are measured alternately slide by slide, `--repeats` times, and the
median ratio is reported (per repeat from summed times, and over adjacent slide pairs), so
load from other processes on a shared machine hits both sides. The ratio of process CPU time
(forward / pipeline) is reported beside it: the pipeline's extra work, less sensitive to load
(reader processes, used on GPUs, are not counted in it). Both sides run with the allocator
setting `srmil features` uses (freed memory retained, srmil.device.retain_freed_memory), or
both without it (`--malloc-defaults`).

    python benchmarks/features.py --models resnet18 resnet50          # CPU, the default
    python benchmarks/features.py --reader openslide                  # patches through OpenSlide
    python benchmarks/features.py --device cuda --amp bf16 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from srmil.cohort.samples import read_sample_sheet
from srmil.demo.write import write_demo
from srmil.device import retain_freed_memory
from srmil.features.backbones import load_backbone
from srmil.features.extract import (
    ChunkDataset,
    amp_dtype,
    extract_features,
    iterate_chunks,
    plan_batches,
    resolve_device,
    resolve_workers,
    split_chunks,
)
from srmil.wsi.segment import segment_slide
from srmil.wsi.tiling import read_tiles, tile_slide, write_tiles


def prepare_slides(
    work: Path,
    slides_dir: Path | None,
    n_slides: int,
    width: int,
    height: int,
    max_patches: int | None,
) -> list[tuple[str, Path, int]]:
    """(slide, tiles JSON, n patches) per slide: generated demo slides (or those of an existing
    demo sheet), segmented and tiled with the default settings."""
    if slides_dir is None:
        sheet = write_demo(
            work / "cohort", n_slides, seed=0, width_px=width, height_px=height, progress=False
        )
    else:
        sheet = slides_dir / "samples.csv"
    out = []
    for row in read_sample_sheet(sheet).itertuples():
        geojson, tiles = work / f"{row.slide_id}.geojson", work / f"{row.slide_id}.json"
        segment_slide(row.path, geojson, work / f"{row.slide_id}.png")
        tile_slide(row.path, geojson, tiles)
        coords, fraction, plan = read_tiles(tiles)
        if max_patches and len(coords) > max_patches:
            write_tiles(tiles, coords[:max_patches], fraction[:max_patches], plan)
            coords = coords[:max_patches]
        out.append((row.path, tiles, len(coords)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(backbone, n: int, batch_size: int, device: torch.device, amp: str):
    """(wall s, process CPU s) of the model alone on n random patches already on the device,
    channels-last, in batches of `batch_size`."""
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    size = backbone.data_config["input_size"]
    x = torch.randn(batch_size, *size, device=device).contiguous(memory_format=torch.channels_last)
    dtype = amp_dtype(device, amp)
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        for b in sizes:
            model(x[:b]).float()
        sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def pipeline(backbone, slide: tuple[str, Path, int], out: Path, args):
    """(wall s, process CPU s) of one whole extract_features call (reads to Zarr store)."""
    wall, cpu = time.perf_counter(), time.process_time()
    extract_features(
        slide[0],
        slide[1],
        out,
        backbone,
        "bench",
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        amp=args.amp,
        dtype="float16",
        read_block=args.read_block,
        progress=False,
        reader=getattr(args, "reader", "auto"),
    )
    return time.perf_counter() - wall, time.process_time() - cpu


def reading_only(slides, batch_size: int, workers: int, block: int, device: torch.device) -> float:
    """Patches/s of the readers alone (no model): the ceiling the pipeline can reach."""
    total, start = 0, time.perf_counter()
    for slide, tiles, _ in slides:
        coords, _, plan = read_tiles(tiles)
        chunks = split_chunks(plan_batches(coords, plan, batch_size, block))
        data = ChunkDataset(slide, coords, plan, chunks, block=block)
        for x, _ in iterate_chunks(data, workers, pin_memory=device.type == "cuda"):
            total += len(x)
    return total / (time.perf_counter() - start)


def bench_model(name: str, slides, work: Path, args) -> dict[str, Any]:
    """Per repeat: for each slide, the pipeline and forward-only on as many patches, in
    alternating order; throughputs and their ratio from the summed times."""
    device = resolve_device(args.device)
    backbone = load_backbone({"model": name, "pretrained": False}, seed=0)
    # Warm-up: kernel selection (cudnn.benchmark), allocator, slide files in the page cache.
    for slide in slides if device.type == "cuda" else slides[:1]:  # each last-batch shape
        pipeline(backbone, slide, work / "warm.zarr", args)
    forward_only(backbone, 2 * args.batch_size, args.batch_size, device, args.amp)
    n = sum(s[2] for s in slides) * args.passes
    rows, pairs = [], []
    for r in range(args.repeats):
        t = {"fwd": [0.0, 0.0], "pipe": [0.0, 0.0]}
        for i, slide in enumerate(slides * args.passes):
            pair = {}
            for step in ("fwd", "pipe") if (r + i) % 2 == 0 else ("pipe", "fwd"):
                if step == "fwd":
                    dt = forward_only(backbone, slide[2], args.batch_size, device, args.amp)
                else:
                    dt = pipeline(backbone, slide, work / f"out_{i}.zarr", args)
                t[step] = [t[step][0] + dt[0], t[step][1] + dt[1]]
                pair[step] = dt[0]
            pairs.append(pair["fwd"] / pair["pipe"])  # seconds apart: the same load on both
        row = {
            "forward_per_s": n / t["fwd"][0],
            "pipeline_per_s": n / t["pipe"][0],
            "ratio": t["fwd"][0] / t["pipe"][0],
            "cpu_ratio": t["fwd"][1] / t["pipe"][1],  # CPU work per patch, forward / pipeline
        }
        rows.append(row)
        print(
            f"  {name} repeat {r}: forward {row['forward_per_s']:.1f}/s, pipeline "
            f"{row['pipeline_per_s']:.1f}/s, ratio {row['ratio']:.3f} "
            f"(CPU-time ratio {row['cpu_ratio']:.3f})",
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "model": name,
        "patches_per_repeat": n,
        "repeats": rows,
        "pair_ratios": pairs,
        "pair_ratio_median": statistics.median(pairs),
        "forward_median": med["forward_per_s"],
        "pipeline_median": med["pipeline_per_s"],
        "ratio_median": med["ratio"],
        "cpu_ratio_median": med["cpu_ratio"],
    }


def environment(args) -> dict[str, Any]:
    device = resolve_device(args.device)
    import timm

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "readers": resolve_workers(args.workers, device) or "1 thread",
        "amp": str(amp_dtype(device, args.amp)).replace("torch.", ""),
        "batch_size": args.batch_size,
        "read_block": args.read_block,
        "reader": getattr(args, "reader", "auto"),
        "python": sys.version.split()[0],
    }
    return env


def markdown(env: dict[str, Any], results: list[dict[str, Any]], extra: str = "") -> str:
    lines = [
        f"device {env['device_name']}, torch {env['torch']}, {env['torch_threads']} threads, "
        f"readers {env['readers']}, AMP {env['amp']}, batch {env['batch_size']}, "
        f"allocator {env['allocator']}, reader {env.get('reader', 'auto')}",
        "",
        "| model | patches/repeat | forward-only patches/s | pipeline patches/s | ratio (median) "
        "| ratio per repeat | median of slide pairs (n) | CPU-time ratio (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_repeat = ", ".join(f"{x['ratio']:.3f}" for x in r["repeats"])
        lines.append(
            f"| {r['model']} | {r['patches_per_repeat']} | {r['forward_median']:.1f} "
            f"| {r['pipeline_median']:.1f} | {r['ratio_median']:.3f} "
            f"| {per_repeat} | {r['pair_ratio_median']:.3f} ({len(r['pair_ratios'])}) "
            f"| {r['cpu_ratio_median']:.3f} |"
        )
    return "\n".join(lines) + ("\n\n" + extra if extra else "") + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--slides", type=int, default=2, help="demo slides to generate")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--height", type=int, default=3072)
    p.add_argument("--slides-dir", type=Path, default=None, help="existing demo cohort folder")
    p.add_argument("--max-patches", type=int, default=None, help="cap per slide")
    p.add_argument("--passes", type=int, default=1, help="pipeline passes over the slides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--workers", default="auto")
    p.add_argument("--read-block", type=int, default=1)
    p.add_argument("--reader", default="auto", choices=["auto", "openslide", "jpeg-tiles"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's allocator settings as they are (srmil features retains freed memory, "
        "which speeds up the forward pass; both sides are measured with the same setting)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with these command-line arguments; return what --json writes."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # As `srmil features` runs (process-wide, so the forward-only side gets it too).
    retained = not args.malloc_defaults and retain_freed_memory()
    env = {**environment(args), "allocator": "freed memory retained" if retained else "defaults"}
    print(json.dumps(env), flush=True)
    with tempfile.TemporaryDirectory(prefix="srmil-bench-") as tmp:
        work = Path(tmp)
        slides = prepare_slides(
            work, args.slides_dir, args.slides, args.width, args.height, args.max_patches
        )
        print(f"{len(slides)} slides, {sum(s[2] for s in slides)} patches", flush=True)
        results = [bench_model(m, slides, work, args) for m in args.models]
    text = markdown(env, results)
    print(text)
    for r in results:
        print(f"{r['model']}: pipeline/forward = {r['ratio_median']:.3f}")
    result = {"environment": env, "results": results}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(text)
    return result


if __name__ == "__main__":
    main()
