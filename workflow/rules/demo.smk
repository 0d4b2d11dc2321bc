if IS_DEMO:

    rule demo:
        output:
            sheet=str(DEMO_SHEET),
            slides=[SAMPLES.loc[s, "path"] for s in SLIDES],
            annotations=[a for a in SAMPLES["annotation"] if a],
        log:
            "logs/demo.log",
        benchmark:
            "results/benchmarks/demo.tsv"
        conda:
            "../../envs/srmil.yaml"
        resources:
            mem_mb=scaled(2000),
            runtime=scaled(30),
        params:
            out_dir=lambda wildcards, output: os.path.dirname(output.sheet),
            n_slides=SETTINGS.demo.n_slides,
            width=SETTINGS.demo.width_px,
            height=SETTINGS.demo.height_px,
            mpp=SETTINGS.demo.mpp,
            seed=SETTINGS.seed,
            prefix=SETTINGS.demo.prefix,
            tumour=" ".join(str(f) for f in SETTINGS.demo.tumour_fraction),
            contrast=SETTINGS.demo.tumour_contrast,
        shell:
            "srmil demo --out {params.out_dir:q} --n-slides {params.n_slides} --seed {params.seed}"
            " --width {params.width} --height {params.height} --mpp {params.mpp}"
            " --prefix {params.prefix} --tumour-fraction {params.tumour}"
            " --tumour-contrast {params.contrast} > {log} 2>&1"
