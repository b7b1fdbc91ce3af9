"""pynetdicom glue of the receiver: association gate, C-STORE and C-ECHO handlers.

The C-STORE handler answers success only after the object is complete on disk:
pynetdicom streams the data set to a temporary file on the destination volume
(``STORE_RECV_CHUNKED_DATASET``); the handler fsyncs it, reads only the header,
decides the final path (:mod:`dicomnode.organise`) and renames it into place
(:mod:`dicomnode.storage`). Handlers never raise. Log verbs: ``ASSOC-ACCEPTED``,
``REJECTED``, ``STORED``, ``STORE-FAILED``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.errors import InvalidDicomError

from dicomnode import config as cfgmod
from dicomnode.config import ReceiverConfig
from dicomnode.dicomtags import is_valid_uid, read_header, safe_component, text_of
from dicomnode.organise import relative_path
from dicomnode.receiver.policy import decide_association
from dicomnode.status import StoreStatus
from dicomnode.storage import free_space_mb, fsync_file, place_file, quarantine

if TYPE_CHECKING:
    from pynetdicom.events import Event

logger = logging.getLogger(__name__)

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


class AssociationGate:
    """Admission control bound to EVT_REQUESTED, EVT_REJECTED and EVT_CONN_OPEN."""

    def __init__(self, cfg: ReceiverConfig) -> None:
        self.cfg = cfg

    def handle_conn_open(self, event: Event) -> None:
        """Set TCP_NODELAY on the accepted socket (no 40 ms Nagle stalls)."""
        try:
            wrapper = event.assoc.dul.socket
            sock = wrapper.socket if wrapper is not None else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            logger.debug("could not set TCP_NODELAY", exc_info=True)

    def handle_requested(self, event: Event) -> None:
        """Reject an untrusted or misaddressed association with A-ASSOCIATE-RJ."""
        try:
            calling, called, where = _peer(event)
            ip = str(event.assoc.requestor.address)
            allowed = cfgmod.hosts_for(self.cfg, calling) or ()
            peers = _resolve_names(ip, allowed) if allowed else frozenset({ip})
            decision = decide_association(self.cfg, calling, called, peers)
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
            except Exception:
                event.assoc.abort()

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
            0xA700 Refused, out of resources: disk guard, object too large, or an
            OS error while writing (disk full, permission, bad path).
            0xC000 Error, cannot understand: the object cannot be parsed or has no
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
            if handle is not None and not handle.closed:
                fsync_file(handle)
                handle.close()
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
