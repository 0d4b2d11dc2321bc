"""Segmentation and tiling on real generated slides read through OpenSlide."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from srmil import store
from srmil.cli import main as cli_main
from srmil.cohort.samples import SampleSheetError, read_sample_sheet, segment_overrides
from srmil.demo.artifacts import Artifacts
from srmil.demo.geometry import BIOPSY, TissueShape
from srmil.demo.plan import NEGATIVE
from srmil.demo.write import write_flat_tiff, write_slide
from srmil.graph import build_graph
from srmil.settings import (
    ConfigError,
    SegmentSettings,
    TileSettings,
    load_settings,
    section_from_dict,
)
from srmil.wsi import qc
from srmil.wsi.geometry import polygons_mask, polygons_window, read_geojson_polygons
from srmil.wsi.segment import segment_slide, view_downsample
from srmil.wsi.slide import SlideError, thumbnail
from srmil.wsi.tiling import grid_coords, read_tiles, tile_slide, tissue_fractions


def run_slide(slide: str | Path, out: Path, name: str, **kwargs) -> dict:
    geojson, qc = out / f"{name}.geojson", out / f"{name}.png"
    tiles, tiles_qc = out / f"{name}.tiles.json", out / f"{name}.tiles.png"
    summary = segment_slide(slide, geojson, qc, annotation=kwargs.pop("annotation", None))
    plan = tile_slide(
        slide, geojson, tiles, kwargs.pop("tile_params", None), out_qc_png=tiles_qc, seg_qc_png=qc
    )
    return {
        "geojson": geojson,
        "qc": qc,
        "tiles": tiles,
        "tiles_qc": tiles_qc,
        "plan": plan,
        "summary": summary,
    }


@pytest.fixture(scope="module")
def segmented(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("seg")
    return {
        row.slide_id: run_slide(row.path, out, row.slide_id, annotation=row.annotation or None)
        for row in cohort.itertuples()
    }


@pytest.fixture(scope="module")
def special_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Slides CLAM-style tools get wrong: pen ink and a black border, a small biopsy on a larger
    slide, a slide without µm/px in the file, and an empty slide."""
    out = tmp_path_factory.mktemp("special")
    specs = {
        "pen": dict(
            width_px=2048,
            height_px=1536,
            mpp=0.5,
            artifacts=Artifacts(pen_strokes=3, black_border=True),
            tissue_shape=TissueShape(n_pieces=(1, 1), holes_per_piece=(4, 5)),
        ),
        "biopsy": dict(width_px=3072, height_px=2304, mpp=1.0, tissue_shape=BIOPSY),
        "nompp": dict(width_px=1024, height_px=768, mpp=0.5, file_mpp=False),
        "empty": dict(
            width_px=1024, height_px=768, mpp=0.5, tissue_shape=TissueShape(n_pieces=(0, 0))
        ),
    }
    for index, (name, spec) in enumerate(specs.items()):
        row = {
            "slide_id": name,
            "path": f"slides/{name}.tif",
            "patient_id": name,
            "label": NEGATIVE,
            "annotation": "",
        }
        write_slide(out, row, index, 7, **spec)
    return out


def truth_mask(cohort_dir: Path, slide_id: str, kind: str = "tissue") -> np.ndarray:
    mask = cv2.imread(str(cohort_dir / "masks" / f"{slide_id}.{kind}.png"), cv2.IMREAD_GRAYSCALE)
    return mask > 127


def iou(geojson: Path, truth: np.ndarray) -> float:
    found = polygons_mask(read_geojson_polygons(geojson), truth.shape, 16.0) > 0
    return float((truth & found).sum() / (truth | found).sum())


def box_means(mask: np.ndarray, coords: np.ndarray, size_level0: float) -> np.ndarray:
    """Mean of a downsample-16 mask over each patch's box."""
    boxes = np.rint(np.c_[coords, coords + size_level0] / 16).astype(int)
    return np.array([mask[y0:y1, x0:x1].mean() for x0, y0, x1, y1 in boxes])


def test_tissue_iou_against_ground_truth(
    cohort_dir: Path, cohort: pd.DataFrame, segmented: dict
) -> None:
    for slide_id, result in segmented.items():
        assert iou(result["geojson"], truth_mask(cohort_dir, slide_id)) >= 0.9, slide_id
        assert result["summary"]["mpp"] == pytest.approx(0.5)


def test_pen_ink_and_black_border_are_not_tissue(special_dir: Path, tmp_path: Path) -> None:
    result = run_slide(special_dir / "slides/pen.tif", tmp_path, "pen")
    truth = truth_mask(special_dir, "pen")
    assert iou(result["geojson"], truth) >= 0.9
    assert result["summary"]["excluded_ink_fraction"] > 0.01
    # Without the exclusion, ink becomes "tissue" and the IoU drops.
    plain = SegmentSettings(exclude_pen=False, exclude_dark=False)
    segment_slide(special_dir / "slides/pen.tif", tmp_path / "p.geojson", tmp_path / "p.png", plain)
    assert iou(tmp_path / "p.geojson", truth) < iou(result["geojson"], truth) - 0.02
    coords, _, plan = read_tiles(result["tiles"])
    assert box_means(truth, coords, plan.patch_level0).min() >= 0.35


def test_small_biopsy_on_a_larger_slide_keeps_its_tissue(special_dir: Path, tmp_path: Path) -> None:
    result = run_slide(
        special_dir / "slides/biopsy.tif",
        tmp_path,
        "biopsy",
        tile_params=TileSettings(target_mpp=1.0, patch_px=112),
    )
    truth = truth_mask(special_dir, "biopsy")
    assert truth.mean() < 0.3  # the tissue covers a small part of the slide
    assert iou(result["geojson"], truth) >= 0.9
    assert result["summary"]["n_pieces"] >= 2 and result["plan"].n_tiles > 0


def truth_holes(truth: np.ndarray, min_cells: int) -> list[tuple[int, int]]:
    """(x, y) of a pixel inside each hole of the ground truth (at downsample 16)."""
    contours, hierarchy = cv2.findContours(
        truth.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE
    )
    points = []
    for i in range(len(contours)):
        if hierarchy is None or hierarchy[0][i][3] == -1:
            continue
        hole = np.zeros_like(truth, np.uint8)
        cv2.drawContours(hole, contours, i, 1, -1)
        hole &= ~truth
        if hole.sum() >= min_cells:
            inner = cv2.distanceTransform(hole, cv2.DIST_L2, 3)
            y, x = np.unravel_index(int(np.argmax(inner)), hole.shape)
            points.append((int(x), int(y)))
    return points


def test_real_holes_are_kept(
    cohort_dir: Path, segmented: dict, special_dir: Path, tmp_path: Path
) -> None:
    results = {(cohort_dir, k): v["geojson"] for k, v in segmented.items()}
    pen = run_slide(special_dir / "slides/pen.tif", tmp_path, "pen")
    results[(special_dir, "pen")] = pen["geojson"]
    n_holes = 0
    for (folder, slide_id), geojson in results.items():
        truth = truth_mask(folder, slide_id)
        found = polygons_mask(read_geojson_polygons(geojson), truth.shape, 16.0) > 0
        # Holes of at least twice min_hole_area_um2 (cells of (16 x 0.5 µm)²).
        min_cells = round(2 * SegmentSettings().min_hole_area_um2 / 8.0**2)
        for x, y in truth_holes(truth, min_cells):
            assert not found[y, x], (slide_id, x, y)
            n_holes += 1
    assert n_holes >= 2


def test_qc_images_written(segmented: dict) -> None:
    for result in segmented.values():
        seg = cv2.imread(str(result["qc"]))
        tiles = cv2.imread(str(result["tiles_qc"]))
        assert seg is not None and seg.shape[0] > 10 and seg.std() > 1
        assert tiles is not None and tiles.shape == seg.shape
        yellow = (tiles[..., 0] < 120) & (tiles[..., 1] > 150) & (tiles[..., 2] > 200)
        assert yellow.sum() > 10  # the grid is drawn
        for png in (result["qc"], result["tiles_qc"]):  # compact: palette PNGs (report size)
            with Image.open(png) as image:
                assert image.mode == "P" and max(image.size) <= qc.QC_MAX_SIDE, png


def test_qc_png_is_compact_and_keeps_the_outlines() -> None:
    """A noisy thumbnail (as tissue is) under flat-colour outlines: the palette PNG is a
    fraction of a 24-bit PNG's bytes, keeps the outline colours, and the same pixels give the
    same bytes."""
    rng = np.random.default_rng(0)
    shade = rng.normal(0, 25, (768, 1024, 1)) + rng.normal(0, 5, (768, 1024, 3))
    rgb = np.clip(np.array([200, 120, 200]) + shade, 0, 255).astype(np.uint8)
    cv2.circle(rgb, (512, 384), 300, qc.TISSUE_RGB, 3)
    cv2.circle(rgb, (512, 384), 100, qc.HOLE_RGB, 3)
    data = qc.encode_png(rgb)
    assert data == qc.encode_png(rgb)
    ok, full = cv2.imencode(".png", rgb)
    assert ok and len(data) < len(full) / 2
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                        cv2.COLOR_BGR2RGB).astype(int)
    for colour in (qc.TISSUE_RGB, qc.HOLE_RGB):
        drawn = (rgb == colour).all(axis=-1)
        assert np.abs(back[drawn] - colour).max() <= 4, colour
    assert np.abs(back - rgb).mean() < 4  # the tissue's colours stay close


def test_tiles_aligned_inside_tissue_and_slide(cohort_dir: Path, segmented: dict) -> None:
    for slide_id, result in segmented.items():
        coords, fraction, plan = read_tiles(result["tiles"])
        assert len(coords) > 0 and (fraction >= 0.5).all()
        stride = plan.stride_level0
        assert np.array_equal(coords, np.rint(np.rint(coords / stride) * stride))
        assert (coords >= 0).all()
        assert (coords[:, 0] + plan.patch_level0 <= plan.slide_width).all()
        assert (coords[:, 1] + plan.patch_level0 <= plan.slide_height).all()
        # no patch lies in background: true tissue (ground truth at downsample 16) under each
        truth_fraction = box_means(truth_mask(cohort_dir, slide_id), coords, plan.patch_level0)
        assert truth_fraction.min() >= 0.35, (slide_id, truth_fraction.min())  # threshold 0.5


def test_overlap_gives_a_finer_aligned_grid(
    cohort: pd.DataFrame, segmented: dict, tmp_path: Path
) -> None:
    row = cohort.iloc[0]
    plan = tile_slide(
        row.path,
        segmented[row.slide_id]["geojson"],
        tmp_path / "t.json",
        TileSettings(overlap_px=112),
    )
    coords, _, _ = read_tiles(tmp_path / "t.json")
    assert plan.stride_level0 == pytest.approx(112) and plan.patch_level0 == 224
    assert np.array_equal(coords % 112, np.zeros_like(coords))
    assert plan.n_tiles > segmented[row.slide_id]["plan"].n_tiles
    with pytest.raises(ValueError, match="overlap_px"):
        tile_slide(
            row.path,
            segmented[row.slide_id]["geojson"],
            tmp_path / "u.json",
            TileSettings(overlap_px=224),
        )


def test_read_plan_never_upsamples(special_dir: Path, segmented: dict, tmp_path: Path) -> None:
    plans = [r["plan"] for r in segmented.values()]
    empty = tmp_path / "empty.geojson"
    store.write_json(empty, {"type": "FeatureCollection", "features": []})
    for target in (1.0, 2.0, 3.0, 4.0, 8.0):  # the biopsy slide is at 1 µm/px, levels 1, 4, 16
        plans.append(
            tile_slide(
                special_dir / "slides/biopsy.tif",
                empty,
                tmp_path / "t.json",
                TileSettings(target_mpp=target),
            )
        )
    for plan in plans:
        level0_per_target_px = plan.patch_level0 / plan.patch_px
        assert plan.level_downsample <= level0_per_target_px * (1 + 1e-3)
        assert plan.read_px >= plan.patch_px
    coarse = [p for p in plans if p.target_mpp >= 4 * p.slide_mpp]
    assert all(p.level >= 1 for p in coarse)


def test_tumour_tiles_are_kept(cohort_dir: Path, cohort: pd.DataFrame, segmented: dict) -> None:
    """Every grid tile that overlaps the tumour annotation and has at least
    min_tissue_fraction of true tissue is kept."""
    n_checked = 0
    for row in cohort[cohort["label"] == "tumour"].itertuples():
        coords, _, plan = read_tiles(segmented[row.slide_id]["tiles"])
        truth = truth_mask(cohort_dir, row.slide_id)
        tumour = polygons_mask(read_geojson_polygons(row.annotation), truth.shape, 16.0) > 0
        grid = grid_coords(plan)
        on_tumour = box_means(tumour, grid, plan.patch_level0) > 0
        tissue = box_means(truth, grid, plan.patch_level0)
        expected = grid[on_tumour & (tissue >= plan.min_tissue_fraction)]
        kept = {tuple(c) for c in coords.tolist()}
        missing = [tuple(c) for c in expected.tolist() if tuple(c) not in kept]
        assert not missing, (row.slide_id, missing, len(expected))
        n_checked += len(expected)
    assert n_checked > 0


def test_grid_near_tissue_gives_the_full_grids_tiles(
    cohort: pd.DataFrame, segmented: dict
) -> None:
    """tile_slide only scores grid cells near tissue: the same tiles, in the same order and
    with the same fractions, as scoring every cell of the slide."""
    for row in cohort.itertuples():
        coords, fraction, plan = read_tiles(segmented[row.slide_id]["tiles"])
        grid = grid_coords(plan)
        polygons = read_geojson_polygons(segmented[row.slide_id]["geojson"])
        full = tissue_fractions(grid, plan, polygons)
        keep = full >= plan.min_tissue_fraction
        assert len(coords) < len(grid)
        assert np.array_equal(coords, grid[keep]), row.slide_id
        assert np.array_equal(fraction, np.round(full[keep], 4)), row.slide_id


def test_strips_and_windows_change_nothing(
    cohort: pd.DataFrame, special_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view's channels computed in strips, the polygon mask made over a window, and the
    tissue fractions summed in strips equal the whole-array results bit for bit."""
    import openslide

    from srmil.wsi import segment, tiling

    for path in (cohort.iloc[0].path, special_dir / "slides/pen.tif"):
        with openslide.OpenSlide(str(path)) as slide:
            rgb = thumbnail(slide, 4.0)
        params = SegmentSettings()
        whole = segment.view_channels(rgb, 2.0, params)
        monkeypatch.setattr(segment, "STRIP_ROWS", 37)
        strips = segment.view_channels(rgb, 2.0, params)
        monkeypatch.undo()
        for a, b in zip(whole, strips, strict=True):
            assert np.array_equal(a, b)
        assert whole[2].any() == ("pen" in str(path))  # the pen slide exercises the ink mask
    rng = np.random.default_rng(0)
    shape = (300, 400)
    for _ in range(50):  # random polygons, some crossing the mask's edges
        centre, radius = rng.uniform(-50, 450, 2) * 8, rng.uniform(2, 80) * 8
        angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
        radii = radius * rng.uniform(0.5, 1, (12, 1))
        ring = (centre + radii * np.c_[np.cos(angles), np.sin(angles)]).round(1).tolist()
        polygon = {"coordinates": [ring + ring[:1]]}
        full = polygons_mask([polygon], shape, 8.0)
        window = polygons_window([polygon], shape, 8.0)
        y0, y1, x0, x1 = window
        part = polygons_mask([polygon], shape, 8.0, window)
        assert np.array_equal(full[y0:y1, x0:x1], part)
        assert full.sum() == part.sum()  # nothing outside the window
    mask = (rng.random(shape) < 0.5).astype(np.uint8)
    x0, y0 = rng.integers(0, 380, 200), rng.integers(0, 280, 200)
    x1, y1 = x0 + rng.integers(0, 20, 200), y0 + rng.integers(0, 20, 200)
    expected = [mask[b:d, a:c].sum() for a, b, c, d in zip(x0, y0, x1, y1, strict=True)]
    monkeypatch.setattr(tiling, "SUM_STRIP_ROWS", 7)
    assert np.array_equal(tiling.box_sums(mask, x0, y0, x1, y1), expected)


def test_rerun_is_identical(cohort: pd.DataFrame, segmented: dict, tmp_path: Path) -> None:
    row = cohort.iloc[0]
    first = segmented[row.slide_id]
    again = run_slide(row.path, tmp_path, "a", annotation=row.annotation or None)
    for key in ("geojson", "qc", "tiles", "tiles_qc"):
        assert again[key].read_bytes() == first[key].read_bytes(), key


def test_empty_slide_gives_an_empty_tile_set(
    special_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result = run_slide(special_dir / "slides/empty.tif", tmp_path, "empty")
    assert result["summary"]["n_pieces"] == 0 and result["plan"].n_tiles == 0
    assert "no tissue found" in caplog.text
    coords, fraction, _ = read_tiles(result["tiles"])
    assert coords.shape == (0, 2) and fraction.shape == (0,)
    attrs = build_graph(result["tiles"], tmp_path / "empty.zarr")  # downstream copes
    assert attrs["n_nodes"] == 0 and attrs["n_edges"] == 0


def test_mpp_fallback_chain(special_dir: Path, tmp_path: Path, capsys) -> None:
    slide = special_dir / "slides/nompp.tif"
    with pytest.raises(SlideError, match="nompp.tif: no µm/px") as err:
        segment_slide(slide, tmp_path / "a.geojson", tmp_path / "a.png")
    assert "'mpp' column" in str(err.value) and "mpp_fallback" in str(err.value)
    summary = segment_slide(slide, tmp_path / "a.geojson", tmp_path / "a.png", mpp_fallback=0.5)
    assert summary["mpp"] == 0.5 and summary["mpp_source"] == "config fallback"
    summary = segment_slide(
        slide, tmp_path / "a.geojson", tmp_path / "a.png", mpp_override=0.5, mpp_fallback=0.25
    )
    assert summary["mpp"] == 0.5 and summary["mpp_source"] == "sample sheet"
    plan = tile_slide(slide, tmp_path / "a.geojson", tmp_path / "a.json", mpp_fallback=0.5)
    assert plan.mpp_source == "config fallback" and plan.n_tiles > 0
    # The command line prints the same error as one line and exits 1.
    code = cli_main(
        [
            "segment",
            "--slide",
            str(slide),
            "--out",
            str(tmp_path / "b.geojson"),
            "--qc",
            str(tmp_path / "b.png"),
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "mpp_fallback" in lines[0]


def test_coarser_slide_than_target_is_refused(
    cohort: pd.DataFrame, segmented: dict, tmp_path: Path
) -> None:
    row = cohort.iloc[0]
    with pytest.raises(SlideError, match="coarser than the target"):
        tile_slide(
            row.path,
            segmented[row.slide_id]["geojson"],
            tmp_path / "t.json",
            TileSettings(target_mpp=0.25),
        )


def test_sheet_mpp_overrides_file(cohort: pd.DataFrame, segmented: dict, tmp_path: Path) -> None:
    row = cohort.iloc[0]
    plan = tile_slide(
        row.path, segmented[row.slide_id]["geojson"], tmp_path / "t.json", mpp_override=0.25
    )
    assert plan.slide_mpp == 0.25 and plan.mpp_source == "sample sheet"
    assert plan.patch_level0 == pytest.approx(448)


def test_single_level_slide_is_read_in_bounded_chunks(
    cohort_dir: Path, cohort: pd.DataFrame, tmp_path: Path
) -> None:
    """A slide without a pyramid: the view is built from level-0 chunks, with the same result."""
    import openslide

    row = cohort.iloc[1]
    with openslide.OpenSlide(row.path) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    flat = tmp_path / "flat.tif"
    write_flat_tiff(flat, rgb, mpp=0.5, compression="zlib")
    with openslide.OpenSlide(flat) as slide:
        assert slide.level_count == 1
    segment_slide(flat, tmp_path / "f.geojson", tmp_path / "f.png")
    assert iou(tmp_path / "f.geojson", truth_mask(cohort_dir, row.slide_id)) >= 0.9


def test_view_is_bounded_for_any_slide_size() -> None:
    params = SegmentSettings()
    for width, height, mpp in (
        (200_000, 100_000, 0.25),
        (1_000_000, 10_000, 0.1),
        (4096, 3072, 0.5),
        (500, 400, 0.25),
    ):
        ds = view_downsample(width, height, mpp, params)
        assert ds >= 1.0 and max(width, height) / ds <= params.max_view_px + 1
        assert ds * mpp <= params.seg_mpp + 1e-9 or max(width, height) / ds >= 8000
    # A normal slide is viewed at seg_mpp; a small one more finely, but not below min_seg_mpp.
    assert view_downsample(40_000, 30_000, 0.25, params) == pytest.approx(32)
    assert view_downsample(4096, 3072, 0.5, params) * 0.5 == pytest.approx(2.0)


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="median_blur"):
        section_from_dict(SegmentSettings, {"median_blur": 7}, "config.yaml segment")


def test_per_slide_overrides_from_the_sheet(cohort_dir: Path, tmp_path: Path) -> None:
    sheet = pd.read_csv(cohort_dir / "samples.csv", dtype=str, keep_default_na=False)
    sheet["path"] = [str(cohort_dir / p) for p in sheet["path"]]
    sheet["annotation"] = [str(cohort_dir / a) if a else "" for a in sheet["annotation"]]
    sheet["segment_threshold"] = ["30", "", "otsu", ""]
    sheet["segment_exclude_pen"] = ["false", "", "", "1"]
    sheet.to_csv(tmp_path / "s.csv", index=False)
    df = read_sample_sheet(tmp_path / "s.csv")
    overrides = [segment_overrides(row) for _, row in df.iterrows()]
    assert overrides == [
        {"threshold": 30, "exclude_pen": False},
        {},
        {"threshold": "otsu"},
        {"exclude_pen": True},
    ]
    params = SegmentSettings(**{**SegmentSettings().model_dump(), **overrides[0]})
    assert params.threshold == 30 and params.exclude_pen is False
    sheet["segment_threshold"] = ["30", "high", "", ""]
    sheet.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SampleSheetError, match="segment_threshold 'high' of slide"):
        read_sample_sheet(tmp_path / "bad.csv")
    sheet = sheet.drop(columns="segment_threshold").assign(segment_colour="red")
    sheet.to_csv(tmp_path / "bad2.csv", index=False)
    with pytest.raises(SampleSheetError, match="'segment_colour' names no segmentation"):
        read_sample_sheet(tmp_path / "bad2.csv")
    sheet = sheet.drop(columns="segment_colour")
    # Values that parse but lie outside the setting's range stop with the sheet, column, slide
    # and what is allowed, instead of an empty slide (threshold 300) or a crash (max_view_px 0).
    for column, value, allowed in (
        ("segment_threshold", "300", '"otsu" or an integer 0-255'),
        ("segment_max_view_px", "0", "an integer >= 64"),
        ("segment_min_tissue_area_um2", "-1", "a number >= 0"),
        ("segment_median_um", "nan", "a number >= 0"),
    ):
        sheet.assign(**{column: ["", value, "", ""]}).to_csv(tmp_path / "range.csv", index=False)
        with pytest.raises(SampleSheetError) as err:
            read_sample_sheet(tmp_path / "range.csv")
        slide_id = sheet["slide_id"].iloc[1]
        assert str(err.value).startswith(str(tmp_path / "range.csv"))
        assert f"{column} {value!r} of slide {slide_id!r}" in str(err.value)
        assert allowed in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("threshold", 300, "300 is not valid: must be <= 255"),
        ("threshold", "Otsu", "'Otsu' is not valid: must be one of 'otsu' or an integer"),
        ("max_view_px", 0, "0 is not valid: must be >= 64"),
        ("min_tissue_area_um2", -1, "-1 is not valid: must be >= 0"),
        ("median_um", float("nan"), "nan is not valid: must be >= 0"),
        ("seg_mpp", 0, "0 is not valid: must be > 0"),
        ("exclude_pen", "maybe", "'maybe' is not valid: expected boolean"),
    ],
)
def test_out_of_range_settings_are_refused(name: str, value: object, rule: str) -> None:
    """A segmentation setting outside its range: one line naming where it came from, the key,
    the value and the rule (srmil.settings, whichever way it arrives)."""
    with pytest.raises(ConfigError) as err:
        section_from_dict(SegmentSettings, {name: value}, "--params of srmil segment")
    assert str(err.value).startswith(f"--params of srmil segment: {name}: {rule}; fix it")
    with pytest.raises(ConfigError, match=f"config.yaml: segment.{name}: "):
        load_settings({"segment": {name: value}})
    assert SegmentSettings(max_view_px=8192.0).max_view_px == 8192  # a whole float is fine


def test_bad_segment_params_on_the_command_line(
    cohort: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`srmil segment --params` with max_view_px 0 used to end in a ZeroDivisionError."""
    row = cohort.iloc[0]
    base = ["segment", "--slide", row.path, "--out", str(tmp_path / "a.geojson")]
    for params in ('{"max_view_px": 0}', '{"threshold": "Otsu"}', '{"close_um": -1}'):
        code = cli_main([*base, "--qc", str(tmp_path / "a.png"), "--params", params])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(lines) == 1, lines
        assert "--params of srmil segment: " in lines[0] and "must be" in lines[0]
    assert not (tmp_path / "a.geojson").exists()


def test_tile_settings_are_checked(cohort: pd.DataFrame, segmented: dict, tmp_path: Path) -> None:
    row = cohort.iloc[0]
    plan = tile_slide(
        row.path, segmented[row.slide_id]["geojson"], tmp_path / "t.json",
        TileSettings(stride_px=112),
    )
    coords, _, _ = read_tiles(tmp_path / "t.json")
    assert plan.stride_level0 == pytest.approx(112) and plan.patch_level0 == 224
    assert np.array_equal(coords % 112, np.zeros_like(coords))
    # Both a stride and an overlap: refused instead of ignoring the overlap.
    for values, message in (
        ({"stride_px": 112, "overlap_px": 56}, "set stride_px or overlap_px, not both"),
        ({"stride_px": 0}, "stride_px: 0 is not valid: must be >= 1"),
        ({"patch_px": -1}, "patch_px: -1 is not valid: must be >= 16"),
        ({"target_mpp": float("nan")}, "target_mpp: nan is not valid: must be > 0"),
        ({"min_tissue_fraction": 1.5}, "min_tissue_fraction: 1.5 is not valid: must be <= 1"),
    ):
        with pytest.raises(ConfigError, match=f"^config.yaml tile: {message}"):
            section_from_dict(TileSettings, values, "config.yaml tile")
    # The default config's tile section is valid (stride_px null, overlap_px 0).
    config = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    section_from_dict(TileSettings, config["tile"], "config.yaml tile")
    section_from_dict(SegmentSettings, config["segment"], "config.yaml segment")
