"""Feature extraction on a GPU, checked and timed in one short run (a lent GPU's time is scarce).

Checks: CUDA is chosen by `device: auto`; AMP bf16 and fp16 give finite features close to fp32;
the model and its input are channels-last; reader output arrives in pinned memory and
non-blocking copies are exact; extract_features on CUDA (bf16, fp16) agrees with CPU fp32;
the JPEG tile reader's GPU decoding (nvJPEG via torchvision) gives OpenSlide's pixels on the
demo slides and on an Aperio-style RGB-JPEG slide with shared tables (max and mean difference
recorded), refuses a corrupt tile with the damaged-file error, and its features agree with the
OpenSlide reader's. Timings: per model and per reader (`--readers`: auto = GPU decoding, and
openslide), forward-only on random tensors vs the full pipeline (benchmarks/features.py does
the measuring), the readers' own ceiling (no model; OpenSlide reader processes, and one thread
reading compressed tiles for the GPU decoder), and the readers' start-up (first chunk) apart
from their steady rate, per reader count. Writes gpu_check.json and gpu_check.md to --out.
Every check is recorded, none stops the run.

    python benchmarks/gpu_check.py --slides-dir COHORT --out $OUT            # on the GPU
    python benchmarks/gpu_check.py --small --out /tmp/gpu_check              # rehearsal, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


# Run as `python benchmarks/gpu_check.py`, so benchmarks/ is on sys.path: siblings import plainly.
import features as bench  # noqa: E402
from checks import record  # noqa: E402

from srmil import store  # noqa: E402
from srmil.features.backbones import load_backbone  # noqa: E402
from srmil.features.extract import (  # noqa: E402
    ChunkDataset,
    Readers,
    amp_dtype,
    extract_features,
    iterate_chunks,
    plan_batches,
    preprocess,
    resolve_device,
    resolve_workers,
    split_chunks,
)
from srmil.wsi.tiling import ReadPlan, read_tiles, write_tiles  # noqa: E402


def level0_plan(width: int, height: int) -> ReadPlan:
    """224-px patches read at level 0 of a 0.5 µm/px slide: the decode checks' read plan."""
    return ReadPlan(target_mpp=0.5, patch_px=224, stride_px=224, slide_mpp=0.5,
                    mpp_source="file", patch_level0=224.0, stride_level0=224.0, level=0,
                    level_downsample=1.0, read_px=224, slide_width=int(width),
                    slide_height=int(height), min_tissue_fraction=0.5)


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def run_checks(slides, work: Path, args, device: torch.device) -> dict[str, Any]:
    checks: dict[str, Any] = {}

    def check(name: str, fn) -> None:
        record(checks, name, fn)

    def cuda() -> dict[str, Any]:
        auto = resolve_device("auto")
        out = {"auto_device": str(auto), "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            out |= {
                "name": torch.cuda.get_device_name(0),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "amp_auto": str(amp_dtype(auto, "auto")),
                "readers_auto": resolve_workers("auto", auto),
            }
        return {"ok": auto.type == "cuda" or args.small, **out}

    check("cuda", cuda)
    model_name = args.check_model
    backbone = load_backbone({"model": model_name, "pretrained": False}, seed=0)

    def amp() -> dict[str, Any]:
        model = backbone.model.to(device).to(memory_format=torch.channels_last)
        torch.manual_seed(0)
        x = torch.randn(8, *backbone.data_config["input_size"], device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        out: dict[str, Any] = {}
        with torch.inference_mode():
            ref = model(x).float().cpu().numpy()
            for name in ("bf16", "fp16"):
                dtype = amp_dtype(device, name)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    y = model(x)
                out[name] = {
                    "output_dtype": str(y.dtype),
                    "finite": bool(torch.isfinite(y).all()),
                    "cosine_min_vs_fp32": cosine_min(y.float().cpu().numpy(), ref),
                }
        ok = all(v["finite"] and v["cosine_min_vs_fp32"] > 0.99 for v in out.values())
        if device.type == "cuda":
            ok &= out["bf16"]["output_dtype"] == "torch.bfloat16"
        return {"ok": ok, **out}

    check("amp", amp)

    def channels_last() -> dict[str, Any]:
        model = backbone.model.to(device).to(memory_format=torch.channels_last)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        batch = torch.randint(0, 255, (4, 224, 224, 3), dtype=torch.uint8, device=device)
        x = preprocess(batch, backbone.data_config)
        out = {
            "weights": conv.weight.is_contiguous(memory_format=torch.channels_last),
            "input": x.is_contiguous(memory_format=torch.channels_last),
        }
        return {"ok": all(out.values()), **out}

    check("channels_last", channels_last)

    def pinned() -> dict[str, Any]:
        slide, tiles, _ = slides[0]
        coords, _, plan = read_tiles(tiles)
        chunks = split_chunks(plan_batches(coords[:64], plan, 32, 1))
        data = ChunkDataset(slide, coords[:64], plan, chunks)
        out = {"workers": {}, "thread": {}}
        for mode, workers in (("workers", 2), ("thread", 0)):
            for x, _ in iterate_chunks(data, workers, pin_memory=device.type == "cuda"):
                y = x.to(device, non_blocking=True)
                if device.type == "cuda":
                    torch.cuda.current_stream().synchronize()
                out[mode] = {"pinned": x.is_pinned(), "copy_exact": bool((y.cpu() == x).all())}
                break
        ok = all(v["copy_exact"] for v in out.values())
        if device.type == "cuda":
            ok &= all(v["pinned"] for v in out.values())
        return {"ok": ok, **out}

    check("pinned_non_blocking", pinned)

    def agreement() -> dict[str, Any]:
        slide, tiles, _ = slides[0]
        coords, fraction, plan = read_tiles(tiles)
        small = work / "small.json"
        write_tiles(small, coords[:64], fraction[:64], plan)
        runs = {"cpu_fp32": ("cpu", "none"), "bf16": (args.device, "bf16")}
        runs["fp16"] = (args.device, "fp16")
        feats, out = {}, {}
        for name, (dev, amp_name) in runs.items():
            stats = extract_features(
                slide,
                small,
                work / f"{name}.zarr",
                backbone,
                "check",
                batch_size=32,
                num_workers="auto",
                device=dev,
                amp=amp_name,
                dtype="float32",
                progress=False,
            )
            feats[name], _, attrs = store.read_feature_store(work / f"{name}.zarr")
            out[name] = {
                "device": attrs["device"],
                "amp": attrs["amp"],
                "workers": stats["workers"],
            }
        for name in ("bf16", "fp16"):
            out[name]["cosine_min_vs_cpu"] = cosine_min(feats[name], feats["cpu_fp32"])
        ok = all(out[n]["cosine_min_vs_cpu"] > 0.99 for n in ("bf16", "fp16"))
        return {"ok": ok, **out}

    check("extract_cuda_vs_cpu", agreement)

    def gpu_decode_pixels() -> dict[str, Any]:
        """Patches decoded on the device against OpenSlide read_region, edges included."""
        from srmil.features.gpu_decode import decode_patches
        from srmil.features.readers import choose_reader
        from srmil.wsi.slide import open_slide, to_rgb

        out: dict[str, Any] = {}
        for path in [s[0] for s in slides] + [str(aperio_rgb_slide(slides, work))]:
            handle = open_slide(path)
            width, height = handle.dimensions
            rng = np.random.default_rng(0)
            origins = np.stack([rng.integers(0, width, 96), rng.integers(0, height, 96)], 1)
            edges = [[width - 224, height - 224], [width - 100, 10], [5, height - 50]]
            origins = np.concatenate([origins, edges]).astype(np.int64)
            plan = level0_plan(width, height)
            choice = choose_reader(path, handle, origins, plan)
            data = ChunkDataset(
                path, origins, plan, [np.arange(len(origins))], reader=choice, encoded=True
            )
            got = decode_patches(data[0][0], device, 224, path, 0).cpu().numpy().astype(int)
            ref = np.stack(
                [to_rgb(handle.read_region(tuple(map(int, o)), 0, (224, 224))) for o in origins]
            ).astype(int)
            diff = np.abs(got - ref)
            out[Path(path).name] = {
                "reader": choice.name,
                "colorspace": choice.level.colorspace,
                "max_diff": int(diff.max()),
                "mean_diff_per_channel": diff.mean((0, 1, 2)).round(3).tolist(),
            }
        ok = all(
            v["max_diff"] <= 2 and max(v["mean_diff_per_channel"]) <= 0.5 for v in out.values()
        )
        return {"ok": ok, **out}

    check("gpu_decode_pixels", gpu_decode_pixels)

    def gpu_decode_corrupt_tile() -> dict[str, Any]:
        """A tile with noise in its entropy-coded data: nvJPEG must not hand back garbage."""
        from srmil.features.gpu_decode import decode_patches
        from srmil.features.readers import choose_reader
        from srmil.wsi.slide import SlideError, open_slide

        src = aperio_rgb_slide(slides, work)
        damaged = work / "damaged.svs"
        col, row = tests_slides().damage_tile(src, damaged, 7)
        origin = np.array([[col * 240 + 10, row * 240 + 20]])
        handle = open_slide(damaged)
        plan = level0_plan(*handle.dimensions)
        choice = choose_reader(str(damaged), handle, origin, plan)
        data = ChunkDataset(str(damaged), origin, plan, [np.arange(1)], reader=choice, encoded=True)
        try:
            decode_patches(data[0][0], device, 224, str(damaged), 0)
        except SlideError as err:
            return {"ok": "cannot be read" in str(err), "error": str(err)[-160:]}
        return {"ok": False, "error": "decoded without an error (garbage patch)"}

    check("gpu_decode_corrupt_tile", gpu_decode_corrupt_tile)

    def features_readers() -> dict[str, Any]:
        """extract_features on the device with each reader: cosine per patch."""
        slide, tiles, _ = slides[0]
        coords, fraction, plan = read_tiles(tiles)
        small = work / "readers.json"
        write_tiles(small, coords[:128], fraction[:128], plan)
        feats, out = {}, {}
        for reader in ("openslide", "auto"):
            extract_features(
                slide,
                small,
                work / f"r_{reader}.zarr",
                backbone,
                "check",
                batch_size=64,
                device=args.device,
                amp="none",
                dtype="float32",
                progress=False,
                reader=reader,
            )
            feats[reader], _, attrs = store.read_feature_store(work / f"r_{reader}.zarr")
            out[reader] = attrs["reader"]
        out["cosine_min"] = cosine_min(feats["auto"], feats["openslide"])
        return {"ok": out["cosine_min"] >= 0.9999, **out}

    check("features_readers", features_readers)
    backbone.model.cpu()
    return checks


def tests_slides():
    """tests/jpeg_slides.py (the writer of Aperio-style RGB-JPEG slides), loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "srmil_jpeg_slides", HERE.parent / "tests" / "jpeg_slides.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aperio_rgb_slide(slides, work: Path) -> Path:
    """An Aperio-style SVS with RGB-encoded JPEG tiles and shared tables, from a demo slide's
    pixels at an odd size (written once)."""
    from srmil.wsi.slide import open_slide, to_rgb

    path = work / "aperio_rgb.svs"
    if not path.exists():
        pixels = to_rgb(open_slide(slides[0][0]).read_region((64, 32), 0, (1234, 1001)))
        tests_slides().write_jpeg_slide(path, pixels, "RGB", tile=240)
    return path


def reading_only_gpu(slides, batch_size: int, device: torch.device) -> float:
    """Patches/s of the tile reader feeding the device decoder (one thread reads compressed
    tiles, the device decodes and cuts), no model."""
    from srmil.features.gpu_decode import decode_patches
    from srmil.features.readers import choose_reader
    from srmil.wsi.slide import open_slide

    total = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for slide, tiles, _ in slides:
        coords, _, plan = read_tiles(tiles)
        choice = choose_reader(slide, open_slide(slide), coords, plan, "jpeg-tiles")
        choice = dataclasses.replace(choice, dct_scale=1)  # the device decodes full tiles
        chunks = split_chunks(plan_batches(coords, plan, batch_size, 1))
        data = ChunkDataset(slide, coords, plan, chunks, reader=choice, encoded=True)
        for enc, _ in iterate_chunks(data, 0, pin_memory=False):
            total += len(decode_patches(enc, device, data.patch_px, slide, data.level))
    sync()
    return total / (time.perf_counter() - start)


def scan_readers(slides, device: torch.device, counts: list[int]) -> dict[str, Any]:
    """Readers alone per reader count: start-up (first chunk) apart from the steady rate, to
    tell a per-slide start-up cost from a per-patch reading cost."""
    out = {}
    for workers in counts:
        first, steady_n, steady_s, total_s = [], 0, 0.0, 0.0
        for slide, tiles, _ in slides:
            coords, _, plan = read_tiles(tiles)
            data = ChunkDataset(
                slide, coords, plan, split_chunks(plan_batches(coords, plan, 256, 1))
            )
            start = time.perf_counter()
            readers = Readers(data, workers, pin_memory=device.type == "cuda")
            x, _ = next(readers)
            t_first = time.perf_counter()
            n = sum(len(x) for x, _ in readers)
            readers.close()
            end = time.perf_counter()
            first.append(t_first - start)
            steady_n, steady_s, total_s = (
                steady_n + n,
                steady_s + end - t_first,
                total_s + end - start,
            )
        out[f"readers_{workers}"] = {
            "first_chunk_s": [round(f, 3) for f in first],
            "steady_patches_per_s": steady_n / steady_s,
            "patches_per_s": sum(s[2] for s in slides) / total_s,
        }
        print(f"readers {workers}: {json.dumps(out[f'readers_{workers}'])}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides-dir", type=Path, default=None, help="demo cohort (else generated)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    p.add_argument("--check-model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--small", action="store_true", help="CPU rehearsal: tiny sizes")
    p.add_argument(
        "--readers",
        nargs="+",
        default=["auto", "openslide"],
        help="pipeline timings per reader (auto: the JPEG tile reader, GPU decoding)",
    )
    args = p.parse_args()
    args.device, args.amp, args.workers, args.read_block = "auto", "bf16", "auto", 1
    args.reader = args.readers[0]
    args.threads = None
    if args.small:
        args.models, args.check_model = ["resnet18"], "resnet18"
        args.batch_size, args.repeats, args.passes = 16, 1, 1
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    retained = bench.retain_freed_memory()  # as `srmil features` runs
    report: dict[str, Any] = {"environment": bench.environment(args)}
    report["environment"]["allocator"] = "freed memory retained" if retained else "defaults"
    print(json.dumps(report["environment"]), flush=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="srmil-gpu-") as tmp:
        work = Path(tmp)
        slides = bench.prepare_slides(
            work, args.slides_dir, 2, 2048, 1536, 48 if args.small else None
        )
        report["slides"] = [{"slide": Path(s[0]).name, "patches": s[2]} for s in slides]
        print(json.dumps(report["slides"]), flush=True)
        report["checks"] = run_checks(slides, work, args, device)
        reading = {}
        for block in (1, 4):
            workers = resolve_workers("auto", device)
            rate = bench.reading_only(slides, args.batch_size, workers, block, device)
            reading[f"block_{block}"] = {"readers": workers or "1 thread", "patches_per_s": rate}
            print(f"reading only, block {block}: {rate:.0f} patches/s", flush=True)
        rate = reading_only_gpu(slides, args.batch_size, device)
        reading["jpeg_tiles_device_decode"] = {
            "readers": "1 thread + " + device.type,
            "patches_per_s": rate,
        }
        print(f"reading only, JPEG tiles decoded on {device.type}: {rate:.0f} patches/s")
        report["reading_only"] = reading
        counts = [0, 1, 4, 8, resolve_workers("auto", device)] if not args.small else [0, 1]
        report["reader_scan"] = scan_readers(slides, device, sorted(set(counts)))
        report["throughput"] = []
        for reader in args.readers:
            args.reader = reader
            for model in args.models:
                try:
                    result = bench.bench_model(model, slides, work, args)
                    result["model"] = f"{model} (reader {reader})"
                    report["throughput"].append(result)
                except Exception as err:  # noqa: BLE001 - keep what the other models give
                    traceback.print_exc()
                    report["throughput"].append({"model": model, "error": repr(err)})
                (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    good = [r for r in report["throughput"] if "error" not in r]
    checks = "\n".join(
        f"- {name}: {'ok' if c['ok'] else 'FAILED'} "
        f"({', '.join(f'{k}={v}' for k, v in c.items() if k not in ('ok', 'seconds'))})"
        for name, c in report["checks"].items()
    )
    reads = ", ".join(
        f"{k}: {v['patches_per_s']:.0f} patches/s ({v['readers']} readers)"
        for k, v in reading.items()
    )
    text = bench.markdown(report["environment"], good, f"Reading only: {reads}\n\n{checks}")
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(text)


if __name__ == "__main__":
    main()
