rule build_graph:
    input:
        "results/tiles/{slide}.json",
    output:
        directory("results/graphs/{slide}.zarr"),
    log:
        "logs/graph/{slide}.log",
    benchmark:
        "results/benchmarks/graph/{slide}.tsv"
    conda:
        "../../envs/srmil.yaml"
    resources:
        mem_mb=scaled(2000),
        runtime=scaled(15),
    params:
        window=SETTINGS.graph.window,
        on_bad_slide=on_bad_slide,
    shell:
        "srmil graph --tiles {input} --out {output} --window {params.window}"
        " {params.on_bad_slide} > {log} 2>&1"


rule graphs:
    input:
        expand("results/graphs/{slide}.zarr", slide=SLIDES),
