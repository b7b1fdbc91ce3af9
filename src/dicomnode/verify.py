"""C-ECHO SCU for ``dicomnode echo``: verify that a DICOM node answers.

The only runtime module that still uses pynetdicom (the receiver and the
forwarder use dicomnode's own upper layer, :mod:`dicomnode.dul`); it keeps the
CLI free of network code. pynetdicom's own log lines are silenced while it runs:
the one-line :class:`EchoResult` message says what happened.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class EchoResult:
    """Outcome of one C-ECHO: ok, a one-line message and the round trip in ms."""

    ok: bool
    message: str
    elapsed_ms: float


def echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> EchoResult:
    """Associate with ``called_aet@host:port``, send C-ECHO, release.

    Returns
    -------
    EchoResult
        ``ok`` is True only for a 0x0000 response.
    """
    library_log = logging.getLogger("pynetdicom")
    level = library_log.level
    library_log.setLevel(logging.CRITICAL)  # its ERROR lines repeat ours, out of order
    try:
        return _echo(host, port, called_aet, calling_aet, timeout_s, ssl_context)
    finally:
        library_log.setLevel(level)


def _echo(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None,
) -> EchoResult:
    started = time.monotonic()
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    tls_args = (ssl_context, host) if ssl_context is not None else None
    where = f"{called_aet}@{host}:{port}"
    try:
        assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args)
    except (OSError, socket.gaierror) as exc:
        return EchoResult(False, f"ECHO-FAILED {where}: {exc}", 0.0)

    def elapsed() -> float:
        return (time.monotonic() - started) * 1000

    if assoc.is_rejected:
        return EchoResult(
            False, f"ECHO-FAILED {where}: association rejected (check AE titles)", elapsed()
        )
    if not assoc.is_established:
        return EchoResult(
            False,
            f"ECHO-FAILED {where}: no association (connection refused, aborted or timed out)",
            elapsed(),
        )
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        return EchoResult(False, f"ECHO-FAILED {where}: no response", elapsed())
    if int(code) != 0:
        return EchoResult(False, f"ECHO-FAILED {where}: status 0x{int(code):04X}", elapsed())
    return EchoResult(True, f"ECHO-OK {where} in {elapsed():.0f} ms", elapsed())
