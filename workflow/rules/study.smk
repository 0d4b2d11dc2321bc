# Accuracy study (`snakemake study`): every model of train.models trained with each seed of
# study.seeds on that seed's patient-level folds, and SRMIL also at each ratio of
# ablation.mask_ratios; the summary gives mean and spread over seeds, the attention diagnostics of
# each model and the mask-ratio curve -> results/study/{extractor}/. Outputs of one seed:
# results/study/{extractor}/seed_{seed}/{model}[/mask_{ratio}]/.
use rule splits as study_splits with:
    output:
        "results/study/seed_{seed}/splits.json",
    log:
        "logs/study/seed_{seed}/splits.log",
    benchmark:
        "results/benchmarks/study/seed_{seed}/splits.tsv"
    wildcard_constraints:
        seed=r"\d+",
    params:
        seed=lambda wildcards: wildcards.seed,


use rule train_fold as study_train_fold with:
    input:
        samples=SETTINGS.samples,
        splits="results/study/seed_{seed}/splits.json",
        features=feature_stores,
        graphs=graph_stores,
    output:
        model=f"{STUDY_RUN}/fold_{{fold}}.pt",
        meta=f"{STUDY_RUN}/fold_{{fold}}.json",
        epochs=f"{STUDY_RUN}/fold_{{fold}}.csv",
        attention=f"{STUDY_RUN}/fold_{{fold}}.attention.json",
    log:
        "logs/study/{extractor}/seed_{seed}/{model}/fold_{fold}.log",
    benchmark:
        "results/benchmarks/study/{extractor}/seed_{seed}/{model}/fold_{fold}.tsv"
    wildcard_constraints:
        seed=r"\d+",
    priority: 1  # the models' comparison before the mask-ratio curve
    params:
        seed=lambda wildcards: wildcards.seed,


use rule study_train_fold as study_ablation_train_fold with:
    output:
        model=f"{STUDY_RUN}/mask_{{ratio}}/fold_{{fold}}.pt",
        meta=f"{STUDY_RUN}/mask_{{ratio}}/fold_{{fold}}.json",
        epochs=f"{STUDY_RUN}/mask_{{ratio}}/fold_{{fold}}.csv",
        attention=f"{STUDY_RUN}/mask_{{ratio}}/fold_{{fold}}.attention.json",
    log:
        "logs/study/{extractor}/seed_{seed}/{model}/mask_{ratio}/fold_{fold}.log",
    benchmark:
        "results/benchmarks/study/{extractor}/seed_{seed}/{model}/mask_{ratio}/fold_{fold}.tsv"
    wildcard_constraints:
        seed=r"\d+",
        model="srmil",
        ratio=r"\d+(\.\d+)?(e-?\d+)?",
    priority: 0
    params:
        model_params=ablation_model_params,


use rule ablation_evaluate as study_evaluate with:
    input:
        samples=SETTINGS.samples,
        splits="results/study/seed_{seed}/splits.json",
        models=expand(f"{STUDY_RUN}/fold_{{fold}}.pt", fold=FOLDS, allow_missing=True),
        attention=expand(
            f"{STUDY_RUN}/fold_{{fold}}.attention.json", fold=FOLDS, allow_missing=True
        ),
        features=feature_stores,
        graphs=graph_stores,
    output:
        metrics=f"{STUDY_RUN}/eval/metrics.json",
        predictions=f"{STUDY_RUN}/eval/predictions.csv",
    log:
        "logs/study/{extractor}/seed_{seed}/{model}/evaluate.log",
    benchmark:
        "results/benchmarks/study/{extractor}/seed_{seed}/{model}/evaluate.tsv"
    wildcard_constraints:
        seed=r"\d+",
    priority: 1


use rule study_evaluate as study_ablation_evaluate with:
    input:
        samples=SETTINGS.samples,
        splits="results/study/seed_{seed}/splits.json",
        models=expand(
            f"{STUDY_RUN}/mask_{{ratio}}/fold_{{fold}}.pt",
            fold=FOLDS,
            allow_missing=True,
        ),
        attention=expand(
            f"{STUDY_RUN}/mask_{{ratio}}/fold_{{fold}}.attention.json",
            fold=FOLDS,
            allow_missing=True,
        ),
        features=feature_stores,
        graphs=graph_stores,
    output:
        metrics=f"{STUDY_RUN}/mask_{{ratio}}/eval/metrics.json",
        predictions=f"{STUDY_RUN}/mask_{{ratio}}/eval/predictions.csv",
    log:
        "logs/study/{extractor}/seed_{seed}/{model}/mask_{ratio}/evaluate.log",
    benchmark:
        "results/benchmarks/study/{extractor}/seed_{seed}/{model}/mask_{ratio}/evaluate.tsv"
    wildcard_constraints:
        seed=r"\d+",
        model="srmil",
        ratio=r"\d+(\.\d+)?(e-?\d+)?",
    priority: 0


rule study_summary:
    input:
        lambda wildcards: [f"{d}/metrics.json" for *_, d in study_runs(wildcards)],
    output:
        runs="results/study/{extractor}/runs.csv",
        summary="results/study/{extractor}/summary.md",
        png=report(
            "results/study/{extractor}/study.png",
            caption="../report/study.rst",
            category="Accuracy study",
            subcategory="{extractor}",
        ),
    log:
        "logs/study/{extractor}/summary.log",
    benchmark:
        "results/benchmarks/study/{extractor}/summary.tsv"
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(10),
    params:
        runs=lambda wildcards: " ".join(
            f"--run {m} {r} {s} {d}" for m, r, s, d in study_runs(wildcards)
        ),
        main_ratio=lambda wildcards: f"{srmil_mask_ratio():g}",
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    shell:
        "srmil study {params.runs} --main-ratio {params.main_ratio}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule study:
    input:
        expand("results/study/{extractor}/summary.md", extractor=EXTRACTORS),


localrules:
    study,
    study_summary,
