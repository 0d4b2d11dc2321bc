# srmil: whole slide images -> tissue -> patches -> features -> graphs -> SRMIL and ABMIL models.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/graph.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        rules.evaluate.input,
