"""Open the ledger database: WAL mode, schema version and migrations, corrupt-file recovery.

The schema version lives in SQLite's ``user_version``; :data:`MIGRATIONS` lists
the statements that bring a database from one version to the next, so an older
ledger is upgraded in place at start-up. A file that is not a database, fails
``quick_check`` or comes from a newer dicomnode is moved aside
(``ledger.sqlite.corrupt-<time>``) with one log line, and a new ledger is started:
the ledger never stops the node. Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

#: Statements per schema version; index 0 creates version 1.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            calling_ae TEXT, peer TEXT,
            patient_id TEXT, patient_name TEXT,
            study_uid TEXT, study_date TEXT, study_desc TEXT,
            series_uid TEXT, modality TEXT, sop_class TEXT, sop_uid TEXT,
            size INTEGER, checksum TEXT, path TEXT,
            destination TEXT, status TEXT, reason TEXT, duration_ms REAL, actor TEXT
        )""",
        "CREATE INDEX events_ts ON events (ts)",
        "CREATE INDEX events_kind_ts ON events (kind, ts)",
        "CREATE INDEX events_study ON events (study_uid, ts)",
        "CREATE INDEX events_sop ON events (sop_uid, ts)",
        "CREATE INDEX events_patient ON events (patient_id, ts)",
        """CREATE TABLE studies (
            study_uid TEXT PRIMARY KEY,
            patient_id TEXT, patient_name TEXT, study_date TEXT, study_desc TEXT,
            calling_ae TEXT, first_ts REAL, last_ts REAL, objects INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX studies_last ON studies (last_ts)",
        "CREATE INDEX studies_patient ON studies (patient_id)",
        """CREATE TABLE counters (
            name TEXT NOT NULL, labels TEXT NOT NULL, value REAL NOT NULL,
            PRIMARY KEY (name, labels)
        )""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


class LedgerUnavailable(Exception):
    """The ledger could not be opened or created."""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring ``conn``'s schema to :data:`SCHEMA_VERSION`; return the version found.

    Raises
    ------
    sqlite3.DatabaseError
        When the database is from a newer dicomnode or a migration fails.
    """
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"ledger schema version {found} is newer than this dicomnode's {SCHEMA_VERSION}"
        )
    for version in range(found, SCHEMA_VERSION):
        with conn:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
    return found


def move_aside(path: Path, why: str) -> Path:
    """Rename a broken ledger (and its WAL files) out of the way; return the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            Path(str(path) + suffix).rename(Path(str(target) + suffix))
    logger.error(
        "LEDGER-CORRUPT %s: %s; moved aside to %s, starting a new ledger", path, why, target
    )
    return target


def open_ledger(path: Path) -> sqlite3.Connection:
    """Open (creating or upgrading) the ledger at ``path`` for writing.

    A damaged file is moved aside and replaced by a new, empty ledger.

    Raises
    ------
    LedgerUnavailable
        When no ledger can be created at ``path`` (folder not writable, disk full).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerUnavailable(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    for attempt in range(2):
        conn: sqlite3.Connection | None = None
        try:
            conn = _connect(path)
            row = conn.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
            migrate(conn)
            return conn
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            # "not a database", "malformed", a newer schema: move aside; "locked",
            # "unable to open" (OperationalError): leave the file alone.
            if attempt == 0 and path.exists() and not isinstance(exc, sqlite3.OperationalError):
                move_aside(path, str(exc))
                continue
            raise LedgerUnavailable(f"{path}: {exc}") from None
    raise LedgerUnavailable(f"{path}: cannot be opened")


def open_reader(path: Path) -> sqlite3.Connection:
    """Open the ledger read-only (console, ``status``, ``audit``).

    Raises
    ------
    LedgerUnavailable
        When there is no readable ledger at ``path``.
    """
    if not path.is_file():
        raise LedgerUnavailable(f"{path}: no ledger (has the node run with [Ledger] enabled?)")
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("SELECT 1 FROM events LIMIT 1")
    except sqlite3.DatabaseError as exc:
        raise LedgerUnavailable(f"{path}: {exc}") from None
    return conn
