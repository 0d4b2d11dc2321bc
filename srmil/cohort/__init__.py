"""The cohort: the sample sheet, cross-validation splits, slides excluded after a failure. No
torch here: the workflow imports it while Snakemake parses."""
