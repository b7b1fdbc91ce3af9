"""Ceiling probe: a minimal C-STORE SCU on plain sockets, without pynetdicom.

Not part of the product; the sending twin of :mod:`raw_scp`. It sends the
given files, sorted by path, over one association with TCP_NODELAY. It
proposes one presentation context per (SOP class, transfer syntax) pair read
from the files' File Meta headers, streams each data set from its file in PDUs
of the peer's maximum length, and waits for every C-STORE-RSP before the next
file (like storescu). It does not read headers beyond group 0002, order by
modality, delete delivered files or retry: a lower bound of the work
``dicomnode send`` does. Exit status 0 when every status was success.

Run ``python bench/raw_scu.py HOST PORT CALLED_AET PATH...`` (folders recursively).
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Final

from raw_scp import APP_CONTEXT, IMPL_UID, _elem, _item, _uid, parse_command, read_pdu

CALLING_AET: Final = b"RAWSCU          "
READ_BYTES: Final = 1 << 20


def read_meta(fh: BinaryIO) -> tuple[str, str, str, int]:
    """Return (SOP class, SOP instance, transfer syntax, data set offset) of a Part 10 file."""
    head = fh.read(132 + 12)
    if head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    group_length = struct.unpack("<I", head[140:144])[0]
    meta = fh.read(group_length)
    values: dict[int, bytes] = {}
    pos = 0
    while pos < len(meta):
        _, elem = struct.unpack("<HH", meta[pos : pos + 4])
        vr = meta[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            length = struct.unpack("<I", meta[pos + 8 : pos + 12])[0]
            start = pos + 12
        else:
            length = struct.unpack("<H", meta[pos + 6 : pos + 8])[0]
            start = pos + 8
        values[elem] = meta[start : start + length]
        pos = start + length
    return _uid(values[2]), _uid(values[3]), _uid(values[0x10]), 144 + group_length


def associate_rq(called: bytes, contexts: list[tuple[str, str]]) -> bytes:
    """Encode an A-ASSOCIATE-RQ proposing ``contexts`` (ids 1, 3, 5, ...)."""
    items = []
    for index, (sop_class, syntax) in enumerate(contexts):
        body = _item(0x30, sop_class.encode()) + _item(0x40, syntax.encode())
        items.append(_item(0x20, bytes([2 * index + 1, 0, 0, 0]) + body))
    user = _item(0x51, struct.pack(">I", 1 << 20)) + _item(0x52, IMPL_UID)
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)[:16]
        + CALLING_AET
        + bytes(32)
        + _item(0x10, APP_CONTEXT)
        + b"".join(items)
        + _item(0x50, user)
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def parse_ac(body: bytes) -> tuple[set[int], int]:
    """Return the accepted context ids and the peer's maximum PDU length."""
    accepted: set[int] = set()
    max_pdu = 16384
    pos = 68
    while pos < len(body):
        item_type, length = body[pos], struct.unpack(">H", body[pos + 2 : pos + 4])[0]
        value = body[pos + 4 : pos + 4 + length]
        if item_type == 0x21 and value[2] == 0:
            accepted.add(value[0])
        elif item_type == 0x50 and value[:1] == b"\x51":
            max_pdu = struct.unpack(">I", value[4:8])[0] or (1 << 20)
        pos += 4 + length
    return accepted, max_pdu


def store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """Encode a C-STORE-RQ command set."""
    body = (
        _elem(0x00000002, sop_class.encode())
        + _elem(0x00000100, struct.pack("<H", 0x0001))
        + _elem(0x00000110, struct.pack("<H", message_id))
        + _elem(0x00000700, struct.pack("<H", 0))
        + _elem(0x00000800, struct.pack("<H", 0x0000))
        + _elem(0x00001000, sop_instance.encode())
    )
    return _elem(0x00000000, struct.pack("<I", len(body))) + body


def send_pdv(sock: socket.socket, cid: int, control: int, data: bytes) -> None:
    """Send one P-DATA-TF with one PDV."""
    pdv = struct.pack(">IBB", len(data) + 2, cid, control)
    sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv) + len(data)) + pdv + data)


def send_file(sock: socket.socket, path: Path, cid: int, message_id: int, max_pdu: int) -> int:
    """Send one C-STORE and return the response status."""
    chunk = max(max_pdu - 6, 1024) if max_pdu else READ_BYTES
    with path.open("rb") as fh:
        sop_class, sop_instance, _, offset = read_meta(fh)
        send_pdv(sock, cid, 0x03, store_rq(message_id, sop_class, sop_instance))
        fh.seek(offset)
        data = fh.read(chunk)
        while data:
            following = fh.read(chunk)
            send_pdv(sock, cid, 0x00 if following else 0x02, data)
            data = following
    while True:
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x04:
            raise ConnectionError(f"unexpected PDU 0x{pdu_type:02X}")
        command = parse_command(body[6:])
        return int(struct.unpack("<H", command[0x00000900])[0])


def main(argv: Sequence[str] | None = None) -> int:
    """Send every file given (folders recursively) over one association."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, called = args[0], int(args[1]), args[2].encode()
    files: list[Path] = []
    for name in args[3:]:
        path = Path(name)
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    pairs: dict[tuple[str, str], int] = {}
    plan = []
    for path in files:
        with path.open("rb") as fh:
            sop_class, _, syntax, _ = read_meta(fh)
        cid = pairs.setdefault((sop_class, syntax), 2 * len(pairs) + 1)
        plan.append((path, cid))
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(associate_rq(called, list(pairs)))
    pdu_type, body = read_pdu(sock)
    if pdu_type != 0x02:
        print("association rejected", file=sys.stderr)
        return 1
    accepted, max_pdu = parse_ac(body)
    failed = 0
    for message_id, (path, cid) in enumerate(plan, start=1):
        if cid not in accepted or send_file(sock, path, cid, message_id, max_pdu) != 0:
            failed += 1
    sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    read_pdu(sock)
    sock.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
