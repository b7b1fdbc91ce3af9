"""Forwarder file-system effects: delete and prune, park with log, move back, retry state, scanning."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from dicomnode.forwarder.batching import TOPLEVEL_GROUP
from dicomnode.forwarder.outcome import (
    ParkReason,
    delete_delivered,
    move_back_failed,
    move_back_file,
    park_file,
)
from dicomnode.forwarder.state import RetryState, StateStore
from dicomnode.forwarder.watcher import scan_folder


def park(
    watch: Path, rel: str, group: str, why: ParkReason, stamp: str = "20260101-120000"
) -> Path | None:
    parts = PurePosixPath(rel).parts
    inside = PurePosixPath(*parts[1:]) if group != TOPLEVEL_GROUP else PurePosixPath(rel)
    return park_file(
        watch.joinpath(*parts),
        park_root=watch,
        group=group,
        inside=inside,
        display=rel,
        stamp=stamp,
        why=why,
        wall_time=0.0,
        prune_root=watch,
    )


def test_outcome_delete_removes_empty_folders_but_not_watch_folder(tmp_path: Path) -> None:
    f = tmp_path / "P" / "study" / "series" / "1.dcm"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    (tmp_path / "P" / "other.dcm").write_bytes(b"y")
    assert delete_delivered(f, tmp_path)
    assert not (tmp_path / "P" / "study").exists()
    assert (tmp_path / "P").is_dir()
    assert delete_delivered(tmp_path / "P" / "other.dcm", tmp_path)
    assert not (tmp_path / "P").exists()
    assert tmp_path.is_dir()


def test_outcome_park_keeps_relative_path_and_logs_status(tmp_path: Path) -> None:
    f = tmp_path / "P" / "sub" / "x.dcm"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"data")
    dest = park(tmp_path, "P/sub/x.dcm", "P", ParkReason(0xA900, "", "1.2.3"))
    assert dest == tmp_path / "failed" / "20260101-120000_P" / "sub" / "x.dcm"
    assert dest.read_bytes() == b"data"
    assert not (tmp_path / "P").exists()
    log = (tmp_path / "failed" / "send_errors.log").read_text()
    assert log.count("\n") == 1
    for part in (
        "group=P",
        "file=P/sub/x.dcm",
        "sop_instance_uid=1.2.3",
        "status=0xA900",
        "does not match",
    ):
        assert part in log


def test_outcome_park_never_overwrites(tmp_path: Path) -> None:
    for content in (b"one", b"two"):
        (tmp_path / "a.txt").write_bytes(content)
        park(tmp_path, "a.txt", TOPLEVEL_GROUP, ParkReason(None, "not a DICOM file"))
    folder = tmp_path / "failed" / "20260101-120000__toplevel"
    assert sorted(p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")) == [
        b"one",
        b"two",
    ]
    assert "status=- not a DICOM file" in (tmp_path / "failed" / "send_errors.log").read_text()


def test_outcome_move_back_restores_paths_and_skips_existing(tmp_path: Path) -> None:
    for rel, group in (("P/s/x.dcm", "P"), ("P/y.dcm", "P"), ("loose.dcm", TOPLEVEL_GROUP)):
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(rel.encode())
        park(tmp_path, rel, group, ParkReason(None, "r"))
    (tmp_path / "P").mkdir(exist_ok=True)
    (tmp_path / "P" / "y.dcm").write_bytes(b"newer")
    report = move_back_failed(tmp_path)
    assert (report.moved, report.kept) == (2, 1)
    assert (tmp_path / "P" / "s" / "x.dcm").read_bytes() == b"P/s/x.dcm"
    assert (tmp_path / "loose.dcm").read_bytes() == b"loose.dcm"
    assert (tmp_path / "P" / "y.dcm").read_bytes() == b"newer"
    assert (tmp_path / "failed" / "20260101-120000_P" / "y.dcm").read_bytes() == b"P/y.dcm"
    assert (tmp_path / "failed" / "send_errors.log").exists()


def test_outcome_destination_copy_keeps_original_and_moves_back(tmp_path: Path) -> None:
    f = tmp_path / "P" / "x.dcm"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"data")
    copies = []
    for name in ("TPS 1", "QA"):
        copy = park_file(
            f,
            park_root=tmp_path,
            group="P",
            inside=PurePosixPath("x.dcm"),
            display="P/x.dcm",
            stamp="20260101-120000",
            why=ParkReason(0x0122, "", "1.2.3"),
            wall_time=0.0,
            prune_root=tmp_path,
            destination=name,
            copy=True,
        )
        assert copy is not None
        copies.append(copy)
    assert f.read_bytes() == b"data"  # stays for the other destinations
    assert copies[0] == tmp_path / "failed" / "TPS_1" / "20260101-120000_P" / "x.dcm"
    lines = (tmp_path / "failed" / "send_errors.log").read_text().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["destination=TPS 1", "destination=QA"]
    f.unlink()
    assert move_back_file(tmp_path, copies[0]) == f
    f.unlink()
    assert move_back_failed(tmp_path).moved == 1
    assert f.read_bytes() == b"data"
    assert not (tmp_path / "failed" / "QA").exists()


def test_outcome_move_back_without_marker_uses_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "failed" / "20250101-000000_PAT 1"
    folder.mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"a")
    assert move_back_failed(tmp_path).moved == 1
    assert (tmp_path / "PAT 1" / "a.dcm").read_bytes() == b"a"


def test_state_store_round_trip_and_damage(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load("P") is None
    store.save(RetryState("P", 10.0, 3, 50.0, "refused"))
    assert StateStore(tmp_path).load("P") == RetryState("P", 10.0, 3, 50.0, "refused")
    assert list(StateStore(tmp_path).load_all()) == ["P"]
    next(store.folder.glob("*.json")).write_text("{not json")
    assert store.load("P") is None
    store.clear("P")
    assert store.load_all() == {}


def test_watcher_scan_skips_ignored_and_scans_one_group(tmp_path: Path) -> None:
    for rel in (
        "A/1.dcm",
        "A/s/2.dcm",
        "B/3.dcm",
        "l.dcm",
        "failed/x/4.dcm",
        ".state/5",
        "A/.h/6",
        "A/7.part",
    ):
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    names = sorted(e.rel_path.as_posix() for e in scan_folder(tmp_path))
    assert names == ["A/1.dcm", "A/s/2.dcm", "B/3.dcm", "l.dcm"]
    assert sorted(e.rel_path.as_posix() for e in scan_folder(tmp_path, "A")) == [
        "A/1.dcm",
        "A/s/2.dcm",
    ]
    assert [e.rel_path.as_posix() for e in scan_folder(tmp_path, TOPLEVEL_GROUP)] == ["l.dcm"]
    assert scan_folder(tmp_path, "failed") == []
