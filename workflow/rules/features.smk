rule extract_features:
    input:
        slide=slide_path,
        tiles="results/tiles/{slide}.json",
    output:
        directory("results/features/{extractor}/{slide}.zarr"),
    log:
        "logs/features/{extractor}/{slide}.log",
    benchmark:
        "results/benchmarks/features/{extractor}/{slide}.tsv"
    wildcard_constraints:
        slide=EXTRACTED_SLIDE,  # imported slides: import_features
    conda:
        "../../envs/srmil.yaml"
    threads: SETTINGS.features.threads
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(120),
    params:
        backbone=lambda wildcards: as_json(
            SETTINGS.backbones[wildcards.extractor].model_dump()
        ),
        batch_size=SETTINGS.features.batch_size,
        num_workers=SETTINGS.features.num_workers,
        device=SETTINGS.features.device,
        amp=SETTINGS.features.amp,
        dtype=SETTINGS.features.dtype,
        read_block=SETTINGS.features.read_block,
        reader=SETTINGS.features.reader,
        seed=SETTINGS.seed,
        on_bad_slide=on_bad_slide,
    shell:
        "srmil features --slide={input.slide:q} --tiles {input.tiles} --out {output}"
        " --extractor {wildcards.extractor} --backbone {params.backbone}"
        " --batch-size {params.batch_size} --num-workers {params.num_workers}"
        " --device {params.device} --amp {params.amp} --dtype {params.dtype}"
        " --read-block {params.read_block} --reader {params.reader}"
        " --seed {params.seed} --threads {threads} {params.on_bad_slide} > {log} 2>&1"


# Slides with a feature file (the sheet's features column): its coordinates become the tile set
# and its features the feature store, in place of segmentation, tiling and extraction.
rule import_tiles:
    input:
        features=slide_features,
        slide=slide_path,
    output:
        "results/tiles/{slide}.json",
    log:
        "logs/tile/{slide}.log",
    benchmark:
        "results/benchmarks/tile/{slide}.tsv"
    wildcard_constraints:
        slide=IMPORTED_SLIDE,
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(15),
    params:
        features=sheet_cell(SAMPLES, "features"),
        slide=sheet_cell(SAMPLES, "path"),
        mpp=slide_mpp,
        on_bad_slide=on_bad_slide,
    shell:
        "srmil import --features {params.features:q} --slide={params.slide:q}"
        " --mpp '{params.mpp}' --tiles-out {output} {params.on_bad_slide} > {log} 2>&1"


rule import_features:
    input:
        features=slide_features,
        slide=slide_path,
    output:
        directory("results/features/{extractor}/{slide}.zarr"),
    log:
        "logs/features/{extractor}/{slide}.log",
    benchmark:
        "results/benchmarks/features/{extractor}/{slide}.tsv"
    wildcard_constraints:
        slide=IMPORTED_SLIDE,
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(15),
    params:
        features=sheet_cell(SAMPLES, "features"),
        slide=sheet_cell(SAMPLES, "path"),
        mpp=slide_mpp,
        on_bad_slide=on_bad_slide,
    shell:
        "srmil import --features {params.features:q} --slide={params.slide:q}"
        " --mpp '{params.mpp}' --extractor {wildcards.extractor} --out {output}"
        " {params.on_bad_slide} > {log} 2>&1"


rule features:
    input:
        expand(
            "results/features/{extractor}/{slide}.zarr",
            extractor=EXTRACTORS,
            slide=SLIDES,
        ),
