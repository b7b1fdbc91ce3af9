"""Ledger events as they travel on log records: kinds and the ``extra=`` helper.

Code that logs a fixed-verb line adds ``extra=ledger_extra(EventKind.STORED, ...)``;
the record then carries a ``ledger`` attribute (a plain, picklable dict) that
:class:`~dicomnode.ledger.handler.LedgerHandler` turns into a row. Building the
dict is all the logging side pays. Imports only the standard library.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final

#: Name of the LogRecord attribute that carries a ledger event.
RECORD_ATTRIBUTE: Final = "ledger"


class EventKind(str, Enum):
    """What happened (the ``kind`` column of the ledger)."""

    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REJECTED = "association_rejected"
    STORED = "stored"
    STORE_REFUSED = "store_refused"
    CONVERTED = "converted"
    FORWARDED = "forwarded"
    FORWARD_REFUSED = "forward_refused"
    RETRIED = "retried"
    #: A group held for a destination because RT objects it references are missing.
    WAITING = "waiting"
    PARKED = "parked"
    MOVED_BACK = "moved_back"
    DELETED = "deleted"
    RECOVERED = "recovered"
    CONSOLE = "console"
    #: Storage commitment (SCP): a request accepted, a report answered (all committed,
    #: or some failed), a request refused or a report given up.
    COMMIT_REQUESTED = "commit_requested"
    COMMITTED = "committed"
    COMMIT_FAILED = "commit_failed"


#: Columns an event may fill (besides ``ts`` and ``kind``).
COLUMNS: Final = (
    "calling_ae",
    "peer",
    "patient_id",
    "patient_name",
    "study_uid",
    "study_date",
    "study_desc",
    "series_uid",
    "modality",
    "sop_class",
    "sop_uid",
    "size",
    "checksum",
    "path",
    "destination",
    "status",
    "reason",
    "duration_ms",
    "actor",
)

#: Columns that say which object an event is about: copied from the object's earlier event
#: when a later one (forwarded, parked) does not carry them itself.
IDENTITY_COLUMNS: Final = (
    "patient_id",
    "patient_name",
    "study_uid",
    "study_date",
    "study_desc",
    "series_uid",
    "modality",
    "sop_class",
    "sop_uid",
    "calling_ae",
)


def ledger_extra(kind: EventKind, **fields: Any) -> dict[str, Any]:
    """Return the ``extra=`` mapping that attaches one ledger event to a log record.

    Parameters
    ----------
    kind : EventKind
        What happened.
    **fields
        Column values (see :data:`COLUMNS`); ``elements`` may carry the raw header
        elements of a stored object (decoded by the writer, off the receiving path).

    Returns
    -------
    dict
        ``{"ledger": {"kind": ..., **fields}}``; values are plain and picklable.
    """
    fields["kind"] = kind.value
    return {RECORD_ATTRIBUTE: fields}
