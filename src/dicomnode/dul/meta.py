"""Part 10 File Meta Information (PS3.10 7.1): read from a file's first bytes, written for received objects.

:func:`read_file_meta` is the one parser of the group 0002 header (the
forwarder's sender, the forwarder's header read and the integrity walk use
it); :func:`file_meta` writes the header the receiver puts in front of the
data set bytes it received. Pure byte handling: callers read the bytes.
"""

from __future__ import annotations

import struct
from typing import Final

from dicomnode.dul.pdu import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: Preamble (128 bytes) + ``DICM``: where the File Meta Information starts.
META_START: Final = 132
#: Transfer Syntax UID element number in group 0002.
TRANSFER_SYNTAX_ELEMENT: Final = 0x0010
#: The uncompressed transfer syntaxes (PS3.5 10.1, A.2, A.3); the values of pydicom.uid,
#: not imported from there, so a process that only walks headers never pays pydicom's import.
IMPLICIT_VR_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LE: Final = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE: Final = "1.2.840.10008.1.2.2"


class MetaError(ValueError):
    """The File Meta Information is missing or malformed."""


def has_preamble(head: bytes | bytearray | memoryview) -> bool:
    """Return True when ``head`` starts with a 128-byte preamble and ``DICM``."""
    return len(head) >= META_START and bytes(head[128:META_START]) == b"DICM"


def read_file_meta(
    head: bytes | bytearray | memoryview, whole: bool
) -> tuple[dict[int, bytes], int]:
    """Parse the File Meta Information at the start of a Part 10 file.

    Parameters
    ----------
    head : bytes-like
        The first bytes of the file.
    whole : bool
        True when ``head`` is the complete file.

    Returns
    -------
    dict, int
        ``{element number of group 0002: raw value}`` and the offset of the data set.

    Raises
    ------
    MetaError
        When the file has no File Meta Information or it is malformed.
    EOFError
        When ``head`` ends inside the File Meta Information (read more and retry).
    """
    if not has_preamble(head):
        if not whole and len(head) < META_START:
            raise EOFError
        raise MetaError("no DICOM File Meta Information (no 'DICM' prefix)")
    values: dict[int, bytes] = {}
    pos = META_START
    while True:
        if pos + 8 > len(head):
            if whole:
                return values, pos
            raise EOFError
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return values, pos
        vr = bytes(head[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            if pos + 12 > len(head):
                raise EOFError
            length = int(struct.unpack_from("<I", head, pos + 8)[0])
            start = pos + 12
        else:
            length = int(struct.unpack_from("<H", head, pos + 6)[0])
            start = pos + 8
        if length == 0xFFFFFFFF:
            raise MetaError("undefined length in the File Meta Information")
        if start + length > len(head):
            if whole:
                raise MetaError("File Meta Information runs past the end of the file")
            raise EOFError
        values[elem] = bytes(head[start : start + length])
        pos = start + length


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
        + _meta_element(TRANSFER_SYNTAX_ELEMENT, b"UI", transfer_syntax.encode("ascii", "replace"))
        + _IMPLEMENTATION_META
    )
    if source_ae:
        body += _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace"))
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return bytes(128) + b"DICM" + length + body
