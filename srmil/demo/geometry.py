"""Slide geometry: tissue pieces, lumen holes and tumour regions as fields on a coarse grid.

Shapes are perturbed ellipses (`Blob`). Their union is an approximate signed distance in level-0
px sampled on a coarse grid (level-0 px / `GRID_DOWNSAMPLE`), roughened with smooth noise, and
thresholded after bilinear upsampling, so memory and time stay roughly proportional to the
slide area and any band of level-0 rows can be had on its own (`SlideFields.masks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

GRID_DOWNSAMPLE = 8  # geometry fields live on this coarse grid
BAND_PX = 512  # rows per band of a large slide; a multiple of every downsample the demo writes


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
class TumourShape:
    """Knobs of the tumour regions of positive slides; harder cohorts pass their own."""

    fraction: tuple[float, float] = (0.02, 0.05)  # of the tissue area
    n_regions: tuple[int, int] = (1, 3)
    irregularity: float = 0.18
    # How far tumour differs from stroma (stain, nuclear size, density, darkness): 1 = the
    # demo's conspicuous tumour, towards 0 = barely distinguishable (harder cohorts).
    contrast: float = 1.0


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


@dataclass
class SlideFields:
    """The coarse geometry of a slide; level-0 masks of any band of rows come from it."""

    width_px: int
    height_px: int
    downsample: int
    tissue_d: np.ndarray  # signed distance to the tissue edge on the coarse grid
    tumour_d: np.ndarray | None  # tumour blobs' signed distance (None: no tumour)
    tumour_threshold: float  # tumour is tumour_d > this, inside tissue
    tissue_grid: np.ndarray  # bool on the coarse grid, holes excluded
    lumen_grid: np.ndarray  # bool on the coarse grid (holes inside tissue pieces)
    tumour_grid: np.ndarray  # bool on the coarse grid, inside tissue
    tumour_fraction: float  # the target drawn for this slide (0 for negatives)
    pieces: tuple[Blob, ...]  # the tissue pieces before roughening (for pen circles)
    tumour_contrast: float = 1.0  # TumourShape.contrast

    def masks(self, y0: int = 0, y1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 bool (tissue, tumour) of rows y0..y1 (default: the whole slide), equal to
        those rows of the whole slide's masks (each band is interpolated with a one-cell halo)."""
        y1 = self.height_px if y1 is None else y1
        tissue = band_field(self.tissue_d, y0, y1, self.width_px, self.downsample) > 0
        if self.tumour_d is None:
            return tissue, np.zeros_like(tissue)
        tumour = band_field(self.tumour_d, y0, y1, self.width_px, self.downsample)
        return tissue, (tumour > self.tumour_threshold) & tissue


@dataclass
class MaskAt:
    """A level-0 mask of a large slide, evaluated at points band by band instead of held."""

    fields: SlideFields
    kind: str  # "tissue" or "tumour"

    @property
    def shape(self) -> tuple[int, int]:
        return self.fields.height_px, self.fields.width_px

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The mask at points (x, y level-0 px), one band of rows at a time."""
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
