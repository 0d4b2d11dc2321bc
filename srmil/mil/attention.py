"""Attention diagnostics (paper Fig. 3): does a model's attention collapse onto single patches,
and do the patches it attends to lie in the annotated tumour?

Per slide and epoch we keep the largest attention weight and, for positive slides (those with an
annotation that covers at least one patch), how many of the top-1, top-5 and highly attended
(weight >= 0.5) patches are positive. A patch is positive when more than 20% of its area is
annotated (measured exactly: the area of the patch's square inside the annotation polygons, by
shapely). Summaries pool the counts over slides, so "top-5 positive" is the share of all top-5
patches of positive slides that are positive.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from srmil.errors import InputError
from srmil.store import read_json
from srmil.wsi.geometry import Polygon, covered_fractions, read_geojson_polygons

HIGH_ATTENTION = 0.5  # a weight at least this large means one patch dominates the slide
POSITIVE_AREA = 0.2  # a patch is positive when more than this share of it is annotated
TOP_K = (1, 5)


def patch_annotation_fractions(coords_level0: np.ndarray, patch_level0: float,
                               polygons: list[Polygon]) -> np.ndarray:
    """Share of each patch (origin (x, y) in level-0 px, side `patch_level0`) covered by the
    annotation polygons: the exact area of the patch's square inside them (holes left out,
    overlapping annotations counted once) over the square's area."""
    origins = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
    return covered_fractions(np.c_[origins, origins + float(patch_level0)], polygons)


def positive_patches(coords_level0: np.ndarray, patch_level0: float,
                     annotation: str | os.PathLike,
                     min_fraction: float = POSITIVE_AREA) -> np.ndarray:
    """Boolean (N,): patches whose annotated share exceeds `min_fraction`."""
    path = Path(annotation)
    if not path.is_file():
        raise InputError(f"{path}: annotation not found; fix its path in the sample sheet or "
                         "leave it empty")
    polygons = read_geojson_polygons(path)
    return patch_annotation_fractions(coords_level0, patch_level0, polygons) > min_fraction


def slide_attention_stats(attention: np.ndarray,
                          positive: np.ndarray | None = None) -> dict[str, int | float]:
    """Statistics of one slide's attention weights (N,).

    Always `max_weight` and `n_high` (patches with weight >= HIGH_ATTENTION); with the patches'
    positivity (N,) also `top{k}_positive` / `top{k}_n` for k in TOP_K and `high_positive`.
    Ties in the ranking go to the lower patch index.
    """
    attention = np.asarray(attention, dtype=np.float64).ravel()
    high = attention >= HIGH_ATTENTION
    stats: dict[str, int | float] = {
        "max_weight": float(attention.max()) if attention.size else float("nan"),
        "n_high": int(high.sum()),
    }
    if positive is not None:
        positive = np.asarray(positive, dtype=bool).ravel()
        if positive.shape != attention.shape:
            raise ValueError(f"{positive.shape[0]} positivity flags for {attention.size} patches")
        order = np.argsort(-attention, kind="stable")
        for k in TOP_K:
            top = positive[order[:k]]
            stats[f"top{k}_positive"], stats[f"top{k}_n"] = int(top.sum()), int(top.size)
        stats["high_positive"] = int(positive[high].sum())
    return stats


def summarise_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool per-slide statistics (one epoch) into the figure's numbers.

    `share_high`: share of slides with a weight >= HIGH_ATTENTION; `max_weight_median` and the
    quartiles; for positive slides (those with `top1_n`), `top{k}_positive` and `high_positive`:
    the share of those patches that are positive (None when there are none).
    """
    max_weight = np.array([s["max_weight"] for s in stats], dtype=np.float64)
    max_weight = max_weight[np.isfinite(max_weight)]
    positives = [s for s in stats if "top1_n" in s]
    out: dict[str, Any] = {
        "n_slides": len(stats),
        "share_high": (float(np.mean([s["n_high"] > 0 for s in stats])) if stats else None),
        "n_positive_slides": len(positives),
    }
    for q, name in ((0.25, "q25"), (0.5, "median"), (0.75, "q75")):
        out[f"max_weight_{name}"] = float(np.quantile(max_weight, q)) if max_weight.size else None
    for k in TOP_K:
        out[f"top{k}_positive"] = _share(positives, f"top{k}_positive", f"top{k}_n")
    out["high_positive"] = _share(positives, "high_positive", "n_high")
    return out


def _share(stats: list[dict[str, Any]], hits: str, total: str) -> float | None:
    n = sum(s[total] for s in stats)
    return sum(s[hits] for s in stats) / n if n else None


class AttentionRecorder:
    """Collects the training slides' attention statistics once per epoch (train.py calls `add`
    with the attention of its unmasked training-set pass) and writes them as JSON."""

    def __init__(self, slide_ids: Sequence[str], positive: dict[str, np.ndarray]):
        self.slide_ids = list(slide_ids)
        self.positive = positive  # slide id -> (N,) bool, positive slides only
        self.epochs: list[dict[str, Any]] = []

    @classmethod
    def for_bags(cls, bags: Sequence[Any], samples: pd.DataFrame) -> AttentionRecorder:
        """Positive patches of each bag from the sample sheet's `annotation` column (if any)."""
        annotation_of = {}
        if "annotation" in samples.columns:
            annotation_of = dict(zip(samples["slide_id"], samples["annotation"].fillna(""),
                                     strict=True))
        positive = {}
        for bag in bags:
            annotation = annotation_of.get(bag.slide_id, "")
            patch_level0 = bag.provenance.patch_level0
            if not annotation or patch_level0 is None:
                continue
            flags = positive_patches(bag.coords, float(patch_level0), annotation)
            if flags.any():  # slides without a positive patch are negatives for the figure
                positive[bag.slide_id] = flags
        return cls([bag.slide_id for bag in bags], positive)

    def add(self, epoch: int, attention: Sequence[np.ndarray]) -> None:
        """Record one epoch; `attention` is in the order of the slide ids."""
        if len(attention) != len(self.slide_ids):
            raise ValueError(f"{len(attention)} attention vectors for {len(self.slide_ids)} slides")
        slides = [slide_attention_stats(a, self.positive.get(sid))
                  for sid, a in zip(self.slide_ids, attention, strict=True)]
        self.epochs.append({"epoch": int(epoch), "slides": slides})

    def to_json(self) -> dict[str, Any]:
        """Column-wise per epoch: one list entry per slide (positive-slide keys for those only)."""
        epochs = []
        for record in self.epochs:
            row: dict[str, Any] = {"epoch": record["epoch"]}
            for key in ("max_weight", "n_high"):
                row[key] = [s[key] for s in record["slides"]]
            pos = [s for s in record["slides"] if "top1_n" in s]
            for key in [*(f"top{k}_{p}" for k in TOP_K for p in ("positive", "n")),
                        "high_positive"]:
                row[key] = [s[key] for s in pos]
            epochs.append(row)
        return {"slides": self.slide_ids,
                "positive_slides": [s for s in self.slide_ids if s in self.positive],
                "high_attention": HIGH_ATTENTION, "positive_area": POSITIVE_AREA,
                "epochs": epochs}


def epoch_summaries(record: dict[str, Any]) -> pd.DataFrame:
    """One row per epoch of a recorder's JSON: `epoch` and the `summarise_stats` numbers (NaN
    where undefined)."""
    rows = []
    positive = set(record["positive_slides"])
    for row in record["epochs"]:
        stats = [{"max_weight": m, "n_high": h}
                 for m, h in zip(row["max_weight"], row["n_high"], strict=True)]
        pos_index = [i for i, sid in enumerate(record["slides"]) if sid in positive]
        for j, i in enumerate(pos_index):
            for key in [*(f"top{k}_{p}" for k in TOP_K for p in ("positive", "n")),
                        "high_positive"]:
                stats[i][key] = row[key][j]
        rows.append({"epoch": row["epoch"], **summarise_stats(stats)})
    # Undefined shares (None) become NaN so that folds average column by column.
    return pd.DataFrame(rows).astype(float).astype({"epoch": int})


def attention_logs(models_dir: Path, n_folds: int) -> dict[int, dict[str, Any]]:
    """Fold -> the attention record train.py wrote for it (folds without one left out)."""
    paths = {k: models_dir / f"fold_{k}.attention.json" for k in range(n_folds)}
    return {k: read_json(p) for k, p in paths.items() if p.is_file()}


def last_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The last epoch's summarise_stats numbers (counts as int, undefined shares as None)."""
    table = epoch_summaries(record)
    if table.empty:
        return {}
    last = table.iloc[-1].to_dict()
    counts = ("epoch", "n_slides", "n_positive_slides")
    return {k: (int(v) if k in counts else None if np.isnan(v) else float(v))
            for k, v in last.items()}
