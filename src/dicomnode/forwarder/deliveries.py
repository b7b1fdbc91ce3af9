"""The forwarder's durable record of per-destination progress (SQLite, WAL).

One row per (destination, file identity): the file identity is its path in the
watch folder, size, modification time and content checksum, so a restart knows
which destinations already have which file, and a file dropped again (a new
mtime) is a new file. Rows also carry the SOP Instance UID, which is how
duplicates are found: the same UID and checksum acknowledged by the same
destination. Every :meth:`DeliveryStore.record` is committed before it returns
(``synchronous = NORMAL`` in WAL mode: the commit is in the operating system
before the next object is sent, so a kill -9 of the node loses none; a power
cut may lose the last few, which are then sent again - never lost). The file
lives in ``<watch_folder>/.dicomnode-state/deliveries.sqlite`` and works
without the ledger. Imports the standard library only.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dicomnode.forwarder.fanout import DeliveryState

logger = logging.getLogger(__name__)

#: File name of the store below the watch folder's state folder.
STORE_NAME: Final = "deliveries.sqlite"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS delivery (
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (destination, path, size, mtime_ns, checksum)
);
CREATE INDEX IF NOT EXISTS delivery_by_object ON delivery (destination, sop_uid, checksum, at);
CREATE INDEX IF NOT EXISTS delivery_by_time ON delivery (at);
"""


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """One file as the store knows it.

    Attributes
    ----------
    path : str
        Path relative to the watch folder (POSIX separators).
    size, mtime_ns : int
        Size and modification time when the file was planned.
    checksum : str
        Hex digest of the whole file.
    sop_uid : str
        Its SOP Instance UID.
    """

    path: str
    size: int
    mtime_ns: int
    checksum: str
    sop_uid: str


class DeliveryStore:
    """Record and look up per-destination outcomes; safe to use from several threads.

    Parameters
    ----------
    path : Path
        The SQLite file (created with its folder when missing).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database (later calls fail)."""
        with self._lock:
            self._db.close()

    def record(
        self, destination: str, ident: FileIdentity, state: DeliveryState, at: float
    ) -> None:
        """Store ``state`` of ``ident`` for ``destination``, committed before returning.

        Raises
        ------
        sqlite3.Error
            When the record could not be written (the caller keeps the file).
        """
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO delivery "
                "(destination, path, size, mtime_ns, checksum, sop_uid, state, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    destination,
                    ident.path,
                    ident.size,
                    ident.mtime_ns,
                    ident.checksum,
                    ident.sop_uid,
                    state.value,
                    at,
                ),
            )

    def states(self, ident: FileIdentity) -> dict[str, DeliveryState]:
        """Return the recorded state of this very file per destination."""
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, state FROM delivery "
                "WHERE path = ? AND size = ? AND mtime_ns = ? AND checksum = ?",
                (ident.path, ident.size, ident.mtime_ns, ident.checksum),
            ).fetchall()
        found: dict[str, DeliveryState] = {}
        for destination, state in rows:
            try:
                found[str(destination)] = DeliveryState(state)
            except ValueError:
                continue
        return found

    def last_acknowledged(self, destination: str, sop_uid: str, checksum: str) -> float | None:
        """Return when ``destination`` last acknowledged this object (any file), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT max(at) FROM delivery WHERE destination = ? AND sop_uid = ? "
                "AND checksum = ? AND state IN (?, ?)",
                (
                    destination,
                    sop_uid,
                    checksum,
                    DeliveryState.ACKNOWLEDGED.value,
                    DeliveryState.COMMITTED.value,
                ),
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def prune(self, before: float, watch_folder: Path) -> int:
        """Forget rows older than ``before`` whose file has left the watch folder.

        Returns
        -------
        int
            Rows removed.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT path FROM delivery WHERE at < ?", (before,)
            ).fetchall()
        gone = [str(p) for (p,) in rows if not (watch_folder / str(p)).exists()]
        removed = 0
        with self._lock:
            for path in gone:
                cur = self._db.execute(
                    "DELETE FROM delivery WHERE path = ? AND at < ?", (path, before)
                )
                removed += cur.rowcount
        return removed
