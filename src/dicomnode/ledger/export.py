"""``dicomnode audit``: export ledger events as CSV or JSON.

Times are written as ISO 8601 in UTC (``2026-11-30T15:04:05.123Z``) next to the
raw epoch seconds. Imports the standard library and :mod:`.queries`.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sqlite3
from collections.abc import Sequence
from typing import IO, Any

from dicomnode.ledger.queries import EXPORT_COLUMNS, events


def parse_day(text: str, end: bool = False) -> float:
    """Return the epoch seconds of ``YYYY-MM-DD`` (local midnight; ``end``: the next midnight)
    or of an ISO 8601 date-time.

    Raises
    ------
    ValueError
        When ``text`` is neither.
    """
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return moment.timestamp()
    if end:
        day += dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day).timestamp()


def iso(ts: float) -> str:
    """Return ``ts`` as ISO 8601 UTC with milliseconds."""
    moment = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def export(
    conn: sqlite3.Connection,
    out: IO[str],
    fmt: str,
    since_ts: float | None = None,
    until_ts: float | None = None,
    patient_id: str = "",
    calling_ae: str = "",
    kinds: Sequence[str] = (),
) -> int:
    """Write matching events to ``out`` as ``csv`` or ``json``; return how many.

    Raises
    ------
    ValueError
        For an unknown format.
    """
    rows = events(conn, since_ts, until_ts, patient_id, calling_ae, kinds)
    columns = ("time", *EXPORT_COLUMNS)
    records: list[dict[str, Any]] = [{"time": iso(r["ts"]), **dict(r)} for r in rows]
    if fmt == "json":
        json.dump(records, out, indent=1, ensure_ascii=False)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow(record)
    else:
        raise ValueError(f"unknown format {fmt!r}: csv or json")
    return len(records)
