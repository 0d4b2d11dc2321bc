import json
import os
import shlex
import sys
from pathlib import Path

import pandas as pd

from srmil.demo import planned_sheet
from srmil.errors import InputError
from srmil.samples import read_sample_sheet

DEMO_SHEET = Path(config["demo"]["out_dir"]) / "samples.csv"
IS_DEMO = Path(config["samples"]).resolve() == DEMO_SHEET.resolve()


def load_samples():
    """The sample sheet; for the demo before it exists, the sheet the demo rule will write."""
    if IS_DEMO and not DEMO_SHEET.exists():
        rows = planned_sheet(
            config["demo"]["out_dir"], config["demo"]["n_slides"], config["seed"]
        )
        sheet = pd.DataFrame(rows)
        sheet["path"] = [str(DEMO_SHEET.parent.resolve() / p) for p in sheet["path"]]
        sheet["annotation"] = [
            str(DEMO_SHEET.parent.resolve() / a) if a else ""
            for a in sheet["annotation"]
        ]
        sheet["mpp"] = float("nan")
        return sheet
    sheet = read_sample_sheet(config["samples"])
    validate(sheet, "../schemas/samples.schema.yaml")
    return sheet


try:
    SAMPLES = load_samples().set_index("slide_id", drop=False)
except InputError as err:
    # Bad input gets one line naming the file and the fix, not a traceback.
    sys.exit(f"srmil: error: {err}")
SLIDES = list(SAMPLES.index)
EXTRACTORS = config["features"]["extractors"]
MODELS = config["train"]["models"]
FOLDS = list(range(config["cv"]["n_folds"]))

for _name in EXTRACTORS:
    if _name not in config["backbones"]:
        raise ValueError(
            f"config.yaml: features.extractors names {_name!r}, which is not under 'backbones'; "
            "define it there or remove it"
        )


wildcard_constraints:
    slide="|".join(map(lambda s: s.replace(".", r"\."), SLIDES)),
    extractor="|".join(EXTRACTORS),
    model="|".join(MODELS),
    fold=r"\d+",


def as_json(value):
    """A config section as one shell-quoted JSON argument."""
    return shlex.quote(json.dumps(value, sort_keys=True))


def slide_path(wildcards):
    return SAMPLES.loc[wildcards.slide, "path"]


def slide_annotation(wildcards):
    annotation = SAMPLES.loc[wildcards.slide, "annotation"]
    return [annotation] if annotation else []


def slide_mpp(wildcards):
    mpp = SAMPLES.loc[wildcards.slide, "mpp"]
    return "" if pd.isna(mpp) else str(mpp)


def mpp_fallback():
    value = config.get("mpp_fallback")
    return "" if value is None else str(value)


def feature_stores(wildcards):
    return expand("results/features/{e}/{s}.zarr", e=wildcards.extractor, s=SLIDES)


def graph_stores(wildcards):
    return expand("results/graphs/{s}.zarr", s=SLIDES)


def stores_dir(stores):
    """The folder of a list of per-slide stores (features or graphs of one extractor)."""
    return os.path.dirname(stores[0])
