"""Storage policy: readable, collision-free, safe folder and file names."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from pydicom.dataset import Dataset

from dicomnode.dicomtags import safe_component
from dicomnode.organise import file_name, relative_dir, relative_path


def header(**kw: str) -> Dataset:
    ds = Dataset()
    ds.PatientID = kw.get("pid", "12345")
    ds.PatientName = kw.get("name", "DOE^JANE")
    ds.StudyInstanceUID = kw.get("study", "1.2.3.4")
    ds.SeriesInstanceUID = kw.get("series", "1.2.3.4.5")
    ds.SOPInstanceUID = kw.get("sop", "1.2.3.4.5.6")
    ds.Modality = kw.get("modality", "CT")
    ds.StudyDate = "20260102"
    ds.StudyDescription = kw.get("study_desc", "Pelvis")
    ds.SeriesNumber = "3"
    ds.SeriesDescription = kw.get("series_desc", "Planning CT")
    return ds


def test_organise_default_layout_is_readable() -> None:
    rel = relative_path(header(), "{patient}/{study}/{series}")
    parts = rel.parts
    assert parts[0] == "12345_DOE^JANE"
    assert parts[1].startswith("20260102_Pelvis_")
    assert parts[2].startswith("CT_3_Planning CT_")
    assert parts[3] == "CT_1.2.3.4.5.6.dcm"


def test_organise_different_studies_and_series_never_share_a_folder() -> None:
    a = relative_dir(header(study="1.2.3.4"), "{patient}/{study}/{series}")
    b = relative_dir(header(study="1.2.3.40"), "{patient}/{study}/{series}")
    c = relative_dir(header(series="1.2.3.4.6"), "{patient}/{study}/{series}")
    assert a.parts[1] != b.parts[1]
    assert a.parts[2] != c.parts[2]


def test_organise_same_instance_same_name() -> None:
    assert file_name(header()) == file_name(header())


@pytest.mark.filterwarnings("ignore:The value length")
@pytest.mark.parametrize(
    "pid",
    [
        "../../x",
        "..",
        "CON",
        "nul",
        "COM1.txt",
        "a/b\\c",
        "x" * 300,
        "tab\tnew\nline\x00nul",
        "trailing. . ",
        "患者",
    ],
)
def test_organise_hostile_patient_ids_stay_one_safe_component(pid: str) -> None:
    rel = relative_dir(header(pid=pid, name=""), "{patient}/{study}/{series}")
    assert len(rel.parts) == 3
    first = rel.parts[0]
    assert first not in {".", ".."}
    assert "/" not in first and "\\" not in first
    assert len(first) <= 64
    assert first.split(".")[0].upper() not in {"CON", "NUL", "COM1"}
    assert not first.endswith((".", " "))
    assert all(ch.isprintable() for ch in first)


def test_safe_component_reserved_and_empty() -> None:
    assert safe_component("CON") == "_CON"
    assert safe_component("") == "UNKNOWN"
    assert safe_component("...") == "UNKNOWN"


def test_organise_layout_template_fields() -> None:
    rel = relative_dir(header(), "{patient_id}/{modality}_{study_date}")
    assert rel == PurePosixPath("12345", "CT_20260102")
