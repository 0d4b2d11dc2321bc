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
    conda:
        "../../envs/srmil.yaml"
    threads: config["features"]["threads"]
    resources:
        mem_mb=scaled(8000),
        runtime=scaled(120),
    params:
        backbone=lambda wildcards: as_json(config["backbones"][wildcards.extractor]),
        batch_size=config["features"]["batch_size"],
        num_workers=config["features"]["num_workers"],
        device=config["features"]["device"],
        amp=config["features"]["amp"],
        dtype=config["features"]["dtype"],
        read_block=config["features"]["read_block"],
        reader=config["features"].get("reader", "auto"),
        seed=config["seed"],
        on_bad_slide=on_bad_slide,
    shell:
        "srmil features --slide={input.slide:q} --tiles {input.tiles} --out {output}"
        " --extractor {wildcards.extractor} --backbone {params.backbone}"
        " --batch-size {params.batch_size} --num-workers {params.num_workers}"
        " --device {params.device} --amp {params.amp} --dtype {params.dtype}"
        " --read-block {params.read_block} --reader {params.reader}"
        " --seed {params.seed} --threads {threads} {params.on_bad_slide} > {log} 2>&1"


rule features:
    input:
        expand(
            "results/features/{extractor}/{slide}.zarr",
            extractor=EXTRACTORS,
            slide=SLIDES,
        ),
