"""Regions of interest: a QuPath-style GeoJSON of regions to tile, and of regions to leave out,
on demo slides. The kept patches are exactly the tissue patches at least half inside the regions
(checked against shapely's own areas); the QC image draws them; a file that is unreadable, holds
no polygon or lies outside the slide gets one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from srmil.cli import main
from srmil.cohort.samples import SampleSheetError, read_sample_sheet
from srmil.errors import InputError
from srmil.wsi import qc
from srmil.wsi.segment import segment_slide
from srmil.wsi.tiling import ROI_MIN_FRACTION, read_tiles, tile_slide


def regions(path: Path, *rings: list[list[float]], name: str = "Region") -> Path:
    """A GeoJSON FeatureCollection as QuPath exports annotations (level-0 px)."""
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                 "properties": {"objectType": "annotation", "classification": {"name": name}}}
                for ring in rings]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


@pytest.fixture(scope="module")
def slide(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("roi")
    path = cohort.iloc[0].path
    segment_slide(path, out / "t.geojson", out / "t.png")
    return path, out


def test_roi_keeps_the_tissue_patches_half_inside_the_regions(
    slide: tuple[str, Path], tmp_path: Path
) -> None:
    path, seg = slide
    tile_slide(path, seg / "t.geojson", tmp_path / "all.json")
    everything, _, plan = read_tiles(tmp_path / "all.json")
    # a triangle over part of the tissue, and a square hole cut out of it
    keep = regions(tmp_path / "keep.geojson", [[0, 0], [1400, 0], [0, 1100], [0, 0]])
    cut = regions(tmp_path / "cut.geojson", square(100, 100, 500, 400), name="Ignore*")
    tile_slide(path, seg / "t.geojson", tmp_path / "roi.json", roi=keep, roi_exclude=cut,
               out_qc_png=tmp_path / "roi.png", seg_qc_png=seg / "t.png")
    kept, _, plan_roi = read_tiles(tmp_path / "roi.json")

    area = shapely.Polygon([[0, 0], [1400, 0], [0, 1100]]).difference(
        shapely.box(100, 100, 500, 400))
    size = plan.patch_level0
    inside = np.array([shapely.box(x, y, x + size, y + size).intersection(area).area
                       / size**2 for x, y in everything])
    expected = everything[inside >= ROI_MIN_FRACTION]
    assert 0 < len(expected) < len(everything)
    assert kept.tolist() == expected.tolist()
    assert plan_roi.n_tiles == len(kept) and plan_roi.skipped is None
    image = qc.read_png(tmp_path / "roi.png")  # the regions are drawn, kept and left out
    for colour in (qc.ROI_RGB, qc.ROI_EXCLUDED_RGB):  # (the palette PNG may move a colour a bit)
        near = (np.abs(image.astype(int) - colour) <= 8).all(axis=2)
        assert near.sum() > 20, colour

    # Only regions to leave out: everything else is kept.
    tile_slide(path, seg / "t.geojson", tmp_path / "cut.json", roi_exclude=cut)
    cut_kept = read_tiles(tmp_path / "cut.json")[0]
    hole = shapely.box(100, 100, 500, 400)
    outside = np.array([1 - shapely.box(x, y, x + size, y + size).intersection(hole).area
                        / size**2 for x, y in everything])
    assert cut_kept.tolist() == everything[outside >= ROI_MIN_FRACTION].tolist()


def test_roi_without_tissue_leaves_an_empty_bag_with_its_reason(
    slide: tuple[str, Path], tmp_path: Path
) -> None:
    path, seg = slide
    tile_slide(path, seg / "t.geojson", tmp_path / "all.json")
    coords, _, plan = read_tiles(tmp_path / "all.json")
    # a small region in a corner the tissue does not reach
    x, y = plan.slide_width - 10, plan.slide_height - 10
    corner = regions(tmp_path / "corner.geojson", square(x - 50, y - 50, x, y))
    plan = tile_slide(path, seg / "t.geojson", tmp_path / "corner.json", roi=corner)
    assert plan.n_tiles == 0 and plan.skipped == "no tissue patch inside the regions of interest"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"roi\.geojson: not a readable GeoJSON of regions of interest"),
        (json.dumps({"type": "FeatureCollection", "features": []}),
         r"roi\.geojson: no polygon among the regions of interest"),
        (json.dumps({"type": "Polygon", "coordinates": [square(9000, 9000, 9500, 9500)]}),
         r"roi\.geojson: the regions of interest \(9000, 9000\)-\(9500, 9500\) lie outside the "
         r"slide \(0, 0\)-\(\d+, \d+\); export them in this slide's level-0 pixels"),
    ],
    ids=["unreadable", "no-polygon", "outside"],
)
def test_bad_regions_get_one_line(slide: tuple[str, Path], tmp_path: Path, content: str,
                                  message: str, capsys: pytest.CaptureFixture) -> None:
    path, seg = slide
    (tmp_path / "roi.geojson").write_text(content)
    with pytest.raises(InputError, match=message):
        tile_slide(path, seg / "t.geojson", tmp_path / "t.json", roi=tmp_path / "roi.geojson")
    assert not (tmp_path / "t.json").exists()
    code = main(["tile", "--slide", path, "--tissue", str(seg / "t.geojson"), "--out",
                 str(tmp_path / "t.json"), "--roi", str(tmp_path / "roi.geojson")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "srmil tile: error:" in err


def test_sheet_roi_columns(slide: tuple[str, Path], tmp_path: Path) -> None:
    path, _ = slide
    keep = regions(tmp_path / "keep ö.geojson", square(0, 0, 500, 500))
    sheet = tmp_path / "sheet.csv"
    pd.DataFrame([{"slide_id": "a", "path": path, "label": "x", "roi": "keep ö.geojson",
                   "roi_exclude": ""}]).to_csv(sheet, index=False)
    assert read_sample_sheet(sheet).loc[0, "roi"] == str(keep)
    pd.DataFrame([{"slide_id": "a", "path": path, "label": "x", "roi": "",
                   "roi_exclude": "gone.geojson"}]).to_csv(sheet, index=False)
    with pytest.raises(SampleSheetError, match=r"gone\.geojson: regions to exclude of slide "
                                               r"'a' not found"):
        read_sample_sheet(sheet)
