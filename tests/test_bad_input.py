"""Bad input: every broken slide, sheet or setting gets a one-line error naming the file (or the
config key) and the fix, or a documented skip recorded in the outputs. Real slides written by
srmil.demo, damaged the way copies get damaged, read through OpenSlide; the CLI as the workflow
calls it; and a real Snakemake run with --keep-going on a cohort whose paths hold spaces and
non-ASCII characters (docs/robustness.md lists each case and where it is caught)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import tifffile
import torch
import yaml
from conftest import REPO, deep_update, snakemake

from srmil.cli import main
from srmil.cohort.samples import SampleSheetError, check_slide_file
from srmil.demo.geometry import TissueShape
from srmil.demo.write import write_slide
from srmil.errors import InputError, one_line
from srmil.features.backbones import load_backbone
from srmil.features.extract import extract_features
from srmil.features.extract import resolve_device as features_device
from srmil.graph import build_graph
from srmil.mil.bags import load_bag
from srmil.mil.train import resolve_device as train_device
from srmil.store import read_json, read_store_attrs
from srmil.wsi.segment import segment_slide
from srmil.wsi.slide import SlideError
from srmil.wsi.tiling import read_tiles, tile_slide

RESNET18 = {"model": "resnet18", "pretrained": False}


def make_slide(out: Path, name: str, label: str = "normal", index: int = 0, **kwargs) -> Path:
    """A demo slide at out/slides/{name} (1536 x 1152 px at 0.5 µm/px unless told)."""
    row = {"slide_id": "x", "path": f"slides/{name}", "label": label, "annotation": ""}
    size = kwargs.pop("size", (1536, 1152))
    write_slide(out, row, index, 0, size[0], size[1], 0.5, **kwargs)
    return out / row["path"]


def damage_level0(src: Path, dst: Path, from_fraction: float = 0.25) -> Path:
    """Zero level 0's tile data from `from_fraction` of its tiles on, keeping the length and the
    TIFF directories: a copy interrupted half-way into a preallocated file. OpenSlide opens it
    (the coarse levels are intact) and fails when it decodes the zeroed tiles."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    first = int(len(offsets) * from_fraction)
    start, end = offsets[first], offsets[-1] + counts[-1]
    data[start:end] = bytes(end - start)
    dst.write_bytes(bytes(data))
    return dst


def cut_last_page(src: Path, dst: Path) -> Path:
    """Cut the file inside its last image's data: every TIFF directory is still there, so the
    format is recognised, but OpenSlide fails to open it (short read)."""
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[-1]
        cut = page.dataoffsets[0] + sum(page.databytecounts) // 2
    dst.write_bytes(src.read_bytes()[:cut])
    return dst


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bad_slides")
    good = make_slide(out, "good.svs", "tumour")
    s = {
        "good": good,
        "blank": make_slide(out, "blank.tif", index=1, tissue_shape=TissueShape(n_pieces=(0, 0))),
        "tiny": make_slide(out, "tiny.svs", index=2, size=(192, 160)),
        "long": make_slide(out, "long.tif", index=3, size=(12288, 768)),
        "nompp_svs": make_slide(out, "nompp.svs", index=4, file_mpp=False),
        "nompp_tif": make_slide(out, "nompp.tif", index=5, file_mpp=False),
        "damaged": damage_level0(good, out / "damaged.svs"),
        "cut": cut_last_page(good, out / "cut.svs"),
        "empty": out / "empty.svs",
        "text": out / "text.svs",
    }
    s["empty"].write_bytes(b"")
    s["text"].write_text("slide_id,path\n")  # a CSV saved under a slide's name
    return s


def cli_error(capsys: pytest.CaptureFixture, *argv: object) -> str:
    """Run `srmil ARGV` in-process; return its one error line (and check it is only one)."""
    threads = torch.get_num_threads()  # `--threads` sets it for the process: restore it
    try:
        assert main([str(a) for a in argv]) == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"srmil {argv[0]}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- files that are no slide at all: refused when the sheet is read ---------------------------


def test_non_slides_are_refused_before_any_job(
    slides: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """The sheet check (run when Snakemake parses the workflow) refuses them, naming the sheet."""
    for name, message in (
        (
            "empty",
            r"empty\.svs: empty file \(0 bytes\); copy the slide again or remove its "
            r"row from sheet\.csv",
        ),
        (
            "text",
            r"text\.svs: not a slide OpenSlide can read \(another format, or a truncated "
            r"copy\); replace the file or remove its row from sheet\.csv",
        ),
    ):
        with pytest.raises(SampleSheetError, match=message):
            check_slide_file(slides[name], "sheet.csv")
    # A stage called on its own says so in one line as well.
    line = cli_error(
        capsys,
        "segment",
        "--slide",
        slides["empty"],
        "--out",
        tmp_path / "x.geojson",
        "--qc",
        tmp_path / "x.png",
    )
    assert f"{slides['empty']}: empty file (0 bytes)" in line
    line = cli_error(
        capsys,
        "segment",
        "--slide",
        slides["text"],
        "--out",
        tmp_path / "x.geojson",
        "--qc",
        tmp_path / "x.png",
    )
    assert f"{slides['text']}: not a slide OpenSlide can read (another format" in line


# --- damaged slides: found when read, fail that slide's job only -----------------------------


def test_truncated_slide_fails_its_job_with_one_line(
    slides: dict[str, Path], tmp_path: Path, capsys
) -> None:
    check_slide_file(slides["cut"])  # recognised: the sheet check lets it through
    line = cli_error(
        capsys,
        "segment",
        "--slide",
        slides["cut"],
        "--out",
        tmp_path / "cut.geojson",
        "--qc",
        tmp_path / "cut.png",
    )
    assert f"{slides['cut']}: OpenSlide cannot open it (" in line
    assert "truncated or damaged: copy it again, or remove its row" in line
    assert not list(tmp_path.iterdir())  # nothing written


def test_damaged_pixel_data_fails_when_features_read_it(
    slides: dict[str, Path], tmp_path: Path, capsys
) -> None:
    slide = slides["damaged"]
    check_slide_file(slide)
    # The segmentation view comes from an intact coarse level: these stages succeed.
    segment_slide(slide, tmp_path / "d.geojson", tmp_path / "d.png")
    plan = tile_slide(slide, tmp_path / "d.geojson", tmp_path / "d.json")
    assert plan.n_tiles > 0
    out = tmp_path / "features" / "d.zarr"
    line = cli_error(
        capsys,
        "features",
        "--slide",
        slide,
        "--tiles",
        tmp_path / "d.json",
        "--out",
        out,
        "--extractor",
        "r18",
        "--backbone",
        json.dumps(RESNET18),
        "--threads",
        "1",
        "--no-progress",
    )
    assert f"{slide}: pixel data at level 0, x=" in line
    assert "cannot be read (" in line and "the file is truncated or damaged" in line
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no store, no temporary
    # Reader processes (GPU machines) re-raise the error wrapped; it still prints as one line.
    with pytest.raises(SlideError) as err:
        extract_features(
            slide,
            tmp_path / "d.json",
            out,
            load_backbone(RESNET18),
            "r18",
            num_workers=1,
            device="cpu",
            progress=False,
        )
    assert one_line(err.value).startswith(f"{slide}: pixel data at level 0")


# --- exclude_failed_slides: a failed slide's outputs become a record that excludes it ---------


def test_exclusion_records_pass_from_stage_to_stage(
    slides: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """`--exclude-failed`: the stage that fails writes its outputs as a record with the reason
    and exits 0; each later stage passes the record on; a stage without the option, training
    and evaluation without it refuse the record in one line."""
    geojson, qc = tmp_path / "cut.geojson", tmp_path / "cut.qc.png"
    assert main(["segment", "--slide", str(slides["cut"]), "--out", str(geojson),
                 "--qc", str(qc), "--exclude-failed"]) == 0
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("srmil segment: excluded")]
    reason = f"segment: {slides['cut']}: OpenSlide cannot open it ("
    assert line.startswith(f"srmil segment: excluded (exclude_failed_slides): {reason}")
    collection = json.loads(geojson.read_text())
    assert collection["features"] == [] and collection["properties"]["excluded"].startswith(
        reason)
    assert qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without the option, the next stage refuses the record, naming the option and the fix.
    line = cli_error(capsys, "tile", "--slide", slides["cut"], "--tissue", geojson,
                     "--out", tmp_path / "cut.json")
    assert f"{geojson}: the slide was excluded by a run with exclude_failed_slides: true (" \
        f"{reason}" in line and "fix the slide file and rerun" in line
    # With it, each stage passes the same reason on, without opening the slide.
    tiles = tmp_path / "cut.json"
    for argv in (["tile", "--slide", "", "--tissue", geojson, "--out", tiles],
                 ["features", "--slide", "", "--tiles", tiles, "--out", tmp_path / "f/cut.zarr",
                  "--extractor", "r18", "--backbone", json.dumps(RESNET18)],
                 ["graph", "--tiles", tiles, "--out", tmp_path / "g/cut.zarr"]):
        assert main([str(a) for a in argv] + ["--exclude-failed"]) == 0
    assert read_json(tiles)["plan"]["excluded"].startswith(reason)
    assert read_store_attrs(tmp_path / "f/cut.zarr")["excluded"].startswith(reason)
    bag = load_bag(tmp_path / "f", tmp_path / "g", "cut", exclude_failed=True)
    assert len(bag) == 0 and bag.excluded.startswith(reason)
    with pytest.raises(InputError, match="slide 'cut': the slide was excluded by a run with"):
        load_bag(tmp_path / "f", tmp_path / "g", "cut")


def test_damaged_pixels_excluded_at_features(
    slides: dict[str, Path], tmp_path: Path, capsys
) -> None:
    slide = slides["damaged"]
    segment_slide(slide, tmp_path / "d.geojson", tmp_path / "d.png")
    tile_slide(slide, tmp_path / "d.geojson", tmp_path / "d.json")
    out = tmp_path / "f" / "d.zarr"
    threads = torch.get_num_threads()  # `--threads` sets it for the process: restore it
    assert main(["features", "--slide", str(slide), "--tiles", str(tmp_path / "d.json"),
                 "--out", str(out), "--extractor", "r18", "--backbone", json.dumps(RESNET18),
                 "--threads", "1", "--no-progress", "--exclude-failed"]) == 0
    torch.set_num_threads(threads)
    capsys.readouterr()
    attrs = read_store_attrs(out)
    assert attrs["excluded"].startswith(f"features: {slide}: pixel data at level 0, x=")
    assert attrs["n_patches"] == 0 and attrs["extractor"] == "r18"


# --- slides without a µm/px -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nompp_svs", "nompp_tif"])
def test_slide_without_mpp(slides: dict[str, Path], tmp_path: Path, capsys, name: str) -> None:
    slide = slides[name]
    line = cli_error(
        capsys,
        "segment",
        "--slide",
        slide,
        "--out",
        tmp_path / "a.geojson",
        "--qc",
        tmp_path / "a.png",
    )
    assert line.endswith(
        f"{slide}: no µm/px in the file; add an 'mpp' column to the sample sheet or set "
        "'mpp_fallback' in config.yaml"
    )
    fallback = segment_slide(slide, tmp_path / "b.geojson", tmp_path / "b.png", mpp_fallback=0.5)
    sheet = segment_slide(slide, tmp_path / "c.geojson", tmp_path / "c.png", mpp_override=0.5)
    assert (fallback["mpp"], fallback["mpp_source"]) == (0.5, "config fallback")
    assert (sheet["mpp"], sheet["mpp_source"]) == (0.5, "sample sheet")


# --- slides without patches: a recorded skip, and an empty bag downstream ---------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("tiny", "slide of 192 x 160 px is smaller than one patch (224 level-0 px)"),
        ("blank", "no tissue found"),
    ],
)
def test_slide_without_patches_is_a_recorded_skip(
    slides: dict[str, Path], tmp_path: Path, name: str, reason: str
) -> None:
    slide = slides[name]
    segment_slide(slide, tmp_path / "s.geojson", tmp_path / "s.png")
    plan = tile_slide(slide, tmp_path / "s.geojson", tmp_path / "s.json")
    coords, _, saved = read_tiles(tmp_path / "s.json")
    assert len(coords) == 0 and plan.skipped == saved.skipped == reason
    if name != "blank":
        return
    # Features and graphs of an empty bag: empty stores that say why, loaded as an empty bag.
    extract_features(
        slide,
        tmp_path / "s.json",
        tmp_path / "f" / "s.zarr",
        load_backbone(RESNET18),
        "r18",
        device="cpu",
        progress=False,
    )
    build_graph(tmp_path / "s.json", tmp_path / "g" / "s.zarr")
    assert read_store_attrs(tmp_path / "f" / "s.zarr")["skipped"] == reason
    bag = load_bag(tmp_path / "f", tmp_path / "g", "s")
    assert len(bag) == 0 and bag.x.shape == (0, 512) and bag.edge_index.shape == (2, 0)


def test_extreme_aspect_ratio_is_tiled(slides: dict[str, Path], tmp_path: Path) -> None:
    """16:1 (12288 x 768 px): tissue found, patches inside the slide, a QC image of that shape."""
    slide = slides["long"]
    summary = segment_slide(slide, tmp_path / "l.geojson", tmp_path / "l.png")
    plan = tile_slide(
        slide,
        tmp_path / "l.geojson",
        tmp_path / "l.json",
        out_qc_png=tmp_path / "l.tiles.png",
        seg_qc_png=tmp_path / "l.png",
    )
    coords, _, _ = read_tiles(tmp_path / "l.json")
    assert summary["n_pieces"] >= 1 and plan.n_tiles == len(coords) > 0
    assert (coords[:, 0] + 224 <= 12288).all() and (coords[:, 1] + 224 <= 768).all()
    from srmil.wsi.qc import read_png

    h, w = read_png(tmp_path / "l.tiles.png").shape[:2]
    assert w / h == pytest.approx(16, rel=0.1)


@pytest.mark.parametrize(
    ("resolve", "key"),
    [(features_device, "features.device"), (train_device, "train.device")],
)
def test_a_bad_device_names_its_key(resolve, key: str) -> None:
    """features.device and train.device (train, evaluate, predict): one line naming the key,
    not a torch traceback inside the job."""
    assert resolve("cpu") == torch.device("cpu")
    assert resolve("auto").type in ("cpu", "cuda")
    for bad in ("gpu", "cuda0", "cpu:1", " cuda", ""):
        with pytest.raises(InputError, match=rf"config\.yaml: {key} '{bad}' is not a device; "
                           r"use auto, cpu, mps, cuda or cuda:N") as err:
            resolve(bad)
        assert "\n" not in str(err.value)
    # Well formed, but no machine here has a 100th GPU.
    with pytest.raises(InputError, match=rf"{key} 'cuda:99' is not available on this machine"):
        resolve("cuda:99")


# --- sheets and config: the workflow stops at parse time with one line ------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rows", "extra", "expected"),
    [
        # one class only
        ([("a", "x", "p1"), ("b", "x", "p2")], [], "sheet.csv: only one class ('x')"),
        # a typo'd label, with the classes listed in the config
        (
            [("a", "normal", "p1"), ("b", "tumor", "p2")],
            ["classes=[normal,tumour]"],
            "sheet.csv: slide 'b' has label 'tumor', not one of classes normal, tumour",
        ),
        # a config value of the wrong type
        (
            [("a", "normal", "p1"), ("b", "tumour", "p2")],
            ["tile={patch_px: big}"],
            "config.yaml: tile.patch_px: 'big' is not valid: expected integer",
        ),
    ],
)
def test_workflow_stops_before_any_job(
    slides: dict[str, Path], tmp_path: Path, rows: list, extra: list, expected: str
) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    sheet = pd.DataFrame(
        [
            {"slide_id": s, "path": str(slides["good"]), "label": lab, "patient_id": p}
            for s, lab, p in rows
        ]
    )
    sheet.to_csv(tmp_path / "sheet.csv", index=False)
    proc = snakemake(tmp_path, "-n", "--config", "samples=sheet.csv", *extra, check=False)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("srmil: error: ")]
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"srmil: error: {expected}"), out[-3000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


# --- the workflow on a cohort with broken files: --keep-going, exclude_failed_slides, fixes ---

# slide id -> (file name, label, patient, how it is made)
COHORT = {
    "n1": ("slide ü 1.svs", "normal", "P1", {}),
    "n2": ("slide ü 2.tif", "normal", "P2", {"file_mpp": False}),  # µm/px from the sheet
    "n3": ("slide ü 3.tif", "normal", "P3", {"tissue_shape": TissueShape(n_pieces=(0, 0))}),
    "n4": ("slide ü 4.svs", "normal", "P4", {}),
    "t1": ("slide ü 5.svs", "tumour", "Jürgen O'Neil", {}),
    "t2": ("slide ü 6.tif", "tumour", "P6", {"size": (12288, 768)}),
    "t3": ("slide ü 7.svs", "tumour", "P7", {"size": (192, 160)}),
    "t4": ("slide ü 8.tif", "tumour", "P8", {}),
    "n5": ("slide ü 12.svs", "normal", "P5", {}),
    "t5": ("slide ü 13.tif", "tumour", "P12", {}),
    "bad_mpp": ("slide ü 9.tif", "normal", "P9", {"file_mpp": False}),
    "bad_read": ("slide ü 10.svs", "tumour", "P10", {}),  # damaged tiles at level 0
    "cut": ("slide ü 11.svs", "tumour", "P11", {}),  # truncated
}
# Rows whose file is no slide: slide id -> (file name, label, what it holds)
NOT_SLIDES = {
    "empty": ("empty.svs", "normal", b""),
    "gone": ("gone.svs", "normal", None),  # missing
    "text": ("text.svs", "tumour", b"slide_id,path\n"),  # a CSV under a slide's name
}
GOOD = ["n1", "n2", "n3", "n4", "n5", "t1", "t2", "t3", "t4", "t5"]  # n3, t3: no patches
# Enough good slides that every fold (seed 0) trains on both classes in each step below.
SMALL = {
    "cv": {"n_folds": 2},
    "features": {"threads": 1, "batch_size": 32, "num_workers": 0},
    "train": {
        "srmil": {"model": {}, "train": {"epochs": 2}},
        "abmil": {"model": {}, "train": {"epochs": 2}},
    },
    "evaluate": {"n_bootstrap": 20, "max_heatmaps": 2},
}


def write_cohort_slide(cohort: Path, slide_id: str, index: int) -> None:
    name, label, _, how = COHORT[slide_id]
    annotation = f"annotations/{name} ö.geojson" if slide_id == "t1" else ""
    row = {"slide_id": slide_id, "path": f"slides/{name}", "label": label,
           "annotation": annotation}
    size = how.get("size", (1536, 1152))
    kwargs = {k: v for k, v in how.items() if k != "size"}
    write_slide(cohort, row, index, 0, size[0], size[1], 0.5, **kwargs)


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.mark.slow
def test_broken_files_keep_going_then_excluded_then_fixed(tmp_path: Path) -> None:
    """A cohort with every kind of broken file among good slides, at paths with spaces and
    non-ASCII characters: `--keep-going` finishes every good slide and names each bad one in
    its log; `exclude_failed_slides: true` then trains and evaluates without them, listing them,
    and reuses every finished store; fixing two files brings them back; switching the option off
    again refuses to train; removing the bad rows trains the rest as before."""
    cohort = tmp_path / "cohort é" / "with spaces"
    rows = []
    for i, (slide_id, (name, label, patient, _)) in enumerate(COHORT.items()):
        write_cohort_slide(cohort, slide_id, i)
        rows.append({"slide_id": slide_id, "path": f"slides/{name}", "patient_id": patient,
                     "label": label,
                     "annotation": f"annotations/{name} ö.geojson" if slide_id == "t1" else "",
                     "mpp": "0.5" if slide_id == "n2" else ""})
    slides = cohort / "slides"
    damage_level0(slides / COHORT["bad_read"][0], slides / COHORT["bad_read"][0])
    cut_last_page(slides / COHORT["cut"][0], slides / COHORT["cut"][0])
    for slide_id, (name, label, data) in NOT_SLIDES.items():
        if data is not None:
            (slides / name).write_bytes(data)
        rows.append({"slide_id": slide_id, "path": f"slides/{name}", "patient_id": slide_id,
                     "label": label, "annotation": "", "mpp": ""})
    pd.DataFrame(rows).to_csv(cohort / "sheet 1.csv", index=False)
    # The rows still bad after step 3 removed.
    good_rows = [r for r in rows if r["slide_id"] in [*GOOD, "bad_read", "gone"]]
    pd.DataFrame(good_rows).to_csv(cohort / "sheet 2.csv", index=False)
    config = deep_update(yaml.safe_load((REPO / "config.yaml").read_text()), SMALL)
    config["samples"] = "cohort é/with spaces/sheet 1.csv"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    logs, results = tmp_path / "logs", tmp_path / "results"
    features, graphs = results / "features/resnet18", results / "graphs"

    # 0. `keep-going: true` in a profile is --keep-going: the DAG is built, each bad file warned.
    profile = tmp_path / "keep going profile"
    profile.mkdir()
    (profile / "config.yaml").write_text("keep-going: true\n")
    proc = snakemake(tmp_path, "-n", "--profile", str(profile), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{slides / NOT_SLIDES['gone'][0]}: slide file not found" in proc.stderr
    assert "(--keep-going: its jobs will fail)" in proc.stderr

    # 1. --keep-going, the default target: the DAG is built, every good slide gets its features
    # and graph, each bad slide's job fails with one line naming the file; nothing trains.
    proc = snakemake(tmp_path, "--keep-going", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "MissingInputException" not in out, out[-3000:]
    for slide_id, problem in (("empty", "empty file (0 bytes)"), ("gone", "slide file not found"),
                              ("text", "not a slide OpenSlide can read")):
        assert f"srmil: warning: {slides / NOT_SLIDES[slide_id][0]}: {problem}" in out
    expected = {
        "segment/empty": "empty file (0 bytes); copy the slide again",
        "segment/gone": "slide file not found; fix its path in the sample sheet",
        "segment/text": "not a slide OpenSlide can read",
        "segment/cut": "OpenSlide cannot open it (",
        "segment/bad_mpp": "no µm/px in the file; add an 'mpp' column to the sample sheet",
        "features/resnet18/bad_read": "pixel data at level 0, x=",
    }
    for job, problem in expected.items():
        log = (logs / f"{job}.log").read_text().strip()
        stage, slide_id = job.split("/")[0], job.split("/")[-1]
        name = COHORT[slide_id][0] if slide_id in COHORT else NOT_SLIDES[slide_id][0]
        errors = [x for x in log.splitlines() if x.startswith(f"srmil {stage}: error: ")]
        assert "Traceback" not in log and len(errors) == 1, log
        assert errors[0].startswith(f"srmil {stage}: error: {slides / name}: {problem}"), log
    assert sorted(p.name for p in features.iterdir()) == [f"{s}.zarr" for s in GOOD]
    assert sorted(p.name for p in graphs.iterdir()) == sorted(
        f"{s}.zarr" for s in [*GOOD, "bad_read"])
    assert not (results / "models").exists()
    feature_stamps = stamps(features)

    # 2. exclude_failed_slides: true (no --keep-going needed): the run ends with evaluated
    # models and lists every excluded slide with the stage and its reason; the good slides'
    # stores are reused, not recomputed.
    opt_in = ("--config", "exclude_failed_slides=true")
    proc = snakemake(tmp_path, *opt_in)
    assert "it will be excluded" in proc.stderr
    assert {k: v for k, v in stamps(features).items() if k[:-5] in GOOD} == feature_stamps
    bad = ["bad_mpp", "bad_read", "cut", "empty", "gone", "text"]
    for model in ("srmil", "abmil"):
        metrics = json.loads((results / f"eval/{model}/resnet18/metrics.json").read_text())
        assert metrics["excluded"] == bad and metrics["skipped"] == ["n3", "t3"]
        reasons = metrics["excluded_reasons"]
        assert reasons["gone"].startswith(f"segment: {slides / 'gone.svs'}: slide file not found")
        assert reasons["bad_read"].startswith(
            f"features: {slides / COHORT['bad_read'][0]}: pixel data at level 0")
        assert reasons["bad_mpp"].startswith("segment: ") and "no µm/px" in reasons["bad_mpp"]
        predicted = pd.read_csv(results / f"eval/{model}/resnet18/predictions.csv")
        assert sorted(predicted["slide_id"]) == ["n1", "n2", "n4", "n5", "t1", "t2", "t4", "t5"]
        fold = json.loads((results / f"models/{model}/resnet18/fold_0.json").read_text())
        assert set(fold["excluded"]) <= set(bad)
    left_out = (results / "eval/resnet18/left_out.html").read_text()
    for slide_id in [*bad, "n3", "t3"]:
        assert f"<td>{slide_id}</td>" in left_out
    assert "pixel data at level 0" in left_out and "no tissue found" in left_out
    log = (logs / "segment/gone.log").read_text()
    assert "srmil segment: excluded (exclude_failed_slides): segment: " in log
    snakemake(tmp_path, *opt_in, "--report", "report.html")
    report = (tmp_path / "report.html").read_text(errors="replace")
    assert "Fixing an excluded slide" in report  # the caption
    embedded = re.search(r"filename=left_out\.html;base64,([A-Za-z0-9+/=]+)", report)
    assert base64.b64decode(embedded.group(1)).decode() == left_out

    # 3. Two files fixed (the missing one copied in, the damaged one replaced): only their
    # jobs rerun, then training; they are back in the cohort.
    write_cohort_slide(cohort, "bad_read", list(COHORT).index("bad_read"))
    shutil.copy(slides / COHORT["n1"][0], slides / "gone.svs")
    before = stamps(features)
    proc = snakemake(tmp_path, *opt_in)
    after = stamps(features)
    changed = sorted(k[:-5] for k in after if after[k] != before.get(k))
    assert changed == ["bad_read", "gone"], changed
    metrics = json.loads((results / "eval/srmil/resnet18/metrics.json").read_text())
    assert metrics["excluded"] == ["bad_mpp", "cut", "empty", "text"]
    assert "gone" in set(pd.read_csv(results / "eval/srmil/resnet18/predictions.csv")["slide_id"])

    # 4. The option switched off again: the sheet check stops the run before any job, as
    # without records; past it (--keep-going), training refuses the records in one line.
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "srmil: error: " in proc.stderr
    proc = snakemake(tmp_path, "--keep-going", check=False)
    assert proc.returncode != 0
    train_logs = "".join(p.read_text() for p in (logs / "train").rglob("*.log"))
    assert "was excluded by a run with exclude_failed_slides: true" in train_logs

    # 5. The bad rows removed instead: the run completes, reusing every finished store.
    before = stamps(features)
    proc = snakemake(tmp_path, "--config", "samples=cohort é/with spaces/sheet 2.csv")
    assert "extract_features" not in proc.stdout + proc.stderr
    assert stamps(features) == before
    for model in ("srmil", "abmil"):
        out = results / f"eval/{model}/resnet18"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["skipped"] == ["n3", "t3"] and metrics["excluded"] == []
        assert metrics["skipped_reasons"] == {
            "n3": "no tissue found",
            "t3": "slide of 192 x 160 px is smaller than one patch (224 level-0 px)",
        }
        predicted = pd.read_csv(out / "predictions.csv")
        assert sorted(predicted["slide_id"]) == [
            "bad_read", "gone", "n1", "n2", "n4", "n5", "t1", "t2", "t4", "t5"]
        assert len(list((out / "heatmaps").glob("*.png"))) == 2
    tiles = json.loads((results / "tiles/n2.json").read_text())
    assert tiles["plan"]["mpp_source"] == "sample sheet"


# --- a power cut: outputs reach the disk before their name does -------------------------------


def test_atomic_writes_are_flushed_to_disk(tmp_path: Path, monkeypatch) -> None:
    """Every file and folder of a written store, and the folder that holds its name, is fsynced
    (os.fsync is watched, and still called): after a power cut the name never lacks its data."""
    import os

    import numpy as np

    from srmil.store import write_feature_store, write_json

    synced, fsync = set(), os.fsync

    def watched(fd: int) -> None:
        info = os.fstat(fd)
        synced.add((info.st_dev, info.st_ino))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", watched)
    out = tmp_path / "features"
    write_feature_store(out / "s.zarr", np.ones((5000, 8)), np.zeros((5000, 2)), {"n": 5000})
    write_json(out / "s.json", {"n": 5000})
    written = [out, out / "s.json", *(out / "s.zarr").rglob("*"), out / "s.zarr"]
    assert len(written) > 6  # chunks, metadata, folders
    for path in written:
        info = path.stat()
        assert (info.st_dev, info.st_ino) in synced, path
    assert sorted(p.name for p in out.iterdir()) == ["s.json", "s.zarr"]  # no temporaries left


# --- nothing a user supplies is unpickled -----------------------------------------------------

def test_a_config_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """A YAML config with a Python tag is an error for `srmil` and for the workflow; the command
    in it never runs."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"seed: !!python/object/apply:os.system [\"touch '{marker}'\"]\n")
    srmil = subprocess.run(
        [sys.executable, "-m", "srmil.cli", "predict", "--samples", "new.csv", "--models-dir",
         "models", "--out-dir", "out", "--config", str(evil)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert srmil.returncode != 0
    last = srmil.stderr.strip().splitlines()[-1]
    assert last.startswith(f"srmil predict: error: {evil}: cannot read")
    workflow = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "--configfile",
         str(evil)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert workflow.returncode != 0
    assert not marker.exists()


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.marker}'",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path, capsys) -> None:
    from srmil.features.backbones import BackboneError, load_weights
    from srmil.mil.inference import load_model
    from srmil.mil.models import build_model, default_hparams
    from srmil.store import StoreError, load_state_dict

    marker = tmp_path / "ran"
    model = build_model("abmil", in_dim=4, n_classes=2)
    evil = tmp_path / "models" / "fold_0.pt"
    evil.parent.mkdir()
    torch.save({**model.state_dict(), "extra": _Payload(marker)}, evil)
    evil.with_suffix(".json").write_text(
        json.dumps(
            {
                "model": "abmil",
                "in_dim": 4,
                "classes": ["a", "b"],
                "model_hparams": default_hparams("abmil"),
            }
        )
    )
    for load in (load_state_dict, load_model):
        with pytest.raises(StoreError, match="not a plain tensor checkpoint") as err:
            load(evil)
        assert "Python objects besides tensors" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BackboneError):
        load_weights(load_backbone(RESNET18).model, evil, "resnet18")
    assert not marker.exists()  # nothing ran
    torch.load(evil, weights_only=False)  # what a plain torch.load would have done
    assert marker.exists()
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # a plain state dict loads
    assert load_state_dict(tmp_path / "plain.pt").keys() == model.state_dict().keys()
