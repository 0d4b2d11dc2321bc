rule evaluate_model:
    input:
        samples=config["samples"],
        splits="results/splits.json",
        models=expand(
            "results/models/{{model}}/{{extractor}}/fold_{fold}.pt", fold=FOLDS
        ),
        features=feature_stores,
        graphs=graph_stores,
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
    log:
        "logs/evaluate/{model}/{extractor}.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/{extractor}.tsv"
    conda:
        "../../envs/srmil.yaml"
    threads: config["train"]["threads"]
    params:
        features_dir=lambda wildcards, input: stores_dir(input.features),
        graphs_dir=lambda wildcards, input: stores_dir(input.graphs),
        models_dir=lambda wildcards, input: os.path.dirname(input.models[0]),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        device=config["train"]["device"],
    shell:
        "srmil evaluate --model {wildcards.model} --samples {input.samples:q}"
        " --splits {input.splits} --models-dir {params.models_dir}"
        " --features-dir {params.features_dir} --graphs-dir {params.graphs_dir}"
        " --device {params.device} --threads {threads} --out-dir {params.out_dir}"
        " > {log} 2>&1"


rule evaluate:
    input:
        expand(
            "results/eval/{model}/{extractor}/metrics.json",
            model=MODELS,
            extractor=EXTRACTORS,
        ),


localrules:
    segment,
    tile,
    features,
    graphs,
    train,
    evaluate,
