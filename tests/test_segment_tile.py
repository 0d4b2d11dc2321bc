"""Segmentation and tiling on real generated slides read through OpenSlide."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from srmil import store
from srmil.segment import polygons_mask, read_geojson_polygons, segment_slide
from srmil.slide import SlideError
from srmil.tiling import TileParams, tile_slide


@pytest.fixture(scope="module")
def segmented(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("seg")
    results = {}
    for row in cohort.itertuples():
        geojson, qc, tiles = (
            out / f"{row.slide_id}.geojson",
            out / f"{row.slide_id}.png",
            (out / f"{row.slide_id}.tiles.json"),
        )
        summary = segment_slide(row.path, geojson, qc, annotation=row.annotation or None)
        plan = tile_slide(row.path, geojson, tiles)
        results[row.slide_id] = {
            "geojson": geojson,
            "qc": qc,
            "tiles": tiles,
            "plan": plan,
            "summary": summary,
        }
    return results


def truth_mask(cohort_dir: Path, slide_id: str, kind: str = "tissue") -> np.ndarray:
    mask = cv2.imread(str(cohort_dir / "masks" / f"{slide_id}.{kind}.png"), cv2.IMREAD_GRAYSCALE)
    return mask > 127


def box_means(mask: np.ndarray, coords: np.ndarray, size_level0: float) -> np.ndarray:
    """Mean of a downsample-16 mask over each patch's box."""
    boxes = np.rint(np.c_[coords, coords + size_level0] / 16).astype(int)
    return np.array([mask[y0:y1, x0:x1].mean() for x0, y0, x1, y1 in boxes])


def test_tissue_iou_against_ground_truth(
    cohort_dir: Path, cohort: pd.DataFrame, segmented: dict
) -> None:
    for slide_id, result in segmented.items():
        truth = truth_mask(cohort_dir, slide_id)
        found = polygons_mask(read_geojson_polygons(result["geojson"]), truth.shape, 16.0) > 0
        iou = (truth & found).sum() / (truth | found).sum()
        assert iou >= 0.9, (slide_id, iou)
        assert result["summary"]["mpp"] == pytest.approx(0.5)


def test_qc_image_written(segmented: dict) -> None:
    for result in segmented.values():
        image = cv2.imread(str(result["qc"]))
        assert image is not None and image.shape[0] > 10 and image.std() > 1


def test_tiles_aligned_inside_tissue_and_slide(cohort_dir: Path, segmented: dict) -> None:
    for slide_id, result in segmented.items():
        coords, fraction, plan = store.read_tiles(result["tiles"])
        assert len(coords) > 0 and (fraction >= 0.5).all()
        stride = plan["stride_level0"]
        assert np.array_equal(coords, np.rint(np.rint(coords / stride) * stride))
        assert (coords >= 0).all()
        assert (coords[:, 0] + plan["patch_level0"] <= plan["slide_width"]).all()
        assert (coords[:, 1] + plan["patch_level0"] <= plan["slide_height"]).all()
        # no patch lies in background: true tissue (ground truth at downsample 16) under each
        truth_fraction = box_means(truth_mask(cohort_dir, slide_id), coords, plan["patch_level0"])
        assert truth_fraction.min() >= 0.35, (slide_id, truth_fraction.min())  # threshold 0.5


def test_tumour_tiles_are_kept(cohort_dir: Path, cohort: pd.DataFrame, segmented: dict) -> None:
    for row in cohort[cohort["label"] == "tumour"].itertuples():
        coords, _, plan = store.read_tiles(segmented[row.slide_id]["tiles"])
        tumour = (
            polygons_mask(
                read_geojson_polygons(row.annotation),
                truth_mask(cohort_dir, row.slide_id).shape,
                16.0,
            )
            > 0
        )
        assert (box_means(tumour, coords, plan["patch_level0"]) > 0).any(), row.slide_id


def test_rerun_is_identical(cohort: pd.DataFrame, segmented: dict, tmp_path: Path) -> None:
    row = cohort.iloc[0]
    first = segmented[row.slide_id]
    segment_slide(row.path, tmp_path / "a.geojson", tmp_path / "a.png")
    tile_slide(row.path, tmp_path / "a.geojson", tmp_path / "a.json")
    assert (tmp_path / "a.geojson").read_bytes() == first["geojson"].read_bytes()
    assert (tmp_path / "a.json").read_bytes() == first["tiles"].read_bytes()


def test_coarser_slide_than_target_is_refused(
    cohort: pd.DataFrame, segmented: dict, tmp_path: Path
) -> None:
    row = cohort.iloc[0]
    with pytest.raises(SlideError, match="coarser than the target"):
        tile_slide(
            row.path,
            segmented[row.slide_id]["geojson"],
            tmp_path / "t.json",
            TileParams(target_mpp=0.25),
        )


def test_sheet_mpp_overrides_file(cohort: pd.DataFrame, segmented: dict, tmp_path: Path) -> None:
    row = cohort.iloc[0]
    plan = tile_slide(
        row.path, segmented[row.slide_id]["geojson"], tmp_path / "t.json", mpp_override=0.25
    )
    assert plan["slide_mpp"] == 0.25 and plan["mpp_source"] == "sample sheet"
    assert plan["patch_level0"] == pytest.approx(448)
