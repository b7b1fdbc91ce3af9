"""Atomic placement of received objects (storage.place_file, make_folders) on the real file system."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode import storage


def _spy_fsync_dir(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the folders place_file flushes (the real fsync still runs)."""
    calls: list[Path] = []
    real = storage.fsync_dir

    def spy(path: Path) -> None:
        calls.append(path)
        real(path)

    monkeypatch.setattr(storage, "fsync_dir", spy)
    return calls


def test_place_file_creates_folders_and_flushes_every_new_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed = _spy_fsync_dir(monkeypatch)
    (tmp_path / "incoming").mkdir()
    src = tmp_path / "obj.tmp"
    src.write_bytes(b"data")
    final = tmp_path / "incoming" / "PAT" / "STUDY" / "SERIES" / "CT_1.dcm"
    storage.place_file(src, final)
    assert final.read_bytes() == b"data" and not src.exists()
    # The file's folder, and the folder holding each newly created folder's name.
    assert flushed[0] == final.parent
    assert set(flushed[1:]) == {
        tmp_path / "incoming",
        tmp_path / "incoming" / "PAT",
        tmp_path / "incoming" / "PAT" / "STUDY",
    }


def test_place_file_into_existing_folder_flushes_only_that_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    flushed = _spy_fsync_dir(monkeypatch)
    src = tmp_path / "obj.tmp"
    src.write_bytes(b"new")
    (folder / "x.dcm").write_bytes(b"old")
    storage.place_file(src, folder / "x.dcm")  # a re-sent instance replaces the file
    assert (folder / "x.dcm").read_bytes() == b"new"
    assert flushed == [folder]


def test_make_folders_reports_what_it_created_outermost_first(tmp_path: Path) -> None:
    target = tmp_path / "x" / "y" / "z"
    assert storage.make_folders(target) == [tmp_path / "x", target.parent, target]
    assert target.is_dir()
    assert storage.make_folders(target) == []


def test_make_folders_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"not a folder")
    with pytest.raises(OSError):
        storage.make_folders(tmp_path / "x" / "y")
