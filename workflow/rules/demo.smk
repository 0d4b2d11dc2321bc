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
            n_slides=config["demo"]["n_slides"],
            width=config["demo"]["width_px"],
            height=config["demo"]["height_px"],
            mpp=config["demo"]["mpp"],
            seed=config["seed"],
            prefix=config["demo"].get("prefix", "demo"),
            tumour=" ".join(
                str(f) for f in config["demo"].get("tumour_fraction", [0.02, 0.05])
            ),
            contrast=config["demo"].get("tumour_contrast", 1.0),
        shell:
            "srmil demo --out {params.out_dir:q} --n-slides {params.n_slides} --seed {params.seed}"
            " --width {params.width} --height {params.height} --mpp {params.mpp}"
            " --prefix {params.prefix} --tumour-fraction {params.tumour}"
            " --tumour-contrast {params.contrast} > {log} 2>&1"
