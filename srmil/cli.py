"""The `srmil` command: one sub-command per stage. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _optional_float(text: str) -> float | None:
    return None if text in ("", "nan", "None", "null") else float(text)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_demo(args: argparse.Namespace) -> None:
    from srmil.demo.write import write_demo
    from srmil.settings import DemoSettings, section_from_dict

    demo = section_from_dict(DemoSettings, {
        "out_dir": str(args.out), "n_slides": args.n_slides, "width_px": args.width,
        "height_px": args.height, "mpp": args.mpp, "prefix": args.prefix,
        "tumour_fraction": args.tumour_fraction, "tumour_contrast": args.tumour_contrast,
    }, "srmil demo")
    sheet = write_demo(
        Path(demo.out_dir),
        n_slides=demo.n_slides,
        seed=args.seed,
        width_px=demo.width_px,
        height_px=demo.height_px,
        mpp=demo.mpp,
        prefix=demo.prefix,
        tumour_fraction=demo.tumour_fraction,
        tumour_contrast=demo.tumour_contrast,
    )
    print(sheet)


def cmd_segment(args: argparse.Namespace) -> None:
    from srmil.errors import InputError
    from srmil.settings import SegmentSettings, section_from_dict
    from srmil.wsi.segment import segment_slide

    if args.annotation and not Path(args.annotation).is_file():
        raise InputError(
            f"{args.annotation}: annotation not found; fix its path in the sample sheet or "
            "leave it empty"
        )
    summary = segment_slide(
        args.slide,
        args.out,
        args.qc,
        section_from_dict(SegmentSettings, args.params, "--params of srmil segment"),
        annotation=args.annotation or None,
        mpp_override=args.mpp,
        mpp_fallback=args.mpp_fallback,
    )
    logging.info(
        "segment: %d tissue pieces, %.3f mm² (mpp %.4g from %s)",
        summary["n_pieces"],
        summary["tissue_area_mm2"],
        summary["mpp"],
        summary["mpp_source"],
    )


def cmd_tile(args: argparse.Namespace) -> None:
    from srmil.cohort.exclusion import check_upstream
    from srmil.settings import TileSettings, section_from_dict
    from srmil.wsi.tiling import tile_slide

    check_upstream(args.tissue)
    plan = tile_slide(
        args.slide,
        args.tissue,
        args.out,
        section_from_dict(TileSettings, args.params, "--params of srmil tile"),
        mpp_override=args.mpp,
        mpp_fallback=args.mpp_fallback,
        out_qc_png=args.qc or None,
        seg_qc_png=args.seg_qc or None,
        roi=args.roi or None,
        roi_exclude=args.roi_exclude or None,
    )
    logging.info(
        "tile: %d patches of %d px at %.3g µm/px (level %d)",
        plan.n_tiles,
        plan.patch_px,
        plan.target_mpp,
        plan.level,
    )


def cmd_features(args: argparse.Namespace) -> None:
    from srmil.cohort.exclusion import check_upstream

    check_upstream(args.tiles)  # before the backbone is loaded
    _set_threads(args.threads)
    from srmil.device import retain_freed_memory

    retain_freed_memory()  # this process extracts one slide, then exits
    from srmil.features.backbones import load_backbone
    from srmil.features.extract import extract_features
    from srmil.settings import FeatureSettings, section_from_dict

    keys = ("batch_size", "num_workers", "device", "amp", "dtype", "read_block", "reader")
    settings = section_from_dict(
        FeatureSettings, {k: getattr(args, k) for k in keys}, "srmil features"
    )
    backbone = load_backbone(args.backbone, seed=args.seed)
    extract_features(
        args.slide,
        args.tiles,
        args.out,
        backbone,
        extractor=args.extractor,
        progress=not args.no_progress,
        **settings.model_dump(include=set(keys)),
    )


def cmd_graph(args: argparse.Namespace) -> None:
    from srmil.cohort.exclusion import check_upstream
    from srmil.graph import build_graph

    check_upstream(args.tiles)
    attrs = build_graph(args.tiles, args.out, window=args.window)
    logging.info(
        "graph: %d nodes, %d edges (window %d)", attrs["n_nodes"], attrs["n_edges"], attrs["window"]
    )


def cmd_import(args: argparse.Namespace) -> None:
    from srmil.errors import InputError
    from srmil.features.imported import import_features, import_tiles

    if not (args.out or args.tiles_out):
        raise InputError("srmil import: give --out (the feature store) or --tiles-out (the "
                         "tile set), or both")
    slide = args.slide or None
    if args.tiles_out:
        plan = import_tiles(args.features, args.tiles_out, slide_path=slide, mpp=args.mpp)
        logging.info("import: %d patches on a %.4g px grid from %s", plan.n_tiles,
                     plan.stride_level0, args.features)
    if args.out:
        if not args.extractor:
            raise InputError("srmil import: --out needs --extractor, the name the features go by")
        provenance = import_features(args.features, args.out, args.extractor, slide_path=slide,
                                     mpp=args.mpp)
        logging.info("import: %s x %s features (%s) from %s", provenance.n_patches,
                     provenance.feature_dim, provenance.extractor, args.features)


def cmd_export(args: argparse.Namespace) -> None:
    from srmil.errors import InputError
    from srmil.features.imported import export_store

    stores = sorted(Path(args.features_dir).glob("*.zarr"))
    if not stores:
        raise InputError(f"{args.features_dir}: no feature stores (*.zarr); point --features-dir "
                         "at results/features/{extractor}")
    for path in stores:
        tiles = Path(args.tiles_dir) / f"{path.name.removesuffix('.zarr')}.json" \
            if args.tiles_dir else None
        export_store(path, args.out_dir, args.layout,
                     tiles if tiles is not None and tiles.is_file() else None)
    logging.info("export: %d slides in %s's layout -> %s", len(stores), args.layout, args.out_dir)


def cmd_splits(args: argparse.Namespace) -> None:
    from srmil import store
    from srmil.cohort.samples import read_sample_sheet
    from srmil.cohort.splits import make_splits, read_split_file

    samples = read_sample_sheet(args.samples, check_files=False)
    if args.split_file:
        splits = read_split_file(
            args.split_file, samples, val_fraction=args.val_fraction, seed=args.seed
        )
    else:
        splits = make_splits(
            samples, n_folds=args.n_folds, val_fraction=args.val_fraction, seed=args.seed
        )
    store.write_json(args.out, splits)


def cmd_train(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    from srmil import store
    from srmil.cohort.samples import read_sample_sheet
    from srmil.mil.train import train_fold
    from srmil.settings import check_model_settings

    # Before the bags are loaded: a bad setting fails in seconds, naming its config key.
    check_model_settings(args.model, args.model_params, args.train_params)
    train_fold(
        args.model,
        store.read_json(args.splits),
        args.fold,
        read_sample_sheet(args.samples, check_files=False),
        args.features_dir,
        args.graphs_dir,
        args.out,
        model_hparams=args.model_params,
        train_hparams=args.train_params,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        exclude_failed=args.exclude_failed,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    from srmil import store
    from srmil.cohort.samples import read_sample_sheet
    from srmil.mil.evaluate import evaluate_model

    metrics = evaluate_model(
        args.model,
        args.models_dir,
        store.read_json(args.splits),
        read_sample_sheet(args.samples, check_files=False),
        args.features_dir,
        args.graphs_dir,
        args.out_dir,
        device=args.device,
        tiles_dir=args.tiles_dir or None,
        n_bootstrap=args.n_bootstrap,
        ci_level=args.ci_level,
        seed=args.seed,
        top_patches=args.top_patches,
        heatmap_px=args.heatmap_px,
        max_heatmaps=args.max_heatmaps,
        exclude_failed=args.exclude_failed,
    )
    logging.info("evaluate %s: %s", args.model, json.dumps(metrics.get("pooled", {})))


def cmd_compare(args: argparse.Namespace) -> None:
    from srmil.report.summaries import compare_models

    compare_models(
        args.metrics,
        args.out_csv,
        args.out_md,
        models_dirs=args.models_dirs,
        out_png=args.out_png,
        out_left_out=args.out_left_out,
    )


def cmd_ablation(args: argparse.Namespace) -> None:
    from srmil.report.summaries import summarise_ablation

    summarise_ablation(args.metrics, args.mask_ratios, args.out_csv, args.out_png)


def cmd_study(args: argparse.Namespace) -> None:
    from srmil.report.study import parse_run, summarise_study

    runs = [parse_run(*run) for run in args.run]
    summarise_study(runs, args.out_dir, main_ratio=args.main_ratio)
    print((args.out_dir / "summary.md").read_text(encoding="utf-8"), end="")


def cmd_predict(args: argparse.Namespace) -> None:
    if not args.features_dir:  # new slide files: the workflow's predict target runs them
        from srmil.workflow import run_predict

        table = run_predict(
            args.samples,
            args.models_dir,
            args.out_dir,
            config=_read_config(args.config),
            extractor=args.extractor,
            cores=args.cores,
            heatmaps=not args.no_heatmaps,
            device=None if args.device == "auto" else args.device,
            threads=args.threads,
        )
        logging.info("predict: %d slides", len(table))
        return
    _set_threads(args.threads)
    from srmil.cohort.samples import read_sample_sheet
    from srmil.mil.predict import predict_slides

    heatmap_dir = None if args.no_heatmaps else args.tiles_dir or None
    table = predict_slides(
        # the slide files are read only to draw heatmaps
        read_sample_sheet(args.samples, check_files=bool(heatmap_dir), require_labels=False),
        args.models_dir,
        args.features_dir,
        args.graphs_dir,
        args.out_dir,
        extractor=args.extractor,
        device=args.device,
        threads=args.threads,
        tiles_dir=heatmap_dir,
        exclude_failed=args.exclude_failed,
        top_patches=args.top_patches,
        heatmap_px=args.heatmap_px,
    )
    (Path(args.out_dir) / "heatmaps").mkdir(exist_ok=True)  # empty with --no-heatmaps
    logging.info("predict: %d slides -> %s", len(table), Path(args.out_dir) / "predictions.csv")


# The per-slide stages: under --exclude-failed, bad input becomes an exclusion record.
SLIDE_STAGES = ("segment", "tile", "features", "import", "graph")


def _write_exclusion_record(args: argparse.Namespace, reason: str) -> None:
    """What a per-slide stage writes in place of its outputs when it fails on bad input under
    --exclude-failed (srmil.cohort.exclusion)."""
    from srmil.cohort import exclusion

    if args.command == "segment":
        exclusion.write_segment_record(args.out, args.qc, reason)
    elif args.command == "tile":
        exclusion.write_tile_record(args.out, args.qc or None, reason)
    elif args.command == "features":
        exclusion.write_feature_record(args.out, reason, args.extractor)
    elif args.command == "import":  # the slide's tile set or features, as asked
        if args.tiles_out:
            exclusion.write_tile_record(args.tiles_out, None, reason)
        if args.out:
            exclusion.write_feature_record(args.out, reason, args.extractor)
    else:
        exclusion.write_graph_record(args.out, reason)


def _add_exclude_failed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exclude-failed",
        action="store_true",
        help="on bad input, write the outputs as a record that excludes the slide (with the "
        "reason) and exit 0, instead of failing (exclude_failed_slides in config.yaml)",
    )


def _add_leave_out(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exclude-failed",
        action="store_true",
        help="leave out slides excluded after a failure and list them (refused without it)",
    )


def _read_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    from srmil.errors import InputError

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{path}: cannot read the config ({err}); pass a readable YAML") from err


def _setting(
    p: argparse.ArgumentParser, flag: str, section: type, name: str, **kwargs: Any
) -> None:
    """An option for setting `name` of a settings section (srmil.settings): its default and
    description are the section's, so the command line and config.yaml cannot disagree."""
    field = section.model_fields[name]
    default = field.get_default(call_default_factory=True)
    p.add_argument(flag, default=default, help=f"{field.description or name} (default: {default})",
                   **kwargs)


def _parser_demo(sub: Any) -> None:
    from srmil.settings import DemoSettings as D

    p = sub.add_parser("demo", help="generate the synthetic demo cohort")
    _setting(p, "--out", D, "out_dir", type=Path)
    _setting(p, "--n-slides", D, "n_slides", type=int)
    p.add_argument("--seed", type=int, default=0)
    _setting(p, "--width", D, "width_px", type=int)
    _setting(p, "--height", D, "height_px", type=int)
    _setting(p, "--mpp", D, "mpp", type=float)
    _setting(p, "--prefix", D, "prefix")
    _setting(p, "--tumour-fraction", D, "tumour_fraction", type=float, nargs=2,
             metavar=("LOW", "HIGH"))
    _setting(p, "--tumour-contrast", D, "tumour_contrast", type=float)
    p.set_defaults(func=cmd_demo)


def _slide_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slide", required=True, help="slide file")
    p.add_argument("--mpp", type=_optional_float, default=None,
                   help="level-0 µm/px from the sample sheet (overrides the file)")
    p.add_argument("--mpp-fallback", type=_optional_float, default=None,
                   help="µm/px for slides whose file has none")
    p.add_argument("--params", type=_json_arg, default={},
                   help="the stage's settings as JSON (config.yaml's section; defaults for the "
                   "rest)")


def _parser_segment_tile(sub: Any) -> None:
    p = sub.add_parser("segment", help="tissue polygons (GeoJSON) and a QC overlay")
    _slide_args(p)
    p.add_argument("--out", required=True, help="GeoJSON output")
    p.add_argument("--qc", required=True, help="QC PNG output")
    p.add_argument("--annotation", default="", help="tumour GeoJSON to draw on the QC image")
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("tile", help="patch grid at a target µm/px inside the tissue")
    _slide_args(p)
    p.add_argument("--tissue", required=True, help="tissue GeoJSON from `srmil segment`")
    p.add_argument("--out", required=True, help="tiles JSON output")
    p.add_argument("--qc", default="", help="QC PNG output: the kept tile grid on the slide")
    p.add_argument("--seg-qc", default="",
                   help="QC PNG of `srmil segment` to draw the grid on (faster)")
    p.add_argument("--roi", default="",
                   help="GeoJSON of regions to keep (QuPath's export, level-0 px)")
    p.add_argument("--roi-exclude", default="", help="GeoJSON of regions to leave out")
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_tile)


def _parser_features_graph(sub: Any) -> None:
    from srmil.settings import FeatureSettings as F
    from srmil.settings import GraphSettings

    p = sub.add_parser("features", help="backbone features into a Zarr store")
    p.add_argument("--slide", required=True)
    p.add_argument("--tiles", required=True)
    p.add_argument("--out", required=True, help="Zarr store output")
    p.add_argument("--extractor", required=True, help="short extractor name (config key)")
    p.add_argument("--backbone", type=_json_arg, required=True,
                   help='backbone spec as JSON, e.g. {"model": "resnet18", "pretrained": false}')
    _setting(p, "--batch-size", F, "batch_size", type=int)
    _setting(p, "--num-workers", F, "num_workers")
    _setting(p, "--device", F, "device")
    _setting(p, "--amp", F, "amp")
    _setting(p, "--dtype", F, "dtype")
    _setting(p, "--read-block", F, "read_block", type=int)
    _setting(p, "--reader", F, "reader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("import", help="a CLAM, TRIDENT or STAMP HDF5 file, or an srmil store "
                       "from another run, as this slide's feature store and tile set")
    p.add_argument("--features", required=True,
                   help="the feature file (.h5) or store (.zarr); STAMP's coordinates (µm) are "
                   "converted to level-0 px with the slide's µm/px (--slide or --mpp)")
    p.add_argument("--out", default="", help="feature store output (Zarr); needs --extractor")
    p.add_argument("--tiles-out", default="", help="tile set output (JSON)")
    p.add_argument("--extractor", default="", help="the extractor name the features go by")
    p.add_argument("--slide", default="", help="the slide file, for its size and µm/px")
    p.add_argument("--mpp", type=_optional_float, default=None,
                   help="level-0 µm/px (the sheet's; empty: from the slide or the file)")
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="feature stores in CLAM's, TRIDENT's or STAMP's HDF5 "
                       "layout")
    p.add_argument("--features-dir", required=True, help="results/features/{extractor}")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--layout", required=True, choices=("clam", "trident", "stamp"),
                   help="clam: OUT/h5_files/{slide}.h5 and OUT/pt_files/{slide}.pt (level-0 px); "
                   "trident: OUT/{slide}.h5 (level-0 px, magnifications); stamp: OUT/{slide}.h5 "
                   "with feats and coords in µm, attributes extractor, unit, tile_size_um, "
                   "tile_size_px, feat_type (STAMP 2.1's); each carries srmil's provenance as "
                   "srmil_provenance")
    p.add_argument("--tiles-dir", default="", help="results/tiles (slide sizes for TRIDENT)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("graph", help="spatial graph over the patch grid")
    p.add_argument("--tiles", required=True)
    p.add_argument("--out", required=True, help="Zarr store output")
    _setting(p, "--window", GraphSettings, "window", type=int)
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_graph)


def _bag_args(p: argparse.ArgumentParser) -> None:
    from srmil.mil.catalog import MODEL_NAMES

    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument("--splits", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--features-dir", required=True)
    p.add_argument("--graphs-dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    _add_leave_out(p)


def _heatmap_args(p: argparse.ArgumentParser) -> None:
    from srmil.settings import EvaluateSettings as E

    _setting(p, "--top-patches", E, "top_patches", type=int)
    _setting(p, "--heatmap-px", E, "heatmap_px", type=int)


def _parser_training(sub: Any) -> None:
    from srmil.settings import CVSettings as C
    from srmil.settings import EvaluateSettings as E

    p = sub.add_parser(
        "splits", help="patient-level stratified cross-validation folds, or a fixed split file"
    )
    p.add_argument("--samples", required=True)
    p.add_argument("--out", required=True)
    _setting(p, "--n-folds", C, "n_folds", type=int)
    p.add_argument("--split-file", default="",
                   help="CSV (slide_id or patient_id, part, [fold]) or JSON of fixed folds; "
                   "replaces --n-folds")
    _setting(p, "--val-fraction", C, "val_fraction", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("train", help="train one fold of a MIL model")
    _bag_args(p)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--out", required=True, help="checkpoint (.pt); .json and .csv beside it")
    p.add_argument("--model-params", type=_json_arg, default={})
    p.add_argument("--train-params", type=_json_arg, default={})
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics, predictions and plots over all folds")
    _bag_args(p)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tiles-dir", default="", help="tile sets; given: attention heatmaps")
    _setting(p, "--n-bootstrap", E, "n_bootstrap", type=int)
    _setting(p, "--ci-level", E, "ci_level", type=float)
    p.add_argument("--seed", type=int, default=0)
    _setting(p, "--max-heatmaps", E, "max_heatmaps", type=int)
    _heatmap_args(p)
    p.set_defaults(func=cmd_evaluate)


def _parser_summaries(sub: Any) -> None:
    p = sub.add_parser("compare", help="side-by-side metrics and attention of several models")
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.json of each model")
    p.add_argument("--models-dirs", nargs="*", default=[], help="each model's fold folder")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-png", default=None, help="attention diagnostics of all models")
    p.add_argument("--out-left-out", default=None,
                   help="HTML table of the slides left out, and why")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("ablation", help="SRMIL metrics against the mask ratio")
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.json per mask ratio")
    p.add_argument("--mask-ratios", nargs="+", type=float, required=True)
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-png", required=True)
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("study", help="summarise the accuracy study: seeds, attention, mask ratio")
    p.add_argument("--run", nargs=4, action="append", required=True,
                   metavar=("MODEL", "MASK_RATIO", "SEED", "EVAL_DIR"),
                   help="one evaluated run (MASK_RATIO '-' for models without masking)")
    p.add_argument("--main-ratio", type=float, default=None,
                   help="SRMIL's configured mask ratio (its main model)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=cmd_study)


def _parser_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="fold-ensemble predictions and heatmaps for new slides: runs the workflow's "
        "predict target on the slide files, or predicts from existing stores (--features-dir)",
    )
    p.add_argument("--samples", required=True, help="sample sheet; labels optional")
    p.add_argument("--models-dir", required=True, help="folder of a model's fold_*.pt")
    p.add_argument("--out-dir", required=True, help="the workflow's working folder, or the "
                   "predictions' folder with --features-dir")
    p.add_argument("--extractor", default=None, help="default: the model's")
    p.add_argument("--config", default=None,
                   help="a config.yaml for the stages' settings (default: the model's tiling, "
                   "extractor and graph, the rest config.yaml's defaults)")
    p.add_argument("--features-dir", default="", help="existing feature stores: no stages run")
    p.add_argument("--graphs-dir", default="")
    p.add_argument("--tiles-dir", default="")
    _add_leave_out(p)
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cores", type=int, default=None, help="Snakemake's --cores (default: all)")
    _heatmap_args(p)
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srmil", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_parser_demo, _parser_segment_tile, _parser_features_graph, _parser_training,
                _parser_summaries, _parser_predict):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        from srmil import __version__

        print(__version__)
        return 0
    if not args.command:
        build_parser().print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from srmil.cohort.exclusion import OPTION, SlideExcluded
    from srmil.errors import InputError, one_line

    try:
        args.func(args)
    except InputError as err:
        if args.command in SLIDE_STAGES and args.exclude_failed:
            # The slide is left out: its outputs say why, and the job succeeds.
            reason = err.reason if isinstance(err, SlideExcluded) else (
                f"{args.command}: {one_line(err)}")
            _write_exclusion_record(args, reason)
            print(f"srmil {args.command}: excluded ({OPTION}): {reason}", file=sys.stderr)
            return 0
        # Known bad input: one line that names the file and the fix, no traceback.
        print(f"srmil {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
