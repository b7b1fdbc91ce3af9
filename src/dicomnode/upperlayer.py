"""Encoding and decoding of the DICOM upper layer (PS3.8) shared by both lean transports.

Pure byte handling: PDU types and fixed PDUs, variable items, AE title
fields, Implicit VR Little Endian command sets (PS3.7 9.3/9.1) and the
Explicit VR Little Endian File Meta Information of received objects. No
sockets and no pynetdicom; the sender (:mod:`dicomnode.forwarder.lean`) and
the receiver (:mod:`dicomnode.receiver.lean`) do the I/O.
"""

from __future__ import annotations

import struct
from typing import Final

from dicomnode import __version__

#: dicomnode's implementation class UID (a UUID-derived UID, PS3.5 B.2), sent in
#: every association and written into the File Meta Information of received objects.
IMPLEMENTATION_UID: Final = "2.25.96503559638207701885455955724398996808"
#: Implementation version name (at most 16 characters).
IMPLEMENTATION_VERSION: Final = f"DICOMNODE_{__version__}"[:16]
APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3)
ASSOCIATE_RQ: Final = 0x01
ASSOCIATE_AC: Final = 0x02
ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
RELEASE_RQ: Final = 0x05
RELEASE_RP: Final = 0x06
ABORT: Final = 0x07

RELEASE_RQ_PDU: Final = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP_PDU: Final = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
#: A-ABORT, source 0 (service user), reason 0.
ABORT_PDU: Final = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
#: A-ABORT, source 2 (service provider), reason 2 (unexpected PDU).
ABORT_UNEXPECTED_PDU: Final = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"

# Command set elements (PS3.7 E.1)
AFFECTED_SOP_CLASS: Final = 0x00000002
COMMAND_FIELD: Final = 0x00000100
MESSAGE_ID: Final = 0x00000110
MESSAGE_ID_RESPONDED: Final = 0x00000120
DATA_SET_TYPE: Final = 0x00000800
STATUS: Final = 0x00000900
AFFECTED_SOP_INSTANCE: Final = 0x00001000
#: CommandDataSetType value meaning "no data set follows".
NO_DATA_SET: Final = 0x0101

C_STORE_RQ: Final = 0x0001
C_ECHO_RQ: Final = 0x0030
C_CANCEL_RQ: Final = 0x0FFF

#: Explicit VR with a 4-byte length field (PS3.5 7.1.2).
LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


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


def command_element(tag: int, value: bytes) -> bytes:
    """Encode one Implicit VR Little Endian element, padded to even length."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """Encode a command set: the group length element followed by ``elements`` in order."""
    body = b"".join(command_element(tag, value) for tag, value in elements)
    return command_element(0x00000000, struct.pack("<I", len(body))) + body


def us(value: int) -> bytes:
    """Encode an unsigned short value."""
    return struct.pack("<H", value)


def parse_command(raw: bytes | bytearray) -> dict[int, bytes]:
    """Decode an Implicit VR Little Endian command set into ``{tag: raw value}``.

    Raises
    ------
    ValueError
        When an element runs past the end.
    """
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        end = pos + 8 + length
        if end > len(raw):
            raise ValueError("truncated command set")
        out[(group << 16) | elem] = bytes(raw[pos + 8 : end])
        pos = end
    return out


def command_us(command: dict[int, bytes], tag: int) -> int | None:
    """Return the unsigned short value of ``tag`` in a decoded command set, or None."""
    value = command.get(tag)
    if value is None or len(value) < 2:
        return None
    return int(struct.unpack_from("<H", value)[0])


def p_data_pdu(context_id: int, control: int, data: bytes) -> bytes:
    """Encode a P-DATA-TF PDU holding one PDV (control: bit 0 command, bit 1 last fragment)."""
    return (
        struct.pack(">BBIIBB", P_DATA_TF, 0, len(data) + 6, len(data) + 2, context_id, control)
        + data
    )


def response_command(
    request_field: int, message_id: int, sop_class: str, sop_instance: str, status: int
) -> bytes:
    """Encode the response command set (no data set) to a request with ``request_field``."""
    elements = [(AFFECTED_SOP_CLASS, sop_class.encode("ascii", "replace"))] if sop_class else []
    elements += [
        (COMMAND_FIELD, us(request_field | 0x8000)),
        (MESSAGE_ID_RESPONDED, us(message_id)),
        (DATA_SET_TYPE, us(NO_DATA_SET)),
        (STATUS, us(status)),
    ]
    if sop_instance:
        elements.append((AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii", "replace")))
    return command_set(elements)


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b" " if vr in (b"AE", b"SH") else b"\x00"
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


#: Implementation Class UID and Version Name elements, the same in every file we write.
_IMPLEMENTATION_META: Final = _meta_element(
    0x0012, b"UI", IMPLEMENTATION_UID.encode("ascii")
) + _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii"))


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Return preamble, ``DICM`` and the File Meta Information of a received object (PS3.10 7.1).

    The data set bytes as received follow it unchanged; ``source_ae`` is the
    calling AE title (Source Application Entity Title), as DCMTK's storescp writes it.
    """
    body = (
        _meta_element(0x0001, b"OB", b"\x00\x01")
        + _meta_element(0x0002, b"UI", sop_class.encode("ascii", "replace"))
        + _meta_element(0x0003, b"UI", sop_instance.encode("ascii", "replace"))
        + _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii", "replace"))
        + _IMPLEMENTATION_META
    )
    if source_ae:
        body += _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace"))
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return bytes(128) + b"DICM" + length + body
