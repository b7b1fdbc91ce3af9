"""The one ledger writer: a thread that stores queued events in batches.

:meth:`LedgerWriter.submit` never blocks and never raises (the caller may be a
receiving thread that already answered its sender); a full queue drops the event
and logs that once. The thread takes what is queued (up to :data:`_BATCH` events),
completes each event off the receiving path — decodes the raw header elements of
stored objects, computes their SHA-256 from the filed object, looks up study and
patient of forwarded or parked objects by SOP Instance UID — and writes the batch,
the per-study summary and the counters in one transaction. At start it deletes
events older than ``retention_days`` (and again daily) and reconciles the
folders with the ledger: objects on disk that no event mentions get a
``recovered`` event. A corrupt ledger is moved aside and replaced; a ledger that
cannot be written at all is retried every minute while events are dropped.
Imports the standard library, :mod:`dicomnode.dicomtags` and the ledger modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from dicomnode.ledger.events import COLUMNS, IDENTITY_COLUMNS, EventKind
from dicomnode.ledger.schema import LedgerUnavailable, move_aside, open_ledger
from dicomnode.ledger.tally import Labels, counter_increments

logger = logging.getLogger(__name__)

_QUEUE_MAX: Final = 200_000
_BATCH: Final = 1000
#: How long the writer gathers events before it writes them (seconds).
_GATHER_S: Final = 0.25
_REOPEN_S: Final = 60.0
_RETENTION_EVERY_S: Final = 86400.0
_SKIP_SUFFIXES: Final = (".part", ".tmp", ".log", ".json")
_ROW_COLUMNS: Final = ("ts", "kind", *COLUMNS)
_INSERT: Final = (
    f"INSERT INTO events ({', '.join(_ROW_COLUMNS)}) VALUES ({', '.join('?' * len(_ROW_COLUMNS))})"
)
#: Events whose path names an object file on disk now.
_PATH_KINDS: Final = ("stored", "recovered", "parked", "moved_back")
#: Events completed from the stored object with the same SOP Instance UID.
_LOOKUP_KINDS: Final = frozenset(
    {"forwarded", "forward_refused", "parked", "moved_back", "converted", "deleted"}
)
_HEADER_TAGS: Final = {
    0x00100020: "patient_id",
    0x00100010: "patient_name",
    0x0020000D: "study_uid",
    0x00080020: "study_date",
    0x00081030: "study_desc",
    0x0020000E: "series_uid",
    0x00080060: "modality",
    0x00080016: "sop_class",
    0x00080018: "sop_uid",
}
_CHARSET_TAG: Final = 0x00080005


def decode_elements(elements: dict[int, tuple[bytes, bytes]]) -> dict[str, str]:
    """Return ledger columns from raw header elements (as :func:`dicomnode.integrity.examine` gives).

    Text is decoded as UTF-8 when the object declares ``ISO_IR 192``, else as
    Latin-1 (ASCII objects decode the same either way); padding is stripped and a
    person name's ``^`` separators are kept.
    """
    charset = elements.get(_CHARSET_TAG, (b"", b""))[1]
    codec = "utf-8" if b"192" in charset else "latin-1"
    out: dict[str, str] = {}
    for tag, column in _HEADER_TAGS.items():
        item = elements.get(tag)
        if item is not None:
            out[column] = item[1].decode(codec, "replace").strip("\x00 ")
    return out


def file_sha256(path: str) -> str | None:
    """Return the SHA-256 (hex) of the file at ``path``, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


class LedgerWriter:
    """The ledger's single writer thread.

    Parameters
    ----------
    path : Path
        The ledger file (created with its folder when missing).
    retention_days : int
        Events older than this are deleted at start and daily; 0 keeps everything.
    reconcile_roots : sequence of Path
        Folders whose objects must be in the ledger (AE folders, watch folder).
    skip_dirs : sequence of Path
        Folders below those roots that hold no objects to reconcile (``errors/``).
    on_written : callable, optional
        Given each batch of rows once it is committed (the audit-message sender);
        must not block.
    """

    def __init__(
        self,
        path: Path,
        retention_days: int = 0,
        reconcile_roots: Sequence[Path] = (),
        skip_dirs: Sequence[Path] = (),
        on_written: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.path = path
        self.retention_days = retention_days
        self.reconcile_roots = tuple(reconcile_roots)
        self.skip_dirs = {str(p) for p in skip_dirs}
        self.on_written = on_written
        #: Set by :meth:`flush` and :meth:`stop`: ends the writer's gathering at once.
        self._hurry = threading.Event()
        self._queue: queue.Queue[tuple[float, dict[str, Any]] | threading.Event | None] = (
            queue.Queue(_QUEUE_MAX)
        )
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._dropped = 0
        self._failed_since: float | None = None
        self._next_retention = 0.0
        self.reconciled = threading.Event()
        self.written = 0

    # -- public ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (it opens the ledger and reconciles in the background)."""
        if self.reconcile_roots and not any(
            True for root in self.reconcile_roots for _ in self._walk(root)
        ):
            # Nothing on disk at start-up: nothing to recover, and pydicom (about 20 MB)
            # stays out of this process when nothing else in it needs pydicom.
            self.reconcile_roots = ()
        if self.reconcile_roots:
            # Reconciliation reads headers with pydicom: import it here, in the caller's
            # thread, not while the caller may be importing it too (a package imported by
            # two threads at once can fail half-initialised).
            import dicomnode.dicomtags  # noqa: F401
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dicomnode-ledger", daemon=True)
            self._thread.start()

    def submit(self, event: dict[str, Any], ts: float | None = None) -> None:
        """Queue one event (``kind`` plus columns); never blocks, never raises."""
        try:
            self._queue.put_nowait((time.time() if ts is None else ts, event))
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                logger.error("LEDGER-BEHIND queue full: events are dropped (files are safe)")

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every event submitted so far is written; return False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            return False
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        self._hurry.set()
        return done.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the thread and close the ledger."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._hurry.set()
        self._thread.join(timeout_s)
        self._thread = None

    def counters(self) -> dict[tuple[str, Labels], float]:
        """Return a copy of the counters (as of the last committed batch)."""
        with self._lock:
            return dict(self._counters)

    @property
    def available(self) -> bool:
        """True while the ledger is open for writing."""
        return self._conn is not None

    # -- thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._open()
        if self._conn is not None:
            self._maintain()
            try:
                self._reconcile()
            except Exception:
                logger.exception("LEDGER reconciliation failed (continuing)")
        self.reconciled.set()
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._maintain()
                continue
            # Gather for _GATHER_S, then take what came (fewer, larger transactions: far
            # fewer pages written per event). The queue is not waited on per event: each
            # wait would wake this thread once per stored object, taking the interpreter
            # from the receiving threads. A flush or stop request ends the pause at once.
            if isinstance(first, tuple) and self._queue.qsize() < _BATCH:
                self._hurry.wait(_GATHER_S)
            self._hurry.clear()
            items = [first]
            while len(items) < _BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events: list[tuple[float, dict[str, Any]]] = []
            waiters: list[threading.Event] = []
            for item in items:
                if item is None:
                    stopping = True
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                else:
                    events.append(item)
            if events:
                self._write(events)
            for waiter in waiters:
                waiter.set()
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _open(self) -> None:
        try:
            conn = open_ledger(self.path)
            conn.row_factory = sqlite3.Row
            counters = {
                (r["name"], _labels_from_text(r["labels"])): float(r["value"])
                for r in conn.execute("SELECT name, labels, value FROM counters")
            }
        except (LedgerUnavailable, sqlite3.Error) as exc:
            if self._failed_since is None:
                logger.error("LEDGER-UNAVAILABLE %s (receiving and forwarding go on)", exc)
            self._failed_since = time.monotonic()
            self._conn = None
            return
        with self._lock:
            self._counters = counters
        if self._failed_since is not None:
            logger.info("LEDGER-AVAILABLE %s again", self.path)
        self._failed_since = None
        self._conn = conn

    def _maintain(self) -> None:
        if self._conn is None:
            if self._failed_since is not None and time.monotonic() - self._failed_since > _REOPEN_S:
                self._open()
            return
        now = time.time()
        if self.retention_days and now >= self._next_retention:
            self._next_retention = now + _RETENTION_EVERY_S
            try:
                with self._conn:
                    gone = self._conn.execute(
                        "DELETE FROM events WHERE ts < ?", (now - self.retention_days * 86400.0,)
                    ).rowcount
                if gone:
                    logger.info(
                        "LEDGER-RETENTION deleted %d event(s) older than %d days",
                        gone,
                        self.retention_days,
                    )
            except sqlite3.Error as exc:
                self._broken(exc)

    def _broken(self, exc: sqlite3.Error) -> None:
        """Handle a failed write: move a corrupt ledger aside and reopen, else retry later."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            move_aside(self.path, str(exc))
            self._open()
            return
        logger.error(
            "LEDGER-WRITE-FAILED %s: %s (events are dropped until it works)", self.path, exc
        )
        self._failed_since = time.monotonic()

    def _write(self, events: Iterable[tuple[float, dict[str, Any]]]) -> None:
        if self._conn is None:
            self._maintain()
            if self._conn is None:
                return
        conn = self._conn
        staged: dict[tuple[str, Labels], float] = {}
        try:
            with conn:
                rows: list[dict[str, Any]] = []
                batch: dict[str, dict[str, Any]] = {}  # stored objects of this batch by SOP UID
                for ts, event in events:
                    row = self._complete(conn, event, batch)
                    row["ts"] = ts
                    rows.append(row)
                    if row.get("kind") in ("stored", "recovered") and row.get("sop_uid"):
                        batch[row["sop_uid"]] = row
                self._insert_rows(conn, rows, staged)
        except sqlite3.Error as exc:
            self._broken(exc)
            return
        except Exception:
            logger.exception("LEDGER batch skipped (unexpected error)")
            return
        with self._lock:
            for key, amount in staged.items():
                self._counters[key] = self._counters.get(key, 0.0) + amount
        if self.on_written is not None:
            try:
                self.on_written(rows)
            except Exception:
                logger.exception("LEDGER on_written hook failed (continuing)")

    def _complete(
        self, conn: sqlite3.Connection, event: dict[str, Any], batch: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Fill what the logging side left to the writer (header text, checksum, study)."""
        row = dict(event)
        elements = row.pop("elements", None)
        if elements:
            for column, value in decode_elements(elements).items():
                row.setdefault(column, value)
        kind = row.get("kind")
        if kind in ("stored", "recovered") and not row.get("checksum") and row.get("path"):
            row["checksum"] = file_sha256(str(row["path"]))
        if kind in _LOOKUP_KINDS and not (row.get("study_uid") and row.get("patient_id")):
            found: Any = None
            if row.get("sop_uid") in batch:
                found = batch[row["sop_uid"]]
            elif row.get("sop_uid"):
                found = conn.execute(
                    "SELECT * FROM events WHERE sop_uid = ? AND kind IN ('stored', 'recovered') "
                    "ORDER BY ts DESC LIMIT 1",
                    (row["sop_uid"],),
                ).fetchone()
            elif kind == "moved_back" and row.get("reason"):
                found = conn.execute(
                    "SELECT * FROM events WHERE path = ? AND kind = 'parked' ORDER BY ts DESC LIMIT 1",
                    (row["reason"],),
                ).fetchone()
            if found is not None:
                found = dict(found)
                for column in IDENTITY_COLUMNS:
                    if not row.get(column):
                        row[column] = found.get(column)
        return row

    @staticmethod
    def _insert_rows(
        conn: sqlite3.Connection,
        rows: list[dict[str, Any]],
        staged: dict[tuple[str, Labels], float],
    ) -> None:
        """Insert a batch: events, the per-study summary and the counters (one statement each)."""
        conn.executemany(_INSERT, [[row.get(c) for c in _ROW_COLUMNS] for row in rows])
        studies: dict[str, list[Any]] = {}
        for row in rows:
            kind = row.get("kind")
            if kind in ("stored", "recovered") and row.get("study_uid"):
                item = studies.get(row["study_uid"])
                if item is None:
                    studies[row["study_uid"]] = [
                        row["study_uid"],
                        row.get("patient_id"),
                        row.get("patient_name"),
                        row.get("study_date"),
                        row.get("study_desc"),
                        row.get("calling_ae"),
                        row["ts"],
                        row["ts"],
                        1,
                    ]
                else:
                    item[5] = row.get("calling_ae")
                    item[6] = min(item[6], row["ts"])
                    item[7] = max(item[7], row["ts"])
                    item[8] += 1
            for name, labels, amount in counter_increments(row):
                staged[(name, labels)] = staged.get((name, labels), 0.0) + amount
        if studies:
            conn.executemany(
                "INSERT INTO studies (study_uid, patient_id, patient_name, study_date, study_desc, "
                "calling_ae, first_ts, last_ts, objects) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (study_uid) DO UPDATE SET last_ts = max(last_ts, excluded.last_ts), "
                "first_ts = min(first_ts, excluded.first_ts), "
                "objects = objects + excluded.objects, calling_ae = excluded.calling_ae",
                list(studies.values()),
            )
        conn.executemany(
            "INSERT INTO counters (name, labels, value) VALUES (?, ?, ?) "
            "ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value",
            [(name, _labels_to_text(labels), amount) for (name, labels), amount in staged.items()],
        )

    # -- reconciliation --------------------------------------------------------------

    def _reconcile(self) -> None:
        """Give every object on disk that no event mentions a ``recovered`` event."""
        conn = self._conn
        if conn is None or not self.reconcile_roots:
            return
        known: set[str] = set()
        folders: set[str] = set()
        for kind in _PATH_KINDS:
            known.update(
                r[0]
                for r in conn.execute(
                    "SELECT path FROM events WHERE kind = ? AND path IS NOT NULL", (kind,)
                )
            )
        for (paths,) in conn.execute(
            "SELECT path FROM events WHERE kind = 'converted' AND path IS NOT NULL"
        ):
            folders.update(str(paths).split("\n"))
        found: list[tuple[float, dict[str, Any]]] = []
        seen: set[str] = set()
        recovered = 0
        for root in self.reconcile_roots:
            for path in self._walk(root):
                if path in known or path in seen or os.path.dirname(path) in folders:
                    continue
                seen.add(path)
                from dicomnode.dicomtags import read_header, text_of  # imported by start()

                try:
                    ds = read_header(Path(path))
                    st = os.stat(path)
                except Exception:
                    continue  # not DICOM (or gone): nothing to record
                sop_uid = text_of(ds, "SOPInstanceUID")
                if not sop_uid:
                    continue
                found.append(
                    (
                        st.st_mtime,
                        {
                            "kind": EventKind.RECOVERED.value,
                            "patient_id": text_of(ds, "PatientID"),
                            "patient_name": text_of(ds, "PatientName"),
                            "study_uid": text_of(ds, "StudyInstanceUID"),
                            "study_date": text_of(ds, "StudyDate"),
                            "study_desc": text_of(ds, "StudyDescription"),
                            "series_uid": text_of(ds, "SeriesInstanceUID"),
                            "modality": text_of(ds, "Modality"),
                            "sop_class": text_of(ds, "SOPClassUID"),
                            "sop_uid": sop_uid,
                            "size": st.st_size,
                            "path": path,
                            "reason": "found on disk at start-up, not in the ledger",
                        },
                    )
                )
                recovered += 1
                if len(found) >= _BATCH:
                    self._write(found)
                    found = []
        if found:
            self._write(found)
        if recovered:
            others = len(seen) - recovered
            logger.info(
                "LEDGER-RECOVERED %d object(s) found on disk but not in the ledger%s",
                recovered,
                f" ({others} other file(s) not DICOM, not recorded)" if others else "",
            )

    def _walk(self, root: Path) -> Iterable[str]:
        if str(root) in self.skip_dirs:
            return
        for dirpath, dirnames, filenames in os.walk(str(root)):
            dirnames[:] = [
                d
                for d in dirnames
                if not d.startswith(".") and os.path.join(dirpath, d) not in self.skip_dirs
            ]
            for name in filenames:
                if name.startswith(".") or name.lower().endswith(_SKIP_SUFFIXES):
                    continue
                yield os.path.join(dirpath, name)


def _labels_to_text(labels: Labels) -> str:
    return "\x1f".join(f"{k}={v}" for k, v in labels)


def _labels_from_text(text: str) -> Labels:
    if not text:
        return ()
    return tuple(tuple(part.split("=", 1)) for part in text.split("\x1f"))  # type: ignore[misc]
