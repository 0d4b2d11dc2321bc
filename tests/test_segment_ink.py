"""Pen strokes across tissue: the band removed along a stroke, and tissue the strokes cut off.

Real slides: the demo's tissue (one piece, read back through OpenSlide), strokes drawn onto it
where a test wants them by the demo's own ink renderer, written as JPEG-tiled TIFF.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from srmil.demo.artifacts import PEN_INKS, PenStroke, apply_artifacts
from srmil.demo.geometry import TissueShape
from srmil.demo.plan import NEGATIVE
from srmil.demo.render import MASK_DOWNSAMPLE
from srmil.demo.write import write_flat_tiff, write_slide
from srmil.settings import SegmentSettings
from srmil.wsi.geometry import polygons_mask, read_geojson_polygons
from srmil.wsi.segment import segment_slide

MPP = 0.5
SHAPE = (1536, 2048)  # level-0 px
# The default view of this slide is 2 µm/px; these settings give an 8 µm/px one.
COARSE_VIEW = {"min_view_px": 256, "min_seg_mpp": 8.0}


@pytest.fixture(scope="module")
def tissue(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """(level-0 RGB, tissue mask at downsample 16) of a slide with one piece, no holes."""
    out = tmp_path_factory.mktemp("ink")
    row = {"slide_id": "t", "path": "t.tif", "patient_id": "t", "label": NEGATIVE, "annotation": ""}
    shape = TissueShape(n_pieces=(1, 1), holes_per_piece=(0, 0))
    write_slide(out, row, 0, 7, SHAPE[1], SHAPE[0], MPP, tissue_shape=shape)
    with openslide.OpenSlide(out / "t.tif") as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    truth = cv2.imread(str(out / "masks" / "t.tissue.png"), cv2.IMREAD_GRAYSCALE) > 127
    return rgb, truth


def inked_slide(path: Path, rgb: np.ndarray, strokes: list[PenStroke]) -> np.ndarray:
    """Write `rgb` with the strokes drawn on it as a JPEG-tiled TIFF; return where ink covers
    it (level 0, bool), as the demo's ground truth counts it."""
    rgb = rgb.copy()
    covered = apply_artifacts(rgb, 0, rgb.shape[0], strokes, None, np.random.default_rng(0))
    write_flat_tiff(path, rgb, MPP)
    return covered


def found_tissue(path: Path, tmp_path: Path, params: SegmentSettings) -> tuple[np.ndarray, dict]:
    """(the segmented tissue at level 0, bool; the summary)."""
    summary = segment_slide(path, tmp_path / "t.geojson", tmp_path / "t.png", params)
    polygons = read_geojson_polygons(tmp_path / "t.geojson")
    return polygons_mask(polygons, SHAPE, 1.0) > 0, summary


@pytest.mark.parametrize("view", [{}, COARSE_VIEW], ids=["view 2 um", "view 8 um"])
@pytest.mark.parametrize("ink", ["blue", "black"])
def test_band_removed_along_a_stroke_is_the_stroke_plus_one_view_px(
    tissue: tuple[np.ndarray, np.ndarray], tmp_path: Path, ink: str, view: dict
) -> None:
    """A straight stroke 40 µm wide across the tissue: in each row, the tissue lost is the
    stroke and at most one view px on either side, and no ink is left as tissue."""
    rgb, truth = tissue
    x, width_px = 1024.3, 80.0
    stroke = PenStroke(np.array([[x, -50.0], [x, SHAPE[0] + 50.0]]), width_px, PEN_INKS[ink], 0.9)
    covered = inked_slide(tmp_path / "s.tif", rgb, [stroke])
    found, summary = found_tissue(tmp_path / "s.tif", tmp_path, SegmentSettings(**view))
    # Rows whose tissue runs well past the stroke on both sides (away from the tissue's edge).
    band = slice(round(x - 3 * width_px), round(x + 3 * width_px))
    cells = truth[:, band.start // MASK_DOWNSAMPLE : band.stop // MASK_DOWNSAMPLE + 1].all(1)
    cells = cv2.erode(cells.astype(np.uint8)[:, None], np.ones((3, 1), np.uint8))[:, 0] > 0
    rows = np.repeat(cells, MASK_DOWNSAMPLE)[: SHAPE[0]]
    assert rows.sum() > 500
    stroke_px = covered[rows, band].sum(1)
    lost_px = (~found[rows, band]).sum(1)
    view_px = summary["seg_downsample"]  # level-0 px per view px
    assert np.median(lost_px - stroke_px) <= 2 * view_px
    assert (found[rows, band] & covered[rows, band]).sum() <= 0.01 * stroke_px.sum()


def test_tissue_cut_off_by_converging_strokes_is_kept(
    tissue: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Two strokes meeting inside the tissue cut a wedge smaller than min_tissue_area_um2 off
    its edge: the wedge is kept, as part of the tissue the strokes cross; the ink the colour
    tests miss where the strokes overlap is not; a speck of tissue alone on glass is dropped."""
    rgb, truth = tissue
    params = SegmentSettings()
    top = np.argmax(truth[:, 1024 // MASK_DOWNSAMPLE]) * MASK_DOWNSAMPLE  # the tissue's edge
    apex, half_angle = np.array([1024.0, top + 250.0]), np.radians(25)
    strokes = [
        PenStroke(
            np.array([apex + 400 * np.array([side * np.sin(half_angle), -1]), apex]),
            60.0,
            PEN_INKS["blue"],
            0.9,
        )
        for side in (-1, 1)
    ]
    speck_centre = (200, 1400)  # on glass, far from the strokes: 1 960 µm² of tissue
    speck = np.zeros(SHAPE, np.uint8)
    cv2.circle(speck, speck_centre, 50, 1, -1)
    on_glass = rgb.copy()
    on_glass[speck > 0] = rgb[np.roll(speck, (-600, 800), (0, 1)) > 0]  # tissue from the middle
    assert truth[np.roll(speck, (-600, 800), (0, 1))[::16, ::16] > 0].all()
    covered = inked_slide(tmp_path / "w.tif", on_glass, strokes)

    # The truth after the cut, as the demo counts it: tissue cells mostly free of ink.
    ink16 = cv2.resize(covered.astype(np.float32), truth.shape[::-1], interpolation=cv2.INTER_AREA)
    left = truth & (ink16 < 0.5)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(left.astype(np.uint8), connectivity=4)
    cell_um2 = (MASK_DOWNSAMPLE * MPP) ** 2
    (wedge,) = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] * cell_um2 < 5000]
    assert 2000 < stats[wedge, cv2.CC_STAT_AREA] * cell_um2 < params.min_tissue_area_um2

    found, summary = found_tissue(tmp_path / "w.tif", tmp_path, params)
    found16 = polygons_mask(read_geojson_polygons(tmp_path / "t.geojson"), truth.shape, 16.0) > 0
    assert found16[labels == wedge].mean() >= 0.5
    assert summary["n_pieces"] == 2  # the tissue and the wedge: no ink, no speck
    assert not found[speck > 0].any()
