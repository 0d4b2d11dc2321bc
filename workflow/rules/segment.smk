from srmil.samples import segment_overrides


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
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(15),
    params:
        # the sheet's paths, which the command checks (inputs leave out missing files)
        slide=lambda wc: SAMPLES.loc[wc.slide, "path"],
        annotation=lambda wc: SAMPLES.loc[wc.slide, "annotation"],
        mpp=slide_mpp,
        mpp_fallback=mpp_fallback(),
        # config.yaml's segment section with this slide's sample-sheet overrides
        params=lambda wc: as_json(
            {**config["segment"], **segment_overrides(SAMPLES.loc[wc.slide])}
        ),
    shell:
        "srmil segment --slide {params.slide:q} --annotation={params.annotation:q}"
        " --mpp '{params.mpp}' --mpp-fallback '{params.mpp_fallback}' --params {params.params}"
        " --out {output.geojson} --qc {output.qc} > {log} 2>&1"


rule segment:
    input:
        expand("results/segment/{slide}.geojson", slide=SLIDES),
