"""End-to-end: the real Snakemake workflow on a tiny demo cohort, run once and checked by many
assertions. Marked slow; it is the test that shows a fresh clone produces trained models."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import REPO, snakemake

from srmil.demo.write import write_slide
from srmil.wsi.geometry import polygons_mask, read_geojson_polygons
from srmil.wsi.qc import QC_MAX_SIDE

# The tiny cohort (TINY), `snakemake` and the session's completed `run` live in conftest.py,
# shared with test_reruns.py and test_slurm.py.


@pytest.mark.slow
def test_dry_run_on_fresh_config_lists_every_stage(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    out = snakemake(tmp_path, "-n").stdout
    for rule in (
        "demo",
        "segment_slide",
        "tile_slide",
        "extract_features",
        "build_graph",
        "splits",
        "train_fold",
        "evaluate_model",
    ):
        assert rule in out, rule


@pytest.mark.slow
def test_feature_stores_open_with_plain_zarr(run: Path) -> None:
    sheet = pd.read_csv(run / "resources/demo/samples.csv")
    for slide_id in sheet["slide_id"]:
        group = zarr.open_group(str(run / f"results/features/resnet18/{slide_id}.zarr"), mode="r")
        n = group["features"].shape[0]
        assert group["features"].shape == (n, 512) and group["coords"].shape == (n, 2)
        attrs = dict(group.attrs)
        assert attrs["backbone"]["model"] == "resnet18" and attrs["backbone"]["pretrained"] is False
        assert len(attrs["weights_hash"]) == 64 and attrs["mpp"] == 0.5


@pytest.mark.slow
def test_coordinates_lie_inside_tissue(run: Path) -> None:
    sheet = pd.read_csv(run / "resources/demo/samples.csv")
    for slide_id in sheet["slide_id"]:
        group = zarr.open_group(str(run / f"results/features/resnet18/{slide_id}.zarr"), mode="r")
        coords, size = group["coords"][...], group.attrs["patch_level0"]
        polygons = read_geojson_polygons(run / f"results/segment/{slide_id}.geojson")
        mask = polygons_mask(polygons, (1536 // 4, 2048 // 4), 4.0)
        centres = ((coords + size / 2) / 4).astype(int)
        assert mask[centres[:, 1], centres[:, 0]].mean() >= 0.9, slide_id


@pytest.mark.slow
def test_metrics_are_numbers_in_range(run: Path) -> None:
    for model in ("srmil", "abmil"):
        metrics = json.loads((run / f"results/eval/{model}/resnet18/metrics.json").read_text())
        for key in ("auc", "accuracy", "balanced_accuracy", "macro_f1"):
            value = metrics["pooled"][key]
            assert value is not None and 0.0 <= value <= 1.0, (model, key, value)
        predictions = pd.read_csv(run / f"results/eval/{model}/resnet18/predictions.csv")
        assert len(predictions) == 8
        probs = predictions.filter(like="prob_").to_numpy()
        assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
        for plot in ("roc.png", "confusion.png", "training_curves.png"):
            assert (run / f"results/eval/{model}/resnet18/{plot}").stat().st_size > 1000


@pytest.mark.slow
def test_models_load_with_weights_only(run: Path) -> None:
    for model in ("srmil", "abmil"):
        for fold in (0, 1):
            state = torch.load(
                run / f"results/models/{model}/resnet18/fold_{fold}.pt", weights_only=True
            )
            assert state and all(torch.is_tensor(v) for v in state.values())
            meta = json.loads(
                (run / f"results/models/{model}/resnet18/fold_{fold}.json").read_text()
            )
            assert meta["classes"] == ["normal", "tumour"]


@pytest.mark.slow
def test_every_job_has_a_log(run: Path) -> None:
    logs = list((run / "logs").rglob("*.log"))
    assert len(logs) >= 1 + 8 * 4 + 1 + 4 + 2


@pytest.mark.slow
def test_complete_run_has_nothing_left_to_do(run: Path) -> None:
    assert "Nothing to be done" in snakemake(run, "-n").stdout + snakemake(run, "-n").stderr


@pytest.mark.slow
def test_missing_slide_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "sheet.csv").write_text("slide_id,path,patient_id,label\na,missing.svs,p,x\n")
    proc = snakemake(tmp_path, "-n", "--config", "samples=sheet.csv", check=False)
    assert proc.returncode != 0
    assert "missing.svs: slide file not found" in proc.stdout + proc.stderr


# --- evaluation, prediction, ablation, report (issue 7) ---------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > min_bytes, path


@pytest.mark.slow
def test_heatmaps_diagnostics_and_comparison(run: Path) -> None:
    label = pd.read_csv(run / "resources/demo/samples.csv").set_index("slide_id")["label"]
    for model in ("srmil", "abmil"):
        out = run / f"results/eval/{model}/resnet18"
        shown = [p.stem for p in (out / "heatmaps").glob("*.png")]
        assert sorted(label[shown]) == ["normal", "normal", "tumour", "tumour"]  # max_heatmaps 4
        for png in [*(out / "heatmaps").glob("*.png"), out / "attention_diagnostics.png"]:
            assert_png(png)
        metrics = json.loads((out / "metrics.json").read_text())
        low, high = metrics["pooled_ci"]["accuracy"]
        assert low <= metrics["pooled"]["accuracy"] <= high
        record = json.loads(
            (run / f"results/models/{model}/resnet18/fold_0.attention.json").read_text()
        )
        assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3, 4]
        # Tumour slides of the training set carry annotations: the figure's panel (c) has data.
        assert record["positive_slides"] and len(record["epochs"][0]["top1_positive"]) == len(
            record["positive_slides"]
        )
    table = pd.read_csv(run / "results/eval/resnet18/comparison.csv")
    assert set(table["model"]) == {"srmil", "abmil"}
    assert "| metric | srmil | abmil |" in (run / "results/eval/resnet18/comparison.md").read_text()
    assert_png(run / "results/eval/resnet18/attention_diagnostics.png")


@pytest.mark.slow
def test_predict_new_slides_reproduces_evaluate(run: Path) -> None:
    """New slides as a user brings them: ids the training sheet does not hold, odd file names in
    another folder, a slide too small for a patch. Copies of two cohort slides get the
    probability the evaluate stage gave the originals from the fold model that held them out,
    through Snakemake (with labels, then without) and `srmil predict`; the tiny slide gets a
    row with its reason."""
    evaluated = pd.read_csv(run / "results/eval/srmil/resnet18/predictions.csv")
    evaluated = evaluated.set_index("slide_id")
    sheet = pd.read_csv(run / "resources/demo/samples.csv").set_index("slide_id")
    originals = [sheet.index[sheet["label"] == label][0] for label in ("normal", "tumour")]
    folder = run / "new slides ü"
    (folder / "scans").mkdir(parents=True)
    new_ids = {"case-A.1": originals[0], "case_B": originals[1]}
    rows = []
    for new_id, original in new_ids.items():
        name = f"scans/{new_id} (copy){Path(sheet.at[original, 'path']).suffix}"
        shutil.copy(run / "resources/demo" / sheet.at[original, "path"], folder / name)
        rows.append({"slide_id": new_id, "path": name, "label": sheet.at[original, "label"]})
    write_slide(folder, {"slide_id": "tiny", "path": "scans/tiny one.svs", "label": "normal",
                         "annotation": ""}, 0, 0, 192, 160, 0.5)
    rows.append({"slide_id": "tiny-1", "path": "scans/tiny one.svs", "label": "normal"})
    labelled = pd.DataFrame(rows)
    labelled.to_csv(folder / "new labelled.csv", index=False)
    labelled.drop(columns="label").to_csv(folder / "new.csv", index=False)
    tiny_reason = "slide of 192 x 160 px is smaller than one patch (224 level-0 px)"

    out = run / "results/predict/srmil/resnet18"
    tables = {}
    for name in ("new labelled.csv", "new.csv"):
        snakemake(run, "predict", "--config", f"predict={{samples: 'new slides ü/{name}'}}")
        tables[name] = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert list(tables["new labelled.csv"]["label"]) == list(labelled["label"])
    assert "label" not in tables["new.csv"].columns
    cli_out = run / "predict_cli"
    subprocess.run(
        [sys.executable, "-m", "srmil.cli", "predict", "--samples", "new slides ü/new.csv",
         "--models-dir", "results/models/srmil/resnet18", "--out-dir", str(cli_out),
         "--config", "config.yaml", "--threads", "1", "--device", "cpu"],
        cwd=run, check=True, capture_output=True, timeout=600,
    )
    tables["cli"] = pd.read_csv(cli_out / "predictions.csv").set_index("slide_id")
    for table in tables.values():
        assert list(table.index) == ["case-A.1", "case_B", "tiny-1"]
        for new_id, original in new_ids.items():
            fold = evaluated.at[original, "fold"]
            assert table.at[new_id, f"prob_tumour_fold{fold}"] == pytest.approx(
                evaluated.at[original, "prob_tumour"], abs=1e-4
            )
        assert table.at["tiny-1", "skipped"] == tiny_reason
        assert table.at["tiny-1", "n_models"] == 0
    for heatmaps in (out / "heatmaps", cli_out / "heatmaps"):
        assert sorted(p.stem for p in heatmaps.glob("*.png")) == ["case-A.1", "case_B"]
        assert_png(heatmaps / "case_B.png")


@pytest.mark.slow
def test_ablation_target_sweeps_the_mask_ratio(run: Path) -> None:
    snakemake(run, "ablation")
    table = pd.read_csv(run / "results/ablation/srmil/resnet18/mask_ratio.csv")
    assert list(table["mask_ratio"]) == [0.5, 0.7]
    assert table[["auc", "accuracy"]].notna().all().all()
    meta = json.loads((run / "results/ablation/srmil/resnet18/mask_0.5/fold_1.json").read_text())
    assert meta["model_hparams"]["mask_ratio"] == 0.5
    # The main model's ratio is not trained again: its row is the evaluate stage's metrics.
    assert not (run / "results/ablation/srmil/resnet18/mask_0.7").exists()
    main = json.loads((run / "results/eval/srmil/resnet18/metrics.json").read_text())
    assert table.at[1, "accuracy"] == pytest.approx(main["pooled"]["accuracy"])
    assert_png(run / "results/ablation/srmil/resnet18/mask_ratio.png")


@pytest.mark.slow
def test_study_target_summarises_seeds_attention_and_mask_ratio(run: Path) -> None:
    # A config file merged over config.yaml, as workflow/studies/hard-demo.yaml is used.
    (run / "study.yaml").write_text("study: {seeds: [0, 1], mask_ratio_seeds: [1]}\n")
    snakemake(run, "study", "--configfile", str(run / "study.yaml"))
    out = run / "results/study/resnet18"
    runs = pd.read_csv(out / "runs.csv")
    # Per seed: SRMIL (main ratio 0.7) and ABMIL; for the curve's seed 1 also SRMIL at the
    # ablation's other ratio, 0.5.
    assert sorted(runs["seed"]) == [0, 0, 1, 1, 1]
    assert sorted(runs["mask_ratio"].fillna(-1)) == [-1, -1, 0.5, 0.7, 0.7]
    assert runs[["auc", "accuracy", "test_max_attention_median"]].notna().all().all()
    assert runs["test_max_attention_median"].between(0, 1, inclusive="right").all()
    # Seed 0 on its own folds is the main workflow's seed: the same models, the same metrics.
    main = json.loads((run / "results/eval/srmil/resnet18/metrics.json").read_text())
    seed0 = runs[(runs["model"] == "srmil") & (runs["mask_ratio"] == 0.7) & (runs["seed"] == 0)]
    assert seed0["auc"].item() == pytest.approx(main["pooled"]["auc"])
    assert (run / "results/study/seed_0/splits.json").read_bytes() == (
        run / "results/splits.json"
    ).read_bytes()
    summary = (out / "summary.md").read_text()
    for line in ("| abmil |", "| srmil |", "Each model minus SRMIL, paired by seed", "| 0.5 |",
                 "| 0.7 |", "mask ratio (seeds 1)"):
        assert line in summary, line
    assert_png(out / "study.png")


@pytest.mark.slow
def test_report_renders_with_the_plots(run: Path) -> None:
    if not (run / "results/ablation/srmil/resnet18/mask_ratio.csv").exists():
        snakemake(run, "ablation")  # when this test runs alone
    snakemake(run, "--report", "report.html", "all", "ablation")
    html = (run / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    for caption in ("Attention diagnostics", "Mask-ratio ablation"):
        assert caption in html, caption
    # The captions of workflow/report/*.rst, with their wildcards filled in.
    for model in ("srmil", "abmil"):
        slide = sorted((run / f"results/eval/{model}/resnet18/heatmaps").glob("*.png"))[0].stem
        for caption in (
            f"ROC curves of {model} on resnet18 features",
            f"Confusion matrix of {model} on resnet18 features",
            f"Training curves of {model} on resnet18 features",
            f"Attention of {model} (resnet18 features) on test slide {slide},",
        ):
            assert caption in html, caption
    # Each slide's images are filed under it, one labelled row each: QC images, then heatmaps.
    slides = report_menu(html)["Slides"]
    heatmaps = {p.stem for p in run.glob("results/eval/*/resnet18/heatmaps/*.png")}
    assert sorted(slides) == sorted(pd.read_csv(run / "resources/demo/samples.csv")["slide_id"])
    for slide, files in slides.items():
        expected = {f"results/segment/{slide}.qc.png", f"results/tiles/{slide}.qc.png"}
        if slide in heatmaps:
            expected |= {f"results/eval/{m}/resnet18/heatmaps/{slide}.png"
                         for m in ("srmil", "abmil")}
        assert set(files) == expected, slide
    assert '"labels": {"image": "2 tiling"}' in html
    assert '"labels": {"image": "3 attention, srmil / resnet18"}' in html
    # They are compact: palette PNGs of a bounded size (docs/benchmarks.md).
    for png in run.glob("results/*/*.qc.png"):
        assert_compact_png(png, QC_MAX_SIDE)
    for png in run.glob("results/eval/*/resnet18/heatmaps/*.png"):
        assert_compact_png(png, 2000)
    # A cohort-sized report leaves each slide's images out; they stay under results/. As a zip
    # (--report *.zip): the page and each file it shows, stored as they are.
    snakemake(run, "--report", "small.zip", "all", "ablation", "--config",
              "report={slide_images: false}")
    with zipfile.ZipFile(run / "small.zip") as archive:
        names = archive.namelist()
        small = archive.read("small/report.html").decode(errors="replace")
    assert "Slides" not in report_menu(small) and not any(".qc.png" in n for n in names)
    assert "Attention diagnostics" in small and "ROC curves of srmil" in small
    assert any(n.endswith("/roc.png") for n in names)


def report_menu(html: str) -> dict[str, dict[str, list[str]]]:
    """A Snakemake report's menu: category -> subcategory -> the files shown there."""
    menu = re.search(r"var categories = (\{.*?\});\s*$", html, re.MULTILINE)
    assert menu, "no categories in the report"
    return json.loads(menu.group(1))


def assert_compact_png(path: Path, max_side: int) -> None:
    """A palette PNG (at most 256 colours) whose longer side is at most `max_side` px."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.mode == "P" and max(image.size) <= max_side, (path, image.size)


@pytest.mark.slow
def test_imported_features_train_as_the_extracted_ones_did(run: Path, tmp_path: Path) -> None:
    """A cohort whose features come from files, as people bring them: TRIDENT and CLAM HDF5
    files written by `srmil export` from the run's stores (three with their slide file, three
    without), and two of the run's own stores. Nothing is segmented, tiled or extracted;
    `snakemake evaluate` gives the run's predictions byte for byte, with heatmaps of the
    slides whose file is given. Files without srmil's provenance (as the tools write them)
    train too."""
    import h5py
    import yaml

    for layout in ("trident", "clam"):
        subprocess.run(
            [sys.executable, "-m", "srmil.cli", "export", "--features-dir",
             str(run / "results/features/resnet18"), "--out-dir", str(tmp_path / layout),
             "--layout", layout, "--tiles-dir", str(run / "results/tiles")],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    demo = pd.read_csv(run / "resources/demo/samples.csv", keep_default_na=False)
    rows = []
    for i, row in enumerate(demo.itertuples()):
        sid = row.slide_id
        if i < 3:
            features, path, mpp = f"trident/{sid}.h5", str(run / "resources/demo" / row.path), ""
        elif i < 6:
            features, path, mpp = f"clam/h5_files/{sid}.h5", "", "0.5"
        else:
            features, path, mpp = str(run / f"results/features/resnet18/{sid}.zarr"), "", ""
        rows.append({"slide_id": sid, "path": path, "patient_id": row.patient_id,
                     "label": row.label, "mpp": mpp, "features": features})
    pd.DataFrame(rows).to_csv(tmp_path / "imported sheet.csv", index=False)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["samples"] = "imported sheet.csv"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    snakemake(tmp_path, "evaluate")
    assert not (tmp_path / "results/segment").exists()
    for model in ("srmil", "abmil"):
        ours, theirs = (d / f"results/eval/{model}/resnet18" for d in (tmp_path, run))
        assert (ours / "predictions.csv").read_bytes() == (theirs / "predictions.csv").read_bytes()
        pooled = [json.loads((d / "metrics.json").read_text())["pooled"] for d in (ours, theirs)]
        assert pooled[0] == pooled[1]
        drawn = {p.stem for p in (ours / "heatmaps").glob("*.png")}
        assert drawn and drawn <= {r["slide_id"] for r in rows[:3]}
    store = zarr.open_group(str(tmp_path / "results/features/resnet18/demo_003.zarr"), mode="r")
    assert store.attrs["source"]["format"] == "clam"
    assert store.attrs["weights_hash"] == zarr.open_group(
        str(run / "results/features/resnet18/demo_003.zarr"), mode="r").attrs["weights_hash"]

    # New slides known by their feature files, under new ids: `snakemake predict` imports them.
    new = pd.DataFrame(rows[:3]).drop(columns=["label"]).assign(slide_id=["new-a", "new.b", "c"])
    new.to_csv(tmp_path / "new slides.csv", index=False)
    snakemake(tmp_path, "predict", "--config", "predict={samples: 'new slides.csv'}")
    predicted = pd.read_csv(tmp_path / "results/predict/srmil/resnet18/predictions.csv")
    assert list(predicted["slide_id"]) == ["new-a", "new.b", "c"]
    assert predicted["prob_tumour"].notna().all()
    heatmaps = tmp_path / "results/predict/srmil/resnet18/heatmaps"
    assert sorted(p.stem for p in heatmaps.glob("*.png")) == ["c", "new-a", "new.b"]

    # The tools' own files carry no srmil provenance: one cohort of them still trains.
    plain = tmp_path / "plain"
    plain.mkdir()
    for row in rows:
        source = tmp_path / "trident" / f"{row['slide_id']}.h5"
        shutil.copy(source, plain / source.name)
        with h5py.File(plain / source.name, "a") as f:
            del f.attrs["srmil_provenance"]
        row.update(features=f"plain/{source.name}", path="", mpp="")
    pd.DataFrame(rows).to_csv(tmp_path / "imported sheet.csv", index=False)
    config["train"]["models"] = ["abmil"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(tmp_path / "results")
    snakemake(tmp_path, "train")
    meta = json.loads((tmp_path / "results/models/abmil/resnet18/fold_0.json").read_text())
    assert meta["provenance"]["features"]["backbone"] == {"imported": "trident",
                                                          "encoder": "resnet18"}


@pytest.mark.slow
def test_regions_of_interest_from_the_sheet_restrict_tiling(run: Path, tmp_path: Path) -> None:
    """The sheet's `roi` and `roi_exclude` columns reach the tiling rule: the slide with
    regions keeps only the run's patches inside them; the others tile as in the run."""
    import yaml

    sheet = pd.read_csv(run / "resources/demo/samples.csv", keep_default_na=False)
    sheet["path"] = [str(run / "resources/demo" / p) for p in sheet["path"]]
    sheet["annotation"] = [str(run / "resources/demo" / a) if a else "" for a in
                           sheet["annotation"]]
    first = sheet.loc[0, "slide_id"]
    _, _, plan = read_tiles_json(run / f"results/tiles/{first}.json")
    half = {"type": "Polygon", "coordinates": [[[0, 0], [plan["slide_width"] / 2, 0],
            [plan["slide_width"] / 2, plan["slide_height"]], [0, plan["slide_height"]],
            [0, 0]]]}  # fmt: skip
    (tmp_path / "left half.geojson").write_text(json.dumps(half))
    sheet["roi"] = ["left half.geojson"] + [""] * (len(sheet) - 1)
    sheet.to_csv(tmp_path / "sheet.csv", index=False)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["samples"] = "sheet.csv"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "tile")
    for slide_id in sheet["slide_id"]:
        ours = read_tiles_json(tmp_path / f"results/tiles/{slide_id}.json")[0]
        theirs = read_tiles_json(run / f"results/tiles/{slide_id}.json")[0]
        if slide_id == first:
            size = plan["patch_level0"]
            inside = [c for c in theirs if c[0] + size / 2 <= plan["slide_width"] / 2]
            assert ours == inside and 0 < len(ours) < len(theirs)
        else:
            assert ours == theirs


def read_tiles_json(path: Path) -> tuple[list, list, dict]:
    """A tile set as a user reads it (plain JSON): origins as [x, y] pairs, fractions, plan."""
    data = json.loads(path.read_text())
    coords = [list(xy) for xy in zip(data["x"], data["y"], strict=True)]
    return coords, data["tissue_fraction"], data["plan"]


@pytest.mark.slow
def test_a_dicom_slide_predicts_as_the_slide_it_came_from(run: Path, tmp_path: Path) -> None:
    """A cohort SVS converted to DICOM (wsidicomizer, tiles moved as they are), under a new id:
    `snakemake predict` gives it the probability the evaluate stage gave the SVS from the fold
    model that held it out (DICOM is read by OpenSlide, the SVS by the JPEG tile reader: the
    decoders' rounding apart, the same pixels)."""
    from test_dicom import _converter

    converter = _converter()
    evaluated = pd.read_csv(run / "results/eval/srmil/resnet18/predictions.csv")
    sheet = pd.read_csv(run / "resources/demo/samples.csv")
    original = next(r for r in sheet.itertuples() if r.path.endswith(".svs"))
    converter.convert(run / "resources/demo" / original.path, tmp_path / "dicom series")
    dicom = sorted((tmp_path / "dicom series").glob("*.dcm"))[0]
    pd.DataFrame([{"slide_id": "scan-2024.07", "path": str(dicom)}]).to_csv(
        tmp_path / "dicom.csv", index=False)
    snakemake(run, "predict", "--config", f"predict={{samples: '{tmp_path / 'dicom.csv'}'}}")
    table = pd.read_csv(run / "results/predict/srmil/resnet18/predictions.csv")
    row = evaluated.set_index("slide_id").loc[original.slide_id]
    assert list(table["slide_id"]) == ["scan-2024.07"]
    assert table.at[0, f"prob_tumour_fold{row['fold']}"] == pytest.approx(row["prob_tumour"],
                                                                         abs=1e-3)
    assert (run / "results/predict/srmil/resnet18/heatmaps/scan-2024.07.png").is_file()
