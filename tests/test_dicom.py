"""DICOM whole-slide images, which the bundled OpenSlide reads: a demo slide converted to DICOM
by wsidicomizer (its JPEG tiles moved without re-encoding) goes through segmentation, tiling and
features with the same results as the SVS it came from, and is taken by the sample sheet by any
file of its series.

wsidicomizer needs libjpeg-turbo's shared library (Debian: libturbojpeg0, which .ci/run
installs); where it is missing the tests are skipped, except under CI=true.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest

from srmil.cohort.samples import read_sample_sheet
from srmil.features.backbones import load_backbone
from srmil.features.extract import extract_features
from srmil.store import read_feature_store
from srmil.wsi.geometry import read_geojson_polygons
from srmil.wsi.segment import segment_slide
from srmil.wsi.tiling import read_tiles, tile_slide

RESNET18 = {"model": "resnet18", "pretrained": False}


def _converter():
    """wsidicomizer's converter, or a skip (a failure under CI=true) saying what is missing."""
    try:
        from opentile.jpeg.jpeg import find_turbojpeg_path
        from wsidicomizer import WsiDicomizer

        find_turbojpeg_path()
    except (ImportError, FileNotFoundError) as err:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but DICOM conversion is unavailable: {err}")
        pytest.skip(f"DICOM conversion unavailable: {err}")
    return WsiDicomizer


@pytest.fixture(scope="module")
def slides(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One demo SVS and its DICOM series (a folder of .dcm files, one per level and image)."""
    converter = _converter()
    svs = Path(next(p for p in cohort["path"] if p.endswith(".svs")))
    out = tmp_path_factory.mktemp("dicom") / "series ü"
    converter.convert(svs, out)
    dicom = sorted(out.glob("*.dcm"))[-1]  # any file of the series opens it
    return {"svs": svs, "dicom": dicom}


def test_openslide_reads_the_same_pixels_from_the_dicom_series(slides: dict[str, Path]) -> None:
    assert openslide.OpenSlide.detect_format(str(slides["dicom"])) == "dicom"
    with openslide.OpenSlide(str(slides["svs"])) as svs, \
            openslide.OpenSlide(str(slides["dicom"])) as dicom:
        assert dicom.dimensions == svs.dimensions
        assert dicom.level_downsamples == svs.level_downsamples
        assert dicom.properties["openslide.mpp-x"] == svs.properties["openslide.mpp-x"]
        for level in range(svs.level_count):
            w, h = svs.level_dimensions[level]
            a = np.asarray(svs.read_region((0, 0), level, (w, h)).convert("RGB"))
            b = np.asarray(dicom.read_region((0, 0), level, (w, h)).convert("RGB"))
            assert np.array_equal(a, b), level


def test_segmentation_tiling_and_features_match_the_svs(slides: dict[str, Path],
                                                        tmp_path: Path) -> None:
    results = {}
    for kind, path in slides.items():
        out = tmp_path / kind
        segment_slide(path, out / "t.geojson", out / "t.png")
        tile_slide(path, out / "t.geojson", out / "t.json")
        # OpenSlide reads both: the JPEG tile reader takes TIFF-family files, not DICOM
        extract_features(path, out / "t.json", out / "f.zarr", load_backbone(RESNET18), "r18",
                         batch_size=16, num_workers=0, progress=False, reader="openslide")
        results[kind] = (read_geojson_polygons(out / "t.geojson"), read_tiles(out / "t.json"),
                         read_feature_store(out / "f.zarr"))
    (poly_a, tiles_a, store_a), (poly_b, tiles_b, store_b) = results["svs"], results["dicom"]
    assert poly_a == poly_b
    assert np.array_equal(tiles_a[0], tiles_b[0]) and len(tiles_a[0]) > 0
    assert tiles_a[2].slide_mpp == tiles_b[2].slide_mpp and tiles_a[2].level == tiles_b[2].level
    assert np.array_equal(store_a[0], store_b[0]) and np.array_equal(store_a[1], store_b[1])
    assert store_b[2]["reader"]["name"] == "openslide"


def test_the_sheet_takes_a_dicom_series_by_one_of_its_files(slides: dict[str, Path],
                                                             tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.csv"
    pd.DataFrame([{"slide_id": "d1", "path": str(slides["dicom"]), "label": "a"}]).to_csv(
        sheet, index=False)
    assert read_sample_sheet(sheet).loc[0, "path"] == str(slides["dicom"])
