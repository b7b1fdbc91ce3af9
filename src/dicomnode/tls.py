"""Build TLS contexts for DICOM TLS (receiver and forwarder) from [TLS] settings.

BCP 195-style defaults: TLS 1.2 minimum, the ssl module's secure cipher defaults,
certificate verification on. Imports the standard library and config only.
"""

from __future__ import annotations

import ssl

from dicomnode.config import TlsConfig
from dicomnode.errors import ConfigError


def _base(tls: TlsConfig, purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
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
