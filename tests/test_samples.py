from pathlib import Path

import pandas as pd
import pytest

from srmil.cohort.samples import SampleSheetError, read_sample_sheet


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
    with pytest.raises(SampleSheetError, match=r"d\.csv: slide_id 'a' is listed twice") as err:
        read_sample_sheet(dup)
    assert "\n" not in str(err.value)
    cased = write_sheet(tmp_path / "c.csv", [{"slide_id": "A1", "path": path, "label": "x"},
                                             {"slide_id": "a1", "path": path, "label": "x"}])
    with pytest.raises(SampleSheetError, match=r"c\.csv: slide ids 'A1' and 'a1' differ only in "
                       "case"):
        read_sample_sheet(cased)
    mixed = write_sheet(
        tmp_path / "m.csv",
        [
            {"slide_id": "a", "path": path, "patient_id": "p", "label": "x"},
            {"slide_id": "b", "path": path, "patient_id": "p", "label": "y"},
        ],
    )
    with pytest.raises(SampleSheetError, match=r"m\.csv: patient 'p' has slides with different"
                       ) as err:
        read_sample_sheet(mixed)
    assert "\n" not in str(err.value)


def test_missing_annotation_names_the_file(tmp_path: Path, cohort: pd.DataFrame) -> None:
    rows = [{"slide_id": "a", "path": cohort["path"].iloc[0], "label": "x",
             "annotation": "absent.geojson"}]
    sheet = write_sheet(tmp_path / "s.csv", rows)
    message = r"absent\.geojson: annotation of slide 'a' not found; fix its path in .*s\.csv"
    with pytest.raises(SampleSheetError, match=message) as err:
        read_sample_sheet(sheet)
    assert "\n" not in str(err.value)


def test_whitespace_around_cells_is_stripped(tmp_path: Path, cohort: pd.DataFrame) -> None:
    """`tumour ` is the class `tumour` and `P0 ` the patient `P0`, quoted or not."""
    path = cohort["path"].iloc[0]
    sheet = tmp_path / "s.csv"
    sheet.write_text(
        "slide_id,path,patient_id,label\n"
        f'" a ", " {path} ",P0 ,tumour \n'
        f'b,{path}, " P0","  tumour"\n'
        f'" c",{path} ,P1,"normal "\n',
        encoding="utf-8",
    )
    df = read_sample_sheet(sheet)
    assert list(df["slide_id"]) == ["a", "b", "c"]
    assert list(df["patient_id"]) == ["P0", "P0", "P1"]
    assert list(df["label"]) == ["tumour", "tumour", "normal"]
    assert set(df["path"]) == {path}
    # Stripped, `P0 ` and `P0` are one patient: its two labels are caught.
    sheet.write_text(
        f"slide_id,path,patient_id,label\na,{path},P0 ,tumour\nb,{path},P0,normal\n",
        encoding="utf-8",
    )
    with pytest.raises(SampleSheetError, match="patient 'P0' has slides with different labels"):
        read_sample_sheet(sheet)


def test_missing_sheet(tmp_path: Path) -> None:
    with pytest.raises(SampleSheetError, match="sample sheet not found"):
        read_sample_sheet(tmp_path / "absent.csv")


def test_empty_and_truncated_files_are_refused_at_parse_time(
    tmp_path: Path, cohort: pd.DataFrame
) -> None:
    (tmp_path / "empty.svs").write_bytes(b"")
    data = Path(cohort["path"].iloc[0]).read_bytes()
    # Cut where the TIFF directory chain ends early: OpenSlide no longer recognises the file.
    (tmp_path / "cut.svs").write_bytes(data[: len(data) // 2])
    for name, message in (
        ("empty.svs", r"empty\.svs: empty file \(0 bytes\); copy the slide again"),
        ("cut.svs", r"cut\.svs: not a slide OpenSlide can read \(another format, or a truncated"),
    ):
        sheet = write_sheet(tmp_path / "s.csv", [{"slide_id": "a", "path": name, "label": "x"}])
        with pytest.raises(SampleSheetError, match=message) as err:
            read_sample_sheet(sheet)
        assert "\n" not in str(err.value) and "s.csv" in str(err.value)


def test_missing_and_placeholder_labels(tmp_path: Path, cohort: pd.DataFrame) -> None:
    path = cohort["path"].iloc[0]
    for label, message in (
        ("", r"slide 'b' has no label; fill the label column"),
        ("NA", r"slide 'b' has label 'NA', which reads as a missing value"),
        ("n/a", r"slide 'b' has label 'n/a', which reads as a missing value"),
    ):
        rows = [
            {"slide_id": "a", "path": path, "label": "tumour"},
            {"slide_id": "b", "path": path, "label": label},
        ]
        with pytest.raises(SampleSheetError, match=message):
            read_sample_sheet(write_sheet(tmp_path / "s.csv", rows))
    # Sheets of new slides need no label, but a placeholder is still not a label.
    rows = [{"slide_id": "a", "path": path, "label": ""}]
    assert read_sample_sheet(write_sheet(tmp_path / "p.csv", rows), require_labels=False).shape[0]


def test_unknown_label_when_classes_are_given(tmp_path: Path, cohort: pd.DataFrame) -> None:
    path = cohort["path"].iloc[0]
    rows = [
        {"slide_id": "a", "path": path, "label": "tumour"},
        {"slide_id": "b", "path": path, "label": "tumor"},
    ]
    sheet = write_sheet(tmp_path / "s.csv", rows)
    with pytest.raises(SampleSheetError, match=r"slide 'b' has label 'tumor', not one of classes"):
        read_sample_sheet(sheet, classes=["normal", "tumour"])
    assert len(read_sample_sheet(sheet)) == 2  # without a class list, any label is a class


def test_labels_differing_only_in_case_need_a_class_list(
    tmp_path: Path, cohort: pd.DataFrame
) -> None:
    path = cohort["path"].iloc[0]
    rows = [
        {"slide_id": "a", "path": path, "label": "tumour"},
        {"slide_id": "b", "path": path, "label": "normal"},
        {"slide_id": "c", "path": path, "label": "Tumour "},
    ]
    sheet = write_sheet(tmp_path / "s.csv", rows)
    message = (r"s\.csv: labels 'tumour' and 'Tumour' differ only in case; make them identical, "
               r"or list the classes you mean under classes in config\.yaml")
    with pytest.raises(SampleSheetError, match=message) as err:
        read_sample_sheet(sheet)
    assert "\n" not in str(err.value)
    # A class list decides: here `Tumour` is not one of them.
    with pytest.raises(SampleSheetError, match=r"slide 'c' has label 'Tumour', not one of"):
        read_sample_sheet(sheet, classes=["normal", "tumour"])


def test_paths_with_spaces_and_non_ascii(tmp_path: Path, cohort: pd.DataFrame) -> None:
    folder = tmp_path / "my slides é"
    folder.mkdir()
    target = folder / "slide ü 1.svs"
    target.write_bytes(Path(cohort["path"].iloc[0]).read_bytes())
    sheet = write_sheet(
        folder / "sheet ö.csv",
        [{"slide_id": "s1", "path": "slide ü 1.svs", "patient_id": "Jürgen O'Neil", "label": "x"}],
    )
    df = read_sample_sheet(sheet)
    assert df.loc[0, "path"] == str(target) and df.loc[0, "patient_id"] == "Jürgen O'Neil"


def test_slide_ids_keep_a_portable_alphabet(tmp_path: Path, cohort: pd.DataFrame) -> None:
    rows = [{"slide_id": "slide ü", "path": cohort["path"].iloc[0], "label": "x"}]
    with pytest.raises(SampleSheetError, match=r"slide_id 'slide ü' must use only letters"):
        read_sample_sheet(write_sheet(tmp_path / "s.csv", rows))
