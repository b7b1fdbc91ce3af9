"""Build TLS contexts for DICOM TLS (receiver and forwarder) from [TLS] settings.

BCP 195-style defaults: TLS 1.2 minimum, the ssl module's secure cipher defaults,
certificate verification on. Imports the standard library and config only.
"""

from __future__ import annotations

import socket
import ssl

from dicomnode.config import TlsConfig
from dicomnode.errors import ConfigError


class ServerContext(ssl.SSLContext):
    """Server-side context whose TLS handshake runs in the association's thread.

    pynetdicom wraps each accepted socket in its accept loop; with the default
    ``do_handshake_on_connect`` one peer that connects and never completes the
    handshake blocks every other connection. Here the handshake is deferred to
    the connection's own thread (the receiver performs it with the network
    timeout when the connection opens).
    """

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        """Wrap ``sock``; server-side sockets postpone their handshake."""
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect and not server_side,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def _base(tls: TlsConfig, purpose: ssl.Purpose) -> ssl.SSLContext:
    # Not ssl.create_default_context(): it also trusts the operating system's CA
    # store, so any publicly issued client certificate would pass. Only ca_bundle
    # is trusted here.
    if purpose == ssl.Purpose.CLIENT_AUTH:
        ctx: ssl.SSLContext = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    try:
        if tls.certificate is not None and tls.private_key is not None:
            ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
        if tls.ca_bundle is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_bundle))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[TLS] cannot load certificate, key or CA bundle: {exc}") from None
    return ctx


def server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """Return the receiver's TLS context, or None when TLS is disabled.

    With ``require_client_cert`` a peer without a certificate signed by the CA
    bundle fails the handshake and is never associated.
    """
    if not tls.enabled:
        return None
    ctx = _base(tls, ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.require_client_cert and tls.ca_bundle is None:
        raise ConfigError("[TLS] require_client_cert = true needs ca_bundle")
    if tls.ca_bundle is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """Return the forwarder's TLS context (verifies the target against ca_bundle)."""
    if not tls.enabled:
        return None
    ctx = _base(tls, ssl.Purpose.SERVER_AUTH)
    # DICOM peers are addressed by IP more often than by a name in their certificate.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.ca_bundle is not None else ssl.CERT_NONE
    return ctx
