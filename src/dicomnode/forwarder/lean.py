"""Lean C-STORE SCU of the forwarder: PS3.8 upper layer on one blocking socket.

:class:`LeanAssociationSender` has the interface and the per-file outcome rules
of :class:`~dicomnode.forwarder.sender.AssociationSender` but speaks the DICOM
upper layer itself (:mod:`dicomnode.dul`), on the calling thread, with no
reactor threads, polling or queues (bench/README.md has the measurements that
made this choice). One association per :meth:`~LeanAssociationSender.run`:

* A-ASSOCIATE-RQ with one presentation context per :class:`ContextSpec`
  (ids 1, 3, 5, ...), our maximum PDU length, implementation class UID and
  version name; A-ASSOCIATE-AC / -RJ / A-ABORT are parsed.
* Per object a C-STORE-RQ command set (Implicit VR Little Endian), then the
  data set streamed from the file, starting right after its File Meta
  Information, in P-DATA-TF PDUs that fit the peer's maximum PDU length (an
  unlimited peer is capped at :data:`~dicomnode.forwarder.sender.MAX_SEND_PDU_BYTES`).
  One reusable buffer of about 1 MiB holds the PDUs of one write (small PDUs
  are batched: their data is read in place between the headers with one
  ``preadv``, :mod:`.source`), so memory stays bounded for objects of any
  size; the bytes are never decoded. A
  deflated data set of odd length gets the trailing NULL byte PS3.5 A.5
  requires. Only when the target did not accept the file's transfer syntax is
  the object converted (:mod:`~dicomnode.forwarder.transcode`: inflated,
  byte-swapped or decompressed, pixel values checked) into an accepted
  uncompressed syntax; if that is impossible it is refused (parked).
* While the target stores an object, the next one is read ahead: its file is
  opened and its command and first PDUs are put into the buffer (and the
  caller's ``idle`` work, its log lines, is done); it is sent only after the
  response came and the caller's ``check`` of it passed. Only one object is
  ever in flight.
* The C-STORE-RSP is read before the next object is sent (like storescu); its Status
  decides SENT / REFUSED. A transient refusal (0xA7xx, 0xFE00) of one object is
  reported ``DEFERRED`` and the next object is tried; a second one in a row
  means the target refuses everything (down, out of space): the association
  ends and the rest is reported ``RETRY``.
* A-RELEASE-RQ at the end, waiting for A-RELEASE-RP at most ``acse_timeout_s``.

:meth:`~LeanAssociationSender.request_commitment` asks a committing
destination to commit instances (Storage Commitment Push Model N-ACTION,
PS3.4 J.3.2) on an association of its own. It proposes both roles for the
SOP class, so a destination may send its N-EVENT-REPORT on that association
(read for a short while after the N-ACTION-RSP and answered once kept); most
(Orthanc) send it on a new association to the node's port instead.

TCP_NODELAY is always on. Timeouts: connect and negotiation ``acse_timeout_s``,
waiting for a response ``dimse_timeout_s``, sending ``network_timeout_s``.
Anything unexpected from the peer (A-ABORT, A-RELEASE-RQ, a closed connection,
a response to another message, a malformed PDU) ends the association as
network trouble: the current object and all later ones are reported ``RETRY``.

Length: about 600 lines, on purpose: negotiation, the send loop that writes
PDUs in place and the reading of each response are one exchange of one
association with one set of failure rules; split, each half would need the
other to be read. The protocol encoding lives in :mod:`dicomnode.dul`, the
data set source in :mod:`.source`.
"""

from __future__ import annotations

import io
import logging
import os
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dicomnode.config import ForwarderConfig
from dicomnode.dul.commitment import REQUEST_COMMITMENT, encode_action_info
from dicomnode.dul.dimse import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_STORE_RSP,
    COMMAND_FIELD,
    ERROR_COMMENT,
    EVENT_TYPE_ID,
    MESSAGE_ID,
    MESSAGE_ID_RESPONDED,
    N_ACTION_RSP,
    N_EVENT_REPORT_RQ,
    STATUS,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_SOP_CLASS,
    c_store_rq,
    command_us,
    n_action_rq,
    n_event_report_rsp,
    parse_command,
)
from dicomnode.dul.link import LinkError, LinkTimeout, PduLink
from dicomnode.dul.meta import MetaError
from dicomnode.dul.pdu import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RQ,
    ACCEPTANCE,
    APPLICATION_CONTEXT,
    PDU_HEADER,
    PDU_HEADER_LEN,
    PDV_COMMAND,
    PDV_HEADER,
    PDV_LAST,
    PduType,
    ProposedContext,
    RoleSelection,
    iter_pdvs,
    p_data_tf,
    uid_text,
)
from dicomnode.dul.scu import associate, open_link, read_message, release
from dicomnode.forwarder.batching import (
    FALLBACK_SYNTAXES,
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
from dicomnode.forwarder.source import (
    Fill,
    SourceEnded,
    UnreadableFile,
    file_reader,
    locate_data_set,
    memory_reader,
    zero_padded,
)
from dicomnode.integrity import DEFLATED_VR_LE
from dicomnode.status import describe_status, is_success_or_warning

logger = logging.getLogger(__name__)

#: P-DATA-TF header followed by its (single) PDV header, as written in place before each fragment.
_PDATA_HEAD: Final = struct.Struct(">" + PDU_HEADER.format[1:] + PDV_HEADER.format[1:])
_PDATA_HEAD_LEN: Final = PDU_HEADER_LEN + PDV_HEADER.size
#: Room in front of the first data fragment for the C-STORE-RQ PDU (sent in the same write).
_COMMAND_ROOM: Final = 512
#: Data set bytes (plus PDU headers) sent per write when the peer's PDUs are small.
_BATCH_BYTES: Final = 1024 * 1024
#: Called with (Event Type ID, Event Information, transfer syntax) of a storage commitment
#: report that came on the requesting association; returns the N-EVENT-REPORT-RSP status.
ReportCallback = Callable[[int, bytes, str], int]


@dataclass(slots=True)
class _Ready:
    """The next object's first write, prepared in the buffer while the target stored the last."""

    obj: ObjectInfo
    fh: io.FileIO
    message_id: int
    cid: int
    length: int
    fill: Fill
    #: Buffer offsets of the prepared write (command PDU, then data PDUs).
    start: int
    head: int
    #: Data set bytes the prepared write holds.
    position: int


# --------------------------------------------------------------------------- sender


class LeanAssociationSender(AssociationSender):
    """Send objects to the configured target, one association per call of :meth:`run`.

    A drop-in replacement of :class:`AssociationSender`: it inherits the
    configuration, the lock and the per-file reporting of the rest of a run;
    nothing of pynetdicom's association machinery is used. Not for concurrent
    :meth:`run` calls (associations at once use :meth:`helpers`); :meth:`abort`
    may be called from any thread. Parameters as for :class:`AssociationSender`.
    """

    def __init__(self, config: ForwarderConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(config, ssl_context)
        self._conn: PduLink | None = None
        self._buffer = bytearray()

    def abort(self) -> None:
        """Abort the association in progress, and those of the helpers, if any (a forced stop)."""
        with self._lock:
            conn = self._conn
        if conn is not None and not conn.aborted:
            logger.warning("ABORTING association to %s", self.config.target_aet)
            conn.abort()
        for helper in self._helpers_now():
            helper.abort()

    # -- association ------------------------------------------------------------

    def _where(self) -> str:
        cfg = self.config
        return f"{cfg.target_aet}@{cfg.target_ip}:{cfg.target_port}"

    def _connect(self) -> PduLink:
        """Open the TCP (and TLS) connection; raise LinkError with the sender's wording."""
        cfg = self.config
        return open_link(
            cfg.target_ip, cfg.target_port, self._where(), cfg.acse_timeout_s, self.ssl_context
        )

    def _negotiate(
        self, conn: PduLink, contexts: Sequence[ContextSpec]
    ) -> tuple[dict[str, dict[str, int]], int]:
        cfg = self.config
        where = conn.where
        proposed = {2 * i + 1: spec for i, spec in enumerate(contexts)}
        request = A_ASSOCIATE_RQ(
            cfg.target_aet,
            cfg.calling_aet,
            APPLICATION_CONTEXT,
            tuple(
                ProposedContext(cid, spec.sop_class_uid, tuple(spec.transfer_syntaxes))
                for cid, spec in proposed.items()
            ),
            cfg.max_pdu_bytes,
        )
        try:
            rq = request.encode()
        except (ValueError, UnicodeEncodeError) as exc:
            raise LinkError(f"association to {where} failed: {exc}") from exc
        return _accepted(A_ASSOCIATE_AC.decode(associate(conn, rq, cfg.acse_timeout_s)), proposed)

    def _release(self, conn: PduLink) -> None:
        """A-RELEASE-RQ and wait for A-RELEASE-RP (at most acse_timeout_s); never raises."""
        release(conn, self.config.acse_timeout_s)

    # -- run ----------------------------------------------------------------------

    def run(
        self,
        locate: Callable[[ObjectInfo], Path],
        objects: Sequence[ObjectInfo],
        contexts: Sequence[ContextSpec],
        on_result: ResultCallback,
        check: CheckCallback,
        should_stop: Callable[[], bool],
        idle: Callable[[], None] | None = None,
    ) -> RunEnd:
        """Send ``objects`` in the given order over one association.

        Same contract as :meth:`AssociationSender.run`: exactly one callback per
        object that reached a decision (``SENT``, ``REFUSED`` or ``RETRY``), none
        for objects skipped because of a stop or a changed file.
        """
        try:
            conn = self._connect()
        except LinkError as exc:
            reason = str(exc)
            self._report_rest(objects, 0, on_result, reason)
            return RunEnd(network_error=reason)
        with self._lock:
            self._conn = conn
        try:
            try:
                accepted, peer_max = self._negotiate(conn, contexts)
            except LinkError as exc:
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
                conn, accepted, peer_max, locate, objects, on_result, check, should_stop, idle
            )
        finally:
            with self._lock:
                self._conn = None
            conn.close()

    def _send_objects(
        self,
        conn: PduLink,
        accepted: dict[str, dict[str, int]],
        peer_max: int,
        locate: Callable[[ObjectInfo], Path],
        objects: Sequence[ObjectInfo],
        on_result: ResultCallback,
        check: CheckCallback,
        should_stop: Callable[[], bool],
        idle: Callable[[], None] | None,
    ) -> RunEnd:
        chunk = max(peer_max - 6, 1)
        stride = _PDATA_HEAD_LEN + chunk
        size = _COMMAND_ROOM + stride * max(1, _BATCH_BYTES // stride)
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        message_id = 0
        deferred_last = False  # the previous object got a transient refusal
        ready: _Ready | None = None  # the next object, read while the target stores this one
        try:
            for index, obj in enumerate(objects):
                use, ready = (ready if ready is not None and ready.obj is obj else None), None
                if should_stop() or not check(obj):
                    if use is not None:
                        use.fh.close()
                    self._release(conn)
                    return RunEnd(stopped=True)
                by_syntax = accepted.get(obj.sop_class_uid)
                if not by_syntax:
                    on_result(
                        obj, SendOutcome.REFUSED, None, "SOP class not accepted by the target"
                    )
                    continue
                try:
                    if use is not None:
                        message_id = use.message_id
                        try:
                            self._send_ready(conn, use, chunk)
                        finally:
                            use.fh.close()
                    else:
                        message_id = message_id % 0xFFFF + 1
                        sent = self._send_object(
                            conn, locate(obj), obj, by_syntax, message_id, chunk
                        )
                        if sent is not None:
                            on_result(obj, SendOutcome.REFUSED, None, sent)
                            continue
                    if index + 1 < len(objects):
                        ready = self._prepare(
                            locate, objects[index + 1], accepted, message_id % 0xFFFF + 1, chunk
                        )
                    if idle is not None:
                        idle()  # the caller's deferred work, while the target stores the object
                    status = self._read_status(conn, message_id)
                except FileNotFoundError:
                    logger.warning("VANISHED %s before it could be sent", obj.rel_path)
                    continue
                except LinkError as exc:
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
        finally:
            if ready is not None:
                ready.fh.close()
        self._release(conn)
        return RunEnd()

    # -- one object ---------------------------------------------------------------

    def _send_object(
        self,
        conn: PduLink,
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
        LinkError
            The association cannot go on.
        """
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            raise
        except OSError as exc:
            return f"cannot send this file: {exc}"
        with fh:
            try:
                if obj.data_start >= 0:  # found by the header read: not read again
                    data_start, size = obj.data_start, os.fstat(fh.fileno()).st_size
                else:
                    data_start, size = locate_data_set(fh)
            except (UnreadableFile, MetaError, OSError) as exc:
                return f"cannot send this file: {exc}"
            command = c_store_rq(message_id, obj.sop_class_uid, obj.sop_instance_uid)
            syntax = obj.transfer_syntax_uid
            cid = by_syntax.get(syntax)
            if cid is None:
                return self._send_converted(conn, path, obj, by_syntax, command, data_start, chunk)
            length = size - data_start
            fill = file_reader(fh.fileno(), data_start)
            if syntax == DEFLATED_VR_LE and length % 2:
                # PS3.5 A.5: an odd-length deflate stream gets one trailing NULL byte
                fill = zero_padded(fill, length)
                length += 1
            self._send_message(conn, cid, command, length, fill, chunk)
        return None

    def _send_converted(
        self,
        conn: PduLink,
        path: Path,
        obj: ObjectInfo,
        by_syntax: dict[str, int],
        command: bytes,
        data_start: int,
        chunk: int,
    ) -> str | None:
        """Convert the object into a syntax the target accepted and send it, or say why not."""
        # imported here: transcoding needs pydicom, which a plain send never imports
        from dicomnode.forwarder.transcode import (
            TranscodeError,
            choose_syntax,
            syntax_name,
            transcode,
        )

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
        self._send_message(
            conn,
            by_syntax[converted.transfer_syntax],
            command,
            len(converted.data),
            memory_reader(converted.data),
            chunk,
        )
        return None

    def _send_message(
        self,
        conn: PduLink,
        cid: int,
        command: bytes,
        length: int,
        fill: Fill,
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
        conn.set_timeout(self.config.network_timeout_s)
        command_pdu: bytes | None = (
            p_data_tf(cid, PDV_COMMAND | PDV_LAST, command) if len(command) <= chunk else None
        )
        if command_pdu is None:
            for offset in range(0, len(command), chunk):
                piece = command[offset : offset + chunk]
                last = offset + chunk >= len(command)
                control = PDV_COMMAND | PDV_LAST if last else PDV_COMMAND
                conn.send(p_data_tf(cid, control, piece), "sending a command")
        elif len(command_pdu) > _COMMAND_ROOM:
            conn.send(command_pdu, "sending a command")
            command_pdu = None
        position = 0
        while True:
            try:
                head, position = self._fill_write(cid, length, fill, chunk, position)
            except SourceEnded as exc:
                raise LinkError(f"file shrank while being sent: {exc}") from exc
            except OSError as exc:
                raise LinkError(f"reading the file failed while sending it: {exc}") from exc
            start = _COMMAND_ROOM
            if command_pdu is not None:
                start -= len(command_pdu)
                self._buffer[start:_COMMAND_ROOM] = command_pdu
                command_pdu = None
            conn.send(memoryview(self._buffer)[start:head], "sending a data set")
            if position >= length:
                return

    def _fill_write(
        self, cid: int, length: int, fill: Fill, chunk: int, position: int
    ) -> tuple[int, int]:
        """Put the PDUs of the next write into the buffer after :data:`_COMMAND_ROOM`.

        Returns the buffer offset after the last PDU and the data set position
        after them. Raises what ``fill`` raises (:class:`SourceEnded`, OSError).
        """
        buf = self._buffer
        view = memoryview(buf)
        per_write = max(1, (len(buf) - _COMMAND_ROOM) // (_PDATA_HEAD_LEN + chunk))
        views: list[memoryview] = []
        head = _COMMAND_ROOM
        end = position
        for _ in range(per_write):
            want = min(length - end, chunk)
            end += want
            last = end >= length
            _PDATA_HEAD.pack_into(
                buf,
                head,
                PduType.P_DATA_TF,
                0,
                want + 6,
                want + 2,
                cid,
                PDV_LAST if last else 0x00,
            )
            head += _PDATA_HEAD_LEN
            views.append(view[head : head + want])
            head += want
            if last:
                break
        fill(views, position)
        return head, end

    # -- the next object, read while the target stores the current one ------------

    def _prepare(
        self,
        locate: Callable[[ObjectInfo], Path],
        obj: ObjectInfo,
        accepted: dict[str, dict[str, int]],
        message_id: int,
        chunk: int,
    ) -> _Ready | None:
        """Open ``obj`` and put its command and first data PDUs into the buffer, or None.

        Only for an object sent as it is (its syntax accepted, its data set
        offset known); anything unusual (conversion, a command that needs
        PDUs of its own, a file that cannot be read now) is left to the normal
        path, which reports it. Nothing is sent here.
        """
        by_syntax = accepted.get(obj.sop_class_uid)
        cid = by_syntax.get(obj.transfer_syntax_uid) if by_syntax else None
        if cid is None or obj.data_start < 0:
            return None
        command = c_store_rq(message_id, obj.sop_class_uid, obj.sop_instance_uid)
        command_pdu = p_data_tf(cid, PDV_COMMAND | PDV_LAST, command)
        if len(command) > chunk or len(command_pdu) > _COMMAND_ROOM:
            return None
        try:
            fh = open(locate(obj), "rb", buffering=0)  # noqa: SIM115 (closed by the caller)
        except OSError:
            return None
        try:
            length = os.fstat(fh.fileno()).st_size - obj.data_start
            fill = file_reader(fh.fileno(), obj.data_start)
            if obj.transfer_syntax_uid == DEFLATED_VR_LE and length % 2:
                fill = zero_padded(fill, length)
                length += 1
            if length < 0:
                raise SourceEnded("the file is shorter than its header")
            head, position = self._fill_write(cid, length, fill, chunk, 0)
        except (OSError, SourceEnded):
            fh.close()
            return None
        start = _COMMAND_ROOM - len(command_pdu)
        self._buffer[start:_COMMAND_ROOM] = command_pdu
        return _Ready(obj, fh, message_id, cid, length, fill, start, head, position)

    def _send_ready(self, conn: PduLink, ready: _Ready, chunk: int) -> None:
        """Send a prepared object: the write already in the buffer, then the rest of its data."""
        conn.set_timeout(self.config.network_timeout_s)
        conn.send(memoryview(self._buffer)[ready.start : ready.head], "sending a data set")
        position = ready.position
        while position < ready.length:
            try:
                head, position = self._fill_write(
                    ready.cid, ready.length, ready.fill, chunk, position
                )
            except SourceEnded as exc:
                raise LinkError(f"file shrank while being sent: {exc}") from exc
            except OSError as exc:
                raise LinkError(f"reading the file failed while sending it: {exc}") from exc
            conn.send(memoryview(self._buffer)[_COMMAND_ROOM:head], "sending a data set")

    def _read_status(self, conn: PduLink, message_id: int) -> int:
        """Wait for the C-STORE-RSP to ``message_id`` and return its Status.

        Raises
        ------
        LinkError
            No (valid) response: timeout, abort, release request, closed connection,
            a data set fragment or a response to another message.
        """
        conn.set_timeout(self.config.dimse_timeout_s)
        fragments = bytearray()
        while True:
            try:
                pdu_type, body = conn.read_pdu("waiting for the C-STORE response")
            except LinkTimeout as exc:
                raise LinkError(
                    "no C-STORE response within dimse_timeout_s "
                    f"({self.config.dimse_timeout_s:g} s)"
                ) from exc
            except LinkError as exc:
                raise LinkError(f"no C-STORE response ({exc})") from exc
            if pdu_type == PduType.A_ABORT:
                raise LinkError(f"no C-STORE response (association aborted by {conn.where})")
            if pdu_type == PduType.A_RELEASE_RQ:
                raise LinkError(
                    f"no C-STORE response ({conn.where} asked to release the association)"
                )
            if pdu_type != PduType.P_DATA_TF:
                raise LinkError(
                    f"no C-STORE response (unexpected PDU 0x{pdu_type:02X} from {conn.where})"
                )
            try:
                pdvs = list(iter_pdvs(body))
            except ValueError:
                raise LinkError("no C-STORE response (malformed P-DATA-TF)") from None
            for _cid, control, fragment in pdvs:
                if not control & PDV_COMMAND:
                    raise LinkError("no C-STORE response (unexpected data set fragment)")
                fragments += fragment
                if control & PDV_LAST:
                    return self._status_of_command(fragments, message_id, conn.where)

    @staticmethod
    def _status_of_command(raw: bytearray, message_id: int, where: str) -> int:
        try:
            command = parse_command(raw)
        except ValueError as exc:
            raise LinkError(f"no C-STORE response ({exc})") from exc
        field = command_us(command, COMMAND_FIELD)
        answered = command_us(command, MESSAGE_ID_RESPONDED)
        if field != C_STORE_RSP or answered != message_id:
            raise LinkError(
                f"no C-STORE response ({where} answered message {answered} "
                f"with command 0x{field or 0:04X} while message {message_id} was waiting)"
            )
        status = command_us(command, STATUS)
        if status is None:
            raise LinkError("no C-STORE response (response without a Status)")
        comment = command.get(ERROR_COMMENT)
        if comment and not is_success_or_warning(status):
            logger.info(
                "C-STORE status 0x%04X comment from %s: %s", status, where, uid_text(comment)
            )
        return status


def _commitment_association(sender: LeanAssociationSender, conn: PduLink) -> tuple[str, int, bool]:
    """Negotiate the Storage Commitment context; return (transfer syntax, peer max PDU, report here).

    Raises
    ------
    LinkError
        When the association is rejected, aborted or the context not accepted.
    """
    cfg = sender.config
    where = conn.where
    request = A_ASSOCIATE_RQ(
        cfg.target_aet,
        cfg.calling_aet,
        APPLICATION_CONTEXT,
        (ProposedContext(1, STORAGE_COMMITMENT_SOP_CLASS, FALLBACK_SYNTAXES),),
        cfg.max_pdu_bytes,
        roles=(RoleSelection(STORAGE_COMMITMENT_SOP_CLASS, scu=True, scp=True),),
    )
    answer = A_ASSOCIATE_AC.decode(associate(conn, request.encode(), cfg.acse_timeout_s))
    chosen = [
        r.transfer_syntax
        for r in answer.results
        if r.context_id == 1 and r.result == ACCEPTANCE and r.transfer_syntax in FALLBACK_SYNTAXES
    ]
    if not chosen:
        raise LinkError(f"{where} did not accept the Storage Commitment Push Model context")
    report_here = any(
        r.sop_class_uid == STORAGE_COMMITMENT_SOP_CLASS and r.scp for r in answer.roles
    )
    peer_max = answer.max_pdu if 0 < answer.max_pdu <= MAX_SEND_PDU_BYTES else MAX_SEND_PDU_BYTES
    return chosen[0], peer_max, report_here


def request_commitment(
    sender: LeanAssociationSender,
    transaction_uid: str,
    instances: list[tuple[str, str]],
    on_report: ReportCallback,
    wait_report_s: float,
    reported: Callable[[], bool] = lambda: False,
    on_accepted: Callable[[], None] = lambda: None,
) -> int:
    """Send a Request Storage Commitment N-ACTION to the sender's target; return its status.

    After a success status, when the target accepted to be the SCP on this
    association, waits up to ``wait_report_s`` for an N-EVENT-REPORT there and
    answers it with what ``on_report`` returns (it keeps the report first);
    the wait ends early once ``reported()`` is true (the report came on a new
    association to the node's port).

    Parameters
    ----------
    sender : LeanAssociationSender
        Its configuration names the destination (``target_*``) and our AE.
    transaction_uid : str
        The new Transaction UID.
    instances : list of (str, str)
        (SOP Class UID, SOP Instance UID) to commit.
    on_report : callable
        Keeps a report that came on this association; returns the RSP status.
    wait_report_s : float
        How long to wait for such a report (0: release at once).
    reported : callable, optional
        True once the report arrived another way.
    on_accepted : callable, optional
        Called as soon as the N-ACTION-RSP says success.

    Raises
    ------
    LinkError
        When the destination cannot be reached, refuses the association or the
        context, or does not answer the N-ACTION within ``dimse_timeout_s``.
    """
    cfg = sender.config
    conn = sender._connect()
    try:
        syntax, peer_max, report_here = _commitment_association(sender, conn)
        conn.set_timeout(cfg.network_timeout_s)
        conn.send(
            p_data_tf(
                1,
                PDV_COMMAND | PDV_LAST,
                n_action_rq(
                    1, STORAGE_COMMITMENT_SOP_CLASS, STORAGE_COMMITMENT_INSTANCE, REQUEST_COMMITMENT
                ),
            ),
            "sending the N-ACTION",
        )
        data = encode_action_info(transaction_uid, instances, syntax)
        size = max(peer_max - 6, 256)
        pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        for i, piece in enumerate(pieces):
            conn.send(p_data_tf(1, PDV_LAST if i == len(pieces) - 1 else 0, piece), "sending")
        reported_here = False
        while True:
            conn.set_timeout(cfg.dimse_timeout_s)
            try:
                rsp, body = read_message(conn, "waiting for the N-ACTION response")
            except LinkTimeout as exc:
                raise LinkError(
                    f"no N-ACTION response from {conn.where} within dimse_timeout_s "
                    f"({cfg.dimse_timeout_s:g} s)"
                ) from exc
            field = command_us(rsp, COMMAND_FIELD)
            if (
                field == N_EVENT_REPORT_RQ
                and body is not None
                and report_here
                and not reported_here
            ):
                _answer_report(conn, rsp, body, syntax, on_report)  # the report came first
                reported_here = True
                continue
            break
        if field != N_ACTION_RSP:
            raise LinkError(f"{conn.where} answered the N-ACTION with another command")
        status = command_us(rsp, STATUS)
        if status is None:
            raise LinkError(f"{conn.where} answered the N-ACTION without a Status")
        if status == 0:
            on_accepted()
        if status == 0 and report_here and wait_report_s > 0 and not reported_here:
            _serve_report(conn, syntax, on_report, wait_report_s, reported)
        sender._release(conn)
        return status
    except LinkError:
        conn.abort()
        raise
    finally:
        conn.close()


def _serve_report(
    conn: PduLink,
    syntax: str,
    on_report: ReportCallback,
    wait_s: float,
    reported: Callable[[], bool],
) -> None:
    """Wait up to ``wait_s`` for an N-EVENT-REPORT on this association and answer it."""
    deadline = time.monotonic() + wait_s
    while not conn.readable(min(0.1, max(0.0, deadline - time.monotonic()))):
        if reported() or time.monotonic() >= deadline:
            return  # it comes (came) on a new association to the node's port
    conn.set_timeout(max(wait_s, 10.0))  # a message that started must be complete
    try:
        request, data = read_message(conn, "waiting for a storage commitment report")
    except LinkTimeout:
        raise LinkError(f"{conn.where} stopped in the middle of a message") from None
    if command_us(request, COMMAND_FIELD) != N_EVENT_REPORT_RQ or data is None:
        raise LinkError(f"{conn.where} sent another message than the commitment report")
    _answer_report(conn, request, data, syntax, on_report)


def _answer_report(
    conn: PduLink,
    request: dict[int, bytes],
    data: bytes,
    syntax: str,
    on_report: ReportCallback,
) -> None:
    """Keep a report received on this association (``on_report``) and answer it."""
    event_type = command_us(request, EVENT_TYPE_ID) or 0
    status = on_report(event_type, data, syntax)
    conn.send(
        p_data_tf(
            1,
            PDV_COMMAND | PDV_LAST,
            n_event_report_rsp(
                command_us(request, MESSAGE_ID) or 0,
                uid_text(request.get(AFFECTED_SOP_CLASS, b"")),
                uid_text(request.get(AFFECTED_SOP_INSTANCE, b"")),
                event_type,
                status,
            ),
        ),
        "answering the commitment report",
    )


def _accepted(
    answer: A_ASSOCIATE_AC, proposed: dict[int, ContextSpec]
) -> tuple[dict[str, dict[str, int]], int]:
    """Return the accepted contexts ``{SOP class: {syntax: context id}}`` and the peer max PDU.

    Only a syntax we proposed for that context counts; a peer maximum of 0
    (unlimited) is returned as 0.
    """
    accepted: dict[str, dict[str, int]] = {}
    for res in answer.results:
        spec = proposed.get(res.context_id)
        if res.result != ACCEPTANCE or spec is None:
            continue
        if res.transfer_syntax in spec.transfer_syntaxes:
            accepted.setdefault(spec.sop_class_uid, {}).setdefault(
                res.transfer_syntax, res.context_id
            )
    return accepted, answer.max_pdu
