"""Patient-level stratified cross-validation splits, or a fixed split file.

Both kinds of splits come out in one format (`results/splits.json`): the classes and, per fold, the
sorted slide ids of its `train`, `val` (model selection) and `test` parts. No torch here: the
workflow checks the cohort's splits while Snakemake parses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from srmil.errors import InputError


def make_splits(samples: pd.DataFrame, n_folds: int = 3, val_fraction: float = 0.2,
                seed: int = 0) -> dict:
    """Patient-level stratified k-fold splits with an inner validation split per fold.

    Every patient's slides stay together in one part, every slide is in exactly one test fold,
    and the validation patients are drawn per class from each fold's training patients. The result
    depends only on the patients, labels and seed, not on the row order of `samples`.
    """
    # Imported here: the workflow's parse checks the cohort only (check_cohort), without sklearn.
    from sklearn.model_selection import StratifiedKFold

    patients = check_cohort(samples, n_folds, val_fraction)
    classes = sorted(patients.unique())
    slides_of = samples.groupby("patient_id")["slide_id"].apply(sorted)
    kfold = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    rng = np.random.default_rng(seed)
    folds = []
    for train_idx, test_idx in kfold.split(patients.index, patients.to_numpy()):
        train_patients = patients.iloc[train_idx]
        val_ids = _validation_patients(train_patients, val_fraction, rng)
        parts = {
            "train": [p for p in train_patients.index if p not in val_ids],
            "val": [p for p in train_patients.index if p in val_ids],
            "test": list(patients.index[test_idx]),
        }
        folds.append({name: sorted(s for p in pats for s in slides_of[p])
                      for name, pats in parts.items()})
    return {"classes": classes, "n_folds": n_folds, "seed": seed, "val_fraction": val_fraction,
            "folds": folds}


def check_cohort(samples: pd.DataFrame, n_folds: int, val_fraction: float) -> pd.Series:
    """The patients' labels (indexed by sorted patient id) if `make_splits` can split them into
    `n_folds`, else an InputError saying why (one class, fewer patients of a class than folds)."""
    if n_folds < 2:
        raise InputError(f"n_folds={n_folds}: cross-validation needs at least 2 folds")
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction={val_fraction}: must be in [0, 1)")
    patients = _patient_labels(samples)
    classes = sorted(patients.unique())
    if len(classes) < 2:
        raise InputError(f"only one class ({classes[0]!r}) in the sample sheet; a classifier "
                         "needs at least two labels")
    per_class = patients.value_counts()
    if per_class.min() < n_folds:
        label = per_class.idxmin()
        raise InputError(f"class {label!r} has {per_class.min()} patient(s), fewer than "
                         f"n_folds={n_folds}; use fewer folds or add patients")
    return patients


PARTS = ("train", "val", "test")
ID_COLUMNS = ("slide_id", "patient_id")


def fold_count(split_file: str | os.PathLike) -> int:
    """The number of folds a split file defines (checks its format, not its ids)."""
    _, folds = _read_assignments(Path(split_file))
    return len(folds)


def read_split_file(split_file: str | os.PathLike, samples: pd.DataFrame,
                    val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Fixed splits from a file, checked against the sample sheet, in `make_splits`' format.

    The file is a CSV with a `slide_id` or a `patient_id` column (a patient stands for all its
    slides), a `part` column (train, val or test) and an optional integer `fold` column (0, 1,
    ...; without it the file is one fold); or a JSON `{"folds": [{"train": [slide ids],
    "val": [...], "test": [...]}, ...]}` such as a `splits.json` written before. Sheet slides a
    fold does not name take no part in it. A fold without validation slides gets them drawn from
    its training patients, per class, as in `make_splits` (none with val_fraction 0).

    Raises InputError naming the file for unknown ids, a patient split across parts of a fold,
    a slide named twice in a fold, a fold without training or test slides, or a training set of
    one class.
    """
    path = Path(split_file)
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction={val_fraction}: must be in [0, 1)")
    kind, folds = _read_assignments(path)
    patients = _patient_labels(samples)
    classes = sorted(patients.unique())
    patient_of = dict(zip(samples["slide_id"].astype(str), samples["patient_id"].astype(str),
                          strict=True))
    slides_of = samples.groupby("patient_id")["slide_id"].apply(sorted)
    known = set(patient_of) if kind == "slide_id" else set(slides_of.index)
    rng = np.random.default_rng(seed)
    out = []
    for k, fold in enumerate(folds):
        unknown = sorted({i for ids in fold.values() for i in ids} - known)
        if unknown:
            raise InputError(f"{path}: {kind} {', '.join(map(repr, unknown[:3]))}"
                             f"{' and more' if len(unknown) > 3 else ''} not in the sample "
                             "sheet; fix the ids or the sheet")
        parts = {part: sorted(fold.get(part, [])) if kind == "slide_id"
                 else sorted(s for p in fold.get(part, []) for s in slides_of[p])
                 for part in PARTS}
        owner: dict[str, str] = {}  # patient -> the part it was first seen in
        for part in PARTS:
            for slide_id in parts[part]:
                patient = patient_of[slide_id]
                if owner.setdefault(patient, part) != part:
                    raise InputError(f"{path}: patient {patient!r} has slides in both the "
                                     f"{owner[patient]} and the {part} part of fold {k}; keep a "
                                     "patient's slides in one part")
        for part in ("train", "test"):
            if not parts[part]:
                raise InputError(f"{path}: fold {k} has no {part} slides; name at least one")
        train_patients = patients[sorted({patient_of[s] for s in parts["train"]})]
        if train_patients.nunique() < 2:
            raise InputError(f"{path}: the training part of fold {k} holds only class "
                             f"{train_patients.iloc[0]!r}; it needs at least two classes")
        if not parts["val"] and val_fraction > 0:
            val_ids = _validation_patients(train_patients, val_fraction, rng)
            parts["val"] = sorted(s for p in val_ids for s in slides_of[p])
            parts["train"] = [s for s in parts["train"] if patient_of[s] not in val_ids]
        out.append(parts)
    return {"classes": classes, "n_folds": len(out), "seed": seed, "val_fraction": val_fraction,
            "split_file": str(path), "folds": out}


def _read_assignments(path: Path) -> tuple[str, list[dict[str, list[str]]]]:
    """(id column, per fold {part: ids}) from a split CSV or JSON; format errors name the file."""
    if not path.is_file():
        raise InputError(f"{path}: split file not found; fix cv.split_file or set it to null")
    if path.suffix.lower() == ".json":
        return "slide_id", _json_assignments(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the split file as CSV ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    id_columns = [c for c in ID_COLUMNS if c in table.columns]
    if len(id_columns) != 1 or "part" not in table.columns:
        raise InputError(f"{path}: a split CSV needs one id column (slide_id or patient_id), a "
                         f"part column and optionally fold; found {', '.join(table.columns)}")
    if table.empty:
        raise InputError(f"{path}: the split file has no rows")
    kind = id_columns[0]
    ids = table[kind].str.strip()
    parts = table["part"].str.strip().str.lower()
    bad = ~parts.isin(PARTS)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: row {row + 2} has part {table['part'].iloc[row]!r}; use "
                         f"one of {', '.join(PARTS)}")
    if (ids == "").any():
        raise InputError(f"{path}: row {int(np.flatnonzero(ids == '')[0]) + 2} has no {kind}")
    folds = pd.Series(0, index=table.index)
    if "fold" in table.columns:
        folds = pd.to_numeric(table["fold"].str.strip(), errors="coerce")
        if folds.isna().any() or (folds % 1 != 0).any() or (folds < 0).any():
            row = int(np.flatnonzero(folds.isna() | (folds % 1 != 0) | (folds < 0))[0])
            raise InputError(f"{path}: row {row + 2} has fold {table['fold'].iloc[row]!r}; "
                             "folds are integers 0, 1, ...")
        folds = folds.astype(int)
        missing = sorted(set(range(folds.max() + 1)) - set(folds))
        if missing:
            raise InputError(f"{path}: folds are numbered 0 to {folds.max()} but fold "
                             f"{missing[0]} has no rows")
    duplicated = pd.DataFrame({"fold": folds, "id": ids}).duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise InputError(f"{path}: {kind} {ids.iloc[row]!r} appears twice in fold "
                         f"{folds.iloc[row]} (row {row + 2}); name it once per fold")
    assignments = [{part: ids[(folds == k) & (parts == part)].tolist() for part in PARTS}
                   for k in range(int(folds.max()) + 1)]
    return kind, assignments


def _json_assignments(path: Path) -> list[dict[str, list[str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the split file as JSON ({err})") from err
    folds = data.get("folds") if isinstance(data, dict) else None
    if not isinstance(folds, list) or not folds:
        raise InputError(f'{path}: a split JSON needs "folds": a list of {{"train": [...], '
                         '"val": [...], "test": [...]}} of slide ids')
    out = []
    for k, fold in enumerate(folds):
        if (not isinstance(fold, dict) or set(fold) - set(PARTS)
                or not all(isinstance(v, list) and all(isinstance(i, str) for i in v)
                           for v in fold.values())):
            raise InputError(f"{path}: fold {k} must map train, val and test to lists of slide "
                             "ids")
        ids = [i for v in fold.values() for i in v]
        if len(ids) != len(set(ids)):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"{path}: slide {dup!r} appears twice in fold {k}; name it once "
                             "per fold")
        out.append({part: list(fold.get(part, [])) for part in PARTS})
    return out


def _patient_labels(samples: pd.DataFrame) -> pd.Series:
    """One label per patient, indexed by sorted patient id (so row order does not matter)."""
    missing = {"slide_id", "patient_id", "label"} - set(samples.columns)
    if missing:
        raise InputError(f"samples lack column(s) {', '.join(sorted(missing))}")
    labels = samples.groupby("patient_id")["label"]
    mixed = labels.nunique()
    if (mixed > 1).any():
        raise InputError(f"patient {mixed[mixed > 1].index[0]!r} has slides with different "
                         "labels; give each patient one label")
    return labels.first().astype(str).sort_index()


def _validation_patients(train_patients: pd.Series, val_fraction: float,
                         rng: np.random.Generator) -> set[str]:
    """Draw round(val_fraction * n) patients of each class (at least one, while one stays)."""
    chosen: set[str] = set()
    if val_fraction == 0:
        return chosen
    for label in sorted(train_patients.unique()):
        ids = train_patients.index[train_patients == label].to_numpy()
        n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
        chosen.update(rng.permutation(ids)[:n_val].tolist())
    return chosen
