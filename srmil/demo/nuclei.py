"""Nuclei: where they lie (Poisson points from a density on the coarse grid), their shapes, and
drawing them as filled ellipses into a haematoxylin layer.

Sparse spindle and round nuclei in stroma, crowded along lumen edges; in tumour, large, crowded,
hyperchromatic nuclei with nucleoli. All of a slide's nuclei are drawn from its stream before
any pixel, so a band of rows paints exactly the nuclei that reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from srmil.demo.geometry import MaskAt, smooth_noise


def sample_points(rng: np.random.Generator, density_grid: np.ndarray, downsample: int,
                  mask: np.ndarray | MaskAt) -> np.ndarray:
    """Poisson points (N x 2 int, x/y level-0 px) from a per-px density on the coarse grid,
    kept where the level-0 `mask` is set (an array, or a MaskAt for large slides)."""
    expected = float(density_grid.sum()) * downsample**2
    n = int(rng.poisson(expected)) if expected > 0 else 0
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    p = density_grid.ravel().astype(np.float64)
    cells = rng.choice(p.size, size=n, p=p / p.sum())
    gy, gx = np.divmod(cells, density_grid.shape[1])
    x = ((gx + rng.random(n)) * downsample).astype(np.int64)
    y = ((gy + rng.random(n)) * downsample).astype(np.int64)
    h, w = mask.shape
    keep = (x < w) & (y < h)
    x, y = x[keep], y[keep]
    keep = mask.at(x, y) if isinstance(mask, MaskAt) else mask[y, x]
    return np.stack([x[keep], y[keep]], axis=1)


@dataclass
class Nuclei:
    """Drawn nuclei: centres (N x 2 level-0 px) and their shape, fixed before any drawing."""

    points: np.ndarray
    long_ax: np.ndarray
    short_ax: np.ndarray
    angles: np.ndarray
    values: np.ndarray
    vesicular: bool = False


def nuclei_params(rng: np.random.Generator, points: np.ndarray,
                  axes_px: tuple[float, float, float, float], intensity: tuple[int, int],
                  angle_deg: float | None = None, vesicular: bool = False) -> Nuclei:
    """Shapes of nuclei at `points`. axes_px = (long min, long max, short min, short max);
    angle None = random orientation; vesicular adds a pale centre and a nucleolus."""
    n = len(points)
    long_ax = rng.uniform(axes_px[0], axes_px[1], n)
    short_ax = np.minimum(rng.uniform(axes_px[2], axes_px[3], n), long_ax)
    angles = (rng.uniform(0, 180, n) if angle_deg is None
              else angle_deg + rng.normal(0, 15, n))
    values = rng.integers(intensity[0], intensity[1] + 1, n)
    return Nuclei(points, long_ax, short_ax, angles, values, vesicular)


def paint_nuclei(layer: np.ndarray, nuclei: Nuclei, y_offset: int = 0) -> None:
    """Filled ellipses into a uint8 haematoxylin layer whose row 0 is level-0 row `y_offset`
    (a band of rows, or the whole slide); only nuclei reaching the layer are drawn."""
    reach = float(nuclei.long_ax.max(initial=0.0)) + 2
    centre_y = nuclei.points[:, 1]
    keep = np.flatnonzero((centre_y >= y_offset - reach)
                          & (centre_y < y_offset + layer.shape[0] + reach))
    for i in keep.tolist():
        x, y = nuclei.points[i].tolist()
        y -= y_offset
        a, b = float(nuclei.long_ax[i]), float(nuclei.short_ax[i])
        ang, val = float(nuclei.angles[i]), int(nuclei.values[i])
        axes = (max(1, round(a)), max(1, round(b)))
        cv2.ellipse(layer, (x, y), axes, ang, 0, 360, val, -1)
        if nuclei.vesicular and b >= 4:
            cv2.ellipse(layer, (x, y), (round(a * 0.55), round(b * 0.55)), ang, 0, 360,
                        int(val * 0.7), -1)
            cv2.circle(layer, (x + round(b * 0.2), y), max(1, round(b * 0.22)), 255, -1)


def nuclei_density(rng: np.random.Generator, tissue_grid: np.ndarray, lumen_grid: np.ndarray,
                   mpp: float, downsample: int) -> np.ndarray:
    """Nuclei per level-0 px on the coarse grid: sparse in stroma, crowded along lumen edges."""
    grid = tissue_grid.shape
    density = tissue_grid * (mpp * mpp / 150.0)  # one nucleus per 150 µm²
    lining = np.zeros_like(tissue_grid)
    if lumen_grid.any():
        lumen_px = cv2.distanceTransform((~lumen_grid).astype(np.uint8), cv2.DIST_L2, 3)
        lining = (lumen_px * (downsample * mpp) < 14.0) & tissue_grid
    density = density * (0.6 + 0.4 * np.clip(1.0 + 0.5 * smooth_noise(rng, grid, 20.0), 0, 3))
    density[lining] *= 5.0
    return density.astype(np.float32)


def stroma_and_tumour_nuclei(rng: np.random.Generator, density: np.ndarray,
                             tumour_grid: np.ndarray, downsample: int,
                             tissue: np.ndarray | MaskAt,
                             tumour: np.ndarray | MaskAt | None, mpp: float,
                             fibre_angle: float, contrast: float = 1.0) -> list[Nuclei]:
    """Spindle and round stromal nuclei, then (where there is tumour) large, crowded,
    hyperchromatic nuclei with nucleoli. `tissue` / `tumour` are level-0 masks, or MaskAt for
    slides too large to hold them; `tumour` None draws no tumour nuclei."""
    um = 1.0 / mpp
    points = sample_points(rng, density, downsample, tissue)
    spindle = rng.random(len(points)) < 0.6
    out = [nuclei_params(rng, points[spindle], (3.5 * um, 5.0 * um, 1.0 * um, 1.6 * um),
                         (150, 210), angle_deg=-fibre_angle),
           nuclei_params(rng, points[~spindle], (2.0 * um, 2.8 * um, 1.7 * um, 2.4 * um),
                         (170, 230))]
    if tumour is not None:
        # At contrast c the tumour's extra nuclei, their size and darkness go from stromal
        # round nuclei (c = 0) to the demo's large crowded ones (c = 1).
        tumour_density = tumour_grid * (contrast * mpp * mpp / 55.0)
        points = sample_points(rng, tumour_density.astype(np.float32), downsample, tumour)
        stromal, large = np.array([2.0, 2.8, 1.7, 2.4]), np.array([4.5, 6.5, 3.5, 5.0])
        size = tuple(float(v) * um for v in stromal + contrast * (large - stromal))
        dark = (round(170 + 30 * contrast), round(230 + 15 * contrast))
        out.append(nuclei_params(rng, points, size, dark, vesicular=contrast >= 0.5))
    return out
