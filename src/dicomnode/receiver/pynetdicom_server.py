"""The receiver on pynetdicom (``[Network] receiver_transport = pynetdicom``).

Kept as the reference implementation and fallback of the lean transport: a
pynetdicom AE that accepts every storage SOP class (including private and
unknown ones, ``UNRESTRICTED_STORAGE_SERVICE``) in the transfer syntax the
sender proposes first, plus Verification, streams each data set to a
:mod:`~dicomnode.receiver.spool` file on the destination volume and files it
through the same :class:`~dicomnode.receiver.store.StoreHandler`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import ReceiverConfig
from dicomnode.receiver.admission import SharedLoad
from dicomnode.receiver.handlers import AssociationGate, StoreEvents
from dicomnode.receiver.spool import set_min_free_space_mb, spool_file
from dicomnode.receiver.store import StoreHandler

logger = logging.getLogger(__name__)

#: Transfer syntaxes listed for known storage classes; unknown ones are accepted as proposed.
_ALL_TS: list[str] = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]


class PynetdicomServer:
    """pynetdicom AE and association server of the receiver.

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
    shared_load : SharedLoad, optional
        The pool's shared connection counts, so max_associations is node-wide.
    """

    def __init__(
        self,
        cfg: ReceiverConfig,
        handler: StoreHandler,
        ssl_context: ssl.SSLContext | None,
        listen_socket: socket.socket | None,
        shared_load: SharedLoad | None,
    ) -> None:
        self.cfg = cfg
        self.ssl_context = ssl_context
        self.listen_socket = listen_socket
        self.gate = AssociationGate(cfg, shared_load)
        self.events = StoreEvents(handler)
        self._ae: Any = None
        self._server: Any = None

    def _build_ae(self) -> Any:
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        dimse_messages.NamedTemporaryFile = spool_file  # type: ignore[attr-defined,assignment]
        set_min_free_space_mb(self.cfg.min_free_space_mb)
        ae = AE(ae_title=self.cfg.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), _ALL_TS)
        ae.add_supported_context(Verification)
        ae.maximum_associations = self.cfg.max_associations
        ae.maximum_pdu_size = self.cfg.max_pdu_bytes
        ae.acse_timeout = self.cfg.acse_timeout_s
        ae.dimse_timeout = self.cfg.dimse_timeout_s
        ae.network_timeout = self.cfg.network_timeout_s
        if not self.cfg.trusts_any_ae:
            ae.require_calling_aet = list(self.cfg.trusted_ae_titles)
        ae.require_called_aet = self.cfg.require_called_aet
        return ae

    def start(self) -> None:
        """Listen (or serve the shared socket) in background threads.

        Raises
        ------
        OSError
            When the address cannot be bound.
        """
        self._ae = self._build_ae()
        handlers: list[tuple[Any, Callable[..., Any]]] = [
            (evt.EVT_CONN_OPEN, self.gate.handle_conn_open),
            (evt.EVT_CONN_CLOSE, self.gate.handle_conn_close),
            (evt.EVT_ACCEPTED, self.gate.handle_accepted),
            (evt.EVT_REQUESTED, self.gate.handle_requested),
            (evt.EVT_REJECTED, self.gate.handle_rejected),
            (evt.EVT_C_STORE, self.events.handle_store),
            (evt.EVT_C_ECHO, self.events.handle_echo),
        ]
        if self.listen_socket is None:
            self._server = self._ae.start_server(
                (self.cfg.server_ip, self.cfg.receive_port),
                block=False,
                evt_handlers=handlers,
                ssl_context=self.ssl_context,
            )
        else:
            self._server = self._serve_shared(handlers)

    def _serve_shared(self, handlers: list[tuple[Any, Callable[..., Any]]]) -> Any:
        """Serve on the inherited listening socket instead of binding a new one."""
        assert self.listen_socket is not None
        shared: socket.socket = self.listen_socket
        # Several processes wait on the same socket: the one that loses the race for a
        # connection must not sit in accept(), so accept() times out quickly.
        shared.settimeout(0.5)

        class SharedSocketServer(ThreadedAssociationServer):
            def server_bind(self) -> None:
                if self.socket is not None:
                    self.socket.close()
                self.socket = shared
                self.server_address = shared.getsockname()

            def server_activate(self) -> None:
                """The parent process already listens on the socket."""

            def server_close(self) -> None:
                # shutdown() would stop the listening socket for every process: only close ours.
                if self.socket is not None:
                    self.socket.close()

        server = self._ae.make_server(
            (self.cfg.server_ip, self.cfg.receive_port),
            ssl_context=self.ssl_context,
            evt_handlers=handlers,
            server_class=SharedSocketServer,
        )
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
        thread.start()
        self._ae._servers.append(server)
        return server

    def active_associations(self) -> int:
        """Return the number of acceptor associations currently served."""
        if self._ae is None:
            return 0
        return sum(1 for a in self._ae.active_associations if a.is_acceptor)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, abort the rest."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        active = [a for a in self._ae.active_associations if a.is_acceptor]
        # Connections that never sent an A-ASSOCIATE-RQ (port probes) hold no data: close now.
        for assoc in active:
            if not assoc.is_established:
                assoc.kill()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            active = [a for a in active if a.is_alive() and a.is_established]
            if not active:
                break
            time.sleep(0.05)
        for assoc in active:
            logger.warning(
                "ABORTED association with %s at shutdown (unacknowledged objects will be resent)",
                assoc.requestor.ae_title,
            )
            assoc.abort()
