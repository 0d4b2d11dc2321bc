# The cohort's stage rules, applied to the new slides under results/predict/.
use rule segment_slide as predict_segment_slide with:
    input:
        slide=predict_slide_path,
        annotation=sheet_file(PREDICT_SAMPLES, "annotation"),
    output:
        geojson="results/predict/segment/{slide}.geojson",
        qc="results/predict/segment/{slide}.qc.png",
    log:
        "logs/predict/segment/{slide}.log",
    benchmark:
        "results/benchmarks/predict/segment/{slide}.tsv"
    wildcard_constraints:
        slide=PREDICT_EXTRACTED_SLIDE,
    params:
        # every sheet lookup of the cohort's rule, in the new slides' sheet
        slide=sheet_cell(PREDICT_SAMPLES, "path"),
        annotation=sheet_cell(PREDICT_SAMPLES, "annotation"),
        mpp=sheet_mpp(PREDICT_SAMPLES),
        params=sheet_segment_params(PREDICT_SAMPLES),


use rule tile_slide as predict_tile_slide with:
    input:
        slide=predict_slide_path,
        tissue="results/predict/segment/{slide}.geojson",
        seg_qc="results/predict/segment/{slide}.qc.png",
        roi=sheet_file(PREDICT_SAMPLES, "roi"),
        roi_exclude=sheet_file(PREDICT_SAMPLES, "roi_exclude"),
    output:
        tiles="results/predict/tiles/{slide}.json",
        qc="results/predict/tiles/{slide}.qc.png",
    log:
        "logs/predict/tile/{slide}.log",
    benchmark:
        "results/benchmarks/predict/tile/{slide}.tsv"
    wildcard_constraints:
        slide=PREDICT_EXTRACTED_SLIDE,
    params:
        mpp=sheet_mpp(PREDICT_SAMPLES),
        roi=sheet_cell(PREDICT_SAMPLES, "roi"),
        roi_exclude=sheet_cell(PREDICT_SAMPLES, "roi_exclude"),


use rule extract_features as predict_extract_features with:
    input:
        slide=predict_slide_path,
        tiles="results/predict/tiles/{slide}.json",
    output:
        directory("results/predict/features/{extractor}/{slide}.zarr"),
    log:
        "logs/predict/features/{extractor}/{slide}.log",
    benchmark:
        "results/benchmarks/predict/features/{extractor}/{slide}.tsv"
    wildcard_constraints:
        slide=PREDICT_EXTRACTED_SLIDE,


use rule import_tiles as predict_import_tiles with:
    input:
        features=sheet_file(PREDICT_SAMPLES, "features"),
        slide=predict_slide_path,
    output:
        "results/predict/tiles/{slide}.json",
    log:
        "logs/predict/tile/{slide}.log",
    benchmark:
        "results/benchmarks/predict/tile/{slide}.tsv"
    wildcard_constraints:
        slide=PREDICT_IMPORTED_SLIDE,
    params:
        features=sheet_cell(PREDICT_SAMPLES, "features"),
        slide=sheet_cell(PREDICT_SAMPLES, "path"),
        mpp=sheet_mpp(PREDICT_SAMPLES),


use rule import_features as predict_import_features with:
    input:
        features=sheet_file(PREDICT_SAMPLES, "features"),
        slide=predict_slide_path,
    output:
        directory("results/predict/features/{extractor}/{slide}.zarr"),
    log:
        "logs/predict/features/{extractor}/{slide}.log",
    benchmark:
        "results/benchmarks/predict/features/{extractor}/{slide}.tsv"
    wildcard_constraints:
        slide=PREDICT_IMPORTED_SLIDE,
    params:
        features=sheet_cell(PREDICT_SAMPLES, "features"),
        slide=sheet_cell(PREDICT_SAMPLES, "path"),
        mpp=sheet_mpp(PREDICT_SAMPLES),


# graph.window as for the cohort's graphs, which the models were trained on; `srmil predict`
# refuses graph stores whose parameters differ from the model's provenance.
use rule build_graph as predict_build_graph with:
    input:
        "results/predict/tiles/{slide}.json",
    output:
        directory("results/predict/graphs/{slide}.zarr"),
    log:
        "logs/predict/graph/{slide}.log",
    benchmark:
        "results/benchmarks/predict/graph/{slide}.tsv"
    wildcard_constraints:
        slide=PREDICT_SLIDE,


rule predict_model:
    input:
        samples=PREDICT.samples or [],
        models=predict_models,
        features=predict_stores("results/predict/features/{extractor}/{slide}.zarr"),
        graphs=predict_stores("results/predict/graphs/{slide}.zarr"),
        tiles=predict_stores("results/predict/tiles/{slide}.json"),
        slides=slide_files(PREDICT_SAMPLES),
    output:
        predictions="results/predict/{model}/{extractor}/predictions.csv",
        heatmaps=slide_report(
            directory("results/predict/{model}/{extractor}/heatmaps"),
            patterns=["{slide}.png"],
            image="attention, {model} / {extractor}",
            category="New slides (predict)",
            caption="../report/predict_heatmap.rst",
        ),
    log:
        "logs/predict/{model}/{extractor}.log",
    benchmark:
        "results/benchmarks/predict/{model}/{extractor}.tsv"
    wildcard_constraints:
        model=PREDICT.model,
        extractor=PREDICT.extractor,
    conda:
        "../../envs/srmil.yaml"
    threads: SETTINGS.train.threads
    resources:
        mem_mb=scaled(4000),
        runtime=scaled(30),
    params:
        models_dir=lambda wildcards, input: os.path.dirname(input.models[0]),
        features_dir=lambda wildcards, input: stores_dir(input.features),
        graphs_dir=lambda wildcards, input: stores_dir(input.graphs),
        tiles_dir=lambda wildcards, input: stores_dir(input.tiles),
        out_dir=lambda wildcards, output: os.path.dirname(output.predictions),
        top_patches=SETTINGS.evaluate.top_patches,
        heatmap_px=SETTINGS.evaluate.heatmap_px,
        device=SETTINGS.train.device,
        exclude_failed=EXCLUDE_OPTION,
        heatmaps="" if PREDICT.heatmaps else "--no-heatmaps",
    shell:
        "srmil predict --samples {input.samples:q} --models-dir {params.models_dir}"
        " --extractor {wildcards.extractor} --features-dir {params.features_dir}"
        " --graphs-dir {params.graphs_dir} --tiles-dir {params.tiles_dir}"
        " --top-patches {params.top_patches} --heatmap-px {params.heatmap_px}"
        " --device {params.device} --threads {threads} --out-dir {params.out_dir}"
        " {params.exclude_failed} {params.heatmaps} > {log} 2>&1"


rule predict:
    input:
        predict_target,


localrules:
    predict,
