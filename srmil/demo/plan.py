"""The cohort plan: slide ids, labels, patients and paths, without any pixels.

Cheap and free of image libraries: the Snakefile calls `planned_sheet` at every parse, so that
`snakemake -n` on a fresh clone shows every job before the demo slides exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHEET_COLUMNS = ("slide_id", "path", "patient_id", "label", "annotation")
POSITIVE, NEGATIVE = "tumour", "normal"


def planned_sheet(out_dir: str | Path, n_slides: int = 24, seed: int = 0,
                  prefix: str = "demo") -> list[dict[str, str]]:
    """Rows of samples.csv (slide_id, path, patient_id, label, annotation) without writing anything;
    cheap (no image generation), used by the Snakefile at parse time. Slide ids are
    `{prefix}_000`, ...: two cohorts with different prefixes share one results folder."""
    del out_dir  # paths are relative to the sheet's folder; kept for the callers' symmetry
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    rng = np.random.default_rng([seed, n_slides, 0x5EED])  # separate stream from the slides'
    labels = _balanced_labels(rng, n_slides)
    patient_of = _patients(rng, labels)
    rows = []
    for i in range(n_slides):
        slide_id = f"{prefix}_{i:03d}"
        suffix = ".svs" if i % 2 == 0 else ".tif"
        rows.append({
            "slide_id": slide_id,
            "path": f"slides/{slide_id}{suffix}",
            "patient_id": patient_of[i],
            "label": labels[i],
            "annotation": f"annotations/{slide_id}.geojson" if labels[i] == POSITIVE else "",
        })
    return rows


def _balanced_labels(rng: np.random.Generator, n_slides: int) -> list[str]:
    """Half positive overall and within each file format (even = .svs, odd = .tif), so the
    format never predicts the label."""
    labels = [NEGATIVE] * n_slides
    n_positive = (n_slides + 1) // 2
    formats = [list(range(0, n_slides, 2)), list(range(1, n_slides, 2))]
    k_even = (len(formats[0]) + 1) // 2
    for indices, k in zip(formats, (k_even, n_positive - k_even), strict=True):
        for i in rng.permutation(indices)[:k]:
            labels[int(i)] = POSITIVE
    return labels


def _patients(rng: np.random.Generator, labels: list[str]) -> list[str]:
    """About a third of each label's slides come in same-label pairs from one patient."""
    group_of = list(range(len(labels)))
    for label in (POSITIVE, NEGATIVE):
        members = [i for i, lab in enumerate(labels) if lab == label]
        order = rng.permutation(members)
        for p in range(len(members) // 3):
            a, b = sorted((int(order[2 * p]), int(order[2 * p + 1])))
            group_of[b] = a
    names: dict[int, str] = {}
    for group in group_of:
        names.setdefault(group, f"P{len(names):03d}")
    return [names[g] for g in group_of]
