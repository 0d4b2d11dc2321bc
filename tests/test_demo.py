"""The demo demo_dir: real files OpenSlide opens, deterministic, with consistent ground truth."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from srmil.cli import main
from srmil.demo.artifacts import Artifacts
from srmil.demo.geometry import BIOPSY, SlideFields, TumourShape, slide_fields
from srmil.demo.plan import NEGATIVE, POSITIVE, SHEET_COLUMNS, planned_sheet
from srmil.demo.render import (
    LEVEL_DOWNSAMPLE,
    MASK_DOWNSAMPLE,
    PYRAMID_STOP_PX,
    TILE_PX,
    mask_at_downsample,
)
from srmil.demo.write import write_demo, write_slide
from srmil.errors import InputError

N_SLIDES, SEED, WIDTH_PX, HEIGHT_PX, MPP = 6, 3, 1024, 768, 0.5
LOW, HIGH = TumourShape().fraction


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo(out, n_slides=N_SLIDES, seed=SEED, width_px=WIDTH_PX, height_px=HEIGHT_PX,
                    mpp=MPP, progress=False)
    return out


def read_sheet(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_mask(out: Path, slide_id: str, kind: str) -> np.ndarray:
    mask = cv2.imread(str(out / "masks" / f"{slide_id}.{kind}.png"), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    return mask > 0


def test_sheet_is_the_plan(demo_dir: Path) -> None:
    rows = read_sheet(demo_dir / "samples.csv")
    assert list(rows[0]) == list(SHEET_COLUMNS)
    assert rows == planned_sheet(demo_dir, n_slides=N_SLIDES, seed=SEED)
    for row in rows:
        assert (demo_dir / row["path"]).is_file()
        assert bool(row["annotation"]) == (row["label"] == POSITIVE)
        if row["annotation"]:
            assert (demo_dir / row["annotation"]).is_file()
    assert not list(demo_dir.rglob("*.tmp*")), "a temporary file was left behind"


@pytest.mark.parametrize("n_slides", [*range(1, 13), 24, 25])
def test_plan_balances_labels_formats_and_patients(n_slides: int) -> None:
    rows = planned_sheet("unused", n_slides=n_slides, seed=0)
    assert [r["slide_id"] for r in rows] == [f"demo_{i:03d}" for i in range(n_slides)]
    labels = [r["label"] for r in rows]
    assert set(labels) <= {POSITIVE, NEGATIVE}
    assert abs(labels.count(POSITIVE) - labels.count(NEGATIVE)) <= 1
    for suffix in (".svs", ".tif"):  # the file format must not give the label away
        of_format = [r["label"] for r in rows if r["path"].endswith(suffix)]
        assert abs(of_format.count(POSITIVE) - of_format.count(NEGATIVE)) <= 1
    labels_of_patient = defaultdict(set)
    for row in rows:
        labels_of_patient[row["patient_id"]].add(row["label"])
    assert all(len(v) == 1 for v in labels_of_patient.values())
    if n_slides >= 6:  # some patients contribute two slides, so patient-level CV matters
        assert len(labels_of_patient) < n_slides
    assert planned_sheet("x", n_slides, seed=0) == rows
    assert planned_sheet("x", n_slides, seed=1) != rows or n_slides < 4


def test_default_plan() -> None:
    rows = planned_sheet("results/demo")
    assert len(rows) == 24
    assert sum(r["label"] == POSITIVE for r in rows) == 12
    sizes = defaultdict(int)
    for row in rows:
        sizes[row["patient_id"]] += 1
    assert sorted(set(sizes.values())) == [1, 2]
    assert sorted(sizes) == [f"P{i:03d}" for i in range(len(sizes))]


def test_openslide_reads_both_formats(demo_dir: Path) -> None:
    for row in read_sheet(demo_dir / "samples.csv"):
        with openslide.OpenSlide(demo_dir / row["path"]) as slide:
            props = slide.properties
            assert slide.dimensions == (WIDTH_PX, HEIGHT_PX)
            assert slide.level_count >= 2
            assert slide.level_downsamples[1] == pytest.approx(LEVEL_DOWNSAMPLE)
            assert max(slide.level_dimensions[-1]) < PYRAMID_STOP_PX
            assert float(props[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP, abs=1e-6)
            assert float(props[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP, abs=1e-6)
            assert props["openslide.level[0].tile-width"] == str(TILE_PX)
            if row["path"].endswith(".svs"):
                assert props[openslide.PROPERTY_NAME_VENDOR] == "aperio"
                assert props[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "20"
                assert "thumbnail" in slide.associated_images
            else:
                assert props[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
            region = np.asarray(slide.read_region((0, 0), 0, (64, 64)))
            assert region.shape == (64, 64, 4)


def test_mpp_is_written_for_other_resolutions(tmp_path: Path) -> None:
    write_demo(tmp_path, n_slides=2, seed=0, width_px=512, height_px=384, mpp=0.25,
                    progress=False)
    for suffix in ("svs", "tif"):
        (path,) = (tmp_path / "slides").glob(f"*.{suffix}")
        with openslide.OpenSlide(path) as slide:
            mpp_x = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
            assert mpp_x == pytest.approx(0.25, abs=1e-6)


def test_rerun_is_byte_identical(demo_dir: Path, tmp_path: Path) -> None:
    write_demo(tmp_path, n_slides=N_SLIDES, seed=SEED, width_px=WIDTH_PX,
                    height_px=HEIGHT_PX, mpp=MPP, progress=False)
    files = sorted(p.relative_to(demo_dir) for p in demo_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (demo_dir / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    for rel in files:
        if rel.suffix in (".svs", ".tif"):
            with tifffile.TiffFile(demo_dir / rel) as tif:
                assert all("DateTime" not in page.tags for page in tif.pages)


def geometry_of(row: dict[str, str]) -> SlideFields:
    """Rebuild a demo_dir slide's geometry the way write_demo drew it."""
    rng = np.random.default_rng([SEED, int(row["slide_id"].removeprefix("demo_"))])
    return slide_fields(rng, WIDTH_PX, HEIGHT_PX, MPP, row["label"] == POSITIVE)


def test_masks_are_the_geometry_at_downsample_16(demo_dir: Path) -> None:
    for row in read_sheet(demo_dir / "samples.csv"):
        masks = dict(zip(("tissue", "tumour"), geometry_of(row).masks(), strict=True))
        for kind, mask in masks.items():
            stored = read_mask(demo_dir, row["slide_id"], kind)
            assert stored.shape == (HEIGHT_PX // MASK_DOWNSAMPLE,
                                    WIDTH_PX // MASK_DOWNSAMPLE)
            expected = mask_at_downsample(mask) > 0
            assert np.array_equal(stored, expected), (row["slide_id"], kind)
        if row["label"] == NEGATIVE:
            assert not masks["tumour"].any()


def test_annotations_are_tumour_polygons_inside_tissue(demo_dir: Path) -> None:
    for row in read_sheet(demo_dir / "samples.csv"):
        if row["label"] == NEGATIVE:
            continue
        tissue = read_mask(demo_dir, row["slide_id"], "tissue")
        collection = json.loads((demo_dir / row["annotation"]).read_text(encoding="utf-8"))
        assert collection["type"] == "FeatureCollection" and collection["features"]
        # A mask cell on the tissue edge may round either way: allow one cell of slack.
        tissue_near = cv2.dilate(tissue.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        drawn = np.zeros((HEIGHT_PX, WIDTH_PX), np.uint8)
        for feature in collection["features"]:
            assert feature["type"] == "Feature"
            assert feature["properties"]["classification"]["name"] == "Tumor"
            assert feature["geometry"]["type"] == "Polygon"
            rings = [np.asarray(ring, dtype=float) for ring in feature["geometry"]["coordinates"]]
            for xy in rings:
                assert xy.ndim == 2 and xy.shape[1] == 2 and len(xy) >= 4
                assert np.array_equal(xy[0], xy[-1])
                assert (xy >= 0).all() and (xy[:, 0] <= WIDTH_PX).all()
                assert (xy[:, 1] <= HEIGHT_PX).all()
                cells = (xy / MASK_DOWNSAMPLE).astype(int)
                assert tissue_near[cells[:, 1], cells[:, 0]].all(), row["slide_id"]
            cv2.fillPoly(drawn, [np.rint(xy).astype(np.int32) for xy in rings], 1)
        # The polygons trace the level-0 tumour mask.
        (_, tumour), polygons = geometry_of(row).masks(), drawn.astype(bool)
        iou = (polygons & tumour).sum() / (polygons | tumour).sum()
        assert iou > 0.8, (row["slide_id"], iou)


def test_tumour_fraction_and_placement(demo_dir: Path) -> None:
    for row in read_sheet(demo_dir / "samples.csv"):
        if row["label"] != POSITIVE:
            continue
        tissue = read_mask(demo_dir, row["slide_id"], "tissue")
        tumour = read_mask(demo_dir, row["slide_id"], "tumour")
        assert not (tumour & ~tissue).any()
        fraction = tumour.sum() / tissue.sum()
        assert LOW * 0.7 <= fraction <= HIGH * 1.3, (row["slide_id"], fraction)  # 16x coarser


@pytest.mark.parametrize("index", range(6))
def test_geometry_at_level0(index: int) -> None:
    rng = np.random.default_rng([SEED, index])
    geometry = slide_fields(rng, 2048, 1536, MPP, positive=True)
    tissue, tumour = geometry.masks()
    assert 0.15 < tissue.mean() < 0.7
    assert not (tumour & ~tissue).any()
    assert LOW <= geometry.tumour_fraction <= HIGH
    assert tumour.sum() / tissue.sum() == pytest.approx(geometry.tumour_fraction, rel=0.1)
    # Tissue keeps clear of the slide border; tumour keeps clear of lumen holes.
    assert not tissue[0].any() and not tissue[-1].any()
    assert not tissue[:, 0].any() and not tissue[:, -1].any()
    assert not (geometry.tumour_grid & geometry.lumen_grid).any()


def test_some_tissue_has_lumen_holes() -> None:
    holes = 0
    for index in range(6):
        fields = slide_fields(np.random.default_rng([0, index]), 2048, 1536, MPP, False)
        tissue, tumour = fields.masks()
        _, hierarchy = cv2.findContours(tissue.astype(np.uint8), cv2.RETR_CCOMP,
                                        cv2.CHAIN_APPROX_SIMPLE)
        holes += int((hierarchy[0][:, 3] >= 0).sum())
        assert not tumour.any()
    assert holes >= 3


def test_rendered_slide_looks_like_he(demo_dir: Path) -> None:
    row = next(r for r in read_sheet(demo_dir / "samples.csv") if r["label"] == POSITIVE)
    with openslide.OpenSlide(demo_dir / row["path"]) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    tissue, tumour_px = geometry_of(row).masks()
    inner = cv2.erode(tissue.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    outer = cv2.dilate(tissue.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
    tumour = cv2.erode(tumour_px.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    background = rgb[outer].astype(float)
    assert 232 <= background.mean() <= 248 and background.std() < 6
    stroma = rgb[inner & ~tumour_px].astype(float).mean(axis=0)
    cancer = rgb[tumour].astype(float).mean(axis=0)
    r, g, b = stroma
    assert r > g + 30 and b > g + 20  # pink: red and blue well above green
    assert cancer.sum() < stroma.sum() - 120  # tumour is much darker
    assert cancer[2] - cancer[0] > stroma[2] - stroma[0] + 10  # and bluer


def one_slide(out: Path, name: str, label: str = NEGATIVE, **kwargs) -> dict[str, str]:
    row = {"slide_id": name, "path": f"slides/{name}.tif", "patient_id": name, "label": label,
           "annotation": f"annotations/{name}.geojson" if label == POSITIVE else ""}
    write_slide(out, row, 3, SEED, **kwargs)
    return row


def test_pen_ink_and_black_border_are_drawn_and_not_tissue(tmp_path: Path) -> None:
    one_slide(tmp_path, "pen", width_px=1024, height_px=768, mpp=MPP,
              artifacts=Artifacts(pen_strokes=2, black_border=True))
    one_slide(tmp_path, "plain", width_px=1024, height_px=768, mpp=MPP)
    pen, plain = read_mask(tmp_path, "pen", "tissue"), read_mask(tmp_path, "plain", "tissue")
    assert not (pen & ~plain).any()  # ink and border only ever remove tissue
    with openslide.OpenSlide(tmp_path / "slides/pen.tif") as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    r, g = rgb[..., 0].astype(int), rgb[..., 1].astype(int)
    dark = rgb.max(axis=2) < 60
    assert ((g - r > 10) | dark).mean() > 0.005  # ink (green over red) or black is there
    with openslide.OpenSlide(tmp_path / "slides/plain.tif") as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    assert ((rgb[..., 1].astype(int) - rgb[..., 0] > 10) | (rgb.max(axis=2) < 60)).mean() < 1e-4


def test_banded_rendering_matches_the_geometry(tmp_path: Path) -> None:
    fields = slide_fields(np.random.default_rng([SEED, 3]), 1024, 768, MPP, positive=True)

    def whole_slide(field: np.ndarray, threshold: float) -> np.ndarray:
        """The level-0 mask with the whole coarse field upsampled at once."""
        size = (field.shape[1] * fields.downsample, field.shape[0] * fields.downsample)
        return cv2.resize(field, size, interpolation=cv2.INTER_LINEAR)[:768, :1024] > threshold

    tissue_px = whole_slide(fields.tissue_d, 0.0)
    tumour_px = whole_slide(fields.tumour_d, fields.tumour_threshold) & tissue_px
    for y0, y1 in ((0, 512), (512, 768), (100, 333), (0, 768)):
        tissue, tumour = fields.masks(y0, y1)
        assert np.array_equal(tissue, tissue_px[y0:y1])
        assert np.array_equal(tumour, tumour_px[y0:y1])
    row = one_slide(tmp_path, "band", POSITIVE, width_px=1024, height_px=768, mpp=MPP,
                    banded=True)
    with openslide.OpenSlide(tmp_path / row["path"]) as slide:
        assert slide.dimensions == (1024, 768) and slide.level_count == 2
        assert slide.level_downsamples[1] == pytest.approx(4)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    expected = mask_at_downsample(tissue_px) > 0
    assert np.array_equal(read_mask(tmp_path, "band", "tissue"), expected)
    assert json.loads((tmp_path / row["annotation"]).read_text())["features"]
    # H&E where the tissue is, glass elsewhere, and no seam where bands meet (row 512).
    assert rgb[tissue_px].mean() < rgb[~tissue_px].mean() - 20
    seam = np.abs(rgb[512].astype(int) - rgb[511]).mean()
    inside = np.abs(rgb[300].astype(int) - rgb[299]).mean()
    assert seam < 2 * inside + 5


def test_slide_without_mpp_in_the_file(tmp_path: Path) -> None:
    for suffix in ("svs", "tif"):
        row = {"slide_id": suffix, "path": f"slides/x.{suffix}", "patient_id": "p",
               "label": NEGATIVE, "annotation": ""}
        write_slide(tmp_path, row, 0, SEED, 1024, 768, MPP, file_mpp=False)
        with openslide.OpenSlide(tmp_path / row["path"]) as slide:
            assert openslide.PROPERTY_NAME_MPP_X not in slide.properties


def test_biopsy_fragments_stay_in_their_box() -> None:
    rng = np.random.default_rng([SEED, 0])
    mpp = 1.0
    geometry = slide_fields(rng, 4096, 3072, mpp, False, BIOPSY)
    ys, xs = np.nonzero(geometry.masks()[0])
    box_w, box_h = (e / mpp for e in BIOPSY.extent_um)
    assert xs.min() >= (4096 - box_w) / 2 - 60 and xs.max() <= (4096 + box_w) / 2 + 60
    assert ys.min() >= (3072 - box_h) / 2 - 60 and ys.max() <= (3072 + box_h) / 2 + 60
    assert len(geometry.pieces) >= 2


def test_tumour_contrast_fades_tumour_towards_stroma(tmp_path: Path) -> None:
    """Same slide at contrast 1 and 0.25: the faint tumour's colour lies much nearer stroma."""
    gaps = {}
    for contrast in (1.0, 0.25):
        out = tmp_path / f"c{contrast}"
        row = one_slide(out, "t", POSITIVE, width_px=2048, height_px=1536, mpp=MPP,
                        tumour_shape=TumourShape(fraction=(0.04, 0.05), contrast=contrast))
        with openslide.OpenSlide(out / row["path"]) as slide:
            rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        tissue, tumour = read_mask(out, "t", "tissue"), read_mask(out, "t", "tumour")
        small = cv2.resize(rgb, tissue.shape[::-1], interpolation=cv2.INTER_AREA).astype(float)
        gaps[contrast] = np.abs(small[tumour].mean(0) - small[tissue & ~tumour].mean(0)).sum()
    assert gaps[0.25] < 0.5 * gaps[1.0], gaps
    with pytest.raises(ValueError, match="tumour_contrast"):
        write_demo(tmp_path / "bad", n_slides=4, tumour_contrast=0.0, progress=False)


def test_tumour_fraction_out_of_order_names_the_key(tmp_path: Path, capsys) -> None:
    """[high, low] passes the schema (each bound is fine): one line naming the key, no slide."""
    message = r"config\.yaml: demo\.tumour_fraction \[0\.5, 0\.1\] must be \[low, high\]"
    with pytest.raises(InputError, match=message):
        write_demo(tmp_path / "bad", n_slides=4, tumour_fraction=(0.5, 0.1), progress=False)
    assert not (tmp_path / "bad").exists()
    # Through the CLI, as the demo rule runs it: one line, no traceback.
    assert main(["demo", "--out", str(tmp_path / "cli"), "--n-slides", "4",
                 "--tumour-fraction", "0.5", "0.1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tumour_fraction: [0.5, 0.1] must be [low, high]" in err


def test_prefix_names_the_slides_and_nothing_else() -> None:
    rows, hard = planned_sheet("x", 8, seed=0), planned_sheet("x", 8, 0, "hard")
    assert [r["slide_id"] for r in hard] == [f"hard_{i:03d}" for i in range(8)]
    assert [r["label"] for r in hard] == [r["label"] for r in rows]
    assert hard[0]["path"].startswith("slides/hard_000.")


# Slides of both renderings (whole and banded), both formats, odd sizes, artifacts, no µm/px in
# the file: digests of their decoded pages, masks and annotation, as the demo drew them before
# it was split into a package (srmil/demo.py at c4e7eef; the files were byte-identical).
PEN_AND_BORDER = Artifacts(pen_strokes=2, black_border=True)
PINNED = {
    "whole_tif": (POSITIVE, "tif", 3, 3, 1024, 768, {"artifacts": PEN_AND_BORDER},
                  "cbee4f0ea3485869"),
    "whole_svs_odd": (POSITIVE, "svs", 2, 5, 1000, 750, {}, "837821c25d8a27b6"),
    "whole_svs_no_mpp": (NEGATIVE, "svs", 4, 3, 1024, 768,
                         {"artifacts": Artifacts(3, True), "file_mpp": False}, "483bd29362d5afb5"),
    "banded_svs": (POSITIVE, "svs", 3, 3, 512, 2048,
                   {"banded": True, "artifacts": PEN_AND_BORDER}, "d21504f01a67104f"),
    "banded_tif_partial_tiles": (POSITIVE, "tif", 5, 3, 1008, 784,
                                 {"banded": True, "artifacts": Artifacts(3, True)},
                                 "8e7eb2adc5d64b6e"),
}


def slide_digest(out: Path, row: dict[str, str]) -> str:
    """sha256 (16 hex digits) of every page's pixels, the masks and the annotation."""
    digest = hashlib.sha256()
    with tifffile.TiffFile(out / row["path"]) as tif:
        for page in tif.pages:
            pixels = page.asarray()
            digest.update(str(pixels.shape).encode() + pixels.tobytes())
    for kind in ("tissue", "tumour"):
        digest.update(read_mask(out, row["slide_id"], kind).tobytes())
    if row["annotation"]:
        digest.update((out / row["annotation"]).read_bytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("name", PINNED)
def test_slides_are_as_pinned(tmp_path: Path, name: str) -> None:
    label, suffix, index, seed, width_px, height_px, kwargs, expected = PINNED[name]
    row = {"slide_id": name, "path": f"slides/{name}.{suffix}", "patient_id": name,
           "label": label, "annotation": f"annotations/{name}.geojson" if label == POSITIVE else ""}
    write_slide(tmp_path, row, index, seed, width_px, height_px, MPP, **kwargs)
    assert slide_digest(tmp_path, row) == expected
