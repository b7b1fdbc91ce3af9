"""Admission of association requests.

Turns the pure decision of :mod:`dicomnode.receiver.policy` into an answer
(accept, or the A-ASSOCIATE-RJ result/source/reason) and the operator's log
line: ``ASSOC-ACCEPTED`` or ``REJECTED association ... reason=...``. Refusals
of unauthenticated peers go through :class:`RefusalLog`, which writes one line
per peer address and kind of refusal per interval and counts the rest, so a
flood of refused connections cannot flood the log. Every peer-supplied value
is escaped with :func:`dicomnode.logsafe.escape`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from dicomnode.config import ReceiverConfig
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.logsafe import escape
from dicomnode.receiver import policy
from dicomnode.receiver.policy import decide_association

logger = logging.getLogger(__name__)

#: A-ASSOCIATE-RJ (result, source, reason): transient, provider (presentation), local limit.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
#: A-ASSOCIATE-RJ (result, source, reason): transient, user, no reason given.
REJECT_INTERNAL_ERROR = (0x02, 0x01, 0x01)


class SharedLoad:
    """Connection counts of all receiver processes of a pool, in shared memory.

    Each process publishes how many connections it serves in its own slot;
    admission adds up every slot so ``max_associations`` holds for the whole
    node, not per process. Slots are refreshed by their owners, so a process
    that dies cannot leak capacity (the pool zeroes its slot on restart).

    Parameters
    ----------
    counts : multiprocessing.Array of int
        One slot per process, shared by the pool: its admitted associations.
    index : int
        This process's slot.
    negotiating : multiprocessing.Array of int, optional
        One slot per process: its connections still negotiating (accepted, not yet
        admitted). Weighed with ``counts`` when new connections are shared out
        (:meth:`may_accept`), never for ``max_associations``.
    """

    def __init__(self, counts: Any, index: int, negotiating: Any = None) -> None:
        self.counts = counts
        self.index = index
        self.negotiating = negotiating

    def publish(self, active: int) -> None:
        """Record how many connections this process serves now."""
        with self.counts.get_lock():
            self.counts[self.index] = active

    def may_accept(self, active: int, negotiating: int = 0) -> bool:
        """Publish this process's connections; return True unless another process carries fewer.

        A process's load is its admitted associations plus its connections still
        negotiating, so a burst of connections is shared out before any of them
        is admitted.
        """
        with self.counts.get_lock():
            self.counts[self.index] = active
            if self.negotiating is None:
                return bool(active <= min(self.counts))
            self.negotiating[self.index] = negotiating
            loads = [a + n for a, n in zip(self.counts, self.negotiating, strict=True)]
            return bool(loads[self.index] <= min(loads))

    def admit(self, active: int, limit: int) -> bool:
        """Publish ``active`` (including the new one) and return True if the node total fits."""
        with self.counts.get_lock():
            self.counts[self.index] = active
            return bool(sum(self.counts) <= limit)


def _reason_code(diagnostic: int, reason: str) -> str:
    """Return the short ``reason`` label of a rejection (for metrics)."""
    if diagnostic == 0x07:
        return "called_ae"
    if "AE_Hosts" in reason:
        return "peer_address"
    if diagnostic == 0x03:
        return "untrusted_calling_ae"
    return "other"


#: How long a resolved [AE_Hosts] name is remembered (seconds).
_RESOLVE_CACHE_S: Final = 60.0
#: Most refusal keys remembered by a RefusalLog (peers beyond are logged, then forgotten).
_MAX_REFUSAL_KEYS: Final = 4096

_resolved: dict[str, tuple[float, frozenset[str]]] = {}
_resolved_lock = threading.Lock()


def _addresses_of(name: str) -> frozenset[str]:
    """Return the addresses ``name`` resolves to, remembered for :data:`_RESOLVE_CACHE_S`.

    A peer claiming a trusted AE title from another address makes admission
    resolve that title's host names; the cache keeps a flood of such claims
    from resolving (and waiting for DNS) once per connection.
    """
    now = time.monotonic()
    with _resolved_lock:
        hit = _resolved.get(name)
        if hit is not None and now - hit[0] < _RESOLVE_CACHE_S:
            return hit[1]
    try:
        found = frozenset(str(info[4][0]) for info in socket.getaddrinfo(name, None))
    except OSError:
        found = frozenset()
    with _resolved_lock:
        if len(_resolved) > 1024:
            _resolved.clear()
        _resolved[name] = (now, found)
    return found


def _is_address_or_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def resolve_names(ip: str, names: tuple[str, ...]) -> frozenset[str]:
    """Return ``{ip}`` plus every configured host name that resolves to ``ip``."""
    found = {ip}
    for name in names:
        if not _is_address_or_network(name) and ip in _addresses_of(name):
            found.add(name)
    return frozenset(found)


def _summarised(extra: dict[str, Any] | None, count: int) -> dict[str, Any] | None:
    """Return a copy of a refusal's ledger event standing for ``count`` refusals (``size``)."""
    if extra is None or "ledger" not in extra:
        return None
    event = dict(extra["ledger"])
    event["size"] = count
    event["reason"] = f"{count} more like this (not logged one by one): {event.get('reason') or ''}"
    return {"ledger": event}


class RefusalLog:
    """Log refusals of unauthenticated peers once per peer and kind per interval.

    The first refusal of a (peer address, kind) pair is logged at once; later
    ones within ``interval_s`` are counted, and :meth:`flush` (called
    periodically) writes one summary line per pair with the count. Thread-safe.

    Parameters
    ----------
    interval_s : float
        Seconds between two lines for the same peer address and kind; 0 logs every refusal.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        #: (ip, kind) -> [time of the last line, refusals not logged, kind, last ledger event]
        self._seen: dict[tuple[str, str], list[Any]] = {}

    def warning(
        self, ip: str, kind: str, msg: str, *args: object, extra: dict[str, Any] | None = None
    ) -> None:
        """Log ``msg % args`` at WARNING unless (``ip``, ``kind``) was logged within the interval.

        ``extra`` (a ledger event) goes with the line; the events of refusals not
        logged one by one go, counted, with the summary line (``size`` = how many).
        """
        if self.interval_s <= 0:
            logger.warning(msg, *args, extra=extra)
            return
        now = time.monotonic()
        key = (ip, kind)
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                entry[3] = extra if extra is not None else entry[3]
                return
            suppressed = entry[1] if entry is not None else 0
            last_event = entry[3] if entry is not None else None
            if len(self._seen) >= _MAX_REFUSAL_KEYS:
                for line in self._flush_locked(now, force=True):
                    self._log_summary(*line)
            self._seen[key] = [now, 0, kind, None]
        if suppressed:
            logger.warning(
                "REJECTED %d more connection(s) like this from peer %s in the last %g s",
                suppressed,
                ip,
                self.interval_s,
                extra=_summarised(last_event, suppressed),
            )
        logger.warning(msg, *args, extra=extra)

    def _log_summary(self, ip: str, kind: str, count: int, event: dict[str, Any] | None) -> None:
        logger.warning(
            "REJECTED %d more connection(s) from peer %s in the last %g s (%s; not logged "
            "one by one)",
            count,
            ip,
            self.interval_s,
            kind,
            extra=_summarised(event, count),
        )

    def flush(self) -> None:
        """Write the counts of refusals not logged whose interval has passed; forget idle peers."""
        if self.interval_s <= 0:
            return
        with self._lock:
            lines = self._flush_locked(time.monotonic(), force=False)
        for line in lines:
            self._log_summary(*line)

    def _flush_locked(
        self, now: float, force: bool
    ) -> list[tuple[str, str, int, dict[str, Any] | None]]:
        lines = []
        for key, entry in list(self._seen.items()):
            if force or now - entry[0] >= self.interval_s:
                if entry[1]:
                    lines.append((key[0], key[1], int(entry[1]), entry[3]))
                del self._seen[key]
        return lines


def admit(
    cfg: ReceiverConfig,
    calling: str,
    called: str,
    ip: str,
    port: int,
    node_has_room: Callable[[], bool],
    refusals: RefusalLog | None = None,
) -> tuple[int, int, int] | None:
    """Decide an A-ASSOCIATE-RQ and log the outcome.

    Parameters
    ----------
    cfg : ReceiverConfig
        Trusted titles, called-AE rule, AE host bindings, max_associations.
    calling, called : str
        AE titles of the request.
    ip, port : str, int
        The peer's address.
    node_has_room : callable
        Returns False when the node already serves ``max_associations``
        (only asked once the peer itself is admissible).
    refusals : RefusalLog, optional
        Rate-limits the ``REJECTED`` lines; None logs each refusal.

    Returns
    -------
    tuple of int or None
        None to accept; otherwise the A-ASSOCIATE-RJ (result, source, reason).
        Never raises: an unexpected error refuses the association (transient).
    """
    where = f"{ip}:{port}"
    warn = (
        refusals.warning
        if refusals is not None
        else lambda _ip, _kind, *a, **kw: logger.warning(*a, **kw)
    )
    try:
        peers = frozenset({ip})
        decision = decide_association(cfg, calling, called, peers)
        reporter = policy.reporting_destination(cfg, calling)
        allowed = policy.hosts_for(cfg, calling) or (
            (reporter.host,) if reporter is not None else ()
        )
        if not decision.accept and allowed and decision.reason.startswith("peer address"):
            # Host names in [AE_Hosts] are resolved only when the address alone does not match.
            peers = resolve_names(ip, allowed)
            if len(peers) > 1:
                decision = decide_association(cfg, calling, called, peers)
        if not decision.accept:
            warn(
                ip,
                decision.reason,
                "REJECTED association calling_ae=%s called_ae=%s peer=%s reason=%s",
                escape(calling),
                escape(called),
                where,
                decision.reason,
                extra=ledger_extra(
                    EventKind.ASSOCIATION_REJECTED,
                    calling_ae=calling,
                    peer=where,
                    status=_reason_code(decision.diagnostic, decision.reason),
                    reason=decision.reason,
                ),
            )
            return (0x01, 0x01, decision.diagnostic)
        if not node_has_room():
            warn(
                ip,
                "max_associations",
                "REJECTED association calling_ae=%s called_ae=%s peer=%s "
                "reason=max_associations=%d reached",
                escape(calling),
                escape(called),
                where,
                cfg.max_associations,
                extra=ledger_extra(
                    EventKind.ASSOCIATION_REJECTED,
                    calling_ae=calling,
                    peer=where,
                    status="max_associations",
                    reason=f"max_associations={cfg.max_associations} reached",
                ),
            )
            return REJECT_LOCAL_LIMIT
    except Exception:
        logger.exception("REJECTED association: admission check failed, refusing")
        return REJECT_INTERNAL_ERROR
    logger.info(
        "ASSOC-ACCEPTED calling_ae=%s called_ae=%s peer=%s%s",
        escape(calling),
        escape(called),
        where,
        " (storage commitment reports only)" if decision.commitment_only else "",
        extra=ledger_extra(EventKind.ASSOCIATION_ACCEPTED, calling_ae=calling, peer=where),
    )
    return None
