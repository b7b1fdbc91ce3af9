"""C-ECHO SCU for ``dicomnode echo``: verify that a DICOM node answers.

Speaks dicomnode's own upper layer (:mod:`dicomnode.dul.scu`, as the forwarder
does): one association proposing Verification in Implicit VR Little Endian,
one C-ECHO-RQ, release. The one-line :class:`EchoResult` message says what
happened, in the forwarder's words for the same failures.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import Final

from dicomnode.dul.dimse import (
    C_ECHO_RQ,
    COMMAND_FIELD,
    MESSAGE_ID_RESPONDED,
    RESPONSE,
    STATUS,
    VERIFICATION_SOP_CLASS,
    c_echo_rq,
    command_us,
)
from dicomnode.dul.link import LinkError, LinkTimeout
from dicomnode.dul.meta import IMPLICIT_VR_LE
from dicomnode.dul.pdu import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RQ,
    ACCEPTANCE,
    APPLICATION_CONTEXT,
    PDV_COMMAND,
    PDV_LAST,
    ProposedContext,
    p_data_tf,
)
from dicomnode.dul.scu import associate, open_link, read_message, release

#: Largest PDU we accept from the peer (the answer to one C-ECHO is small).
_MAX_PDU: Final = 65536


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

    ``timeout_s`` bounds the connection, the association and the wait for the
    response, each.

    Returns
    -------
    EchoResult
        ``ok`` is True only for a 0x0000 response.
    """
    started = time.monotonic()
    where = f"{called_aet}@{host}:{port}"

    def elapsed() -> float:
        return (time.monotonic() - started) * 1000

    try:
        request = A_ASSOCIATE_RQ(
            called_aet,
            calling_aet,
            APPLICATION_CONTEXT,
            (
                ProposedContext(1, VERIFICATION_SOP_CLASS, (IMPLICIT_VR_LE,)),
            ),  # every node accepts it
            _MAX_PDU,
        ).encode()
    except (ValueError, UnicodeEncodeError) as exc:
        return EchoResult(False, f"ECHO-FAILED {where}: {exc}", 0.0)
    try:
        conn = open_link(host, port, where, timeout_s, ssl_context)
    except LinkError as exc:
        return _failed(where, exc, 0.0)
    try:
        answer = A_ASSOCIATE_AC.decode(associate(conn, request, timeout_s))
        if not any(r.context_id == 1 and r.result == ACCEPTANCE for r in answer.results):
            release(conn, timeout_s)
            return EchoResult(
                False, f"ECHO-FAILED {where}: Verification not accepted by the peer", elapsed()
            )
        conn.send(p_data_tf(1, PDV_COMMAND | PDV_LAST, c_echo_rq(1)), "sending the C-ECHO")
        conn.set_timeout(timeout_s)
        response, _data = read_message(conn, "waiting for the C-ECHO response")
        release(conn, timeout_s)
    except LinkTimeout:
        conn.abort()
        return EchoResult(
            False, f"ECHO-FAILED {where}: no response within {timeout_s:g} s", elapsed()
        )
    except (LinkError, ValueError) as exc:
        conn.abort()
        return _failed(where, exc, elapsed())
    finally:
        conn.close()
    status = command_us(response, STATUS)
    if (
        status is None
        or command_us(response, COMMAND_FIELD) != C_ECHO_RQ | RESPONSE
        or command_us(response, MESSAGE_ID_RESPONDED) != 1
    ):
        return EchoResult(False, f"ECHO-FAILED {where}: malformed response", elapsed())
    if status != 0:
        return EchoResult(False, f"ECHO-FAILED {where}: status 0x{status:04X}", elapsed())
    return EchoResult(True, f"ECHO-OK {where} in {elapsed():.0f} ms", elapsed())


def _failed(where: str, exc: Exception, elapsed_ms: float) -> EchoResult:
    """One ``ECHO-FAILED`` line naming the peer once (link errors already name it)."""
    text = str(exc)
    return EchoResult(
        False,
        f"ECHO-FAILED {text}" if where in text else f"ECHO-FAILED {where}: {text}",
        elapsed_ms,
    )
