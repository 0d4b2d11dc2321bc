"""A deterministic synthetic cohort of pyramidal H&E-like slides, so a fresh clone runs end to end.

Each slide is drawn from `numpy.random.default_rng([seed, slide_index])`: one to three irregular
tissue pieces (some with lumen-like holes) on a white background, pink fibrous stroma with small
dark nuclei, and, on positive slides, a few small tumour regions of crowded, large, dark
blue-purple nuclei. Slides alternate between an Aperio-style `.svs` and a generic tiled `.tif`
(both JPEG, 256 px tiles, factor-4 pyramid) that OpenSlide reads with a µm/px. Beside them go
ground-truth masks at downsample 16, QuPath-style GeoJSON of the tumour regions and `samples.csv`.

Geometry is built from signed-distance fields on a coarse grid (level-0 px / `GRID_DOWNSAMPLE`)
and thresholded after upsampling, so memory and time stay roughly proportional to the slide area.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from srmil.store import atomic_path, write_text

SHEET_COLUMNS = ("slide_id", "path", "patient_id", "label", "annotation")
POSITIVE, NEGATIVE = "tumour", "normal"
TILE_PX = 256
LEVEL_DOWNSAMPLE = 4
PYRAMID_STOP_PX = 1024  # add factor-4 levels until the longer side is below this
MASK_DOWNSAMPLE = 16  # ground-truth masks in masks/
ANNOTATION_DOWNSAMPLE = 4  # tumour contours are traced at this downsample, then scaled up
GRID_DOWNSAMPLE = 8  # geometry fields live on this coarse grid
JPEG_QUALITY = 85
APERIO_THUMBNAIL_PX = 512
APP_MAG = 20
BACKGROUND_RGB = (244.0, 243.0, 246.0)
# Optical densities of haematoxylin and eosin (Ruifrok & Johnston), unit vectors in RGB.
HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
EOSIN_OD = np.array([0.072, 0.990, 0.105])
OD_STEPS_PER_UNIT = 64  # quantisation of stain amounts for the colour look-up table
# Every page: JPEG tiles/strips, no DateTime tag (reruns are byte-identical), no tifffile JSON.
TIFF_OPTIONS = {"photometric": "rgb", "compression": "jpeg",
                "compressionargs": {"level": JPEG_QUALITY}, "datetime": False,
                "software": "srmil.demo", "metadata": None}


@dataclass(frozen=True)
class Blob:
    """A perturbed ellipse in level-0 px: radius(theta) = 1 + sum a_k cos(k theta + phase_k)."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float
    harmonics: tuple[tuple[float, float], ...] = ()  # (amplitude, phase) for k = 2, 3, ...

    def reach(self) -> float:
        """A radius that surely contains the blob."""
        return max(self.ax, self.ay) * (1.0 + sum(abs(a) for a, _ in self.harmonics))

    def outline(self, n_points: int = 360) -> np.ndarray:
        """Boundary points (n x 2, x/y level-0 px)."""
        theta = np.linspace(0.0, 2.0 * np.pi, n_points, endpoint=False)
        radius = np.ones_like(theta)
        for k, (amp, phase) in enumerate(self.harmonics, start=2):
            radius += amp * np.cos(k * theta + phase)
        u, v = radius * np.cos(theta) * self.ax, radius * np.sin(theta) * self.ay
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], axis=1)


@dataclass(frozen=True)
class TissueShape:
    """Knobs of the tissue geometry; later cohorts (biopsies, big slides) pass their own."""

    n_pieces: tuple[int, int] = (1, 3)
    fill: tuple[float, float] = (0.8, 1.0)  # piece size as a share of its slot
    irregularity: float = 0.10  # amplitude of the radial harmonics
    edge_noise_um: float = 50.0  # most an edge moves off its smooth outline (ragged edges)
    margin_fraction: float = 0.01  # keep tissue this far from the slide border
    holes_per_piece: tuple[int, int] = (0, 5)
    hole_radius_um: tuple[float, float] = (25.0, 90.0)


@dataclass(frozen=True)
class TumourShape:
    fraction: tuple[float, float] = (0.02, 0.05)  # of the tissue area
    n_regions: tuple[int, int] = (1, 3)
    irregularity: float = 0.18


@dataclass
class SlideGeometry:
    """Level-0 masks plus the coarse fields they came from (for nuclei density and tests)."""

    tissue: np.ndarray  # bool H x W, holes excluded
    tumour: np.ndarray  # bool H x W, inside tissue
    tissue_grid: np.ndarray  # bool on the coarse grid
    lumen_grid: np.ndarray  # bool on the coarse grid (holes inside tissue pieces)
    tumour_grid: np.ndarray  # bool on the coarse grid
    tumour_fraction: float  # the target drawn for this slide (0 for negatives)


# --- the cohort plan: cheap, no pixels --------------------------------------------------------


def planned_sheet(out_dir: str | Path, n_slides: int = 24, seed: int = 0) -> list[dict[str, str]]:
    """Rows of samples.csv (slide_id, path, patient_id, label, annotation) without writing anything;
    cheap (no image generation), used by the Snakefile at parse time."""
    del out_dir  # paths are relative to the sheet's folder; kept for the callers' symmetry
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    rng = np.random.default_rng([seed, n_slides, 0x5EED])  # separate stream from the slides'
    labels = _balanced_labels(rng, n_slides)
    patient_of = _patients(rng, labels)
    rows = []
    for i in range(n_slides):
        slide_id = f"demo_{i:03d}"
        suffix = ".svs" if i % 2 == 0 else ".tif"
        rows.append({
            "slide_id": slide_id,
            "path": f"slides/{slide_id}{suffix}",
            "patient_id": patient_of[i],
            "label": labels[i],
            "annotation": f"annotations/{slide_id}.geojson" if labels[i] == POSITIVE else "",
        })
    return rows


def _balanced_labels(rng: np.random.Generator, n_slides: int) -> list[str]:
    """Half positive overall and within each file format (even = .svs, odd = .tif), so the
    format never predicts the label."""
    labels = [NEGATIVE] * n_slides
    n_positive = (n_slides + 1) // 2
    formats = [list(range(0, n_slides, 2)), list(range(1, n_slides, 2))]
    k_even = (len(formats[0]) + 1) // 2
    for indices, k in zip(formats, (k_even, n_positive - k_even), strict=True):
        for i in rng.permutation(indices)[:k]:
            labels[int(i)] = POSITIVE
    return labels


def _patients(rng: np.random.Generator, labels: list[str]) -> list[str]:
    """About a third of each label's slides come in same-label pairs from one patient."""
    group_of = list(range(len(labels)))
    for label in (POSITIVE, NEGATIVE):
        members = [i for i, lab in enumerate(labels) if lab == label]
        order = rng.permutation(members)
        for p in range(len(members) // 3):
            a, b = sorted((int(order[2 * p]), int(order[2 * p + 1])))
            group_of[b] = a
    names: dict[int, str] = {}
    for group in group_of:
        names.setdefault(group, f"P{len(names):03d}")
    return [names[g] for g in group_of]


# --- geometry ---------------------------------------------------------------------------------


def random_blob(rng: np.random.Generator, cx: float, cy: float, ax: float, ay: float,
                irregularity: float, n_harmonics: int = 4, angle: float | None = None) -> Blob:
    """A rotated ellipse (random angle unless given) whose radius wobbles with decaying
    harmonics k = 2 .. n_harmonics+1."""
    amps = rng.uniform(0.3, 1.0, n_harmonics) * irregularity / np.arange(1, n_harmonics + 1)
    phases = rng.uniform(0, 2 * np.pi, n_harmonics)
    angle = float(rng.uniform(0, np.pi)) if angle is None else angle
    return Blob(float(cx), float(cy), float(ax), float(ay), angle,
                tuple((float(a), float(p)) for a, p in zip(amps, phases, strict=True)))


def max_blob_distance(blobs: list[Blob], grid_shape: tuple[int, int], downsample: float,
                      floor: float) -> np.ndarray:
    """Union of blobs as an approximate signed distance in level-0 px (> 0 inside), sampled at
    the centres of a coarse grid; only each blob's bounding box is evaluated."""
    out = np.full(grid_shape, floor, dtype=np.float32)
    gh, gw = grid_shape
    for b in blobs:
        reach = b.reach() + 2 * downsample
        j0 = max(0, math.floor((b.cx - reach) / downsample))
        j1 = min(gw, math.ceil((b.cx + reach) / downsample) + 1)
        i0 = max(0, math.floor((b.cy - reach) / downsample))
        i1 = min(gh, math.ceil((b.cy + reach) / downsample) + 1)
        if j0 >= j1 or i0 >= i1:
            continue
        x = ((np.arange(j0, j1, dtype=np.float32) + 0.5) * downsample - b.cx)[None, :]
        y = ((np.arange(i0, i1, dtype=np.float32) + 0.5) * downsample - b.cy)[:, None]
        c, s = math.cos(b.angle), math.sin(b.angle)
        u, v = (x * c + y * s) / b.ax, (y * c - x * s) / b.ay
        r_norm, theta = np.hypot(u, v), np.arctan2(v, u)
        radius = np.ones_like(r_norm)
        for k, (amp, phase) in enumerate(b.harmonics, start=2):
            radius += amp * np.cos(k * theta + phase)
        dist = (radius - r_norm) * math.sqrt(b.ax * b.ay)
        np.maximum(out[i0:i1, j0:j1], dist, out=out[i0:i1, j0:j1])
    return out


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (float32)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), max(sigma_px, 0.3), borderType=cv2.BORDER_REFLECT)
    return noise / max(float(noise.std()), 1e-6)


def tissue_pieces(rng: np.random.Generator, width_px: int, height_px: int, mpp: float,
                  shape: TissueShape = TissueShape()) -> list[Blob]:
    """One to three pieces side by side along the longer axis, each sized to fit its slot and
    to stay clear of the slide border even after its edge is roughened."""
    n = int(rng.integers(shape.n_pieces[0], shape.n_pieces[1] + 1))
    along_x = width_px >= height_px
    long_px, short_px = (width_px, height_px) if along_x else (height_px, width_px)
    slot = long_px / n
    # The distance field is scaled by sqrt(ax * ay), so noise moves the ends of an elongated
    # piece further than edge_noise_um: leave half as much again.
    pad = shape.margin_fraction * short_px + 1.5 * shape.edge_noise_um / mpp
    pieces = []
    for k in range(n):
        fill = rng.uniform(*shape.fill, size=2)
        a_long, a_short = 0.5 * slot * fill[0], 0.5 * short_px * fill[1]
        centre_long = (k + 0.5 + rng.uniform(-0.05, 0.05)) * slot
        centre_short = short_px * (0.5 + rng.uniform(-0.05, 0.05))
        cx, cy = (centre_long, centre_short) if along_x else (centre_short, centre_long)
        ax, ay = (a_long, a_short) if along_x else (a_short, a_long)
        # Tilt a little only: a piece turned across its slot would have to shrink a lot.
        blob = random_blob(rng, cx, cy, ax, ay, shape.irregularity,
                           angle=float(rng.uniform(-0.3, 0.3)))
        # Shrink the piece until its outline fits the slot (scaling about its centre).
        offsets = np.abs(blob.outline() - (cx, cy))
        half_x, half_y = float(offsets[:, 0].max()), float(offsets[:, 1].max())
        limit_long = min(0.5 * slot, centre_long - pad, long_px - centre_long - pad)
        limit_short = min(centre_short, short_px - centre_short) - pad
        limit_x, limit_y = ((limit_long, limit_short) if along_x
                            else (limit_short, limit_long))
        scale = max(0.05, min(1.0, limit_x / half_x, limit_y / half_y))
        pieces.append(Blob(blob.cx, blob.cy, ax * scale, ay * scale, blob.angle, blob.harmonics))
    return pieces


def lumen_holes(rng: np.random.Generator, pieces: list[Blob], mpp: float,
                shape: TissueShape = TissueShape()) -> list[Blob]:
    """Lumen-like holes well inside their piece (centre within 55% of its smallest radius)."""
    holes = []
    for piece in pieces:
        if rng.random() < 0.3:  # some pieces have no holes at all
            continue
        n = int(rng.integers(shape.holes_per_piece[0], shape.holes_per_piece[1] + 1))
        for _ in range(n):
            rho, phi = 0.55 * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            u, v = rho * math.cos(phi) * piece.ax, rho * math.sin(phi) * piece.ay
            c, s = math.cos(piece.angle), math.sin(piece.angle)
            radius_px = rng.uniform(*shape.hole_radius_um) / mpp
            radius_px = min(radius_px, 0.15 * min(piece.ax, piece.ay))
            aspect = rng.uniform(1.0, 1.8)
            holes.append(random_blob(rng, piece.cx + u * c - v * s, piece.cy + u * s + v * c,
                                     radius_px * aspect, radius_px / aspect, 0.08, 3))
    return holes


def tissue_distance(rng: np.random.Generator, pieces: list[Blob], holes: list[Blob],
                    width_px: int, height_px: int, mpp: float,
                    shape: TissueShape = TissueShape(),
                    downsample: int = GRID_DOWNSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance to the tissue edge on the coarse grid (> 0 in tissue, holes excluded),
    and the coarse lumen mask (holes that lie inside a piece)."""
    grid = (-(-height_px // downsample), -(-width_px // downsample))
    floor = -float(max(width_px, height_px))
    pieces_d = max_blob_distance(pieces, grid, downsample, floor)
    # Bounded noise: pieces sized with this much room never reach the border margin.
    ragged = np.clip(smooth_noise(rng, grid, 60.0 / (mpp * downsample)) / 1.5, -1.0, 1.0)
    pieces_d += ragged * (shape.edge_noise_um / mpp)
    holes_d = max_blob_distance(holes, grid, downsample, floor)
    # Keep a margin from the slide border so no piece is cut off.
    y = (np.arange(grid[0], dtype=np.float32) + 0.5) * downsample
    x = (np.arange(grid[1], dtype=np.float32) + 0.5) * downsample
    margin = shape.margin_fraction * min(width_px, height_px)
    border_d = np.minimum(np.minimum(y, height_px - y)[:, None],
                          np.minimum(x, width_px - x)[None, :]) - margin
    tissue_d = np.minimum(np.minimum(pieces_d, -holes_d), border_d)
    return tissue_d, (holes_d > 0) & (pieces_d > 0)


def tumour_regions(rng: np.random.Generator, tissue_grid: np.ndarray, downsample: int,
                   fraction: float, shape: TumourShape = TumourShape()) -> list[Blob]:
    """Tumour blobs centred deep enough inside tissue that they stay clear of edges and holes."""
    tissue_area_px = float(tissue_grid.sum()) * downsample**2
    n = int(rng.integers(shape.n_regions[0], shape.n_regions[1] + 1))
    shares = rng.dirichlet(np.full(n, 2.0))
    inside_px = cv2.distanceTransform(tissue_grid.astype(np.uint8), cv2.DIST_L2, 5) * downsample
    blobs = []
    for share in shares:
        aspect = rng.uniform(1.0, 1.6)
        radius_px = math.sqrt(share * fraction * tissue_area_px / math.pi)
        candidates = np.flatnonzero(inside_px > 1.4 * radius_px * aspect + downsample)
        flat = (int(rng.choice(candidates)) if len(candidates)
                else int(np.argmax(inside_px)))
        i, j = divmod(flat, tissue_grid.shape[1])
        blobs.append(random_blob(rng, (j + 0.5) * downsample, (i + 0.5) * downsample,
                                 radius_px * aspect, radius_px / aspect, shape.irregularity))
    return blobs


def upsample_mask(field: np.ndarray, threshold: float, width_px: int, height_px: int,
                  downsample: int) -> np.ndarray:
    """Level-0 bool mask `field > threshold`, interpolating the coarse field (smooth edges)."""
    gh, gw = field.shape
    up = cv2.resize(field, (gw * downsample, gh * downsample), interpolation=cv2.INTER_LINEAR)
    return up[:height_px, :width_px] > threshold


def slide_geometry(rng: np.random.Generator, width_px: int, height_px: int, mpp: float,
                   positive: bool, tissue_shape: TissueShape = TissueShape(),
                   tumour_shape: TumourShape = TumourShape(),
                   downsample: int = GRID_DOWNSAMPLE) -> SlideGeometry:
    """Tissue with holes, and for positives tumour covering exactly a drawn share of the tissue
    (on the coarse grid; the level-0 share matches to within edge interpolation)."""
    pieces = tissue_pieces(rng, width_px, height_px, mpp, tissue_shape)
    holes = lumen_holes(rng, pieces, mpp, tissue_shape)
    tissue_d, lumen_grid = tissue_distance(rng, pieces, holes, width_px, height_px, mpp,
                                           tissue_shape, downsample)
    tissue_grid = tissue_d > 0
    tissue = upsample_mask(tissue_d, 0.0, width_px, height_px, downsample)
    tumour = np.zeros_like(tissue)
    tumour_grid = np.zeros_like(tissue_grid)
    fraction = 0.0
    if positive and tissue_grid.any():
        fraction = float(rng.uniform(*tumour_shape.fraction))
        blobs = tumour_regions(rng, tissue_grid, downsample, fraction, tumour_shape)
        tumour_d = max_blob_distance(blobs, tissue_grid.shape, downsample,
                                     -float(max(width_px, height_px)))
        # Pick the level that makes the tumour exactly `fraction` of the coarse tissue.
        values = np.sort(tumour_d[tissue_grid])[::-1]
        k = min(max(1, round(fraction * len(values))), len(values))
        lower = float(values[k]) if k < len(values) else float(values[-1]) - 2.0
        threshold = (float(values[k - 1]) + lower) / 2
        tumour_grid = (tumour_d > threshold) & tissue_grid
        tumour = upsample_mask(tumour_d, threshold, width_px, height_px, downsample) & tissue
    return SlideGeometry(tissue, tumour, tissue_grid, lumen_grid, tumour_grid, fraction)


# --- rendering --------------------------------------------------------------------------------


def stain_lut(haematoxylin_scale: float = 1.0, eosin_scale: float = 1.0) -> np.ndarray:
    """RGB (65536 x 3 uint8) for every quantised (haematoxylin, eosin) amount: Beer-Lambert
    once per table entry instead of an exp per pixel."""
    amounts = np.arange(256, dtype=np.float64) / OD_STEPS_PER_UNIT
    od = (amounts[:, None, None] * HAEMATOXYLIN_OD * haematoxylin_scale
          + amounts[None, :, None] * EOSIN_OD * eosin_scale)
    rgb = np.asarray(BACKGROUND_RGB) * np.exp(-od)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(-1, 3)


def sample_points(rng: np.random.Generator, density_grid: np.ndarray, downsample: int,
                  mask: np.ndarray) -> np.ndarray:
    """Poisson points (N x 2 int, x/y level-0 px) from a per-px density on the coarse grid,
    kept where the level-0 `mask` is set."""
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
    keep = mask[y, x]
    return np.stack([x[keep], y[keep]], axis=1)


def draw_nuclei(rng: np.random.Generator, layer: np.ndarray, points: np.ndarray,
                axes_px: tuple[float, float, float, float], intensity: tuple[int, int],
                angle_deg: float | None = None, vesicular: bool = False) -> None:
    """Filled ellipses into a uint8 haematoxylin layer. axes_px = (long min, long max, short min,
    short max); angle None = random orientation; vesicular adds a pale centre and a nucleolus."""
    n = len(points)
    long_ax = rng.uniform(axes_px[0], axes_px[1], n)
    short_ax = np.minimum(rng.uniform(axes_px[2], axes_px[3], n), long_ax)
    angles = (rng.uniform(0, 180, n) if angle_deg is None
              else angle_deg + rng.normal(0, 15, n))
    values = rng.integers(intensity[0], intensity[1] + 1, n)
    for (x, y), a, b, ang, val in zip(points.tolist(), long_ax.tolist(), short_ax.tolist(),
                                      angles.tolist(), values.tolist(), strict=True):
        axes = (max(1, round(a)), max(1, round(b)))
        cv2.ellipse(layer, (x, y), axes, ang, 0, 360, val, -1)
        if vesicular and b >= 4:
            cv2.ellipse(layer, (x, y), (round(a * 0.55), round(b * 0.55)), ang, 0, 360,
                        int(val * 0.7), -1)
            cv2.circle(layer, (x + round(b * 0.2), y), max(1, round(b * 0.22)), 255, -1)


def render_rgb(rng: np.random.Generator, geometry: SlideGeometry, mpp: float,
               downsample: int = GRID_DOWNSAMPLE) -> np.ndarray:
    """H&E-like RGB (H x W x 3 uint8) from the masks: stain amounts per pixel -> look-up table."""
    tissue, tumour = geometry.tissue, geometry.tumour
    h, w = tissue.shape
    grid = geometry.tissue_grid.shape
    fibre_angle = float(rng.uniform(0, 180))

    # Stroma fibres: noise at half resolution smeared along one direction.
    half = (-(-h // 2), -(-w // 2))
    length = max(3, round(6.0 / mpp) | 1)
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), fibre_angle, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    fibres = cv2.filter2D(rng.standard_normal(half, dtype=np.float32), -1, kernel)
    fibres *= 1.0 / max(float(fibres.std()), 1e-6)
    fibres = cv2.resize(fibres, (half[1] * 2, half[0] * 2), interpolation=cv2.INTER_LINEAR)
    stain_var = cv2.resize(smooth_noise(rng, grid, 250.0 / (mpp * downsample)),
                           (grid[1] * downsample, grid[0] * downsample))

    # Stain amounts in OD x OD_STEPS_PER_UNIT, computed in place (these arrays are slide-sized).
    # Eosin: fibrous, patchy stroma; haematoxylin: a faint cytoplasmic tint.
    eosin = fibres[:h, :w]
    eosin *= 7.0
    eosin += 26.0
    eosin += 4.0 * stain_var[:h, :w]
    eosin *= tissue
    haem = (3.0 + 1.5 * stain_var[:h, :w]) * tissue

    # Nuclei: sparse spindle and round ones in stroma, crowded along lumen edges.
    layer = np.zeros((h, w), np.uint8)
    um2_per_px = mpp * mpp
    density = geometry.tissue_grid * (um2_per_px / 150.0)  # one nucleus per 150 µm²
    lining = np.zeros_like(geometry.tissue_grid)
    if geometry.lumen_grid.any():
        lumen_px = cv2.distanceTransform((~geometry.lumen_grid).astype(np.uint8), cv2.DIST_L2, 3)
        lining = (lumen_px * (downsample * mpp) < 14.0) & geometry.tissue_grid
    density = density * (0.6 + 0.4 * np.clip(1.0 + 0.5 * smooth_noise(rng, grid, 20.0), 0, 3))
    density[lining] *= 5.0
    um = 1.0 / mpp
    points = sample_points(rng, density.astype(np.float32), downsample, tissue)
    spindle = rng.random(len(points)) < 0.6
    draw_nuclei(rng, layer, points[spindle], (3.5 * um, 5.0 * um, 1.0 * um, 1.6 * um),
                (150, 210), angle_deg=-fibre_angle)
    draw_nuclei(rng, layer, points[~spindle], (2.0 * um, 2.8 * um, 1.7 * um, 2.4 * um),
                (170, 230))
    if geometry.tumour.any():
        # Tumour: large, crowded, hyperchromatic nuclei with nucleoli on bluish cytoplasm.
        tumour_density = geometry.tumour_grid * (um2_per_px / 55.0)
        points = sample_points(rng, tumour_density.astype(np.float32), downsample, tumour)
        draw_nuclei(rng, layer, points, (4.5 * um, 6.5 * um, 3.5 * um, 5.0 * um), (200, 245),
                    vesicular=True)
        eosin[tumour] *= 0.45
        haem[tumour] += 18.0
    layer = cv2.GaussianBlur(layer, (5, 5), 0.35 * um)
    nuclear = layer.astype(np.float32) * (1.0 / 255.0)
    haem += nuclear * 80.0
    eosin *= 1.0 - 0.6 * nuclear

    # Dither so the background is 235-245 and the JPEG sees texture, not flat colour.
    dither = rng.integers(0, 16, size=(h, w), dtype=np.uint8)  # two 2-bit draws per pixel
    haem_q = np.clip(haem, 0, 252).astype(np.uint8) + (dither & 3)
    eosin_q = np.clip(eosin, 0, 252).astype(np.uint8) + (dither >> 2)
    lut = stain_lut(rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1))
    index = (haem_q.astype(np.uint16) << 8) | eosin_q
    return lut[index]


# --- writing ----------------------------------------------------------------------------------


def pyramid(level0: np.ndarray) -> list[np.ndarray]:
    """Factor-4 reductions (INTER_AREA) until the longer side is below PYRAMID_STOP_PX."""
    levels = [level0]
    while max(levels[-1].shape[:2]) >= PYRAMID_STOP_PX:
        h, w = levels[-1].shape[:2]
        size = (max(1, w // LEVEL_DOWNSAMPLE), max(1, h // LEVEL_DOWNSAMPLE))
        levels.append(cv2.resize(levels[-1], size, interpolation=cv2.INTER_AREA))
    return levels


def write_svs(path: str | Path, levels: list[np.ndarray], mpp: float) -> None:
    """Aperio-style: level 0, a stripped thumbnail, then the reduced levels (what OpenSlide's
    aperio driver expects), with AppMag and MPP in the first page's description."""
    h0, w0 = levels[0].shape[:2]
    head = f"Aperio Image Library v12.0.0 \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({TILE_PX}x{TILE_PX})"
    tail = f"JPEG/RGB Q={JPEG_QUALITY}|AppMag = {APP_MAG}|MPP = {mpp:g}"
    scale = min(1.0, APERIO_THUMBNAIL_PX / max(h0, w0))
    thumb_size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    source = next((lv for lv in reversed(levels) if lv.shape[1] >= thumb_size[0]), levels[0])
    thumbnail = cv2.resize(source, thumb_size, interpolation=cv2.INTER_AREA)
    bigtiff = levels[0].nbytes > 2**32 - 2**28
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        tif.write(levels[0], tile=(TILE_PX, TILE_PX), description=f"{head} {tail}",
                  **TIFF_OPTIONS)
        tif.write(thumbnail, rowsperstrip=16,
                  description=f"{head} -> {thumb_size[0]}x{thumb_size[1]} {tail}",
                  **TIFF_OPTIONS)
        for level in levels[1:]:
            h, w = level.shape[:2]
            tif.write(level, tile=(TILE_PX, TILE_PX), subfiletype=0,
                      description=f"{head} -> {w}x{h} {tail}", **TIFF_OPTIONS)


def write_tiled_tiff(path: str | Path, levels: list[np.ndarray], mpp: float) -> None:
    """Generic tiled TIFF: µm/px in the resolution tags, reduced levels as subfiletype-1 pages
    (OpenSlide does not see a pyramid kept in SubIFDs)."""
    h0, w0 = levels[0].shape[:2]
    px_per_cm = 1e4 / mpp
    bigtiff = levels[0].nbytes > 2**32 - 2**28
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for i, level in enumerate(levels):
            downsample = w0 / level.shape[1]
            tif.write(level, tile=(TILE_PX, TILE_PX), subfiletype=1 if i else 0,
                      resolution=(px_per_cm / downsample, px_per_cm / downsample),
                      resolutionunit="CENTIMETER",
                      description="srmil synthetic demo slide" if i == 0 else None,
                      **TIFF_OPTIONS)


def tumour_geojson(tumour: np.ndarray, downsample: int = ANNOTATION_DOWNSAMPLE) -> dict:
    """QuPath-style FeatureCollection of tumour Polygons (with holes) in level-0 px."""
    h, w = tumour.shape
    small = cv2.resize(tumour.astype(np.uint8) * 255, (max(1, w // downsample),
                                                       max(1, h // downsample)),
                       interpolation=cv2.INTER_AREA) >= 128
    contours, hierarchy = cv2.findContours(small.astype(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return {"type": "FeatureCollection", "features": []}
    rings = [_ring(c, downsample) for c in contours]
    features = []
    for i, ring in enumerate(rings):
        if hierarchy[0][i][3] != -1 or ring is None:
            continue  # holes are attached to their outer contour below
        holes = [rings[j] for j in range(len(rings))
                 if hierarchy[0][j][3] == i and rings[j] is not None]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [_oriented(ring, True)]
                         + [_oriented(r, False) for r in holes]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        })
    return {"type": "FeatureCollection", "features": features}


def _ring(contour: np.ndarray, downsample: int) -> list[list[float]] | None:
    """A closed ring in level-0 px (contour points are pixel centres at `downsample`)."""
    pts = cv2.approxPolyDP(contour, 0.75, True).reshape(-1, 2)
    if len(pts) < 3:
        return None
    ring = [[(float(x) + 0.5) * downsample, (float(y) + 0.5) * downsample] for x, y in pts]
    return ring + [ring[0]]


def _oriented(ring: list[list[float]], counter_clockwise: bool) -> list[list[float]]:
    """RFC 7946 winding: exterior counter-clockwise, holes clockwise (in x/y as written)."""
    xy = np.asarray(ring)
    area2 = float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))
    return ring if (area2 > 0) == counter_clockwise else ring[::-1]


def _write_png(path: Path, mask: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", mask)
    if not ok:
        raise OSError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def mask_at_downsample(mask: np.ndarray, downsample: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """uint8 0/255 mask of the level-0 bool mask at `downsample` (majority per cell)."""
    h, w = mask.shape
    size = (max(1, round(w / downsample)), max(1, round(h / downsample)))
    small = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
    return np.where(small >= 128, 255, 0).astype(np.uint8)


def write_slide(out_dir: Path, row: dict[str, str], index: int, seed: int, width_px: int,
                height_px: int, mpp: float) -> SlideGeometry:
    """Generate one slide and its masks (and annotation, for positives) under out_dir."""
    rng = np.random.default_rng([seed, index])
    geometry = slide_geometry(rng, width_px, height_px, mpp, row["label"] == POSITIVE)
    levels = pyramid(render_rgb(rng, geometry, mpp))
    path = out_dir / row["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    (write_svs if path.suffix == ".svs" else write_tiled_tiff)(path, levels, mpp)
    masks = out_dir / "masks"
    _write_png(masks / f"{row['slide_id']}.tissue.png", mask_at_downsample(geometry.tissue))
    _write_png(masks / f"{row['slide_id']}.tumour.png", mask_at_downsample(geometry.tumour))
    if row["annotation"]:
        write_text(out_dir / row["annotation"], json.dumps(tumour_geojson(geometry.tumour)) + "\n")
    return geometry


def write_demo(out_dir: str | Path, n_slides: int = 24, seed: int = 0, width_px: int = 4096,
               height_px: int = 3072, mpp: float = 0.5, progress: bool = True) -> Path:
    """Generate the cohort; return the path of samples.csv."""
    out_dir = Path(out_dir)
    rows = planned_sheet(out_dir, n_slides, seed)
    for index, row in enumerate(tqdm(rows, desc="demo slides", unit="slide",
                                     disable=not progress)):
        write_slide(out_dir, row, index, seed, width_px, height_px, mpp)
    # The sheet goes last: its presence means the cohort is complete.
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SHEET_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sheet = out_dir / "samples.csv"
    write_text(sheet, buffer.getvalue())
    return sheet
