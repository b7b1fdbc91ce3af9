"""Connections not yet admitted: accepted, TLS-handshaken and read to a whole A-ASSOCIATE-RQ.

Everything a peer can do before it is admitted happens here, on one thread
per receiver process: a selector watches the listening socket and every
connection still negotiating; each one is a small record (no thread, no
read buffer beyond the request bytes that have arrived). A connection must
complete its TLS handshake and its whole A-ASSOCIATE-RQ within
``acse_timeout_s`` of being accepted (a deadline, not a per-read timeout), or
it is closed with an ``ABORTED`` line. At most ``max_pending_associations``
connections (and ``max_pending_per_peer`` per peer IP address) negotiate at
once; a new connection beyond either bound closes the *oldest* one, so idle or
slow peers can never keep an arriving sender out. An A-ASSOCIATE-RQ longer
than :data:`MAX_ASSOCIATE_RQ_BYTES` is answered with A-ABORT (never
buffered). A complete request is handed to ``on_request`` (admission, then a
serving thread). Refusals go through a :class:`~dicomnode.receiver.admission.RefusalLog`.

Log verbs: ``ABORTED``, ``REJECTED``. Must not import the forwarder.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Final

from dicomnode.dul.pdu import A_ABORT_UNEXPECTED_PDU, A_ASSOCIATE_RQ, PduType
from dicomnode.receiver.admission import RefusalLog

logger = logging.getLogger(__name__)

#: Largest A-ASSOCIATE-RQ read (a request with all 128 presentation contexts is ~20 KB).
MAX_ASSOCIATE_RQ_BYTES: Final = 128 * 1024
#: Bytes read from one connection per readiness event.
_READ_BYTES: Final = 16 * 1024
#: Longest wait of the selector (checks the stop flag and writes refusal counts).
_POLL_S: Final = 0.5
#: Connections accepted per readiness of the listening socket.
_ACCEPT_BATCH: Final = 64
#: How long a busier process of a pool leaves a new connection to the others.
_YIELD_S: Final = 0.02
#: A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value).
ABORT_INVALID_PARAMETER: Final = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"

#: Called with (socket, (ip, port), request) once a whole A-ASSOCIATE-RQ has arrived;
#: the socket is blocking again and belongs to the callee.
OnRequest = Callable[[socket.socket, tuple[str, int], A_ASSOCIATE_RQ], None]


class _Pending:
    """One connection still negotiating."""

    __slots__ = ("deadline", "got_data", "handshaking", "ip", "need", "port", "raw", "sock")

    def __init__(self, sock: socket.socket, ip: str, port: int, deadline: float) -> None:
        self.sock = sock
        self.ip = ip
        self.port = port
        self.deadline = deadline
        self.handshaking = False
        self.got_data = False
        #: Bytes of the request read so far (header first, then the body).
        self.raw = bytearray()
        #: How many bytes ``raw`` must hold: the 6-byte header, then the whole PDU.
        self.need = 6

    @property
    def where(self) -> str:
        return f"{self.ip}:{self.port}"


class Negotiator:
    """Accept connections and read their association requests on one selector thread.

    Parameters
    ----------
    listen : socket.socket
        The listening socket (possibly shared with other receiver processes).
    acse_timeout_s : float
        Deadline, from accept, for the TLS handshake and the whole A-ASSOCIATE-RQ.
    max_pending, max_pending_per_peer : int
        Bounds on connections negotiating at once, in total and per peer address.
    on_request : callable
        Receives each connection with a complete request (see :data:`OnRequest`).
    refusals : RefusalLog
        Rate-limits the lines about refused and timed-out connections.
    ssl_context : ssl.SSLContext, optional
        Wraps accepted sockets for DICOM TLS (handshake here, non-blocking).
    may_accept : callable, optional
        Given the number of admitted connections (``active()``) and of those
        negotiating here, returns False while another process of a pool carries
        fewer: new connections are then left to the others for :data:`_YIELD_S`.
        A pool's process accepts one connection per wake-up, so the next one is
        weighed again (a burst is shared out, not taken by the first awake).
    active : callable, optional
        Returns the number of admitted connections of this process.
    """

    def __init__(
        self,
        listen: socket.socket,
        acse_timeout_s: float,
        max_pending: int,
        max_pending_per_peer: int,
        on_request: OnRequest,
        refusals: RefusalLog,
        ssl_context: ssl.SSLContext | None = None,
        may_accept: Callable[[int, int], bool] | None = None,
        active: Callable[[], int] = lambda: 0,
    ) -> None:
        self.listen = listen
        self.acse_timeout_s = acse_timeout_s
        self.max_pending = max(1, max_pending)
        self.max_per_peer = max(1, max_pending_per_peer)
        self.on_request = on_request
        self.refusals = refusals
        self.ssl_context = ssl_context
        self.may_accept = may_accept
        self.active = active
        #: Connections negotiating, oldest first.
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._selector = selectors.DefaultSelector()
        self._stopping = threading.Event()
        self._listening = False
        self._yield_until = 0.0
        #: The negotiating count last told to the pool (see :meth:`_publish_load`).
        self._published = 0
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the selector thread."""
        self.listen.setblocking(False)
        self._listen_on(True)
        self._thread = threading.Thread(target=self._loop, name="LeanAcceptor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and close every connection still negotiating."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0 + _POLL_S)

    def pending(self) -> int:
        """Return the number of connections negotiating now."""
        return len(self._pending)

    def _listen_on(self, on: bool) -> None:
        if on and not self._listening:
            self._selector.register(self.listen, selectors.EVENT_READ, None)
        elif not on and self._listening:
            self._selector.unregister(self.listen)
        self._listening = on

    # ----------------------------------------------------------------- the loop

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._turn()
                except Exception:  # a bug must not leave the node deaf: log, keep accepting
                    logger.exception("receiver acceptor: unexpected error (still accepting)")
                    self._stopping.wait(0.1)
        finally:
            for pending in list(self._pending.values()):
                self._close(pending)
            with contextlib.suppress(Exception):
                self._selector.close()

    def _turn(self) -> None:
        """Wait for readiness or the next deadline once, and act on what happened."""
        now = time.monotonic()
        if not self._listening and now >= self._yield_until:
            self._listen_on(True)
        timeout = _POLL_S
        if self._pending:
            oldest = min(p.deadline for p in self._pending.values())
            timeout = max(0.0, min(timeout, oldest - now))
        if not self._listening:
            timeout = max(0.0, min(timeout, self._yield_until - now))
        for key, _events in self._selector.select(timeout):
            if key.data is None:
                self._on_listen_ready(now)
            else:
                self._progress(key.data)
        self._expire(time.monotonic())
        self._publish_load()
        self.refusals.flush()

    def _publish_load(self) -> None:
        """Tell the pool this process's load when its negotiating count changed.

        Done after every turn, so a connection accepted (or admitted, refused,
        timed out) here is weighed by the other processes when the *next* one
        arrives; else a connection arriving while this one negotiates would find
        this process's load as it was before it, and could be taken here too.
        """
        if self.may_accept is not None and len(self._pending) != self._published:
            self._weigh()

    def _on_listen_ready(self, now: float) -> None:
        if self.may_accept is None:
            self._accept(_ACCEPT_BATCH)
        elif self._weigh():
            self._accept(1)
        elif self._yield_until <= now < self._yield_until + _POLL_S:
            self._accept(1)  # nobody else took it within the pause: serve it here
            self._yield_until = 0.0
        else:  # leave it to a less busy process for a moment
            self._yield_until = now + _YIELD_S
            self._listen_on(False)

    def _weigh(self) -> bool:
        """Publish this process's load and return the pool's verdict on accepting one more."""
        assert self.may_accept is not None
        self._published = len(self._pending)
        return self.may_accept(self.active(), self._published)

    def _accept(self, batch: int) -> None:
        for _ in range(batch):
            try:
                sock, address = self.listen.accept()
            except (BlockingIOError, InterruptedError, TimeoutError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.error("cannot accept connections: %s (retrying)", exc)
                    self._shed_oldest()  # frees a descriptor for the next one
                    self._stopping.wait(0.1)
                return
            self._admit_connection(sock, str(address[0]), int(address[1]))

    def _admit_connection(self, sock: socket.socket, ip: str, port: int) -> None:
        if self._per_peer[ip] >= self.max_per_peer:
            self._shed_oldest(ip)
        if len(self._pending) >= self.max_pending:
            self._shed_oldest()
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            with contextlib.suppress(OSError):
                sock.close()
            return
        pending = _Pending(sock, ip, port, time.monotonic() + self.acse_timeout_s)
        if self.ssl_context is not None:
            try:
                pending.sock = self.ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ValueError) as exc:
                self._refuse_tls(pending, exc)
                return
            pending.handshaking = True
        self._pending[id(pending)] = pending
        self._per_peer[ip] += 1
        self._selector.register(pending.sock, selectors.EVENT_READ, pending)
        self._progress(pending)  # data may already be there

    def _shed_oldest(self, ip: str | None = None) -> None:
        """Close the oldest negotiating connection (of ``ip``, when given)."""
        for pending in self._pending.values():
            if ip is None or pending.ip == ip:
                limit = (
                    f"max_pending_per_peer={self.max_per_peer}"
                    if ip is not None
                    else f"max_pending_associations={self.max_pending}"
                )
                self.refusals.warning(
                    pending.ip,
                    "shed",
                    "ABORTED connection peer=%s reason=no A-ASSOCIATE-RQ yet and %s reached; "
                    "the oldest such connection is closed for a new one",
                    pending.where,
                    limit,
                )
                self._close(pending)
                return

    def _expire(self, now: float) -> None:
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            if pending.handshaking:
                what = "TLS handshake not completed"
            elif pending.got_data:
                what = "A-ASSOCIATE-RQ not completed"
            else:
                what = "no A-ASSOCIATE-RQ"
            self.refusals.warning(
                pending.ip,
                "timeout",
                "ABORTED connection peer=%s reason=%s within acse_timeout_s=%g s",
                pending.where,
                what,
                self.acse_timeout_s,
            )
            self._close(pending)

    def _close(self, pending: _Pending) -> None:
        if self._pending.pop(id(pending), None) is not None:
            self._per_peer[pending.ip] -= 1
            if self._per_peer[pending.ip] <= 0:
                del self._per_peer[pending.ip]
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(pending.sock)
        with contextlib.suppress(OSError):
            pending.sock.close()

    # ----------------------------------------------------------------- one connection

    def _progress(self, pending: _Pending) -> None:
        """Advance ``pending`` as far as the data that arrived allows; never raises."""
        try:
            if pending.handshaking and not self._handshake(pending):
                return
            self._read(pending)
        except (OSError, ValueError) as exc:
            if pending.got_data:
                logger.debug("connection from %s failed before admission: %s", pending.where, exc)
            self._close(pending)

    def _handshake(self, pending: _Pending) -> bool:
        sock = pending.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, pending)
            return False
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, pending)
            return False
        except (OSError, ValueError) as exc:
            self._refuse_tls(pending, exc)
            return False
        pending.handshaking = False
        self._selector.modify(sock, selectors.EVENT_READ, pending)
        return True

    def _refuse_tls(self, pending: _Pending, exc: Exception) -> None:
        self.refusals.warning(
            pending.ip,
            "tls",
            "REJECTED TLS connection peer=%s reason=%s",
            pending.where,
            getattr(exc, "reason", None) or exc,
        )
        self._close(pending)

    def _read(self, pending: _Pending) -> None:
        sock = pending.sock
        while len(pending.raw) < pending.need:
            try:
                data = sock.recv(min(pending.need - len(pending.raw), _READ_BYTES))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                self._selector.modify(sock, selectors.EVENT_WRITE, pending)
                return
            if not data:
                if pending.got_data:
                    logger.debug("connection from %s closed mid-request", pending.where)
                else:
                    logger.debug("connection from %s closed before a request", pending.where)
                self._close(pending)
                return
            pending.got_data = True
            pending.raw += data
            if pending.need == 6 and len(pending.raw) == 6 and not self._check_header(pending):
                return
        self._complete(pending)

    def _check_header(self, pending: _Pending) -> bool:
        """Judge the PDU header; set how much to read, or refuse. True to read on."""
        pdu_type = pending.raw[0]
        length = int(struct.unpack_from(">I", pending.raw, 2)[0])
        if pdu_type != PduType.A_ASSOCIATE_RQ:
            self.refusals.warning(
                pending.ip,
                "protocol",
                "ABORTED connection peer=%s reason=expected an A-ASSOCIATE-RQ, got PDU type 0x%02X",
                pending.where,
                pdu_type,
            )
            self._answer_and_close(pending, A_ABORT_UNEXPECTED_PDU)
            return False
        if length > MAX_ASSOCIATE_RQ_BYTES:
            self.refusals.warning(
                pending.ip,
                "oversize",
                "ABORTED association peer=%s reason=A-ASSOCIATE-RQ of %d bytes is longer than "
                "the %d bytes accepted (answered A-ABORT)",
                pending.where,
                length,
                MAX_ASSOCIATE_RQ_BYTES,
            )
            self._answer_and_close(pending, ABORT_INVALID_PARAMETER)
            return False
        pending.need = 6 + length
        return True

    def _answer_and_close(self, pending: _Pending, pdu: bytes) -> None:
        """Send a short PDU if the socket takes it at once, then close."""
        with contextlib.suppress(OSError, ValueError):
            pending.sock.send(pdu)
        self._close(pending)

    def _complete(self, pending: _Pending) -> None:
        try:
            request = A_ASSOCIATE_RQ.decode(memoryview(pending.raw)[6:])
        except (ValueError, IndexError, struct.error) as exc:
            self.refusals.warning(
                pending.ip,
                "protocol",
                "ABORTED connection peer=%s reason=malformed A-ASSOCIATE-RQ: %s",
                pending.where,
                exc,
            )
            self._answer_and_close(pending, A_ABORT_UNEXPECTED_PDU)
            return
        # Hand over: the connection leaves the selector and the pending bounds.
        self._pending.pop(id(pending), None)
        self._per_peer[pending.ip] -= 1
        if self._per_peer[pending.ip] <= 0:
            del self._per_peer[pending.ip]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(pending.sock)
        pending.raw = bytearray()
        sock = pending.sock
        try:
            sock.setblocking(True)
        except OSError:
            with contextlib.suppress(OSError):
                sock.close()
            return
        try:
            self.on_request(sock, (pending.ip, pending.port), request)
        except Exception:
            logger.exception("ABORTED connection peer=%s: unexpected error", pending.where)
            with contextlib.suppress(OSError):
                sock.close()


__all__ = ["MAX_ASSOCIATE_RQ_BYTES", "Negotiator", "OnRequest"]
