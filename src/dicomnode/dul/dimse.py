"""DIMSE command sets (PS3.7 9.3, 10.3, E.1): Implicit VR Little Endian, both roles.

Encodes and decodes command sets as ``{tag: raw value}``; builds the
C-STORE-RQ the forwarder sends and the response command sets the receiver
answers with. The command fields of N-EVENT-REPORT and N-ACTION (storage
commitment) are declared here with their elements, so a new DIMSE service is
added in this module and served by the roles. Pure byte handling.
"""

from __future__ import annotations

import struct
from typing import Final

#: The Verification SOP class, the abstract syntax of C-ECHO (PS3.4 A.4).
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"

# Command set elements (PS3.7 E.1)
COMMAND_GROUP_LENGTH: Final = 0x00000000
AFFECTED_SOP_CLASS: Final = 0x00000002
REQUESTED_SOP_CLASS: Final = 0x00000003
COMMAND_FIELD: Final = 0x00000100
MESSAGE_ID: Final = 0x00000110
MESSAGE_ID_RESPONDED: Final = 0x00000120
PRIORITY: Final = 0x00000700
DATA_SET_TYPE: Final = 0x00000800
STATUS: Final = 0x00000900
ERROR_COMMENT: Final = 0x00000902
AFFECTED_SOP_INSTANCE: Final = 0x00001000
REQUESTED_SOP_INSTANCE: Final = 0x00001001
EVENT_TYPE_ID: Final = 0x00001002
ACTION_TYPE_ID: Final = 0x00001008
#: CommandDataSetType value meaning "no data set follows" (any other value: one follows).
NO_DATA_SET: Final = 0x0101
#: CommandDataSetType value we send when a data set follows.
DATA_SET_PRESENT: Final = 0x0000
PRIORITY_MEDIUM: Final = 0x0000

# Command fields (PS3.7 E.1); a response is its request's field | RESPONSE.
C_STORE_RQ: Final = 0x0001
C_ECHO_RQ: Final = 0x0030
N_EVENT_REPORT_RQ: Final = 0x0100
N_ACTION_RQ: Final = 0x0130
C_CANCEL_RQ: Final = 0x0FFF
RESPONSE: Final = 0x8000
C_STORE_RSP: Final = C_STORE_RQ | RESPONSE


def us(value: int) -> bytes:
    """Encode an unsigned short value."""
    return struct.pack("<H", value)


def command_element(tag: int, value: bytes) -> bytes:
    """Encode one Implicit VR Little Endian element, padded to even length."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """Encode a command set: the group length element followed by ``elements`` in order."""
    body = b"".join(command_element(tag, value) for tag, value in elements)
    return command_element(COMMAND_GROUP_LENGTH, struct.pack("<I", len(body))) + body


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


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """Encode a C-STORE-RQ command set (priority medium, a data set follows)."""
    return command_set(
        [
            (AFFECTED_SOP_CLASS, sop_class_uid.encode("ascii")),
            (COMMAND_FIELD, us(C_STORE_RQ)),
            (MESSAGE_ID, us(message_id)),
            (PRIORITY, us(PRIORITY_MEDIUM)),
            (DATA_SET_TYPE, us(DATA_SET_PRESENT)),
            (AFFECTED_SOP_INSTANCE, sop_instance_uid.encode("ascii")),
        ]
    )


def response_command(
    request_field: int, message_id: int, sop_class: str, sop_instance: str, status: int
) -> bytes:
    """Encode the response command set (no data set) to a request with ``request_field``."""
    elements = [(AFFECTED_SOP_CLASS, sop_class.encode("ascii", "replace"))] if sop_class else []
    elements += [
        (COMMAND_FIELD, us(request_field | RESPONSE)),
        (MESSAGE_ID_RESPONDED, us(message_id)),
        (DATA_SET_TYPE, us(NO_DATA_SET)),
        (STATUS, us(status)),
    ]
    if sop_instance:
        elements.append((AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii", "replace")))
    return command_set(elements)
