"""Lean C-STORE/C-ECHO SCP: the DICOM upper layer on one blocking socket per association.

The receiver's one transport, speaking :mod:`dicomnode.dul` itself: no
reactor thread, polling, primitives or queues per association
(bench/README.md has the measurements behind that). Connections are
accepted, TLS-handshaken and read to a whole A-ASSOCIATE-RQ by one selector
thread (:mod:`~dicomnode.receiver.pending`: a deadline of ``acse_timeout_s``
from accept, bounded numbers of connections negotiating, no thread or buffer
per unauthenticated peer); each *admitted* association then gets one thread
that reads PDUs straight from the socket into a reusable buffer and writes
data-set fragments straight to the object's temp file. What the node
promises does not change:

* admission through :func:`~dicomnode.receiver.admission.admit` (AE title
  rule, trusted AE, called AE, [AE_Hosts], ``max_associations`` across all
  receiver processes), with a real A-ASSOCIATE-RJ; presentation contexts by
  :mod:`~dicomnode.receiver.negotiation`;
* each object streamed to ``<destination>/.incoming-tmp`` behind a File Meta
  Information header, bytes as received; closed (the disk starts writing its
  last bytes), then filed by :meth:`~dicomnode.receiver.store.StoreHandler.finish`
  (integrity walk and naming while the disk writes, then journal record flushed
  or file fsynced — group commit with the process's other associations —,
  atomic rename, folder fsync when not journaled) *before* the C-STORE-RSP is sent;
* the disk guard is checked when a request arrives (nothing is written below
  ``min_free_space_mb``), a write error (disk full) is recorded and the rest of
  the object discarded so the peer gets 0xA700, and ``max_object_mb`` stops
  writing as soon as it is exceeded;
* PDUs longer than ``max_pdu_bytes`` allows are refused from their header,
  never buffered; timeouts: ``acse_timeout_s`` for the TLS handshake and the
  whole association request, ``network_timeout_s`` for every read and write after it;
* an object whose transfer did not complete (closed connection, A-ABORT,
  timeout, protocol error) is deleted and never acknowledged (``DISCARDED``);
* peer-supplied values in log lines are escaped (:func:`dicomnode.logsafe.escape`);
* a Storage Commitment N-ACTION is kept on disk by :mod:`.committer` before
  its N-ACTION-RSP; its N-EVENT-REPORT goes on this association when the
  requester negotiated the SCP role (the answer is read by the same loop),
  else (or when the association ends unanswered) on a new one;
* a committing destination of the forwarder (not necessarily a trusted AE) is
  admitted to deliver its N-EVENT-REPORT alone (:func:`~.policy.reporting_destination`);
  the report is kept by :mod:`.reports` before its N-EVENT-REPORT-RSP.

Log verbs: ``LISTENING``, ``REJECTED``, ``ABORTED``, ``DISCARDED``, ``ASSOC-RELEASED`` (plus
``ASSOC-ACCEPTED``, ``STORED``, ``STORE-FAILED``, ``ECHO`` from admission and store;
``COMMIT-REQUESTED``, ``COMMITTED``, ``COMMIT-FAILED``, ``COMMIT-DEFERRED`` from :mod:`.committer`,
``COMMIT-REPORTED`` from :mod:`.reports`).

Length: close to 1000 lines, on purpose: the admitted association's exchange
(data set streaming into the temp file, filing, response, the next temp file
made after it) and the server that starts and stops associations are one hot
path with one set of failure rules. The protocol encoding lives in
:mod:`dicomnode.dul`, the connections not yet admitted in :mod:`.pending`,
the decisions in :mod:`.admission`, :mod:`.negotiation` and :mod:`.store`,
storage commitment in :mod:`.commitment` and :mod:`.committer` (only its
N-ACTION and N-EVENT-REPORT exchange is here, on the association's own loop).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

from dicomnode.config import ReceiverConfig
from dicomnode.dul.dimse import (
    ACTION_TYPE_ID,
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    EVENT_TYPE_ID,
    MESSAGE_ID,
    MESSAGE_ID_RESPONDED,
    N_ACTION_RQ,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    NO_DATA_SET,
    REQUESTED_SOP_CLASS,
    REQUESTED_SOP_INSTANCE,
    STATUS,
    command_us,
    n_action_rsp,
    n_event_report_rsp,
    parse_command,
    response_command,
)
from dicomnode.dul.link import PduReader, PduTooLarge, PeerClosed
from dicomnode.dul.meta import file_meta
from dicomnode.dul.pdu import (
    A_ABORT_PDU,
    A_ABORT_UNEXPECTED_PDU,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP_PDU,
    ACCEPTANCE,
    APPLICATION_CONTEXT,
    PDV_COMMAND,
    PDV_HEADER,
    PDV_LAST,
    PduType,
    p_data_tf,
    uid_text,
)
from dicomnode.logsafe import escape
from dicomnode.receiver import commitment as sc
from dicomnode.receiver import policy
from dicomnode.receiver.admission import REJECT_LOCAL_LIMIT, RefusalLog, admit
from dicomnode.receiver.committer import Committer
from dicomnode.receiver.negotiation import accepted_roles, negotiate
from dicomnode.receiver.pending import Negotiator
from dicomnode.receiver.reports import record_report
from dicomnode.receiver.store import ReceivedObject, StoreHandler
from dicomnode.status import StoreStatus
from dicomnode.storage import start_writeback

logger = logging.getLogger(__name__)

#: PDU length limit for association requests and when max_pdu_bytes is small.
_MIN_PDU_LIMIT_BYTES: Final = 65536
#: Tolerance above the announced maximum PDU length before a PDU is refused.
_PDU_SLACK_BYTES: Final = 65536
#: Largest command set accepted (real ones are a few hundred bytes).
_MAX_COMMAND_BYTES: Final = 65536
#: Objects up to this size are also kept in memory until filed, so the integrity walk
#: and header read need not read the file back.
_IN_MEMORY_BYTES: Final = 256 * 1024
#: Read/write timeouts enforced by the kernel (no poll() per read); Linux only.
_KERNEL_TIMEOUTS: Final = sys.platform.startswith("linux")
#: How long sending an A-ASSOCIATE-RJ may take before the connection is just closed.
_REJECT_SEND_S: Final = 1.0
#: Status 0x0211: unrecognized operation (PS3.7 C).
_UNRECOGNIZED_OPERATION: Final = 0x0211
#: Largest Action Information accepted with an N-ACTION (about 100 000 references).
_MAX_ACTION_BYTES: Final = 16 * 1024 * 1024
_O_BINARY: Final = getattr(os, "O_BINARY", 0)
#: Writeback of a large object's data is started every this many bytes received.
_WRITEBACK_BYTES: Final = 256 * 1024


class _Drop(Exception):
    """The peer broke the protocol: log ``reason``, send A-ABORT, close."""

    def __init__(self, reason: str, abort_pdu: bytes = A_ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(reason)
        self.abort_pdu = abort_pdu


class _Transfer:
    """One incoming object: its temp file, or a sink that discards.

    Parameters
    ----------
    path : Path or None
        Temp file to create; None discards the data (``write_error`` says why,
        or the request was not a C-STORE).
    head : bytes
        Written first (preamble and File Meta Information).
    limit : int
        Stop writing (and mark ``too_large``) beyond this many bytes; 0 = no limit.
    write_error : OSError, optional
        Why nothing is written (the disk guard).
    fd : int, optional
        ``path`` already created and opened for writing (see :func:`create_temp`).
    """

    def __init__(
        self,
        path: Path | None,
        head: bytes,
        limit: int,
        write_error: OSError | None = None,
        fd: int = -1,
    ) -> None:
        self.path = path
        self._written_back = 0
        self.limit = limit
        self.write_error = write_error
        self.too_large = False
        self.written = 0
        self.fd = -1
        #: The content written so far while it is small enough to keep (else None).
        self.content: bytearray | None = bytearray()
        if path is not None and write_error is None:
            try:
                self.fd = fd if fd >= 0 else create_temp(path)
            except OSError as exc:
                self.write_error = exc
                return
            self.write(memoryview(head))

    def write(self, data: memoryview) -> None:
        """Append ``data``; after a write error or past the limit, drop it and free the space."""
        if self.fd < 0 or self.write_error is not None or self.too_large:
            return
        if self.limit and self.written + len(data) > self.limit:
            self.too_large = True
            self._truncate()
            return
        content = self.content
        if content is not None:
            if len(content) + len(data) <= _IN_MEMORY_BYTES:
                content += data
            else:
                self.content = None
        try:
            while data:
                done = os.write(self.fd, data)
                data = data[done:]
                self.written += done
        except OSError as exc:
            self.write_error = exc
            self._truncate()
            return
        if self.written - self._written_back >= _WRITEBACK_BYTES:
            # A large object: let the disk write what has arrived while the rest
            # arrives, so the fsync at the end has less left to wait for.
            start_writeback(self.fd, self._written_back, self.written - self._written_back)
            self._written_back = self.written

    def _truncate(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)

    def complete(self) -> None:
        """Close the file; a large one (not held in memory) after starting to write its last bytes.

        The file is *not* flushed here: the store handler checks and names the
        object while the disk writes, then fsyncs it. A small object is left to
        the receive journal, whose checkpoint flushes placed files in bulk.
        """
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        if self.content is None and self.write_error is None and not self.too_large:
            start_writeback(fd, self._written_back, 0)
        with contextlib.suppress(OSError):
            os.close(fd)

    def discard(self) -> None:
        """Close and delete the partial file (the object was never acknowledged)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)


class _Collect(_Transfer):
    """The data set of a request other than C-STORE (an N-ACTION), kept in memory up to a bound."""

    def __init__(self) -> None:
        super().__init__(None, b"", 0)
        self.data = bytearray()

    def write(self, data: memoryview) -> None:
        """Append ``data``; past :data:`_MAX_ACTION_BYTES` drop it and mark ``too_large``."""
        if self.too_large or len(self.data) + len(data) > _MAX_ACTION_BYTES:
            self.too_large = True
            return
        self.data += data


def create_temp(path: Path) -> int:
    """Create ``path`` (which must not exist) for writing and return its descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)


def new_temp_file(folder: Path, prefix: str = "") -> tuple[Path, int]:
    """Create a uniquely named empty temp file in ``folder``; return its path and descriptor.

    Raises
    ------
    OSError
        When the file cannot be created.
    """
    path = folder / f"{prefix}{uuid.uuid4().hex}.dcm"
    return path, create_temp(path)


def discard_temp_file(temp: tuple[Path, int]) -> None:
    """Close and delete an unused temp file made by :func:`new_temp_file`."""
    _Transfer(temp[0], b"", 0, fd=temp[1]).discard()


class _Association:
    """One admitted association, served on its own thread from A-ASSOCIATE-AC to close."""

    def __init__(
        self,
        server: LeanServer,
        sock: socket.socket,
        address: tuple[str, int],
        request: A_ASSOCIATE_RQ,
    ) -> None:
        self.server = server
        self.cfg = server.cfg
        self.sock = sock
        self.ip, self.port = str(address[0]), int(address[1])
        self.where = f"{self.ip}:{self.port}"
        self.request = request
        #: The calling AE title, as admitted: admission lets through only printable
        #: ASCII without backslash (policy.is_valid_peer_ae), so it routes and logs as is.
        self.calling = request.calling_ae
        self.established = False
        self._send_lock = threading.Lock()
        self._closed = False
        self.contexts: dict[int, tuple[str, str]] = {}
        self.transfer: _Transfer | None = None
        self._request: dict[int, bytes] = {}
        self._request_cid = 0
        self._started = 0.0
        #: Storage commitment: whether the requester may be sent its report here (it
        #: negotiated the SCP role), and the reports sent here awaiting their answer.
        self.report_here = False
        self._awaiting: dict[int, tuple[sc.Commitment, Path]] = {}
        #: Admitted only to deliver storage commitment reports (a committing
        #: destination of the forwarder that is not a trusted AE).
        self.commitment_only = False
        limit = self.cfg.max_pdu_bytes
        self.pdu_limit = max(limit, _MIN_PDU_LIMIT_BYTES) + _PDU_SLACK_BYTES if limit else 0
        self.max_object = self.cfg.max_object_mb * 1_000_000
        #: Objects acknowledged with success, and C-STOREs answered otherwise (for the
        #: association's closing line).
        self.stored = 0
        self.failed = 0
        self._admitted_at = time.monotonic()
        #: The empty temp file for this association's next C-STORE, made after the last
        #: response (while the peer prepares the next request), deleted when it ends.
        self._spare: tuple[Path, int] | None = None

    # ----------------------------------------------------------------- lifecycle

    def run(self) -> None:
        """Serve the connection until it ends; never raises."""
        try:
            self._run()
        except PeerClosed:
            if self.transfer is not None:
                self._discard("connection closed mid-object")
        except _Drop as exc:
            logger.warning(
                "ABORTED association calling_ae=%s peer=%s reason=%s",
                self.calling or "-",
                self.where,
                exc,
            )
            self._discard("association aborted")
            self._send_quietly(exc.abort_pdu)
        except TimeoutError:
            logger.warning(
                "ABORTED association calling_ae=%s peer=%s reason=no data for "
                "network_timeout_s=%g s",
                self.calling or "-",
                self.where,
                self.cfg.network_timeout_s,
            )
            self._discard("timed out mid-object")
            self._send_quietly(A_ABORT_PDU)
        except (OSError, ValueError) as exc:
            if not self._closed:
                logger.warning(
                    "ABORTED association calling_ae=%s peer=%s reason=%s",
                    self.calling or "-",
                    self.where,
                    exc,
                )
            self._discard("connection failed mid-object")
        except Exception:
            logger.exception("ABORTED association peer=%s: unexpected error", self.where)
            self._discard("unexpected error")
            self._send_quietly(A_ABORT_PDU)
        finally:
            self.close()
            self._drop_spare()
            self._reports_unanswered()

    def _make_spare(self) -> None:
        """Create the temp file of the next C-STORE now, after a success response (not on its path).

        A failure is left to the next request, which then creates its own and reports.
        """
        if self._spare is None:
            with contextlib.suppress(OSError):
                self._spare = new_temp_file(self.server.tmp_dir, self.server.tmp_prefix)

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            discard_temp_file(spare)

    def _reports_unanswered(self) -> None:
        """Send the reports the association ended without answering on a new association."""
        awaiting, self._awaiting = self._awaiting, {}
        committer = self.server.committer
        for commitment, path in awaiting.values():
            if committer is not None:
                committer.schedule(commitment, path)

    def close(self) -> None:
        """Close the socket (idempotent; wakes the serving thread when called from another)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Send A-ABORT and close: used at shutdown after the grace period."""
        self._send_quietly(A_ABORT_PDU, wait_s=1.0)
        self.close()

    def _timeout(self, seconds: float) -> None:
        """Bound every later read and write by ``seconds``.

        On Linux (plain TCP) the kernel enforces it (SO_RCVTIMEO/SO_SNDTIMEO) on
        a blocking socket: a Python socket timeout would add a poll() before
        every read. Elsewhere, and for TLS, the Python socket timeout is used.
        """
        if _KERNEL_TIMEOUTS and not isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(None)
            whole = int(seconds)
            value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        else:
            self.sock.settimeout(seconds)

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except BlockingIOError:  # SO_SNDTIMEO expired
                raise TimeoutError("peer did not read within the timeout") from None

    def _send_quietly(self, data: bytes, wait_s: float = -1) -> None:
        if self._closed:
            return
        if not self._send_lock.acquire(timeout=wait_s):
            return
        try:
            self.sock.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            self._send_lock.release()

    def _discard(self, why: str) -> None:
        transfer, self.transfer = self.transfer, None
        if transfer is None:
            return
        transfer.discard()
        if self._request_field() == C_STORE_RQ:
            logger.warning(
                "DISCARDED incomplete transfer calling_ae=%s peer=%s (%s; not acknowledged)",
                self.calling or "-",
                self.where,
                why,
            )

    # ----------------------------------------------------------------- association

    def _run(self) -> None:
        request = self.request
        self._timeout(self.cfg.network_timeout_s)
        reader = PduReader(self.sock)  # the read buffer exists only for admitted peers
        results = negotiate(request.contexts, self.commitment_only)
        roles = accepted_roles(request.roles, results) if self.server.committer else ()
        self.report_here = bool(roles)
        self._send(
            A_ASSOCIATE_AC(
                request.fixed_part, tuple(results), self.cfg.max_pdu_bytes, roles
            ).encode()
        )
        self.established = True
        self.contexts = {
            r.context_id: (r.abstract_syntax, r.transfer_syntax)
            for r in results
            if r.result == ACCEPTANCE
        }
        if not self.contexts:
            logger.warning(
                "REJECTED presentation contexts calling_ae=%s called_ae=%s peer=%s "
                "reason=none supported (proposed %s)",
                self.calling,
                escape(request.called_ae),
                self.where,
                escape(", ".join(sorted({cx.abstract_syntax for cx in request.contexts})))
                or "nothing",
            )
        self._serve(reader)

    def _log_end(self, verb: str, how: str) -> None:
        """Log the association's closing line: how it ended and what it stored."""
        logger.info(
            "%s association calling_ae=%s peer=%s stored=%d failed=%d seconds=%.1f reason=%s",
            verb,
            self.calling,
            self.where,
            self.stored,
            self.failed,
            time.monotonic() - self._admitted_at,
            how,
        )

    def _pdu_header(self, reader: PduReader, limit: int) -> tuple[int, int]:
        try:
            return reader.pdu_header(limit)
        except PduTooLarge as exc:
            logger.warning(
                "REJECTED PDU of %d bytes from peer %s: larger than max_pdu_bytes=%d "
                "allows; closing the connection",
                exc.length,
                self.where,
                self.cfg.max_pdu_bytes,
            )
            raise _Drop("PDU longer than max_pdu_bytes") from None

    # ----------------------------------------------------------------- DIMSE

    def _serve(self, reader: PduReader) -> None:
        command = bytearray()
        while True:
            pdu_type, length = self._pdu_header(reader, self.pdu_limit)
            if pdu_type == PduType.P_DATA_TF:
                self._p_data(reader, length, command)
            elif pdu_type == PduType.A_RELEASE_RQ:
                if length > _MIN_PDU_LIMIT_BYTES:
                    raise _Drop(f"A-RELEASE-RQ of {length} bytes")
                reader.exact(length)
                self._discard("released mid-object")
                self._send(A_RELEASE_RP_PDU)
                self._log_end("ASSOC-RELEASED", "released by the peer")
                return
            elif pdu_type == PduType.A_ABORT:
                self._discard("peer sent A-ABORT mid-object")
                self._log_end("ABORTED", "the peer sent A-ABORT")
                return
            else:
                raise _Drop(f"unexpected PDU type 0x{pdu_type:02X} during the association")

    def _p_data(self, reader: PduReader, length: int, command: bytearray) -> None:
        remaining = length
        while remaining:
            if remaining < 6:
                raise _Drop("malformed P-DATA-TF (PDV header cut off)")
            item_length, cid, control = PDV_HEADER.unpack(reader.exact(PDV_HEADER.size))
            remaining -= 4 + item_length
            if item_length < 2 or remaining < 0:
                raise _Drop("malformed P-DATA-TF (PDV longer than its PDU)")
            size = item_length - 2
            if cid not in self.contexts:
                raise _Drop(f"P-DATA on presentation context {cid}, which was not accepted")
            if control & PDV_COMMAND:
                if self.transfer is not None:
                    raise _Drop("command fragment while a data set was expected")
                if len(command) + size > _MAX_COMMAND_BYTES:
                    raise _Drop("command set longer than 64 KiB")
                reader.stream(size, command.extend)
                if control & PDV_LAST:
                    self._command(bytes(command), cid)
                    command.clear()
            else:
                transfer = self.transfer
                if transfer is None or command:
                    raise _Drop("data set fragment without a complete command")
                if cid != self._request_cid:
                    raise _Drop("data set on another presentation context than its command")
                reader.stream(size, transfer.write)
                if control & PDV_LAST:
                    self._data_set_done(transfer)

    def _request_field(self) -> int | None:
        return command_us(self._request, COMMAND_FIELD)

    def _command(self, raw: bytes, cid: int) -> None:
        try:
            request = parse_command(raw)
        except ValueError as exc:
            raise _Drop(f"malformed command set: {exc}") from None
        self._request, self._request_cid = request, cid
        self._started = time.monotonic()
        field = command_us(request, COMMAND_FIELD)
        has_data = command_us(request, DATA_SET_TYPE) != NO_DATA_SET
        if self.commitment_only and field != N_EVENT_REPORT_RQ:
            if has_data:
                self.transfer = _Transfer(None, b"", 0)  # read and drop, then refuse
            else:
                self._refuse_operation(field)
        elif field == N_EVENT_REPORT_RQ and has_data:
            self.transfer = _Collect()
        elif field == C_STORE_RQ and has_data:
            spare, self._spare = self._spare, None
            self.transfer = self.server.open_transfer(
                self.contexts[cid][1], request, self.calling, spare
            )
        elif field == N_ACTION_RQ and has_data:
            self.transfer = _Collect()
        elif field == N_EVENT_REPORT_RSP:
            self._report_answered(request)
        elif field == C_ECHO_RQ and not has_data:
            self._respond(self.server.handler.log_echo(self.calling, self.where))
        elif field == C_CANCEL_RQ:
            pass  # nothing runs long enough to be cancelled
        elif has_data:
            self.transfer = _Transfer(None, b"", 0)  # read and drop its data set, then refuse
        else:
            self._refuse_operation(field)

    def _data_set_done(self, transfer: _Transfer) -> None:
        self.transfer = None
        if isinstance(transfer, _Collect) and self._request_field() == N_EVENT_REPORT_RQ:
            self._n_event_report(transfer)
            return
        if isinstance(transfer, _Collect) and self._request_field() == N_ACTION_RQ:
            self._n_action(transfer)
            return
        if self._request_field() != C_STORE_RQ or self.commitment_only:
            self._refuse_operation(self._request_field())
            return
        transfer.complete()
        affected = escape(uid_text(self._request.get(AFFECTED_SOP_INSTANCE, b"")))
        error = transfer.write_error
        if transfer.path is None and error is None:
            error = OSError(errno.EIO, "no temp file")
        received = ReceivedObject(
            tmp=transfer.path or self.server.tmp_dir / "unwritten.dcm",
            calling=self.calling,
            where=self.where,
            started=self._started,
            affected_uid=affected,
            write_error=error,
            too_large=transfer.too_large,
            content=transfer.content if error is None else None,
            command_uids=(uid_text(self._request.get(AFFECTED_SOP_CLASS, b"")), affected),
        )
        filing = self.server.handler.finish(received, defer_report=True)
        if filing.status == StoreStatus.SUCCESS:
            self.stored += 1
        else:
            self.failed += 1
        self._respond(filing.status)
        for report in filing.reports:
            report()  # the log line after the response: it is not part of the guarantee
        if filing.status == StoreStatus.SUCCESS:  # not below the disk guard, after a disk error
            self._make_spare()

    def _refuse_operation(self, field: int | None) -> None:
        logger.warning(
            "REJECTED DIMSE request calling_ae=%s peer=%s command_field=0x%04X reason=only "
            "%s served",
            self.calling,
            self.where,
            field or 0,
            "storage commitment N-EVENT-REPORT (from a committing destination) is"
            if self.commitment_only
            else "C-STORE, C-ECHO and storage commitment N-ACTION are",
        )
        self._respond(_UNRECOGNIZED_OPERATION, field or 0)

    # ----------------------------------------------------------------- storage commitment

    def _n_action(self, transfer: _Collect) -> None:
        """Serve a Request Storage Commitment N-ACTION (PS3.4 J.3.2) and send or queue its report."""
        request, cid = self._request, self._request_cid
        sop_class = uid_text(request.get(REQUESTED_SOP_CLASS, b""))
        sop_instance = uid_text(request.get(REQUESTED_SOP_INSTANCE, b""))
        action = command_us(request, ACTION_TYPE_ID) or 0
        committer = self.server.committer
        status, accepted = sc.PROCESSING_FAILURE, None
        if committer is not None:
            status, accepted = committer.accept(
                sc.ActionRequest(
                    sop_class,
                    sop_instance,
                    action,
                    None if transfer.too_large else bytes(transfer.data),
                    self.contexts[cid][1],
                ),
                self.calling,
                self.where,
                self.report_here,
            )
        rsp = n_action_rsp(
            command_us(request, MESSAGE_ID) or 0, sop_class, sop_instance, action, status
        )
        self._send(p_data_tf(cid, PDV_COMMAND | PDV_LAST, rsp))
        if committer is None or accepted is None:
            return
        commitment, path = committer.checked(*accepted)
        if not self.report_here:
            committer.schedule(commitment, path)
            return
        message_id = committer.next_message_id()
        self._awaiting[message_id] = (commitment, path)
        committer.send_report(
            self._send, commitment, cid, self.contexts[cid][1], self.request.max_pdu, message_id
        )

    def _n_event_report(self, transfer: _Collect) -> None:
        """Keep a committing destination's report for the forwarder, then answer it.

        The N-EVENT-REPORT-RSP is success only once the report is on disk
        (:func:`~dicomnode.receiver.reports.record_report`).
        """
        request, cid = self._request, self._request_cid
        sop_class = uid_text(request.get(AFFECTED_SOP_CLASS, b""))
        sop_instance = uid_text(request.get(AFFECTED_SOP_INSTANCE, b""))
        event_type = command_us(request, EVENT_TYPE_ID) or 0
        status = record_report(
            self.cfg,
            self.calling,
            self.where,
            sop_class,
            sop_instance,
            event_type,
            None if transfer.too_large else bytes(transfer.data),
            self.contexts[cid][1],
        )
        rsp = n_event_report_rsp(
            command_us(request, MESSAGE_ID) or 0, sop_class, sop_instance, event_type, status
        )
        self._send(p_data_tf(cid, PDV_COMMAND | PDV_LAST, rsp))

    def _report_answered(self, response: dict[int, bytes]) -> None:
        entry = self._awaiting.pop(command_us(response, MESSAGE_ID_RESPONDED) or 0, None)
        committer = self.server.committer
        if entry is None or committer is None:
            logger.warning(
                "REJECTED DIMSE response calling_ae=%s peer=%s reason=N-EVENT-REPORT-RSP to "
                "no report sent here",
                self.calling,
                self.where,
            )
            return
        commitment, path = entry
        status = command_us(response, STATUS) or 0
        if status == 0:
            committer.delivered(commitment, path, "same-association")
        else:
            logger.warning(
                "COMMIT-DEFERRED transaction_uid=%s calling_ae=%s peer=%s reason=report answered "
                "with status 0x%04X",
                escape(commitment.transaction_uid),
                self.calling,
                self.where,
                status,
            )
            committer.schedule(commitment, path)

    def _respond(self, status: int, field: int | None = None) -> None:
        request = self._request
        rsp = response_command(
            field if field is not None else (command_us(request, COMMAND_FIELD) or 0),
            command_us(request, MESSAGE_ID) or 0,
            uid_text(request.get(AFFECTED_SOP_CLASS, b"")),
            uid_text(request.get(AFFECTED_SOP_INSTANCE, b"")),
            status,
        )
        self._send(p_data_tf(self._request_cid, PDV_COMMAND | PDV_LAST, rsp))


class LeanServer:
    """Accepts connections, admits association requests, serves each association on its own thread.

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings.
    handler : StoreHandler
        Files completed objects.
    ssl_context : ssl.SSLContext, optional
        Wraps accepted sockets for DICOM TLS.
    listen_socket : socket.socket, optional
        A listening socket shared with other receiver processes; None binds one.
    may_accept : callable, optional
        Given this process's admitted and negotiating connections, publishes
        them and returns False while another process of the pool carries fewer:
        this one then leaves new connections to the others (the kernel would
        otherwise hand most of them to whichever process is quickest back in
        accept()).
    node_has_room : callable, optional
        Given this process's connection count (including a new one), returns
        False when the node as a whole is at ``max_associations``; by default
        the count is compared with ``max_associations``.
    tmp_prefix : str, optional
        Name prefix of this process's temp files (one per process of a pool).
    committer : Committer, optional
        Serves storage commitment requests (None: N-ACTION is refused).
    """

    def __init__(
        self,
        cfg: ReceiverConfig,
        handler: StoreHandler,
        ssl_context: ssl.SSLContext | None = None,
        listen_socket: socket.socket | None = None,
        node_has_room: Callable[[int], bool] | None = None,
        may_accept: Callable[[int, int], bool] | None = None,
        tmp_prefix: str = "",
        committer: Committer | None = None,
    ) -> None:
        self.cfg = cfg
        self.handler = handler
        self.committer = committer
        self.ssl_context = ssl_context
        self.tmp_dir = cfg.destination_dir / ".incoming-tmp"
        self.tmp_prefix = tmp_prefix
        self._shared = listen_socket is not None
        self._listen = listen_socket
        self._room = node_has_room or (lambda n: n <= cfg.max_associations)
        self._may_accept = may_accept
        self._lock = threading.Lock()
        self._active: set[_Association] = set()
        self._stopping = threading.Event()
        self._negotiator: Negotiator | None = None
        self.refusals = RefusalLog(cfg.refusal_log_interval_s)

    def start(self) -> None:
        """Bind (unless sharing a socket) and accept in a background thread.

        Raises
        ------
        OSError
            When the address cannot be bound.
        """
        if self._listen is None:
            family = socket.AF_INET6 if ":" in self.cfg.server_ip else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                if sys.platform != "win32":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.cfg.server_ip, self.cfg.receive_port))
                sock.listen(128)
            except OSError:
                sock.close()
                raise
            self._listen = sock
        self._negotiator = Negotiator(
            self._listen,
            self.cfg.acse_timeout_s,
            self.cfg.max_pending_associations,
            self.cfg.max_pending_per_peer,
            self._on_request,
            self.refusals,
            self.ssl_context,
            self._may_accept,
            self.active,
        )
        self._negotiator.start()

    def pending(self) -> int:
        """Return the number of connections still negotiating (not yet admitted)."""
        return self._negotiator.pending() if self._negotiator is not None else 0

    def active(self) -> int:
        """Return the number of admitted associations served now."""
        with self._lock:
            return len(self._active)

    def has_room(self) -> bool:
        """Return True while the node serves at most ``max_associations`` (this one included)."""
        return self._room(self.active())

    def open_transfer(
        self,
        transfer_syntax: str,
        request: dict[int, bytes],
        calling: str,
        spare: tuple[Path, int] | None = None,
    ) -> _Transfer:
        """Start the temp file of a C-STORE request, or a discarding sink below the disk guard.

        ``spare`` is an empty temp file made ahead for it (else one is created now);
        it is deleted when the request is refused.
        """
        sop_class = uid_text(request.get(AFFECTED_SOP_CLASS, b""))
        sop_instance = uid_text(request.get(AFFECTED_SOP_INSTANCE, b""))
        limit = self.cfg.max_object_mb * 1_000_000
        head = file_meta(sop_class, sop_instance, transfer_syntax, calling)
        try:
            free_mb = self.handler.disk_guard.shortfall(self.tmp_dir)
        except OSError:
            free_mb = None  # unmeasurable: filing measures again and decides
        if free_mb is not None:
            reason = OSError(
                errno.ENOSPC,
                f"free space {free_mb:.0f} MB below min_free_space_mb={self.cfg.min_free_space_mb}",
            )
            if spare is not None:
                discard_temp_file(spare)
            return _Transfer(None, b"", 0, reason)
        try:
            path, fd = spare if spare is not None else new_temp_file(self.tmp_dir, self.tmp_prefix)
        except OSError as exc:
            return _Transfer(None, b"", 0, exc)
        return _Transfer(path, head, limit + len(head) if limit else 0, fd=fd)

    def _on_request(
        self, sock: socket.socket, address: tuple[str, int], request: A_ASSOCIATE_RQ
    ) -> None:
        """Admit a complete A-ASSOCIATE-RQ (on the acceptor thread); serve it on a new thread."""
        ip, port = address
        if request.application_context != APPLICATION_CONTEXT:
            self.refusals.warning(
                ip,
                "application context",
                "REJECTED association calling_ae=%s called_ae=%s peer=%s:%d "
                "reason=application context %r is not DICOM's",
                escape(request.calling_ae),
                escape(request.called_ae),
                ip,
                port,
                escape(request.application_context),
            )
            self._reject(sock, (0x01, 0x01, 0x02))
            return
        assoc = _Association(self, sock, address, request)
        with self._lock:
            self._active.add(assoc)  # counted by has_room() during admission
        served = False
        try:
            rejection = admit(
                self.cfg,
                request.calling_ae,
                request.called_ae,
                ip,
                port,
                self.has_room,
                self.refusals,
            )
            if rejection is not None:
                self._reject(sock, rejection)
                return
            assoc.commitment_only = (
                not policy.is_trusted(self.cfg, request.calling_ae)
                and policy.reporting_destination(self.cfg, request.calling_ae) is not None
            )
            try:
                threading.Thread(
                    target=self._serve,
                    args=(assoc,),
                    name=f"Association-{assoc.where}",
                    daemon=True,
                ).start()
            except RuntimeError as exc:  # no more threads: refuse this one, keep accepting
                logger.error(
                    "ABORTED connection peer=%s reason=cannot start a thread: %s", assoc.where, exc
                )
                self._reject(sock, REJECT_LOCAL_LIMIT)
                return
            served = True  # its thread owns it now
        finally:
            if not served:
                with self._lock:
                    self._active.discard(assoc)

    @staticmethod
    def _reject(sock: socket.socket, rejection: tuple[int, int, int]) -> None:
        """Send A-ASSOCIATE-RJ (bounded wait) and close."""
        with contextlib.suppress(OSError, ValueError):
            sock.settimeout(_REJECT_SEND_S)
            sock.sendall(A_ASSOCIATE_RJ(*rejection).encode())
        with contextlib.suppress(OSError):
            sock.close()

    def _serve(self, assoc: _Association) -> None:
        try:
            assoc.run()
        finally:
            with self._lock:
                self._active.discard(assoc)
            if self._may_accept is not None:
                # Publishes the lower count to the other processes.
                self._may_accept(self.active(), self.pending())

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let associations finish for ``grace_s``, abort the rest."""
        self._stopping.set()
        if self._negotiator is not None:
            self._negotiator.stop()
        if self._listen is not None:
            with contextlib.suppress(OSError):
                self._listen.close()
        with self._lock:
            active = list(self._active)
        for assoc in active:
            if not assoc.established:
                assoc.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                active = [a for a in self._active if a.established]
            if not active:
                break
            time.sleep(0.05)
        for assoc in active:
            logger.warning(
                "ABORTED association with %s at shutdown (unacknowledged objects will be resent)",
                assoc.calling,
            )
            assoc.abort()


__all__ = ["LeanServer"]
