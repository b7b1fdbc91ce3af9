"""Ledger schema, counters derivation, queries and export: pure SQLite, no threads or sockets."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest

from dicomnode.ledger import queries
from dicomnode.ledger.events import COLUMNS, EventKind, ledger_extra
from dicomnode.ledger.export import export, parse_day
from dicomnode.ledger.schema import SCHEMA_VERSION, LedgerUnavailable, open_ledger, open_reader
from dicomnode.ledger.tally import bucket_bounds, counter_increments
from dicomnode.ledger.writer import LedgerWriter, decode_elements


def _insert(conn: sqlite3.Connection, rows: list[dict[str, object]]) -> None:
    """Insert rows the way the writer does (events, studies, counters)."""
    staged: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    with conn:
        LedgerWriter._insert_rows(conn, [dict(r) for r in rows], staged)


def _stored(i: int, study: int, ts: float, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "ts": ts,
        "kind": "stored",
        "calling_ae": kw.get("ae", f"AE{study % 7}"),
        "patient_id": f"PID{study:05d}",
        "patient_name": f"Doe^Patient{study}",
        "study_uid": f"1.2.3.{study}",
        "study_date": "20261130",
        "series_uid": f"1.2.3.{study}.{i % 3}",
        "modality": "CT",
        "sop_uid": f"1.2.3.{study}.{i % 3}.{i}",
        "path": f"/data/{study}/{i}.dcm",
        "duration_ms": 3.0,
    }
    row.update({k: v for k, v in kw.items() if k != "ae"})
    return row


def test_ledger_extra_carries_kind_and_columns() -> None:
    extra = ledger_extra(EventKind.STORED, calling_ae="CT1", size=10)
    assert extra == {"ledger": {"kind": "stored", "calling_ae": "CT1", "size": 10}}
    assert set(COLUMNS) >= {"calling_ae", "sop_uid", "checksum", "destination", "duration_ms"}


def test_counter_increments_per_kind() -> None:
    stored = counter_increments({"kind": "stored", "calling_ae": "CT1", "duration_ms": 30.0})
    assert ("received_objects", (("calling_ae", "CT1"),), 1.0) in stored
    buckets = [le for name, labels, _ in stored if name.endswith("_bucket") for _, le in labels]
    assert buckets == ["0.05"]  # the smallest bound that holds 30 ms; exposed cumulative
    assert "0.05" in bucket_bounds() and bucket_bounds()[-1] == "+Inf"
    assert ("store_duration_seconds_sum", (), 0.03) in stored
    assert counter_increments({"kind": "store_refused", "status": "0xA700"}) == [
        ("store_failures", (("status", "0xA700"),), 1.0)
    ]
    assert counter_increments({"kind": "association_rejected", "status": "called_ae"}) == [
        ("rejected_associations", (("reason", "called_ae"),), 1.0)
    ]
    net = counter_increments({"kind": "retried", "destination": "T@h:1"})
    assert net == [("forward_failures", (("destination", "T@h:1"), ("kind", "network")), 1.0)]
    assert counter_increments({"kind": "association_accepted"}) == []
    summary = counter_increments({"kind": "association_rejected", "status": "x", "size": 5})
    assert summary == [("rejected_associations", (("reason", "x"),), 5.0)]  # rate-limited lines


def test_decode_elements_strips_padding_and_honours_utf8() -> None:
    elements = {
        0x00080005: (b"CS", b"ISO_IR 192"),
        0x00100010: (b"PN", "Müller^Jörg ".encode()),
        0x0020000D: (b"UI", b"1.2.3\x00"),
    }
    assert decode_elements(elements) == {"patient_name": "Müller^Jörg", "study_uid": "1.2.3"}
    latin = {0x00100010: (b"PN", "Müller".encode("latin-1"))}
    assert decode_elements(latin) == {"patient_name": "Müller"}


def test_open_ledger_creates_schema_and_reader_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "l" / "ledger.sqlite"
    conn = open_ledger(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    reader = open_reader(path)
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("DELETE FROM events")
    reader.close()
    with pytest.raises(LedgerUnavailable):
        open_reader(tmp_path / "missing.sqlite")


def test_open_ledger_moves_a_corrupt_file_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    conn = open_ledger(path)
    conn.execute("SELECT count(*) FROM events").fetchone()
    conn.close()
    aside = list(tmp_path.glob("ledger.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "LEDGER-CORRUPT" in caplog.text


def test_open_ledger_moves_aside_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    conn.close()
    open_ledger(path).close()
    assert list(tmp_path.glob("ledger.sqlite.corrupt-*"))


def test_queries_stay_fast_with_100000_events(tmp_path: Path) -> None:
    conn = open_ledger(tmp_path / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    now = time.time()
    rows = [_stored(i, i // 50, now - (100_000 - i)) for i in range(100_000)]
    _insert(conn, rows)
    sent = [
        {
            "ts": now,
            "kind": "forwarded",
            "sop_uid": r["sop_uid"],
            "study_uid": r["study_uid"],
            "destination": "PLAN@10.0.0.1:104",
            "status": "0x0000",
        }
        for r in rows[-500:]
    ]
    _insert(conn, sent)
    started = time.perf_counter()
    found = queries.search_studies(conn, patient="PID01999")
    s = queries.summary(conn, now - 7 * 86400)
    series = queries.study_series(conn, "1.2.3.1999")
    deliveries = queries.study_deliveries(conn, "1.2.3.1999")
    by_name = queries.search_studies(conn, patient="patient1234", study_date="2026-11-30")
    by_ae = queries.search_studies(conn, calling_ae="AE3", limit=20)
    elapsed = time.perf_counter() - started
    assert [r["study_uid"] for r in found] == ["1.2.3.1999"]
    assert found[0]["objects"] == 50
    assert s.received_total == 100_000 and s.forwarded == {"PLAN@10.0.0.1:104": 500}
    assert sum(r["objects"] for r in series) == 50 and len(series) == 3
    assert deliveries[0]["kind"] == "forwarded" and deliveries[0]["objects"] == 50
    assert [r["study_uid"] for r in by_name] == ["1.2.3.1234"]
    assert len(by_ae) == 20 and {r["calling_ae"] for r in by_ae} == {"AE3"}
    assert elapsed < 2.0, f"queries took {elapsed:.2f} s on 100,000 events"


def test_search_studies_escapes_like_wildcards(tmp_path: Path) -> None:
    conn = open_ledger(tmp_path / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    _insert(conn, [_stored(1, 1, 1.0, patient_id="A_1"), _stored(2, 2, 2.0, patient_id="AB1")])
    assert [r["patient_id"] for r in queries.search_studies(conn, patient="A_1")] == ["A_1"]
    assert queries.search_studies(conn, patient="%") == []


def test_recent_retries_pairs_move_back_with_delivery(tmp_path: Path) -> None:
    conn = open_ledger(tmp_path / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    _insert(
        conn,
        [
            {
                "ts": 10.0,
                "kind": "moved_back",
                "sop_uid": "1.2",
                "path": "/w/a.dcm",
                "actor": "ops",
            },
            {
                "ts": 11.0,
                "kind": "forwarded",
                "sop_uid": "1.2",
                "destination": "T@h:1",
                "status": "0x0000",
            },
            {"ts": 12.0, "kind": "moved_back", "sop_uid": "1.3", "path": "/w/b.dcm"},
        ],
    )
    retries = queries.recent_retries(conn)
    assert retries[0]["sop_uid"] == "1.3" and retries[0]["delivered"] is None
    assert retries[1]["delivered"]["destination"] == "T@h:1"
    reasons = queries.parked_reasons(conn, ["/w/a.dcm"])
    assert reasons == {}


def test_export_filters_and_formats(tmp_path: Path) -> None:
    conn = open_ledger(tmp_path / "ledger.sqlite")
    conn.row_factory = sqlite3.Row
    day = parse_day("2026-11-30")
    _insert(
        conn,
        [
            _stored(1, 1, day + 3600, ae="CT1"),
            _stored(2, 2, day + 7200, ae="MR1"),
            _stored(3, 1, day + 86400 + 60, ae="CT1"),
        ],
    )
    out = io.StringIO()
    n = export(conn, out, "json", day, parse_day("2026-11-30", end=True), "PID00001")
    records = json.loads(out.getvalue())
    assert n == 1 and records[0]["calling_ae"] == "CT1" and records[0]["time"].endswith("Z")
    out = io.StringIO()
    assert export(conn, out, "csv", calling_ae="CT1") == 2
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["patient_id"] for r in rows] == ["PID00001", "PID00001"]
    assert rows[0]["kind"] == "stored" and "sop_uid" in rows[0]
    with pytest.raises(ValueError):
        export(conn, io.StringIO(), "xml")


def test_rate_limited_refusals_keep_their_ledger_count(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from dicomnode.receiver.admission import RefusalLog

    refusals = RefusalLog(interval_s=3600)
    event = ledger_extra(
        EventKind.ASSOCIATION_REJECTED, calling_ae="X", status="untrusted_calling_ae"
    )
    with caplog.at_level(logging.WARNING, logger="dicomnode.receiver.admission"):
        for _ in range(4):
            refusals.warning(
                "10.0.0.9", "untrusted", "REJECTED association calling_ae=%s", "X", extra=event
            )
        for line in refusals._flush_locked(float("inf"), force=False):
            refusals._log_summary(*line)
    events = [r.ledger for r in caplog.records if hasattr(r, "ledger")]
    assert [e.get("size") for e in events] == [None, 3]
    assert sum(counter_increments(e)[0][2] for e in events) == 4.0
