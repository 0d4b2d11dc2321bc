rule segment_slide:
    input:
        slide=slide_path,
        annotation=slide_annotation,
    output:
        geojson="results/segment/{slide}.geojson",
        qc=report(
            "results/segment/{slide}.qc.png",
            caption="../report/segment.rst",
            category="Tissue segmentation",
        ),
    log:
        "logs/segment/{slide}.log",
    benchmark:
        "results/benchmarks/segment/{slide}.tsv"
    conda:
        "../../envs/srmil.yaml"
    params:
        mpp=slide_mpp,
        mpp_fallback=mpp_fallback(),
        params=as_json(config["segment"]),
    shell:
        "srmil segment --slide {input.slide:q} --annotation '{input.annotation}'"
        " --mpp '{params.mpp}' --mpp-fallback '{params.mpp_fallback}' --params {params.params}"
        " --out {output.geojson} --qc {output.qc} > {log} 2>&1"


rule segment:
    input:
        expand("results/segment/{slide}.geojson", slide=SLIDES),
