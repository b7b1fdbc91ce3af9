"""Storage Commitment Push Model data sets of the requesting side (PS3.4 J.3.2, J.3.3).

The forwarder asks a destination to commit what it acknowledged: it encodes
the Action Information of the N-ACTION-RQ (Transaction UID and the Referenced
SOP Sequence) and decodes the Event Information of the N-EVENT-REPORT-RQ that
answers it (Referenced SOP Sequence of the committed instances, Failed SOP
Sequence with each Failure Reason). Both the receiver (reports arriving on the
node's port) and the forwarder (reports on its own association) decode with
:func:`parse_event_info`. Pure: bytes in, values out. pydicom is imported
only when a data set is encoded or decoded: a sender that asks no destination
for commitment does not load it (with numpy, ~45 MB of a 1 GB send's peak).
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Final

from dicomnode.dul.meta import EXPLICIT_VR_BE, IMPLICIT_VR_LE

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: N-ACTION Action Type ID "Request Storage Commitment" (PS3.4 J.3.2).
REQUEST_COMMITMENT: Final = 1
#: N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3): all committed / some failed.
ALL_COMMITTED: Final = 1
SOME_FAILED: Final = 2


@dataclass(frozen=True, slots=True)
class EventInfo:
    """The Event Information of a storage commitment N-EVENT-REPORT.

    Attributes
    ----------
    transaction_uid : str
        The Transaction UID of the request it answers.
    committed : tuple of (str, str)
        (SOP Class UID, SOP Instance UID) of each committed instance.
    failed : tuple of (str, str, int)
        (SOP Class UID, SOP Instance UID, Failure Reason) of each instance not committed
        (Failure Reason 0 when the destination left it out).
    """

    transaction_uid: str
    committed: tuple[tuple[str, str], ...]
    failed: tuple[tuple[str, str, int], ...]


def _flags(transfer_syntax: str) -> tuple[bool, bool]:
    """Return (implicit VR, little endian) of an uncompressed transfer syntax."""
    return transfer_syntax == IMPLICIT_VR_LE, transfer_syntax != EXPLICIT_VR_BE


def encode_action_info(
    transaction_uid: str, instances: list[tuple[str, str]], transfer_syntax: str
) -> bytes:
    """Encode the Action Information of a Request Storage Commitment N-ACTION.

    Parameters
    ----------
    transaction_uid : str
        A new UID naming this request.
    instances : list of (str, str)
        (SOP Class UID, SOP Instance UID) of each instance to commit.
    transfer_syntax : str
        The accepted (uncompressed) transfer syntax of the presentation context.
    """
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    implicit, little = _flags(transfer_syntax)
    out = DicomBytesIO()
    out.is_implicit_VR = implicit
    out.is_little_endian = little
    write_dataset(out, ds)
    return out.getvalue()


def parse_event_info(data: bytes, transfer_syntax: str) -> EventInfo:
    """Decode the Event Information of a storage commitment N-EVENT-REPORT.

    Raises
    ------
    ValueError
        When it cannot be decoded, has no Transaction UID, or an item lacks its UIDs.
    """
    from pydicom.filereader import read_dataset

    implicit, little = _flags(transfer_syntax)
    try:
        ds = read_dataset(BytesIO(data), implicit, little)
        transaction = str(ds.get("TransactionUID", "") or "").strip()
        committed: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        for item in ds.get("ReferencedSOPSequence") or ():
            committed.append(_uids(item))
        for item in ds.get("FailedSOPSequence") or ():
            reason = item.get("FailureReason", 0)
            failed.append((*_uids(item), int(reason or 0)))
    except (EOFError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        raise ValueError(f"undecodable Event Information: {exc}") from None
    if not transaction:
        raise ValueError("no Transaction UID")
    return EventInfo(transaction, tuple(committed), tuple(failed))


def _uids(item: Dataset) -> tuple[str, str]:
    sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
    sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
    if not sop_instance:
        raise ValueError("an item lacks its Referenced SOP Instance UID")
    return sop_class, sop_instance
