"""PDUs and association items of the DICOM upper layer (PS3.8 9.3), for both roles.

Named as the standard (and pynetdicom's ``pdu`` module) names them.
:class:`A_ASSOCIATE_RQ`, :class:`A_ASSOCIATE_AC` and :class:`A_ASSOCIATE_RJ`
encode and decode the association PDUs (cold path: once per association);
:func:`p_data_tf` and :func:`iter_pdvs` are the P-DATA-TF codec of the hot
path, and :data:`PDV_HEADER` is the header the receiver reads while streaming.
The fixed A-RELEASE-RQ/RP and A-ABORT PDUs are byte constants. The user
information item (maximum PDU length, implementation class UID and version
name) is built by one function for requests and answers.

Pure: no sockets, no clock. Decoders take the PDU body (everything after the
6-byte PDU header) and raise ValueError for what cannot be decoded.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from dicomnode import __version__

#: dicomnode's implementation class UID (a UUID-derived UID, PS3.5 B.2), sent in
#: every association and written into the File Meta Information of received objects.
IMPLEMENTATION_UID: Final = "2.25.96503559638207701885455955724398996808"
#: Implementation version name (at most 16 characters).
IMPLEMENTATION_VERSION: Final = f"DICOMNODE_{__version__}"[:16]
#: The DICOM application context name (PS3.7 A.2.1).
APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"


class PduType(enum.IntEnum):
    """PDU types (PS3.8 9.3.1)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


#: The PDU header: type, reserved byte, 4-byte length of the body that follows.
PDU_HEADER: Final = struct.Struct(">BBI")
PDU_HEADER_LEN: Final = 6
#: A PDV item header inside a P-DATA-TF: item length, presentation context ID,
#: message control header (PS3.8 9.3.5.1, E.2).
PDV_HEADER: Final = struct.Struct(">IBB")
#: Message control header bits: the fragment is a command (else data set) ...
PDV_COMMAND: Final = 0x01
#: ... and it is the last fragment of its command or data set.
PDV_LAST: Final = 0x02

A_RELEASE_RQ_PDU: Final = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
A_RELEASE_RP_PDU: Final = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
#: A-ABORT, source 0 (service user), reason 0.
A_ABORT_PDU: Final = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
#: A-ABORT, source 2 (service provider), reason 2 (unexpected PDU).
A_ABORT_UNEXPECTED_PDU: Final = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"

#: Presentation context results in an A-ASSOCIATE-AC (PS3.8 9.3.3.2).
ACCEPTANCE: Final = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED: Final = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED: Final = 4
#: At most this many presentation contexts in one association (odd IDs 1..255).
MAX_PRESENTATION_CONTEXTS: Final = 128

# Item types (PS3.8 9.3.2 - 9.3.3, D.3.3)
_APPLICATION_CONTEXT_ITEM: Final = 0x10
_PRESENTATION_CONTEXT_RQ_ITEM: Final = 0x20
_PRESENTATION_CONTEXT_AC_ITEM: Final = 0x21
_ABSTRACT_SYNTAX_ITEM: Final = 0x30
_TRANSFER_SYNTAX_ITEM: Final = 0x40
_USER_INFORMATION_ITEM: Final = 0x50
_MAXIMUM_LENGTH_ITEM: Final = 0x51
_IMPLEMENTATION_CLASS_UID_ITEM: Final = 0x52
_IMPLEMENTATION_VERSION_NAME_ITEM: Final = 0x55
#: Length of the fixed part of an A-ASSOCIATE-RQ/AC body (protocol version .. reserved).
_FIXED_PART: Final = 68

_REJECT_SOURCES: Final = {1: "service user", 2: "service provider (ACSE)", 3: "service provider"}
_REJECT_REASONS: Final = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def item(item_type: int, body: bytes) -> bytes:
    """Encode one variable item: type, reserved byte, 2-byte length, body."""
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def ae_title_field(title: str) -> bytes:
    """Return ``title`` as the 16-byte, space-padded AE title field of an association PDU.

    Raises
    ------
    ValueError
        For an empty title, one longer than 16 characters or containing a backslash.
    """
    raw = title.strip().encode("ascii")
    if not raw or len(raw) > 16 or b"\\" in raw:
        raise ValueError(f"invalid AE title {title!r}")
    return raw.ljust(16)


def ae_text(raw: bytes | bytearray | memoryview) -> str:
    """Decode an AE title field, removing only DICOM's padding.

    Leading and trailing spaces are padding (PS3.8 9.3.2), and so are trailing
    NULs some implementations write; nothing else is changed. Bytes outside
    ASCII are kept (as Latin-1) so admission sees and refuses them.
    """
    return bytes(raw).rstrip(b"\x00").strip(b" ").decode("latin-1")


def uid_text(raw: bytes | bytearray | memoryview) -> str:
    """Decode a UID or AE value, dropping NUL and space padding."""
    return bytes(raw).strip(b"\x00 ").decode("ascii", errors="replace")


def sub_items(raw: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """Split a run of variable items into ``(type, body)`` pairs; a cut-off last item is shortened."""
    out = []
    pos = 0
    while pos + 4 <= len(raw):
        length = struct.unpack_from(">H", raw, pos + 2)[0]
        out.append((raw[pos], bytes(raw[pos + 4 : pos + 4 + length])))
        pos += 4 + length
    return out


def _pdu(pdu_type: PduType, body: bytes) -> bytes:
    return PDU_HEADER.pack(pdu_type, 0, len(body)) + body


def _user_information(max_pdu: int) -> bytes:
    """The user information item of our requests and answers (PS3.7 D.3.3)."""
    return item(
        _USER_INFORMATION_ITEM,
        item(_MAXIMUM_LENGTH_ITEM, struct.pack(">I", max_pdu))
        + item(_IMPLEMENTATION_CLASS_UID_ITEM, IMPLEMENTATION_UID.encode("ascii"))
        + item(_IMPLEMENTATION_VERSION_NAME_ITEM, IMPLEMENTATION_VERSION.encode("ascii")),
    )


def _max_pdu_of(user_information: bytes) -> int:
    for sub_type, sub in sub_items(user_information):
        if sub_type == _MAXIMUM_LENGTH_ITEM and len(sub) >= 4:
            return int(struct.unpack_from(">I", sub)[0])
    return 0


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """One presentation context of an A-ASSOCIATE-RQ."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ContextResult:
    """The answer to one proposed presentation context (an A-ASSOCIATE-AC item)."""

    context_id: int
    result: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class A_ASSOCIATE_RQ:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), the parts dicomnode uses.

    Attributes
    ----------
    called_ae, calling_ae : str
        AE titles without padding (:func:`ae_text`), otherwise as sent.
    application_context : str
        Application context name (the DICOM one is :data:`APPLICATION_CONTEXT`).
    contexts : tuple of ProposedContext
        Proposed presentation contexts in request order.
    max_pdu : int
        The requestor's maximum PDU length (0 = unlimited).
    fixed_part : bytes
        Protocol version .. reserved bytes as received, echoed in the A-ASSOCIATE-AC
        (empty for a request we encode).
    """

    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu: int
    fixed_part: bytes = b""

    def encode(self) -> bytes:
        """Return the whole PDU (our implementation class UID and version name included).

        Raises
        ------
        ValueError
            For an invalid AE title or more than :data:`MAX_PRESENTATION_CONTEXTS` contexts.
        """
        if len(self.contexts) > MAX_PRESENTATION_CONTEXTS:
            raise ValueError(
                f"{len(self.contexts)} presentation contexts (at most {MAX_PRESENTATION_CONTEXTS})"
            )
        items = [item(_APPLICATION_CONTEXT_ITEM, self.application_context.encode("ascii"))]
        for cx in self.contexts:
            body = bytes((cx.context_id, 0, 0, 0))
            body += item(_ABSTRACT_SYNTAX_ITEM, cx.abstract_syntax.encode("ascii"))
            body += b"".join(
                item(_TRANSFER_SYNTAX_ITEM, ts.encode("ascii")) for ts in cx.transfer_syntaxes
            )
            items.append(item(_PRESENTATION_CONTEXT_RQ_ITEM, body))
        items.append(_user_information(self.max_pdu))
        fixed = (
            struct.pack(">HH", 1, 0)
            + ae_title_field(self.called_ae)
            + ae_title_field(self.calling_ae)
            + bytes(32)
        )
        return _pdu(PduType.A_ASSOCIATE_RQ, fixed + b"".join(items))

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> A_ASSOCIATE_RQ:
        """Decode the body of an A-ASSOCIATE-RQ PDU (everything after its 6-byte header).

        Raises
        ------
        ValueError
            When the body is too short to hold the fixed fields.
        """
        if len(body) < _FIXED_PART:
            raise ValueError(f"A-ASSOCIATE-RQ of {len(body)} bytes is too short")
        raw = bytes(body)
        app_context = ""
        contexts: list[ProposedContext] = []
        max_pdu = 0
        for item_type, value in sub_items(raw[_FIXED_PART:]):
            if item_type == _APPLICATION_CONTEXT_ITEM:
                app_context = uid_text(value)
            elif item_type == _PRESENTATION_CONTEXT_RQ_ITEM and len(value) >= 4:
                abstract = ""
                syntaxes: list[str] = []
                for sub_type, sub in sub_items(value[4:]):
                    if sub_type == _ABSTRACT_SYNTAX_ITEM:
                        abstract = uid_text(sub)
                    elif sub_type == _TRANSFER_SYNTAX_ITEM:
                        syntaxes.append(uid_text(sub))
                contexts.append(ProposedContext(value[0], abstract, tuple(syntaxes)))
            elif item_type == _USER_INFORMATION_ITEM:
                max_pdu = _max_pdu_of(value)
        return cls(
            ae_text(raw[4:20]),
            ae_text(raw[20:36]),
            app_context,
            tuple(contexts),
            max_pdu,
            raw[:_FIXED_PART],
        )


@dataclass(frozen=True, slots=True)
class A_ASSOCIATE_AC:
    """An A-ASSOCIATE-AC PDU (PS3.8 9.3.3), the parts dicomnode uses.

    Attributes
    ----------
    fixed_part : bytes
        Protocol version .. reserved, echoed from the request.
    results : tuple of ContextResult
        One per proposed context (``abstract_syntax`` is empty when decoded: the
        answer does not carry it).
    max_pdu : int
        The acceptor's maximum PDU length (0 = unlimited).
    """

    fixed_part: bytes
    results: tuple[ContextResult, ...]
    max_pdu: int

    def encode(self) -> bytes:
        """Return the whole PDU (our implementation class UID and version name included)."""
        items = [item(_APPLICATION_CONTEXT_ITEM, APPLICATION_CONTEXT.encode("ascii"))]
        for res in self.results:
            syntax = item(_TRANSFER_SYNTAX_ITEM, res.transfer_syntax.encode("ascii", "replace"))
            items.append(
                item(
                    _PRESENTATION_CONTEXT_AC_ITEM,
                    bytes((res.context_id, 0, res.result, 0)) + syntax,
                )
            )
        items.append(_user_information(self.max_pdu))
        return _pdu(PduType.A_ASSOCIATE_AC, self.fixed_part + b"".join(items))

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> A_ASSOCIATE_AC:
        """Decode the body of an A-ASSOCIATE-AC PDU (a short body gives no results)."""
        raw = bytes(body)
        results: list[ContextResult] = []
        max_pdu = 0
        for item_type, value in sub_items(raw[_FIXED_PART:]):
            if item_type == _PRESENTATION_CONTEXT_AC_ITEM and len(value) >= 4:
                syntax = next(
                    (
                        uid_text(sub)
                        for t, sub in sub_items(value[4:])
                        if t == _TRANSFER_SYNTAX_ITEM
                    ),
                    "",
                )
                results.append(ContextResult(value[0], value[2], "", syntax))
            elif item_type == _USER_INFORMATION_ITEM:
                max_pdu = _max_pdu_of(value)
        return cls(raw[:_FIXED_PART], tuple(results), max_pdu)


@dataclass(frozen=True, slots=True)
class A_ASSOCIATE_RJ:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): result (1 permanent, 2 transient), source, reason."""

    result: int
    source: int
    reason: int

    def encode(self) -> bytes:
        """Return the whole PDU."""
        return _pdu(PduType.A_ASSOCIATE_RJ, bytes((0, self.result, self.source, self.reason)))

    @classmethod
    def decode(cls, body: bytes | bytearray | memoryview) -> A_ASSOCIATE_RJ:
        """Decode the body of an A-ASSOCIATE-RJ PDU.

        Raises
        ------
        ValueError
            When the body is shorter than 4 bytes.
        """
        if len(body) < 4:
            raise ValueError(f"A-ASSOCIATE-RJ of {len(body)} bytes is too short")
        return cls(body[1], body[2], body[3])

    def describe(self) -> str:
        """Return e.g. ``permanent, service user: calling AE title not recognized``."""
        kind = "permanent" if self.result == 1 else "transient"
        why = _REJECT_REASONS.get((self.source, self.reason), f"reason {self.reason}")
        return f"{kind}, {_REJECT_SOURCES.get(self.source, f'source {self.source}')}: {why}"


def p_data_tf(context_id: int, control: int, data: bytes) -> bytes:
    """Encode a P-DATA-TF PDU holding one PDV (control: :data:`PDV_COMMAND`, :data:`PDV_LAST`)."""
    return (
        struct.pack(
            ">BBIIBB", PduType.P_DATA_TF, 0, len(data) + 6, len(data) + 2, context_id, control
        )
        + data
    )


def iter_pdvs(body: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(context ID, control, fragment)`` of each PDV in a P-DATA-TF body.

    Raises
    ------
    ValueError
        When a PDV is shorter than its header or runs past the end of the PDU.
    """
    pos = 0
    while pos + 6 <= len(body):
        item_length, context_id, control = PDV_HEADER.unpack_from(body, pos)
        end = pos + 4 + item_length
        if item_length < 2 or end > len(body):
            raise ValueError("malformed P-DATA-TF")
        yield context_id, control, bytes(body[pos + 6 : end])
        pos = end
