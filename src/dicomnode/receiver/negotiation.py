"""Pure association negotiation of the lean receiver: which proposed contexts to accept.

No sockets, no clock, no bytes: the A-ASSOCIATE-RQ is decoded and the answer
encoded by :mod:`dicomnode.dul.pdu`; this module only decides. The acceptance
rules: every storage-like abstract syntax (a storage SOP class, a private UID,
or a UID pydicom does not know) is accepted in the transfer syntax the sender
proposes first, so objects are kept in the sender's own encoding; Verification
and Storage Commitment Push Model are accepted in an uncompressed syntax (the
SCP/SCU role selection for storage commitment: :func:`accepted_roles`); any other service (query/retrieve,
worklist, print, ...) is refused.
"""

from __future__ import annotations

from typing import Final

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.dul.dimse import STORAGE_COMMITMENT_SOP_CLASS, VERIFICATION_SOP_CLASS
from dicomnode.dul.pdu import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    ContextResult,
    ProposedContext,
    RoleSelection,
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


def negotiate(
    contexts: tuple[ProposedContext, ...], commitment_only: bool = False
) -> list[ContextResult]:
    """Answer every proposed context (same order).

    ``commitment_only`` (a committing destination admitted to deliver its
    reports): only Storage Commitment Push Model is accepted.
    """
    results = []
    for cx in contexts:
        first = cx.transfer_syntaxes[0] if cx.transfer_syntaxes else ""
        if commitment_only and cx.abstract_syntax != STORAGE_COMMITMENT_SOP_CLASS:
            chosen, result = "", ABSTRACT_SYNTAX_NOT_SUPPORTED
        elif cx.abstract_syntax in (VERIFICATION_SOP_CLASS, STORAGE_COMMITMENT_SOP_CLASS):
            chosen = next((ts for ts in cx.transfer_syntaxes if ts in _UNCOMPRESSED), "")
            result = ACCEPTANCE if chosen else TRANSFER_SYNTAXES_NOT_SUPPORTED
        elif is_storage_like(cx.abstract_syntax) and cx.abstract_syntax:
            chosen = first
            result = ACCEPTANCE if chosen else TRANSFER_SYNTAXES_NOT_SUPPORTED
        else:
            chosen, result = "", ABSTRACT_SYNTAX_NOT_SUPPORTED
        results.append(ContextResult(cx.context_id, result, cx.abstract_syntax, chosen or first))
    return results


def accepted_roles(
    roles: tuple[RoleSelection, ...], results: list[ContextResult]
) -> tuple[RoleSelection, ...]:
    """Answer the requestor's SCP/SCU role selection items.

    Only Storage Commitment takes part: a requestor that proposes to also be
    the SCP of its N-EVENT-REPORT (and whose context was accepted) is granted
    both roles, so the commitment report can come back on its association.
    """
    accepted = {r.abstract_syntax for r in results if r.result == ACCEPTANCE}
    return tuple(
        RoleSelection(role.sop_class_uid, role.scu, role.scp)
        for role in roles
        if role.sop_class_uid == STORAGE_COMMITMENT_SOP_CLASS
        and role.sop_class_uid in accepted
        and role.scp
    )
