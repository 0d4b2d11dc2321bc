"""Failed slides left out of the cohort, when `exclude_failed_slides: true` in config.yaml.

Without the option, a slide whose file turns out unusable fails its job and training waits for
it (`--keep-going` lets the other slides finish). With it, the per-slide stage that hits the
problem writes its usual outputs as an *exclusion record* instead: no tissue, no patches, and the
one-line reason with the stage's name. Every later stage passes the record on, and training,
evaluation and prediction leave the slide out and list it with its reason. Fixing the file
reruns the slide's jobs (Snakemake sees the file appear or change) and replaces the records.

A record read where the option is off is refused (`SlideExcluded`): a cohort never silently
shrinks.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from srmil import __version__, store
from srmil.errors import InputError

# The key of the reason in GeoJSON properties, tile plans and store attributes.
EXCLUDED = "excluded"
OPTION = "exclude_failed_slides"


class SlideExcluded(InputError):
    """An exclusion record met where the option is off (or passed on by a stage where it is on:
    `reason` is the record's)."""

    def __init__(self, where: str, reason: str):
        self.reason = reason
        super().__init__(f"{where}: the slide was excluded by a run with {OPTION}: true "
                         f"({reason}); fix the slide file and rerun (its jobs rerun), remove its "
                         f"row, or set {OPTION}: true")


def reason_of(path: str | os.PathLike) -> str | None:
    """The exclusion reason recorded in a tissue GeoJSON or a tiles JSON, or None for a normal
    output."""
    data = store.read_json(path)
    meta = data.get("plan") if "plan" in data else data.get("properties")
    return (meta or {}).get(EXCLUDED)


def check_upstream(path: str | os.PathLike) -> None:
    """Raise SlideExcluded when the stage output at `path` is an exclusion record."""
    reason = reason_of(path)
    if reason:
        raise SlideExcluded(str(path), reason)


# --- the records each stage writes -------------------------------------------------------------


def write_segment_record(geojson: str | os.PathLike, qc_png: str | os.PathLike,
                         reason: str) -> None:
    """An empty tissue GeoJSON (QuPath still opens it) carrying the reason, and a QC image of it."""
    collection = {"type": "FeatureCollection", "features": [],
                  "properties": {EXCLUDED: reason, "srmil_version": __version__}}
    store.write_text(geojson, json.dumps(collection, sort_keys=True) + "\n")
    write_reason_png(qc_png, reason)


def write_tile_record(tiles: str | os.PathLike, qc_png: str | os.PathLike | None,
                      reason: str) -> None:
    # Not a ReadPlan: there is nothing to read (later stages check for the record first).
    store.write_json(tiles, {"plan": {EXCLUDED: reason, "n_tiles": 0, "srmil_version": __version__},
                             "x": [], "y": [], "tissue_fraction": []})
    if qc_png:
        write_reason_png(qc_png, reason)


def write_feature_record(path: str | os.PathLike, reason: str, extractor: str) -> None:
    store.write_feature_store(path, np.zeros((0, 0)), np.zeros((0, 2)), {
        EXCLUDED: reason, "extractor": extractor, "n_patches": 0, "feature_dim": 0,
        "srmil_version": __version__})


def write_graph_record(path: str | os.PathLike, reason: str) -> None:
    store.write_graph_store(path, np.zeros((2, 0)), {
        EXCLUDED: reason, "n_nodes": 0, "n_edges": 0, "srmil_version": __version__})


def write_reason_png(path: str | os.PathLike, reason: str) -> None:
    """A QC image that says why the slide was excluded (it appears in the report in place of the
    overlay). matplotlib draws the text: paths may hold characters OpenCV's fonts lack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = textwrap.wrap(reason, 90)
    fig = plt.figure(figsize=(9, 0.6 + 0.22 * len(lines)), dpi=100)
    fig.text(0.02, 0.95, "Excluded from the cohort", color="#b00020", weight="bold", va="top")
    fig.text(0.02, 0.95 - 0.35 / fig.get_figheight(), "\n".join(lines), va="top", fontsize=9,
             family="monospace")
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --- what training, evaluation and the report read ---------------------------------------------


def excluded_slides(features_dir: str | os.PathLike, slide_ids: Iterable[str]) -> dict[str, str]:
    """Slide id -> reason for every slide among `slide_ids` whose feature store is a record (a
    failed slide's records reach the feature store whichever stage failed)."""
    reasons = {}
    for slide_id in sorted(set(slide_ids)):
        path = Path(features_dir) / f"{slide_id}.zarr"
        if path.is_dir():
            reason = store.read_store_attrs(path).get(EXCLUDED)
            if reason:
                reasons[slide_id] = reason
    return reasons


def write_left_out_html(metrics: Iterable[dict], out_html: str | os.PathLike) -> None:
    """One table of the slides a cohort's evaluation left out, with their reasons: excluded
    (failed, `exclude_failed_slides`) and skipped (no patches). It goes into the report."""
    import html

    rows: dict[str, tuple[str, str]] = {}
    for m in metrics:
        for slide_id, reason in (m.get("excluded_reasons") or {}).items():
            rows[slide_id] = ("excluded", reason)
        for slide_id, reason in (m.get("skipped_reasons") or {}).items():
            rows.setdefault(slide_id, ("skipped: no patches", reason))
    body = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{html.escape(k)}</td><td>{html.escape(r)}</td></tr>"
        for s, (k, r) in sorted(rows.items()))
    table = ("<table><tr><th>slide</th><th>left out</th><th>reason</th></tr>" + body + "</table>"
             if rows else "<p>Every slide of the cohort was used.</p>")
    style = ("body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}")
    store.write_text(out_html, f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{style}"
                     f"</style></head><body>{table}</body></html>\n")
