"""The durable limit: what the disk allows a receiver that syncs every object, without DICOM.

Two halves of one measurement (``make bench`` runs both as the ``durable limit`` row of
RECEIVE). ``serve PORT DIR`` accepts connections; on each it reads objects framed as an
8-byte big-endian length followed by the bytes, writes each one to a temp file in ``DIR``,
fsyncs it, renames it to its final name, fsyncs the folder, and only then answers one
byte. ``send HOST PORT FOLDER`` sends every file below ``FOLDER`` (sorted) over one
connection and waits for each answer before the next file, as a C-STORE SCU waits for
its response. Nagle is off on both ends.

No DICOM parsing, no names from headers, no logging per object: the time left is TCP,
one write, two fsyncs and a rename per object -- the floor any durable receiver pays.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from pathlib import Path

HEADER = struct.Struct(">Q")
CHUNK = 1 << 20


def _recv_exact(sock: socket.socket, count: int, buf: bytearray) -> memoryview | None:
    """Read exactly ``count`` (at most ``len(buf)``) bytes into ``buf``; None on a clean close."""
    view = memoryview(buf)[:count]
    got = 0
    while got < count:
        n = sock.recv_into(view[got:], count - got)
        if n == 0:
            if got == 0:
                return None
            raise ConnectionError("peer closed mid-object")
        got += n
    return view


def _serve_one(conn: socket.socket, folder: Path, serial: list[int], lock: threading.Lock) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(CHUNK)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        while True:
            head = _recv_exact(conn, HEADER.size, buf)
            if head is None:
                return
            (size,) = HEADER.unpack(head)
            with lock:
                serial[0] += 1
                name = f"{serial[0]:08d}"
            tmp = folder / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                left = size
                while left:
                    part = _recv_exact(conn, min(left, CHUNK), buf)
                    if part is None:
                        raise ConnectionError("peer closed mid-object")
                    os.write(fd, part)
                    left -= len(part)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, folder / f"{name}.obj")
            os.fsync(dir_fd)
            conn.sendall(b"\x00")
    finally:
        os.close(dir_fd)
        conn.close()


def serve(port: int, folder: Path) -> None:
    """Accept connections forever; one thread per connection."""
    folder.mkdir(parents=True, exist_ok=True)
    server = socket.create_server(("127.0.0.1", port), backlog=64)
    serial = [0]
    lock = threading.Lock()
    print("LISTENING", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_one, args=(conn, folder, serial, lock), daemon=True).start()


def send(host: str, port: int, folder: Path) -> int:
    """Send every file below ``folder``, one answer awaited per file; return an exit code."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".json"))
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answer = bytearray(1)
        for path in files:
            data = path.read_bytes()
            sock.sendall(HEADER.pack(len(data)))
            sock.sendall(data)
            if sock.recv_into(answer, 1) != 1:
                print(f"no answer for {path}", file=sys.stderr)
                return 1
    return 0


def main(argv: list[str]) -> int:
    """``serve PORT DIR`` or ``send HOST PORT FOLDER``."""
    if len(argv) == 3 and argv[0] == "serve":
        serve(int(argv[1]), Path(argv[2]))
        return 0
    if len(argv) == 4 and argv[0] == "send":
        return send(argv[1], int(argv[2]), Path(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
