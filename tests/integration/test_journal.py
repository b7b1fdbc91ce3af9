"""The receive journal on real files: what a killed process leaves is recovered, nothing more.

A child process commits records and places files the way the receiver does, then
kills itself with SIGKILL before the checkpoint; the test then damages the placed
files as a power loss would (missing, empty, half written) and reopens the journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomnode.errors import StorageError
from dicomnode.receiver.journal import (
    SUPPORTED,
    Journal,
    JournalInUse,
    journal_path,
    recover_journals,
)
from tests.conftest import free_port, wait_for_port, wait_until, write_config

StartNode = Callable[..., Any]

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="the receive journal needs fdatasync")

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from dicomnode.receiver.journal import Journal

    path, out, count, size, capacity = sys.argv[1:6]
    journal, _ = Journal.open(Path(path), int(capacity))
    for i in range(int(count)):
        final = Path(out) / f"obj{i}.dcm"
        tmp = Path(out) / f".tmp{i}"
        data = bytes([i % 251]) * int(size) + f"#{i}".encode()
        tmp.write_bytes(data)
        entry = journal.commit(final, data)
        os.replace(tmp, final)
        journal.placed(entry)
    print(journal.checkpoints, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _data(i: int, size: int) -> bytes:
    return bytes([i % 251]) * size + f"#{i}".encode()


def _killed_writer(
    tmp_path: Path,
    count: int,
    size: int,
    capacity: int = 1 << 20,
    out: Path | None = None,
    dest: Path | None = None,
) -> Path:
    """Run the child; return the journal it left (it was killed after placing ``count`` files)."""
    out = out or tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = journal_path(dest or tmp_path / "dest", "w0-")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(out), str(count), str(size), str(capacity)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr
    return path


def test_objects_lost_or_torn_after_a_kill_are_written_again_from_the_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _killed_writer(tmp_path, 6, 3000)
    out = tmp_path / "out"
    (out / "obj0.dcm").unlink()  # the rename never reached the disk
    (out / "obj1.dcm").write_bytes(b"")  # the name did, the data did not
    (out / "obj2.dcm").write_bytes(_data(2, 3000)[:1000])  # half of it did
    caplog.set_level(logging.INFO, logger="dicomnode")
    journal, recovery = Journal.open(path, 1 << 20)
    journal.close()
    assert (recovery.replayed, recovery.intact, recovery.failed) == (3, 3, 0)
    for i in range(6):
        assert (out / f"obj{i}.dcm").read_bytes() == _data(i, 3000)
    assert sum("JOURNAL-REPLAYED" in r.getMessage() for r in caplog.records) == 3
    assert any("JOURNAL-RECOVERED" in r.getMessage() for r in caplog.records)
    assert not list(out.glob(".*.part"))
    # Recovered once: a second start finds a clean journal and touches nothing.
    (out / "obj3.dcm").unlink()
    journal, recovery = Journal.open(path, 1 << 20)
    journal.close()
    assert recovery.replayed == 0 and not (out / "obj3.dcm").exists()


def test_a_torn_record_is_ignored_and_the_others_still_recovered(tmp_path: Path) -> None:
    path = _killed_writer(tmp_path, 4, 5000)
    out = tmp_path / "out"
    raw = bytearray(path.read_bytes())
    marker = raw.find(b"#3")  # the last record's data: its flush never completed
    assert marker > 0
    raw[marker - 100 : marker] = b"\0" * 100
    path.write_bytes(bytes(raw))
    for i in range(4):
        (out / f"obj{i}.dcm").unlink()
    journal, recovery = Journal.open(path, 1 << 20)
    journal.close()
    assert recovery.replayed == 3
    assert sorted(p.name for p in out.glob("*.dcm")) == ["obj0.dcm", "obj1.dcm", "obj2.dcm"]
    assert (out / "obj2.dcm").read_bytes() == _data(2, 5000)


def test_records_retired_by_a_checkpoint_are_not_replayed(tmp_path: Path) -> None:
    """A placed file made durable and then forwarded (deleted) must not come back."""
    path = journal_path(tmp_path / "dest", "")
    journal, _ = Journal.open(path, 1 << 20)
    final = tmp_path / "a.dcm"
    tmp = tmp_path / ".a.tmp"
    tmp.write_bytes(b"x" * 100)
    entry = journal.commit(final, tmp.read_bytes())
    os.replace(tmp, final)
    journal.placed(entry)
    assert wait_until(lambda: journal.checkpoints >= 1, 30)
    final.unlink()  # forwarded and deleted
    os.close(journal._fd)  # a crash: no clean close
    journal._fd = -1
    journal, recovery = Journal.open(path, 1 << 20)
    journal.close()
    assert recovery.replayed == 0 and not final.exists()


def test_a_small_journal_wraps_around_and_keeps_every_object(tmp_path: Path) -> None:
    # 40 objects of ~3 KB through a journal of 24 KB (five records at most): it must
    # wait for checkpoints to free space, never overwrite an unretired record.
    path = _killed_writer(tmp_path, 40, 3000, capacity=24 * 1024)
    out = tmp_path / "out"
    for p in out.glob("*.dcm"):
        p.write_bytes(b"")  # as if no placed file had reached the disk
    journal, recovery = Journal.open(path, 24 * 1024)
    journal.close()
    assert recovery.replayed >= 1
    # Every object not retired before the kill is whole again; retired ones were durable.
    replayed = [i for i in range(40) if (out / f"obj{i}.dcm").stat().st_size]
    assert replayed == list(range(40 - len(replayed), 40))
    for i in replayed:
        assert (out / f"obj{i}.dcm").read_bytes() == _data(i, 3000)


def test_objects_too_large_for_the_journal_are_left_to_fsync(tmp_path: Path) -> None:
    journal, _ = Journal.open(journal_path(tmp_path, ""), 64 * 1024)
    try:
        assert journal.fits(12 * 1024)
        assert not journal.fits(64 * 1024)
    finally:
        journal.close()


def test_start_recovers_every_journal_and_drops_the_unused(tmp_path: Path) -> None:
    path = _killed_writer(tmp_path, 2, 100)
    (tmp_path / "out" / "obj1.dcm").unlink()
    recovery = recover_journals(tmp_path / "dest", keep=[])
    assert recovery.replayed == 1 and (tmp_path / "out" / "obj1.dcm").exists()
    assert not path.exists()


def test_a_replay_that_cannot_write_keeps_the_journal_and_stops_the_start(tmp_path: Path) -> None:
    path = _killed_writer(tmp_path, 3, 100)
    out = tmp_path / "out"
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    out.write_bytes(b"a file where the folder was")  # the objects cannot be written
    with pytest.raises(StorageError, match="could not be written"):
        recover_journals(tmp_path / "dest", keep=[])
    assert path.exists()  # kept, though not in ``keep``: it still holds them
    out.unlink()  # the operator fixes the cause: the next start places them all
    assert recover_journals(tmp_path / "dest", keep=["w0-receive.journal"]).replayed == 3
    assert sorted(p.name for p in out.iterdir()) == ["obj0.dcm", "obj1.dcm", "obj2.dcm"]


def test_the_node_places_what_a_killed_node_left_in_its_journal_before_it_listens(
    tmp_path: Path, start_node: StartNode
) -> None:
    dest = tmp_path / "dest"
    series = dest / "incoming" / "P1" / "S1" / "SE1"
    _killed_writer(tmp_path, 4, 2000, out=series, dest=dest)
    for p in series.iterdir():
        p.write_bytes(b"")  # a power loss: names on disk, data not
    port = free_port()
    cfg = write_config(
        tmp_path / "c.ini",
        {
            "Network": {"receive_port": port, "receiver_processes": 2},
            "Directories": {"destination_dir": dest, "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "*"},
        },
    )
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    wait_for_port(port)
    for i in range(4):
        assert (series / f"obj{i}.dcm").read_bytes() == _data(i, 2000)
    assert wait_until(lambda: "LISTENING" in node.output(), 60), node.output()
    out = node.output()
    assert out.count("JOURNAL-REPLAYED") == 4, out
    assert out.index("JOURNAL-RECOVERED") < out.index("LISTENING"), out


def test_a_journal_in_use_is_neither_opened_nor_recovered_by_another_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second node on the same destination must not reset a live node's journal."""
    path = journal_path(tmp_path / "dest", "w0-")
    journal, _ = Journal.open(path, 1 << 20)
    final, tmp = tmp_path / "a.dcm", tmp_path / ".a.tmp"
    tmp.write_bytes(b"y" * 100)
    entry = journal.commit(final, tmp.read_bytes())
    try:
        with pytest.raises(JournalInUse):
            Journal.open(path, 1 << 20)
        caplog.set_level(logging.WARNING, logger="dicomnode")
        assert recover_journals(tmp_path / "dest", keep=[]).replayed == 0
        assert path.exists()
        assert any("JOURNAL-IN-USE" in r.getMessage() for r in caplog.records)
    finally:
        os.replace(tmp, final)
        journal.placed(entry)
        journal.close()
    # Closed cleanly: now anyone may open it, and there is nothing to replay.
    again, recovery = Journal.open(path, 1 << 20)
    again.close()
    assert recovery.replayed == 0 and recovery.intact == 0


_CHILD_THREADS = textwrap.dedent(
    """
    import os, signal, sys, threading
    from pathlib import Path
    from dicomnode.receiver.journal import Journal

    path, out, threads, each, size = sys.argv[1:6]
    journal, _ = Journal.open(Path(path), 16 << 20)

    def commit(t):
        for k in range(int(each)):
            i = t * int(each) + k
            journal.commit(Path(out) / f"obj{i}.dcm", bytes([i % 251]) * int(size) + f"#{i}".encode())

    workers = [threading.Thread(target=commit, args=(t,)) for t in range(int(threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_records_committed_at_once_across_the_zeroed_blocks_all_survive_a_kill(
    tmp_path: Path,
) -> None:
    """Four threads commit 4 MB of records; the zeros written ahead never touch one of them.

    No record is placed (so none is retired): after the kill every object must be
    replayed from its record, whole.
    """
    out = tmp_path / "out"
    out.mkdir()
    path = journal_path(tmp_path / "dest", "w0-")
    threads, each, size = 4, 100, 10_000
    done = subprocess.run(
        [sys.executable, "-c", _CHILD_THREADS, str(path), str(out), "4", "100", str(size)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr
    journal, recovery = Journal.open(path, 16 << 20)
    journal.close()
    assert (recovery.replayed, recovery.failed) == (threads * each, 0)
    for i in range(threads * each):
        assert (out / f"obj{i}.dcm").read_bytes() == _data(i, size), i


def _unwritten_blocks(path: Path) -> set[int] | None:
    """Return the file's logical blocks in unwritten extents (filefrag), or None if unknown."""
    listing = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True)
    if listing.returncode != 0:
        return None
    blocks: set[int] = set()
    for line in listing.stdout.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not fields[0].strip().isdigit():
            continue
        first, last = (int(v) for v in fields[1].replace(" ", "").split(".."))
        if "unwritten" in line:
            blocks.update(range(first, last + 1))
    return blocks


@contextlib.contextmanager
def _fresh_journal(
    tmp_path: Path, capacity: int, probe_block: int
) -> Iterator[tuple[Path, Journal]]:
    """Open a new journal where the file system reports allocated, unwritten blocks (else skip)."""
    if shutil.which("filefrag") is None:
        pytest.skip("filefrag (e2fsprogs) not installed")
    path = journal_path(tmp_path, "")
    journal, _ = Journal.open(path, capacity)
    try:
        if probe_block not in (_unwritten_blocks(path) or set()):
            pytest.skip("this file system does not report allocated, unwritten blocks")
        yield path, journal
    finally:
        journal.close()


def test_the_blocks_ahead_of_the_first_records_are_written_with_them(tmp_path: Path) -> None:
    """A fresh journal's allocated blocks ahead of the records are written at the first flush.

    Records landing on blocks that were only allocated would each make their flush
    convert those blocks too (a metadata write); after the first small record the
    next mebibyte must already be written blocks.
    """
    with _fresh_journal(tmp_path, 8 << 20, 200) as (path, journal):
        journal.commit(tmp_path / "a.dcm", b"x" * 3000)
        after = _unwritten_blocks(path)
        assert after is not None
        assert not after & set(range(1, 256)), sorted(after)[:5]
        assert 2000 in after  # only ahead, not the whole file


def test_the_next_zeroed_stretch_is_written_while_half_a_mebibyte_is_still_ahead(
    tmp_path: Path,
) -> None:
    """Blocks are zeroed (and written) well before records reach them.

    Zeroing only when a record would run past the zeroed blocks made that
    record's flush write the whole next mebibyte (a ~3 ms flush every ~100
    small records); the next stretch now goes out while half of one is ahead.
    """
    with _fresh_journal(tmp_path, 8 << 20, 400) as (path, journal):
        written = 0
        while written < 600 * 1024:  # past half of the first mebibyte
            journal.commit(tmp_path / f"{written}.dcm", _data(written, 9000))
            written += 9000
        after = _unwritten_blocks(path)
        assert after is not None
        # 4 KiB blocks: the records end near block 150; blocks to ~1.5 MiB are written.
        assert not after & set(range(1, 380)), sorted(after)[:5]
        assert 1500 in after  # still only ahead, not the whole file


def test_a_reopened_journal_is_zeroed_only_where_it_was_never_written(tmp_path: Path) -> None:
    """After a restart the blocks written in the journal's earlier life are not zeroed again.

    A journal that has wrapped once is written through: zeroing it again after
    every start would only rewrite 64 MB and slow the first records' flushes.
    """
    with _fresh_journal(tmp_path, 4 << 20, 600) as (path, journal):
        assert journal._zeroed_to == 4096  # a new journal: zeroed ahead from the start
        for i in range(30):  # ~360 KB: the first stretch of zeros only
            journal.placed(journal.commit(tmp_path / f"a{i}.dcm", _data(i, 9000)))
    journal, _ = Journal.open(path, 4 << 20)
    try:
        first = journal._zeroed_to
        assert 360 * 1024 < first < 4 << 20, first  # from where nothing was written yet
        assert first // 4096 in (_unwritten_blocks(path) or set())
        assert first // 4096 - 1 not in (_unwritten_blocks(path) or set())
        for i in range(400):  # ~4.8 MB: wraps around the 4 MiB journal
            journal.placed(journal.commit(tmp_path / f"b{i}.dcm", _data(i, 9000)))
    finally:
        journal.close()
    journal, _ = Journal.open(path, 4 << 20)
    try:
        assert journal._zeroed_to == 4 << 20  # written through: nothing to zero
        assert not (_unwritten_blocks(path) or set()) & set(range(1, 1000))
    finally:
        journal.close()
