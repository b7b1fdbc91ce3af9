"""Build and run the receiving AE; graceful stop.

The node's one receiver transport is :class:`~dicomnode.receiver.lean.LeanServer`
(our own upper layer; pynetdicom is only a test peer). It accepts every storage
SOP class (including private and unknown ones) in the transfer syntax the sender
proposes first, plus Verification. The listening
socket is non-blocking to the caller: :meth:`Receiver.start` returns once it
listens, :meth:`Receiver.stop` stops accepting, lets running associations
finish for a grace period, then aborts the rest (unacknowledged objects are
resent by their senders; nothing half-written becomes visible).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from pathlib import Path

from dicomnode.config import ReceiverConfig
from dicomnode.errors import StorageError
from dicomnode.receiver import journal
from dicomnode.receiver.admission import SharedLoad
from dicomnode.receiver.committer import Committer
from dicomnode.receiver.lean import LeanServer
from dicomnode.receiver.startup import orphan_pending, sweep_stale_parts
from dicomnode.receiver.store import PostStore, StoreHandler
from dicomnode.storage import INCOMING_TMP, check_writable, clean_stale_temp

logger = logging.getLogger(__name__)


class Receiver:
    """The C-STORE/C-ECHO SCP of the node (and Storage Commitment SCP, :mod:`.committer`).

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings.
    post_store : callable, optional
        Called after each object is durable (Enhanced MR conversion seam).
    ssl_context : ssl.SSLContext, optional
        Wraps accepted sockets for DICOM TLS.
    listen_socket : socket.socket, optional
        An already listening socket shared with other receiver processes
        (see :mod:`dicomnode.receiver.pool`); when None the receiver binds itself.
    shared_load : SharedLoad, optional
        The pool's shared connection counts, so max_associations is node-wide.
    temp_prefix : str, optional
        Name prefix of this process's temp files (a pool gives each process its own).
    """

    def __init__(
        self,
        cfg: ReceiverConfig,
        post_store: PostStore | None = None,
        ssl_context: ssl.SSLContext | None = None,
        listen_socket: socket.socket | None = None,
        shared_load: SharedLoad | None = None,
        temp_prefix: str = "",
    ) -> None:
        self.cfg = cfg
        self.temp_prefix = temp_prefix
        self.ssl_context = ssl_context
        self.listen_socket = listen_socket
        self.shared_load = shared_load
        self.handler = StoreHandler(cfg, post_store)
        self.committer = Committer(cfg, temp_prefix)
        self.handler.on_stored = self.committer.record_stored
        self._lean: LeanServer | None = None

    def prepare_storage(self) -> None:
        """Create the destination, its temp and errors folders; clear stale partial files.

        Raises
        ------
        StorageError
            When the destination is not writable.
        """
        check_writable(self.cfg.destination_dir)
        check_writable(self.cfg.errors_dir)
        clean_stale_temp(self.cfg.destination_dir / INCOMING_TMP)
        journal.recover_journals(
            self.cfg.destination_dir,
            [journal.journal_path(Path(), self.temp_prefix).name] if self.cfg.journal_mb else [],
        )
        sweep_stale_parts(self.cfg)
        orphan_pending(self.cfg.destination_dir)

    def start(self, prepare: bool = True) -> None:
        """Start listening on ``server_ip:receive_port`` in background threads.

        ``prepare=False`` skips folder preparation (done once by the parent of
        a process pool).

        Raises
        ------
        StorageError
            When the destination folder is not writable.
        OSError
            When the address cannot be bound (port in use, address not local).
        """
        if prepare:
            self.prepare_storage()
        # Temp files live on the destination volume, so the final step is a rename.
        (self.cfg.destination_dir / INCOMING_TMP).mkdir(parents=True, exist_ok=True)
        if self.cfg.receiver_transport == "pynetdicom":
            logger.warning(
                "DEPRECATED [Network] receiver_transport = pynetdicom: that transport was retired; "
                "serving with the built-in one (same guarantees). Remove the key."
            )
        load = self.shared_load
        room = None
        if load is not None:
            limit = self.cfg.max_associations
            room = lambda active: load.admit(active, limit)  # noqa: E731
        self.handler.journal = self._open_journal()
        self._lean = LeanServer(
            self.cfg,
            self.handler,
            self.ssl_context,
            self.listen_socket,
            room,
            load.may_accept if load is not None else None,
            self.temp_prefix,
            self.committer,
        )
        self._lean.start()
        self.committer.start()
        logger.log(
            logging.INFO if self.listen_socket is None else logging.DEBUG,
            "LISTENING ae_title=%s address=%s:%d tls=%s",
            self.cfg.ae_title,
            self.cfg.server_ip,
            self.cfg.receive_port,
            "on" if self.ssl_context else "off",
        )

    def _open_journal(self) -> journal.Journal | None:
        """Open this process's receive journal (recovering it), or None: fsync every object."""
        if not self.cfg.journal_mb or not journal.SUPPORTED:
            return None
        path = journal.journal_path(self.cfg.destination_dir, self.temp_prefix)
        size = journal.journal_size(path, self.cfg.journal_mb * 1024 * 1024)
        if not size:
            logger.warning(
                "JOURNAL-OFF journal=%s reason=the destination volume has too little free space "
                "for journal_mb=%d: every object is fsynced with its folder (slower, as durable)",
                path,
                self.cfg.journal_mb,
            )
            return None
        try:
            opened, _ = journal.Journal.open(path, size)
        except OSError as exc:
            logger.warning(
                "JOURNAL-OFF journal=%s reason=%s: every object is fsynced with its folder "
                "(slower, as durable)",
                path,
                exc.strerror or exc,
            )
            return None
        return opened

    def active_associations(self) -> int:
        """Return the number of connections currently served."""
        return self._lean.active() if self._lean is not None else 0

    def is_serving(self) -> bool:
        """Return True while the receiver accepts associations (console, /healthz)."""
        return self._lean is not None

    def publish_load(self) -> None:
        """Refresh this process's slot in the pool's shared connection counts."""
        if self.shared_load is not None:
            self.shared_load.publish(self.active_associations())

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, abort the rest."""
        lean, self._lean = self._lean, None
        if lean is None:
            return
        lean.stop(grace_s)
        if self.handler.journal is not None:
            self.handler.journal.close()
            self.handler.journal = None
        self.committer.stop()
        logger.info("STOPPED receiver pid=%d", os.getpid())


__all__ = ["Receiver", "StorageError"]
