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

from srmil.errors import InputError
from srmil.store import atomic_path, write_text

SHEET_COLUMNS = ("slide_id", "path", "patient_id", "label", "annotation")
POSITIVE, NEGATIVE = "tumour", "normal"
TILE_PX = 256
LEVEL_DOWNSAMPLE = 4
PYRAMID_STOP_PX = 1024  # add factor-4 levels until the longer side is below this
MASK_DOWNSAMPLE = 16  # ground-truth masks in masks/
ANNOTATION_DOWNSAMPLE = 4  # tumour contours are traced at this downsample, then scaled up
GRID_DOWNSAMPLE = 8  # geometry fields live on this coarse grid
# Slides with more level-0 px than this are rendered in bands of BAND_PX rows, so memory stays
# bounded (the default demo slides are smaller and rendered whole).
BANDED_MIN_PX = 64 * 2**20
BAND_PX = 512  # a multiple of TILE_PX, MASK_DOWNSAMPLE and LEVEL_DOWNSAMPLE
NOISE_BLOCK_ROWS = 64  # fibre noise of large slides comes in row blocks, one seed per block
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
    extent_um: tuple[float, float] | None = None  # lay pieces out in a centred box this size


# Small biopsies: a few fragments within about 2 x 1.5 mm, wherever the slide is larger.
BIOPSY = TissueShape(n_pieces=(2, 4), fill=(0.55, 0.85), extent_um=(2000.0, 1500.0),
                     holes_per_piece=(0, 3))


@dataclass(frozen=True)
class Artifacts:
    """What a slide carries besides tissue: pen strokes (blue, green or black marker ink) and a
    black border (the dark frame some scanners leave). Neither counts as tissue."""

    pen_strokes: int = 0
    black_border: bool = False

    def any(self) -> bool:
        return self.pen_strokes > 0 or self.black_border


@dataclass(frozen=True)
class TumourShape:
    fraction: tuple[float, float] = (0.02, 0.05)  # of the tissue area
    n_regions: tuple[int, int] = (1, 3)
    irregularity: float = 0.18
    # How far tumour differs from stroma (stain, nuclear size, density, darkness): 1 = the
    # demo's conspicuous tumour, towards 0 = barely distinguishable (harder cohorts).
    contrast: float = 1.0


@dataclass
class SlideGeometry:
    """Level-0 masks plus the coarse fields they came from (for nuclei density and tests)."""

    tissue: np.ndarray  # bool H x W, holes excluded
    tumour: np.ndarray  # bool H x W, inside tissue
    tissue_grid: np.ndarray  # bool on the coarse grid
    lumen_grid: np.ndarray  # bool on the coarse grid (holes inside tissue pieces)
    tumour_grid: np.ndarray  # bool on the coarse grid
    tumour_fraction: float  # the target drawn for this slide (0 for negatives)
    pieces: tuple[Blob, ...] = ()  # the tissue pieces before roughening (for pen circles)
    tumour_contrast: float = 1.0  # TumourShape.contrast


# --- the cohort plan: cheap, no pixels --------------------------------------------------------


def planned_sheet(out_dir: str | Path, n_slides: int = 24, seed: int = 0,
                  prefix: str = "demo") -> list[dict[str, str]]:
    """Rows of samples.csv (slide_id, path, patient_id, label, annotation) without writing anything;
    cheap (no image generation), used by the Snakefile at parse time. Slide ids are
    `{prefix}_000`, ...: two cohorts with different prefixes share one results folder."""
    del out_dir  # paths are relative to the sheet's folder; kept for the callers' symmetry
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    rng = np.random.default_rng([seed, n_slides, 0x5EED])  # separate stream from the slides'
    labels = _balanced_labels(rng, n_slides)
    patient_of = _patients(rng, labels)
    rows = []
    for i in range(n_slides):
        slide_id = f"{prefix}_{i:03d}"
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
    if n == 0:  # a blank slide
        return []
    off_x = off_y = 0.0
    if shape.extent_um is not None:  # a centred box instead of the whole slide
        box_w = min(float(width_px), shape.extent_um[0] / mpp)
        box_h = min(float(height_px), shape.extent_um[1] / mpp)
        off_x, off_y = (width_px - box_w) / 2, (height_px - box_h) / 2
        width_px, height_px = box_w, box_h
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
        if shape.extent_um is None:
            pieces.append(Blob(blob.cx, blob.cy, ax * scale, ay * scale, blob.angle,
                               blob.harmonics))
        else:
            pieces.append(Blob(blob.cx + off_x, blob.cy + off_y, ax * scale, ay * scale,
                               blob.angle, blob.harmonics))
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


@dataclass
class SlideFields:
    """The coarse geometry of a slide; level-0 masks of any band of rows come from it."""

    width_px: int
    height_px: int
    downsample: int
    tissue_d: np.ndarray  # signed distance to the tissue edge on the coarse grid
    tumour_d: np.ndarray | None
    tumour_threshold: float
    tissue_grid: np.ndarray
    lumen_grid: np.ndarray
    tumour_grid: np.ndarray
    tumour_fraction: float
    pieces: tuple[Blob, ...]
    tumour_contrast: float = 1.0

    def masks(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 bool (tissue, tumour) of rows y0..y1, equal to those rows of the whole
        slide's masks (each band is interpolated with a one-cell halo)."""
        tissue = band_field(self.tissue_d, y0, y1, self.width_px, self.downsample) > 0
        if self.tumour_d is None:
            return tissue, np.zeros_like(tissue)
        tumour = band_field(self.tumour_d, y0, y1, self.width_px, self.downsample)
        return tissue, (tumour > self.tumour_threshold) & tissue


def band_field(field: np.ndarray, y0: int, y1: int, width_px: int,
               downsample: int) -> np.ndarray:
    """Rows y0..y1 of the coarse field bilinearly upsampled to level 0 (cv2.resize of the whole
    field gives the same values: the source position of a row depends only on its index)."""
    gh, gw = field.shape
    g0, g1 = max(0, y0 // downsample - 1), min(gh, -(-y1 // downsample) + 1)
    up = cv2.resize(field[g0:g1], (gw * downsample, (g1 - g0) * downsample),
                    interpolation=cv2.INTER_LINEAR)
    return up[y0 - g0 * downsample:y1 - g0 * downsample, :width_px]


def slide_fields(rng: np.random.Generator, width_px: int, height_px: int, mpp: float,
                 positive: bool, tissue_shape: TissueShape = TissueShape(),
                 tumour_shape: TumourShape = TumourShape(),
                 downsample: int = GRID_DOWNSAMPLE) -> SlideFields:
    """Tissue with holes, and for positives tumour covering exactly a drawn share of the tissue
    (on the coarse grid; the level-0 share matches to within edge interpolation)."""
    pieces = tissue_pieces(rng, width_px, height_px, mpp, tissue_shape)
    holes = lumen_holes(rng, pieces, mpp, tissue_shape)
    tissue_d, lumen_grid = tissue_distance(rng, pieces, holes, width_px, height_px, mpp,
                                           tissue_shape, downsample)
    tissue_grid = tissue_d > 0
    tumour_grid = np.zeros_like(tissue_grid)
    tumour_d, threshold, fraction = None, 0.0, 0.0
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
    return SlideFields(width_px, height_px, downsample, tissue_d, tumour_d, threshold,
                       tissue_grid, lumen_grid, tumour_grid, fraction, tuple(pieces),
                       tumour_shape.contrast)


def slide_geometry(rng: np.random.Generator, width_px: int, height_px: int, mpp: float,
                   positive: bool, tissue_shape: TissueShape = TissueShape(),
                   tumour_shape: TumourShape = TumourShape(),
                   downsample: int = GRID_DOWNSAMPLE) -> SlideGeometry:
    """The fields of `slide_fields` with whole-slide level-0 masks (small slides only)."""
    f = slide_fields(rng, width_px, height_px, mpp, positive, tissue_shape, tumour_shape,
                     downsample)
    tissue = upsample_mask(f.tissue_d, 0.0, width_px, height_px, downsample)
    tumour = np.zeros_like(tissue)
    if f.tumour_d is not None:
        tumour = upsample_mask(f.tumour_d, f.tumour_threshold, width_px, height_px,
                               downsample) & tissue
    return SlideGeometry(tissue, tumour, f.tissue_grid, f.lumen_grid, f.tumour_grid,
                         f.tumour_fraction, f.pieces, f.tumour_contrast)


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
class MaskAt:
    """A level-0 mask of a large slide, evaluated at points band by band instead of held."""

    fields: SlideFields
    kind: str  # "tissue" or "tumour"

    @property
    def shape(self) -> tuple[int, int]:
        return self.fields.height_px, self.fields.width_px

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(len(x), bool)
        order = np.argsort(y, kind="stable")
        for y0 in range(0, self.fields.height_px, BAND_PX):
            lo, hi = np.searchsorted(y[order], [y0, y0 + BAND_PX])
            if hi > lo:
                idx = order[lo:hi]
                tissue, tumour = self.fields.masks(y0, min(y0 + BAND_PX, self.shape[0]))
                mask = tissue if self.kind == "tissue" else tumour
                out[idx] = mask[y[idx] - y0, x[idx]]
        return out


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


def paint_nuclei(layer: np.ndarray, nuclei: Nuclei, y_offset: int | None = None) -> None:
    """Filled ellipses into a uint8 haematoxylin layer; with `y_offset`, the layer is a band
    whose row 0 is that level-0 row, and only nuclei reaching it are drawn."""
    if y_offset is not None:
        reach = float(nuclei.long_ax.max(initial=0.0)) + 2
        y = nuclei.points[:, 1]
        keep = np.flatnonzero((y >= y_offset - reach) & (y < y_offset + layer.shape[0] + reach))
    else:
        keep = np.arange(len(nuclei.points))
    for i in keep.tolist():
        x, y = nuclei.points[i].tolist()
        y -= y_offset or 0
        a, b = float(nuclei.long_ax[i]), float(nuclei.short_ax[i])
        ang, val = float(nuclei.angles[i]), int(nuclei.values[i])
        axes = (max(1, round(a)), max(1, round(b)))
        cv2.ellipse(layer, (x, y), axes, ang, 0, 360, val, -1)
        if nuclei.vesicular and b >= 4:
            cv2.ellipse(layer, (x, y), (round(a * 0.55), round(b * 0.55)), ang, 0, 360,
                        int(val * 0.7), -1)
            cv2.circle(layer, (x + round(b * 0.2), y), max(1, round(b * 0.22)), 255, -1)


def draw_nuclei(rng: np.random.Generator, layer: np.ndarray, points: np.ndarray,
                axes_px: tuple[float, float, float, float], intensity: tuple[int, int],
                angle_deg: float | None = None, vesicular: bool = False) -> None:
    """Filled ellipses into a uint8 haematoxylin layer (see `nuclei_params`)."""
    paint_nuclei(layer, nuclei_params(rng, points, axes_px, intensity, angle_deg, vesicular))


def fibre_kernel(mpp: float, fibre_angle: float) -> np.ndarray:
    """A short line kernel that smears noise into stroma fibres along one direction."""
    length = max(3, round(6.0 / mpp) | 1)
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), fibre_angle, 1.0)
    return cv2.warpAffine(kernel, rot, (length, length))


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


def render_rgb(rng: np.random.Generator, geometry: SlideGeometry, mpp: float,
               downsample: int = GRID_DOWNSAMPLE) -> np.ndarray:
    """H&E-like RGB (H x W x 3 uint8) of a whole (small) slide from its masks."""
    tissue, tumour = geometry.tissue, geometry.tumour
    h, w = tissue.shape
    grid = geometry.tissue_grid.shape
    fibre_angle = float(rng.uniform(0, 180))

    # Stroma fibres: noise at half resolution smeared along one direction.
    half = (-(-h // 2), -(-w // 2))
    fibres = cv2.filter2D(rng.standard_normal(half, dtype=np.float32), -1,
                          fibre_kernel(mpp, fibre_angle))
    fibres *= 1.0 / max(float(fibres.std()), 1e-6)
    fibres = cv2.resize(fibres, (half[1] * 2, half[0] * 2), interpolation=cv2.INTER_LINEAR)
    stain_var = cv2.resize(smooth_noise(rng, grid, 250.0 / (mpp * downsample)),
                           (grid[1] * downsample, grid[0] * downsample))

    # Nuclei: sparse spindle and round ones in stroma, crowded along lumen edges.
    layer = np.zeros((h, w), np.uint8)
    density = nuclei_density(rng, geometry.tissue_grid, geometry.lumen_grid, mpp, downsample)
    for nuclei in stroma_and_tumour_nuclei(rng, density, geometry.tumour_grid, downsample,
                                           tissue, tumour if tumour.any() else None, mpp,
                                           fibre_angle, geometry.tumour_contrast):
        paint_nuclei(layer, nuclei)
    dither = rng.integers(0, 16, size=(h, w), dtype=np.uint8)  # two 2-bit draws per pixel
    lut = stain_lut(rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1))
    return shade(fibres[:h, :w], stain_var[:h, :w], tissue, tumour, layer, dither, lut, mpp,
                 geometry.tumour_contrast)


def stroma_and_tumour_nuclei(rng: np.random.Generator, density: np.ndarray,
                             tumour_grid: np.ndarray, downsample: int, tissue: np.ndarray,
                             tumour: np.ndarray | None, mpp: float,
                             fibre_angle: float, contrast: float = 1.0) -> list[Nuclei]:
    """Spindle and round stromal nuclei, then (where there is tumour) large, crowded,
    hyperchromatic nuclei with nucleoli. `tissue` / `tumour` are level-0 masks, or callables
    (points -> bool) for slides too large to hold them."""
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


# --- artifacts: pen ink and black borders ----------------------------------------------------

# Marker inks seen on slides (RGB seen through the ink on white glass).
PEN_INKS = {"blue": (22, 60, 170), "green": (30, 130, 60), "black": (28, 28, 34)}
ARTIFACT_STREAM = 0xA27  # artifacts draw from their own stream: tissue stays as without them


@dataclass(frozen=True)
class PenStroke:
    points: np.ndarray  # (n, 2) level-0 px along the stroke
    width_px: float
    rgb: tuple[int, int, int]
    density: float  # 1 = as dark as the ink gets


@dataclass(frozen=True)
class BlackBorder:
    """Per side (left, right, top, bottom): the border's width in px at both ends of that side
    (0 = none), so the inner edge may slant."""

    widths: tuple[tuple[float, float], ...]
    level: int  # mean grey value of the border


def plan_artifacts(rng: np.random.Generator, pieces: tuple[Blob, ...], width_px: int,
                   height_px: int, mpp: float,
                   artifacts: Artifacts) -> tuple[list[PenStroke], BlackBorder | None]:
    """Pen strokes (circles drawn around a tissue piece, or a short scribble) and a border."""
    strokes = []
    short = min(width_px, height_px)
    for k in range(artifacts.pen_strokes):
        ink = list(PEN_INKS)[int(rng.integers(len(PEN_INKS)))]
        width = min(rng.uniform(60.0, 200.0) / mpp, 0.03 * short)
        if k % 2 == 0 and pieces:  # the usual mark: a loop around a region of interest
            piece = pieces[int(rng.integers(len(pieces)))]
            t0 = rng.uniform(0, 2 * np.pi)
            t = t0 + np.linspace(0, rng.uniform(1.1, 1.8) * np.pi, 120)
            grow = rng.uniform(1.05, 1.35)
            c, s_ = math.cos(piece.angle), math.sin(piece.angle)
            u, v = grow * piece.reach() * np.cos(t), grow * piece.reach() * np.sin(t) * 0.8
            pts = np.stack([piece.cx + u * c - v * s_, piece.cy + u * s_ + v * c], 1)
        else:  # a scribble near a corner
            x0 = rng.uniform(0.04, 0.2) * width_px
            y0 = rng.uniform(0.04, 0.2) * height_px
            if rng.random() < 0.5:
                x0 = width_px - x0
            steps = rng.normal(0, 0.04 * short, size=(6, 2))
            pts = np.array([x0, y0]) + np.cumsum(steps, 0)
        pts[:, 0] = np.clip(pts[:, 0], 0, width_px - 1)
        pts[:, 1] = np.clip(pts[:, 1], 0, height_px - 1)
        strokes.append(PenStroke(pts, float(width), PEN_INKS[ink], float(rng.uniform(0.8, 1.0))))
    border = None
    if artifacts.black_border:
        sides = rng.permutation(4)[: int(rng.integers(1, 3))]
        widths = [(0.0, 0.0)] * 4
        for side in sides.tolist():
            extent = width_px if side < 2 else height_px
            widths[side] = tuple(float(w) for w in rng.uniform(0.006, 0.02, 2) * extent)
        border = BlackBorder(tuple(widths), int(rng.integers(14, 34)))
    return strokes, border


def apply_artifacts(rgb: np.ndarray, y0: int, height_px: int, strokes: list[PenStroke],
                    border: BlackBorder | None, rng: np.random.Generator) -> np.ndarray:
    """Draw ink and border onto rows y0.. of a slide (in place); return where they cover it
    (bool), which is not tissue."""
    h, w = rgb.shape[:2]
    covered = np.zeros((h, w), bool)
    for stroke in strokes:
        reach = stroke.width_px / 2 + 2
        top = max(0, math.floor(stroke.points[:, 1].min() - reach) - y0)
        bottom = min(h, math.ceil(stroke.points[:, 1].max() + reach) - y0)
        left = max(0, math.floor(stroke.points[:, 0].min() - reach))
        right = min(w, math.ceil(stroke.points[:, 0].max() + reach))
        if top >= bottom or left >= right:
            continue
        alpha = np.zeros((bottom - top, right - left), np.uint8)
        pts = np.rint((stroke.points - (left, y0 + top)) * 16).astype(np.int32)
        cv2.polylines(alpha, [pts], False, 255, max(1, round(stroke.width_px)), cv2.LINE_AA, 4)
        region = rgb[top:bottom, left:right]
        log_t = np.log(np.asarray(stroke.rgb, np.float32) / np.asarray(BACKGROUND_RGB, np.float32))
        a = alpha.astype(np.float32) * (stroke.density / 255.0)
        region[...] = np.clip(region * np.exp(a[..., None] * log_t), 0, 255).astype(np.uint8)
        covered[top:bottom, left:right] |= alpha >= 128
    if border is not None:
        y = np.arange(y0, y0 + h, dtype=np.float32)[:, None] / max(1, height_px - 1)
        x = np.arange(w, dtype=np.float32)[None, :] / max(1, w - 1)
        (l0, l1), (r0, r1), (t0, t1), (b0, b1) = border.widths
        xs, ys = x * (w - 1), y * (height_px - 1)
        dark = ((xs < l0 + (l1 - l0) * y) | (xs >= w - (r0 + (r1 - r0) * y))
                | (ys < t0 + (t1 - t0) * x) | (ys >= height_px - (b0 + (b1 - b0) * x)))
        if dark.any():
            n = int(dark.sum())
            noise = rng.integers(-6, 7, size=(n, 1), dtype=np.int16)
            rgb[dark] = np.clip(border.level + noise + np.array([0, 0, 4]), 0, 255)
            covered |= dark
    return covered


# --- large slides, rendered in bands of rows --------------------------------------------------


class BandedSlide:
    """Level 0 of a slide too large to hold, rendered band by band while it is written.

    Global randomness (stain variation, nuclei and their shapes, colours) is drawn once; noise
    that needs neighbours (fibres) is a fixed function of position, drawn in seeded row blocks,
    so bands join without seams. While tiles are handed out, level 1 (downsample 4), the
    ground-truth masks and the tumour annotation mask are collected at their downsample.
    """

    def __init__(self, seed: int, index: int, fields: SlideFields, mpp: float,
                 rng: np.random.Generator, strokes: list[PenStroke],
                 border: BlackBorder | None) -> None:
        self.seed, self.index, self.fields, self.mpp = seed, index, fields, mpp
        self.strokes, self.border = strokes, border
        h, w = fields.height_px, fields.width_px
        self.shape = (h, w, 3)
        self.nbytes = h * w * 3
        ds = fields.downsample
        grid = fields.tissue_grid.shape
        self.fibre_angle = float(rng.uniform(0, 180))
        self.kernel = fibre_kernel(mpp, self.fibre_angle)
        self.fibre_std = float(np.sqrt(np.sum(self.kernel.astype(np.float64) ** 2)))
        self.stain_grid = smooth_noise(rng, grid, 250.0 / (mpp * ds))
        density = nuclei_density(rng, fields.tissue_grid, fields.lumen_grid, mpp, ds)
        tumour = MaskAt(fields, "tumour") if fields.tumour_d is not None else None
        self.nuclei = stroma_and_tumour_nuclei(rng, density, fields.tumour_grid, ds,
                                               MaskAt(fields, "tissue"), tumour, mpp,
                                               self.fibre_angle, fields.tumour_contrast)
        self.lut = stain_lut(rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1))
        reach = max((float(n.long_ax.max(initial=0.0)) for n in self.nuclei), default=0.0)
        self.halo = int(math.ceil(max(reach, self.kernel.shape[0]))) + 8
        self.level1 = np.zeros((h // LEVEL_DOWNSAMPLE, w // LEVEL_DOWNSAMPLE, 3), np.uint8)
        self.tissue16 = np.zeros((-(-h // MASK_DOWNSAMPLE), -(-w // MASK_DOWNSAMPLE)), np.uint8)
        self.tumour16 = np.zeros_like(self.tissue16)
        self.tumour4 = np.zeros((h // ANNOTATION_DOWNSAMPLE, w // ANNOTATION_DOWNSAMPLE), bool)

    def _fibres(self, e0: int, e1: int) -> np.ndarray:
        """Unit fibre noise for rows e0..e1 (level 0), the same whichever band asks."""
        pad = self.kernel.shape[0]
        h0, h1 = max(0, e0 // 2 - pad), min(-(-self.fields.height_px // 2), -(-e1 // 2) + pad)
        half_w = -(-self.fields.width_px // 2)
        blocks = []
        for b in range(h0 // NOISE_BLOCK_ROWS, (h1 - 1) // NOISE_BLOCK_ROWS + 1):
            rng = np.random.default_rng([self.seed, self.index, 1, b])
            blocks.append(rng.standard_normal((NOISE_BLOCK_ROWS, half_w), dtype=np.float32))
        first = (h0 // NOISE_BLOCK_ROWS) * NOISE_BLOCK_ROWS
        noise = np.concatenate(blocks)[h0 - first:h1 - first]
        fibres = cv2.filter2D(noise, -1, self.kernel)
        fibres *= 1.0 / self.fibre_std
        fibres = cv2.resize(fibres, (half_w * 2, (h1 - h0) * 2), interpolation=cv2.INTER_LINEAR)
        return fibres[e0 - 2 * h0:e1 - 2 * h0, :self.fields.width_px]

    def band(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(RGB, tissue not under ink, tumour) of rows y0..y1."""
        f, h = self.fields, self.fields.height_px
        e0, e1 = max(0, y0 - self.halo), min(h, y1 + self.halo)
        tissue, tumour = f.masks(e0, e1)
        stain_var = band_field(self.stain_grid, e0, e1, f.width_px, f.downsample)
        layer = np.zeros(tissue.shape, np.uint8)
        for nuclei in self.nuclei:
            paint_nuclei(layer, nuclei, e0)
        band_rng = np.random.default_rng([self.seed, self.index, 2, y0 // BAND_PX])
        dither = band_rng.integers(0, 16, size=tissue.shape, dtype=np.uint8)
        rgb = shade(self._fibres(e0, e1), stain_var, tissue, tumour, layer, dither, self.lut,
                    self.mpp, f.tumour_contrast)
        crop = slice(y0 - e0, y1 - e0)
        rgb, tissue, tumour = rgb[crop], tissue[crop], tumour[crop]
        covered = apply_artifacts(rgb, y0, h, self.strokes, self.border, band_rng)
        return rgb, tissue & ~covered, tumour

    def tiles(self):
        """Level-0 tiles in row-major order, for tifffile; fills level 1 and the masks."""
        h, w = self.fields.height_px, self.fields.width_px
        for y0 in range(0, h, BAND_PX):
            y1 = min(h, y0 + BAND_PX)
            rgb, tissue, tumour = self.band(y0, y1)
            r = slice(y0 // LEVEL_DOWNSAMPLE, y0 // LEVEL_DOWNSAMPLE + rgb.shape[0] // 4)
            self.level1[r] = cv2.resize(rgb, (self.level1.shape[1], r.stop - r.start),
                                        interpolation=cv2.INTER_AREA)
            m = slice(y0 // MASK_DOWNSAMPLE, -(-y1 // MASK_DOWNSAMPLE))
            self.tissue16[m] = mask_at_downsample(tissue)
            self.tumour16[m] = mask_at_downsample(tumour)
            a = slice(y0 // ANNOTATION_DOWNSAMPLE, y1 // ANNOTATION_DOWNSAMPLE)
            self.tumour4[a] = cv2.resize(tumour.astype(np.uint8) * 255,
                                         (self.tumour4.shape[1], a.stop - a.start),
                                         interpolation=cv2.INTER_AREA) >= 128
            for ty in range(0, y1 - y0, TILE_PX):
                for tx in range(0, w, TILE_PX):
                    yield rgb[ty:ty + TILE_PX, tx:tx + TILE_PX]

    def reduced(self) -> list[np.ndarray]:
        """Level 1 and coarser, once the tiles have all been handed out."""
        return pyramid(self.level1)


# --- writing ----------------------------------------------------------------------------------


def pyramid(level0: np.ndarray) -> list[np.ndarray]:
    """Factor-4 reductions (INTER_AREA) until the longer side is below PYRAMID_STOP_PX."""
    levels = [level0]
    while max(levels[-1].shape[:2]) >= PYRAMID_STOP_PX:
        h, w = levels[-1].shape[:2]
        size = (max(1, w // LEVEL_DOWNSAMPLE), max(1, h // LEVEL_DOWNSAMPLE))
        levels.append(cv2.resize(levels[-1], size, interpolation=cv2.INTER_AREA))
    return levels


Level = np.ndarray | BandedSlide


def _page(level: Level) -> tuple[tuple, dict]:
    """tifffile.write arguments for a level held in memory or rendered band by band."""
    if isinstance(level, np.ndarray):
        return (level,), {}
    return (level.tiles(),), {"shape": level.shape, "dtype": np.uint8}


def _all_levels(levels: list[Level]) -> list[np.ndarray | BandedSlide]:
    """The levels once level 0 is written (a banded level 0 then knows its reductions)."""
    return [levels[0], *levels[0].reduced()] if isinstance(levels[0], BandedSlide) else levels


def write_svs(path: str | Path, levels: list[Level], mpp: float, file_mpp: bool = True) -> None:
    """Aperio-style: level 0, a stripped thumbnail, then the reduced levels (what OpenSlide's
    aperio driver expects), with AppMag and MPP (unless file_mpp is False) in the first page's
    description."""
    h0, w0 = levels[0].shape[:2]
    head = f"Aperio Image Library v12.0.0 \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({TILE_PX}x{TILE_PX})"
    tail = f"JPEG/RGB Q={JPEG_QUALITY}|AppMag = {APP_MAG}" + (f"|MPP = {mpp:g}" if file_mpp else "")
    scale = min(1.0, APERIO_THUMBNAIL_PX / max(h0, w0))
    thumb_size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    bigtiff = levels[0].nbytes > 2**32 - 2**28
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        args, kwargs = _page(levels[0])
        tif.write(*args, tile=(TILE_PX, TILE_PX), description=f"{head} {tail}",
                  **kwargs, **TIFF_OPTIONS)
        levels = _all_levels(levels)
        source = next((lv for lv in reversed(levels[1:]) if lv.shape[1] >= thumb_size[0]),
                      levels[0])
        thumbnail = cv2.resize(source, thumb_size, interpolation=cv2.INTER_AREA)
        tif.write(thumbnail, rowsperstrip=16,
                  description=f"{head} -> {thumb_size[0]}x{thumb_size[1]} {tail}",
                  **TIFF_OPTIONS)
        for level in levels[1:]:
            h, w = level.shape[:2]
            tif.write(level, tile=(TILE_PX, TILE_PX), subfiletype=0,
                      description=f"{head} -> {w}x{h} {tail}", **TIFF_OPTIONS)


def write_tiled_tiff(path: str | Path, levels: list[Level], mpp: float,
                     file_mpp: bool = True) -> None:
    """Generic tiled TIFF: µm/px in the resolution tags (none if file_mpp is False), reduced
    levels as subfiletype-1 pages (OpenSlide does not see a pyramid kept in SubIFDs)."""
    h0, w0 = levels[0].shape[:2]
    px_per_cm = 1e4 / mpp
    bigtiff = levels[0].nbytes > 2**32 - 2**28
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        i = 0
        while i < len(levels):
            level = levels[i]
            downsample = w0 / level.shape[1]
            resolution = ({"resolution": (px_per_cm / downsample, px_per_cm / downsample),
                           "resolutionunit": "CENTIMETER"} if file_mpp else {})
            args, kwargs = _page(level)
            tif.write(*args, tile=(TILE_PX, TILE_PX), subfiletype=1 if i else 0,
                      description="srmil synthetic demo slide" if i == 0 else None,
                      **resolution, **kwargs, **TIFF_OPTIONS)
            if i == 0:
                levels = _all_levels(levels)
            i += 1


def tumour_geojson(tumour: np.ndarray, downsample: int = ANNOTATION_DOWNSAMPLE,
                   small: np.ndarray | None = None) -> dict:
    """QuPath-style FeatureCollection of tumour Polygons (with holes) in level-0 px, from the
    level-0 mask or from `small`, that mask already reduced to `downsample` (large slides)."""
    if small is None:
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
                height_px: int, mpp: float, tissue_shape: TissueShape = TissueShape(),
                artifacts: Artifacts = Artifacts(), file_mpp: bool = True,
                banded: bool | None = None, tumour_shape: TumourShape = TumourShape()) -> None:
    """Generate one slide and its masks (and annotation, for positives) under out_dir.

    `masks/{slide_id}.tissue.png` is the tissue not covered by pen ink or a black border.
    `file_mpp=False` leaves the µm/px out of the file; `banded` (default: by size) renders
    in bands of rows so memory stays bounded (width and height must be multiples of 16).
    """
    rng = np.random.default_rng([seed, index])
    positive = row["label"] == POSITIVE
    art_rng = np.random.default_rng([seed, index, ARTIFACT_STREAM])
    if banded is None:
        banded = width_px * height_px > BANDED_MIN_PX
    if banded:
        if width_px % MASK_DOWNSAMPLE or height_px % MASK_DOWNSAMPLE:
            raise ValueError(f"banded slides need width and height divisible by "
                             f"{MASK_DOWNSAMPLE}, got {width_px} x {height_px}")
        fields = slide_fields(rng, width_px, height_px, mpp, positive, tissue_shape, tumour_shape)
        strokes, border = plan_artifacts(art_rng, fields.pieces, width_px, height_px, mpp,
                                         artifacts)
        level0 = BandedSlide(seed, index, fields, mpp, rng, strokes, border)
        levels: list[Level] = [level0]
    else:
        geometry = slide_geometry(rng, width_px, height_px, mpp, positive, tissue_shape,
                                  tumour_shape)
        rgb = render_rgb(rng, geometry, mpp)
        tissue = geometry.tissue
        if artifacts.any():
            strokes, border = plan_artifacts(art_rng, geometry.pieces, width_px, height_px, mpp,
                                             artifacts)
            tissue = tissue & ~apply_artifacts(rgb, 0, height_px, strokes, border, art_rng)
        levels = pyramid(rgb)
    path = out_dir / row["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    (write_svs if path.suffix == ".svs" else write_tiled_tiff)(path, levels, mpp, file_mpp)
    masks = out_dir / "masks"
    if banded:
        tissue16, tumour16 = level0.tissue16, level0.tumour16
        annotation = tumour_geojson(None, small=level0.tumour4)
    else:
        tissue16, tumour16 = mask_at_downsample(tissue), mask_at_downsample(geometry.tumour)
        annotation = tumour_geojson(geometry.tumour) if row["annotation"] else None
    _write_png(masks / f"{row['slide_id']}.tissue.png", tissue16)
    _write_png(masks / f"{row['slide_id']}.tumour.png", tumour16)
    if row["annotation"]:
        write_text(out_dir / row["annotation"], json.dumps(annotation) + "\n")


def write_demo(out_dir: str | Path, n_slides: int = 24, seed: int = 0, width_px: int = 4096,
               height_px: int = 3072, mpp: float = 0.5, progress: bool = True,
               prefix: str = "demo",
               tumour_fraction: tuple[float, float] = TumourShape.fraction,
               tumour_contrast: float = 1.0) -> Path:
    """Generate the cohort; return the path of samples.csv. `tumour_fraction`: the range of
    each positive slide's tumour share of its tissue (drawn uniformly); `tumour_contrast`:
    1 = conspicuous tumour, towards 0 = barely distinguishable from stroma."""
    low, high = tumour_fraction
    if not 0 < low <= high < 1:  # the schema checks each bound, not their order
        raise InputError(
            f"config.yaml: demo.tumour_fraction [{low}, {high}] must be [low, high] with "
            "0 < low <= high < 1; fix it (srmil demo: --tumour-fraction LOW HIGH)"
        )
    if not 0 < tumour_contrast <= 1:
        raise ValueError(f"tumour_contrast must be in (0, 1], got {tumour_contrast}")
    out_dir = Path(out_dir)
    rows = planned_sheet(out_dir, n_slides, seed, prefix)
    tumour_shape = TumourShape(fraction=(float(low), float(high)),
                               contrast=float(tumour_contrast))
    for index, row in enumerate(tqdm(rows, desc="demo slides", unit="slide",
                                     disable=not progress)):
        write_slide(out_dir, row, index, seed, width_px, height_px, mpp,
                    tumour_shape=tumour_shape)
    # The sheet goes last: its presence means the cohort is complete.
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SHEET_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sheet = out_dir / "samples.csv"
    write_text(sheet, buffer.getvalue())
    return sheet
