import json
import os
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

from srmil.cohort.samples import (
    OPTIONAL,
    REQUIRED,
    check_row_files,
    read_sample_sheet,
    segment_overrides,
)
from srmil.cohort.splits import check_cohort, fold_count, read_split_file
from srmil.demo.plan import planned_sheet
from srmil.errors import InputError
from srmil.mil.catalog import inherited_settings
from srmil.store import fold_checkpoints
from srmil.workflow import check_predict_settings, keep_going_requested

DEMO_SHEET = Path(SETTINGS.demo.out_dir) / "samples.csv"
IS_DEMO = Path(SETTINGS.samples).resolve() == DEMO_SHEET.resolve()


# exclude_failed_slides: a slide whose file is missing or unreadable is excluded (its outputs
# record why) instead of failing its jobs; training and evaluation leave it out (srmil.cohort.exclusion).
EXCLUDE_FAILED = SETTINGS.exclude_failed_slides
# With --keep-going (or keep-going: true in a profile) a bad slide file fails only its own
# jobs, not the whole run (below).
# Job processes (a cluster job parses the workflow again) leave the files to the main one.
KEEP_GOING = workflow.is_main_process and keep_going_requested()
# Either way a missing file is left out of the jobs' inputs, so that the job runs and reports
# it, rather than the DAG failing as a whole.
TOLERATE_BAD_FILES = KEEP_GOING or EXCLUDE_FAILED
CHECK_FILES = workflow.is_main_process and not TOLERATE_BAD_FILES


def read_sheet(path, **kwargs):
    """A sample sheet, with its files checked when the workflow is parsed, unless bad files are
    tolerated: then each is a warning, and its slide's first job fails or excludes it.
    """
    sheet = read_sample_sheet(path, check_files=CHECK_FILES, **kwargs)
    if TOLERATE_BAD_FILES and workflow.is_main_process:
        then = (
            "exclude_failed_slides: it will be excluded"
            if EXCLUDE_FAILED
            else "--keep-going: its jobs will fail"
        )
        for row in sheet.itertuples():
            try:
                check_row_files(row, path)
            except InputError as err:
                print(f"srmil: warning: {err} ({then})", file=sys.stderr)
    return sheet


def load_samples():
    """The sample sheet; for the demo before it exists, the sheet the demo rule will write."""
    if IS_DEMO and not DEMO_SHEET.exists():
        demo = SETTINGS.demo
        rows = planned_sheet(demo.out_dir, demo.n_slides, SETTINGS.seed, demo.prefix)
        sheet = pd.DataFrame(rows)
        sheet["path"] = [str(DEMO_SHEET.parent.resolve() / p) for p in sheet["path"]]
        sheet["annotation"] = [
            str(DEMO_SHEET.parent.resolve() / a) if a else ""
            for a in sheet["annotation"]
        ]
        sheet["mpp"] = float("nan")
        for column in OPTIONAL:  # the sheet's optional columns, as reading it adds them
            if column not in sheet:
                sheet[column] = ""
        return sheet
    sheet = read_sheet(SETTINGS.samples, classes=SETTINGS.classes)
    validate(sheet, "../schemas/samples.schema.yaml")
    return sheet


try:
    SAMPLES = load_samples().set_index("slide_id", drop=False)
except InputError as err:
    # Bad input gets one line naming the file and the fix, not a traceback.
    sys.exit(f"srmil: error: {err}")
SLIDES = list(SAMPLES.index)
EXTRACTORS = SETTINGS.features.extractors


def slide_pattern(slide_ids):
    """A wildcard constraint matching exactly these slide ids (none: matches nothing)."""
    return "|".join(s.replace(".", r"\.") for s in slide_ids) or "(?!)"


# Slides whose sheet row gives a feature file (features column) are imported, not segmented,
# tiled or extracted (srmil.features.imported): their tile set and features come from the file.
IMPORTED = [s for s in SLIDES if SAMPLES.loc[s, "features"]]
EXTRACTED = [s for s in SLIDES if s not in IMPORTED]
IMPORTED_SLIDE, EXTRACTED_SLIDE = slide_pattern(IMPORTED), slide_pattern(EXTRACTED)
if IMPORTED and len(EXTRACTORS) != 1:
    sys.exit(
        f"srmil: error: {SETTINGS.samples}: {len(IMPORTED)} slides have a feature file, which "
        f"stands for one extractor, but features.extractors lists {len(EXTRACTORS)}; list one"
    )
MODELS = SETTINGS.train.models
SPLIT_FILE = SETTINGS.cv.split_file
try:
    # A fixed split file sets the number of folds; else k-fold with cv.n_folds.
    FOLDS = list(range(fold_count(SPLIT_FILE) if SPLIT_FILE else SETTINGS.cv.n_folds))
except InputError as err:
    sys.exit(f"srmil: error: {err}")

# The cohort as a whole (one class only, a class with fewer patients than folds, split-file
# ids not in the sheet) is checked here, so it stops the run before any job.
try:
    if SPLIT_FILE:
        read_split_file(SPLIT_FILE, SAMPLES, SETTINGS.cv.val_fraction)
    else:
        check_cohort(SAMPLES, len(FOLDS), SETTINGS.cv.val_fraction)
except InputError as err:
    sys.exit(f"srmil: error: {SETTINGS.samples}: {err}")


wildcard_constraints:
    slide=slide_pattern(SLIDES),
    extractor="|".join(EXTRACTORS),
    model="|".join(MODELS),
    fold=r"\d+",


def as_json(value):
    """A config section as one shell-quoted JSON argument."""
    return shlex.quote(json.dumps(value, sort_keys=True))


def model_settings(model, part):
    """train.<model>.<part> ("model" or "train") as one JSON argument. A variant of SRMIL
    (srmil_norec, ...) inherits train.srmil's settings except those the variant fixes
    (srmil.mil.catalog), then applies its own section."""
    return as_json(inherited_settings(model, part, SETTINGS.train.model_dump()))


# Lookups in a sheet (the cohort's, or predict's new slides) for the per-slide rules.
def sheet_file(sheet, column):
    """Input function: the job's slide's file in `column` ([] for an empty cell). A missing file
    is left out where bad files are tolerated: the job then fails or excludes the slide.
    """

    def lookup(wildcards):
        path = sheet.loc[wildcards.slide, column]
        if not path or (TOLERATE_BAD_FILES and not Path(path).exists()):
            return []
        return path

    return lookup


def sheet_cell(sheet, column):
    """Params function: the cell as written (the command checks the file and names it)."""
    return lambda wildcards: sheet.loc[wildcards.slide, column]


def sheet_mpp(sheet):
    def mpp(wildcards):
        value = sheet.loc[wildcards.slide, "mpp"]
        return "" if pd.isna(value) else str(value)

    return mpp


def sheet_segment_params(sheet):
    """config.yaml's segment section with the slide's `segment_<setting>` overrides."""
    return lambda wildcards: as_json(
        {
            **SETTINGS.segment.model_dump(),
            **segment_overrides(sheet.loc[wildcards.slide]),
        }
    )


def slide_files(sheet):
    """The slide files of a sheet that a job reading them all needs (heatmaps); a slide known
    by its feature file alone has none."""
    return [
        p for p in sheet["path"] if p and (not TOLERATE_BAD_FILES or Path(p).is_file())
    ]


slide_path = sheet_file(SAMPLES, "path")
slide_features = sheet_file(SAMPLES, "features")
slide_annotation = sheet_file(SAMPLES, "annotation")
slide_mpp = sheet_mpp(SAMPLES)


def on_bad_slide(wildcards, input):
    """`--exclude-failed` for the per-slide stages under exclude_failed_slides. Taking `input`
    makes this a param derived from the input, which Snakemake leaves out of its rerun check:
    the option decides only what a failing job leaves behind, never a good slide's outputs, so
    switching it must not redo the cohort's features. Training, evaluation and prediction take
    it as a plain param (EXCLUDE_OPTION): switching it changes their cohort."""
    return EXCLUDE_OPTION


EXCLUDE_OPTION = "--exclude-failed" if EXCLUDE_FAILED else ""


def mpp_fallback():
    value = SETTINGS.mpp_fallback
    return "" if value is None else str(value)


def feature_stores(wildcards):
    return expand("results/features/{e}/{s}.zarr", e=wildcards.extractor, s=SLIDES)


def graph_stores(wildcards):
    return expand("results/graphs/{s}.zarr", s=SLIDES)


def stores_dir(stores):
    """The folder of a list of per-slide stores (features or graphs of one extractor)."""
    return os.path.dirname(stores[0])


def scaled(base, per_slide=0.0):
    """A job's mem_mb or runtime (minutes): base plus per_slide for each slide of the cohort,
    doubled on each retry (the SLURM profile sets `retries`)."""
    return lambda wildcards, attempt: int((base + per_slide * len(SLIDES)) * attempt)


def slide_report(path, image, category="Slides", **kwargs):
    """report() for a per-slide image (QC, heatmap), filed by slide: under `category`, one
    subcategory per slide holding a row per `image` (a label; the rows sort by it), so that a
    cohort's hundreds of images are browsable slide by slide. The plain output when
    report.slide_images is false: a large cohort's report then stays small."""
    if not SETTINGS.report.slide_images:
        return path
    return report(
        path,
        category=category,
        subcategory="{slide}",
        labels={"image": image},
        **kwargs,
    )


# envs/srmil.yaml installs this checkout with `pip install -e ${SRMIL_ROOT}` (`--sdm conda`).
os.environ.update(SRMIL_ROOT=workflow.basedir)


# --- evaluation, ablation, prediction (evaluate.smk, ablation.smk, predict.smk) ----------------


def evaluate_options():
    """The `evaluate:` section as command-line options (changing one reruns evaluation)."""
    section = SETTINGS.evaluate
    options = {
        "--n-bootstrap": section.n_bootstrap,
        "--ci-level": section.ci_level,
        "--top-patches": section.top_patches,
        "--heatmap-px": section.heatmap_px,
        "--seed": SETTINGS.seed,
    }
    if section.max_heatmaps is not None:
        options["--max-heatmaps"] = section.max_heatmaps
    return " ".join(f"{k} {v}" for k, v in options.items())


MASK_RATIOS = [f"{r:g}" for r in SETTINGS.ablation.mask_ratios]


def ablation_model_params(wildcards):
    """SRMIL's model settings from train.srmil with this job's mask ratio."""
    return as_json({**SETTINGS.train.srmil.model, "mask_ratio": float(wildcards.ratio)})


def srmil_mask_ratio():
    """The mask ratio of the main SRMIL model (train.srmil, else the model's default)."""
    # Imported here: torch is loaded only when the ablation or the study is requested.
    from srmil.mil.models import default_hparams

    model = SETTINGS.train.srmil.model
    return float(model.get("mask_ratio", default_hparams("srmil")["mask_ratio"]))


def ablation_metrics(wildcards):
    """Metrics of SRMIL at each mask ratio; the ratio of train.srmil is the main SRMIL model's
    (same folds, seed and settings), so it is evaluated once, not trained twice."""
    main_ratio = srmil_mask_ratio()
    return [
        (
            f"results/eval/srmil/{wildcards.extractor}/metrics.json"
            if "srmil" in MODELS and float(r) == main_ratio
            else f"results/ablation/srmil/{wildcards.extractor}/mask_{r}/eval/metrics.json"
        )
        for r in MASK_RATIOS
    ]


# The accuracy study (study.smk): seeds, and the runs its summary reads.
STUDY_SEEDS = SETTINGS.study.seeds
# The mask-ratio curve costs a model per ratio and seed: it may use fewer seeds.
CURVE_SEEDS = SETTINGS.study.mask_ratio_seeds or STUDY_SEEDS
STUDY_RUN = "results/study/{extractor}/seed_{seed}/{model}"


def study_runs(wildcards):
    """(model, mask ratio or "-", seed, eval folder) of every run the summary reads; SRMIL at
    its configured ratio is the main SRMIL model of that seed, trained once."""
    main_ratio = srmil_mask_ratio()
    runs = []
    for seed in STUDY_SEEDS:
        run = f"results/study/{wildcards.extractor}/seed_{seed}"
        for model in MODELS:
            ratio = f"{main_ratio:g}" if model == "srmil" else "-"
            runs.append((model, ratio, seed, f"{run}/{model}/eval"))
        for ratio in MASK_RATIOS if seed in CURVE_SEEDS else []:
            if not ("srmil" in MODELS and float(ratio) == main_ratio):
                runs.append(("srmil", ratio, seed, f"{run}/srmil/mask_{ratio}/eval"))
    return runs


PREDICT = SETTINGS.predict


def load_predict_samples():
    """The sheet of new slides (labels optional), or an empty table when none is set."""
    if not PREDICT.samples:
        return pd.DataFrame(columns=["slide_id", *REQUIRED[1:], *OPTIONAL])
    if not PREDICT.models_dir and (
        PREDICT.model not in MODELS or PREDICT.extractor not in EXTRACTORS
    ):
        raise InputError(
            f"config.yaml: predict.model {PREDICT.model!r} / predict.extractor "
            f"{PREDICT.extractor!r} must be among train.models ({', '.join(MODELS)}) "
            f"and features.extractors ({', '.join(EXTRACTORS)})"
        )
    return read_sheet(PREDICT.samples, require_labels=False)


try:
    PREDICT_SAMPLES = load_predict_samples().set_index("slide_id", drop=False)
    # The model's extractor, tiling and graph, before any slide is read.
    if PREDICT.samples:
        check_predict_settings(SETTINGS)
except InputError as err:
    sys.exit(f"srmil: error: {err}")
PREDICT_SLIDES = list(PREDICT_SAMPLES.index)
# New slides may share ids with the cohort: their files live under results/predict/.
PREDICT_SLIDE = slide_pattern(PREDICT_SLIDES)
PREDICT_IMPORTED = [s for s in PREDICT_SLIDES if PREDICT_SAMPLES.loc[s, "features"]]
PREDICT_IMPORTED_SLIDE = slide_pattern(PREDICT_IMPORTED)
PREDICT_EXTRACTED_SLIDE = slide_pattern(
    [s for s in PREDICT_SLIDES if s not in PREDICT_IMPORTED]
)
predict_slide_path = sheet_file(PREDICT_SAMPLES, "path")


def predict_stores(pattern):
    return lambda wildcards: expand(
        pattern, slide=PREDICT_SLIDES, extractor=wildcards.extractor
    )


def predict_models(wildcards):
    """The fold models to predict with: predict.models_dir's, or this workflow's."""
    if PREDICT.models_dir:
        return [str(p) for p in fold_checkpoints(PREDICT.models_dir)]
    return expand(
        "results/models/{model}/{extractor}/fold_{fold}.pt",
        model=wildcards.model,
        extractor=wildcards.extractor,
        fold=FOLDS,
    )


def predict_target(wildcards):
    if not PREDICT_SLIDES:
        raise InputError(
            "config.yaml: predict.samples is not set; point it to a sample sheet of the new "
            "slides, e.g. --config predict='{samples: new_slides.csv}'"
        )
    return expand(
        "results/predict/{model}/{extractor}/predictions.csv",
        model=PREDICT.model,
        extractor=PREDICT.extractor,
    )
