"""Features people already have: CLAM's and TRIDENT's HDF5 files and srmil stores from another
run, imported as a feature store and tile set; srmil's stores exported to those layouts; every
malformed file refused in one line. (The workflow with imported slides: test_workflow.py.)"""

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
