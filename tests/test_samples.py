from pathlib import Path

import pandas as pd
import pytest

from srmil.samples import SampleSheetError, read_sample_sheet


def write_sheet(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_relative_paths_and_defaults(cohort_dir: Path, cohort: pd.DataFrame) -> None:
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in cohort["path"])
    assert (cohort["patient_id"] != "").all()
    assert set(cohort["label"]) == {"normal", "tumour"}


def test_missing_slide_names_the_file(tmp_path: Path) -> None:
    sheet = write_sheet(tmp_path / "s.csv", [{"slide_id": "a", "path": "nope.svs", "label": "x"}])
    with pytest.raises(SampleSheetError, match=r"nope\.svs: slide file not found") as err:
        read_sample_sheet(sheet)
    assert "\n" not in str(err.value)


def test_non_slide_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "fake.svs").write_text("not a slide")
    sheet = write_sheet(tmp_path / "s.csv", [{"slide_id": "a", "path": "fake.svs", "label": "x"}])
    with pytest.raises(SampleSheetError, match=r"fake\.svs: not a slide OpenSlide can read"):
        read_sample_sheet(sheet)


def test_duplicate_ids_and_mixed_patient_labels(tmp_path: Path, cohort: pd.DataFrame) -> None:
    path = cohort["path"].iloc[0]
    dup = write_sheet(tmp_path / "d.csv", [{"slide_id": "a", "path": path, "label": "x"}] * 2)
    with pytest.raises(SampleSheetError, match="listed twice"):
        read_sample_sheet(dup)
    mixed = write_sheet(
        tmp_path / "m.csv",
        [
            {"slide_id": "a", "path": path, "patient_id": "p", "label": "x"},
            {"slide_id": "b", "path": path, "patient_id": "p", "label": "y"},
        ],
    )
    with pytest.raises(SampleSheetError, match="different labels"):
        read_sample_sheet(mixed)


def test_missing_sheet(tmp_path: Path) -> None:
    with pytest.raises(SampleSheetError, match="sample sheet not found"):
        read_sample_sheet(tmp_path / "absent.csv")
