"""The awaiting-commitment store: the forwarder's commitment requests and the reports answering them.

When a destination with ``storage_commitment = true`` acknowledged a group's
objects, the forwarder moves those files (by rename, same volume) into
``<watch_folder>/.dicomnode-commitment/held/<batch>/`` and writes one JSON
record per batch, ``<batch>.json``, atomically and fsynced, *before* it sends
the N-ACTION: the record names the destination, every Transaction UID issued
for the batch, the held files with their SOP Class/Instance UIDs and their
original place in the watch folder. The hidden folder is not watched, so
held files are never sent again by accident, and a kill at any moment leaves
either the files in the watch folder (sent again) or the record (resumed).

A report (N-EVENT-REPORT) is written as ``reports/<batch>~<n>.json`` (atomic,
fsynced) by whoever receives it: the receiver on the node's port, in any of
its worker processes, or the forwarder on its own association. Only then is
the report answered with success. The forwarder picks reports up and applies
them. This module is the meeting point of the receiver and the forwarder
(they never import each other): file names, record and report formats, and
the lookups both sides need. Imports the standard library and
:mod:`dicomnode.storage`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from dicomnode.storage import write_bytes_atomic

logger = logging.getLogger(__name__)

#: Sub-folder of the store holding the files awaiting commitment, one folder per batch.
HELD_DIR: Final = "held"
#: Sub-folder of the store holding the reports not yet applied.
REPORTS_DIR: Final = "reports"


@dataclass(frozen=True, slots=True)
class HeldFile:
    """One acknowledged instance awaiting commitment.

    Attributes
    ----------
    sop_class, sop_instance : str
        Its SOP Class and SOP Instance UIDs (as sent).
    held : str
        Its path below the store (``held/<batch>/<n>.dcm``).
    origin : str
        Its path relative to the watch folder before it was held (POSIX).
    sends : int
        How often it has been sent to this destination so far (1 on the first batch).
    resend : bool
        True when the destination did not commit it and it must be sent again
        (from where it is held) before the next request.
    size, mtime_ns : int
        The file's size and modification time in the watch folder (0: unknown).
    checksum : str
        Its content checksum as the forwarder's delivery record knows it ("" : unknown).
    """

    sop_class: str
    sop_instance: str
    held: str
    origin: str
    sends: int = 1
    resend: bool = False
    size: int = 0
    mtime_ns: int = 0
    checksum: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    """One batch of instances a destination was (or is about to be) asked to commit.

    Attributes
    ----------
    batch : str
        The batch key (file and folder name in the store).
    destination : str
        The ``[Destination:NAME]`` name.
    ae_title, host : str
        The destination's AE title (reports must come from it) and host.
    port : int
        Its port.
    group : str
        The watch-folder group the files came from (for parking).
    created : float
        Wall-clock time the batch was held.
    transactions : tuple of str
        Every Transaction UID issued for the batch, the latest last (a late report
        to an earlier one is still honoured).
    requests : int
        N-ACTIONs the destination accepted without a report so far (since the
        files last changed).
    requested_at : float
        Wall-clock time of the latest accepted N-ACTION (0: none yet).
    first_failure : float
        Wall-clock time of the first failed N-ACTION (or C-STORE of a file sent
        again) since the last success (0: none).
    failures : int
        Failed attempts since then.
    next_attempt : float
        Wall-clock time before which no N-ACTION is sent (backoff).
    last_error : str
        Why the latest N-ACTION failed or timed out.
    first_silence : float
        Wall-clock time the first accepted request went unanswered for
        ``commitment_timeout_s`` (0: none since the files last changed).
    files : tuple of HeldFile
        The held instances.
    """

    batch: str
    destination: str
    ae_title: str
    host: str
    port: int
    group: str
    created: float
    transactions: tuple[str, ...] = ()
    requests: int = 0
    requested_at: float = 0.0
    first_failure: float = 0.0
    failures: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    files: tuple[HeldFile, ...] = field(default_factory=tuple)
    first_silence: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document of the record."""
        doc = asdict(self)
        doc["transactions"] = list(self.transactions)
        doc["files"] = [asdict(f) for f in self.files]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Record:
        """Rebuild a record from :meth:`to_json`'s document.

        Raises
        ------
        KeyError, TypeError, ValueError
            When the document is not one.
        """
        files = tuple(
            HeldFile(
                str(f["sop_class"]),
                str(f["sop_instance"]),
                str(f["held"]),
                str(f["origin"]),
                int(f.get("sends", 1)),
                bool(f.get("resend", False)),
                int(f.get("size", 0)),
                int(f.get("mtime_ns", 0)),
                str(f.get("checksum", "")),
            )
            for f in doc["files"]
        )
        return cls(
            batch=str(doc["batch"]),
            destination=str(doc["destination"]),
            ae_title=str(doc["ae_title"]),
            host=str(doc["host"]),
            port=int(doc["port"]),
            group=str(doc["group"]),
            created=float(doc["created"]),
            transactions=tuple(str(t) for t in doc["transactions"]),
            requests=int(doc["requests"]),
            requested_at=float(doc["requested_at"]),
            first_failure=float(doc["first_failure"]),
            failures=int(doc["failures"]),
            next_attempt=float(doc["next_attempt"]),
            last_error=str(doc.get("last_error", "")),
            files=files,
            first_silence=float(doc.get("first_silence", 0.0)),
        )

    def with_transaction(self, uid: str) -> Record:
        """Return the record with ``uid`` issued (appended)."""
        return replace(self, transactions=(*self.transactions, uid))


@dataclass(frozen=True, slots=True)
class Report:
    """A storage commitment report as received (what :func:`write_report` keeps).

    Attributes
    ----------
    batch : str
        The batch its Transaction UID belongs to.
    transaction_uid : str
        Its Transaction UID.
    calling_ae, peer : str
        Who sent it (AE title, ``ip:port``) and how (``new-association`` or
        ``same-association`` in ``how``).
    committed : tuple of (str, str)
        (SOP Class UID, SOP Instance UID) committed.
    failed : tuple of (str, str, int)
        (SOP Class UID, SOP Instance UID, Failure Reason) not committed.
    received : float
        Wall-clock time it was received.
    how : str
        ``new-association`` or ``same-association``.
    """

    batch: str
    transaction_uid: str
    calling_ae: str
    peer: str
    committed: tuple[tuple[str, str], ...]
    failed: tuple[tuple[str, str, int], ...]
    received: float
    how: str = "new-association"

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document of the report."""
        doc = asdict(self)
        doc["committed"] = [list(c) for c in self.committed]
        doc["failed"] = [list(f) for f in self.failed]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_json`'s document.

        Raises
        ------
        KeyError, TypeError, ValueError
            When the document is not one.
        """
        return cls(
            str(doc["batch"]),
            str(doc["transaction_uid"]),
            str(doc["calling_ae"]),
            str(doc["peer"]),
            tuple((str(c), str(i)) for c, i in doc["committed"]),
            tuple((str(c), str(i), int(r)) for c, i, r in doc["failed"]),
            float(doc["received"]),
            str(doc.get("how", "new-association")),
        )


def record_path(store: Path, batch: str) -> Path:
    """Return the record file of ``batch``."""
    return store / f"{batch}.json"


def held_folder(store: Path, batch: str) -> Path:
    """Return the folder holding ``batch``'s files."""
    return store / HELD_DIR / batch


def save_record(store: Path, record: Record) -> None:
    """Write ``record`` atomically (fsynced file and folder).

    Raises
    ------
    OSError
        When it cannot be written.
    """
    write_bytes_atomic(
        json.dumps(record.to_json()).encode("utf-8"), record_path(store, record.batch)
    )


def load_record(path: Path) -> Record | None:
    """Return the record in ``path``, or None when it is gone or unreadable (logged)."""
    try:
        return Record.from_json(json.loads(path.read_text("utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.error("COMMIT-FAILED role=scu unreadable commitment record %s: %s", path, exc)
        return None


def load_records(store: Path) -> list[Record]:
    """Return every record of the store (oldest batch first)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(store.glob("*.json")):
            record = load_record(path)
            if record is not None:
                found.append(record)
    return found


def awaiting_files(store: Path | None) -> dict[str, int]:
    """Return ``{destination name: files held awaiting its commitment}`` (empty: none)."""
    counts: dict[str, int] = {}
    if store is None:
        return counts
    for record in load_records(store):
        counts[record.destination] = counts.get(record.destination, 0) + len(record.files)
    return counts


def find_transaction(store: Path, transaction_uid: str) -> Record | None:
    """Return the record that issued ``transaction_uid``, or None."""
    for record in load_records(store):
        if transaction_uid in record.transactions:
            return record
    return None


def write_report(store: Path, report: Report) -> Path:
    """Keep ``report`` durably (atomic, fsynced) for the forwarder to apply; return its path.

    Raises
    ------
    OSError
        When it cannot be written (the report must then be answered with a failure).
    """
    name = f"{report.batch}~{time.time_ns()}-{os.getpid()}.json"
    path = store / REPORTS_DIR / name
    write_bytes_atomic(json.dumps(report.to_json()).encode("utf-8"), path)
    return path


def pending_reports(store: Path) -> list[Path]:
    """Return the report files not yet applied (oldest first)."""
    with contextlib.suppress(FileNotFoundError):
        return sorted((store / REPORTS_DIR).glob("*.json"), key=lambda p: p.name.split("~")[-1])
    return []
