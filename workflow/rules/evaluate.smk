rule evaluate_model:
    input:
        samples=SETTINGS.samples,
        splits="results/splits.json",
        models=expand(
            "results/models/{{model}}/{{extractor}}/fold_{fold}.pt", fold=FOLDS
        ),
        attention=expand(
            "results/models/{{model}}/{{extractor}}/fold_{fold}.attention.json",
            fold=FOLDS,
        ),
        features=feature_stores,
        graphs=graph_stores,
        tiles=expand("results/tiles/{slide}.json", slide=SLIDES),
        slides=slide_files(SAMPLES),
    output:
        metrics="results/eval/{model}/{extractor}/metrics.json",
        predictions="results/eval/{model}/{extractor}/predictions.csv",
        roc=report(
            "results/eval/{model}/{extractor}/roc.png",
            caption="../report/roc.rst",
            category="Evaluation",
            subcategory="{model} / {extractor}",
        ),
        confusion=report(
            "results/eval/{model}/{extractor}/confusion.png",
            caption="../report/confusion.rst",
            category="Evaluation",
            subcategory="{model} / {extractor}",
        ),
        curves=report(
            "results/eval/{model}/{extractor}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Evaluation",
            subcategory="{model} / {extractor}",
        ),
        diagnostics=report(
            "results/eval/{model}/{extractor}/attention_diagnostics.png",
            caption="../report/attention_diagnostics.rst",
            category="Attention diagnostics",
            subcategory="{model} / {extractor}",
        ),
        heatmaps=slide_report(
            directory("results/eval/{model}/{extractor}/heatmaps"),
            patterns=["{slide}.png"],
            image="3 attention, {model} / {extractor}",
            caption="../report/heatmap.rst",
        ),
    log:
        "logs/evaluate/{model}/{extractor}.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/{extractor}.tsv"
    conda:
        "../../envs/srmil.yaml"
    threads: SETTINGS.train.threads
    resources:
        mem_mb=scaled(4000, per_slide=25),
        runtime=scaled(30, per_slide=0.1),
    params:
        features_dir=lambda wildcards, input: stores_dir(input.features),
        graphs_dir=lambda wildcards, input: stores_dir(input.graphs),
        tiles_dir=lambda wildcards, input: stores_dir(input.tiles),
        models_dir=lambda wildcards, input: os.path.dirname(input.models[0]),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        device=SETTINGS.train.device,
        options=evaluate_options(),
        exclude_failed=EXCLUDE_OPTION,
    shell:
        "srmil evaluate --model {wildcards.model} --samples {input.samples:q}"
        " --splits {input.splits} --models-dir {params.models_dir}"
        " --features-dir {params.features_dir} --graphs-dir {params.graphs_dir}"
        " --tiles-dir {params.tiles_dir} {params.options} {params.exclude_failed}"
        " --device {params.device} --threads {threads} --out-dir {params.out_dir}"
        " > {log} 2>&1"


rule compare_models:
    input:
        metrics=expand("results/eval/{model}/{{extractor}}/metrics.json", model=MODELS),
        attention=expand(
            "results/models/{model}/{{extractor}}/fold_{fold}.attention.json",
            model=MODELS,
            fold=FOLDS,
        ),
    output:
        csv="results/eval/{extractor}/comparison.csv",
        md="results/eval/{extractor}/comparison.md",
        diagnostics=report(
            "results/eval/{extractor}/attention_diagnostics.png",
            caption="../report/comparison_diagnostics.rst",
            category="Attention diagnostics",
            subcategory="all models / {extractor}",
        ),
        left_out=report(
            "results/eval/{extractor}/left_out.html",
            caption="../report/left_out.rst",
            category="Cohort",
            subcategory="{extractor}",
        ),
    log:
        "logs/evaluate/compare_{extractor}.log",
    benchmark:
        "results/benchmarks/evaluate/compare_{extractor}.tsv"
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(10),
    params:
        models_dirs=lambda wildcards: expand(
            "results/models/{model}/{extractor}",
            model=MODELS,
            extractor=wildcards.extractor,
        ),
    shell:
        "srmil compare --metrics {input.metrics} --models-dirs {params.models_dirs}"
        " --out-csv {output.csv} --out-md {output.md} --out-png {output.diagnostics}"
        " --out-left-out {output.left_out}"
        " > {log} 2>&1"


rule evaluate:
    input:
        expand(
            "results/eval/{model}/{extractor}/metrics.json",
            model=MODELS,
            extractor=EXTRACTORS,
        ),
        expand("results/eval/{extractor}/comparison.csv", extractor=EXTRACTORS),


localrules:
    segment,
    tile,
    features,
    graphs,
    train,
    evaluate,
    compare_models,
