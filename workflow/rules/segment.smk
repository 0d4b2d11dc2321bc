rule segment_slide:
    input:
        slide=slide_path,
        annotation=slide_annotation,
    output:
        geojson="results/segment/{slide}.geojson",
        qc=slide_report(
            "results/segment/{slide}.qc.png",
            image="1 tissue segmentation",
            caption="../report/segment.rst",
        ),
    log:
        "logs/segment/{slide}.log",
    benchmark:
        "results/benchmarks/segment/{slide}.tsv"
    wildcard_constraints:
        slide=EXTRACTED_SLIDE,  # imported slides are not segmented
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(15),
    params:
        # the sheet's paths, which the command checks (inputs leave out missing files)
        slide=sheet_cell(SAMPLES, "path"),
        annotation=sheet_cell(SAMPLES, "annotation"),
        mpp=slide_mpp,
        mpp_fallback=mpp_fallback(),
        params=sheet_segment_params(SAMPLES),
        on_bad_slide=on_bad_slide,
    shell:
        "srmil segment --slide {params.slide:q} --annotation={params.annotation:q}"
        " --mpp '{params.mpp}' --mpp-fallback '{params.mpp_fallback}' --params {params.params}"
        " --out {output.geojson} --qc {output.qc} {params.on_bad_slide} > {log} 2>&1"


rule segment:
    input:
        expand("results/segment/{slide}.geojson", slide=EXTRACTED),
