# srmil: whole slide images -> tissue -> patches -> features -> graphs -> SRMIL and ABMIL models.
import sys

from snakemake.utils import min_version

from srmil.settings import ConfigError, load_settings

min_version("9.0")


configfile: "config.yaml"


# Typed settings with their defaults (srmil/settings.py, which also generates the JSON schema
# workflow/schemas/config.schema.yaml); rules read SETTINGS, never `config` directly.
try:
    SETTINGS = load_settings(config)
except ConfigError as err:
    sys.exit(f"srmil: error: {err}")  # one line naming the key, not a traceback


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/graph.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/ablation.smk"
include: "workflow/rules/study.smk"
include: "workflow/rules/predict.smk"


rule all:
    default_target: True
    input:
        rules.evaluate.input,
