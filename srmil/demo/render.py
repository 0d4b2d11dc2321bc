"""The renderer: level-0 pixels of a slide, band by band, with the reduced levels and the masks
collected on the way.

Every slide goes through `SlideRenderer`: stroma fibres, stain variation, nuclei and colours
become H&E-like RGB (`shade`), then pen ink and borders are drawn on top. Randomness that spans
the slide (stain variation, nuclei and their shapes, colours) is drawn once, up front. Only how
the per-pixel noise is drawn depends on `banded`:

- banded (large slides, above `BANDED_MIN_PX` level-0 px): bands of `BAND_PX` rows, so memory
  stays bounded. Fibre noise is a fixed function of position, drawn in seeded blocks of rows and
  scaled by the fibre kernel's exact standard deviation, so bands join without seams; each band
  draws its dither and border grain from a stream seeded by its position.
- whole (the default cohorts): one band covering the slide. Fibre noise (scaled by its sample
  standard deviation) and dither come from the slide's stream, border grain from the artifact
  stream. This is how the demo drew its slides before large slides were banded; it is kept so
  that those slides stay the same byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from srmil.demo.artifacts import BlackBorder, PenStroke, apply_artifacts
from srmil.demo.geometry import BAND_PX, MaskAt, SlideFields, band_field, smooth_noise
from srmil.demo.nuclei import nuclei_density, paint_nuclei, stroma_and_tumour_nuclei
from srmil.demo.stain import shade, stain_lut

TILE_PX = 256
LEVEL_DOWNSAMPLE = 4
PYRAMID_STOP_PX = 1024  # add factor-4 levels until the longer side is below this
MASK_DOWNSAMPLE = 16  # ground-truth masks in masks/
ANNOTATION_DOWNSAMPLE = 4  # tumour contours are traced at this downsample, then scaled up
# Slides with more level-0 px than this are rendered in bands of BAND_PX rows, so memory stays
# bounded (the default demo slides are smaller and rendered whole).
BANDED_MIN_PX = 64 * 2**20
NOISE_BLOCK_ROWS = 64  # fibre noise of banded slides comes in row blocks, one seed per block


def fibre_kernel(mpp: float, fibre_angle: float) -> np.ndarray:
    """A short line kernel that smears noise into stroma fibres along one direction."""
    length = max(3, round(6.0 / mpp) | 1)
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), fibre_angle, 1.0)
    return cv2.warpAffine(kernel, rot, (length, length))


def whole_slide_fibres(rng: np.random.Generator, kernel: np.ndarray, height_px: int,
                       width_px: int) -> np.ndarray:
    """Unit fibre noise of a whole slide from its stream: noise at half resolution smeared along
    the fibres, scaled by its sample standard deviation, upsampled to level 0."""
    half = (-(-height_px // 2), -(-width_px // 2))
    fibres = cv2.filter2D(rng.standard_normal(half, dtype=np.float32), -1, kernel)
    fibres *= 1.0 / max(float(fibres.std()), 1e-6)
    fibres = cv2.resize(fibres, (half[1] * 2, half[0] * 2), interpolation=cv2.INTER_LINEAR)
    return fibres[:height_px, :width_px]


@dataclass
class WholeSlide:
    """What a slide rendered in one band draws for all its pixels up front (see the module's
    docstring); its one band takes it."""

    tissue: np.ndarray  # level-0 bool masks
    tumour: np.ndarray
    fibres: np.ndarray | None = None  # unit fibre noise
    dither: np.ndarray | None = None  # uint8 0..15: two 2-bit draws per pixel


class SlideRenderer:
    """Level 0 of a slide, rendered band by band while tifffile writes its tiles (`tiles`).

    While tiles are handed out, level 1, the ground-truth masks (`tissue16`, `tumour16`) and the
    tumour mask for annotations (`tumour4`) are collected at their downsamples; `reduced` then
    gives the levels below level 0. `pixels` keeps level 0 of a slide rendered in one band.
    """

    def __init__(self, seed: int, index: int, fields: SlideFields, mpp: float,
                 rng: np.random.Generator, art_rng: np.random.Generator,
                 strokes: list[PenStroke], border: BlackBorder | None, banded: bool) -> None:
        h, w = fields.height_px, fields.width_px
        self.seed, self.index, self.fields, self.mpp, self.banded = seed, index, fields, mpp, banded
        self.strokes, self.border, self.art_rng = strokes, border, art_rng
        self.shape, self.nbytes = (h, w, 3), h * w * 3
        self.band_px = BAND_PX if banded else h
        self.whole = None if banded else WholeSlide(*fields.masks())
        ds, grid = fields.downsample, fields.tissue_grid.shape
        # The slide's stream, in the order the demo has always drawn it.
        self.fibre_angle = float(rng.uniform(0, 180))
        self.kernel = fibre_kernel(mpp, self.fibre_angle)
        self.fibre_std = float(np.sqrt(np.sum(self.kernel.astype(np.float64) ** 2)))
        if not banded:
            self.whole.fibres = whole_slide_fibres(rng, self.kernel, h, w)
        self.stain_grid = smooth_noise(rng, grid, 250.0 / (mpp * ds))
        density = nuclei_density(rng, fields.tissue_grid, fields.lumen_grid, mpp, ds)
        self.nuclei = stroma_and_tumour_nuclei(rng, density, fields.tumour_grid, ds,
                                               *self._nucleus_masks(), mpp, self.fibre_angle,
                                               fields.tumour_contrast)
        if not banded:
            self.whole.dither = rng.integers(0, 16, size=(h, w), dtype=np.uint8)
        self.lut = stain_lut(rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1))
        reach = max((float(n.long_ax.max(initial=0.0)) for n in self.nuclei), default=0.0)
        self.halo = int(math.ceil(max(reach, self.kernel.shape[0]))) + 8
        # Collected while the tiles are handed out; a banded slide always has level 1.
        self.level1 = None
        if banded or max(h, w) >= PYRAMID_STOP_PX:
            self.level1 = np.zeros((max(1, h // LEVEL_DOWNSAMPLE), max(1, w // LEVEL_DOWNSAMPLE),
                                    3), np.uint8)
        self.tissue16 = np.zeros((max(1, round(h / MASK_DOWNSAMPLE)),
                                  max(1, round(w / MASK_DOWNSAMPLE))), np.uint8)
        self.tumour16 = np.zeros_like(self.tissue16)
        self.tumour4 = np.zeros((max(1, h // ANNOTATION_DOWNSAMPLE),
                                 max(1, w // ANNOTATION_DOWNSAMPLE)), bool)
        self.pixels: np.ndarray | None = None

    def _nucleus_masks(self) -> tuple[np.ndarray | MaskAt, np.ndarray | MaskAt | None]:
        """Where nuclei may lie: level-0 masks held whole, or evaluated band by band (MaskAt).
        Tumour nuclei are drawn where the level-0 tumour mask has any (whole) or where the slide
        has tumour blobs (banded); the two differ only when no tumour px survives at level 0."""
        if self.banded:
            tumour = MaskAt(self.fields, "tumour") if self.fields.tumour_d is not None else None
            return MaskAt(self.fields, "tissue"), tumour
        return self.whole.tissue, self.whole.tumour if self.whole.tumour.any() else None

    def _fibre_blocks(self, e0: int, e1: int) -> np.ndarray:
        """Unit fibre noise for rows e0..e1 (level 0) of a banded slide, the same whichever band
        asks: seeded blocks of NOISE_BLOCK_ROWS rows at half resolution."""
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

    def _band_noise(self, y0: int, e0: int, e1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                              np.ndarray, np.random.Generator]:
        """(unit fibre noise, dither, tissue, tumour) of rows e0..e1, and the stream of border
        grain, for the band that starts at row y0."""
        if self.whole is not None:  # the one band takes what was drawn for the whole slide
            whole, self.whole = self.whole, None
            return whole.fibres, whole.dither, whole.tissue, whole.tumour, self.art_rng
        tissue, tumour = self.fields.masks(e0, e1)
        band_rng = np.random.default_rng([self.seed, self.index, 2, y0 // BAND_PX])
        dither = band_rng.integers(0, 16, size=tissue.shape, dtype=np.uint8)
        return self._fibre_blocks(e0, e1), dither, tissue, tumour, band_rng

    def band(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(RGB, tissue not under ink, tumour) of rows y0..y1, rendered with a halo of rows
        around them so that blurs and nuclei cross band edges."""
        f, h = self.fields, self.fields.height_px
        e0, e1 = max(0, y0 - self.halo), min(h, y1 + self.halo)
        fibres, dither, tissue, tumour, grain_rng = self._band_noise(y0, e0, e1)
        stain_var = band_field(self.stain_grid, e0, e1, f.width_px, f.downsample)
        layer = np.zeros(tissue.shape, np.uint8)
        for nuclei in self.nuclei:
            paint_nuclei(layer, nuclei, e0)
        rgb = shade(fibres, stain_var, tissue, tumour, layer, dither, self.lut, self.mpp,
                    f.tumour_contrast)
        crop = slice(y0 - e0, y1 - e0)
        rgb, tissue, tumour = rgb[crop], tissue[crop], tumour[crop]
        covered = apply_artifacts(rgb, y0, h, self.strokes, self.border, grain_rng)
        return rgb, tissue & ~covered, tumour

    def tiles(self) -> Iterator[np.ndarray]:
        """Level-0 tiles in row-major order, for tifffile; collects level 1 and the masks."""
        h, w = self.fields.height_px, self.fields.width_px
        for y0 in range(0, h, self.band_px):
            y1 = min(h, y0 + self.band_px)
            rgb, tissue, tumour = self.band(y0, y1)
            self._collect(y0, y1, rgb, tissue, tumour)
            for ty in range(0, y1 - y0, TILE_PX):
                for tx in range(0, w, TILE_PX):
                    yield rgb[ty:ty + TILE_PX, tx:tx + TILE_PX]

    def _collect(self, y0: int, y1: int, rgb: np.ndarray, tissue: np.ndarray,
                 tumour: np.ndarray) -> None:
        """Rows y0..y1 of level 1, the masks and the annotation mask. Bands start at multiples
        of BAND_PX (a multiple of each downsample); the last one fills the remaining rows."""
        def rows(collected: np.ndarray, downsample: int) -> slice:
            end = y1 // downsample if y1 < self.fields.height_px else collected.shape[0]
            return slice(y0 // downsample, end)

        if self.level1 is not None:
            r = rows(self.level1, LEVEL_DOWNSAMPLE)
            self.level1[r] = cv2.resize(rgb, (self.level1.shape[1], r.stop - r.start),
                                        interpolation=cv2.INTER_AREA)
        m = rows(self.tissue16, MASK_DOWNSAMPLE)
        self.tissue16[m] = mask_at_downsample(tissue)
        self.tumour16[m] = mask_at_downsample(tumour)
        if self.fields.tumour_d is not None:
            a = rows(self.tumour4, ANNOTATION_DOWNSAMPLE)
            self.tumour4[a] = cv2.resize(tumour.astype(np.uint8) * 255,
                                         (self.tumour4.shape[1], a.stop - a.start),
                                         interpolation=cv2.INTER_AREA) >= 128
        if not self.banded:
            self.pixels = rgb

    def reduced(self) -> list[np.ndarray]:
        """Level 1 and coarser, once the tiles have all been handed out."""
        return [] if self.level1 is None else pyramid(self.level1)


def pyramid(level: np.ndarray) -> list[np.ndarray]:
    """`level` and its factor-4 reductions (INTER_AREA) until the longer side is below
    PYRAMID_STOP_PX."""
    levels = [level]
    while max(levels[-1].shape[:2]) >= PYRAMID_STOP_PX:
        h, w = levels[-1].shape[:2]
        size = (max(1, w // LEVEL_DOWNSAMPLE), max(1, h // LEVEL_DOWNSAMPLE))
        levels.append(cv2.resize(levels[-1], size, interpolation=cv2.INTER_AREA))
    return levels


def mask_at_downsample(mask: np.ndarray, downsample: int = MASK_DOWNSAMPLE) -> np.ndarray:
    """uint8 0/255 mask of the level-0 bool mask at `downsample` (majority per cell)."""
    h, w = mask.shape
    size = (max(1, round(w / downsample)), max(1, round(h / downsample)))
    small = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
    return np.where(small >= 128, 255, 0).astype(np.uint8)
