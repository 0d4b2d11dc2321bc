# SRMIL trained once per mask ratio on the cohort's folds, with train.srmil's other settings
# (the ratio of train.srmil itself is the main SRMIL model: see ablation_metrics).
use rule train_fold as ablation_train_fold with:
    output:
        model="results/ablation/{model}/{extractor}/mask_{ratio}/fold_{fold}.pt",
        meta="results/ablation/{model}/{extractor}/mask_{ratio}/fold_{fold}.json",
        epochs="results/ablation/{model}/{extractor}/mask_{ratio}/fold_{fold}.csv",
        attention="results/ablation/{model}/{extractor}/mask_{ratio}/fold_{fold}.attention.json",
    log:
        "logs/ablation/{model}/{extractor}/mask_{ratio}/fold_{fold}.log",
    benchmark:
        "results/benchmarks/ablation/{model}/{extractor}/mask_{ratio}/fold_{fold}.tsv"
    wildcard_constraints:
        model="srmil",
        ratio=r"\d+(\.\d+)?(e-?\d+)?",
    params:
        model_params=ablation_model_params,


rule ablation_evaluate:
    input:
        samples=SETTINGS.samples,
        splits="results/splits.json",
        models=expand(
            "results/ablation/{{model}}/{{extractor}}/mask_{{ratio}}/fold_{fold}.pt",
            fold=FOLDS,
        ),
        attention=expand(
            "results/ablation/{{model}}/{{extractor}}/mask_{{ratio}}/fold_{fold}.attention.json",
            fold=FOLDS,
        ),
        features=feature_stores,
        graphs=graph_stores,
    output:
        # What evaluate_model writes, less the heatmaps (no --tiles-dir here); only the
        # summary's mask_ratio.png goes into the report.
        metrics="results/ablation/{model}/{extractor}/mask_{ratio}/eval/metrics.json",
        predictions="results/ablation/{model}/{extractor}/mask_{ratio}/eval/predictions.csv",
        roc="results/ablation/{model}/{extractor}/mask_{ratio}/eval/roc.png",
        confusion="results/ablation/{model}/{extractor}/mask_{ratio}/eval/confusion.png",
        curves="results/ablation/{model}/{extractor}/mask_{ratio}/eval/training_curves.png",
        diagnostics=(
            "results/ablation/{model}/{extractor}/mask_{ratio}/eval/attention_diagnostics.png"
        ),
    log:
        "logs/ablation/{model}/{extractor}/mask_{ratio}/evaluate.log",
    benchmark:
        "results/benchmarks/ablation/{model}/{extractor}/mask_{ratio}/evaluate.tsv"
    wildcard_constraints:
        model="srmil",
        ratio=r"\d+(\.\d+)?(e-?\d+)?",
    conda:
        "../../envs/srmil.yaml"
    threads: SETTINGS.train.threads
    resources:
        mem_mb=scaled(4000, per_slide=25),
        runtime=scaled(30, per_slide=0.1),
    params:
        features_dir=lambda wildcards, input: stores_dir(input.features),
        graphs_dir=lambda wildcards, input: stores_dir(input.graphs),
        models_dir=lambda wildcards, input: os.path.dirname(input.models[0]),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        device=SETTINGS.train.device,
        options=evaluate_options(),
        exclude_failed=EXCLUDE_OPTION,
    shell:
        "srmil evaluate --model {wildcards.model} --samples {input.samples:q}"
        " --splits {input.splits} --models-dir {params.models_dir}"
        " --features-dir {params.features_dir} --graphs-dir {params.graphs_dir}"
        " {params.options} {params.exclude_failed} --device {params.device} --threads {threads}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule ablation_summary:
    input:
        ablation_metrics,
    output:
        csv="results/ablation/{model}/{extractor}/mask_ratio.csv",
        png=report(
            "results/ablation/{model}/{extractor}/mask_ratio.png",
            caption="../report/ablation.rst",
            category="Mask-ratio ablation",
            subcategory="{model} / {extractor}",
        ),
    log:
        "logs/ablation/{model}/{extractor}/summary.log",
    benchmark:
        "results/benchmarks/ablation/{model}/{extractor}/summary.tsv"
    wildcard_constraints:
        model="srmil",
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(10),
    params:
        ratios=" ".join(MASK_RATIOS),
    shell:
        "srmil ablation --metrics {input} --mask-ratios {params.ratios}"
        " --out-csv {output.csv} --out-png {output.png} > {log} 2>&1"


rule ablation:
    input:
        expand(
            "results/ablation/srmil/{extractor}/mask_ratio.csv", extractor=EXTRACTORS
        ),


localrules:
    ablation,
    ablation_summary,
