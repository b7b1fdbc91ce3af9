"""pynetdicom SCU of the forwarder: send ordered objects over one association per plan.

:class:`AssociationSender` opens one association per
:func:`~dicomnode.forwarder.batching.plan_associations` entry, proposes the
files' own SOP class and transfer syntax contexts (plus uncompressed fallbacks),
switches Nagle off on the socket, and sends each file from its path without
decoding when the target accepted the file's transfer syntax
(``STORE_SEND_CHUNKED_DATASET``); only otherwise is the object decoded and, if
possible, converted. Memory stays bounded for objects of any size: pynetdicom's
DIMSE layer reads the file one PDU at a time but queues every PDU on an
unbounded queue faster than the socket drains it (forwarding a 1 GB object to
storescp peaked at 521 MB RSS), so :func:`_bound_send_queue` makes the reading
thread wait while 4 MiB are queued (peak 55 MB for the same object), and an
unlimited peer PDU size is capped at 1 MiB. :func:`_keep_responses_for_caller`
closes a pynetdicom race that lost C-STORE responses (the "intermittent stall").

Every file gets exactly one callback with its :class:`SendOutcome`; a missing
response, an abort or a temporary refusal ends the association and the rest is
reported as ``RETRY``, never lost. This is the only forwarder module that
imports pynetdicom.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.pdu_primitives import P_DATA

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder.batching import (
    UNCOMPRESSED_SYNTAXES,
    ContextSpec,
    ObjectInfo,
    SendOutcome,
    is_transient_status,
)
from dicomnode.status import describe_status, is_success_or_warning

if TYPE_CHECKING:
    from pynetdicom.association import Association

logger = logging.getLogger(__name__)

# Stream objects from their files instead of decoding them (pynetdicom >= 2.0).
_config.STORE_SEND_CHUNKED_DATASET = True

#: Largest PDU we send when the peer allows unlimited PDUs.
MAX_SEND_PDU_BYTES: Final = 1024 * 1024
#: Bytes of encoded PDUs allowed to wait in pynetdicom's send queue.
SEND_QUEUE_BYTES: Final = 4 * 1024 * 1024
#: Seconds pynetdicom's DUL reactor sleeps when it finds nothing to do (its default is
#: 0.001). A storage SCU is strictly request/response, so every C-STORE waits out up to
#: two of these sleeps (handing the request to the socket, reading the response).
DUL_POLL_S: Final = 0.0001


class _SendAborted(Exception):
    """The association ended while a data set was being queued."""


#: Called once per file: (object, outcome, status or None, reason).
ResultCallback = Callable[[ObjectInfo, SendOutcome, "int | None", str], None]
#: Called right before a file is sent; returning False stops the run (file changed).
CheckCallback = Callable[[ObjectInfo], bool]


@dataclass(frozen=True, slots=True)
class RunEnd:
    """How one association run ended.

    Attributes
    ----------
    network_error : str or None
        Why the remaining files were not sent (connection refused, association
        rejected or aborted, timeout, temporary refusal), or None.
    stopped : bool
        True when the run ended early on request or because a file changed.
    """

    network_error: str | None = None
    stopped: bool = False


def _bound_send_queue(assoc: Association, pdu_bytes: int, limit_s: float) -> None:
    """Make pynetdicom's DIMSE layer wait while ``SEND_QUEUE_BYTES`` are queued.

    ``DIMSEServiceProvider.send_msg`` puts every P-DATA of a message on the DUL's
    unbounded ``to_provider_queue`` as fast as it can read the file; the DUL
    thread drains it only as fast as the socket accepts data. Waiting here keeps
    at most a few MB in memory. When the association dies while waiting,
    :class:`_SendAborted` stops the encoder so the rest of the file is not read.
    """
    dul = assoc.dul
    queue = dul.to_provider_queue
    original = dul.send_pdu
    max_items = max(2, SEND_QUEUE_BYTES // max(pdu_bytes, 1))

    def send_pdu(primitive: Any) -> None:
        if isinstance(primitive, P_DATA) and queue.qsize() >= max_items:
            started = time.monotonic()
            while queue.qsize() >= max_items:
                if not assoc.is_established or assoc.is_aborted:
                    raise _SendAborted("association ended while sending")
                if time.monotonic() - started > limit_s:
                    raise _SendAborted(f"peer accepted no data for {limit_s:g} s")
                time.sleep(0.0005)
        original(primitive)

    dul.send_pdu = send_pdu  # type: ignore[method-assign]


def _keep_responses_for_caller(assoc: Association) -> None:
    """Stop the association reactor from taking DIMSE messages off the queue.

    ``send_c_store`` pauses the reactor with ``_reactor_checkpoint.clear()``
    and waits for ``_is_paused``; but the reactor sets ``_is_paused = True``
    *before* ``checkpoint.wait()`` and ``False`` after it, so if the sender
    checks in that window (a GIL switch is enough) it proceeds while the
    reactor runs one more loop, and ``dimse.get_msg(block=False)`` there
    steals the C-STORE-RSP. The sender then waits out the DIMSE timeout:
    the "intermittent stall" seen with small files and TCP_NODELAY. As a pure
    storage SCU we never serve requests on this association, so the
    reactor thread simply gets no DIMSE messages; release, abort and
    network-timeout handling in the reactor do not use this queue.
    """
    dimse = assoc.dimse
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if threading.current_thread() is assoc:
            return None, None
        return original(block=block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


def _set_nodelay(assoc: Association) -> None:
    try:
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:
        logger.debug("TCP_NODELAY not set: %s", exc)


def _status_of(rsp: Dataset) -> int | None:
    value = rsp.get("Status") if rsp is not None else None
    return int(value) if value is not None else None


class AssociationSender:
    """Send objects to the configured target, one association per call of :meth:`run`.

    Parameters
    ----------
    config : ForwarderConfig
        Target address, AE titles, timeouts and PDU size.
    ssl_context : ssl.SSLContext or None
        Client TLS context; None for plain TCP.
    """

    def __init__(self, config: ForwarderConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._assoc: Association | None = None

    def abort(self) -> None:
        """Abort the association in progress, if any (used by a forced stop)."""
        with self._lock:
            assoc = self._assoc
        if assoc is not None and assoc.is_established:
            logger.warning("ABORTING association to %s", self.config.target_aet)
            assoc.abort()

    def _make_ae(self, contexts: Sequence[ContextSpec]) -> AE:
        cfg = self.config
        ae = AE(ae_title=cfg.calling_aet)
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.connection_timeout = cfg.acse_timeout_s
        ae.maximum_pdu_size = cfg.max_pdu_bytes
        for spec in contexts:
            ae.add_requested_context(spec.sop_class_uid, list(spec.transfer_syntaxes))
        return ae

    def run(
        self,
        locate: Callable[[ObjectInfo], Path],
        objects: Sequence[ObjectInfo],
        contexts: Sequence[ContextSpec],
        on_result: ResultCallback,
        check: CheckCallback,
        should_stop: Callable[[], bool],
    ) -> RunEnd:
        """Send ``objects`` in the given order over one association.

        Parameters
        ----------
        locate : callable
            Returns the file of an object.
        objects : sequence of ObjectInfo
            Objects in send order.
        contexts : sequence of ContextSpec
            Presentation contexts to propose (at most 128).
        on_result : callable
            Called once per object that reached a decision: ``SENT`` (success
            or warning status), ``REFUSED`` (failure status, SOP class or
            transfer syntax not accepted, unreadable), ``RETRY`` (not delivered
            because of network trouble or a temporary refusal). Objects not
            reached because of a stop or a changed file get no callback.
        check : callable
            Asked right before each object is sent; False ends the run (stopped).
        should_stop : callable
            Polled between objects; True ends the run (stopped).

        Returns
        -------
        RunEnd
            Whether the association ended because of network trouble.
        """
        cfg = self.config
        ae = self._make_ae(contexts)
        tls_args = (self.ssl_context, cfg.target_ip) if self.ssl_context is not None else None
        connected = threading.Event()
        try:
            assoc = ae.associate(
                cfg.target_ip,
                cfg.target_port,
                ae_title=cfg.target_aet,
                max_pdu=cfg.max_pdu_bytes,
                tls_args=tls_args,
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.set())],
            )
        except (OSError, ValueError, RuntimeError) as exc:
            reason = (
                f"association to {cfg.target_aet}@{cfg.target_ip}:{cfg.target_port} failed: {exc}"
            )
            self._report_rest(objects, 0, on_result, reason)
            return RunEnd(network_error=reason)

        if not assoc.is_established:
            where = f"{cfg.target_aet}@{cfg.target_ip}:{cfg.target_port}"
            if assoc.rejected_contexts and not assoc.accepted_contexts and not assoc.is_rejected:
                for obj in objects:
                    on_result(
                        obj, SendOutcome.REFUSED, None, "SOP class not accepted by the target"
                    )
                return RunEnd()
            if not connected.is_set():
                reason = f"cannot connect to {where} (connection refused or timed out)"
            elif assoc.is_rejected:
                reason = f"association rejected by {where}"
            elif assoc.is_aborted:
                reason = f"association aborted by {where}"
            else:
                reason = f"no association with {where} (no answer within acse_timeout_s)"
            self._report_rest(objects, 0, on_result, reason)
            return RunEnd(network_error=reason)

        with self._lock:
            self._assoc = assoc
        try:
            return self._send_all(assoc, locate, objects, on_result, check, should_stop)
        finally:
            with self._lock:
                self._assoc = None
            if assoc.is_established:
                assoc.release()

    def _report_rest(
        self, objects: Sequence[ObjectInfo], start: int, on_result: ResultCallback, reason: str
    ) -> None:
        for obj in objects[start:]:
            on_result(obj, SendOutcome.RETRY, None, reason)

    def _send_all(
        self,
        assoc: Association,
        locate: Callable[[ObjectInfo], Path],
        objects: Sequence[ObjectInfo],
        on_result: ResultCallback,
        check: CheckCallback,
        should_stop: Callable[[], bool],
    ) -> RunEnd:
        _set_nodelay(assoc)
        assoc.dul._run_loop_delay = DUL_POLL_S
        _keep_responses_for_caller(assoc)
        peer_pdu = int(assoc.acceptor.maximum_length or 0)
        if peer_pdu == 0 or peer_pdu > MAX_SEND_PDU_BYTES:
            assoc.acceptor.maximum_length = MAX_SEND_PDU_BYTES
            peer_pdu = MAX_SEND_PDU_BYTES
        _bound_send_queue(assoc, peer_pdu, self.config.network_timeout_s)

        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))

        for index, obj in enumerate(objects):
            if should_stop() or not check(obj):
                return RunEnd(stopped=True)
            if not assoc.is_established:
                reason = "association ended by the peer"
                self._report_rest(objects, index, on_result, reason)
                return RunEnd(network_error=reason)
            path = locate(obj)
            offered = accepted.get(obj.sop_class_uid, set())
            payload: Path | Dataset
            if obj.transfer_syntax_uid in offered:
                payload = path
            elif not offered:
                on_result(obj, SendOutcome.REFUSED, None, "SOP class not accepted by the target")
                continue
            else:
                try:
                    payload = _converted(path, obj, offered)
                except Exception as exc:  # pydicom raises many types on decoding
                    reason = (
                        f"target accepts {obj.sop_class_uid} only as "
                        f"{', '.join(sorted(offered))}; conversion from "
                        f"{obj.transfer_syntax_uid} failed: {exc}"
                    )
                    on_result(obj, SendOutcome.REFUSED, None, reason)
                    continue
            try:
                rsp = assoc.send_c_store(payload)
            except _SendAborted as exc:
                reason = str(exc)
                self._report_rest(objects, index, on_result, reason)
                if assoc.is_established:
                    assoc.abort()
                return RunEnd(network_error=reason)
            except FileNotFoundError:
                logger.warning("VANISHED %s before it could be sent", obj.rel_path)
                continue
            except RuntimeError as exc:  # "association must be established"
                reason = f"association ended: {exc}"
                self._report_rest(objects, index, on_result, reason)
                return RunEnd(network_error=reason)
            except (AttributeError, ValueError, OSError) as exc:
                on_result(obj, SendOutcome.REFUSED, None, f"cannot send this file: {exc}")
                continue
            status = _status_of(rsp)
            if status is None:
                reason = "no C-STORE response (DIMSE timeout or aborted association)"
                self._report_rest(objects, index, on_result, reason)
                if assoc.is_established:
                    assoc.abort()
                return RunEnd(network_error=reason)
            if is_success_or_warning(status):
                on_result(obj, SendOutcome.SENT, status, describe_status(status))
            elif is_transient_status(status):
                reason = f"target refused temporarily: 0x{status:04X} {describe_status(status)}"
                self._report_rest(objects, index, on_result, reason)
                return RunEnd(network_error=reason)
            else:
                on_result(obj, SendOutcome.REFUSED, status, describe_status(status))
        return RunEnd()


def _converted(path: Path, obj: ObjectInfo, offered: set[str]) -> Dataset:
    """Decode ``path`` into a data set pynetdicom can encode in one of ``offered``.

    Uncompressed objects convert between uncompressed syntaxes inside pynetdicom;
    compressed ones are decompressed first (needs a pixel-data decoder).

    Raises
    ------
    ValueError
        When no offered syntax can be reached.
    """
    if not offered & UNCOMPRESSED_SYNTAXES:
        raise ValueError("no uncompressed transfer syntax accepted")
    ds = dcmread(path)
    if obj.transfer_syntax_uid not in UNCOMPRESSED_SYNTAXES:
        ds.decompress(generate_instance_uid=False)  # the object keeps its identity
    logger.info(
        "CONVERTING %s from %s for the target (accepted: %s)",
        obj.rel_path,
        obj.transfer_syntax_uid,
        ", ".join(sorted(offered)),
    )
    return ds
