"""Read the ledger: dashboard sums, study search and detail, parked reasons, audit export.

Every query is bounded (``LIMIT``) and served by an index of :mod:`.schema`, so
pages stay fast with hundreds of thousands of events. Connections come from
:func:`~dicomnode.ledger.schema.open_reader` (rows as :class:`sqlite3.Row`).
Imports only the standard library.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dicomnode.ledger.events import COLUMNS, EventKind
from dicomnode.ledger.schema import LedgerUnavailable, open_reader

#: Columns of an exported event, in order.
EXPORT_COLUMNS: Final = ("id", "ts", "kind", *COLUMNS)


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts of one period for the dashboard and ``dicomnode status``."""

    received: dict[str, int]
    forwarded: dict[str, int]
    failed: dict[str, int]

    @property
    def received_total(self) -> int:
        """All objects received in the period."""
        return sum(self.received.values())

    @property
    def forwarded_total(self) -> int:
        """All objects forwarded in the period."""
        return sum(self.forwarded.values())

    @property
    def failed_total(self) -> int:
        """All refusals and parkings in the period."""
        return sum(self.failed.values())


def summary(conn: sqlite3.Connection, since_ts: float) -> Summary:
    """Return objects received per calling AE, forwarded per destination and failures per kind."""

    def grouped(kind: str, column: str) -> dict[str, int]:
        rows = conn.execute(
            f"SELECT {column} AS k, count(*) AS n FROM events WHERE kind = ? AND ts >= ? "
            f"GROUP BY {column} ORDER BY n DESC LIMIT 100",
            (kind, since_ts),
        )
        return {str(r[0] or "-"): int(r[1]) for r in rows}

    failed: dict[str, int] = {}
    for kind, label in (
        ("store_refused", "store refused"),
        ("forward_refused", "refused by target"),
        ("parked", "parked"),
        ("association_rejected", "associations rejected"),
    ):
        n = conn.execute(
            "SELECT count(*) FROM events WHERE kind = ? AND ts >= ?", (kind, since_ts)
        ).fetchone()[0]
        if n:
            failed[label] = int(n)
    return Summary(grouped("stored", "calling_ae"), grouped("forwarded", "destination"), failed)


def search_studies(
    conn: sqlite3.Connection,
    patient: str = "",
    study_date: str = "",
    calling_ae: str = "",
    limit: int = 50,
) -> list[sqlite3.Row]:
    """Return studies (newest first) whose patient ID or name contains ``patient``.

    ``study_date`` matches ``YYYYMMDD`` (dashes ignored) or a prefix (``202611``);
    ``calling_ae`` matches exactly.
    """
    where: list[str] = []
    args: list[Any] = []
    if patient:
        where.append("(patient_id LIKE ? ESCAPE '\\' OR patient_name LIKE ? ESCAPE '\\')")
        like = "%" + patient.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        args += [like, like]
    if study_date:
        where.append("study_date LIKE ?")
        args.append(study_date.replace("-", "").strip() + "%")
    if calling_ae:
        where.append("calling_ae = ?")
        args.append(calling_ae)
    sql = "SELECT * FROM studies"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY last_ts DESC LIMIT ?"
    args.append(limit)
    return list(conn.execute(sql, args))


def study(conn: sqlite3.Connection, study_uid: str) -> sqlite3.Row | None:
    """Return the study summary row of ``study_uid``."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM studies WHERE study_uid = ?", (study_uid,)
    ).fetchone()
    return row


def study_series(conn: sqlite3.Connection, study_uid: str) -> list[sqlite3.Row]:
    """Return per series: modality, objects, where filed (one path), first and last time."""
    return list(
        conn.execute(
            "SELECT series_uid, max(modality) AS modality, count(DISTINCT sop_uid) AS objects, "
            "max(path) AS path, min(ts) AS first_ts, max(ts) AS last_ts "
            "FROM events WHERE study_uid = ? AND kind IN ('stored', 'recovered') "
            "GROUP BY series_uid ORDER BY first_ts LIMIT 500",
            (study_uid,),
        )
    )


def study_deliveries(conn: sqlite3.Connection, study_uid: str) -> list[sqlite3.Row]:
    """Return per outcome and destination: objects, status, last time (forwarded, refused, parked...)."""
    return list(
        conn.execute(
            "SELECT kind, destination, status, count(DISTINCT sop_uid) AS objects, max(ts) AS last_ts "
            "FROM events WHERE study_uid = ? AND kind IN "
            "('forwarded', 'forward_refused', 'parked', 'moved_back', 'deleted', 'converted') "
            "GROUP BY kind, destination, status ORDER BY last_ts DESC LIMIT 200",
            (study_uid,),
        )
    )


def parked_reasons(conn: sqlite3.Connection, paths: Sequence[str]) -> dict[str, sqlite3.Row]:
    """Return the latest ``parked`` event per path, for the paths given."""
    out: dict[str, sqlite3.Row] = {}
    for start in range(0, len(paths), 500):
        chunk = list(paths[start : start + 500])
        marks = ", ".join("?" * len(chunk))
        for row in conn.execute(
            f"SELECT * FROM events WHERE kind = 'parked' AND path IN ({marks}) ORDER BY ts",
            chunk,
        ):
            out[row["path"]] = row
    return out


def recent_retries(conn: sqlite3.Connection, limit: int = 20) -> list[dict[str, Any]]:
    """Return recent ``moved_back`` events, each with its later delivery (if any)."""
    out: list[dict[str, Any]] = []
    for row in conn.execute(
        "SELECT * FROM events WHERE kind = 'moved_back' ORDER BY ts DESC LIMIT ?", (limit,)
    ):
        item = dict(row)
        item["delivered"] = None
        if row["sop_uid"]:
            sent = conn.execute(
                "SELECT * FROM events WHERE sop_uid = ? AND kind IN ('forwarded', 'forward_refused', "
                "'parked') AND ts >= ? ORDER BY ts LIMIT 1",
                (row["sop_uid"], row["ts"]),
            ).fetchone()
            item["delivered"] = dict(sent) if sent is not None else None
        out.append(item)
    return out


def events(
    conn: sqlite3.Connection,
    since_ts: float | None = None,
    until_ts: float | None = None,
    patient_id: str = "",
    calling_ae: str = "",
    kinds: Sequence[str] = (),
    limit: int = 0,
) -> list[sqlite3.Row]:
    """Return events in time order, filtered by period, patient ID, calling AE and kinds."""
    where: list[str] = []
    args: list[Any] = []
    if since_ts is not None:
        where.append("ts >= ?")
        args.append(since_ts)
    if until_ts is not None:
        where.append("ts < ?")
        args.append(until_ts)
    if patient_id:
        where.append("patient_id = ?")
        args.append(patient_id)
    if calling_ae:
        where.append("calling_ae = ?")
        args.append(calling_ae)
    if kinds:
        where.append(f"kind IN ({', '.join('?' * len(kinds))})")
        args += list(kinds)
    sql = f"SELECT {', '.join(EXPORT_COLUMNS)} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts, id"
    if limit:
        sql += " LIMIT ?"
        args.append(limit)
    return list(conn.execute(sql, args))


def stored_counters(conn: sqlite3.Connection) -> dict[tuple[str, str], float]:
    """Return the persisted counters as ``(name, labels text) -> value``."""
    return {
        (r[0], r[1]): float(r[2]) for r in conn.execute("SELECT name, labels, value FROM counters")
    }


#: Most SOP Instance UIDs one delivery question names (bounded cost: one indexed probe each).
MAX_DELIVERY_UIDS: Final = 64


def delivered_sql(count: int) -> str:
    """Return the query of :func:`was_delivered` for ``count`` UIDs (probes ``events_sop``)."""
    marks = ", ".join("?" * count)
    # ``+kind``: probe by SOP UID (events_sop), never scan every forwarded event
    return (
        f"SELECT 1 FROM events WHERE sop_uid IN ({marks}) AND +kind = ? AND +destination = ? "
        "LIMIT 1"
    )


def was_delivered(conn: sqlite3.Connection, destination: str, sop_uids: Sequence[str]) -> bool:
    """Return True when ``destination`` acknowledged any of ``sop_uids`` (a ``forwarded`` event).

    Served by the ``events_sop`` index; at most :data:`MAX_DELIVERY_UIDS` UIDs are asked.
    """
    uids = list(dict.fromkeys(u for u in sop_uids if u))[:MAX_DELIVERY_UIDS]
    if not uids:
        return False
    row = conn.execute(
        delivered_sql(len(uids)), (*uids, EventKind.FORWARDED.value, destination)
    ).fetchone()
    return row is not None


def was_series_delivered(
    conn: sqlite3.Connection, destination: str, study_uid: str, series_uid: str
) -> bool:
    """Return True when ``destination`` acknowledged an object of ``series_uid`` of ``study_uid``.

    Served by the ``events_study`` index (an unknown study asks nothing).
    """
    if not study_uid or not series_uid:
        return False
    row = conn.execute(
        "SELECT 1 FROM events WHERE study_uid = ? AND series_uid = ? AND +kind = ? "
        "AND +destination = ? LIMIT 1",
        (study_uid, series_uid, EventKind.FORWARDED.value, destination),
    ).fetchone()
    return row is not None


class DeliveryLookup:
    """Ask the ledger, read-only, what a destination acknowledged before.

    The connection is opened on first use and reopened after an error; a
    ledger that is missing or unreadable answers "not delivered" (the caller
    then waits, which is the safe side). Safe to call from several threads.

    Parameters
    ----------
    path : Path
        The ledger file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def objects(self, destination: str, sop_uids: Sequence[str]) -> bool:
        """Return True when ``destination`` acknowledged any of ``sop_uids``."""
        return self._ask(lambda c: was_delivered(c, destination, sop_uids))

    def series(self, destination: str, study_uid: str, series_uid: str) -> bool:
        """Return True when ``destination`` acknowledged an object of the series."""
        return self._ask(lambda c: was_series_delivered(c, destination, study_uid, series_uid))

    def _ask(self, question: Callable[[sqlite3.Connection], bool]) -> bool:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = open_reader(self.path)
                return bool(question(self._conn))
            except (LedgerUnavailable, sqlite3.Error):
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                return False

    def close(self) -> None:
        """Close the connection (a later question opens it again)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
