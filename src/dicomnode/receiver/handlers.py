"""pynetdicom glue of the receiver: association gate, C-STORE and C-ECHO handlers.

The C-STORE handler answers success only after the object is complete on disk:
pynetdicom streams the data set to a temporary file on the destination volume
(``STORE_RECV_CHUNKED_DATASET``); the handler fsyncs it, checks that its element
structure is complete (:mod:`dicomnode.integrity`), reads only the
header, decides the final path (:mod:`dicomnode.organise`) and renames it into
place (:mod:`dicomnode.storage`). The association gate also bounds what one
peer can hold: socket timeouts, PDU length, TLS handshakes off the accept loop.
Handlers never raise. Log verbs: ``ASSOC-ACCEPTED``, ``REJECTED``, ``STORED``,
``STORE-FAILED``, ``DISCARDED``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydicom.errors import InvalidDicomError

from dicomnode import config as cfgmod
from dicomnode.config import ReceiverConfig
from dicomnode.dicomtags import is_valid_uid, read_header, safe_component, text_of
from dicomnode.integrity import find_defect
from dicomnode.organise import relative_path
from dicomnode.receiver.policy import decide_association
from dicomnode.status import StoreStatus
from dicomnode.storage import free_space_mb, fsync_file, place_file, quarantine

if TYPE_CHECKING:
    from pynetdicom.events import Event

logger = logging.getLogger(__name__)

#: Association requests with many presentation contexts stay well below this.
_MIN_PDU_LIMIT_BYTES: Final = 65536
#: Tolerance above the announced maximum PDU length before a PDU is refused.
_PDU_SLACK_BYTES: Final = 65536

#: Called after an object is durable: (final path, AE folder, SOP Class UID).
PostStore = Callable[[Path, Path, str], None]


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


def _resolve_names(ip: str, names: tuple[str, ...]) -> frozenset[str]:
    """Return ``{ip}`` plus every configured host name that resolves to ``ip``."""
    found = {ip}
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:
            continue
        if any(info[4][0] == ip for info in infos):
            found.add(name)
    return frozenset(found)


class SharedLoad:
    """Connection counts of all receiver processes of a pool, in shared memory.

    Each process publishes how many connections it serves in its own slot;
    admission adds up every slot so ``max_associations`` holds for the whole
    node, not per process. Slots are refreshed by their owners, so a process
    that dies cannot leak capacity (the pool zeroes its slot on restart).

    Parameters
    ----------
    counts : multiprocessing.Array of int
        One slot per process, shared by the pool.
    index : int
        This process's slot.
    """

    def __init__(self, counts: Any, index: int) -> None:
        self.counts = counts
        self.index = index

    def publish(self, active: int) -> None:
        """Record how many connections this process serves now."""
        with self.counts.get_lock():
            self.counts[self.index] = active

    def admit(self, active: int, limit: int) -> bool:
        """Publish ``active`` (including the new one) and return True if the node total fits."""
        with self.counts.get_lock():
            self.counts[self.index] = active
            return bool(sum(self.counts) <= limit)


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
            calling, called, where = _peer(event)
            ip = str(event.assoc.requestor.address)
            allowed = cfgmod.hosts_for(self.cfg, calling) or ()
            peers = _resolve_names(ip, allowed) if allowed else frozenset({ip})
            decision = decide_association(self.cfg, calling, called, peers)
            if decision.accept and not self._within_node_limit(event):
                logger.warning(
                    "REJECTED association calling_ae=%s called_ae=%s peer=%s "
                    "reason=max_associations=%d reached across receiver processes",
                    calling,
                    called,
                    where,
                    self.cfg.max_associations,
                )
                event.assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient: local limit
                event.assoc.kill()
                return
            if decision.accept:
                logger.info(
                    "ASSOC-ACCEPTED calling_ae=%s called_ae=%s peer=%s", calling, called, where
                )
                return
            logger.warning(
                "REJECTED association calling_ae=%s called_ae=%s peer=%s reason=%s",
                calling,
                called,
                where,
                decision.reason,
            )
            event.assoc.acse.send_reject(0x01, 0x01, decision.diagnostic)
            # As pynetdicom does for its own rejections: let the DUL send the
            # A-ASSOCIATE-RJ before the connection is closed.
            event.assoc.kill()
        except Exception:
            logger.exception("REJECTED association: admission check failed, refusing")
            try:
                event.assoc.acse.send_reject(0x02, 0x01, 0x01)
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


class StoreHandler:
    """Handle C-STORE and C-ECHO requests of admitted peers.

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings.
    post_store : callable, optional
        Called after an object is durable (the Enhanced MR conversion seam).
    """

    def __init__(self, cfg: ReceiverConfig, post_store: PostStore | None = None) -> None:
        self.cfg = cfg
        self.post_store = post_store
        self._max_bytes = cfg.max_object_mb * 1_000_000
        # AE folders below destination_dir share its volume: its free-space check covers them.
        self._local_roots = {cfg.destination_dir / "incoming"} | {
            folder for _, folder in cfg.ae_mappings if folder.is_relative_to(cfg.destination_dir)
        }

    def handle_echo(self, event: Event) -> int:
        """Answer C-ECHO: 0x0000 Success (only admitted peers get this far)."""
        calling, _, where = _peer(event)
        logger.info("ECHO calling_ae=%s peer=%s", calling, where)
        return 0x0000

    def handle_store(self, event: Event) -> int:
        """Store one object durably and return its C-STORE status.

        Returns
        -------
        int
            0x0000 Success: the object is fsynced and renamed into its final place.
            0xA700 Refused, out of resources: disk guard, object too large, the
            received data could not be written to the temp file (disk full), or an
            OS error while filing it (permission, bad path).
            0xC000 Error, cannot understand: the object is structurally incomplete
            (an element runs past the end: truncated), cannot be parsed, or has no
            valid SOP Instance UID.
            0x0110 Processing failure: an unexpected error in the node.
        """
        started = time.monotonic()
        calling, _, where = _peer(event)
        req = event.request
        tmp: Path | None = None
        try:
            tmp = Path(event.dataset_path)
            handle: Any = getattr(req, "_dataset_file", None)
            write_error: OSError | None = getattr(handle, "write_error", None)
            if write_error is None and handle is not None and not handle.closed:
                try:
                    fsync_file(handle)
                except OSError as exc:
                    write_error = exc
            if handle is not None and not handle.closed:
                handle.close()
            if write_error is not None:
                return self._refuse_unwritable(
                    tmp,
                    calling,
                    where,
                    str(getattr(req, "AffectedSOPInstanceUID", "")),
                    write_error,
                )
            return self._store(
                tmp, calling, where, started, str(getattr(req, "AffectedSOPInstanceUID", ""))
            )
        except Exception as exc:
            logger.exception("STORE-FAILED calling_ae=%s peer=%s unexpected error", calling, where)
            self._keep(
                tmp, str(getattr(req, "AffectedSOPInstanceUID", "")), f"unexpected error: {exc!r}"
            )
            return int(StoreStatus.PROCESSING_FAILURE)

    def _store(self, tmp: Path, calling: str, where: str, started: float, affected_uid: str) -> int:
        if self.cfg.min_free_space_mb and free_space_mb(tmp.parent) < self.cfg.min_free_space_mb:
            logger.error(
                "STORE-FAILED calling_ae=%s peer=%s status=0xA700 reason=free space below "
                "min_free_space_mb=%d on %s",
                calling,
                where,
                self.cfg.min_free_space_mb,
                self.cfg.destination_dir,
            )
            return int(StoreStatus.OUT_OF_RESOURCES)
        size = tmp.stat().st_size
        if self._max_bytes and size > self._max_bytes:
            self._keep(None, affected_uid, f"object of {size} bytes exceeds max_object_mb")
            logger.error(
                "STORE-FAILED calling_ae=%s peer=%s status=0xA700 reason=object larger than max_object_mb=%d",
                calling,
                where,
                self.cfg.max_object_mb,
            )
            return int(StoreStatus.OUT_OF_RESOURCES)
        try:
            defect = find_defect(tmp)
        except OSError as exc:
            defect = f"cannot read the received object: {exc.strerror or exc}"
        if defect is not None:
            return self._fail(
                tmp, calling, where, StoreStatus.CANNOT_UNDERSTAND, f"malformed object: {defect}"
            )
        try:
            header = read_header(tmp)
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
            return self._fail(
                tmp, calling, where, StoreStatus.CANNOT_UNDERSTAND, f"unreadable object: {exc}"
            )
        sop_uid = text_of(header, "SOPInstanceUID")
        if not sop_uid or not is_valid_uid(sop_uid):
            return self._fail(
                tmp,
                calling,
                where,
                StoreStatus.CANNOT_UNDERSTAND,
                f"missing or invalid SOP Instance UID {sop_uid!r}",
            )
        ae_root = cfgmod.route_for(self.cfg, calling)
        if (
            self.cfg.min_free_space_mb
            and ae_root not in self._local_roots
            and free_space_mb(ae_root) < self.cfg.min_free_space_mb
        ):
            logger.error(
                "STORE-FAILED calling_ae=%s peer=%s sop_instance_uid=%s status=0xA700 reason=free "
                "space below min_free_space_mb=%d on %s",
                calling,
                where,
                sop_uid,
                self.cfg.min_free_space_mb,
                ae_root,
            )
            return int(StoreStatus.OUT_OF_RESOURCES)
        final = ae_root / relative_path(header, self.cfg.folder_layout)
        try:
            place_file(tmp, final)
        except OSError as exc:
            return self._fail(
                tmp,
                calling,
                where,
                StoreStatus.OUT_OF_RESOURCES,
                f"cannot write {final}: {exc.strerror or exc}",
                sop_uid,
            )
        logger.info(
            "STORED calling_ae=%s sop_instance_uid=%s bytes=%d ms=%.0f path=%s",
            calling,
            sop_uid,
            size,
            (time.monotonic() - started) * 1000,
            final,
        )
        if self.post_store is not None:
            try:
                self.post_store(final, ae_root, text_of(header, "SOPClassUID"))
            except Exception:
                logger.exception("post-store step failed for %s (object is stored)", final)
        return int(StoreStatus.SUCCESS)

    def _refuse_unwritable(
        self, tmp: Path, calling: str, where: str, affected_uid: str, exc: OSError
    ) -> int:
        """Answer 0xA700 for an object whose temp file could not be written (disk full)."""
        logger.error(
            "STORE-FAILED calling_ae=%s peer=%s sop_instance_uid=%s status=0xA700 "
            "reason=cannot write the received object to %s: %s",
            calling,
            where,
            affected_uid or "-",
            tmp.parent,
            exc.strerror or exc,
        )
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            logger.debug("could not remove %s", tmp, exc_info=True)
        return int(StoreStatus.OUT_OF_RESOURCES)

    def _fail(
        self,
        tmp: Path,
        calling: str,
        where: str,
        status: StoreStatus,
        reason: str,
        sop_uid: str = "",
    ) -> int:
        logger.error(
            "STORE-FAILED calling_ae=%s peer=%s sop_instance_uid=%s status=0x%04X reason=%s",
            calling,
            where,
            sop_uid or "-",
            int(status),
            reason,
        )
        self._keep(
            tmp,
            sop_uid,
            f"{reason} (calling AE {calling}, peer {where}, answered 0x{int(status):04X})",
        )
        return int(status)

    def _keep(self, tmp: Path | None, uid: str, reason: str) -> None:
        hint = safe_component(uid or "unknown", "unknown", 64)
        quarantine(
            tmp if tmp is not None and tmp.exists() else None, self.cfg.errors_dir, hint, reason
        )
