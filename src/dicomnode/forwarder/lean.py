"""Lean C-STORE SCU of the forwarder: PS3.8 upper layer on one blocking socket.

:class:`LeanAssociationSender` has the interface and the per-file outcome rules
of :class:`~dicomnode.forwarder.sender.AssociationSender` but speaks the DICOM
upper layer itself, on the calling thread, without pynetdicom's reactor
threads, polling and queues (which cost about 4-5 ms of CPU per C-STORE on the
benchmark machine). One association per :meth:`~LeanAssociationSender.run`:

* A-ASSOCIATE-RQ with one presentation context per :class:`ContextSpec`
  (ids 1, 3, 5, ...), our maximum PDU length, implementation class UID and
  version name; A-ASSOCIATE-AC / -RJ / A-ABORT are parsed.
* Per object a C-STORE-RQ command set (Implicit VR Little Endian), then the
  data set streamed from the file, starting right after its File Meta
  Information, in P-DATA-TF PDUs that fit the peer's maximum PDU length (an
  unlimited peer is capped at :data:`~dicomnode.forwarder.sender.MAX_SEND_PDU_BYTES`).
  One reusable buffer of about 1 MiB holds the PDUs of one write (small PDUs
  are batched: their data is read in place between the headers with one
  ``preadv``), so memory stays bounded for objects of any size (forwarding a
  1 GB object peaks at about 55 MB RSS); the bytes are never decoded. A
  deflated data set of odd length gets the trailing NULL byte PS3.5 A.5
  requires. Only when the target did not accept the file's transfer syntax is
  the object converted (:mod:`~dicomnode.forwarder.transcode`: inflated,
  byte-swapped or decompressed, pixel values checked) into an accepted
  uncompressed syntax; if that is impossible it is refused (parked).
* The C-STORE-RSP is read before the next object (like storescu); its Status
  decides SENT / REFUSED. A transient refusal (0xA7xx, 0xFE00) of one object is
  reported ``DEFERRED`` and the next object is tried; a second one in a row
  means the target refuses everything (down, out of space): the association
  ends and the rest is reported ``RETRY``.
* A-RELEASE-RQ at the end, waiting for A-RELEASE-RP at most ``acse_timeout_s``.

TCP_NODELAY is always on. Timeouts: connect and negotiation ``acse_timeout_s``,
waiting for a response ``dimse_timeout_s``, sending ``network_timeout_s``.
Anything unexpected from the peer (A-ABORT, A-RELEASE-RQ, a closed connection,
a response to another message, a malformed PDU) ends the association as
network trouble: the current object and all later ones are reported ``RETRY``.
"""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder.batching import (
    MAX_CONTEXTS,
    ContextSpec,
    ObjectInfo,
    SendOutcome,
    is_transient_status,
)
from dicomnode.forwarder.sender import (
    MAX_SEND_PDU_BYTES,
    AssociationSender,
    CheckCallback,
    ResultCallback,
    RunEnd,
)
from dicomnode.forwarder.transcode import (
    DEFLATED_EXPLICIT_VR_LE,
    TranscodeError,
    choose_syntax,
    syntax_name,
    transcode,
)
from dicomnode.status import describe_status, is_success_or_warning
from dicomnode.upperlayer import (
    ABORT,
    ABORT_PDU,
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    APPLICATION_CONTEXT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    C_STORE_RQ,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    LONG_VRS,
    MESSAGE_ID,
    MESSAGE_ID_RESPONDED,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RP_PDU,
    RELEASE_RQ,
    RELEASE_RQ_PDU,
    STATUS,
    ae_title_field,
    command_set,
    command_us,
    item,
    p_data_pdu,
    parse_command,
    sub_items,
    uid_text,
    us,
)

logger = logging.getLogger(__name__)

#: P-DATA-TF header (type, reserved, PDU length) + PDV header (item length, context, control).
_PDATA_HEAD: Final = struct.Struct(">BBIIBB")
_PDATA_HEAD_LEN: Final = 12
#: Room in front of the first data fragment for the C-STORE-RQ PDU (sent in the same write).
_COMMAND_ROOM: Final = 512
#: Data set bytes (plus PDU headers) sent per write when the peer's PDUs are small.
_BATCH_BYTES: Final = 1024 * 1024
_HAS_PREADV: Final = hasattr(os, "preadv")
#: Largest PDU we accept from the peer (responses are a few hundred bytes).
_MAX_RECV_PDU: Final = 16 * 1024 * 1024
#: First read of a file: preamble + File Meta Information fit in here in practice.
_HEAD_BYTES: Final = 4096
_MAX_META_BYTES: Final = 1024 * 1024

_REJECT_SOURCES: Final = {1: "service user", 2: "service provider (ACSE)", 3: "service provider"}
_REJECT_REASONS: Final = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class _NetworkTrouble(Exception):
    """The association cannot go on; every object not yet decided is reported RETRY."""


class _Unsendable(Exception):
    """This object cannot be sent (nothing of it went out); it is reported REFUSED."""


# --------------------------------------------------------------------------- encoding


def associate_rq(called: str, calling: str, contexts: Sequence[ContextSpec], max_pdu: int) -> bytes:
    """Encode an A-ASSOCIATE-RQ proposing ``contexts`` with ids 1, 3, 5, ...

    Raises
    ------
    ValueError
        For an invalid AE title or more than 128 contexts.
    """
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts (at most {MAX_CONTEXTS})")
    items = [item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
    for index, spec in enumerate(contexts):
        body = bytes((2 * index + 1, 0, 0, 0)) + item(0x30, spec.sop_class_uid.encode("ascii"))
        body += b"".join(item(0x40, ts.encode("ascii")) for ts in spec.transfer_syntaxes)
        items.append(item(0x20, body))
    user = (
        item(0x51, struct.pack(">I", max_pdu))
        + item(0x52, IMPLEMENTATION_UID.encode("ascii"))
        + item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    )
    items.append(item(0x50, user))
    body = (
        struct.pack(">HH", 1, 0)
        + ae_title_field(called)
        + ae_title_field(calling)
        + bytes(32)
        + b"".join(items)
    )
    return struct.pack(">BBI", ASSOCIATE_RQ, 0, len(body)) + body


def store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """Encode a C-STORE-RQ command set (Implicit VR Little Endian, priority medium)."""
    return command_set(
        [
            (AFFECTED_SOP_CLASS, sop_class_uid.encode("ascii")),
            (COMMAND_FIELD, us(C_STORE_RQ)),
            (MESSAGE_ID, us(message_id)),
            (0x00000700, us(0x0000)),  # Priority: medium
            (DATA_SET_TYPE, us(0x0000)),
            (AFFECTED_SOP_INSTANCE, sop_instance_uid.encode("ascii")),
        ]
    )


def parse_ac(
    body: bytes, proposed: dict[int, ContextSpec]
) -> tuple[dict[str, dict[str, int]], int]:
    """Return the accepted contexts ``{SOP class: {syntax: context id}}`` and the peer max PDU.

    Only syntaxes we proposed for that context count; a peer maximum of 0
    (unlimited) is returned as 0.
    """
    accepted: dict[str, dict[str, int]] = {}
    peer_max = 0
    pos = 68
    while pos + 4 <= len(body):
        item_type = body[pos]
        length = struct.unpack_from(">H", body, pos + 2)[0]
        value = body[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type == 0x21 and len(value) >= 4:
            cid, result = value[0], value[2]
            spec = proposed.get(cid)
            if result != 0 or spec is None:
                continue
            for sub_type, sub in sub_items(value[4:]):
                syntax = uid_text(sub)
                if sub_type == 0x40 and syntax in spec.transfer_syntaxes:
                    accepted.setdefault(spec.sop_class_uid, {}).setdefault(syntax, cid)
        elif item_type == 0x50:
            for sub_type, sub in sub_items(value):
                if sub_type == 0x51 and len(sub) >= 4:
                    peer_max = int(struct.unpack_from(">I", sub)[0])
    return accepted, peer_max


def _describe_reject(body: bytes) -> str:
    if len(body) < 4:
        return ""
    result, source, reason = body[1], body[2], body[3]
    kind = "permanent" if result == 1 else "transient"
    why = _REJECT_REASONS.get((source, reason), f"reason {reason}")
    return f"{kind}, {_REJECT_SOURCES.get(source, f'source {source}')}: {why}"


def read_meta(head: bytes | bytearray | memoryview, whole: bool) -> tuple[dict[int, bytes], int]:
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
    _Unsendable
        When the file has no File Meta Information or it is malformed.
    EOFError
        When ``head`` ends inside the File Meta Information (read more and retry).
    """
    if len(head) < 132 or bytes(head[128:132]) != b"DICM":
        if not whole and len(head) < 132:
            raise EOFError
        raise _Unsendable("no DICOM File Meta Information (no 'DICM' prefix)")
    values: dict[int, bytes] = {}
    pos = 132
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
            raise _Unsendable("undefined length in the File Meta Information")
        if start + length > len(head):
            if whole:
                raise _Unsendable("File Meta Information runs past the end of the file")
            raise EOFError
        values[elem] = bytes(head[start : start + length])
        pos = start + length


# --------------------------------------------------------------------------- connection


class _Connection:
    """One association's socket: sends and reads whole PDUs; abortable from another thread.

    A lock serialises writes (and, with TLS, every use of the SSL object), so
    :meth:`abort` never interleaves its A-ABORT with a PDU being written. When
    the socket is busy, :meth:`abort` only shuts the connection down, which
    wakes the sending thread at once.
    """

    def __init__(self, sock: socket.socket, where: str, tls: bool) -> None:
        self.sock = sock
        self.where = where
        self.tls = tls
        self.aborted = False
        self._io_lock = threading.Lock()
        self._pending = bytearray()
        self._timeout: float | None = None

    def set_timeout(self, seconds: float) -> None:
        if seconds != self._timeout:
            self._timeout = seconds
            self.sock.settimeout(seconds)

    def send(self, data: bytes | bytearray | memoryview, what: str = "sending") -> None:
        """Write ``data`` completely.

        Raises
        ------
        _NetworkTrouble
            When the peer accepts no data within the timeout or the connection is gone.
        """
        try:
            with self._io_lock:
                if self.aborted:
                    raise _NetworkTrouble("association aborted locally")
                self.sock.sendall(data)
        except TimeoutError as exc:
            raise _NetworkTrouble(f"peer accepted no data for {self._timeout:g} s") from exc
        except OSError as exc:
            raise self._trouble(f"connection to {self.where} lost while {what}", exc) from exc

    def _trouble(self, message: str, exc: BaseException | None = None) -> _NetworkTrouble:
        if self.aborted:
            return _NetworkTrouble("association aborted locally (forced stop)")
        return _NetworkTrouble(f"{message}: {exc}" if exc is not None else message)

    def _fill(self, count: int, what: str) -> None:
        while len(self._pending) < count:
            try:
                if self.tls:
                    with self._io_lock:
                        chunk = self.sock.recv(max(65536, count - len(self._pending)))
                else:
                    chunk = self.sock.recv(max(65536, count - len(self._pending)))
            except TimeoutError as exc:
                raise _Timeout(what) from exc
            except OSError as exc:
                raise self._trouble(f"connection to {self.where} lost while {what}", exc) from exc
            if not chunk:
                raise self._trouble(f"connection closed by {self.where} while {what}")
            self._pending += chunk

    def read_pdu(self, what: str) -> tuple[int, bytes]:
        """Return (PDU type, body) of the next PDU.

        Raises
        ------
        _Timeout
            When nothing complete arrives within the current timeout.
        _NetworkTrouble
            When the connection is lost or the PDU is too large.
        """
        self._fill(6, what)
        pdu_type = self._pending[0]
        length = int(struct.unpack_from(">I", self._pending, 2)[0])
        if length > _MAX_RECV_PDU:
            raise _NetworkTrouble(f"{self.where} sent a PDU of {length} bytes (protocol error)")
        self._fill(6 + length, what)
        body = bytes(self._pending[6 : 6 + length])
        del self._pending[: 6 + length]
        return pdu_type, body

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
                            self.sock.send(ABORT_PDU)
                    else:
                        # the descriptor is non-blocking (the socket has a timeout), so
                        # this write cannot wait for a peer that stopped reading
                        os.write(self.sock.fileno(), ABORT_PDU)
            except (OSError, ValueError) as exc:
                logger.debug("A-ABORT not sent: %s", exc)
            finally:
                self._io_lock.release()
        self.aborted = True
        self.shutdown()

    def shutdown(self) -> None:
        try:
            # socket.socket's shutdown, not SSLSocket's: that one drops the SSL object,
            # which a concurrent read on another thread may still be using.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        try:
            self.sock.close()
        except OSError:
            pass


class _Timeout(Exception):
    """Nothing arrived within the socket timeout."""


# --------------------------------------------------------------------------- sender


class LeanAssociationSender(AssociationSender):
    """Send objects to the configured target, one association per call of :meth:`run`.

    A drop-in replacement of :class:`AssociationSender`: it inherits the
    configuration, the lock and the per-file reporting of the rest of a run;
    nothing of pynetdicom's association machinery is used. Not for concurrent :meth:`run` calls; :meth:`abort` may
    be called from any thread. Parameters as for :class:`AssociationSender`.
    """

    def __init__(self, config: ForwarderConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(config, ssl_context)
        self._conn: _Connection | None = None
        self._buffer = bytearray()

    def abort(self) -> None:
        """Abort the association in progress, if any (used by a forced stop)."""
        with self._lock:
            conn = self._conn
        if conn is not None and not conn.aborted:
            logger.warning("ABORTING association to %s", self.config.target_aet)
            conn.abort()

    # -- association ------------------------------------------------------------

    def _where(self) -> str:
        cfg = self.config
        return f"{cfg.target_aet}@{cfg.target_ip}:{cfg.target_port}"

    def _connect(self) -> _Connection:
        """Open the TCP (and TLS) connection; raise _NetworkTrouble with the sender's wording."""
        cfg = self.config
        where = self._where()
        try:
            sock = socket.create_connection(
                (cfg.target_ip, cfg.target_port), timeout=cfg.acse_timeout_s
            )
        except OSError as exc:
            raise _NetworkTrouble(
                f"cannot connect to {where} (connection refused or timed out): {exc}"
            ) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=cfg.target_ip)
        except OSError as exc:
            sock.close()
            raise _NetworkTrouble(
                f"association to {where} failed: TLS handshake failed: {exc}"
            ) from exc
        conn = _Connection(sock, where, self.ssl_context is not None)
        conn._timeout = cfg.acse_timeout_s
        return conn

    def _negotiate(
        self, conn: _Connection, contexts: Sequence[ContextSpec]
    ) -> tuple[dict[str, dict[str, int]], int]:
        cfg = self.config
        where = conn.where
        proposed = {2 * i + 1: spec for i, spec in enumerate(contexts)}
        try:
            rq = associate_rq(cfg.target_aet, cfg.calling_aet, contexts, cfg.max_pdu_bytes)
        except (ValueError, UnicodeEncodeError) as exc:
            raise _NetworkTrouble(f"association to {where} failed: {exc}") from exc
        conn.set_timeout(cfg.acse_timeout_s)
        conn.send(rq, "requesting the association")
        try:
            pdu_type, body = conn.read_pdu("negotiating the association")
        except _Timeout as exc:
            raise _NetworkTrouble(
                f"no association with {where} (no answer within acse_timeout_s)"
            ) from exc
        if pdu_type == ASSOCIATE_AC:
            return parse_ac(body, proposed)
        if pdu_type == ASSOCIATE_RJ:
            raise _NetworkTrouble(f"association rejected by {where} ({_describe_reject(body)})")
        if pdu_type == ABORT:
            raise _NetworkTrouble(f"association aborted by {where}")
        conn.abort()
        raise _NetworkTrouble(
            f"no association with {where} (unexpected PDU 0x{pdu_type:02X}, protocol error)"
        )

    def _release(self, conn: _Connection) -> None:
        """A-RELEASE-RQ and wait for A-RELEASE-RP (at most acse_timeout_s); never raises."""
        try:
            conn.send(RELEASE_RQ_PDU, "releasing the association")
            conn.set_timeout(self.config.acse_timeout_s)
            while True:
                pdu_type, _body = conn.read_pdu("releasing the association")
                if pdu_type == RELEASE_RP:
                    return
                if pdu_type == RELEASE_RQ:  # release collision (PS3.8 7.2.2): we are requestor
                    conn.send(RELEASE_RP_PDU, "releasing the association")
                    continue
                if pdu_type == ABORT:
                    return
        except (_NetworkTrouble, _Timeout) as exc:
            logger.debug("release of the association to %s incomplete: %s", conn.where, exc)

    # -- run ----------------------------------------------------------------------

    def run(
        self,
        locate: Callable[[ObjectInfo], Path],
        objects: Sequence[ObjectInfo],
        contexts: Sequence[ContextSpec],
        on_result: ResultCallback,
        check: CheckCallback,
        should_stop: Callable[[], bool],
    ) -> RunEnd:
        """Send ``objects`` in the given order over one association.

        Same contract as :meth:`AssociationSender.run`: exactly one callback per
        object that reached a decision (``SENT``, ``REFUSED`` or ``RETRY``), none
        for objects skipped because of a stop or a changed file.
        """
        try:
            conn = self._connect()
        except _NetworkTrouble as exc:
            reason = str(exc)
            self._report_rest(objects, 0, on_result, reason)
            return RunEnd(network_error=reason)
        with self._lock:
            self._conn = conn
        try:
            try:
                accepted, peer_max = self._negotiate(conn, contexts)
            except _NetworkTrouble as exc:
                reason = str(exc)
                self._report_rest(objects, 0, on_result, reason)
                return RunEnd(network_error=reason)
            if not accepted:
                self._release(conn)
                for obj in objects:
                    on_result(
                        obj, SendOutcome.REFUSED, None, "SOP class not accepted by the target"
                    )
                return RunEnd()
            if peer_max == 0 or peer_max > MAX_SEND_PDU_BYTES:
                peer_max = MAX_SEND_PDU_BYTES
            logger.debug(
                "ASSOCIATED with %s (lean): %d of %d contexts accepted, peer max PDU %d",
                conn.where,
                sum(len(v) for v in accepted.values()),
                len(contexts),
                peer_max,
            )
            return self._send_objects(
                conn, accepted, peer_max, locate, objects, on_result, check, should_stop
            )
        finally:
            with self._lock:
                self._conn = None
            conn.close()

    def _send_objects(
        self,
        conn: _Connection,
        accepted: dict[str, dict[str, int]],
        peer_max: int,
        locate: Callable[[ObjectInfo], Path],
        objects: Sequence[ObjectInfo],
        on_result: ResultCallback,
        check: CheckCallback,
        should_stop: Callable[[], bool],
    ) -> RunEnd:
        chunk = max(peer_max - 6, 1)
        stride = _PDATA_HEAD_LEN + chunk
        size = _COMMAND_ROOM + stride * max(1, _BATCH_BYTES // stride)
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        message_id = 0
        deferred_last = False  # the previous object got a transient refusal
        for index, obj in enumerate(objects):
            if should_stop() or not check(obj):
                self._release(conn)
                return RunEnd(stopped=True)
            by_syntax = accepted.get(obj.sop_class_uid)
            if not by_syntax:
                on_result(obj, SendOutcome.REFUSED, None, "SOP class not accepted by the target")
                continue
            message_id = message_id % 0xFFFF + 1
            try:
                sent = self._send_object(conn, locate(obj), obj, by_syntax, message_id, chunk)
                if sent is not None:
                    on_result(obj, SendOutcome.REFUSED, None, sent)
                    continue
                status = self._read_status(conn, message_id)
            except FileNotFoundError:
                logger.warning("VANISHED %s before it could be sent", obj.rel_path)
                continue
            except _NetworkTrouble as exc:
                reason = str(exc)
                self._report_rest(objects, index, on_result, reason)
                conn.abort()
                return RunEnd(network_error=reason)
            if is_success_or_warning(status):
                on_result(obj, SendOutcome.SENT, status, describe_status(status))
                deferred_last = False
            elif is_transient_status(status):
                reason = f"target refused temporarily: 0x{status:04X} {describe_status(status)}"
                if deferred_last:
                    # two in a row: the target refuses everything (down, out of space)
                    self._report_rest(objects, index, on_result, reason)
                    self._release(conn)
                    return RunEnd(network_error=reason)
                on_result(obj, SendOutcome.DEFERRED, status, reason)
                deferred_last = True
            else:
                on_result(obj, SendOutcome.REFUSED, status, describe_status(status))
                deferred_last = False
        self._release(conn)
        return RunEnd()

    # -- one object ---------------------------------------------------------------

    def _send_object(
        self,
        conn: _Connection,
        path: Path,
        obj: ObjectInfo,
        by_syntax: dict[str, int],
        message_id: int,
        chunk: int,
    ) -> str | None:
        """Send the C-STORE-RQ and the data set; return a refusal reason if nothing was sent.

        Raises
        ------
        FileNotFoundError
            The file vanished before anything of it was sent.
        _NetworkTrouble
            The association cannot go on.
        """
        try:
            fh = path.open("rb", buffering=0)
        except FileNotFoundError:
            raise
        except OSError as exc:
            return f"cannot send this file: {exc}"
        with fh:
            try:
                data_start, size = _locate_data_set(fh)
            except (_Unsendable, OSError) as exc:
                return f"cannot send this file: {exc}"
            command = store_rq(message_id, obj.sop_class_uid, obj.sop_instance_uid)
            syntax = obj.transfer_syntax_uid
            cid = by_syntax.get(syntax)
            if cid is None:
                return self._send_converted(conn, path, obj, by_syntax, command, data_start, chunk)
            length = size - data_start
            fill = _file_reader(fh.fileno(), data_start)
            if syntax == DEFLATED_EXPLICIT_VR_LE and length % 2:
                # PS3.5 A.5: an odd-length deflate stream gets one trailing NULL byte
                fill = _zero_padded(fill, length)
                length += 1
            self._send_message(conn, cid, command, length, fill, chunk)
        return None

    def _send_converted(
        self,
        conn: _Connection,
        path: Path,
        obj: ObjectInfo,
        by_syntax: dict[str, int],
        command: bytes,
        data_start: int,
        chunk: int,
    ) -> str | None:
        """Convert the object into a syntax the target accepted and send it, or say why not."""
        offered = set(by_syntax)
        target = choose_syntax(obj.transfer_syntax_uid, offered)
        names = ", ".join(sorted(syntax_name(ts) for ts in offered))
        if target is None:
            return (
                f"target accepts {obj.sop_class_uid} only as {names}; "
                f"no conversion from {syntax_name(obj.transfer_syntax_uid)} into these"
            )
        try:
            converted = transcode(path, obj.transfer_syntax_uid, target, data_start)
        except TranscodeError as exc:
            return (
                f"target accepts {obj.sop_class_uid} only as {names}; conversion from "
                f"{syntax_name(obj.transfer_syntax_uid)} failed: {exc}"
            )
        (logger.warning if converted.lossy else logger.info)(
            "CONVERTED file=%s sop_instance_uid=%s from=%s to=%s: %s",
            obj.rel_path,
            obj.sop_instance_uid,
            syntax_name(obj.transfer_syntax_uid),
            syntax_name(converted.transfer_syntax),
            converted.how,
        )
        source = memoryview(converted.data)

        def fill(views: list[memoryview], position: int) -> None:
            for into in views:
                into[:] = source[position : position + len(into)]
                position += len(into)

        self._send_message(
            conn, by_syntax[converted.transfer_syntax], command, len(source), fill, chunk
        )
        return None

    def _send_message(
        self,
        conn: _Connection,
        cid: int,
        command: bytes,
        length: int,
        fill: Callable[[list[memoryview], int], None],
        chunk: int,
    ) -> None:
        """Send the command PDU and ``length`` data set bytes produced by ``fill``.

        ``fill(views, position)`` fills ``views`` with the data set bytes from
        ``position`` on. The data set goes out in P-DATA-TF PDUs of at most
        ``chunk`` bytes of data, several PDUs per write (up to
        :data:`_BATCH_BYTES`), each written in place into one reused buffer
        between the PDU headers; the command PDU shares the first write. A
        source that ends early breaks the message: the association is aborted.
        """
        buf = self._buffer
        view = memoryview(buf)
        per_write = max(1, (len(buf) - _COMMAND_ROOM) // (_PDATA_HEAD_LEN + chunk))
        conn.set_timeout(self.config.network_timeout_s)
        command_pdu: bytes | None = (
            p_data_pdu(cid, 0x03, command) if len(command) <= chunk else None
        )
        if command_pdu is None:
            for offset in range(0, len(command), chunk):
                piece = command[offset : offset + chunk]
                last = offset + chunk >= len(command)
                conn.send(p_data_pdu(cid, 0x03 if last else 0x01, piece), "sending a command")
        elif len(command_pdu) > _COMMAND_ROOM:
            conn.send(command_pdu, "sending a command")
            command_pdu = None
        position = 0
        while True:
            views: list[memoryview] = []
            head = _COMMAND_ROOM
            end = position
            for _ in range(per_write):
                want = min(length - end, chunk)
                end += want
                last = end >= length
                _PDATA_HEAD.pack_into(
                    buf, head, P_DATA_TF, 0, want + 6, want + 2, cid, 0x02 if last else 0x00
                )
                head += _PDATA_HEAD_LEN
                views.append(view[head : head + want])
                head += want
                if last:
                    break
            try:
                fill(views, position)
            except _SourceEnded as exc:
                raise _NetworkTrouble(f"file shrank while being sent: {exc}") from exc
            except OSError as exc:
                raise _NetworkTrouble(f"reading the file failed while sending it: {exc}") from exc
            position = end
            start = _COMMAND_ROOM
            if command_pdu is not None:
                start -= len(command_pdu)
                buf[start:_COMMAND_ROOM] = command_pdu
                command_pdu = None
            conn.send(view[start:head], "sending a data set")
            if position >= length:
                return

    def _read_status(self, conn: _Connection, message_id: int) -> int:
        """Wait for the C-STORE-RSP to ``message_id`` and return its Status.

        Raises
        ------
        _NetworkTrouble
            No (valid) response: timeout, abort, release request, closed connection,
            a data set fragment or a response to another message.
        """
        conn.set_timeout(self.config.dimse_timeout_s)
        fragments = bytearray()
        while True:
            try:
                pdu_type, body = conn.read_pdu("waiting for the C-STORE response")
            except _Timeout as exc:
                raise _NetworkTrouble(
                    "no C-STORE response within dimse_timeout_s "
                    f"({self.config.dimse_timeout_s:g} s)"
                ) from exc
            except _NetworkTrouble as exc:
                raise _NetworkTrouble(f"no C-STORE response ({exc})") from exc
            if pdu_type == ABORT:
                raise _NetworkTrouble(f"no C-STORE response (association aborted by {conn.where})")
            if pdu_type == RELEASE_RQ:
                raise _NetworkTrouble(
                    f"no C-STORE response ({conn.where} asked to release the association)"
                )
            if pdu_type != P_DATA_TF:
                raise _NetworkTrouble(
                    f"no C-STORE response (unexpected PDU 0x{pdu_type:02X} from {conn.where})"
                )
            pos = 0
            while pos + 6 <= len(body):
                item_length = int(struct.unpack_from(">I", body, pos)[0])
                end = pos + 4 + item_length
                if item_length < 2 or end > len(body):
                    raise _NetworkTrouble("no C-STORE response (malformed P-DATA-TF)")
                control = body[pos + 5]
                if not control & 0x01:
                    raise _NetworkTrouble("no C-STORE response (unexpected data set fragment)")
                fragments += body[pos + 6 : end]
                pos = end
                if control & 0x02:
                    return self._status_of_command(fragments, message_id, conn.where)

    @staticmethod
    def _status_of_command(raw: bytearray, message_id: int, where: str) -> int:
        try:
            command = parse_command(raw)
        except ValueError as exc:
            raise _NetworkTrouble(f"no C-STORE response ({exc})") from exc
        field = command_us(command, COMMAND_FIELD)
        answered = command_us(command, MESSAGE_ID_RESPONDED)
        if field != 0x8001 or answered != message_id:
            raise _NetworkTrouble(
                f"no C-STORE response ({where} answered message {answered} "
                f"with command 0x{field or 0:04X} while message {message_id} was waiting)"
            )
        status = command_us(command, STATUS)
        if status is None:
            raise _NetworkTrouble("no C-STORE response (response without a Status)")
        comment = command.get(0x00000902)
        if comment and not is_success_or_warning(status):
            logger.info(
                "C-STORE status 0x%04X comment from %s: %s", status, where, uid_text(comment)
            )
        return status


def _zero_padded(
    fill: Callable[[list[memoryview], int], None], real_length: int
) -> Callable[[list[memoryview], int], None]:
    """Return ``fill`` with the bytes from ``real_length`` on given as zeros (padding)."""

    def padded(views: list[memoryview], position: int) -> None:
        inner: list[memoryview] = []
        at = position
        for into in views:
            real = max(0, min(len(into), real_length - at))
            if real:
                inner.append(into[:real])
            if real < len(into):
                into[real:] = bytes(len(into) - real)
            at += len(into)
        if inner:
            fill(inner, position)

    return padded


class _SourceEnded(Exception):
    """The file ended before the announced data set length."""


def _file_reader(fd: int, data_start: int) -> Callable[[list[memoryview], int], None]:
    """Return a ``fill(views, position)`` reading the data set of the open file ``fd``.

    One ``preadv`` per write fills every fragment at once where the platform has it.
    """

    def fill(views: list[memoryview], position: int) -> None:
        offset = data_start + position
        pending = views
        if _HAS_PREADV:
            got = os.preadv(fd, views, offset)
            if got == sum(len(v) for v in views):
                return
            offset, pending = _after(views, offset, got)
        for into in pending:
            while len(into):
                count = os.pread(fd, len(into), offset)
                if not count:
                    raise _SourceEnded(f"end of file at byte {offset}")
                into[: len(count)] = count
                into = into[len(count) :]
                offset += len(count)

    return fill


def _after(views: list[memoryview], offset: int, got: int) -> tuple[int, list[memoryview]]:
    """Return the file offset and the parts of ``views`` still to fill after ``got`` bytes."""
    rest: list[memoryview] = []
    skip = got
    for into in views:
        if skip >= len(into):
            skip -= len(into)
            continue
        rest.append(into[skip:])
        skip = 0
    return offset + got, rest


def _locate_data_set(fh: io.FileIO) -> tuple[int, int]:
    """Return (offset of the data set, file size) of an open Part 10 file.

    A file without preamble and ``DICM`` is a bare data set starting at byte 0.
    The SOP Class and Instance UIDs of the C-STORE come from the data set and the
    transfer syntax from the forwarder's header read, so the File Meta
    Information need not hold them.
    """
    size = os.fstat(fh.fileno()).st_size
    want = min(size, _HEAD_BYTES)
    while True:
        fh.seek(0)
        head = fh.read(want)
        if len(head) < 132 or head[128:132] != b"DICM":
            return 0, size  # a bare data set (the forwarder read its encoding from the data)
        try:
            _values, offset = read_meta(head, whole=len(head) >= size)
            break
        except EOFError:
            if want >= min(size, _MAX_META_BYTES):
                raise _Unsendable("File Meta Information too large or truncated") from None
            want = min(size, want * 16, _MAX_META_BYTES)
    return offset, size
