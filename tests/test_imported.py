"""Features people already have: CLAM's, TRIDENT's and STAMP's HDF5 files and srmil stores from
another run, imported as a feature store and tile set; srmil's stores exported to those layouts;
every malformed file refused in one line. (The workflow with imported slides: test_workflow.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import toy_plan
from jpeg_slides import write_jpeg_slide

from srmil.cli import main
from srmil.cohort.samples import SampleSheetError, read_sample_sheet
from srmil.features.imported import (
    FeatureFileError,
    export_store,
    grid_step,
    import_features,
    import_tiles,
)
from srmil.graph import build_graph
from srmil.store import FeatureProvenance, read_feature_store, read_graph_store, write_feature_store
from srmil.wsi.tiling import read_tiles, write_tiles

# A slide at 0.25 µm/px tiled at 0.5 µm/px: 224-px patches are 448 level-0 px.
PLAN = toy_plan(slide_mpp=0.25, patch_level0=448.0, stride_level0=448.0, level=1,
                level_downsample=2.0, slide_width=8000, slide_height=6000)
PROVENANCE = FeatureProvenance(
    srmil_version="0.1.0", extractor="uni", backbone={"model": "resnet18", "pretrained": False},
    weights_hash="ab" * 32, feature_dim=6, n_patches=5, mpp=0.5, slide_mpp=0.25, patch_px=224,
    stride_px=224, patch_level0=448.0, stride_level0=448.0, read_level=1, read_px=224,
    dtype="float16",
)  # fmt: skip


def grid_coords(cells: list[tuple[int, int]], step: float = 448.0,
                origin: tuple[int, int] = (896, 448)) -> np.ndarray:
    return np.rint(np.array(origin) + np.array(cells) * step).astype(np.int64)


@pytest.fixture
def srmil_store(tmp_path: Path) -> tuple[Path, Path]:
    """An srmil feature store and its tile set, as a run leaves them."""
    coords = grid_coords([(0, 0), (1, 0), (2, 0), (0, 1), (2, 2)])
    features = np.random.default_rng(0).normal(size=(5, 6))
    store = tmp_path / "run" / "features" / "uni" / "s1.zarr"
    write_feature_store(store, features, coords, PROVENANCE.attrs(), dtype="float16")
    tiles = tmp_path / "run" / "tiles" / "s1.json"
    write_tiles(tiles, coords, np.ones(5), PLAN)
    return store, tiles


def write_h5(path: Path, features: np.ndarray, coords: np.ndarray,
             coords_attrs: dict | None = None, encoder: str | None = None) -> Path:
    """A feature file as CLAM (no attributes) or TRIDENT (coords attributes) writes one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("coords", data=coords)
        for key, value in (coords_attrs or {}).items():
            f["coords"].attrs[key] = value
        if encoder:
            f["features"].attrs["encoder"] = encoder
    return path


@pytest.mark.parametrize("layout", ["clam", "trident"])
def test_export_then_import_gives_the_same_features_coordinates_and_grid(
    srmil_store: tuple[Path, Path], tmp_path: Path, layout: str
) -> None:
    store, tiles = srmil_store
    files = export_store(store, tmp_path / layout, layout, tiles)
    h5 = files[0]
    with h5py.File(h5, "r") as f:  # the tool's own layout
        assert f["features"].dtype == np.float32 and f["coords"].shape == (5, 2)
        attrs = dict(f["coords"].attrs)
    if layout == "clam":
        assert files == [tmp_path / "clam/h5_files/s1.h5", tmp_path / "clam/pt_files/s1.pt"]
        assert (attrs["patch_size"], attrs["patch_level"]) == (448, 0)
        pt = torch.load(files[1], weights_only=True)  # what CLAM trains on
        assert pt.shape == (5, 6) and pt.dtype == torch.float32
    else:
        assert files == [tmp_path / "trident/s1.h5"]
        assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 448
        assert (attrs["level0_magnification"], attrs["target_magnification"]) == (40.0, 20.0)
        assert (attrs["level0_width"], attrs["overlap"]) == (8000, 0)

    back = tmp_path / "back.zarr"
    provenance = import_features(h5, back, "uni")
    plan = import_tiles(h5, tmp_path / "back.json")
    features, coords, stored = read_feature_store(store)
    features2, coords2, attrs2 = read_feature_store(back)
    assert np.array_equal(features2, features) and np.array_equal(coords2, coords)
    # srmil's provenance travels in the file: the same extractor and weights as the original
    assert provenance.weights_hash == PROVENANCE.weights_hash
    assert attrs2["source"]["format"] == layout and len(attrs2["source"]["sha256"]) == 64
    assert (plan.patch_level0, plan.stride_level0, plan.target_mpp) == (448.0, 448.0, 0.5)
    assert np.array_equal(read_tiles(tmp_path / "back.json")[0], coords)


def test_an_srmil_store_from_another_run_keeps_its_provenance(
    srmil_store: tuple[Path, Path], tmp_path: Path
) -> None:
    store, _ = srmil_store
    provenance = import_features(store, tmp_path / "s1.zarr", "uni")
    assert provenance.backbone == PROVENANCE.backbone and provenance.dtype == "float16"
    assert provenance.source["format"] == "srmil"
    plan = import_tiles(store, tmp_path / "s1.json")
    assert plan.stride_level0 == 448.0 and plan.slide_mpp == 0.25
    build_graph(tmp_path / "s1.json", tmp_path / "g.zarr", window=1)
    edges, _ = read_graph_store(tmp_path / "g.zarr")
    assert edges.shape[1] == 5 + 2 * 4  # self-loops, and four neighbour pairs (one diagonal)


def test_plain_clam_and_trident_files(tmp_path: Path) -> None:
    """Files as the tools write them: CLAM's carries no resolution (the sheet's mpp or the
    slide gives it; the grid step is the patch size), TRIDENT's its magnifications."""
    coords = grid_coords([(0, 0), (1, 0), (3, 1)], step=512.0, origin=(0, 0))
    features = np.ones((3, 4), dtype=np.float32)
    clam = write_h5(tmp_path / "clam.h5", features, coords.astype(np.int32))
    with pytest.raises(FeatureFileError, match=r"clam\.h5: a CLAM feature file records no µm/px;"
                                               r" give the slide file .* or its µm/px"):
        import_tiles(clam, tmp_path / "c.json")
    plan = import_tiles(clam, tmp_path / "c.json", mpp=0.25)
    assert (plan.patch_level0, plan.stride_level0, plan.target_mpp) == (512.0, 512.0, 0.25)
    provenance = import_features(clam, tmp_path / "c.zarr", "mine", mpp=0.25)
    assert provenance.backbone == {"imported": "clam", "encoder": None}
    assert provenance.dtype == "float32" and provenance.feature_dim == 4

    trident = write_h5(tmp_path / "trident.h5", features, coords, {
        "patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
        "target_magnification": 20, "overlap": 0, "level0_width": 3000, "level0_height": 2000,
    }, encoder="uni_v1")  # fmt: skip
    plan = import_tiles(trident, tmp_path / "t.json")
    assert (plan.slide_mpp, plan.target_mpp, plan.patch_px) == (0.25, 0.5, 256)
    assert (plan.slide_width, plan.slide_height, plan.mpp_source) == (3000, 2000, "feature file")
    provenance = import_features(trident, tmp_path / "t.zarr", "uni")
    assert provenance.backbone == {"imported": "trident", "encoder": "uni_v1"}
    # the sheet's µm/px wins over the file's
    assert import_tiles(trident, tmp_path / "t2.json", mpp=0.5).target_mpp == 1.0
    # one file of each tool: different extractors as far as anyone can tell
    assert provenance.weights_hash != import_features(
        clam, tmp_path / "c2.zarr", "mine", mpp=0.25).weights_hash


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: _only_features(d / "f.h5"),
         r"f\.h5: no coords dataset; .* CLAM's pt_files/ hold no coordinates"),
        (lambda d: write_h5(d / "f.h5", np.ones(3), np.zeros((3, 2))),
         r"f\.h5: features of shape \(3,\) .* expected N x D floats"),
        (lambda d: write_h5(d / "f.h5", np.ones((3, 4)), np.zeros((3, 3))),
         r"f\.h5: coords of shape \(3, 3\) for 3 feature rows; expected N x 2"),
        (lambda d: write_h5(d / "f.h5", np.ones((4, 4)), np.zeros((3, 2))),
         r"f\.h5: coords of shape \(3, 2\) for 4 feature rows"),
        (lambda d: write_h5(d / "f.h5", np.full((2, 4), np.nan), np.array([[0, 0], [256, 0]])),
         r"f\.h5: features hold NaN"),
        (lambda d: write_h5(d / "f.h5", np.ones((3, 4)),
                            np.array([[0, 0], [256, 0], [600, 256]])),
         r"f\.h5: patch origins are not on one grid .*: unaligned patches"),
        (lambda d: write_h5(d / "f.h5", np.ones((3, 4)), np.array([[0, 0], [256, 0], [0, 256]]),
                            {"patch_size": 1024, "patch_level": 0, "downsample": [1.0, 1.0]}),
         r"f\.h5: patches of 1024 px on a 256 px step overlap by more than half: overlapping"),
        (lambda d: write_h5(d / "f.h5", np.ones((3, 4)), np.array([[0, 0], [256, 0], [0, 512]])),
         r"f\.h5: patch origins step 256 px in x but 512 px in y"),
        (lambda d: (d / "f.h5").write_bytes(b"slide_id,path\n") and d / "f.h5",
         r"f\.h5: not a readable HDF5 file"),
        (lambda d: d / "gone.h5", r"gone\.h5: feature file not found"),
    ],
    ids=["no-coords", "1d-features", "coords-n-by-3", "row-mismatch", "nan", "unaligned",
         "overlapping", "not-square", "not-hdf5", "missing"],
)
def test_malformed_feature_files_get_one_line(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(FeatureFileError, match=message) as err:
        import_tiles(path, tmp_path / "t.json", mpp=0.5)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "t.json").exists()


def _only_features(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((3, 4)))
    return path


def test_two_patches_in_one_grid_cell_are_refused() -> None:
    coords = np.array([[0, 0], [512, 0], [0, 512], [0, 0]])
    with pytest.raises(FeatureFileError, match="1 grid cell.* more than one patch .* overlapping"):
        grid_step(coords, 512.0, "x.h5")
    # fractional steps, rounded to whole px, are one grid
    assert grid_step(np.rint(np.arange(6)[:, None] * [461.86, 0]), None) == pytest.approx(
        461.8, abs=0.1)


def test_sheet_features_column(tmp_path: Path, srmil_store: tuple[Path, Path]) -> None:
    store, _ = srmil_store
    sheet = tmp_path / "sheet.csv"
    rows = [{"slide_id": "s1", "path": "", "label": "a", "features": str(store)},
            {"slide_id": "s2", "path": "", "label": "b", "features": "gone.h5"}]
    pd.DataFrame(rows).to_csv(sheet, index=False)
    with pytest.raises(SampleSheetError, match=r"gone\.h5: feature file of slide 's2' not found"):
        read_sample_sheet(sheet)
    read = read_sample_sheet(sheet, check_files=False)
    assert read.loc[0, "features"] == str(store) and read.loc[1, "features"] == str(
        tmp_path / "gone.h5")
    rows[1]["features"] = ""
    pd.DataFrame(rows).to_csv(sheet, index=False)
    with pytest.raises(SampleSheetError, match=r"slide 's2' has no path; give its slide file "
                                               r"\(or its feature file in a features column\)"):
        read_sample_sheet(sheet)


def test_cli_import_and_export(tmp_path: Path, srmil_store: tuple[Path, Path],
                               capsys: pytest.CaptureFixture) -> None:
    store, tiles = srmil_store
    assert main(["export", "--features-dir", str(store.parent), "--out-dir",
                 str(tmp_path / "out"), "--layout", "trident", "--tiles-dir",
                 str(tiles.parent)]) == 0
    h5 = tmp_path / "out" / "s1.h5"
    assert main(["import", "--features", str(h5), "--extractor", "uni", "--out",
                 str(tmp_path / "s1.zarr"), "--tiles-out", str(tmp_path / "s1.json")]) == 0
    assert json.loads((tmp_path / "s1.json").read_text())["plan"]["n_tiles"] == 5
    assert main(["export", "--features-dir", str(store.parent), "--out-dir",
                 str(tmp_path / "stamp"), "--layout", "stamp"]) == 0
    assert main(["import", "--features", str(tmp_path / "stamp" / "s1.h5"), "--extractor", "uni",
                 "--out", str(tmp_path / "st.zarr")]) == 0
    assert np.array_equal(read_feature_store(tmp_path / "st.zarr")[1], read_feature_store(store)[1])
    assert main(["import", "--features", str(h5)]) == 1
    assert "give --out (the feature store) or --tiles-out" in capsys.readouterr().err
    # under --exclude-failed a bad file becomes the slide's exclusion records
    (tmp_path / "bad.h5").write_bytes(b"x")
    assert main(["import", "--features", str(tmp_path / "bad.h5"), "--extractor", "uni",
                 "--out", str(tmp_path / "bad.zarr"), "--tiles-out", str(tmp_path / "bad.json"),
                 "--exclude-failed"]) == 0
    excluded = json.loads((tmp_path / "bad.json").read_text())["plan"]["excluded"]
    assert excluded.startswith(f"import: {tmp_path / 'bad.h5'}: not a readable HDF5 file")
    proc = subprocess.run([sys.executable, "-m", "srmil.cli", "export", "--features-dir",
                           str(tmp_path / "none"), "--out-dir", str(tmp_path), "--layout", "clam"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no feature stores (*.zarr)" in proc.stderr


# STAMP (KatherLab/STAMP at c54ce06, v2.5.0): its extraction writes `feats` (float16) and `coords`
# (float32 µm at level 0) with root attributes; `src/stamp/modeling/data.py::get_coords` reads them.
STAMP_ATTRS = {"stamp_version": "2.5.0", "extractor": "ctranspath", "unit": "um",
               "tile_size_um": 256.0, "tile_size_px": 224, "code_hash": "0123abcd",
               "feat_type": "tile"}


def read_as_stamp(path: Path) -> tuple[np.ndarray, np.ndarray, float, int]:
    """What STAMP's tile-level training and heatmaps take from a file, checked as STAMP checks it
    (re-stated from `BagDataset.__getitem__`, `get_coords`, `detect_feature_type` and its slide
    encoders' `_read_h5`): the two datasets, coordinates in µm where `tile_size_um` (or STAMP 2.0's
    `tile_size` with unit 'um') is set (else STAMP takes them for its 1.x px or refuses them), no
    `stamp_version` newer than STAMP, the `extractor` its encoders need, `feat_type` 'tile'."""
    with h5py.File(path, "r") as f:
        assert isinstance(f["feats"], h5py.Dataset) and isinstance(f["coords"], h5py.Dataset)
        feats = torch.from_numpy(f["feats"][()]).float().numpy()
        coords_um = torch.from_numpy(f["coords"][:]).float().numpy()
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
    if attrs.get("tile_size") and attrs.get("unit") == "um":
        tile_um = float(attrs["tile_size"])
    elif attrs.get("tile_size_um"):
        tile_um = float(attrs["tile_size_um"])
    else:
        pytest.fail("STAMP would read these coordinates as its 1.x px, or refuse them")
    assert "stamp_version" not in attrs  # STAMP refuses one newer than itself
    assert attrs["extractor"] and attrs["feat_type"] == "tile"
    return feats, coords_um, tile_um, int(attrs["tile_size_px"])


def write_stamp(path: Path, feats: np.ndarray, coords: np.ndarray, attrs: dict | None = None,
                with_coords: bool = True) -> Path:
    """A feature file as `stamp preprocess` writes one (STAMP_ATTRS: 2.1 and later)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["feats"] = feats
        if with_coords:
            f["coords"] = coords
        for key, value in (STAMP_ATTRS if attrs is None else attrs).items():
            f.attrs[key] = value
    return path


def stamp_coords(cells: list[tuple[int, int]], tile_um: float, slide_mpp: float,
                 origin: tuple[int, int] = (2, 1)) -> np.ndarray:
    """STAMP's tile origins: multiples of ceil(tile µm / slide µm/px) level-0 px, in µm."""
    step_px = int(np.ceil(tile_um / slide_mpp))
    return ((np.array(cells) + origin) * step_px * slide_mpp).astype(np.float32)


@pytest.mark.parametrize("slide_mpp", [0.25, 0.2527])
def test_stamp_export_reads_as_stamp_reads_it_and_imports_back_identical(
    tmp_path: Path, slide_mpp: float
) -> None:
    # A scanner's odd µm/px and a wide slide: float32 µm must still give back every level-0 px.
    coords = grid_coords([(0, 0), (1, 0), (2, 0), (0, 1), (2, 2)], step=443.0,
                         origin=(150_001, 90_017))
    prov = FeatureProvenance(**{**PROVENANCE.__dict__, "slide_mpp": slide_mpp,
                                "patch_level0": 443.0, "stride_level0": 443.0,
                                "mpp": slide_mpp * 443.0 / 224})
    features = np.random.default_rng(1).normal(size=(5, 6))
    store = tmp_path / "features" / "uni" / "s1.zarr"
    write_feature_store(store, features, coords, prov.attrs(), dtype="float16")
    assert export_store(store, tmp_path / "stamp", "stamp") == [tmp_path / "stamp/s1.h5"]
    h5 = tmp_path / "stamp" / "s1.h5"
    with h5py.File(h5, "r") as f:  # the dtypes STAMP writes
        assert (f["feats"].dtype, f["coords"].dtype) == (np.float16, np.float32)
    stored_features, stored_coords, _ = read_feature_store(store)
    feats, coords_um, tile_um, tile_px = read_as_stamp(h5)
    assert np.array_equal(feats, stored_features.astype(np.float32))
    # STAMP's heatmaps place tiles at round(µm / slide µm/px): our level-0 px
    assert np.array_equal(np.rint(coords_um / slide_mpp), stored_coords)
    assert tile_um == pytest.approx(443.0 * slide_mpp) and tile_px == 224
    assert tile_um / tile_px == pytest.approx(prov.mpp)  # STAMP's CoordsInfo.mpp

    provenance = import_features(h5, tmp_path / "back.zarr", "uni")
    plan = import_tiles(h5, tmp_path / "back.json")
    features2, coords2, attrs2 = read_feature_store(tmp_path / "back.zarr")
    assert np.array_equal(features2, stored_features) and provenance.dtype == "float16"
    assert np.array_equal(coords2, stored_coords)
    assert np.array_equal(read_tiles(tmp_path / "back.json")[0], stored_coords)
    assert provenance.weights_hash == PROVENANCE.weights_hash
    assert attrs2["source"]["format"] == "stamp" and len(attrs2["source"]["sha256"]) == 64
    assert (plan.patch_level0, plan.stride_level0, plan.slide_mpp) == (443.0, 443.0, slide_mpp)


def test_plain_stamp_files_of_each_version(tmp_path: Path) -> None:
    """Files as STAMP writes them: µm (2.1 and later; 2.0 named the tile side tile_size), or 1.x's
    px of 256 µm / 224 px tiles; the slide's or the sheet's µm/px turns them into level-0 px."""
    cells = [(0, 0), (1, 0), (3, 1)]
    feats = np.ones((3, 4), dtype=np.float16)
    v21 = write_stamp(tmp_path / "v21.h5", feats, stamp_coords(cells, 256.0, 0.25))
    with pytest.raises(FeatureFileError, match=r"v21\.h5: a STAMP feature file records no µm/px "
                                               r"of the slide \(its coordinates are in µm\); give"):
        import_tiles(v21, tmp_path / "t.json")
    plan = import_tiles(v21, tmp_path / "t.json", mpp=0.25)
    assert np.array_equal(read_tiles(tmp_path / "t.json")[0],
                          grid_coords(cells, 1024, (2048, 1024)))
    assert (plan.patch_level0, plan.stride_level0, plan.patch_px) == (1024.0, 1024.0, 224)
    assert plan.target_mpp == pytest.approx(256 / 224) and plan.mpp_source == "sample sheet"
    provenance = import_features(v21, tmp_path / "t.zarr", "ctp", mpp=0.25)
    assert provenance.backbone == {"imported": "stamp", "encoder": "ctranspath"}
    assert provenance.dtype == "float16" and provenance.source["format"] == "stamp"

    v20 = write_stamp(tmp_path / "v20.h5", feats, stamp_coords(cells, 256.0, 0.25), {
        "stamp_version": "2.0.0", "extractor": "ctranspath", "unit": "um", "tile_size": 256.0})
    plan = import_tiles(v20, tmp_path / "t20.json", mpp=0.25)
    assert np.array_equal(read_tiles(tmp_path / "t20.json")[0],
                          read_tiles(tmp_path / "t.json")[0])
    assert (plan.patch_level0, plan.patch_px) == (1024.0, 1024)  # 2.0 did not record the px

    v1_coords = (np.array(cells) + (2, 1)) * 224  # px of the 256/224 µm/px image
    v1 = write_stamp(tmp_path / "v1.h5", feats, v1_coords,
                     {"extractor": "STAMP-extract-1.1.1_ctranspath"})
    plan = import_tiles(v1, tmp_path / "t1.json", mpp=0.25)
    assert np.array_equal(read_tiles(tmp_path / "t1.json")[0], read_tiles(tmp_path / "t.json")[0])
    assert (plan.patch_level0, plan.patch_px) == (1024.0, 224)


def test_stamp_tiles_of_a_10x_slide_go_back_onto_the_grid_their_pixels_lie_on(
    tmp_path: Path
) -> None:
    """STAMP's tiler (`_supertiles`, `_tiles`), re-stated: supertiles of n tiles of
    ceil(256 µm / 1.0032 µm/px) = 256 px each, read from level 0 and cut into n x n tiles, whose
    origins it records as the supertile's plus k * 256 µm, up to 3 px short of where they were
    read. Taken as they are they are off one grid; srmil puts them back where the pixels were."""
    mpp, tile_um, n = 1.0032, 256.0, 4  # n: tiles per 1024-px supertile side
    step = int(np.ceil(tile_um / mpp))
    supertiles = [(0, 0), (1, 0), (1, 1)]
    recorded = [(sx * n * step * mpp + x * tile_um, sy * n * step * mpp + y * tile_um)
                for sx, sy in supertiles for y in range(n) for x in range(n)]
    read_at = [((sx * n + x) * step, (sy * n + y) * step)
               for sx, sy in supertiles for y in range(n) for x in range(n)]
    h5 = write_stamp(tmp_path / "s.h5", np.ones((len(recorded), 4), np.float16),
                     np.array(recorded, np.float32))
    with pytest.raises(FeatureFileError, match="not on one grid"):
        grid_step(np.rint(np.array(recorded) / mpp), None, h5)
    plan = import_tiles(h5, tmp_path / "s.json", mpp=mpp)
    assert np.array_equal(read_tiles(tmp_path / "s.json")[0], read_at)
    assert (plan.stride_level0, plan.patch_level0) == (step, step)


def test_a_stamp_file_on_its_slide_takes_the_slides_size_and_mpp(tmp_path: Path) -> None:
    """A real slide (Aperio SVS, 0.5 µm/px, opened by OpenSlide) beside its STAMP file, through
    the command the workflow's import rules run (an empty --mpp: the sheet gives none)."""
    slide = write_jpeg_slide(tmp_path / "s.svs", np.full((960, 1200, 3), 200, np.uint8), mpp=0.5)
    h5 = write_stamp(tmp_path / "s.h5", np.ones((2, 3), np.float32),
                     stamp_coords([(0, 0), (1, 1)], 112.0, 0.5, origin=(0, 0)),
                     {**STAMP_ATTRS, "tile_size_um": 112.0})
    assert main(["import", "--features", str(h5), f"--slide={slide}", "--mpp", "",
                 "--tiles-out", str(tmp_path / "s.json")]) == 0
    coords, _, plan = read_tiles(tmp_path / "s.json")
    assert np.array_equal(coords, [[0, 0], [224, 224]])
    assert (plan.slide_width, plan.slide_height, plan.slide_mpp) == (1200, 960, 0.5)
    assert (plan.patch_level0, plan.target_mpp) == (224.0, 0.5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: write_stamp(d / "f.h5", np.ones((3, 4)), None, with_coords=False),
         r"f\.h5: a STAMP file \(feats\) without a coords dataset; .* stamp preprocess"),
        (lambda d: write_stamp(d / "f.h5", np.ones(3), np.zeros((3, 2))),
         r"f\.h5: features of shape \(3,\) .* expected N x D floats"),
        (lambda d: write_stamp(d / "f.h5", np.ones((3, 4)), np.zeros((3, 3))),
         r"f\.h5: coords of shape \(3, 3\) for 3 feature rows; expected N x 2 .*µm\)"),
        (lambda d: write_stamp(d / "f.h5", np.ones((2, 4)), np.array([[0, 0], [256, 0]]),
                               {**STAMP_ATTRS, "unit": "px"}),
         r"f\.h5: STAMP coordinates in unit 'px', which srmil does not know; write coords in µm"),
        (lambda d: write_stamp(d / "f.h5", np.ones((2, 4)), np.array([[0, 0], [256, 0]]),
                               {"extractor": "x", "unit": "um"}),
         r"f\.h5: STAMP coordinates in µm but no tile size; add .* tile_size_um"),
        (lambda d: write_stamp(d / "f.h5", np.ones((2, 4)), np.array([[0, 0], [256, 0]]), {}),
         r"f\.h5: a STAMP file without a unit attribute whose tiles step 256, not STAMP 1's 224 "
         r"px: the coordinates' unit is unknown"),
    ],
    ids=["no-coords", "1d-feats", "coords-n-by-3", "unknown-unit", "no-tile-size",
         "no-unit-not-224"],
)
def test_malformed_stamp_files_get_one_line(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(FeatureFileError, match=message) as err:
        import_tiles(path, tmp_path / "t.json", mpp=0.5)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "t.json").exists()
