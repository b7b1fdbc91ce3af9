"""Atomic placement of received objects (storage.place_file, make_folders) on the real file system."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest

from dicomnode import storage
from dicomnode.organise import FolderLevel
from dicomnode.storage import GroupSync, fsync_dirs, fsync_paths
from tests.conftest import wait_until


def _spy_fsync_dir(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the folders place_file flushes (the real fsync still runs)."""
    calls: list[Path] = []
    real = storage.flush_folder

    def spy(path: Path) -> None:
        calls.append(path)
        real(path)

    monkeypatch.setattr(storage, "flush_folder", spy)
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


# --------------------------------------------------------------------------- folders by identity

PLAN_A = (
    FolderLevel("P1_DOE^JOHN_aaaaaaaaaaaa", "aaaaaaaaaaaa"),
    FolderLevel("20260101_Pelvis_bbbbbbbb", "bbbbbbbb"),
    FolderLevel("CT_1_Planning_cccccccc", "cccccccc"),
)
#: The same identities described by another system.
PLAN_B = (
    FolderLevel("P1_Doe^John_aaaaaaaaaaaa", "aaaaaaaaaaaa"),
    FolderLevel("NODATE_bbbbbbbb", "bbbbbbbb"),
    FolderLevel("CT_cccccccc", "cccccccc"),
)


def test_resolver_joins_folders_named_by_the_first_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed = _spy_fsync_dir(monkeypatch)
    first = storage.FolderResolver().resolve(tmp_path, PLAN_A)
    assert first == tmp_path.joinpath(*(level.name for level in PLAN_A))
    assert first.is_dir()
    # every new folder's name is flushed into its parent
    assert {tmp_path, first.parent.parent, first.parent} <= set(flushed)
    # another process (a fresh resolver), later objects with other descriptions
    assert storage.FolderResolver().resolve(tmp_path, PLAN_B) == first
    visible = [p for p in tmp_path.rglob("*") if not p.name.startswith(".")]
    assert len(visible) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLAN_A[0].name]  # no lock file


def test_store_refiles_when_a_forwarder_removed_the_emptied_folders(tmp_path: Path) -> None:
    resolver = storage.FolderResolver()
    folder = resolver.resolve(tmp_path, PLAN_A)  # remembered
    shutil.rmtree(tmp_path / PLAN_A[0].name)  # sent and emptied by a forwarder
    src = tmp_path / "obj.tmp"
    src.write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        storage.place_file(src, folder / "CT_1.dcm", create_folders=False)
    resolver.forget()
    again = resolver.resolve(tmp_path, PLAN_B)  # now a later object names it
    assert again == tmp_path.joinpath(*(level.name for level in PLAN_B))
    storage.place_file(src, again / "CT_1.dcm", create_folders=False)
    assert (again / "CT_1.dcm").read_bytes() == b"x"


def test_place_folder_renames_staged_series_or_reports_the_existing_one(tmp_path: Path) -> None:
    staged = tmp_path / ".convert-tmp" / "s"
    staged.mkdir(parents=True)
    (staged / "a.dcm").write_bytes(b"a")
    folder, moved = storage.FolderResolver().place_folder(staged, tmp_path, PLAN_A)
    assert moved and (folder / "a.dcm").is_file() and not staged.exists()
    staged.mkdir()
    folder2, moved2 = storage.FolderResolver().place_folder(staged, tmp_path, PLAN_B)
    assert (folder2, moved2) == (folder, False)


# -- GroupSync: group commit of flushes ---------------------------------------------


def test_group_sync_requests_arriving_during_a_flush_share_the_next_one() -> None:
    first_started, release_first = threading.Event(), threading.Event()
    batches: list[list[object]] = []

    def flush(items: list[object]) -> list[OSError | None]:
        batches.append(list(items))
        if len(batches) == 1:
            first_started.set()
            assert release_first.wait(30)
        return [None] * len(items)

    group = GroupSync(flush)
    leader = threading.Thread(target=group.sync, args=("a",))
    leader.start()
    assert first_started.wait(30)
    followers = [threading.Thread(target=group.sync, args=(name,)) for name in "bcd"]
    for follower in followers:
        follower.start()
    assert wait_until(lambda: len(group._queue) == 3, 30)
    release_first.set()
    for thread in [leader, *followers]:
        thread.join(30)
        assert not thread.is_alive()
    assert batches[0] == ["a"]
    assert sorted(batches[1]) == ["b", "c", "d"]  # one flush for the three, not three
    assert len(batches) == 2
    assert group.largest_batch == 3


def test_group_sync_reports_each_callers_own_error() -> None:
    def flush(items: list[object]) -> list[OSError | None]:
        return [OSError(5, "EIO") if item == "bad" else None for item in items]

    group = GroupSync(flush)
    group.sync("good")
    with pytest.raises(OSError, match="EIO"):
        group.sync("bad")


def test_fsync_paths_flushes_every_file_of_a_batch(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}" for i in range(3)]
    for path in paths:
        path.write_bytes(b"x")
    assert fsync_paths(paths) == [None, None, None]
    assert fsync_paths(paths[:1]) == [None]
    errors = fsync_paths([tmp_path / "gone"])
    assert isinstance(errors[0], FileNotFoundError)


def test_folder_flush_skips_what_cannot_be_flushed_and_reports_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /proc cannot flush folders (EINVAL) and a removed folder has nothing to flush:
    # neither stops a store. A real flush error must (the new names may be lost).
    storage.flush_folder(Path("/proc"))
    assert fsync_dirs([Path("/proc"), tmp_path / "gone", tmp_path]) == [None, None, None]
    real = os.fsync

    def failing(fd: int) -> None:  # no device here fails on demand: inject the disk's answer
        if os.path.samefile(f"/proc/self/fd/{fd}", tmp_path):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output"):
        storage.flush_folder(tmp_path)
    errors = fsync_dirs([tmp_path, Path("/proc"), tmp_path])
    assert [type(e) for e in errors] == [OSError, type(None), OSError]
    storage.fsync_dir(tmp_path)  # the best-effort variant still never raises
    src = tmp_path / "obj.tmp"
    src.write_bytes(b"data")
    with pytest.raises(OSError, match="Input/output"):
        storage.place_file(src, tmp_path / "CT_1.dcm")


def test_group_sync_many_threads_all_return_and_every_item_is_flushed_once() -> None:
    flushed: list[object] = []

    def flush(items: list[object]) -> list[OSError | None]:
        flushed.extend(items)
        return [None] * len(items)

    group = GroupSync(flush)
    threads = [
        threading.Thread(target=lambda n=n: [group.sync((n, i)) for i in range(200)])
        for n in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert sorted(flushed) == sorted((n, i) for n in range(6) for i in range(200))  # type: ignore[type-var]


# --------------------------------------------------------------------------- disk guard


def _counting_free_space(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every real measurement the disk guard makes."""
    measured: list[Path] = []
    real = storage.free_space_mb

    def counting(path: Path) -> float:
        measured.append(path)
        return real(path)

    monkeypatch.setattr(storage, "free_space_mb", counting)
    return measured


def test_disk_guard_off_never_measures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured = _counting_free_space(monkeypatch)
    guard = storage.DiskGuard(0)
    assert guard.shortfall(tmp_path) is None
    assert measured == []


def test_disk_guard_below_reports_the_free_space_at_every_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = _counting_free_space(monkeypatch)
    guard = storage.DiskGuard(10**12)  # more than any volume here
    first = guard.shortfall(tmp_path)
    second = guard.shortfall(tmp_path)
    assert first is not None and second is not None
    assert abs(first - shutil.disk_usage(tmp_path).free / 1e6) < 1000
    assert len(measured) == 2  # a refusal is never decided from an old measurement


def test_disk_guard_reuses_a_measurement_far_above_it_briefly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = shutil.disk_usage(tmp_path).free / 1e6
    if free < 2 * storage._GUARD_MARGIN_MB:
        pytest.skip(f"the test volume has only {free:.0f} MB free")
    measured = _counting_free_space(monkeypatch)
    guard = storage.DiskGuard(1)
    for _ in range(20):
        assert guard.shortfall(tmp_path) is None
    # One measurement, and one more per 50 ms the machine stalled between the checks.
    assert 1 <= len(measured) <= 10, len(measured)
    other = tmp_path / "other"
    other.mkdir()
    assert guard.shortfall(other) is None  # another path is measured on its own
    assert measured[-1] == other


def test_disk_guard_measures_every_time_near_the_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = _counting_free_space(monkeypatch)
    free = shutil.disk_usage(tmp_path).free / 1e6
    guard = storage.DiskGuard(max(1.0, free - storage._GUARD_MARGIN_MB / 2))
    for _ in range(3):
        guard.shortfall(tmp_path)
    assert len(measured) == 3
