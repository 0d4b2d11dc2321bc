rule tile_slide:
    input:
        slide=slide_path,
        tissue="results/segment/{slide}.geojson",
        seg_qc="results/segment/{slide}.qc.png",
        roi=sheet_file(SAMPLES, "roi"),
        roi_exclude=sheet_file(SAMPLES, "roi_exclude"),
    output:
        tiles="results/tiles/{slide}.json",
        qc=slide_report(
            "results/tiles/{slide}.qc.png",
            image="2 tiling",
            caption="../report/tile.rst",
        ),
    log:
        "logs/tile/{slide}.log",
    benchmark:
        "results/benchmarks/tile/{slide}.tsv"
    wildcard_constraints:
        slide=EXTRACTED_SLIDE,  # imported slides: import_tiles
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(15),
    params:
        mpp=slide_mpp,
        mpp_fallback=mpp_fallback(),
        params=as_json(SETTINGS.tile.model_dump()),
        # the sheet's paths, which the command checks (inputs leave out missing files)
        roi=sheet_cell(SAMPLES, "roi"),
        roi_exclude=sheet_cell(SAMPLES, "roi_exclude"),
        on_bad_slide=on_bad_slide,
    shell:
        "srmil tile --slide={input.slide:q} --tissue {input.tissue}"
        " --mpp '{params.mpp}' --mpp-fallback '{params.mpp_fallback}' --params {params.params}"
        " --roi={params.roi:q} --roi-exclude={params.roi_exclude:q}"
        " --seg-qc {input.seg_qc} --qc {output.qc} --out {output.tiles}"
        " {params.on_bad_slide} > {log} 2>&1"


rule tile:
    input:
        expand("results/tiles/{slide}.json", slide=SLIDES),
