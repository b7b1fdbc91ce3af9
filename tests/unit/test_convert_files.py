"""Converting stored files: series placement under the AE root, staging, offline command."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.config import DEFAULT_LAYOUT, ToolsConfig
from dicomnode.convert.native import name_based_uid
from dicomnode.convert.worker import (
    PENDING_DIR,
    STAGING_DIR,
    ConversionCancelled,
    convert_file,
    convert_paths,
    marker_path,
    place_series,
)
from dicomnode.errors import ConversionError
from dicomnode.organise import FolderLevel, relative_dir, relative_path
from tests.conftest import require_tool
from tests.enhanced_factory import (
    ENHANCED_MR_COLOR,
    ROOT,
    assert_valid_classic,
    make_enhanced_mr,
    save,
)
from tests.factories import make_image

NATIVE = ToolsConfig(enhanced_mr_conversion="native")


def _store(ae_root: Path, **kwargs: object) -> Path:
    """Put a fixture where the receiver would have stored it."""
    ds = make_enhanced_mr(**kwargs)  # type: ignore[arg-type]
    return save(ds, ae_root / relative_path(ds, DEFAULT_LAYOUT))


def _dcm_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if not any(x.startswith(".") for x in p.parts))


def test_convert_file_places_series_beside_original(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    stored = _store(root)
    result = convert_file(stored, root, NATIVE, DEFAULT_LAYOUT)
    assert result.frames == 4 and result.source_uid == ROOT + "4.1"
    (folder,) = result.folders
    files = sorted(folder.iterdir())
    assert len(files) == 4
    first = dcmread(files[0])
    assert folder == root / relative_dir(first, DEFAULT_LAYOUT)
    assert folder.parent == stored.parent.parent  # same patient/study, own series folder
    assert folder != stored.parent
    assert first.SeriesInstanceUID == name_based_uid(ROOT + "2")
    assert stored.is_file()  # the original is untouched here
    assert not any((root / STAGING_DIR).iterdir())


def test_convert_file_resend_replaces_same_files(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    stored = _store(root)
    convert_file(stored, root, NATIVE, DEFAULT_LAYOUT)
    before = _dcm_files(root)
    convert_file(stored, root, NATIVE, DEFAULT_LAYOUT)
    assert _dcm_files(root) == before  # same UIDs, same names: no duplicates


def test_convert_file_outputs_validate(tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    root = tmp_path / "incoming"
    result = convert_file(_store(root, vendor=True), root, NATIVE, DEFAULT_LAYOUT)
    for path in sorted(result.folders[0].iterdir()):
        assert_valid_classic(dciodvfy, path)


def test_convert_file_cancel_leaves_nothing_visible(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    stored = _store(root)
    with pytest.raises(ConversionCancelled):
        convert_file(stored, root, NATIVE, DEFAULT_LAYOUT, cancel=lambda: True)
    assert _dcm_files(root) == [stored]
    assert not any((root / STAGING_DIR).iterdir())


def test_convert_file_unreadable_source_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(ConversionError):
        convert_file(bad, tmp_path, NATIVE, DEFAULT_LAYOUT)
    with pytest.raises(ConversionError, match="no longer exists"):
        convert_file(tmp_path / "gone.dcm", tmp_path, NATIVE, DEFAULT_LAYOUT)


def test_place_series_merges_into_existing_folder(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a.dcm").write_bytes(b"new")
    final = tmp_path / "P_1234" / "final_abcd"
    final.mkdir(parents=True)
    (final / "a.dcm").write_bytes(b"old")
    (final / "b.dcm").write_bytes(b"other")
    # The existing folders of these identities are joined whatever their descriptive names.
    plan = (FolderLevel("Q_1234", "1234"), FolderLevel("other name_abcd", "abcd"))
    assert place_series(staged, tmp_path, plan) == final
    assert (final / "a.dcm").read_bytes() == b"new"
    assert (final / "b.dcm").read_bytes() == b"other"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "P_1234",
        "staged",
    ]


def test_marker_path_is_hidden_and_stable(tmp_path: Path) -> None:
    stored = tmp_path / "P" / "S" / "x.dcm"
    marker = marker_path(stored, tmp_path)
    assert marker.parent == tmp_path / PENDING_DIR
    assert marker == marker_path(stored, tmp_path)
    assert marker != marker_path(tmp_path / "P" / "S" / "y.dcm", tmp_path)


def test_convert_paths_converts_folders_recursively(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = tmp_path / "in"
    save(make_enhanced_mr(), inputs / "a" / "enh.dcm")
    save(make_enhanced_mr(sop_uid=ROOT + "4.2", series_uid=ROOT + "2.2"), inputs / "b" / "enh2")
    save(make_image("CT"), inputs / "ct.dcm")
    (inputs / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        code = convert_paths(
            [inputs], out, ToolsConfig(enhanced_mr_conversion="off"), DEFAULT_LAYOUT
        )
    assert code == 0
    assert len(_dcm_files(out)) == 8
    assert caplog.text.count("CONVERTED sop_instance_uid=") == 2
    assert caplog.text.count("SKIPPED") == 2
    assert (inputs / "a" / "enh.dcm").is_file()  # inputs are never modified
    assert not (out / STAGING_DIR).exists()  # no hidden leftovers in an offline output


def test_convert_paths_reports_failures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = make_enhanced_mr()
    del broken.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence
    path = save(broken, tmp_path / "broken.dcm")
    color = save(make_enhanced_mr(sop_class=ENHANCED_MR_COLOR), tmp_path / "color.dcm")
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        assert convert_paths([path], tmp_path / "out", NATIVE, DEFAULT_LAYOUT) == 1
        assert convert_paths([tmp_path / "missing"], tmp_path / "out", NATIVE, DEFAULT_LAYOUT) == 1
        assert convert_paths([color], tmp_path / "out", NATIVE, DEFAULT_LAYOUT) == 0
    assert "CONVERT-FAILED" in caplog.text
    assert "stored unconverted: no classic target" in caplog.text
    assert _dcm_files(tmp_path / "out") == []
