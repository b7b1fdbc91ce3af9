"""Storage Commitment Push Model (PS3.4 Annex J), SCP side: the pure part.

Decodes the Action Information of an N-ACTION-RQ (Transaction UID and the
Referenced SOP Sequence), encodes the Event Information of the N-EVENT-REPORT
(Referenced SOP Sequence, Failed SOP Sequence with Failure Reasons), turns a
commitment into the small JSON document kept while its report is pending,
and decides the retry delay. No sockets, no files, no clock:
:mod:`.committer` does the checking, keeping and sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicomnode.dul.dimse import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_SOP_CLASS

#: N-ACTION Action Type ID "Request Storage Commitment" (PS3.4 J.3.2).
REQUEST_COMMITMENT: Final = 1
#: N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3): all committed / some failed.
ALL_COMMITTED: Final = 1
SOME_FAILED: Final = 2
#: Failure Reasons (PS3.4 J.3.3.1.1 / C.14.1.1.1).
PROCESSING_FAILURE: Final = 0x0110
NO_SUCH_OBJECT_INSTANCE: Final = 0x0112
CLASS_INSTANCE_CONFLICT: Final = 0x0119
#: DIMSE statuses of the N-ACTION-RSP (PS3.7 10.1.4.1.10, C).
SUCCESS: Final = 0x0000
NO_SUCH_ACTION_TYPE: Final = 0x0123
NO_SUCH_SOP_CLASS: Final = 0x0118
NO_SUCH_SOP_INSTANCE: Final = 0x0112
INVALID_ARGUMENT: Final = 0x0115
#: Retry delays of an undelivered report: first, growth factor, longest.
FIRST_RETRY_S: Final = 2.0
RETRY_FACTOR: Final = 2.0
LONGEST_RETRY_S: Final = 60.0
#: A report not delivered within this long is given up (logged ``COMMIT-FAILED``).
GIVE_UP_S: Final = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Reference:
    """One referenced instance: SOP Class UID, SOP Instance UID."""

    sop_class: str
    sop_instance: str


@dataclass(frozen=True, slots=True)
class Commitment:
    """One storage commitment request and, once checked, its result.

    Attributes
    ----------
    transaction_uid : str
        The requester's Transaction UID.
    calling : str
        The requester's calling AE title (as admitted).
    peer : str
        ``ip:port`` of the requester's association.
    requested : tuple of Reference
        The instances asked for, in request order.
    committed : tuple of Reference
        Those this node holds (set by the check).
    failed : tuple of (Reference, int)
        Those it does not, with the Failure Reason.
    created : float
        Wall-clock time of the request (for giving up).
    checked : bool
        Whether the instances were checked (``committed``/``failed`` are final).
    """

    transaction_uid: str
    calling: str
    peer: str
    requested: tuple[Reference, ...]
    committed: tuple[Reference, ...] = ()
    failed: tuple[tuple[Reference, int], ...] = ()
    created: float = 0.0
    checked: bool = False

    @property
    def event_type(self) -> int:
        """Return the N-EVENT-REPORT Event Type ID: 1 all committed, 2 some failed."""
        return SOME_FAILED if self.failed else ALL_COMMITTED

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document kept while the report is pending."""
        return {
            "transaction_uid": self.transaction_uid,
            "calling": self.calling,
            "peer": self.peer,
            "requested": [[r.sop_class, r.sop_instance] for r in self.requested],
            "committed": [[r.sop_class, r.sop_instance] for r in self.committed],
            "failed": [[r.sop_class, r.sop_instance, reason] for r, reason in self.failed],
            "created": self.created,
            "checked": self.checked,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Commitment:
        """Rebuild a commitment from :meth:`to_json`'s document.

        Raises
        ------
        KeyError, TypeError, ValueError
            When the document is not one.
        """
        return cls(
            str(doc["transaction_uid"]),
            str(doc["calling"]),
            str(doc["peer"]),
            tuple(Reference(str(c), str(i)) for c, i in doc["requested"]),
            tuple(Reference(str(c), str(i)) for c, i in doc["committed"]),
            tuple((Reference(str(c), str(i)), int(reason)) for c, i, reason in doc["failed"]),
            float(doc["created"]),
            bool(doc["checked"]),
        )


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """An N-ACTION-RQ as received: command values and the Action Information.

    ``data`` is None when the Action Information was too large to keep.
    """

    sop_class: str
    sop_instance: str
    action_type: int
    data: bytes | None
    transfer_syntax: str


def judge_action(request: ActionRequest) -> tuple[int, str] | None:
    """Return (N-ACTION-RSP status, reason) when the request cannot be served, else None."""
    if request.sop_class != STORAGE_COMMITMENT_SOP_CLASS:
        return NO_SUCH_SOP_CLASS, "not the Storage Commitment Push Model SOP class"
    if request.sop_instance != STORAGE_COMMITMENT_INSTANCE:
        return NO_SUCH_SOP_INSTANCE, "not its well-known SOP instance"
    if request.action_type != REQUEST_COMMITMENT:
        return NO_SUCH_ACTION_TYPE, f"action type {request.action_type}"
    if request.data is None:
        return PROCESSING_FAILURE, "Action Information too large"
    return None


def _syntax_flags(transfer_syntax: str) -> tuple[bool, bool]:
    """Return (implicit VR, little endian) of an uncompressed transfer syntax."""
    return transfer_syntax == ImplicitVRLittleEndian, transfer_syntax != ExplicitVRBigEndian


def parse_action(data: bytes, transfer_syntax: str) -> tuple[str, tuple[Reference, ...]]:
    """Decode the Action Information of a Request Storage Commitment N-ACTION.

    Returns
    -------
    tuple
        The Transaction UID and the referenced instances.

    Raises
    ------
    ValueError
        When the data set cannot be decoded or lacks the Transaction UID or the
        Referenced SOP Sequence, or an item lacks its UIDs.
    """
    implicit, little = _syntax_flags(transfer_syntax)
    try:
        ds = read_dataset(BytesIO(data), implicit, little)
        transaction = str(ds.get("TransactionUID", "") or "").strip()
        items = ds.get("ReferencedSOPSequence")
        refs = []
        for entry in items or ():
            sop_class = str(entry.get("ReferencedSOPClassUID", "") or "").strip()
            sop_instance = str(entry.get("ReferencedSOPInstanceUID", "") or "").strip()
            if not sop_class or not sop_instance:
                raise ValueError("a Referenced SOP Sequence item lacks its UIDs")
            refs.append(Reference(sop_class, sop_instance))
    except (EOFError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        raise ValueError(f"undecodable Action Information: {exc}") from None
    if not transaction:
        raise ValueError("no Transaction UID")
    if items is None:
        raise ValueError("no Referenced SOP Sequence")
    return transaction, tuple(refs)


def _item(ref: Reference, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class
    item.ReferencedSOPInstanceUID = ref.sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


def encode_report(commitment: Commitment, transfer_syntax: str) -> bytes:
    """Encode the Event Information of the N-EVENT-REPORT (PS3.4 J.3.3, Table J.3-2).

    The Referenced SOP Sequence lists the committed instances (left out when
    none), the Failed SOP Sequence the others with their Failure Reason (left
    out when none).
    """
    ds = Dataset()
    ds.TransactionUID = commitment.transaction_uid
    if commitment.failed:
        ds.FailedSOPSequence = [_item(ref, reason) for ref, reason in commitment.failed]
    if commitment.committed or not commitment.failed:
        ds.ReferencedSOPSequence = [_item(ref) for ref in commitment.committed]
    implicit, little = _syntax_flags(transfer_syntax)
    out = DicomBytesIO()
    out.is_implicit_VR = implicit
    out.is_little_endian = little
    write_dataset(out, ds)
    return out.getvalue()


def retry_delay(attempts: int) -> float:
    """Return the wait before delivery attempt ``attempts + 1`` (attempts >= 1)."""
    return float(min(LONGEST_RETRY_S, FIRST_RETRY_S * RETRY_FACTOR ** max(0, attempts - 1)))


def fragments(data: bytes, max_pdu: int) -> list[bytes]:
    """Split ``data`` into PDV fragments that fit the peer's maximum PDU length (0 = none)."""
    size = (min(max_pdu, 1 << 20) if max_pdu else 1 << 20) - 6
    size = max(size, 256)
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]
