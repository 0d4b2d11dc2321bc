"""The sample sheet: one row per slide (`slide_id, path, patient_id, label`, optional
`annotation`, `mpp` and `segment_<setting>` overrides). Read and checked in one place, so the
workflow and the CLI agree."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from srmil.errors import InputError

REQUIRED = ("slide_id", "path")
# `features`: a feature file the slide already has (CLAM, TRIDENT or STAMP HDF5, or an srmil store),
# imported instead of segmenting, tiling and extracting (srmil.features.imported).
# `roi`, `roi_exclude`: GeoJSON of regions to tile (QuPath's export), and of regions to leave out.
OPTIONAL = ("patient_id", "label", "annotation", "mpp", "features", "roi", "roi_exclude")
# Sheet columns that name files, relative to the sheet's folder.
FILE_COLUMNS = ("path", "annotation", "features", "roi", "roi_exclude")
# Optional per-slide segmentation settings: a column `segment_<name>` overrides config.yaml's
# segment.<name> for the rows where it is filled (e.g. segment_threshold, segment_exclude_pen).
SEGMENT_PREFIX = "segment_"
# Slide ids become file names and Snakemake wildcards: keep them to a portable alphabet.
SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Labels that spreadsheets and R write for "no value": refused rather than taken as a class.
MISSING_LABELS = frozenset({"na", "n/a", "nan", "none", "null", "?"})


class SampleSheetError(InputError):
    """A sample sheet problem, phrased as one line that names the file and the fix."""


def read_sample_sheet(
    path: str | os.PathLike,
    check_files: bool = True,
    require_labels: bool = True,
    classes: list[str] | None = None,
) -> pd.DataFrame:
    """Return the sheet with absolute `path`/`annotation`, `patient_id` filled from `slide_id`.

    Relative paths are relative to the sheet's folder. With `check_files`, every slide (and
    annotation) must exist and be a file OpenSlide recognises. With `classes` (config.yaml's
    `classes`), every filled label must be one of them: a typo would otherwise become a class.
    Without it, labels that differ only in case (`Tumour`, `tumour`) are refused. Cells are
    stripped of surrounding whitespace (`P0 ` is patient `P0`).
    """
    sheet = Path(path)
    df = _read_csv(sheet, require_labels)
    _check_ids(sheet, df)
    _check_labels(sheet, df, require_labels, classes)
    df["patient_id"] = df["patient_id"].where(df["patient_id"] != "", df["slide_id"])
    if require_labels:
        labels_per_patient = df.groupby("patient_id")["label"].nunique()
        mixed = labels_per_patient[labels_per_patient > 1]
        if len(mixed):
            raise SampleSheetError(
                f"{sheet}: patient {mixed.index[0]!r} has slides with different "
                "labels; give each patient one label"
            )

    base = sheet.resolve().parent
    for column in FILE_COLUMNS:
        df[column] = [str(_resolve(base, p)) if p else "" for p in df[column]]
    df["mpp"] = [
        _parse_mpp(sheet, sid, v) for sid, v in zip(df["slide_id"], df["mpp"], strict=True)
    ]
    _check_segment_overrides(sheet, df)
    if check_files:
        for row in df.itertuples():
            check_row_files(row, sheet)
    return df.reset_index(drop=True)


def _read_csv(sheet: Path, require_labels: bool) -> pd.DataFrame:
    """The sheet's cells as stripped text, with every optional column present."""
    if not sheet.is_file():
        raise SampleSheetError(
            f"{sheet}: sample sheet not found; pass an existing CSV with --config samples=PATH"
        )
    try:
        df = pd.read_csv(sheet, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise SampleSheetError(
            f"{sheet}: not a readable CSV ({err}); save it as UTF-8 CSV"
        ) from err
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if require_labels and "label" not in df.columns:
        missing.append("label")
    if missing:
        raise SampleSheetError(
            f"{sheet}: missing column(s) {', '.join(missing)}; the header must "
            "hold slide_id,path,patient_id,label"
        )
    if df.empty:
        raise SampleSheetError(f"{sheet}: no slides listed; add one row per slide")
    for col in OPTIONAL:
        if col not in df.columns:
            df[col] = ""
    # Every column is read as text; pandas 3 types it StringDtype (not object), so strip all.
    df = df.apply(lambda s: s.str.strip())
    return df


def _check_ids(sheet: Path, df: pd.DataFrame) -> None:
    """Slide ids that are portable file names and wildcards, unique even without case, each
    with a slide or feature file."""
    bad = df.loc[~df["slide_id"].map(lambda s: bool(SLIDE_ID.match(s))), "slide_id"]
    if len(bad):
        raise SampleSheetError(
            f"{sheet}: slide_id {bad.iloc[0]!r} must use only letters, digits, "
            "'.', '_' and '-'; rename it in the sheet"
        )
    unfilled = df.loc[(df["path"] == "") & (df["features"] == ""), "slide_id"]
    if len(unfilled):
        raise SampleSheetError(
            f"{sheet}: slide {unfilled.iloc[0]!r} has no path; give its slide file (or its "
            "feature file in a features column)"
        )
    dup = df.loc[df["slide_id"].duplicated(), "slide_id"]
    if len(dup):
        raise SampleSheetError(
            f"{sheet}: slide_id {dup.iloc[0]!r} is listed twice; give each slide a unique id"
        )
    # Ids name result files: on a case-insensitive file system (macOS, Windows) A1 and a1 collide.
    folded = df["slide_id"].str.casefold()
    if folded.duplicated().any():
        twins = df.loc[folded == folded[folded.duplicated()].iloc[0], "slide_id"].tolist()
        raise SampleSheetError(
            f"{sheet}: slide ids {twins[0]!r} and {twins[1]!r} differ only in case, which "
            "collides on case-insensitive file systems; rename one of them"
        )


def _check_labels(sheet: Path, df: pd.DataFrame, require_labels: bool,
                  classes: list[str] | None) -> None:
    """Labels that are filled (if required), not a spreadsheet's missing value, and one of
    `classes` (or, without them, not case variants of each other)."""
    placeholder = df["label"].str.lower().isin(MISSING_LABELS)
    if placeholder.any():
        row = df.loc[placeholder].iloc[0]
        raise SampleSheetError(
            f"{sheet}: slide {row['slide_id']!r} has label {row['label']!r}, which reads as a "
            "missing value; fill in its label or remove its row"
        )
    if require_labels:
        unlabelled = df.loc[df["label"] == "", "slide_id"]
        if len(unlabelled):
            raise SampleSheetError(
                f"{sheet}: slide {unlabelled.iloc[0]!r} has no label; fill the label column"
            )
    if classes:
        unknown = df.loc[(df["label"] != "") & ~df["label"].isin(classes)]
        if len(unknown):
            row = unknown.iloc[0]
            raise SampleSheetError(
                f"{sheet}: slide {row['slide_id']!r} has label {row['label']!r}, not one of "
                f"classes {', '.join(classes)}; fix the label or the classes key in config.yaml"
            )
    else:
        _check_case_variants(sheet, df["label"])


def check_row_files(row: Any, sheet: str | os.PathLike = "the sample sheet") -> None:
    """Raise SampleSheetError unless a sheet row's slide (and annotation and feature file, if
    any) is usable."""
    if row.path:
        check_slide_file(row.path, sheet)
    features = getattr(row, "features", "")
    if features and not Path(features).exists():
        raise SampleSheetError(
            f"{features}: feature file of slide {row.slide_id!r} not found; fix its path in "
            f"{sheet} or leave it empty"
        )
    for column, what in (("annotation", "annotation"), ("roi", "regions of interest"),
                         ("roi_exclude", "regions to exclude")):
        path = getattr(row, column, "")
        if path and not Path(path).is_file():
            raise SampleSheetError(
                f"{path}: {what} of slide {row.slide_id!r} not found; fix its path in {sheet} "
                "or leave it empty"
            )


def _check_case_variants(sheet: Path, labels: pd.Series) -> None:
    """Without a class list any label is a class: refuse spellings that differ only in case
    (`Tumour`, `tumour`), which would silently split one class in two."""
    spellings: dict[str, str] = {}
    for label in labels[labels != ""].unique():
        first = spellings.setdefault(label.casefold(), label)
        if first != label:
            raise SampleSheetError(
                f"{sheet}: labels {first!r} and {label!r} differ only in case; make them "
                "identical, or list the classes you mean under classes in config.yaml"
            )


def _check_segment_overrides(sheet: Path, df: pd.DataFrame) -> None:
    columns = [c for c in df.columns if c.startswith(SEGMENT_PREFIX)]
    if not columns:
        return
    from srmil.settings import ConfigError, SegmentSettings, cell_value

    for col in columns:
        for slide_id, value in zip(df["slide_id"], df[col], strict=True):
            if value == "":
                continue
            try:
                cell_value(SegmentSettings, col.removeprefix(SEGMENT_PREFIX), value)
            except KeyError:
                raise SampleSheetError(
                    f"{sheet}: column {col!r} names no segmentation setting; rename it to "
                    f"{SEGMENT_PREFIX}<a key of the segment section of config.yaml>"
                ) from None
            except ConfigError as err:  # unparsable or out of range
                raise SampleSheetError(
                    f"{sheet}: {col} {value!r} of slide {slide_id!r} is not a valid value "
                    f"({err}); fix it or leave it empty"
                ) from None


def segment_overrides(row: pd.Series | dict) -> dict[str, object]:
    """The filled `segment_<setting>` cells of one sheet row, typed, without the prefix."""
    from srmil.settings import SegmentSettings, cell_value

    items = row.items() if hasattr(row, "items") else dict(row).items()
    return {
        key.removeprefix(SEGMENT_PREFIX): cell_value(
            SegmentSettings, key.removeprefix(SEGMENT_PREFIX), value
        )
        for key, value in items
        if key.startswith(SEGMENT_PREFIX) and isinstance(value, str) and value.strip()
    }


def check_slide_file(
    path: str | os.PathLike, sheet: str | os.PathLike = "the sample sheet"
) -> None:
    """Raise SampleSheetError unless `path` exists and OpenSlide recognises its format."""
    from srmil.wsi.slide import slide_file_problem  # numpy and OpenSlide only

    problem = slide_file_problem(path, sheet)
    if problem:
        raise SampleSheetError(problem)


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q)


def _parse_mpp(sheet: Path, slide_id: str, value: str) -> float:
    if value == "":
        return float("nan")
    try:
        mpp = float(value)
    except ValueError:
        mpp = -1.0
    if not (0 < mpp < 100):
        raise SampleSheetError(
            f"{sheet}: mpp {value!r} of slide {slide_id!r} is not a positive "
            "number of µm per pixel; fix it or leave it empty"
        )
    return mpp
