"""Storage policy: readable, collision-free, safe folder and file names."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from pydicom.dataset import Dataset

from dicomnode.dicomtags import is_forwarder_reserved, safe_component, short_hash
from dicomnode.forwarder.batching import should_ignore
from dicomnode.organise import file_name, folder_plan, relative_dir, relative_path


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
    assert parts[0].startswith("12345_DOE^JANE_")
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


@pytest.mark.parametrize("name", ["failed", "Failed", "a.part", "b.Tmp", ".x", "failed.part"])
def test_safe_component_never_returns_a_forwarder_reserved_name(name: str) -> None:
    safe = safe_component(name)
    assert not is_forwarder_reserved(safe)
    assert not should_ignore(PurePosixPath(safe))
    assert not should_ignore(PurePosixPath("group", safe))


def test_organise_layout_template_fields() -> None:
    rel = relative_dir(header(), "{patient_id}/{modality}_{study_date}")
    # {patient_id} alone is its identity; {modality} binds the part to the series
    assert rel == PurePosixPath("12345", f"CT_20260102_{short_hash('1.2.3.4.5')}")


LAYOUT = "{patient}/{study}/{series}"


def test_organise_descriptive_text_never_changes_the_identity_tags() -> None:
    """Objects of one patient/study/series made by different systems carry the same tags."""
    scanner = folder_plan(header(), LAYOUT)
    planning = folder_plan(
        header(name="Doe^Jane^^^", study_desc="", series_desc="Plan", modality="RTPLAN"), LAYOUT
    )
    no_date = header()
    del no_date.StudyDate
    assert [lv.tag for lv in scanner] == [lv.tag for lv in planning]
    assert [lv.tag for lv in folder_plan(no_date, LAYOUT)] == [lv.tag for lv in scanner]
    assert [lv.name for lv in scanner] != [lv.name for lv in planning]
    for level in scanner + planning:
        assert level.tag is not None and level.name.endswith("_" + level.tag)


def test_organise_identity_tags_separate_patients_studies_series() -> None:
    base = folder_plan(header(), LAYOUT)
    assert folder_plan(header(pid="12346"), LAYOUT)[0].tag != base[0].tag
    assert folder_plan(header(study="1.2.3.40"), LAYOUT)[1].tag != base[1].tag
    assert folder_plan(header(series="1.2.3.4.50"), LAYOUT)[2].tag != base[2].tag
    # non-ASCII IDs are hashed as UTF-8, not as "?" (two different IDs, two folders)
    assert (
        folder_plan(header(pid="患者"), LAYOUT)[0].tag
        != folder_plan(header(pid="病人"), LAYOUT)[0].tag
    )
    # no PatientID: patients are told apart by name, not all filed together
    a, b = header(pid="", name="A^B"), header(pid="", name="C^D")
    assert folder_plan(a, LAYOUT)[0].tag != folder_plan(b, LAYOUT)[0].tag


def test_organise_study_and_series_tags_are_the_former_uid_hashes() -> None:
    """Folders filed before identity tags existed are found after an upgrade."""
    plan = folder_plan(header(), LAYOUT)
    assert plan[1].tag == short_hash("1.2.3.4") and plan[2].tag == short_hash("1.2.3.4.5")


@pytest.mark.filterwarnings("ignore:The value length", "ignore:The PN component length")
def test_organise_long_names_keep_their_tag() -> None:
    plan = folder_plan(header(pid="9" * 64, name="N" * 300, study_desc="S" * 64), LAYOUT)
    for level in plan:
        assert len(level.name) <= 64 and level.name.endswith("_" + str(level.tag))


@pytest.mark.parametrize(
    "pid", ["failed", "FAILED", ".hidden", "x.part", "y.TMP", "..", "failed.tmp"]
)
def test_organise_never_produces_names_the_forwarder_skips(pid: str) -> None:
    for layout in (LAYOUT, "{patient_id}/{study}", "{patient_id}"):
        rel = relative_path(header(pid=pid, name=""), layout)
        assert not should_ignore(PurePosixPath("AE", *rel.parts)), rel
        assert not should_ignore(rel), rel
        assert all(not is_forwarder_reserved(p) for p in rel.parts), rel
