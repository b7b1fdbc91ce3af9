"""Build and run the receiving AE on the configured transport; graceful stop.

``[Network] receiver_transport = lean`` (default) serves with
:class:`~dicomnode.receiver.lean.LeanServer`; ``pynetdicom`` with a pynetdicom
AE configured here. Both accept every storage SOP class (including private and unknown ones) in the
transfer syntax the sender proposes first, plus Verification. The listening
socket is non-blocking to the caller: :meth:`Receiver.start` returns once it
listens, :meth:`Receiver.stop` stops accepting, lets running associations
finish for a grace period, then aborts the rest (unacknowledged objects are
resent by their senders; nothing half-written becomes visible).
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from dicomnode.config import ReceiverConfig
from dicomnode.errors import StorageError
from dicomnode.receiver.admission import SharedLoad
from dicomnode.receiver.lean import LeanServer
from dicomnode.receiver.store import PostStore, StoreHandler
from dicomnode.storage import INCOMING_TMP, check_writable, clean_stale_temp, use_temp_dir

logger = logging.getLogger(__name__)


class Receiver:
    """The C-STORE/C-ECHO SCP of the node.

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings (``receiver_transport`` picks the implementation).
    post_store : callable, optional
        Called after each object is durable (Enhanced MR conversion seam).
    ssl_context : ssl.SSLContext, optional
        Wraps accepted sockets for DICOM TLS.
    listen_socket : socket.socket, optional
        An already listening socket shared with other receiver processes
        (see :mod:`dicomnode.receiver.pool`); when None the receiver binds itself.
    shared_load : SharedLoad, optional
        The pool's shared connection counts, so max_associations is node-wide.
    """

    def __init__(
        self,
        cfg: ReceiverConfig,
        post_store: PostStore | None = None,
        ssl_context: ssl.SSLContext | None = None,
        listen_socket: socket.socket | None = None,
        shared_load: SharedLoad | None = None,
    ) -> None:
        self.cfg = cfg
        self.ssl_context = ssl_context
        self.listen_socket = listen_socket
        self.shared_load = shared_load
        self.handler = StoreHandler(cfg, post_store)
        self._lean: LeanServer | None = None
        self._pyn: Any = None

    def prepare_storage(self) -> None:
        """Create the destination, its temp and errors folders; clear stale partial files.

        Raises
        ------
        StorageError
            When the destination is not writable.
        """
        check_writable(self.cfg.destination_dir)
        check_writable(self.cfg.errors_dir)
        tmp = self.cfg.destination_dir / INCOMING_TMP
        clean_stale_temp(tmp)
        use_temp_dir(tmp)

    def start(self, prepare: bool = True) -> None:
        """Start listening on ``server_ip:receive_port`` in background threads.

        ``prepare=False`` skips folder preparation (done once by the parent of
        a process pool) but still routes temporary files to the destination volume.

        Raises
        ------
        StorageError
            When the destination folder is not writable.
        OSError
            When the address cannot be bound (port in use, address not local).
        """
        if prepare:
            self.prepare_storage()
        else:
            use_temp_dir(self.cfg.destination_dir / INCOMING_TMP)
        if self.cfg.receiver_transport == "pynetdicom":
            from dicomnode.receiver.pynetdicom_server import PynetdicomServer

            self._pyn = PynetdicomServer(
                self.cfg, self.handler, self.ssl_context, self.listen_socket, self.shared_load
            )
            self._pyn.start()
        else:
            load = self.shared_load
            room = None
            if load is not None:
                limit = self.cfg.max_associations
                room = lambda active: load.admit(active, limit)  # noqa: E731
            self._lean = LeanServer(
                self.cfg,
                self.handler,
                self.ssl_context,
                self.listen_socket,
                room,
                load.may_accept if load is not None else None,
            )
            self._lean.start()
        logger.log(
            logging.INFO if self.listen_socket is None else logging.DEBUG,
            "LISTENING ae_title=%s address=%s:%d tls=%s transport=%s",
            self.cfg.ae_title,
            self.cfg.server_ip,
            self.cfg.receive_port,
            "on" if self.ssl_context else "off",
            self.cfg.receiver_transport,
        )

    def active_associations(self) -> int:
        """Return the number of connections currently served."""
        if self._lean is not None:
            return self._lean.active()
        return self._pyn.active_associations() if self._pyn is not None else 0

    def is_serving(self) -> bool:
        """Return True while the receiver accepts associations (console, /healthz)."""
        return self._lean is not None or self._pyn is not None

    def publish_load(self) -> None:
        """Refresh this process's slot in the pool's shared connection counts."""
        if self.shared_load is not None:
            self.shared_load.publish(self.active_associations())

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, abort the rest."""
        lean, self._lean = self._lean, None
        pyn, self._pyn = self._pyn, None
        if lean is not None:
            lean.stop(grace_s)
        elif pyn is not None:
            pyn.stop(grace_s)
        else:
            return
        logger.info("STOPPED receiver")


__all__ = ["Receiver", "StorageError"]
