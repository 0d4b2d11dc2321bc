"""The `srmil` command: one sub-command per stage. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from srmil.mil.catalog import MODEL_NAMES


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

    sheet = write_demo(
        args.out,
        n_slides=args.n_slides,
        seed=args.seed,
        width_px=args.width,
        height_px=args.height,
        mpp=args.mpp,
        prefix=args.prefix,
        tumour_fraction=tuple(args.tumour_fraction),
        tumour_contrast=args.tumour_contrast,
    )
    print(sheet)


def cmd_segment(args: argparse.Namespace) -> None:
    from srmil.errors import InputError
    from srmil.wsi.segment import params_from_dict, segment_slide

    if args.annotation and not Path(args.annotation).is_file():
        raise InputError(
            f"{args.annotation}: annotation not found; fix its path in the sample sheet or "
            "leave it empty"
        )
    summary = segment_slide(
        args.slide,
        args.out,
        args.qc,
        params_from_dict(args.params, "--params of srmil segment"),
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
    from srmil.wsi.tiling import params_from_dict, tile_slide

    check_upstream(args.tissue)
    plan = tile_slide(
        args.slide,
        args.tissue,
        args.out,
        params_from_dict(args.params, "--params of srmil tile"),
        mpp_override=args.mpp,
        mpp_fallback=args.mpp_fallback,
        out_qc_png=args.qc or None,
        seg_qc_png=args.seg_qc or None,
    )
    logging.info(
        "tile: %d patches of %d px at %.3g µm/px (level %d)",
        plan["n_tiles"],
        plan["patch_px"],
        plan["target_mpp"],
        plan["level"],
    )


def cmd_features(args: argparse.Namespace) -> None:
    from srmil.cohort.exclusion import check_upstream

    check_upstream(args.tiles)  # before the backbone is loaded
    _set_threads(args.threads)
    from srmil.device import retain_freed_memory

    retain_freed_memory()  # this process extracts one slide, then exits
    from srmil.features.backbones import load_backbone
    from srmil.features.extract import extract_features

    backbone = load_backbone(args.backbone, seed=args.seed)
    extract_features(
        args.slide,
        args.tiles,
        args.out,
        backbone,
        extractor=args.extractor,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        amp=args.amp,
        dtype=args.dtype,
        read_block=args.read_block,
        progress=not args.no_progress,
        reader=args.reader,
    )


def cmd_graph(args: argparse.Namespace) -> None:
    from srmil.cohort.exclusion import check_upstream
    from srmil.graph import build_graph

    check_upstream(args.tiles)
    attrs = build_graph(args.tiles, args.out, window=args.window)
    logging.info(
        "graph: %d nodes, %d edges (window %d)", attrs["n_nodes"], attrs["n_edges"], attrs["window"]
    )


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
    _set_threads(args.threads)
    from srmil.mil import predict

    heatmaps = dict(top_patches=args.top_patches, heatmap_px=args.heatmap_px)
    if args.features_dir:  # stores made by the workflow's stages
        from srmil.cohort.samples import read_sample_sheet

        heatmap_dir = None if args.no_heatmaps else args.tiles_dir or None
        table = predict.predict_slides(
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
            **heatmaps,
        )
    else:
        table = predict.run_predict(
            args.samples,
            args.models_dir,
            args.out_dir,
            settings=_read_config(args.config),
            extractor=args.extractor,
            device=args.device,
            threads=args.threads,
            heatmaps=not args.no_heatmaps,
            seed=args.seed,
            **heatmaps,
        )
    logging.info("predict: %d slides -> %s", len(table), Path(args.out_dir) / "predictions.csv")


# The per-slide stages: under --exclude-failed, bad input becomes an exclusion record.
SLIDE_STAGES = ("segment", "tile", "features", "graph")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srmil", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="generate the synthetic demo cohort")
    p.add_argument("--out", type=Path, default=Path("resources/demo"))
    p.add_argument("--n-slides", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=4096, help="level-0 width in px")
    p.add_argument("--height", type=int, default=3072, help="level-0 height in px")
    p.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px")
    p.add_argument("--prefix", default="demo", help="slide ids are PREFIX_000, PREFIX_001, ...")
    p.add_argument("--tumour-fraction", type=float, nargs=2, default=[0.02, 0.05],
                   metavar=("LOW", "HIGH"),
                   help="range of each positive slide's tumour share of its tissue")
    p.add_argument("--tumour-contrast", type=float, default=1.0,
                   help="1 = conspicuous tumour (default), towards 0 = barely distinguishable")
    p.set_defaults(func=cmd_demo)

    def slide_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--slide", required=True, help="slide file")
        p.add_argument(
            "--mpp",
            type=_optional_float,
            default=None,
            help="level-0 µm/px from the sample sheet (overrides the file)",
        )
        p.add_argument(
            "--mpp-fallback",
            type=_optional_float,
            default=None,
            help="µm/px for slides whose file has none",
        )
        p.add_argument("--params", type=_json_arg, default={}, help="stage parameters as JSON")

    p = sub.add_parser("segment", help="tissue polygons (GeoJSON) and a QC overlay")
    slide_args(p)
    p.add_argument("--out", required=True, help="GeoJSON output")
    p.add_argument("--qc", required=True, help="QC PNG output")
    p.add_argument("--annotation", default="", help="tumour GeoJSON to draw on the QC image")
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("tile", help="patch grid at a target µm/px inside the tissue")
    slide_args(p)
    p.add_argument("--tissue", required=True, help="tissue GeoJSON from `srmil segment`")
    p.add_argument("--out", required=True, help="tiles JSON output")
    p.add_argument("--qc", default="", help="QC PNG output: the kept tile grid on the slide")
    p.add_argument(
        "--seg-qc", default="", help="QC PNG of `srmil segment` to draw the grid on (faster)"
    )
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("features", help="backbone features into a Zarr store")
    p.add_argument("--slide", required=True)
    p.add_argument("--tiles", required=True)
    p.add_argument("--out", required=True, help="Zarr store output")
    p.add_argument("--extractor", required=True, help="short extractor name (config key)")
    p.add_argument(
        "--backbone",
        type=_json_arg,
        required=True,
        help='backbone spec as JSON, e.g. {"model": "resnet18", "pretrained": false}',
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", default="auto", help="reader processes, or 'auto'")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument(
        "--read-block", type=int, default=1, help="read k x k neighbouring tiles per call (1: each)"
    )
    p.add_argument(
        "--reader",
        default="auto",
        choices=["auto", "openslide", "jpeg-tiles"],
        help="patch reader: auto = JPEG tiles where the slide allows, else OpenSlide",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("graph", help="spatial graph over the patch grid")
    p.add_argument("--tiles", required=True)
    p.add_argument("--out", required=True, help="Zarr store output")
    p.add_argument("--window", type=int, default=2)
    _add_exclude_failed(p)
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser(
        "splits", help="patient-level stratified cross-validation folds, or a fixed split file"
    )
    p.add_argument("--samples", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n-folds", type=int, default=3)
    p.add_argument(
        "--split-file",
        default="",
        help="CSV (slide_id or patient_id, part, [fold]) or JSON of fixed folds; "
        "replaces --n-folds",
    )
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_splits)

    def bag_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, choices=MODEL_NAMES)
        p.add_argument("--splits", required=True)
        p.add_argument("--samples", required=True)
        p.add_argument("--features-dir", required=True)
        p.add_argument("--graphs-dir", required=True)
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=None)
        _add_leave_out(p)

    p = sub.add_parser("train", help="train one fold of a MIL model")
    bag_args(p)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--out", required=True, help="checkpoint (.pt); .json and .csv beside it")
    p.add_argument("--model-params", type=_json_arg, default={})
    p.add_argument("--train-params", type=_json_arg, default={})
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    def heatmap_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--top-patches", type=int, default=8, help="patches in a heatmap montage")
        p.add_argument("--heatmap-px", type=int, default=1024, help="heatmap thumbnail side")

    p = sub.add_parser("evaluate", help="metrics, predictions and plots over all folds")
    bag_args(p)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tiles-dir", default="", help="tile sets; given: attention heatmaps")
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--ci-level", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-heatmaps", type=int, default=None, help="default: every test slide")
    heatmap_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="side-by-side metrics and attention of several models")
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.json of each model")
    p.add_argument("--models-dirs", nargs="*", default=[], help="each model's fold folder")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-png", default=None, help="attention diagnostics of all models")
    p.add_argument(
        "--out-left-out", default=None, help="HTML table of the slides left out, and why"
    )
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

    p = sub.add_parser("predict", help="fold-ensemble predictions and heatmaps for new slides")
    p.add_argument("--samples", required=True, help="sample sheet; labels optional")
    p.add_argument("--models-dir", required=True, help="folder of a model's fold_*.pt")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--extractor", default=None, help="default: the model's")
    p.add_argument(
        "--config", default=None, help="config.yaml for the stage settings (default: defaults)"
    )
    p.add_argument("--features-dir", default="", help="existing feature stores: skip the stages")
    p.add_argument("--graphs-dir", default="")
    p.add_argument("--tiles-dir", default="")
    _add_leave_out(p)
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    heatmap_args(p)
    p.set_defaults(func=cmd_predict)
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
