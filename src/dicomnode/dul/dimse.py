"""DIMSE command sets (PS3.7 9.3, 10.3, E.1): Implicit VR Little Endian, both roles.

Encodes and decodes command sets as ``{tag: raw value}``; builds the
C-STORE-RQ the forwarder sends and the response command sets the receiver
answers with, the N-ACTION-RSP and N-EVENT-REPORT-RQ of the storage
commitment SCP, and the N-ACTION-RQ and N-EVENT-REPORT-RSP of its SCU. A new DIMSE service is added in this module and served by the
roles. Pure byte handling.
"""

from __future__ import annotations

import struct
from typing import Final

#: The Verification SOP class, the abstract syntax of C-ECHO (PS3.4 A.4).
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"
#: The Storage Commitment Push Model SOP class and its well-known instance (PS3.4 J.3.5).
STORAGE_COMMITMENT_SOP_CLASS: Final = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE: Final = "1.2.840.10008.1.20.1.1"

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
N_EVENT_REPORT_RSP: Final = N_EVENT_REPORT_RQ | RESPONSE
N_ACTION_RSP: Final = N_ACTION_RQ | RESPONSE


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


def c_echo_rq(message_id: int) -> bytes:
    """Encode a C-ECHO-RQ command set (Verification, no data set)."""
    return command_set(
        [
            (AFFECTED_SOP_CLASS, VERIFICATION_SOP_CLASS.encode("ascii")),
            (COMMAND_FIELD, us(C_ECHO_RQ)),
            (MESSAGE_ID, us(message_id)),
            (DATA_SET_TYPE, us(NO_DATA_SET)),
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


def n_action_rsp(
    message_id: int, sop_class: str, sop_instance: str, action_type: int, status: int
) -> bytes:
    """Encode an N-ACTION-RSP command set (no Action Reply data set; PS3.7 10.3.4)."""
    elements = [
        (AFFECTED_SOP_CLASS, sop_class.encode("ascii", "replace")),
        (COMMAND_FIELD, us(N_ACTION_RSP)),
        (MESSAGE_ID_RESPONDED, us(message_id)),
        (DATA_SET_TYPE, us(NO_DATA_SET)),
        (STATUS, us(status)),
        (AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii", "replace")),
    ]
    if status == 0:
        elements.append((ACTION_TYPE_ID, us(action_type)))
    return command_set(elements)


def n_event_report_rq(message_id: int, sop_class: str, sop_instance: str, event_type: int) -> bytes:
    """Encode an N-EVENT-REPORT-RQ command set; an Event Information data set follows."""
    return command_set(
        [
            (AFFECTED_SOP_CLASS, sop_class.encode("ascii")),
            (COMMAND_FIELD, us(N_EVENT_REPORT_RQ)),
            (MESSAGE_ID, us(message_id)),
            (DATA_SET_TYPE, us(DATA_SET_PRESENT)),
            (AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii")),
            (EVENT_TYPE_ID, us(event_type)),
        ]
    )


def n_action_rq(message_id: int, sop_class: str, sop_instance: str, action_type: int) -> bytes:
    """Encode an N-ACTION-RQ command set; an Action Information data set follows (PS3.7 10.3.4)."""
    return command_set(
        [
            (REQUESTED_SOP_CLASS, sop_class.encode("ascii")),
            (COMMAND_FIELD, us(N_ACTION_RQ)),
            (MESSAGE_ID, us(message_id)),
            (DATA_SET_TYPE, us(DATA_SET_PRESENT)),
            (REQUESTED_SOP_INSTANCE, sop_instance.encode("ascii")),
            (ACTION_TYPE_ID, us(action_type)),
        ]
    )


def n_event_report_rsp(
    message_id: int, sop_class: str, sop_instance: str, event_type: int, status: int
) -> bytes:
    """Encode an N-EVENT-REPORT-RSP command set (no Event Reply data set; PS3.7 10.3.1)."""
    elements = [
        (AFFECTED_SOP_CLASS, sop_class.encode("ascii", "replace")),
        (COMMAND_FIELD, us(N_EVENT_REPORT_RSP)),
        (MESSAGE_ID_RESPONDED, us(message_id)),
        (DATA_SET_TYPE, us(NO_DATA_SET)),
        (STATUS, us(status)),
        (AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii", "replace")),
    ]
    if status == 0 and event_type:
        elements.append((EVENT_TYPE_ID, us(event_type)))
    return command_set(elements)
