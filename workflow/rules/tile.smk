rule tile_slide:
    input:
        slide=slide_path,
        tissue="results/segment/{slide}.geojson",
    output:
        "results/tiles/{slide}.json",
    log:
        "logs/tile/{slide}.log",
    benchmark:
        "results/benchmarks/tile/{slide}.tsv"
    conda:
        "../../envs/srmil.yaml"
    params:
        mpp=slide_mpp,
        mpp_fallback=mpp_fallback(),
        params=as_json(config["tile"]),
    shell:
        "srmil tile --slide {input.slide:q} --tissue {input.tissue}"
        " --mpp '{params.mpp}' --mpp-fallback '{params.mpp_fallback}' --params {params.params}"
        " --out {output} > {log} 2>&1"


rule tile:
    input:
        expand("results/tiles/{slide}.json", slide=SLIDES),
