"""The blocking PDU link both roles read with: one reused buffer per association.

:class:`PduReader` reads a connected socket it is given: exact small reads
(PDU and PDV headers, association PDUs), :meth:`~PduReader.stream` of large
runs straight into a sink without holding them (the receiver's data sets go
from this buffer to the temp file), and whole PDUs (:meth:`~PduReader.read_pdu`,
the forwarder's responses). :class:`PduLink` is the requestor's side of one
association on top of it: whole-PDU sends serialised with A-ABORT from another
thread, the socket timeout, shutdown. The receiver keeps its own writes (kernel
timeouts, see :mod:`dicomnode.receiver.lean`).

Contract: never opens or accepts sockets; raises :class:`PeerClosed` when the
peer closed the connection, :class:`TimeoutError` when nothing arrived within
the socket's timeout (also for kernel timeouts, SO_RCVTIMEO), OSError as the
socket raises it; :class:`PduLink` turns these into :class:`LinkError` /
:class:`LinkTimeout` with a sentence naming the peer.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Final

from dicomnode.dul.pdu import A_ABORT_PDU, PDU_HEADER_LEN

logger = logging.getLogger(__name__)

#: Read buffer of one association (the receiver's default).
READ_BUFFER_BYTES: Final = 256 * 1024


class PeerClosed(Exception):
    """The peer closed the connection."""


class PduTooLarge(Exception):
    """A PDU header announced more bytes than the reader's limit (nothing of it was read)."""

    def __init__(self, pdu_type: int, length: int) -> None:
        super().__init__(f"PDU of {length} bytes")
        self.pdu_type = pdu_type
        self.length = length


class PduReader:
    """Buffered reads from a socket: exact small reads, streamed large ones, whole PDUs.

    Parameters
    ----------
    sock : socket.socket
        A connected socket (plain or TLS).
    size : int
        Bytes of the reused buffer; :meth:`exact` reads at most this many.
    lock : threading.Lock, optional
        Held around every ``recv`` (a TLS socket whose SSL object another thread
        may use for a write).
    """

    def __init__(
        self,
        sock: socket.socket,
        size: int = READ_BUFFER_BYTES,
        lock: threading.Lock | None = None,
    ) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.lock = lock
        #: True once any byte has arrived (a connection that sends nothing is a probe).
        self.got_data = False

    def _receive(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            kept = self.end - self.start
            self.buf[:kept] = self.buf[self.start : self.end]
            self.start, self.end = 0, kept
        try:
            if self.lock is None:
                count = self.sock.recv_into(self.view[self.end :])
            else:
                with self.lock:
                    count = self.sock.recv_into(self.view[self.end :])
        except BlockingIOError:  # SO_RCVTIMEO expired (kernel timeouts)
            raise TimeoutError("no data within the timeout") from None
        if count == 0:
            raise PeerClosed
        self.got_data = True
        self.end += count

    def exact(self, count: int) -> bytes:
        """Return the next ``count`` bytes (``count`` at most the buffer size)."""
        while self.end - self.start < count:
            if self.start + count > len(self.buf):
                kept = self.end - self.start
                self.buf[:kept] = self.buf[self.start : self.end]
                self.start, self.end = 0, kept
            self._receive()
        out = bytes(self.view[self.start : self.start + count])
        self.start += count
        return out

    def stream(self, count: int, sink: Callable[[memoryview], None]) -> None:
        """Pass the next ``count`` bytes to ``sink`` in pieces, without holding them all."""
        while count:
            if self.start == self.end:
                self._receive()
            piece = min(count, self.end - self.start)
            sink(self.view[self.start : self.start + piece])
            self.start += piece
            count -= piece

    def pdu_header(self, limit: int) -> tuple[int, int]:
        """Read a PDU header; return (PDU type, body length).

        Raises
        ------
        PduTooLarge
            When ``limit`` is not 0 and the body is longer.
        """
        head = self.exact(PDU_HEADER_LEN)
        length = int(struct.unpack_from(">I", head, 2)[0])
        if limit and length > limit:
            raise PduTooLarge(head[0], length)
        return head[0], length

    def read_pdu(self, limit: int) -> tuple[int, bytes]:
        """Return (PDU type, body) of the next PDU; see :meth:`pdu_header` for ``limit``."""
        pdu_type, length = self.pdu_header(limit)
        if length <= len(self.buf):
            return pdu_type, self.exact(length)
        body = bytearray()
        self.stream(length, body.extend)
        return pdu_type, bytes(body)


class LinkError(Exception):
    """The association cannot go on (lost, closed, aborted or a protocol error)."""


class LinkTimeout(Exception):
    """Nothing arrived within the socket timeout."""


#: Largest PDU a requestor accepts from the peer (responses are a few hundred bytes).
MAX_RECEIVED_PDU_BYTES: Final = 16 * 1024 * 1024


class PduLink:
    """The requestor's socket of one association: whole PDUs in and out; abortable from any thread.

    A lock serialises writes (and, with TLS, every use of the SSL object), so
    :meth:`abort` never interleaves its A-ABORT with a PDU being written. When
    the socket is busy, :meth:`abort` only shuts the connection down, which
    wakes the sending thread at once.
    """

    def __init__(self, sock: socket.socket, where: str, tls: bool, timeout_s: float) -> None:
        self.sock = sock
        self.where = where
        self.tls = tls
        self.aborted = False
        self._io_lock = threading.Lock()
        self._reader = PduReader(sock, 64 * 1024, self._io_lock if tls else None)
        self._timeout: float | None = timeout_s

    def set_timeout(self, seconds: float) -> None:
        """Bound every later read and write by ``seconds``."""
        if seconds != self._timeout:
            self._timeout = seconds
            self.sock.settimeout(seconds)

    def send(self, data: bytes | bytearray | memoryview, what: str = "sending") -> None:
        """Write ``data`` completely.

        Raises
        ------
        LinkError
            When the peer accepts no data within the timeout or the connection is gone.
        """
        try:
            with self._io_lock:
                if self.aborted:
                    raise LinkError("association aborted locally")
                self.sock.sendall(data)
        except TimeoutError as exc:
            raise LinkError(f"peer accepted no data for {self._timeout:g} s") from exc
        except OSError as exc:
            raise self._trouble(f"connection to {self.where} lost while {what}", exc) from exc

    def _trouble(self, message: str, exc: BaseException | None = None) -> LinkError:
        if self.aborted:
            return LinkError("association aborted locally (forced stop)")
        return LinkError(f"{message}: {exc}" if exc is not None else message)

    def read_pdu(self, what: str) -> tuple[int, bytes]:
        """Return (PDU type, body) of the next PDU.

        Raises
        ------
        LinkTimeout
            When nothing complete arrives within the current timeout.
        LinkError
            When the connection is lost or the PDU is too large.
        """
        try:
            return self._reader.read_pdu(MAX_RECEIVED_PDU_BYTES)
        except TimeoutError as exc:
            raise LinkTimeout(what) from exc
        except PduTooLarge as exc:
            raise LinkError(
                f"{self.where} sent a PDU of {exc.length} bytes (protocol error)"
            ) from exc
        except PeerClosed:
            raise self._trouble(f"connection closed by {self.where} while {what}") from None
        except OSError as exc:
            raise self._trouble(f"connection to {self.where} lost while {what}", exc) from exc

    def readable(self, timeout_s: float) -> bool:
        """Return True when bytes are waiting (buffered, or on the socket within ``timeout_s``)."""
        if self._reader.end > self._reader.start:
            return True
        pending = getattr(self.sock, "pending", None)
        if self.tls and pending is not None and pending():
            return True
        try:
            ready, _w, _x = select.select([self.sock], [], [], max(0.0, timeout_s))
        except (OSError, ValueError):
            return True  # let the next read report the trouble
        return bool(ready)

    def abort(self) -> None:
        """Send A-ABORT if the socket is idle, then shut the connection down (any thread).

        Never blocks: the A-ABORT is written only when no PDU is being written
        (and, with TLS, no read is in progress) and the socket can take it at
        once; otherwise the peer just sees the connection close.
        """
        if self._io_lock.acquire(blocking=False):
            try:
                if not self.aborted:
                    self.aborted = True
                    if self.tls:
                        _r, writable, _x = select.select([], [self.sock], [], 0)
                        if writable:
                            self.sock.send(A_ABORT_PDU)
                    else:
                        # the descriptor is non-blocking (the socket has a timeout), so
                        # this write cannot wait for a peer that stopped reading
                        os.write(self.sock.fileno(), A_ABORT_PDU)
            except (OSError, ValueError) as exc:
                logger.debug("A-ABORT not sent: %s", exc)
            finally:
                self._io_lock.release()
        self.aborted = True
        self.shutdown()

    def shutdown(self) -> None:
        """Shut the connection down both ways (wakes a thread blocked on it)."""
        try:
            # socket.socket's shutdown, not SSLSocket's: that one drops the SSL object,
            # which a concurrent read on another thread may still be using.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Shut down and close the socket."""
        self.shutdown()
        try:
            self.sock.close()
        except OSError:
            pass
