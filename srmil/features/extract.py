"""Patch features: read patches beside the forward pass, run the backbone in batches, and write
one Zarr store per slide with coordinates and provenance.

Batches are cut into chunks that readers fill ahead of the model: DataLoader worker processes
(each opens the slide once) or, with `num_workers: 0`, one background thread. Patches come from
OpenSlide or, where a level is plain JPEG tiles, from the tile reader (srmil.features.readers;
chosen per slide by `reader`); on a CUDA device the tile reader's chunks are compressed tiles
that are decoded on the device (srmil.features.gpu_decode). Optionally (`read_block` > 1,
OpenSlide only) the tiles of a k x k block of neighbouring grid cells in one chunk are read with
a single `read_region` call and cropped; measured on JPEG-tiled slides it does not pay
(docs/features.md), so it is off by default.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from srmil import __version__, store
from srmil.device import resolve_device as device_for
from srmil.features.backbones import Backbone, spec_dict
from srmil.features.readers import EncodedTiles, ReaderChoice, TileReader, choose_reader
from srmil.wsi.slide import open_slide, read_region, to_rgb
from srmil.wsi.tiling import ReadPlan, read_tiles

log = logging.getLogger(__name__)

# A block is read in one call when its tiles cover at least this fraction of its bounding box;
# sparser blocks (tissue edges) would decode more background than they save.
MIN_BLOCK_FILL = 0.5
# Tiles per reader work item (see split_chunks), for reader processes and for one thread.
READ_CHUNK = 32
THREAD_CHUNK = 8
_OPEN_LOCK = threading.Lock()


def plan_batches(
    coords_level0: np.ndarray, plan: ReadPlan, batch_size: int, block: int
) -> list[np.ndarray]:
    """Tile indices per model batch, visiting blocks of `block` x `block` grid cells in raster
    order (tiles in raster order inside a block). Deterministic: it depends on the tiles only."""
    n = len(coords_level0)
    if n == 0:
        return []
    grid = np.rint(coords_level0 / float(plan.stride_level0)).astype(np.int64)
    k = max(1, int(block))
    order = np.lexsort((grid[:, 0], grid[:, 1], grid[:, 0] // k, grid[:, 1] // k))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def split_chunks(batches: list[np.ndarray], chunk: int = READ_CHUNK) -> list[np.ndarray]:
    """Reader work items: each batch cut into runs of at most `chunk` tiles, so the first
    batch is ready after `chunk` reads rather than `batch_size` (short slides, many readers)."""
    return [b[i : i + chunk] for b in batches for i in range(0, len(b), chunk)]


class ChunkDataset(Dataset):
    """Item i = chunk i of tile indices as (n, H, W, 3) uint8 patches and the indices (with
    `encoded`, the chunk's JPEG tiles for a GPU decoder instead of patches).

    The slide is opened once per process (or thread) on its first read. `reader` (default:
    OpenSlide) comes from srmil.features.readers.choose_reader.
    """

    def __init__(
        self,
        slide_path: str,
        coords_level0: np.ndarray,
        plan: ReadPlan,
        chunks: list[np.ndarray],
        block: int = 1,
        reader: ReaderChoice | None = None,
        encoded: bool = False,
    ):
        self.slide_path = slide_path
        self.coords = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
        self.grid = np.rint(self.coords / float(plan.stride_level0)).astype(np.int64)
        self.chunks = chunks
        self.block = max(1, int(block))
        self.level = int(plan.level)
        self.ds = float(plan.level_downsample)
        self.read_px = int(plan.read_px)
        self.patch_px = int(plan.patch_px)
        self._slide = None
        self.reader = reader or ReaderChoice("openslide", "openslide", "default")
        self.encoded = encoded
        self.tiles: TileReader | None = None
        if self.reader.name == "jpeg-tiles":
            scale = self.reader.dct_scale
            if encoded and scale != 1:
                raise ValueError("a GPU decoder takes full-size tiles (dct_scale 1)")
            self.tiles = TileReader(slide_path, self.reader.level, scale)
            # Patch origins in px of the read level at the decoding scale (whole: checked by
            # choose_reader and dct_scale).
            self.xy_scaled = np.rint(self.coords / (self.ds * scale)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.chunks)

    def n_reads(self) -> int:
        """read_region calls the whole slide takes with this plan."""
        return sum(sum(1 for _ in self._groups(c)) for c in self.chunks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | EncodedTiles, torch.Tensor]:
        idx = self.chunks[i]
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        if self.tiles is not None:
            return self._read_tiles(idx), index
        out = np.empty((len(idx), self.patch_px, self.patch_px, 3), dtype=np.uint8)
        for rows in self._groups(idx):
            self._read_group(idx, rows, out)
        return torch.from_numpy(out), index

    def _read_tiles(self, idx: np.ndarray) -> torch.Tensor | EncodedTiles:
        """The chunk through the tile reader: cut at the decoding scale, then INTER_AREA down to
        patch_px where the level (after DCT scaling) is still finer than the target."""
        size = self.read_px // self.reader.dct_scale
        xy, origins = self.xy_scaled[idx], self.coords[idx]
        if self.encoded:
            return self.tiles.encoded(xy, size, origins)
        out = np.empty((len(idx), self.patch_px, self.patch_px, 3), dtype=np.uint8)
        if size == self.patch_px:
            self.tiles.read(xy, size, out, origins)
        else:
            region = np.empty((len(idx), size, size, 3), dtype=np.uint8)
            self.tiles.read(xy, size, region, origins)
            shape = (self.patch_px, self.patch_px)
            for j in range(len(idx)):
                cv2.resize(region[j], shape, dst=out[j], interpolation=cv2.INTER_AREA)
        return torch.from_numpy(out)

    def _groups(self, idx: np.ndarray) -> Iterator[np.ndarray]:
        """Positions in `idx` to read together: one block's tiles, when dense enough."""
        if self.block == 1:
            yield from (np.array([j]) for j in range(len(idx)))
            return
        cell = self.grid[idx] // self.block
        key = cell[:, 1] * (1 << 31) + cell[:, 0]
        for k in np.unique(key):
            rows = np.flatnonzero(key == k)
            g = self.grid[idx[rows]]
            span = g.max(0) - g.min(0) + 1
            if len(rows) > 1 and len(rows) >= MIN_BLOCK_FILL * span[0] * span[1]:
                yield rows
            else:
                yield from (np.array([j]) for j in rows)

    def _read_group(self, idx: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        if self._slide is None:
            with _OPEN_LOCK:  # reader threads share one handle (OpenSlide is thread-safe)
                if self._slide is None:
                    self._slide = open_slide(self.slide_path)
        xy = self.coords[idx[rows]]
        x0, y0 = xy.min(0)
        # Offsets at the read level; at level 0 (or integer offsets) crops equal single reads.
        off = np.rint((xy - (x0, y0)) / self.ds).astype(np.int64)
        w, h = off.max(0) + self.read_px
        # A damaged or truncated file fails here: a one-line SlideError naming it.
        location, size = (int(x0), int(y0)), (int(w), int(h))
        region = np.asarray(read_region(self._slide, location, self.level, size, self.slide_path))
        # Opaque, the usual case, needs no compositing (alpha is the top byte of each pixel).
        opaque = bool((region.view(np.uint32) >= 0xFF000000).all())
        for j, (ox, oy) in zip(rows, off, strict=True):
            crop = region[oy : oy + self.read_px, ox : ox + self.read_px]
            if self.read_px == self.patch_px and opaque:
                cv2.cvtColor(crop, cv2.COLOR_RGBA2RGB, dst=out[j])  # 50x a numpy slice copy
                continue
            rgb = cv2.cvtColor(crop, cv2.COLOR_RGBA2RGB) if opaque else to_rgb(crop)
            if self.read_px != self.patch_px:  # the level is finer than the target: shrink
                rgb = cv2.resize(rgb, (self.patch_px, self.patch_px), interpolation=cv2.INTER_AREA)
            out[j] = rgb


# The devices config.yaml may name (its schema has the same pattern).


def resolve_device(device: str = "auto") -> torch.device:
    """The device `features.device` names (srmil.device.resolve_device)."""
    return device_for(device, "features.device")


def resolve_workers(num_workers: int | str, device: torch.device, gpu_decode: bool = False) -> int:
    """'auto': no reader processes on CPU (one reader thread overlaps the forward pass, and
    processes would compete with it for the cores), nor where the GPU decodes (the thread only
    reads compressed bytes); on a GPU fed by CPU decoding, enough readers to feed it."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type == "cpu" or gpu_decode:
        return 0
    return min(16, max(1, usable_cpus() - 1))


def usable_cpus() -> int:
    """CPUs this process may run on: a SLURM job or a container bound to fewer cores than the
    node has sees only its own (os.cpu_count() counts the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def preprocess(batch_uint8: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised (B, 3, h, w) float, channels-last, at the model's input
    size, with the model's mean, std and interpolation."""
    # The permuted view keeps NHWC strides, so the float result is already channels-last.
    x = batch_uint8.permute(0, 3, 1, 2)
    size = tuple(data_config["input_size"][1:])
    if tuple(x.shape[-2:]) != size:
        mode = "bicubic" if data_config.get("interpolation") == "bicubic" else "bilinear"
        x = F.interpolate(x.float(), size=size, mode=mode, antialias=True, align_corners=False)
        x = x.contiguous(memory_format=torch.channels_last)
    std = torch.tensor(data_config["std"], device=x.device).view(1, 3, 1, 1)
    scale = 1 / (std * 255)
    shift = -torch.tensor(data_config["mean"], device=x.device).view(1, 3, 1, 1) / std
    # (x/255 - mean)/std as x*scale + shift in one pass, uint8 in and float out (no float copy
    # first): 0.16 instead of 0.25 ms of CPU per 224-px patch.
    return torch.addcmul(shift, x, scale)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """bf16/fp16 autocast only on CUDA: on CPUs without bf16 units it is far slower."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class Readers:
    """Chunks in order, read ahead of the consumer (`prefetch` chunks per reader) by worker
    processes (each opens the slide once) or by one thread. Reading starts on construction:
    it overlaps model set-up, and worker processes are forked before the model initialises
    CUDA in this process. (Reading on all threads between forward passes instead, on a CPU
    the forward keeps busy, measured no better: 0.959 vs 0.961 of forward speed, resnet18.)
    """

    def __init__(
        self,
        dataset: ChunkDataset,
        num_workers: int,
        pin_memory: bool,
        prefetch: int = 4,
        start_chunks: int = 1,
    ):
        self._pools: list[concurrent.futures.ThreadPoolExecutor] = []
        if num_workers > 0:
            self._it = iter(
                DataLoader(
                    dataset,
                    batch_size=None,  # items are already chunks of patches
                    num_workers=num_workers,
                    pin_memory=pin_memory,
                    prefetch_factor=prefetch,
                )
            )
            return
        # One reader thread: OpenSlide decodes with the GIL released, beside torch's threads.
        # The first `start_chunks` (the first batch) are spread over one thread per core: the
        # model waits for them with the cores idle (half the wait on two cores).
        self._dataset, self._pin = dataset, pin_memory
        self._start_chunks = start_chunks
        self._pools = [
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="srmil-read")
            for _ in range(max(1, min(start_chunks, usable_cpus())))
        ]
        self._ahead: collections.deque = collections.deque()
        self._next = 0
        self._submit(prefetch)

    def _submit(self, n: int) -> None:
        for _ in range(min(n, len(self._dataset) - self._next)):
            i = self._next
            pool = self._pools[i % len(self._pools) if i < self._start_chunks else 0]
            self._ahead.append(pool.submit(self._dataset.__getitem__, i))
            self._next += 1

    def __iter__(self) -> Readers:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._pools:
            return next(self._it)
        if not self._ahead:
            raise StopIteration
        x, idx = self._ahead.popleft().result()
        self._submit(1)
        return (x.pin_memory(), idx) if self._pin else (x, idx)

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._it = None  # a DataLoader iterator stops its workers when dropped


def iterate_chunks(
    dataset: ChunkDataset, num_workers: int, pin_memory: bool, prefetch: int = 4
) -> Readers:
    return Readers(dataset, num_workers, pin_memory, prefetch)


def iterate_batches(
    readers: Readers,
    batches: list[np.ndarray],
    device: torch.device,
    decode: Callable[[EncodedTiles], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Model batches on `device`, (B, H, W, 3) uint8 and tile indices, assembled from chunks
    (copied to the device as they arrive, from pinned memory without blocking; chunks of
    encoded tiles are turned into patches on the device by `decode`)."""
    try:
        for batch in batches:
            parts, need = [], len(batch)
            while need > 0:
                x, idx = next(readers)
                x = decode(x) if isinstance(x, EncodedTiles) else x.to(device, non_blocking=True)
                parts.append((x, idx.to(device, non_blocking=True)))
                need -= len(idx)
            if len(parts) == 1:
                yield parts[0]
            else:
                yield torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    finally:
        readers.close()


def extract_features(
    slide_path: str | os.PathLike,
    tiles_path: str | os.PathLike,
    out_path: str | os.PathLike,
    backbone: Backbone,
    extractor: str,
    batch_size: int = 64,
    num_workers: int | str = "auto",
    device: str = "auto",
    amp: str = "auto",
    dtype: str = "float16",
    read_block: int = 1,
    progress: bool = True,
    reader: str = "auto",
) -> dict[str, Any]:
    """Embed every tile of one slide; write `features` (N x D) and `coords` to a Zarr store.
    `reader`: auto (the JPEG tile reader where the slide's level allows, else OpenSlide),
    openslide or jpeg-tiles (srmil.features.readers)."""
    coords, _, plan = read_tiles(tiles_path)
    start = time.perf_counter()
    dev = resolve_device(device)
    choice = pick_reader(slide_path, coords, plan, reader, dev)
    # The tile reader's chunks are decoded on a CUDA device; on the CPU by the readers.
    gpu_decode = dev.type == "cuda" and choice.name == "jpeg-tiles"
    if gpu_decode and choice.dct_scale != 1:  # no DCT scaling on the GPU: full-size tiles
        choice = dataclasses.replace(choice, dct_scale=1)
    block = read_block if choice.name == "openslide" else 1  # blocks are OpenSlide calls
    batches = plan_batches(coords, plan, batch_size, block)
    workers = resolve_workers(num_workers, dev, gpu_decode) if batches else 0
    # Reader processes take larger chunks (fewer messages); one thread, smaller ones (the
    # first batch waits for fewer reads).
    chunk = READ_CHUNK if workers or gpu_decode else THREAD_CHUNK
    dataset = ChunkDataset(
        str(slide_path), coords, plan, split_chunks(batches, chunk), block, choice, gpu_decode
    )
    first = -(-min(batch_size, len(coords)) // chunk)  # chunks of the first batch
    prefetch = 4 if workers else 2 * -(-batch_size // chunk)  # the thread: two batches
    pin = dev.type == "cuda" and not gpu_decode  # compressed bytes are copied by the decoder
    readers = Readers(dataset, workers, pin, prefetch, start_chunks=first)
    decode = None
    if gpu_decode:
        from srmil.features.gpu_decode import decode_patches

        def decode(chunk: EncodedTiles) -> torch.Tensor:
            return decode_patches(chunk, dev, dataset.patch_px, str(slide_path), dataset.level)

    try:
        autocast = amp_dtype(dev, amp)  # may initialise CUDA: after the readers are forked
        bar = tqdm(total=len(coords), desc=f"features {os.path.basename(slide_path)}",
                   unit="patch", disable=not progress)
        with bar:
            result = _embed(backbone, iterate_batches(readers, batches, dev, decode), len(coords),
                            dev, autocast, bar)
    finally:
        readers.close()
    seconds = time.perf_counter() - start
    provenance = store.FeatureProvenance(
        srmil_version=__version__,
        torch_version=torch.__version__,
        timm_version=timm.__version__,
        extractor=extractor,
        backbone=spec_dict(backbone.spec),
        weights_hash=backbone.weights_hash,
        feature_dim=backbone.feature_dim,
        n_patches=int(len(coords)),
        skipped=plan.skipped or None,
        slide=os.path.basename(slide_path),
        mpp=plan.target_mpp,
        slide_mpp=plan.slide_mpp,
        patch_px=plan.patch_px,
        stride_px=plan.stride_px,
        patch_level0=plan.patch_level0,
        stride_level0=plan.stride_level0,
        read_level=plan.level,
        read_px=plan.read_px,
        read_block=block,
        reader=choice.provenance(gpu=gpu_decode),
        transforms={
            **backbone.data_config,
            "steps": "read RGB at read_level (INTER_AREA to patch_px if larger), resize to "
            "input_size with `interpolation` (antialiased) if different, no crop, "
            "(x/255 - mean)/std",
        },
        device=dev.type,
        amp=str(autocast).replace("torch.", "") if autocast else "none",
        dtype=dtype,
    )
    store.write_feature_store(out_path, result, coords, provenance.attrs(), dtype=dtype)
    rate = len(coords) / seconds if seconds > 0 else 0.0
    log.info(
        "features: %d patches in %.1f s (%.1f patches/s) on %s, %s, batch %d, %d reader(s), %s",
        len(coords),
        seconds,
        rate,
        dev,
        provenance.amp,
        batch_size,
        workers or 1,
        provenance.reader["decoder"],
    )
    return {
        "n_patches": len(coords),
        "seconds": seconds,
        "patches_per_s": rate,
        "workers": workers,
        "reader": choice.name,
    }


def _embed(backbone: Backbone, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int,
           dev: torch.device, autocast: torch.dtype | None, bar: tqdm) -> np.ndarray:
    """The backbone's features of the `n` patches that `batches` yields (uint8 images and their
    tile indices), as an n x D float32 array in tile order."""
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shape: fastest kernels, once
    model = backbone.model.to(dev).to(memory_format=torch.channels_last)
    # Rows land by tile index, so the store keeps the tile order whatever the read order.
    features = torch.empty((n, backbone.feature_dim), device=dev)
    with torch.inference_mode():
        for x, idx in batches:
            x = preprocess(x, backbone.data_config)
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                features[idx] = model(x).float()
            bar.update(len(idx))
        return features.cpu().numpy()  # the one device-to-host copy, and the sync point


def pick_reader(
    slide_path: str | os.PathLike,
    coords_level0: np.ndarray,
    plan: ReadPlan,
    reader: str,
    device: torch.device,
) -> ReaderChoice:
    """The slide's reader (srmil.features.readers.choose_reader), logged. OpenSlide opens the slide
    first whatever the reader: a file it refuses fails here with its one-line error."""
    slide = open_slide(slide_path)
    try:
        choice = choose_reader(str(slide_path), slide, coords_level0, plan, reader)
    finally:
        slide.close()
    log.info(
        "reader for %s: %s (%s: %s)%s",
        os.path.basename(slide_path),
        choice.name,
        choice.requested,
        choice.reason,
        f", tiles decoded at 1/{choice.dct_scale}" if choice.dct_scale > 1 else "",
    )
    return choice
