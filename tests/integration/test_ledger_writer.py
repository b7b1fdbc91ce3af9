"""The ledger writer thread: batching, checksums, counters across restarts, reconciliation, corruption."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.ledger.handler import LedgerHandler
from dicomnode.ledger.writer import LedgerWriter
from tests.factories import make_image, save


@pytest.fixture
def writers() -> list[LedgerWriter]:
    started: list[LedgerWriter] = []
    yield started  # type: ignore[misc]
    for w in started:
        w.stop()


def _start(writers: list[LedgerWriter], path: Path, **kw: object) -> LedgerWriter:
    w = LedgerWriter(path, **kw)  # type: ignore[arg-type]
    w.start()
    writers.append(w)
    assert w.reconciled.wait(30)
    return w


def _rows(path: Path, sql: str = "SELECT * FROM events ORDER BY id") -> list[sqlite3.Row]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def test_events_from_log_records_are_written_with_header_and_checksum(
    tmp_path: Path, writers: list[LedgerWriter]
) -> None:
    obj = save(make_image("CT", patient_id="PID7", study_uid="1.2.3.4"), tmp_path / "in" / "a.dcm")
    writer = _start(writers, tmp_path / "ledger.sqlite")
    handler = LedgerHandler(writer)
    log = logging.getLogger("dicomnode.test.ledger")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        elements = {
            0x00100020: (b"LO", b"PID7"),
            0x0020000D: (b"UI", b"1.2.3.4\x00"),
            0x00080060: (b"CS", b"CT"),
        }
        log.info(
            "STORED x",
            extra=ledger_extra(
                EventKind.STORED,
                calling_ae="CT1",
                sop_uid="1.2.3.4.5",
                path=str(obj),
                size=obj.stat().st_size,
                duration_ms=12.0,
                elements=elements,
            ),
        )
        log.info(
            "SENT y",
            extra=ledger_extra(EventKind.FORWARDED, sop_uid="1.2.3.4.5", destination="T@h:1"),
        )
        log.info(  # the forwarder names study and series itself (RT completeness asks by them)
            "SENT z",
            extra=ledger_extra(
                EventKind.FORWARDED,
                sop_uid="1.2.3.4.5",
                study_uid="1.2.3.4",
                series_uid="1.2.3.4.9",
                destination="U@h:1",
            ),
        )
        log.info("an ordinary line without an event")
        assert writer.flush(30)
    finally:
        log.removeHandler(handler)
    rows = _rows(tmp_path / "ledger.sqlite")
    assert [r["kind"] for r in rows] == ["stored", "forwarded", "forwarded"]
    stored, sent, named = rows
    assert named["patient_id"] == "PID7" and named["series_uid"] == "1.2.3.4.9"  # still completed
    assert stored["patient_id"] == "PID7" and stored["study_uid"] == "1.2.3.4"
    assert stored["checksum"] == hashlib.sha256(obj.read_bytes()).hexdigest()
    assert sent["study_uid"] == "1.2.3.4" and sent["patient_id"] == "PID7"  # looked up by SOP UID
    counters = writer.counters()
    assert counters[("received_objects", (("calling_ae", "CT1"),))] == 1.0
    assert counters[("forwarded_objects", (("destination", "T@h:1"),))] == 1.0
    assert counters[("forwarded_objects", (("destination", "U@h:1"),))] == 1.0


def test_counters_survive_restart_and_retention(
    tmp_path: Path, writers: list[LedgerWriter]
) -> None:
    path = tmp_path / "ledger.sqlite"
    writer = _start(writers, path)
    for _ in range(3):
        writer.submit({"kind": "stored", "calling_ae": "MR1", "duration_ms": 1.0}, ts=1.0)  # 1970
    assert writer.flush(30)
    writer.stop()
    again = _start(writers, path, retention_days=30)
    assert again.counters()[("received_objects", (("calling_ae", "MR1"),))] == 3.0
    assert _rows(path) == []  # the old events are gone, the counters are not


def test_reconcile_records_unknown_objects_once(
    tmp_path: Path, writers: list[LedgerWriter], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.ledger.writer")
    root = tmp_path / "incoming"
    known = save(make_image("CT", patient_id="K"), root / "p" / "known.dcm")
    unknown = save(make_image("MR", patient_id="U"), root / "p" / "unknown.dcm")
    (root / "notes.txt").write_text("not dicom")
    save(make_image("CT"), root / ".hidden" / "x.dcm")
    save(make_image("CT"), tmp_path / "errors" / "bad.dcm")
    path = tmp_path / "ledger.sqlite"
    first = _start(writers, path)
    first.submit({"kind": "stored", "path": str(known), "sop_uid": "1"})
    assert first.flush(30)
    first.stop()
    _start(
        writers, path, reconcile_roots=[root, tmp_path / "errors"], skip_dirs=[tmp_path / "errors"]
    )
    recovered = _rows(path, "SELECT * FROM events WHERE kind = 'recovered'")
    assert [r["path"] for r in recovered] == [str(unknown)]
    assert recovered[0]["patient_id"] == "U" and recovered[0]["modality"] == "MR"
    assert recovered[0]["checksum"] == hashlib.sha256(unknown.read_bytes()).hexdigest()
    # The count is of objects recorded; the text file beside them is not one.
    lines = [r.getMessage() for r in caplog.records if "LEDGER-RECOVERED" in r.getMessage()]
    assert lines == [
        "LEDGER-RECOVERED 1 object(s) found on disk but not in the ledger "
        "(1 other file(s) not DICOM, not recorded)"
    ]
    writers[-1].stop()
    _start(writers, path, reconcile_roots=[root])
    assert len(_rows(path, "SELECT * FROM events WHERE kind = 'recovered'")) == 1


def test_ledger_corrupted_while_running_is_replaced(
    tmp_path: Path, writers: list[LedgerWriter], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.sqlite"
    writer = _start(writers, path)
    writer.submit({"kind": "stored", "calling_ae": "A"})
    assert writer.flush(30)
    writer.stop()
    path.write_bytes(b"\x00garbage" * 4096)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    again = _start(writers, path)
    again.submit({"kind": "stored", "calling_ae": "B"})
    assert again.flush(30) and again.available
    assert [r["calling_ae"] for r in _rows(path)] == ["B"]
    assert "LEDGER-CORRUPT" in caplog.text
    assert list(tmp_path.glob("ledger.sqlite.corrupt-*"))


def test_unwritable_ledger_never_blocks_submit(tmp_path: Path, writers: list[LedgerWriter]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    writer = _start(writers, blocker / "ledger.sqlite")  # a folder that cannot exist
    assert not writer.available
    for _ in range(1000):
        writer.submit({"kind": "stored"})
    assert writer.flush(30)


def _switches(native_id: int) -> int:
    """Return how often the thread ``native_id`` of this process has slept (Linux)."""
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux thread counters")
def test_writer_wakes_once_per_batch_not_once_per_event(
    tmp_path: Path, writers: list[LedgerWriter]
) -> None:
    """Events arriving one by one (a receiver storing objects) do not each wake the writer.

    Every wake-up of the writer thread takes the interpreter from the receiving
    threads of the same process; it used to wait on the queue once per event
    while gathering a batch.
    """
    writer = _start(writers, tmp_path / "ledger.sqlite")
    thread = writer._thread
    assert thread is not None and thread.native_id is not None
    writer.submit({"kind": "stored", "calling_ae": "FIRST"})
    assert writer.flush(30)
    before = _switches(thread.native_id)
    paced = threading.Event()
    for i in range(300):  # ~0.3 s of one event per millisecond
        writer.submit({"kind": "stored", "calling_ae": "A", "sop_uid": f"1.2.{i}"})
        paced.wait(0.001)
    woke = _switches(thread.native_id) - before
    assert writer.flush(30)
    assert len(_rows(tmp_path / "ledger.sqlite")) == 301
    assert woke < 100, f"the writer woke {woke} times for 300 events"
