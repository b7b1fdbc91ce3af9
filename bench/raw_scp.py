"""Ceiling probe: a minimal C-STORE SCP on plain sockets, without pynetdicom.

Not part of the product. It answers one question for issue 7: how fast can a
*Python* receiver be on this machine when the per-message cost of pynetdicom's
reactor threads and queues is gone, with the same durability rule as dicomnode
(the data set is written to a temp file, fsynced, renamed into place and the
folder fsynced *before* the success status is sent)? One thread per
association; blocking sockets with TCP_NODELAY; every presentation context is
accepted with the first proposed transfer syntax; files are stored flat as
``<SOP Instance UID>.dcm`` with a File Meta header. No folder layout, no
integrity walk, no access control: a lower bound of the work dicomnode does.

With ``--dicomnode-store`` each complete object is handed to dicomnode's own
storage step instead (``StoreHandler.finish``: integrity walk, header read,
folder layout, fsync + rename, STORED log line), which shows what a lean
network layer in front of the existing storage code would reach.

Run ``python bench/raw_scp.py PORT OUTDIR [--dicomnode-store]``; stop with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Final, Protocol

IMPLICIT_LE: Final = "1.2.840.10008.1.2"
APP_CONTEXT: Final = b"1.2.840.10008.3.1.1.1"
IMPL_UID: Final = b"1.2.826.0.1.3680043.8.498.1"
MAX_PDU: Final = 1 << 20


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """Return (PDU type, body) of the next PDU."""
    head = _recv_exact(sock, 6)
    pdu_type, length = head[0], struct.unpack(">I", head[2:])[0]
    return pdu_type, _recv_exact(sock, length)


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii")


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_ac(rq: bytes) -> tuple[bytes, dict[int, tuple[str, str]]]:
    """Build the A-ASSOCIATE-AC for an A-ASSOCIATE-RQ body; return it and the contexts."""
    called, calling = rq[4:20], rq[20:36]
    contexts: dict[int, tuple[str, str]] = {}
    items = []
    pos = 68
    while pos < len(rq):
        item_type, length = rq[pos], struct.unpack(">H", rq[pos + 2 : pos + 4])[0]
        body = rq[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type != 0x20:
            continue
        cid, sub, abstract, syntaxes = body[0], 4, "", []
        while sub < len(body):
            st, sl = body[sub], struct.unpack(">H", body[sub + 2 : sub + 4])[0]
            value = _uid(body[sub + 4 : sub + 4 + sl])
            if st == 0x30:
                abstract = value
            elif st == 0x40:
                syntaxes.append(value)
            sub += 4 + sl
        contexts[cid] = (abstract, syntaxes[0])
        ts = _item(0x40, syntaxes[0].encode())
        items.append(_item(0x21, bytes([cid, 0, 0, 0]) + ts))
    user = _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, IMPL_UID)
    body = (
        struct.pack(">HH", 1, 0)
        + called
        + calling
        + bytes(32)
        + _item(0x10, APP_CONTEXT)
        + b"".join(items)
        + _item(0x50, user)
    )
    return struct.pack(">BBI", 0x02, 0, len(body)) + body, contexts


def parse_command(raw: bytes) -> dict[int, bytes]:
    """Decode an Implicit VR LE command set into {tag: raw value}."""
    out, pos = {}, 0
    while pos + 8 <= len(raw):
        group, elem, length = struct.unpack("<HHI", raw[pos : pos + 8])
        out[(group << 16) | elem] = raw[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def _elem(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def store_rsp(cmd: dict[int, bytes], status: int) -> bytes:
    """Encode a C-STORE-RSP command set for the request ``cmd``."""
    body = (
        _elem(0x00000002, cmd[0x00000002])
        + _elem(0x00000100, struct.pack("<H", 0x8001))
        + _elem(0x00000120, cmd[0x00000110])
        + _elem(0x00000800, struct.pack("<H", 0x0101))
        + _elem(0x00000900, struct.pack("<H", status))
        + _elem(0x00001000, cmd[0x00001000])
    )
    return _elem(0x00000000, struct.pack("<I", len(body))) + body


def echo_rsp(cmd: dict[int, bytes]) -> bytes:
    """Encode a C-ECHO-RSP command set."""
    body = (
        _elem(0x00000002, cmd[0x00000002])
        + _elem(0x00000100, struct.pack("<H", 0x8030))
        + _elem(0x00000120, cmd[0x00000110])
        + _elem(0x00000800, struct.pack("<H", 0x0101))
        + _elem(0x00000900, struct.pack("<H", 0))
    )
    return _elem(0x00000000, struct.pack("<I", len(body))) + body


def p_data(context_id: int, command: bytes) -> bytes:
    """Wrap a whole command set in one P-DATA-TF PDU (last fragment, command)."""
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def file_meta(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """Return preamble, DICM and an Explicit VR LE group 0002."""

    def ex(tag: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        if vr == b"OB":
            return struct.pack("<HH2sHI", 2, tag, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value

    group = (
        ex(0x0001, b"OB", b"\x00\x01")
        + ex(0x0002, b"UI", sop_class.encode())
        + ex(0x0003, b"UI", sop_instance.encode())
        + ex(0x0010, b"UI", syntax.encode())
        + ex(0x0012, b"UI", IMPL_UID)
    )
    return bytes(128) + b"DICM" + ex(0x0000, b"UL", struct.pack("<I", len(group))) + group


class Storer(Protocol):
    """Puts one complete, fsynced temp file in place and returns the C-STORE status."""

    def __call__(self, tmp: Path, sop_instance: str) -> int: ...


def flat_storer(out: Path) -> Storer:
    """Return the probe's own storage step: rename to ``out/<uid>.dcm``, fsync the folder."""

    def store(tmp: Path, sop_instance: str) -> int:
        os.replace(tmp, out / f"{sop_instance}.dcm")
        dir_fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return 0x0000

    return store


def dicomnode_storer(out: Path) -> Storer:
    """Return dicomnode's storage step (``StoreHandler.finish``) for ``out``."""
    import time

    from dicomnode.config import ReceiverConfig
    from dicomnode.receiver.store import ReceivedObject, StoreHandler

    handler = StoreHandler(ReceiverConfig(destination_dir=out, min_free_space_mb=100))

    def store(tmp: Path, sop_instance: str) -> int:
        received = ReceivedObject(tmp, "BENCHSCU", "127.0.0.1", time.monotonic(), sop_instance)
        return handler.finish(received).status

    return store


class Association(threading.Thread):
    """Serve one connection until release or abort."""

    def __init__(self, sock: socket.socket, tmp: Path, storer: Storer) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.tmp = tmp
        self.storer = storer

    def run(self) -> None:
        """Negotiate, then handle P-DATA until A-RELEASE or A-ABORT."""
        try:
            self._serve()
        except (ConnectionError, OSError):
            pass
        finally:
            self.sock.close()

    def _serve(self) -> None:
        pdu_type, body = read_pdu(self.sock)
        if pdu_type != 0x01:
            return
        ac, contexts = associate_ac(body)
        self.sock.sendall(ac)
        command = bytearray()
        fh: BinaryIO | None = None
        tmp_path = ""
        while True:
            pdu_type, body = read_pdu(self.sock)
            if pdu_type == 0x05:
                self.sock.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                return
            if pdu_type != 0x04:
                return
            pos = 0
            while pos < len(body):
                length = struct.unpack(">I", body[pos : pos + 4])[0]
                cid, control = body[pos + 4], body[pos + 5]
                value = body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 0x01:  # command fragment
                    command += value
                    if not control & 0x02:
                        continue
                    cmd = parse_command(bytes(command))
                    command.clear()
                    if cmd.get(0x00000100) == struct.pack("<H", 0x0030):
                        self.sock.sendall(p_data(cid, echo_rsp(cmd)))
                        continue
                    sop_class, syntax = _uid(cmd[0x00000002]), contexts[cid][1]
                    tmp_path = str(self.tmp / f"{threading.get_ident()}.part")
                    fh = open(tmp_path, "wb")  # noqa: SIM115 (closed on the last fragment)
                    fh.write(file_meta(sop_class, _uid(cmd[0x00001000]), syntax))
                    self._cmd = cmd
                    continue
                if fh is None:
                    return
                fh.write(value)
                if control & 0x02:
                    fh.flush()
                    os.fsync(fh.fileno())
                    fh.close()
                    fh = None
                    status = self.storer(Path(tmp_path), _uid(self._cmd[0x00001000]))
                    self.sock.sendall(p_data(cid, store_rsp(self._cmd, status)))


def serve(port: int, out: Path, use_dicomnode: bool) -> None:
    """Accept associations on 127.0.0.1:port until SIGTERM."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp"
    tmp.mkdir(exist_ok=True)
    storer = dicomnode_storer(out) if use_dicomnode else flat_storer(out)
    server = socket.create_server(("127.0.0.1", port), reuse_port=False, backlog=64)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("LISTENING", flush=True)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        Association(conn, tmp, storer).start()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description="minimal C-STORE SCP (ceiling probe)")
    parser.add_argument("port", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--dicomnode-store", action="store_true", help="store with dicomnode's StoreHandler"
    )
    args = parser.parse_args(argv)
    serve(args.port, args.out, args.dicomnode_store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
