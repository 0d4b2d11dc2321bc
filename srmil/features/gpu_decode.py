"""Patches from JPEG tiles decoded on the features device: with a CUDA device, nvJPEG through
`torchvision.io.decode_jpeg`, so the CPU cores only read compressed bytes.

The reader (srmil.features.readers.TileReader.encoded) hands over each chunk's tiles once, as JPEG
streams, with where each patch lies in them; here the tiles are decoded in one batched call,
and the patches are gathered from them on the device. The same code runs on the CPU (torchvision
decodes with libjpeg-turbo there), which is how it is tested without a GPU.
"""

from __future__ import annotations

import warnings

import simplejpeg
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from srmil.errors import one_line
from srmil.features.readers import EncodedTiles
from srmil.wsi.slide import damaged_pixels


def decode_tiles(chunk: EncodedTiles, device: torch.device, path: str, level: int) -> torch.Tensor:
    """(T, tile_h, tile_w, 3) uint8 on `device`: the chunk's tiles, decoded in one call."""
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they
            # are what the pinned torchvision offers for nvJPEG today.
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(chunk.streams, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        raise _locate_damage(chunk, path, level, err) from err
    return torch.stack(images).permute(0, 2, 3, 1)


def _locate_damage(chunk: EncodedTiles, path: str, level: int, err: Exception) -> Exception:
    """The one-line damaged-file error at a patch that needs the tile which fails to decode
    (found by decoding each on the CPU, strictly); the decoder's own error if none fails."""
    for t, stream in enumerate(chunk.streams):
        try:
            simplejpeg.decode_jpeg(stream.numpy().tobytes(), "rgb", strict=True)
        except ValueError as bad:
            patch = int((chunk.grid == t).flatten(1).any(1).nonzero()[0, 0])
            where = tuple(int(v) for v in chunk.origins_level0[patch])
            return damaged_pixels(path, level, where, one_line(bad))
    where = tuple(int(v) for v in chunk.origins_level0[0])
    return damaged_pixels(path, level, where, one_line(err))


def cut_patches(
    tiles: torch.Tensor,
    grid: torch.Tensor,
    offsets: torch.Tensor,
    valid: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """(n, size, size, 3) uint8 patches from (T, th, tw, 3) tiles: patch i is the mosaic of
    tiles `grid[i]` (ky x kx, -1 = beyond the level) cut at `offsets[i]` (x, y), white from
    `valid[i]` (x, y) on. Everything on the tiles' device."""
    n, ky, kx = grid.shape
    _, th, tw, _ = tiles.shape
    dev = tiles.device
    white = torch.full((1, th, tw, 3), 255, dtype=tiles.dtype, device=dev)
    grid = grid.to(dev)
    padded = torch.cat([tiles, white])
    mosaic = padded[torch.where(grid >= 0, grid, len(tiles))]  # (n, ky, kx, th, tw, 3)
    mosaic = mosaic.permute(0, 1, 3, 2, 4, 5).reshape(n, ky * th, kx * tw, 3)
    offsets, valid = offsets.to(dev), valid.to(dev)
    steps = torch.arange(size, device=dev)
    rows = (offsets[:, 1:] + steps)[:, :, None]  # (n, size, 1)
    cols = (offsets[:, :1] + steps)[:, None, :]  # (n, 1, size)
    patches = mosaic[torch.arange(n, device=dev)[:, None, None], rows, cols]
    outside = (steps[None, None, :] >= valid[:, None, :1]) | (
        steps[None, :, None] >= valid[:, None, 1:]
    )  # (n, size, size): beyond the right or bottom edge
    return patches.masked_fill_(outside[..., None], 255)


def decode_patches(
    chunk: EncodedTiles, device: torch.device, patch_px: int, path: str, level: int
) -> torch.Tensor:
    """(n, patch_px, patch_px, 3) uint8 on `device` from one chunk of encoded tiles; a level
    finer than the target is shrunk by area averaging (as INTER_AREA on the CPU)."""
    tiles = decode_tiles(chunk, device, path, level)
    x = cut_patches(tiles, chunk.grid, chunk.offsets, chunk.valid, chunk.size)
    if chunk.size != patch_px:
        x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(patch_px, patch_px), mode="area")
        x = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return x.contiguous()
