"""Admission of association requests, shared by both receiver transports.

Turns the pure decision of :mod:`dicomnode.receiver.policy` into an answer
(accept, or the A-ASSOCIATE-RJ result/source/reason) and the operator's log
line: ``ASSOC-ACCEPTED`` or ``REJECTED association ... reason=...``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from dicomnode import config as cfgmod
from dicomnode.config import ReceiverConfig
from dicomnode.ledger.events import EventKind, ledger_extra
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
        One slot per process, shared by the pool.
    index : int
        This process's slot.
    """

    def __init__(self, counts: Any, index: int) -> None:
        self.counts = counts
        self.index = index

    def publish(self, active: int) -> None:
        """Record how many connections this process serves now."""
        with self.counts.get_lock():
            self.counts[self.index] = active

    def may_accept(self, active: int) -> bool:
        """Publish ``active`` and return True unless another process serves fewer connections."""
        with self.counts.get_lock():
            self.counts[self.index] = active
            return bool(active <= min(self.counts))

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


def resolve_names(ip: str, names: tuple[str, ...]) -> frozenset[str]:
    """Return ``{ip}`` plus every configured host name that resolves to ``ip``."""
    found = {ip}
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:
            continue
        if any(info[4][0] == ip for info in infos):
            found.add(name)
    return frozenset(found)


def admit(
    cfg: ReceiverConfig,
    calling: str,
    called: str,
    ip: str,
    port: int,
    node_has_room: Callable[[], bool],
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

    Returns
    -------
    tuple of int or None
        None to accept; otherwise the A-ASSOCIATE-RJ (result, source, reason).
        Never raises: an unexpected error refuses the association (transient).
    """
    where = f"{ip}:{port}"
    try:
        allowed = cfgmod.hosts_for(cfg, calling) or ()
        peers = resolve_names(ip, allowed) if allowed else frozenset({ip})
        decision = decide_association(cfg, calling, called, peers)
        if not decision.accept:
            logger.warning(
                "REJECTED association calling_ae=%s called_ae=%s peer=%s reason=%s",
                calling,
                called,
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
            logger.warning(
                "REJECTED association calling_ae=%s called_ae=%s peer=%s "
                "reason=max_associations=%d reached",
                calling,
                called,
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
        "ASSOC-ACCEPTED calling_ae=%s called_ae=%s peer=%s",
        calling,
        called,
        where,
        extra=ledger_extra(EventKind.ASSOCIATION_ACCEPTED, calling_ae=calling, peer=where),
    )
    return None
