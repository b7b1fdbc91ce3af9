"""pynetdicom glue of the receiver (``receiver_transport = pynetdicom``).

The association gate admits peers (:mod:`dicomnode.receiver.admission`) and
bounds what one peer can hold: socket timeouts, PDU length, TLS handshakes off
the accept loop. The C-STORE handler answers success only after the object is
complete on disk: pynetdicom streams the data set to a temporary file on the
destination volume (``STORE_RECV_CHUNKED_DATASET``); the handler fsyncs it and
files it with :class:`~dicomnode.receiver.store.StoreHandler`. Handlers never
raise. Log verbs: ``REJECTED``, ``DISCARDED`` (plus those of admission and store).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dicomnode.config import ReceiverConfig
from dicomnode.receiver.admission import REJECT_INTERNAL_ERROR, SharedLoad, admit
from dicomnode.receiver.store import StoreHandler
from dicomnode.status import StoreStatus
from dicomnode.storage import fsync_file

if TYPE_CHECKING:
    from pynetdicom.events import Event

logger = logging.getLogger(__name__)

#: Association requests with many presentation contexts stay well below this.
_MIN_PDU_LIMIT_BYTES: Final = 65536
#: Tolerance above the announced maximum PDU length before a PDU is refused.
_PDU_SLACK_BYTES: Final = 65536


def _peer(event: Event) -> tuple[str, str, str]:
    """Return (calling AE, called AE, "ip:port") of the association of ``event``."""
    assoc = event.assoc
    calling = str(assoc.requestor.ae_title or "").strip()
    called = str(assoc.acceptor.ae_title or "").strip()
    prim = getattr(assoc.requestor, "primitive", None)
    if prim is not None:
        calling = str(prim.calling_ae_title or calling).strip()
        called = str(prim.called_ae_title or called).strip()
    return calling, called, f"{assoc.requestor.address}:{assoc.requestor.port}"


class AssociationGate:
    """Admission control bound to EVT_REQUESTED, EVT_REJECTED and EVT_CONN_OPEN.

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings.
    shared_load : SharedLoad, optional
        Node-wide connection counts when several receiver processes share the port.
    """

    def __init__(self, cfg: ReceiverConfig, shared_load: SharedLoad | None = None) -> None:
        self.cfg = cfg
        self.shared_load = shared_load

    def handle_conn_open(self, event: Event) -> None:
        """Set TCP_NODELAY and the network timeout on the accepted socket.

        Without a socket timeout a peer that stops sending in the middle of a
        PDU blocks its reader forever (pynetdicom's idle timer only runs
        between PDUs), holding an association slot and a partial temp file.
        """
        try:
            wrapper = event.assoc.dul.socket
            sock = wrapper.socket if wrapper is not None else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(self.cfg.network_timeout_s)
            if wrapper is not None:
                self._bound_pdu_reads(wrapper, event)
        except (OSError, AttributeError):
            logger.debug("could not set TCP_NODELAY or the socket timeout", exc_info=True)
            return
        if isinstance(sock, ssl.SSLSocket):
            self._handshake(sock, event)

    def _bound_pdu_reads(self, wrapper: Any, event: Event) -> None:
        """Refuse to read a PDU longer than max_pdu_bytes allows.

        pynetdicom reads a whole PDU into memory, trusting the 4-byte length in
        its header; one peer claiming 4 GiB could exhaust the node's memory.
        Peers must keep P-DATA PDUs within the maximum length we announce.
        """
        if not self.cfg.max_pdu_bytes:
            return
        limit = max(self.cfg.max_pdu_bytes, _MIN_PDU_LIMIT_BYTES) + _PDU_SLACK_BYTES
        original = wrapper.recv

        def bounded_recv(nr_bytes: int) -> Any:
            if nr_bytes > limit:
                address = getattr(event, "address", ("?", 0))
                logger.warning(
                    "REJECTED PDU of %d bytes from peer %s:%s: larger than max_pdu_bytes=%d "
                    "allows; closing the connection",
                    nr_bytes,
                    address[0],
                    address[1],
                    self.cfg.max_pdu_bytes,
                )
                raise OSError(errno.EMSGSIZE, "PDU longer than max_pdu_bytes")
            return original(nr_bytes)

        wrapper.recv = bounded_recv

    def _handshake(self, sock: ssl.SSLSocket, event: Event) -> None:
        """Complete the deferred TLS handshake here, bounded by the network timeout.

        A peer without an acceptable certificate fails here and is logged; the
        association then ends without a single PDU being read.
        """
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            address = event.address if hasattr(event, "address") else ("?", 0)
            logger.warning(
                "REJECTED TLS connection peer=%s:%s reason=%s",
                address[0],
                address[1],
                getattr(exc, "reason", None) or exc,
            )
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_accepted(self, event: Event) -> None:
        """Log an association on which no proposed presentation context was accepted."""
        if event.assoc.accepted_contexts:
            return
        calling, called, where = _peer(event)
        proposed = sorted(
            {str(cx.abstract_syntax) for cx in event.assoc.requestor.requested_contexts}
        )
        logger.warning(
            "REJECTED presentation contexts calling_ae=%s called_ae=%s peer=%s "
            "reason=none supported (proposed %s)",
            calling,
            called,
            where,
            ", ".join(proposed) or "nothing",
        )

    def handle_conn_close(self, event: Event) -> None:
        """Delete the temp file of an object whose transfer never completed.

        Such an object was never acknowledged, so its sender still has it; the
        partial file would otherwise stay in the temp folder until restart.
        """
        assoc = event.assoc
        if assoc.is_acceptor and getattr(assoc.requestor, "primitive", None) is None:
            # Closed before any A-ASSOCIATE-RQ (a port probe, a health check): wake the
            # association thread, which would otherwise wait acse_timeout_s for a request
            # that never comes while holding one of max_associations.
            assoc.dul.to_user_queue.put(None)
            return
        message = getattr(getattr(assoc, "dimse", None), "message", None)
        handle: Any = getattr(message, "_data_set_file", None)
        if handle is None:
            return
        name = str(getattr(handle, "name", ""))
        try:
            handle.close()
            if name:
                Path(name).unlink(missing_ok=True)
        except OSError:
            logger.debug("could not remove partial transfer %s", name, exc_info=True)
            return
        calling, _, where = _peer(event)
        logger.warning(
            "DISCARDED incomplete transfer calling_ae=%s peer=%s (connection closed mid-object; "
            "not acknowledged)",
            calling,
            where,
        )

    def handle_requested(self, event: Event) -> None:
        """Reject an untrusted or misaddressed association with A-ASSOCIATE-RJ."""
        try:
            calling, called, _ = _peer(event)
            requestor = event.assoc.requestor
            rejection = admit(
                self.cfg,
                calling,
                called,
                str(requestor.address),
                int(requestor.port),
                lambda: self._within_node_limit(event),
            )
            if rejection is None:
                return
            event.assoc.acse.send_reject(*rejection)
            # As pynetdicom does for its own rejections: let the DUL send the
            # A-ASSOCIATE-RJ before the connection is closed.
            event.assoc.kill()
        except Exception:
            logger.exception("REJECTED association: admission check failed, refusing")
            try:
                event.assoc.acse.send_reject(*REJECT_INTERNAL_ERROR)
                event.assoc.kill()
            except Exception:
                event.assoc.abort()

    def _within_node_limit(self, event: Event) -> bool:
        """Return True unless the pool as a whole already serves max_associations."""
        if self.shared_load is None:
            return True  # one process: pynetdicom enforces the limit itself
        local = sum(1 for a in event.assoc.ae.active_associations if a.is_acceptor)
        return self.shared_load.admit(local, self.cfg.max_associations)

    def handle_rejected(self, event: Event) -> None:
        """Log rejections made by pynetdicom itself (e.g. too many associations)."""
        calling, called, where = _peer(event)
        logger.warning(
            "REJECTED association calling_ae=%s called_ae=%s peer=%s reason=limit or protocol",
            calling,
            called,
            where,
        )


class StoreEvents:
    """pynetdicom's EVT_C_STORE and EVT_C_ECHO handlers around a :class:`StoreHandler`.

    pynetdicom streams the data set into a :mod:`~dicomnode.receiver.spool`
    file on the destination volume; here it is fsynced and closed, then filed.
    """

    def __init__(self, handler: StoreHandler) -> None:
        self.handler = handler

    def handle_echo(self, event: Event) -> int:
        """Answer C-ECHO: 0x0000 Success (only admitted peers get this far)."""
        calling, _, where = _peer(event)
        return self.handler.log_echo(calling, where)

    def handle_store(self, event: Event) -> int:
        """Store one object durably and return its C-STORE status (see :meth:`StoreHandler.finish`)."""
        started = time.monotonic()
        calling, _, where = _peer(event)
        req = event.request
        affected_uid = str(getattr(req, "AffectedSOPInstanceUID", ""))
        try:
            tmp = Path(event.dataset_path)
        except Exception:
            logger.exception("STORE-FAILED calling_ae=%s peer=%s no data set file", calling, where)
            return int(StoreStatus.PROCESSING_FAILURE)
        handle: Any = getattr(req, "_dataset_file", None)
        write_error: OSError | None = getattr(handle, "write_error", None)
        try:
            if write_error is None and handle is not None and not handle.closed:
                try:
                    fsync_file(handle)
                except OSError as exc:
                    write_error = exc
            if handle is not None and not handle.closed:
                handle.close()
        except OSError as exc:
            write_error = write_error or exc
        return self.handler.finish(tmp, calling, where, started, affected_uid, write_error)
