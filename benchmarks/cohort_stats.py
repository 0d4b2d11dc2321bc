"""How hard is a cohort for MIL? The figures of the accuracy study's cohort table.

Reads a finished run's sample sheet (with its `annotation` column) and feature stores and prints:
- patches per slide (median and range);
- tumour patches per positive slide: patches more than 20% inside the annotation, the rule of the
  attention diagnostics (srmil.mil.attention.POSITIVE_AREA);
- a linear probe with patch labels, which no MIL model gets: logistic regression on the
  standardised patch features, fitted on the tumour patches against the patches of normal slides,
  cross-validated by patient (5 folds, a patient's slides never in both). Its patch AUC (tumour
  patches against normal slides' patches of held-out patients) says how separable one tumour
  patch is; its slide AUC (each held-out slide scored by its highest patch) is what detecting
  the tumour patch by patch gives at slide level: the ceiling a MIL model that finds the tumour
  patches would approach. A patch AUC short of 1 leaves a bag of N normal patches about
  N x (1 - AUC) patches scored above a typical tumour patch.

    python benchmarks/cohort_stats.py RUN_FOLDER --samples resources/demo-subtle/samples.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srmil.cohort.samples import read_sample_sheet  # noqa: E402
from srmil.mil.attention import positive_patches  # noqa: E402
from srmil.store import read_feature_store  # noqa: E402


def read_cohort(run: Path, samples_csv: Path, extractor: str) -> pd.DataFrame:
    """One row per slide: label, patient, annotation flag, features (N, D), tumour flags (N,)."""
    samples = read_sample_sheet(samples_csv)  # annotation paths resolved against the sheet
    rows = []
    for s in samples.itertuples():
        features, coords, attrs = read_feature_store(
            run / "results" / "features" / extractor / f"{s.slide_id}.zarr")
        annotation = getattr(s, "annotation", "")
        tumour = (positive_patches(coords, float(attrs["patch_level0"]), annotation)
                  if annotation else np.zeros(len(coords), dtype=bool))
        rows.append({"slide_id": s.slide_id, "patient": s.patient_id, "annotated": bool(annotation),
                     "features": features, "tumour": tumour})
    return pd.DataFrame(rows)


def labelled_patches(slide: pd.Series) -> np.ndarray:
    """The patches the probe is fitted and scored on: the tumour patches of an annotated slide,
    every patch of a normal one. Patches of positive slides outside the tumour are normal tissue,
    but MIL never labels them so."""
    return slide.tumour if slide.annotated else np.ones(len(slide.tumour), dtype=bool)


def probe(slides: pd.DataFrame, folds: int = 5) -> tuple[float, float]:
    """Patch AUC and max-patch slide AUC of the patch-label probe, out of fold by patient."""
    patch_scores, patch_labels, slide_scores = [], [], np.empty(len(slides))
    for train, test in GroupKFold(n_splits=folds).split(slides, groups=slides.patient):
        fit = [slides.iloc[i] for i in train]
        x = np.concatenate([s.features[labelled_patches(s)] for s in fit])
        y = np.concatenate([s.tumour[labelled_patches(s)] for s in fit])
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
        for i in test:
            row = slides.iloc[i]
            score = model.predict_proba(row.features)[:, 1]
            slide_scores[i] = score.max()
            keep = labelled_patches(row)
            patch_scores.append(score[keep])
            patch_labels.append(row.tumour[keep])
    patch_auc = roc_auc_score(np.concatenate(patch_labels), np.concatenate(patch_scores))
    return float(patch_auc), float(roc_auc_score(slides.annotated, slide_scores))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (holds results/features/)")
    parser.add_argument("--samples", type=Path, required=True,
                        help="its sample sheet, relative to the run folder or absolute")
    parser.add_argument("--extractor", default="resnet18")
    args = parser.parse_args(argv)
    samples_csv = args.samples if args.samples.is_absolute() else args.run / args.samples
    slides = read_cohort(args.run, samples_csv, args.extractor)
    sizes = slides.features.map(len).to_numpy()
    tumour = slides[slides.annotated].tumour.map(np.sum).to_numpy()
    folds = min(5, slides.patient.nunique())  # a tiny cohort: one patient per fold
    patch_auc, slide_auc = probe(slides, folds)
    print(f"slides: {len(slides)} ({len(tumour)} annotated positive), "
          f"patients: {slides.patient.nunique()}")
    print(f"patches per slide, median (range): {np.median(sizes):g} ({sizes.min()}-{sizes.max()})")
    print(f"tumour patches per positive slide (> 20% annotated): {np.median(tumour):g} "
          f"({tumour.min()}-{tumour.max()}); positive slides with none: {int((tumour == 0).sum())}")
    print(f"linear probe with patch labels, {folds} folds by patient: patch AUC {patch_auc:.3f}, "
          f"slide AUC by the highest patch {slide_auc:.3f}")


if __name__ == "__main__":
    main()
