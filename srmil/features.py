"""Patch features: read tiles through OpenSlide in DataLoader workers, run the backbone in
batches, and write one Zarr store per slide with coordinates and provenance."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from srmil import __version__, store
from srmil.backbones import Backbone, spec_dict
from srmil.slide import open_slide, to_rgb

log = logging.getLogger(__name__)


class TileDataset(Dataset):
    """Patches of one slide as uint8 HWC arrays at the target resolution.

    Each worker process opens the slide once, on its first read.
    """

    def __init__(self, slide_path: str, coords_level0: np.ndarray, plan: dict[str, Any]):
        self.slide_path = slide_path
        self.coords = coords_level0
        self.level = int(plan["level"])
        self.read_px = int(plan["read_px"])
        self.patch_px = int(plan["patch_px"])
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.slide_path)
        x, y = (int(v) for v in self.coords[i])
        rgb = to_rgb(self._slide.read_region((x, y), self.level, (self.read_px, self.read_px)))
        if self.read_px != self.patch_px:  # the level is finer than the target: shrink
            import cv2

            rgb = cv2.resize(rgb, (self.patch_px, self.patch_px), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(rgb))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_workers(num_workers: int | str, device: torch.device) -> int:
    """'auto': no reader processes on CPU, where the forward pass needs every core and reading
    costs ~10% of it; on a GPU, readers keep the device fed."""
    if num_workers != "auto":
        return int(num_workers)
    return 0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) - 1))


def preprocess(batch_uint8: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised (B, 3, h, w) float at the model's input size."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255)
    size = tuple(data_config["input_size"][1:])
    if tuple(x.shape[-2:]) != size:
        mode = "bicubic" if data_config.get("interpolation") == "bicubic" else "bilinear"
        x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    mean = torch.tensor(data_config["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """bf16/fp16 autocast only on CUDA: on CPUs without bf16 units it is far slower."""
    if device.type != "cuda" or amp == "none":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}[amp]


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
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every tile of one slide; write `features` (N x D) and `coords` to a Zarr store."""
    coords, _, plan = store.read_tiles(tiles_path)
    dev = resolve_device(device)
    model = backbone.model.to(dev).to(memory_format=torch.channels_last)
    autocast = amp_dtype(dev, amp)
    loader = DataLoader(
        TileDataset(str(slide_path), coords, plan),
        batch_size=batch_size,
        num_workers=resolve_workers(num_workers, dev) if len(coords) else 0,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    chunks = []
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(
            loader,
            desc=f"features {os.path.basename(slide_path)}",
            unit="batch",
            disable=not progress,
        ):
            x = preprocess(batch.to(dev, non_blocking=True), backbone.data_config)
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                chunks.append(model(x).float().cpu().numpy())
    seconds = time.perf_counter() - start
    features = np.concatenate(chunks) if chunks else np.zeros((0, backbone.feature_dim), np.float32)
    attrs = {
        "srmil_version": __version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "extractor": extractor,
        "backbone": spec_dict(backbone.spec),
        "weights_hash": backbone.weights_hash,
        "feature_dim": backbone.feature_dim,
        "n_patches": int(len(coords)),
        "slide": os.path.basename(slide_path),
        "mpp": plan["target_mpp"],
        "slide_mpp": plan["slide_mpp"],
        "patch_px": plan["patch_px"],
        "stride_px": plan["stride_px"],
        "patch_level0": plan["patch_level0"],
        "stride_level0": plan["stride_level0"],
        "read_level": plan["level"],
        "read_px": plan["read_px"],
        "transforms": backbone.data_config,
        "device": dev.type,
        "amp": str(autocast).replace("torch.", "") if autocast else "none",
        "dtype": dtype,
    }
    store.write_feature_store(out_path, features, coords, attrs, dtype=dtype)
    rate = len(coords) / seconds if seconds > 0 else 0.0
    log.info(
        "features: %d patches in %.1f s (%.1f patches/s) on %s", len(coords), seconds, rate, dev
    )
    return {"n_patches": len(coords), "seconds": seconds, "patches_per_s": rate}
