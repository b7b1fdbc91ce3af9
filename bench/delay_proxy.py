"""A userspace delay line for ``make bench``: a TCP proxy that delays every byte by a fixed time.

Used by the DELAYED section when the kernel cannot add delay itself (``tc qdisc
... netem`` needs the ``sch_netem`` module and root). It listens on
127.0.0.1:LISTEN_PORT; each accepted connection gets its own connection to
127.0.0.1:TARGET_PORT. One thread runs everything (``selectors``): each chunk
read from one side is stamped ``now + delay`` and queued; it is written to the
other side when its time has come, in arrival order. So every byte arrives
``delay`` later in each direction (``--delay-ms 5``: 10 ms round trip) while
the throughput stays that of loopback, like a long link without loss.
TCP_NODELAY is set on both sides. Runs until SIGTERM.

Run ``python bench/delay_proxy.py LISTEN_PORT TARGET_PORT [--delay-ms 5]``.
Not part of dicomnode; imports the standard library only.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType

#: Bytes read from a socket at a time.
CHUNK_BYTES = 1 << 18


def serve(listen_port: int, target_port: int, delay_s: float) -> None:
    """Accept connections forever and relay each direction ``delay_s`` late."""
    server = socket.create_server(("127.0.0.1", listen_port), backlog=64)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ, None)
    peer: dict[socket.socket, socket.socket] = {}
    reading: set[socket.socket] = set()  # registered with the selector
    ended: set[socket.socket] = set()  # told end of stream (its peer closed)
    #: (due, sequence, destination, data or b"" for end of stream)
    due: list[tuple[float, int, socket.socket, bytes]] = []
    order = itertools.count()

    def forget(sock: socket.socket) -> None:
        if sock in reading:
            sel.unregister(sock)
            reading.discard(sock)
        ended.discard(sock)
        peer.pop(sock, None)
        sock.close()

    def accept() -> None:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port), timeout=10)
        except OSError:
            client.close()
            return
        for end in (client, upstream):
            end.setblocking(True)
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(end, selectors.EVENT_READ, None)
            reading.add(end)
        peer[client], peer[upstream] = upstream, client

    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        for key, _ in sel.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is server:
                accept()
                continue
            try:
                data = sock.recv(CHUNK_BYTES)
            except OSError:
                data = b""
            heapq.heappush(due, (time.monotonic() + delay_s, next(order), peer[sock], data))
            if not data:  # end of stream from this side: its peer hears it late
                sel.unregister(sock)
                reading.discard(sock)
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, dst, data = heapq.heappop(due)
            if dst not in peer:
                continue
            other = peer[dst]
            try:
                if data:
                    dst.sendall(data)
                    continue
                dst.shutdown(socket.SHUT_WR)
                ended.add(dst)
                if other in ended:  # both directions finished
                    forget(dst)
                    forget(other)
            except OSError:
                forget(dst)
                forget(other)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and relay until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen_port", type=int)
    parser.add_argument("target_port", type=int)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay (5)")
    args = parser.parse_args(argv)

    def stop(_sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    serve(args.listen_port, args.target_port, args.delay_ms / 1000.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
