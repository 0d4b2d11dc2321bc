from srmil.workflow import train_memory_mb


rule splits:
    input:
        samples=SETTINGS.samples,
        split_file=[SPLIT_FILE] if SPLIT_FILE else [],
    output:
        "results/splits.json",
    log:
        "logs/splits.log",
    benchmark:
        "results/benchmarks/splits.tsv"
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(10),
    params:
        n_folds=SETTINGS.cv.n_folds,
        val_fraction=SETTINGS.cv.val_fraction,
        seed=SETTINGS.seed,
        split_file=shlex.quote(SPLIT_FILE or ""),
    shell:
        "srmil splits --samples {input.samples:q} --out {output} --n-folds {params.n_folds}"
        " --split-file {params.split_file}"
        " --val-fraction {params.val_fraction} --seed {params.seed} > {log} 2>&1"


rule train_fold:
    input:
        samples=SETTINGS.samples,
        splits="results/splits.json",
        features=feature_stores,
        graphs=graph_stores,
    output:
        model="results/models/{model}/{extractor}/fold_{fold}.pt",
        meta="results/models/{model}/{extractor}/fold_{fold}.json",
        epochs="results/models/{model}/{extractor}/fold_{fold}.csv",
        attention="results/models/{model}/{extractor}/fold_{fold}.attention.json",
    log:
        "logs/train/{model}/{extractor}/fold_{fold}.log",
    benchmark:
        "results/benchmarks/train/{model}/{extractor}/fold_{fold}.tsv"
    conda:
        "../../envs/srmil.yaml"
    threads: SETTINGS.train.threads
    resources:
        # train.mem_mb, or auto: from the shapes of the cohort's stores (the largest bag's step,
        # all bags held; ~9500 MB for a 100k-patch SRMIL bag at D = 512), read when the job is
        # ready (before the features exist: the minimum); doubled on each retry
        mem_mb=lambda wildcards, input, attempt: attempt
        * train_memory_mb(
            wildcards.model,
            input.features,
            input.graphs,
            SETTINGS.train.mem_mb,
        ),
        runtime=scaled(60, per_slide=0.5),
    params:
        features_dir=lambda wildcards, input: stores_dir(input.features),
        graphs_dir=lambda wildcards, input: stores_dir(input.graphs),
        model_params=lambda wildcards: model_settings(wildcards.model, "model"),
        train_params=lambda wildcards: model_settings(wildcards.model, "train"),
        device=SETTINGS.train.device,
        seed=SETTINGS.seed,
        exclude_failed=EXCLUDE_OPTION,
    shell:
        "srmil train --model {wildcards.model} --fold {wildcards.fold}"
        " --samples {input.samples:q} --splits {input.splits}"
        " --features-dir {params.features_dir} --graphs-dir {params.graphs_dir}"
        " --model-params {params.model_params} --train-params {params.train_params}"
        " --seed {params.seed} --device {params.device} --threads {threads}"
        " {params.exclude_failed} --out {output.model} > {log} 2>&1"


rule train:
    input:
        expand(
            "results/models/{model}/{extractor}/fold_{fold}.pt",
            model=MODELS,
            extractor=EXTRACTORS,
            fold=FOLDS,
        ),
