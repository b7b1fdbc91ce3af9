"""The operator console, ``/metrics`` and ``/healthz`` over HTTP(S).

Standard library :class:`http.server.ThreadingHTTPServer` plus Jinja2 templates
(see the README's Console section for why), served from the node's main process
where the ledger writer, receiver and forwarder live. Imports the ledger, the
forwarder's on-disk helpers, config and storage; never the receiver internals.
"""

from __future__ import annotations

from dicomnode.web.console import Console, NodeProbe

__all__ = ["Console", "NodeProbe"]
