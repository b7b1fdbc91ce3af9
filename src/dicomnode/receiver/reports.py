"""Storage commitment reports of the forwarder's destinations, received on the node's port.

A destination with ``storage_commitment = true`` answers the forwarder's
N-ACTION with an N-EVENT-REPORT on a new association to the node (the
normal case, Orthanc's way). The receiver, in whichever process serves that
association, checks it against the forwarder's record
(:mod:`dicomnode.awaiting`): the Transaction UID must be one the forwarder
issued and the calling AE the destination's. A valid report is written to
the store (atomic, fsynced) and only then answered with success; the
forwarder applies it. An unknown transaction, another AE or an undecodable
report is logged (``COMMIT-FAILED role=scu``) and answered with a failure
status, changing nothing.

Log verbs: ``COMMIT-REPORTED``, ``COMMIT-FAILED``.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from dicomnode.awaiting import Report, find_transaction, write_report
from dicomnode.config import ReceiverConfig
from dicomnode.dul.commitment import ALL_COMMITTED, SOME_FAILED, parse_event_info
from dicomnode.dul.dimse import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_SOP_CLASS
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.logsafe import escape

logger = logging.getLogger(__name__)

#: N-EVENT-REPORT-RSP statuses (PS3.7 10.1.1.1.8, C): success and the failures used here.
SUCCESS: Final = 0x0000
PROCESSING_FAILURE: Final = 0x0110
NO_SUCH_SOP_CLASS: Final = 0x0118
NO_SUCH_SOP_INSTANCE: Final = 0x0112
NO_SUCH_EVENT_TYPE: Final = 0x0113
INVALID_ARGUMENT: Final = 0x0115


def record_report(
    cfg: ReceiverConfig,
    calling: str,
    where: str,
    sop_class: str,
    sop_instance: str,
    event_type: int,
    data: bytes | None,
    transfer_syntax: str,
    how: str = "new-association",
) -> int:
    """Check one N-EVENT-REPORT-RQ and keep it for the forwarder; return the RSP status.

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings (``commitment_store``).
    calling, where : str
        The reporting AE title (as admitted) and ``ip:port``.
    sop_class, sop_instance : str
        Affected SOP Class / Instance UIDs of the request.
    event_type : int
        Event Type ID (1 all committed, 2 some failed).
    data : bytes or None
        The Event Information (None: too large to keep).
    transfer_syntax : str
        The presentation context's transfer syntax.
    how : str
        ``new-association`` or ``same-association`` (kept with the report).

    Returns
    -------
    int
        0x0000 when the report was written to the store; otherwise 0x0118 (not
        storage commitment), 0x0112 (not its well-known instance), 0x0113 (event
        type), 0x0115 (undecodable, unknown transaction, or another AE than the
        destination asked) or 0x0110 (not recorded: no store, or a write error).
    """
    store = cfg.commitment_store
    transaction = ""
    status, why = SUCCESS, ""
    info = None
    if store is None:
        status, why = PROCESSING_FAILURE, "no destination of this node requests storage commitment"
    elif sop_class != STORAGE_COMMITMENT_SOP_CLASS:
        status, why = NO_SUCH_SOP_CLASS, "not the Storage Commitment Push Model SOP class"
    elif sop_instance != STORAGE_COMMITMENT_INSTANCE:
        status, why = NO_SUCH_SOP_INSTANCE, "not its well-known SOP instance"
    elif event_type not in (ALL_COMMITTED, SOME_FAILED):
        status, why = NO_SUCH_EVENT_TYPE, f"event type {event_type}"
    elif data is None:
        status, why = PROCESSING_FAILURE, "Event Information too large"
    else:
        try:
            info = parse_event_info(data, transfer_syntax)
            transaction = info.transaction_uid
        except ValueError as exc:
            status, why = INVALID_ARGUMENT, str(exc)
    record = None
    if status == SUCCESS and store is not None and info is not None:
        record = find_transaction(store, transaction)
        if record is None:
            status, why = (
                INVALID_ARGUMENT,
                "unknown transaction (not requested by this node, or done)",
            )
        elif record.ae_title != calling:
            status, why = (
                INVALID_ARGUMENT,
                f"transaction was requested from {record.ae_title}, not from this AE",
            )
    if status == SUCCESS and store is not None and info is not None and record is not None:
        report = Report(
            record.batch,
            transaction,
            calling,
            where,
            info.committed,
            info.failed,
            time.time(),
            how,
        )
        try:
            path = write_report(store, report)
        except OSError as exc:
            status, why = PROCESSING_FAILURE, f"cannot keep the report: {exc.strerror or exc}"
        else:
            logger.info(
                "COMMIT-REPORTED role=scu transaction_uid=%s calling_ae=%s peer=%s "
                "committed=%d failed=%d destination=%s recorded=%s",
                escape(transaction),
                calling,
                where,
                len(info.committed),
                len(info.failed),
                record.destination,
                path.name,
            )
            return SUCCESS
    logger.warning(
        "COMMIT-FAILED role=scu transaction_uid=%s calling_ae=%s peer=%s status=0x%04X "
        "reason=report refused: %s",
        escape(transaction) or "-",
        calling,
        where,
        status,
        escape(why),
        extra=ledger_extra(
            EventKind.COMMIT_FAILED,
            calling_ae=calling,
            peer=where,
            status=f"0x{status:04X}",
            reason=f"role=scu transaction {transaction or '-'}: report refused: {why}",
        ),
    )
    return status
