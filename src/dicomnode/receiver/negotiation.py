"""Pure association negotiation of the lean receiver: parse the request, choose, answer.

No sockets, no clock. The acceptance rules match the pynetdicom transport
(``UNRESTRICTED_STORAGE_SERVICE``): every storage-like abstract syntax (a
storage SOP class, a private UID, or a UID pydicom does not know) is accepted
in the transfer syntax the sender proposes first, so objects are kept in the
sender's own encoding; Verification is accepted in an uncompressed syntax;
any other service (query/retrieve, worklist, print, ...) is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from pydicom._uid_dict import UID_dictionary

from dicomnode.upperlayer import (
    APPLICATION_CONTEXT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    VERIFICATION_SOP_CLASS,
    item,
    sub_items,
    uid_text,
)

#: Presentation context results (PS3.8 9.3.3.2).
ACCEPTANCE: Final = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED: Final = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED: Final = 4

_UNCOMPRESSED: Final = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
#: Length of the fixed part of an A-ASSOCIATE-RQ/AC body (version .. reserved).
_FIXED_PART: Final = 68


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """One presentation context of an A-ASSOCIATE-RQ."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ the receiver uses.

    Attributes
    ----------
    called_ae, calling_ae : str
        AE titles without padding (:func:`ae_text`), otherwise as sent.
    application_context : str
        Application context name (the DICOM one is 1.2.840.10008.3.1.1.1).
    contexts : tuple of ProposedContext
        Proposed presentation contexts in request order.
    max_pdu : int
        The requestor's maximum PDU length (0 = unlimited).
    fixed_part : bytes
        Protocol version .. reserved bytes, echoed in the A-ASSOCIATE-AC.
    """

    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu: int
    fixed_part: bytes


@dataclass(frozen=True, slots=True)
class ContextResult:
    """Our answer to one proposed presentation context."""

    context_id: int
    result: int
    abstract_syntax: str
    transfer_syntax: str


def ae_text(raw: bytes) -> str:
    """Decode an AE title field, removing only DICOM's padding.

    Leading and trailing spaces are padding (PS3.8 9.3.2), and so are trailing
    NULs some implementations write; nothing else is changed. Bytes outside
    ASCII are kept (as Latin-1) so admission sees and refuses them.
    """
    return raw.rstrip(b"\x00").strip(b" ").decode("latin-1")


def parse_associate_rq(body: bytes | bytearray | memoryview) -> AssociateRequest:
    """Decode the body of an A-ASSOCIATE-RQ PDU (everything after its 6-byte header).

    Raises
    ------
    ValueError
        When the body is too short to hold the fixed fields.
    """
    if len(body) < _FIXED_PART:
        raise ValueError(f"A-ASSOCIATE-RQ of {len(body)} bytes is too short")
    raw = bytes(body)
    called = ae_text(raw[4:20])
    calling = ae_text(raw[20:36])
    app_context = ""
    contexts: list[ProposedContext] = []
    max_pdu = 0
    for item_type, value in sub_items(raw[_FIXED_PART:]):
        if item_type == 0x10:
            app_context = uid_text(value)
        elif item_type == 0x20 and len(value) >= 4:
            abstract = ""
            syntaxes: list[str] = []
            for sub_type, sub in sub_items(value[4:]):
                if sub_type == 0x30:
                    abstract = uid_text(sub)
                elif sub_type == 0x40:
                    syntaxes.append(uid_text(sub))
            contexts.append(ProposedContext(value[0], abstract, tuple(syntaxes)))
        elif item_type == 0x50:
            for sub_type, sub in sub_items(value):
                if sub_type == 0x51 and len(sub) >= 4:
                    max_pdu = int(struct.unpack_from(">I", sub)[0])
    return AssociateRequest(
        called, calling, app_context, tuple(contexts), max_pdu, raw[:_FIXED_PART]
    )


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


def associate_ac(request: AssociateRequest, results: list[ContextResult], max_pdu: int) -> bytes:
    """Encode the A-ASSOCIATE-AC answering ``request`` with ``results``.

    ``max_pdu`` is the largest P-DATA-TF PDU we accept (0 = unlimited).
    """
    items = [item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
    for res in results:
        syntax = item(0x40, res.transfer_syntax.encode("ascii", "replace"))
        items.append(item(0x21, bytes((res.context_id, 0, res.result, 0)) + syntax))
    user = (
        item(0x51, struct.pack(">I", max_pdu))
        + item(0x52, IMPLEMENTATION_UID.encode("ascii"))
        + item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    )
    items.append(item(0x50, user))
    body = request.fixed_part + b"".join(items)
    return struct.pack(">BBI", ASSOCIATE_AC, 0, len(body)) + body


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """Encode an A-ASSOCIATE-RJ PDU."""
    return struct.pack(">BBIBBBB", ASSOCIATE_RJ, 0, 4, 0, result, source, reason)
