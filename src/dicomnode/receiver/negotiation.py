"""Pure association negotiation of the lean receiver: which proposed contexts to accept.

No sockets, no clock, no bytes: the A-ASSOCIATE-RQ is decoded and the answer
encoded by :mod:`dicomnode.dul.pdu`; this module only decides. The acceptance
rules: every storage-like abstract syntax (a storage SOP class, a private UID,
or a UID pydicom does not know) is accepted in the transfer syntax the sender
proposes first, so objects are kept in the sender's own encoding; Verification
is accepted in an uncompressed syntax; any other service (query/retrieve,
worklist, print, ...) is refused.
"""

from __future__ import annotations

from typing import Final

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.dul.dimse import VERIFICATION_SOP_CLASS
from dicomnode.dul.pdu import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    ContextResult,
    ProposedContext,
)

_UNCOMPRESSED: Final = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)


def is_storage_like(uid: str) -> bool:
    """Return True for SOP classes the receiver stores.

    Storage SOP classes (pydicom's name contains "Storage", excluding Storage
    Commitment and Storage Management), private UIDs and UIDs pydicom does not
    know: a new or vendor storage class must not be refused.
    """
    entry = UID_dictionary.get(uid)
    if entry is None:
        return True
    name, kind = entry[0], entry[1]
    return kind == "SOP Class" and "Storage" in name and not name.startswith("Storage")


def negotiate(contexts: tuple[ProposedContext, ...]) -> list[ContextResult]:
    """Answer every proposed context (same order)."""
    results = []
    for cx in contexts:
        first = cx.transfer_syntaxes[0] if cx.transfer_syntaxes else ""
        if cx.abstract_syntax == VERIFICATION_SOP_CLASS:
            chosen = next((ts for ts in cx.transfer_syntaxes if ts in _UNCOMPRESSED), "")
            result = ACCEPTANCE if chosen else TRANSFER_SYNTAXES_NOT_SUPPORTED
        elif is_storage_like(cx.abstract_syntax) and cx.abstract_syntax:
            chosen = first
            result = ACCEPTANCE if chosen else TRANSFER_SYNTAXES_NOT_SUPPORTED
        else:
            chosen, result = "", ABSTRACT_SYNTAX_NOT_SUPPORTED
        results.append(ContextResult(cx.context_id, result, cx.abstract_syntax, chosen or first))
    return results
