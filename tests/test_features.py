"""Feature extraction on a real generated slide into a real Zarr store, and every way of
naming a backbone: timm name, hf-hub repo in an offline cache, local checkpoint, preset."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import timm
import torch
import zarr

from srmil import store
from srmil.errors import InputError
from srmil.features.backbones import BackboneError, load_backbone
from srmil.features.extract import (
    ChunkDataset,
    extract_features,
    plan_batches,
    preprocess,
    resolve_workers,
    split_chunks,
    usable_cpus,
)
from srmil.store import FeatureProvenance
from srmil.wsi.segment import segment_slide
from srmil.wsi.slide import open_slide, to_rgb
from srmil.wsi.tiling import read_tiles, tile_slide

SPEC = {"model": "resnet18", "pretrained": False}


@pytest.fixture(scope="module")
def tiles(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("feat")
    row = cohort.iloc[1]
    segment_slide(row.path, out / "t.geojson", out / "t.png")
    tile_slide(row.path, out / "t.geojson", out / "t.json")
    return row.path, out / "t.json"


@pytest.fixture(scope="module")
def resnet18_store(tiles: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    slide, tiles_json = tiles
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    extract_features(
        slide, tiles_json, out, load_backbone(SPEC), "resnet18", batch_size=8, progress=False
    )
    return out


def hub_cache(root: Path, repo_id: str, model: torch.nn.Module, **save_kwargs) -> Path:
    """A Hugging Face hub cache entry as `hf download` leaves it (refs/main -> snapshot)."""
    entry = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    timm.models.save_for_hf(model, str(snapshot), safe_serialization=True, **save_kwargs)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / "main").write_text("0" * 40)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_store_layout_and_provenance(tiles: tuple[str, Path], resnet18_store: Path) -> None:
    group = zarr.open_group(str(resnet18_store), mode="r")  # plain zarr, no srmil
    coords, _, plan = read_tiles(tiles[1])
    features = group["features"]
    assert features.shape == (len(coords), 512) and features.dtype == np.float16
    assert features.chunks[1] == 512 and features.compressors  # chunked by rows, compressed
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
    assert attrs["backbone"]["model"] == "resnet18" and attrs["mpp"] == plan.target_mpp
    assert attrs["transforms"]["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN)
    assert np.isfinite(features[...].astype(np.float32)).all()
    # Every attribute but the completeness flag is a field of the typed provenance, and back.
    provenance = FeatureProvenance.from_attrs(attrs)
    assert provenance.attrs() == {k: v for k, v in attrs.items() if k != "srmil_complete"}
    assert provenance.patch_level0 == plan.patch_level0 and provenance.skipped is None
    assert list(provenance.for_model()) == list(FeatureProvenance.MODEL_KEYS)


def test_store_reads_through_fsspec_urls(resnet18_store: Path) -> None:
    """What object storage looks like to zarr: a URL. file:// and an in-memory bucket."""
    local = zarr.open_group(f"file://{resnet18_store}", mode="r")
    fs = fsspec.filesystem("memory")
    for path in sorted(resnet18_store.rglob("*")):
        if path.is_file():
            fs.pipe(f"/bucket/s.zarr/{path.relative_to(resnet18_store)}", path.read_bytes())
    remote = zarr.open_group("memory://bucket/s.zarr", mode="r")
    assert np.array_equal(remote["features"][...], local["features"][...])
    assert remote.attrs["weights_hash"] == local.attrs["weights_hash"]


def test_features_are_bitwise_reproducible(
    tiles: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same inputs and seed, different readers (thread vs process) and read plans; "d" reads
    in chunks of 2 tiles, so its first batch is 4 chunks spread over one thread per core."""
    slide, tiles_json = tiles
    assert len(read_tiles(tiles_json)[0]) >= 8  # a whole first batch for "d"
    for name, workers, block, chunk in (
        ("a", 0, 1, 8),
        ("b", 1, 1, 8),
        ("c", 0, 4, 8),
        ("d", 0, 1, 2),
    ):
        monkeypatch.setattr("srmil.features.extract.THREAD_CHUNK", chunk)
        extract_features(
            slide,
            tiles_json,
            tmp_path / f"{name}.zarr",
            load_backbone(SPEC, seed=0),
            "resnet18",
            batch_size=8,
            num_workers=workers,
            read_block=block,
            dtype="float32",
            progress=False,
        )
    a, _, attrs_a = store.read_feature_store(tmp_path / "a.zarr")
    for name in ("b", "c", "d"):
        b, _, attrs_b = store.read_feature_store(tmp_path / f"{name}.zarr")
        assert a.tobytes() == b.tobytes(), name
        assert attrs_a["weights_hash"] == attrs_b["weights_hash"]


def test_preprocess_normalises_with_the_models_config() -> None:
    """(x/255 - mean)/std per channel, channels-last, resized to the model's input size."""
    config = {"input_size": (3, 8, 8), "mean": (0.1, 0.5, 0.9), "std": (0.2, 0.3, 0.4)}
    x = torch.randint(
        0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = preprocess(x, config)
    ref = (
        x.double().permute(0, 3, 1, 2) / 255
        - torch.tensor(config["mean"]).view(1, 3, 1, 1).double()
    )
    ref = ref / torch.tensor(config["std"]).view(1, 3, 1, 1).double()
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    small = preprocess(x, {**config, "input_size": (3, 4, 4), "interpolation": "bicubic"})
    assert small.shape == (2, 3, 4, 4) and small.is_contiguous(memory_format=torch.channels_last)
    flat = preprocess(
        torch.full((1, 8, 8, 3), 51, dtype=torch.uint8), {**config, "input_size": (3, 4, 4)}
    )
    assert torch.allclose(
        flat[0, :, 0, 0],
        (0.2 - torch.tensor(config["mean"])) / torch.tensor(config["std"]),
        atol=1e-5,
    )


def test_block_reads_equal_single_reads(tiles: tuple[str, Path]) -> None:
    slide, tiles_json = tiles
    coords, _, plan = read_tiles(tiles_json)
    pixels, reads = {}, {}
    for block in (1, 3):
        chunks = split_chunks(plan_batches(coords, plan, batch_size=16, block=block))
        data = ChunkDataset(slide, coords, plan, chunks, block=block)
        rows = np.zeros((len(coords), plan.patch_px, plan.patch_px, 3), np.uint8)
        for i in range(len(data)):
            x, idx = data[i]
            rows[idx.numpy()] = x.numpy()
        pixels[block], reads[block] = rows, data.n_reads()
    assert np.array_equal(pixels[1], pixels[3])
    assert reads[1] == len(coords) and reads[3] < reads[1]


def test_patches_equal_openslide_reads_with_transparent_edges(tiles: tuple[str, Path]) -> None:
    """The fast RGBA->RGB path equals OpenSlide + to_rgb; beyond the slide's edge is white."""
    slide, tiles_json = tiles
    coords, _, plan = read_tiles(tiles_json)
    edge = [[plan.slide_width - 100, 0]]  # 124 px of the patch lie outside the slide
    coords = np.concatenate([coords[:5], np.asarray(edge, np.int64)])
    data = ChunkDataset(slide, coords, plan, split_chunks(plan_batches(coords, plan, 8, 1)))
    x, idx = data[0]
    handle = open_slide(slide)
    for row, i in zip(x.numpy(), idx.numpy(), strict=True):
        size = (plan.read_px, plan.read_px)
        expected = to_rgb(handle.read_region(tuple(int(v) for v in coords[i]), 0, size))
        assert np.array_equal(row, expected)
    assert (x[idx.numpy().tolist().index(5), :, -124:] == 255).all()


def test_interrupted_store_is_never_complete(tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    features, coords = np.ones((3, 4), np.float32), np.zeros((3, 2), np.int64)
    with pytest.raises(TypeError):  # fails after the arrays are written, before the rename
        store.write_feature_store(out, features, coords, {"bad": object()})
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary sibling
    group = zarr.open_group(str(out), mode="w")  # a store some other writer left half-done
    group.create_array("features", shape=(3, 4), dtype="float32")
    with pytest.raises(ValueError, match="incomplete feature store"):
        store.read_feature_store(out)


def test_hf_hub_model_from_offline_cache(offline_hub: Path) -> None:
    torch.manual_seed(3)
    source = timm.create_model("test_vit", pretrained=False, num_classes=0)
    snapshot = hub_cache(offline_hub, "srmil-test/tiny-vit", source)
    config = json.loads((snapshot / "config.json").read_text())
    config["pretrained_cfg"]["mean"] = [0.1, 0.2, 0.3]  # the hub's preprocessing is used
    (snapshot / "config.json").write_text(json.dumps(config))
    backbone = load_backbone({"model": "hf-hub:srmil-test/tiny-vit", "pretrained": True})
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], value), key
    assert tuple(backbone.data_config["mean"]) == (0.1, 0.2, 0.3)
    assert backbone.feature_dim == source.num_features
    overlay = {"pretrained_cfg_overlay": {"std": [0.5, 0.5, 0.5]}}  # a model card's values
    spec = {"model": "hf-hub:srmil-test/tiny-vit", "pretrained": True, "kwargs": overlay}
    assert tuple(load_backbone(spec).data_config["std"]) == (0.5, 0.5, 0.5)
    with pytest.raises(BackboneError, match="srmil-test/absent is not in"):
        load_backbone({"model": "hf-hub:srmil-test/absent", "pretrained": True})


def test_timm_pretrained_weights_come_from_the_cache(offline_hub: Path) -> None:
    """pretrained: true for a timm name reads the hub id timm knows, from the local cache."""
    with pytest.raises(BackboneError, match=r"timm/test_resnet\.r160_in1k is not in"):
        load_backbone({"model": "test_resnet.r160_in1k", "pretrained": True})
    torch.manual_seed(4)
    source = timm.create_model("test_resnet", pretrained=False)
    hub_cache(offline_hub, "timm/test_resnet.r160_in1k", source)
    backbone = load_backbone({"model": "test_resnet.r160_in1k"})  # pretrained unless stated
    weight = backbone.model.state_dict()["conv1.0.weight"]
    assert torch.equal(weight, source.state_dict()["conv1.0.weight"])
    random = load_backbone({"model": "test_resnet.r160_in1k", "pretrained": False})
    assert random.weights_hash != backbone.weights_hash


def test_vit_tokens_need_a_pool(offline_hub: Path) -> None:
    """A hub ViT whose config leaves global_pool empty (Virchow2 style)."""
    torch.manual_seed(5)
    source = timm.create_model("test_vit", pretrained=False, num_classes=0, global_pool="")
    hub_cache(offline_hub, "srmil-test/tokens", source, model_args={"global_pool": ""})
    with pytest.raises(BackboneError, match="set pool: cls\\+mean"):
        load_backbone({"model": "hf-hub:srmil-test/tokens", "pretrained": True})
    spec = {"model": "hf-hub:srmil-test/tokens", "pretrained": True, "pool": "cls+mean"}
    backbone = load_backbone(spec)
    x = torch.randn(2, 3, *backbone.data_config["input_size"][1:])
    with torch.inference_mode():
        tokens = source.forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, source.num_prefix_tokens :].mean(1)], 1)
        assert torch.allclose(backbone.model(x), expected, atol=1e-6)
    assert backbone.feature_dim == 2 * source.num_features


def test_layer_classes_by_name() -> None:
    """Virchow2 needs mlp_layer/act_layer classes: named as import paths in the config."""
    kwargs = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    backbone = load_backbone({"model": "test_vit", "pretrained": False, "kwargs": kwargs})
    assert any(isinstance(m, torch.nn.SiLU) for m in backbone.model.modules())
    with pytest.raises(BackboneError, match="cannot be imported"):
        load_backbone(
            {"model": "test_vit", "pretrained": False, "kwargs": {"act_layer": "torch.nn.NoSuch"}}
        )


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
    with pytest.raises(BackboneError, match="weights file not found"):
        load_backbone({"model": "resnet18", "weights": str(tmp_path / "absent.pth")})


def test_clam_preset_is_truncated_resnet50(tmp_path: Path) -> None:
    torch.manual_seed(2)
    full = timm.create_model("resnet50", pretrained=False).eval()
    torch.save(full.state_dict(), tmp_path / "r50.pth")
    backbone = load_backbone({"model": "clam_resnet50_trunc", "weights": str(tmp_path / "r50.pth")})
    assert backbone.feature_dim == 1024
    assert "layer4.0.conv1.weight" not in backbone.model.state_dict()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = full.layer3(full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(
            full.conv1(x))))))).mean((2, 3))  # fmt: skip
        assert torch.allclose(backbone.model(x), expected, atol=1e-5)
    assert backbone.data_config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN


def test_unknown_model_and_keys_are_clear() -> None:
    with pytest.raises(BackboneError, match="unknown to timm"):
        load_backbone({"model": "no_such_net", "pretrained": False})
    with pytest.raises(InputError, match=r"backbone 'resnet18': unknown key \('weight' was"):
        load_backbone({"model": "resnet18", "pretrained": False, "weight": "x.pth"})


def test_cli_writes_a_store(tiles: tuple[str, Path], tmp_path: Path) -> None:
    from srmil.cli import main

    slide, tiles_json = tiles
    spec = json.dumps(SPEC)
    argv = ["features", "--slide", slide, "--tiles", str(tiles_json), "--out"]
    argv += [str(tmp_path / "c.zarr"), "--extractor", "r18", "--backbone", spec, "--no-progress"]
    assert main(argv) == 0
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["srmil_complete"]


def test_auto_readers_follow_the_cpus_this_process_may_use() -> None:
    """A SLURM job bound to k cores gets k - 1 readers on a GPU, not the node's count."""
    assert resolve_workers("auto", torch.device("cpu")) == 0
    assert resolve_workers(3, torch.device("cuda")) == 3
    expected = min(16, max(1, len(os.sched_getaffinity(0)) - 1))
    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert resolve_workers("auto", torch.device("cuda")) == expected


REUSE_PROBE = """
import resource, sys
import numpy as np
from srmil.device import retain_freed_memory
from srmil.wsi.tiling import read_tiles
if sys.argv[1] == "retain":
    assert retain_freed_memory() and retain_freed_memory()  # idempotent
np.ones(64 << 20, np.uint8)  # allocate, touch, free
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 << 20, np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting")
def test_feature_processes_reuse_freed_memory() -> None:
    """`srmil features` keeps freed blocks: a second large allocation takes no page faults
    (with glibc's defaults it is mapped afresh, as every activation of a forward pass was)."""
    faults = {
        mode: int(subprocess.check_output([sys.executable, "-c", REUSE_PROBE, mode], text=True))
        for mode in ("retain", "defaults")
    }
    assert faults["retain"] < 16 < faults["defaults"], faults
