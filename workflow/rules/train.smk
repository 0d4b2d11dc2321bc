rule splits:
    input:
        config["samples"],
    output:
        "results/splits.json",
    log:
        "logs/splits.log",
    benchmark:
        "results/benchmarks/splits.tsv"
    conda:
        "../../envs/srmil.yaml"
    params:
        n_folds=config["cv"]["n_folds"],
        val_fraction=config["cv"]["val_fraction"],
        seed=config["seed"],
    shell:
        "srmil splits --samples {input:q} --out {output} --n-folds {params.n_folds}"
        " --val-fraction {params.val_fraction} --seed {params.seed} > {log} 2>&1"


rule train_fold:
    input:
        samples=config["samples"],
        splits="results/splits.json",
        features=feature_stores,
        graphs=graph_stores,
    output:
        model="results/models/{model}/{extractor}/fold_{fold}.pt",
        meta="results/models/{model}/{extractor}/fold_{fold}.json",
        epochs="results/models/{model}/{extractor}/fold_{fold}.csv",
    log:
        "logs/train/{model}/{extractor}/fold_{fold}.log",
    benchmark:
        "results/benchmarks/train/{model}/{extractor}/fold_{fold}.tsv"
    conda:
        "../../envs/srmil.yaml"
    threads: config["train"]["threads"]
    params:
        features_dir=lambda wildcards, input: stores_dir(input.features),
        graphs_dir=lambda wildcards, input: stores_dir(input.graphs),
        model_params=lambda wildcards: as_json(
            config["train"][wildcards.model]["model"]
        ),
        train_params=lambda wildcards: as_json(
            config["train"][wildcards.model]["train"]
        ),
        device=config["train"]["device"],
        seed=config["seed"],
    shell:
        "srmil train --model {wildcards.model} --fold {wildcards.fold}"
        " --samples {input.samples:q} --splits {input.splits}"
        " --features-dir {params.features_dir} --graphs-dir {params.graphs_dir}"
        " --model-params {params.model_params} --train-params {params.train_params}"
        " --seed {params.seed} --device {params.device} --threads {threads}"
        " --out {output.model} > {log} 2>&1"


rule train:
    input:
        expand(
            "results/models/{model}/{extractor}/fold_{fold}.pt",
            model=MODELS,
            extractor=EXTRACTORS,
            fold=FOLDS,
        ),
