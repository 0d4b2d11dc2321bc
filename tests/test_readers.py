"""The JPEG tile reader against OpenSlide, on real slides: the demo generator's SVS and tiled
TIFF (YCbCr tiles), and slides written here with tifffile in Aperio's RGB-JPEG convention with
shared JPEGTables, odd sizes and partial edge tiles. Pixels, features, the automatic choice and
its provenance, the fallback to OpenSlide, and damaged tiles."""

from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from conftest import toy_plan
from jpeg_slides import damage_tile, write_jpeg_slide

from srmil import store
from srmil.demo.write import write_flat_tiff
from srmil.features.backbones import load_backbone
from srmil.features.extract import ChunkDataset, extract_features, resolve_workers, split_chunks
from srmil.features.gpu_decode import decode_patches
from srmil.features.readers import ADOBE, ReaderChoice, TileReader, choose_reader, inspect_level
from srmil.settings import TileSettings
from srmil.wsi.segment import segment_slide
from srmil.wsi.slide import SlideError, open_slide, to_rgb
from srmil.wsi.tiling import ReadPlan, read_tiles, tile_slide

SPEC = {"model": "resnet18", "pretrained": False}
# The issue's bound for reads at a level's own resolution (both decoders' rounding).
NATIVE_MAX, NATIVE_MEAN = 2, 0.5
# Reads that shrink 2x through libjpeg-turbo's DCT scaling, against OpenSlide's full-size read
# then INTER_AREA: measured max 20, mean per channel <= 1.01 on 0.25 µm/px demo slides.
SCALED_MAX, SCALED_MEAN = 40, 1.5


@pytest.fixture(scope="module")
def slides(cohort: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo SVS and TIFF (1536 x 1152: a half row of tiles at the bottom) and, from the demo
    SVS's pixels at an odd size (1234 x 1001), Aperio RGB-JPEG and YCbCr slides with tables."""
    out = tmp_path_factory.mktemp("jpeg")
    svs = next(Path(p) for p in cohort.path if p.endswith(".svs"))
    tif = next(Path(p) for p in cohort.path if p.endswith(".tif"))
    pixels = to_rgb(open_slide(svs).read_region((100, 60), 0, (1234, 1001)))
    return {
        "demo_svs": svs,
        "demo_tif": tif,
        "aperio_rgb": write_jpeg_slide(out / "rgb.svs", pixels, "RGB", tile=240),
        "tiff_ycbcr": write_jpeg_slide(out / "ycc.tif", pixels, "YCbCr", tile=256, aperio=False),
    }


def edge_and_random_origins(width: int, height: int, size: int, n: int = 40) -> np.ndarray:
    """Random origins plus the slide's corners, right and bottom edges, and patches reaching
    past them (partly and wholly outside)."""
    rng = np.random.default_rng(0)
    random = np.stack([rng.integers(0, width, n), rng.integers(0, height, n)], 1)
    edges = [
        [0, 0],
        [width - size, height - size],
        [width - size // 2, 13],
        [17, height - size // 3],
        [width - 1, height - 1],
        [width, 0],
        [width - size + 1, height - size - 1],
    ]
    return np.concatenate([random, np.asarray(edges)]).astype(np.int64)


def plan_for(level: int, downsample: float, read_px: int, patch_px: int) -> ReadPlan:
    return toy_plan(level=level, level_downsample=downsample, read_px=read_px,
                    patch_px=patch_px, stride_level0=patch_px)


def read_all(path: Path, coords: np.ndarray, plan: dict, reader: ReaderChoice | None):
    data = ChunkDataset(
        str(path), coords, plan, split_chunks([np.arange(len(coords))], 8), reader=reader
    )
    out = np.zeros((len(coords), plan.patch_px, plan.patch_px, 3), np.uint8)
    for i in range(len(data)):
        x, idx = data[i]
        out[idx.numpy()] = x.numpy()
    return out, data


def assert_close(a: np.ndarray, b: np.ndarray, max_diff: float, mean_diff: float) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= max_diff and diff.mean(axis=(0, 1, 2)).max() <= mean_diff, (
        diff.max(),
        diff.mean(axis=(0, 1, 2)),
    )


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("demo_svs", 0),
        ("demo_tif", 0),
        ("aperio_rgb", 0),
        ("tiff_ycbcr", 0),
        ("demo_svs", 1),
        ("demo_tif", 1),
    ],
)
def test_native_reads_equal_openslide(slides: dict[str, Path], name: str, level: int) -> None:
    """Both tile paths (CPU decoding; the GPU path's code with torchvision on the CPU) against
    OpenSlide's read_region, at level 0 and level 1 (downsample 4.0 exactly), edges and
    partial tiles included."""
    path = slides[name]
    slide = open_slide(path)
    ds = slide.level_downsamples[level]
    width, height = slide.level_dimensions[level]
    size = 224 if level == 0 else 64
    origins = edge_and_random_origins(width, height, size) * int(ds)  # level-0 px
    plan = plan_for(level, ds, size, size)
    choice = choose_reader(str(path), slide, origins, plan)
    assert choice.name == "jpeg-tiles", choice.reason
    expected = np.stack(
        [to_rgb(slide.read_region(tuple(int(v) for v in o), level, (size, size))) for o in origins]
    )
    patches, data = read_all(path, origins, plan, choice)
    assert_close(patches, expected, NATIVE_MAX, NATIVE_MEAN)
    encoded = ChunkDataset(
        str(path), origins, plan, [np.arange(len(origins))], reader=choice, encoded=True
    )[0][0]
    on_device = decode_patches(encoded, torch.device("cpu"), size, str(path), level)
    assert_close(on_device.numpy(), expected, NATIVE_MAX, NATIVE_MEAN)


def test_aperio_rgb_needs_the_colour_space_openslide_sets(slides: dict[str, Path]) -> None:
    """The RGB-encoded tiles' streams look like YCbCr to libjpeg: the reader says otherwise
    with an Adobe marker (as OpenSlide sets the colour space); YCbCr tiles need none."""
    rgb = inspect_level(str(slides["aperio_rgb"]), open_slide(slides["aperio_rgb"]), 0)
    ycc = inspect_level(str(slides["tiff_ycbcr"]), open_slide(slides["tiff_ycbcr"]), 0)
    assert rgb.colorspace == "RGB" and ADOBE["RGB"] in rgb.prefix and rgb.tile_w == 240
    assert ycc.colorspace == "YCbCr" and b"Adobe" not in ycc.prefix
    with tifffile.TiffFile(slides["aperio_rgb"]) as tif:  # abbreviated streams + tables
        assert tif.pages[0].jpegtables and int(tif.pages[0].photometric) == 2


@pytest.mark.parametrize("name", ["demo_svs", "aperio_rgb"])
def test_reads_that_shrink(slides: dict[str, Path], name: str) -> None:
    """A level twice as fine as the target: DCT-scaled decoding within the stated tolerance of
    OpenSlide + INTER_AREA; a ratio DCT scaling cannot take (1.5x) equals it exactly."""
    path = slides[name]
    slide = open_slide(path)
    width, height = slide.dimensions
    for read_px, patch_px, scale in ((224, 112, 2), (168, 112, 1)):
        origins = edge_and_random_origins(width, height, read_px) // 2 * 2
        plan = plan_for(0, 1.0, read_px, patch_px)
        choice = choose_reader(str(path), slide, origins, plan)
        assert choice.dct_scale == scale
        expected, _ = read_all(path, origins, plan, None)
        patches, _ = read_all(path, origins, plan, choice)
        if scale == 1:
            assert np.array_equal(patches, expected)
        else:
            assert_close(patches, expected, SCALED_MAX, SCALED_MEAN)
            odd = choose_reader(str(path), slide, origins + [[1, 0]], plan)
            assert odd.dct_scale == 1  # an odd origin is not a whole pixel at 1/2


@pytest.fixture(scope="module")
def tiles(slides: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan")
    segment_slide(slides["demo_svs"], out / "t.geojson", out / "t.png")
    tile_slide(slides["demo_svs"], out / "t.geojson", out / "t.json")
    return out / "t.json"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_features_agree_and_are_reproducible(
    slides: dict[str, Path],
    tiles: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The tile reader's features: bitwise equal across runs, a reader thread, a reader
    process and small chunks over several threads; cosine >= 0.9999 to OpenSlide's per patch;
    the automatic choice logged and kept in the store."""
    slide = slides["demo_svs"]
    assert len(read_tiles(tiles)[0]) >= 8
    runs = {
        "os": ("openslide", 0, 8),
        "a": ("auto", 0, 8),
        "b": ("auto", 0, 8),
        "c": ("jpeg-tiles", 1, 8),
        "d": ("auto", 0, 2),
    }
    with caplog.at_level(logging.INFO, logger="srmil.features.extract"):
        for name, (reader, workers, chunk) in runs.items():
            monkeypatch.setattr("srmil.features.extract.THREAD_CHUNK", chunk)
            extract_features(
                slide,
                tiles,
                tmp_path / f"{name}.zarr",
                load_backbone(SPEC, seed=0),
                "resnet18",
                batch_size=8,
                num_workers=workers,
                dtype="float32",
                progress=False,
                reader=reader,
            )
    assert f"reader for {slide.name}: jpeg-tiles (auto: level 0 is 256 x 256" in caplog.text
    feats = {n: store.read_feature_store(tmp_path / f"{n}.zarr") for n in runs}
    for name in ("b", "c", "d"):
        assert feats["a"][0].tobytes() == feats[name][0].tobytes(), name
    assert cosine(feats["a"][0], feats["os"][0]).min() >= 0.9999
    reader = zarr.open_group(str(tmp_path / "a.zarr"), mode="r").attrs["reader"]
    assert reader["name"] == "jpeg-tiles" and reader["requested"] == "auto"
    assert reader["decoder"].startswith("simplejpeg") and reader["dct_scale"] == 1
    assert feats["os"][2]["reader"]["name"] == "openslide"
    assert feats["os"][2]["reader"]["decoder"].startswith("OpenSlide 4.")


def test_features_of_a_finer_slide_read_at_the_target(tmp_path: Path) -> None:
    """A 0.25 µm/px slide tiled at 0.5 µm/px: tiles decoded at 1/2 (DCT scaling), features
    close to OpenSlide-read-and-shrink."""
    from srmil.cohort.samples import read_sample_sheet
    from srmil.demo.write import write_demo

    sheet = write_demo(tmp_path / "c", 1, width_px=2048, height_px=1536, mpp=0.25, progress=False)
    slide = read_sample_sheet(sheet).path.iloc[0]
    segment_slide(slide, tmp_path / "t.geojson", tmp_path / "t.png")
    tile_slide(slide, tmp_path / "t.geojson", tmp_path / "t.json",
               params=TileSettings(target_mpp=0.5))
    for reader in ("openslide", "auto"):
        extract_features(
            slide,
            tmp_path / "t.json",
            tmp_path / f"{reader}.zarr",
            load_backbone(SPEC, seed=0),
            "resnet18",
            batch_size=8,
            dtype="float32",
            progress=False,
            reader=reader,
        )
    ref, _, _ = store.read_feature_store(tmp_path / "openslide.zarr")
    got, _, attrs = store.read_feature_store(tmp_path / "auto.zarr")
    assert attrs["read_px"] == 448 and attrs["reader"]["dct_scale"] == 2
    assert cosine(got, ref).min() >= 0.9999


def test_slides_the_tile_reader_does_not_take(slides: dict[str, Path], tmp_path: Path) -> None:
    """zlib tiles (a generic TIFF OpenSlide reads) and origins between pixels of a level: auto
    falls back to OpenSlide and says why; jpeg-tiles stops with one line."""
    pixels = to_rgb(open_slide(slides["demo_svs"]).read_region((0, 0), 0, (700, 500)))
    path = tmp_path / "zlib.tif"
    write_flat_tiff(path, pixels, mpp=0.5, compression="zlib")
    slide = open_slide(path)
    origins = np.array([[0, 0], [300, 200]])
    choice = choose_reader(str(path), slide, origins, plan_for(0, 1.0, 224, 224))
    assert choice.name == "openslide" and "ADOBE_DEFLATE, not JPEG" in choice.reason
    with pytest.raises(SlideError, match=r"zlib\.tif: features\.reader jpeg-tiles cannot read"):
        choose_reader(str(path), slide, origins, plan_for(0, 1.0, 224, 224), "jpeg-tiles")
    demo = open_slide(slides["demo_svs"])
    between = choose_reader(str(slides["demo_svs"]), demo, origins + 2, plan_for(1, 4.0, 56, 56))
    assert between.name == "openslide" and "between pixels" in between.reason
    odd = open_slide(slides["aperio_rgb"])  # 1234 x 1001 over 308 x 250: downsample 4.005
    uneven = choose_reader(str(slides["aperio_rgb"]), odd, origins * 4, plan_for(1, 4.0, 56, 56))
    assert uneven.name == "openslide" and "between pixels" in uneven.reason
    forced = choose_reader(str(path), slide, origins, plan_for(0, 1.0, 224, 224), "openslide")
    assert forced.name == "openslide" and forced.reason == "requested"


def test_a_corrupt_tile_is_the_damaged_file_error(slides: dict[str, Path], tmp_path: Path) -> None:
    """The one-line error of the OpenSlide path (slide, level, location), from both tile
    paths; never a patch of garbage."""
    src = slides["aperio_rgb"]
    path = tmp_path / "damaged.svs"
    col, row = damage_tile(src, path, 7)
    slide = open_slide(path)
    origin = np.array([[col * 240 + 10, row * 240 + 20]])  # a patch inside the damaged tile
    plan = plan_for(0, 1.0, 224, 224)
    choice = choose_reader(str(path), slide, origin, plan)
    expected = rf"{path}: pixel data at level 0, x={origin[0, 0]} y={origin[0, 1]} cannot be read"
    with pytest.raises(SlideError, match=expected) as openslide_err:
        read_all(path, origin, plan, None)
    with pytest.raises(SlideError, match=expected) as tiles_err:
        read_all(path, origin, plan, choice)
    encoded = ChunkDataset(str(path), origin, plan, [np.arange(1)], reader=choice, encoded=True)
    with pytest.raises(SlideError, match=expected) as device_err:
        decode_patches(encoded[0][0], torch.device("cpu"), 224, str(path), 0)
    for err in (openslide_err, tiles_err, device_err):
        text = str(err.value)
        assert "\n" not in text and text.endswith(
            "the file is truncated or damaged: copy it again, or remove its row from the "
            "sample sheet"
        )
    # Tile data cut short by the end of the file.
    level = choice.level
    short = tmp_path / "short.svs"
    short.write_bytes(src.read_bytes()[: int(level.offsets[7] + level.counts[7] // 2)])
    reader = TileReader(str(short), level)
    with pytest.raises(SlideError, match=r"short\.svs: pixel data .*tile 7 has \d+ of \d+ bytes"):
        reader.tile(col, row, (0, 0))


def test_memory_stays_bounded(slides: dict[str, Path]) -> None:
    """A cache of 16 tiles reads the whole slide with the same pixels; it never holds more."""
    path = slides["demo_svs"]
    slide = open_slide(path)
    width, height = slide.dimensions
    grid = np.mgrid[0 : height - 224 : 224, 0 : width - 224 : 224].reshape(2, -1).T[:, ::-1]
    plan = plan_for(0, 1.0, 224, 224)
    choice = choose_reader(str(path), slide, grid, plan)
    full, data = read_all(path, grid, plan, choice)
    touched = {(x // 256 + i, y // 256 + j) for x, y in grid for i in (0, 1) for j in (0, 1)}
    assert data.tiles.decoded == len(touched)  # raster order: each tile decoded once
    small = TileReader(str(path), choice.level, cache_bytes=1)
    out = np.empty_like(full)
    for start in range(0, len(grid), 8):
        small.read(grid[start : start + 8], 224, out[start : start + 8], grid[start : start + 8])
        assert small.cached() <= small.capacity == 16
    assert np.array_equal(out, full)


def test_the_gpu_decoder_gets_the_bytes_and_one_reader_thread() -> None:
    assert resolve_workers("auto", torch.device("cuda"), gpu_decode=True) == 0
    assert resolve_workers("auto", torch.device("cpu"), gpu_decode=False) == 0


def test_threads_sharing_a_reader_get_the_same_pixels(slides: dict[str, Path]) -> None:
    """Reader threads share one TileReader (the first batch is spread over them): with a cache
    small enough to evict all the time, their patches equal one thread's."""
    path = slides["aperio_rgb"]
    slide = open_slide(path)
    width, height = slide.dimensions
    grid = np.mgrid[0:height:100, 0:width:100].reshape(2, -1).T[:, ::-1].astype(np.int64)
    plan = plan_for(0, 1.0, 224, 224)
    choice = choose_reader(str(path), slide, grid, plan)
    expected, _ = read_all(path, grid, plan, choice)
    shared = TileReader(str(path), choice.level, cache_bytes=1)
    out = np.zeros_like(expected)

    def read(start: int) -> None:
        part = slice(start, start + 4)
        shared.read(grid[part], 224, out[part], grid[part])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            list(pool.map(read, range(0, len(grid), 4)))
            assert np.array_equal(out, expected)


def test_cli_takes_the_reader(slides: dict[str, Path], tiles: Path, tmp_path: Path) -> None:
    """`srmil features --reader openslide` (the workflow passes features.reader)."""
    from srmil.cli import main

    argv = ["features", "--slide", str(slides["demo_svs"]), "--tiles", str(tiles), "--out"]
    argv += [
        str(tmp_path / "c.zarr"),
        "--extractor",
        "r18",
        "--backbone",
        '{"model": "resnet18", "pretrained": false}',
        "--no-progress",
        "--reader",
        "openslide",
    ]
    assert main(argv) == 0
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r").attrs["reader"]["name"] == (
        "openslide"
    )
