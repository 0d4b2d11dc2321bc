"""H&E colour: stain amounts per pixel -> quantised -> RGB through a look-up table.

Beer-Lambert with the optical densities of haematoxylin and eosin, computed once per table entry
instead of an exp per pixel; `shade` turns fibre noise, stain variation, the masks and the
nuclear layer into the amounts of each stain.
"""

from __future__ import annotations

import cv2
import numpy as np

BACKGROUND_RGB = (244.0, 243.0, 246.0)  # empty glass
# Optical densities of haematoxylin and eosin (Ruifrok & Johnston), unit vectors in RGB.
HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
EOSIN_OD = np.array([0.072, 0.990, 0.105])
OD_STEPS_PER_UNIT = 64  # quantisation of stain amounts for the colour look-up table


def stain_lut(haematoxylin_scale: float = 1.0, eosin_scale: float = 1.0) -> np.ndarray:
    """RGB (65536 x 3 uint8) for every quantised (haematoxylin, eosin) amount: Beer-Lambert
    once per table entry instead of an exp per pixel."""
    amounts = np.arange(256, dtype=np.float64) / OD_STEPS_PER_UNIT
    od = (amounts[:, None, None] * HAEMATOXYLIN_OD * haematoxylin_scale
          + amounts[None, :, None] * EOSIN_OD * eosin_scale)
    rgb = np.asarray(BACKGROUND_RGB) * np.exp(-od)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3)


def shade(eosin: np.ndarray, stain_var: np.ndarray, tissue: np.ndarray, tumour: np.ndarray,
          layer: np.ndarray, dither: np.ndarray, lut: np.ndarray, mpp: float,
          contrast: float = 1.0) -> np.ndarray:
    """RGB from unit fibre noise (`eosin`, modified in place), stain variation, the masks and
    the nuclear layer: stain amounts per pixel -> quantised -> look-up table."""
    # Eosin: fibrous, patchy stroma; haematoxylin: a faint cytoplasmic tint.
    eosin *= 7.0
    eosin += 26.0
    eosin += 4.0 * stain_var
    eosin *= tissue
    haem = (3.0 + 1.5 * stain_var) * tissue
    if tumour.any():
        eosin[tumour] *= 1.0 - 0.55 * contrast
        haem[tumour] += 18.0 * contrast
    layer = cv2.GaussianBlur(layer, (5, 5), 0.35 * (1.0 / mpp))
    nuclear = layer.astype(np.float32) * (1.0 / 255.0)
    haem += nuclear * 80.0
    eosin *= 1.0 - 0.6 * nuclear
    # Dither so the background is 235-245 and the JPEG sees texture, not flat colour.
    haem_q = np.clip(haem, 0, 252).astype(np.uint8) + (dither & 3)
    eosin_q = np.clip(eosin, 0, 252).astype(np.uint8) + (dither >> 2)
    index = (haem_q.astype(np.uint16) << 8) | eosin_q
    return lut[index]
