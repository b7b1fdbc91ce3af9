"""The requesting side of an association: connect, associate, read a message, release.

Shared by the forwarder's SCU (:mod:`dicomnode.forwarder.lean`) and ``dicomnode
echo`` (:mod:`dicomnode.verify`); what to propose and what to send is theirs.
Errors are :class:`~dicomnode.dul.link.LinkError` with a message an operator can
act on, naming the peer as ``AE@host:port``.
"""

from __future__ import annotations

import logging
import socket
import ssl

from dicomnode.dul.dimse import DATA_SET_TYPE, NO_DATA_SET, command_us, parse_command
from dicomnode.dul.link import LinkError, LinkTimeout, PduLink
from dicomnode.dul.pdu import (
    A_ASSOCIATE_RJ,
    A_RELEASE_RP_PDU,
    A_RELEASE_RQ_PDU,
    PDV_COMMAND,
    PDV_LAST,
    PduType,
    iter_pdvs,
)

logger = logging.getLogger(__name__)


def open_link(
    host: str,
    port: int,
    where: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> PduLink:
    """Connect to ``host:port`` (Nagle off, TLS when ``ssl_context`` is given).

    Raises
    ------
    LinkError
        When the connection is refused or times out, or the TLS handshake fails.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise LinkError(
            f"cannot connect to {where} (connection refused or timed out): {exc}"
        ) from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
    except OSError as exc:
        sock.close()
        raise LinkError(f"association to {where} failed: TLS handshake failed: {exc}") from exc
    return PduLink(sock, where, ssl_context is not None, timeout_s)


def associate(conn: PduLink, request: bytes, acse_timeout_s: float) -> bytes:
    """Send an encoded A-ASSOCIATE-RQ; return the body of the peer's A-ASSOCIATE-AC.

    Raises
    ------
    LinkError
        When no answer comes within ``acse_timeout_s``, the peer rejects or
        aborts, or answers with another PDU (the link is then aborted).
    """
    where = conn.where
    conn.set_timeout(acse_timeout_s)
    conn.send(request, "requesting the association")
    try:
        pdu_type, body = conn.read_pdu("negotiating the association")
    except LinkTimeout as exc:
        raise LinkError(
            f"no association with {where} (no answer within {acse_timeout_s:g} s)"
        ) from exc
    if pdu_type == PduType.A_ASSOCIATE_AC:
        return body
    if pdu_type == PduType.A_ASSOCIATE_RJ:
        try:
            why = A_ASSOCIATE_RJ.decode(body).describe()
        except ValueError:
            why = ""
        raise LinkError(f"association rejected by {where} ({why})")
    if pdu_type == PduType.A_ABORT:
        raise LinkError(f"association aborted by {where}")
    conn.abort()
    raise LinkError(
        f"no association with {where} (unexpected PDU 0x{pdu_type:02X}, protocol error)"
    )


def read_message(conn: PduLink, what: str) -> tuple[dict[int, bytes], bytes | None]:
    """Read one DIMSE message (command set and, if one follows, its data set).

    Raises
    ------
    LinkTimeout
        When nothing arrives within the current timeout.
    LinkError
        On A-ABORT, A-RELEASE-RQ, another PDU or a malformed one.
    """
    command = bytearray()
    data = bytearray()
    parsed: dict[int, bytes] | None = None
    while True:
        pdu_type, body = conn.read_pdu(what)
        if pdu_type == PduType.A_ABORT:
            raise LinkError(f"association aborted by {conn.where} while {what}")
        if pdu_type == PduType.A_RELEASE_RQ:
            conn.send(A_RELEASE_RP_PDU, "releasing the association")
            raise LinkError(f"{conn.where} released the association while {what}")
        if pdu_type != PduType.P_DATA_TF:
            raise LinkError(f"unexpected PDU 0x{pdu_type:02X} from {conn.where} while {what}")
        try:
            pdvs = list(iter_pdvs(body))
        except ValueError:
            raise LinkError(f"malformed P-DATA-TF from {conn.where}") from None
        for _cid, control, fragment in pdvs:
            if control & PDV_COMMAND:
                command += fragment
                if control & PDV_LAST:
                    try:
                        parsed = parse_command(command)
                    except ValueError as exc:
                        raise LinkError(f"malformed command from {conn.where}: {exc}") from exc
                    if command_us(parsed, DATA_SET_TYPE) == NO_DATA_SET:
                        return parsed, None
            else:
                if parsed is None:
                    raise LinkError(f"data set before its command from {conn.where}")
                data += fragment
                if control & PDV_LAST:
                    return parsed, bytes(data)


def release(conn: PduLink, acse_timeout_s: float) -> None:
    """A-RELEASE-RQ and wait for A-RELEASE-RP (at most ``acse_timeout_s``); never raises."""
    try:
        conn.send(A_RELEASE_RQ_PDU, "releasing the association")
        conn.set_timeout(acse_timeout_s)
        while True:
            pdu_type, _body = conn.read_pdu("releasing the association")
            if pdu_type == PduType.A_RELEASE_RP:
                return
            if pdu_type == PduType.A_RELEASE_RQ:  # release collision (PS3.8 7.2.2)
                conn.send(A_RELEASE_RP_PDU, "releasing the association")
                continue
            if pdu_type == PduType.A_ABORT:
                return
    except (LinkError, LinkTimeout) as exc:
        logger.debug("release of the association to %s incomplete: %s", conn.where, exc)
