"""Feature extraction on a real generated slide into a real Zarr store."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import zarr

from srmil import store
from srmil.backbones import BackboneError, load_backbone
from srmil.features import extract_features
from srmil.segment import segment_slide
from srmil.tiling import tile_slide

SPEC = {"model": "resnet18", "pretrained": False}


@pytest.fixture(scope="module")
def tiles(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("feat")
    row = cohort.iloc[1]
    segment_slide(row.path, out / "t.geojson", out / "t.png")
    tile_slide(row.path, out / "t.geojson", out / "t.json")
    return row.path, out / "t.json"


def test_store_layout_and_provenance(tiles: tuple[str, Path], tmp_path: Path) -> None:
    slide, tiles_json = tiles
    extract_features(
        slide,
        tiles_json,
        tmp_path / "s.zarr",
        load_backbone(SPEC),
        "resnet18",
        batch_size=8,
        num_workers=0,
        progress=False,
    )
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")  # plain zarr, no srmil
    coords, _, plan = store.read_tiles(tiles_json)
    assert group["features"].shape == (len(coords), 512)
    assert group["features"].dtype == np.float16
    assert np.array_equal(group["coords"][...], coords)
    attrs = dict(group.attrs)
    for key in (
        "srmil_version",
        "backbone",
        "weights_hash",
        "mpp",
        "patch_px",
        "stride_px",
        "read_level",
        "transforms",
    ):
        assert key in attrs, key
    assert attrs["backbone"]["model"] == "resnet18" and attrs["mpp"] == plan["target_mpp"]
    assert np.isfinite(group["features"][...].astype(np.float32)).all()


def test_features_are_bitwise_reproducible(tiles: tuple[str, Path], tmp_path: Path) -> None:
    slide, tiles_json = tiles
    for name, workers in (("a", 0), ("b", 1)):
        extract_features(
            slide,
            tiles_json,
            tmp_path / f"{name}.zarr",
            load_backbone(SPEC),
            "resnet18",
            batch_size=8,
            num_workers=workers,
            dtype="float32",
            progress=False,
        )
    a, _, attrs_a = store.read_feature_store(tmp_path / "a.zarr")
    b, _, attrs_b = store.read_feature_store(tmp_path / "b.zarr")
    assert a.tobytes() == b.tobytes()
    assert attrs_a["weights_hash"] == attrs_b["weights_hash"]


def test_local_checkpoint_loads_and_mismatch_is_clear(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)  # with its classifier head
    torch.save({"state_dict": source.state_dict()}, tmp_path / "r18.pth")
    loaded = load_backbone(
        {"model": "resnet18", "pretrained": False, "weights": str(tmp_path / "r18.pth")}
    )
    expected = source.state_dict()["conv1.weight"]
    assert torch.equal(loaded.model.state_dict()["conv1.weight"], expected)
    assert loaded.weights_hash != load_backbone(SPEC).weights_hash
    with pytest.raises(BackboneError, match=r"r18\.pth: checkpoint does not match resnet34"):
        load_backbone(
            {"model": "resnet34", "pretrained": False, "weights": str(tmp_path / "r18.pth")}
        )


def test_unknown_model_is_clear() -> None:
    with pytest.raises(BackboneError, match="unknown to timm"):
        load_backbone({"model": "no_such_net", "pretrained": False})
