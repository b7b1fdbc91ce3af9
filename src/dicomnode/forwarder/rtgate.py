"""The RT completeness gate of the forwarder: hold a group until its RT references are there.

:class:`RtGate` wraps the pure :class:`~.completeness.CompletenessTracker` with
what it needs from outside: the clock, the per-destination wait
(``[Destination:NAME] rt_completeness_wait_s``, else ``[FolderWatcher]
rt_completeness_wait_s``), ``rt_incomplete_action``, the ledger's record of
earlier deliveries (:class:`~dicomnode.ledger.queries.DeliveryLookup`) and the
log lines. :func:`~.delivery.send_group` asks :meth:`RtGate.check` after reading
the group's headers and before opening any association; the scheduler asks
:meth:`RtGate.should_hold` so an unchanged waiting group is not claimed (and its
headers not read) again until its wait is over. Log verbs: ``WAITING``,
``RT-INCOMPLETE``, ``RT-COMPLETE``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Final

from dicomnode.config import DestinationConfig, ForwarderConfig
from dicomnode.forwarder.batching import GroupSnapshot, ObjectInfo, group_label
from dicomnode.forwarder.completeness import (
    SERIES,
    CompletenessTracker,
    GateAction,
    GateVerdict,
    Reference,
    describe_missing,
    missing_references,
)
from dicomnode.forwarder.job import GroupJob
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.ledger.queries import DeliveryLookup
from dicomnode.logsafe import escape

logger = logging.getLogger(__name__)

#: The destination defined by ``[FolderWatcher] target_aet/target_ip/target_port``.
DEFAULT_DESTINATION: Final = "default"

#: What :func:`~.delivery.send_group` calls: ``(job, objects) -> verdict`` for one destination.
GateCheck = Callable[[GroupJob, Sequence[ObjectInfo]], GateVerdict]


def job_fingerprint(job: GroupJob) -> frozenset[Hashable]:
    """Return the content of a claimed group: (path, size, mtime) per file."""
    return frozenset((jf.display, jf.size, jf.mtime_ns) for jf in job.files)


def snapshot_fingerprint(snap: GroupSnapshot) -> frozenset[Hashable]:
    """Return :func:`job_fingerprint` of the job a snapshot of the watch folder becomes."""
    return frozenset((e.rel_path.as_posix(), e.size, e.mtime_ns) for e in snap.files)


class RtGate:
    """Decide, per group and destination, whether its RT objects may be sent now.

    Parameters
    ----------
    config : ForwarderConfig
        ``rt_completeness_wait_s``, ``rt_incomplete_action`` and the target of
        the ``default`` destination.
    destinations : sequence of DestinationConfig
        ``[Destination:NAME]`` sections; their ``rt_completeness_wait_s`` overrides.
    delivered : DeliveryLookup, optional
        The ledger; None: only what is in the group counts as present.
    clock : callable
        Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        config: ForwarderConfig,
        destinations: Sequence[DestinationConfig] = (),
        delivered: DeliveryLookup | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.destinations = {d.name: d for d in destinations}
        self.delivered = delivered
        self.clock = clock
        self._tracker = CompletenessTracker()
        self._lock = threading.Lock()

    def wait_s(self, destination: str) -> float:
        """Return the RT completeness wait of ``destination`` (its own, else [FolderWatcher]'s)."""
        dest = self.destinations.get(destination)
        if dest is not None and dest.rt_completeness_wait_s is not None:
            return dest.rt_completeness_wait_s
        return self.config.rt_completeness_wait_s

    def ledger_destination(self, destination: str) -> str:
        """Return how the ledger's ``destination`` column names ``destination`` (``AE@host:port``)."""
        dest = self.destinations.get(destination)
        if destination == DEFAULT_DESTINATION or dest is None:
            cfg = self.config
            return f"{cfg.target_aet}@{cfg.target_ip}:{cfg.target_port}"
        return f"{dest.ae_title}@{dest.host}:{dest.port}"

    def for_destination(self, destination: str = DEFAULT_DESTINATION) -> GateCheck:
        """Return the check :func:`~.delivery.send_group` calls for ``destination``."""
        return lambda job, objects: self.check(job, objects, destination)

    def check(
        self,
        job: GroupJob,
        objects: Sequence[ObjectInfo],
        destination: str = DEFAULT_DESTINATION,
        whole: GroupJob | None = None,
    ) -> GateVerdict:
        """Return whether ``job``'s objects may go to ``destination`` now, and log the news.

        Parameters
        ----------
        job : GroupJob
            The claimed group.
        objects : sequence of ObjectInfo
            Its readable objects (headers with references).
        destination : str
            The destination's name (``default`` for the [FolderWatcher] target).
        whole : GroupJob, optional
            The whole claimed group when ``job`` and ``objects`` are one
            destination's share of it: its content is what :meth:`should_hold`
            compares with the watch folder. Default: ``job``.

        Returns
        -------
        GateVerdict
            SEND, WAIT (send nothing, keep the files), SEND_INCOMPLETE (send, the
            wait is over) or PARK (park the group, the wait is over).
        """
        wait_s = self.wait_s(destination)
        if wait_s <= 0:
            return GateVerdict(GateAction.SEND)
        ledger_name = self.ledger_destination(destination)
        missing = missing_references(objects, lambda ref: self._was_delivered(ledger_name, ref))
        action = self.config.rt_incomplete_action
        with self._lock:
            verdict = self._tracker.decide(
                job.key,
                destination,
                job_fingerprint(whole if whole is not None else job),
                missing,
                self.clock(),
                wait_s,
                action,
            )
        if verdict.announce:
            self._announce(job, destination, ledger_name, verdict)
        return verdict

    def should_hold(
        self, key: str, snapshot: GroupSnapshot | None, destination: str = DEFAULT_DESTINATION
    ) -> bool:
        """Return True while group ``key`` waits for ``destination`` unchanged within its wait."""
        if snapshot is None:
            return False
        with self._lock:
            return self._tracker.should_hold(
                key,
                destination,
                snapshot_fingerprint(snapshot),
                self.clock(),
                self.wait_s(destination),
            )

    def forget(self, key: str) -> None:
        """Drop what is remembered of group ``key`` (it left the watch folder)."""
        with self._lock:
            self._tracker.forget(key)

    def waiting(self) -> dict[str, str]:
        """Return group key -> ``destination: missing … (waiting since N s)`` for the console."""
        now = self.clock()
        with self._lock:
            holds = self._tracker.waiting()
        out: dict[str, str] = {}
        for (key, destination), (missing, since) in sorted(holds.items()):
            text = (
                f"{destination}: missing {describe_missing(missing)} "
                f"({now - since:.0f} of {self.wait_s(destination):g} s, "
                f"then {self.config.rt_incomplete_action})"
            )
            out[key] = f"{out[key]}; {text}" if key in out else text
        return out

    def _was_delivered(self, ledger_name: str, ref: Reference) -> bool:
        lookup = self.delivered
        if lookup is None:
            return False
        if ref.kind == SERIES:
            return lookup.objects(ledger_name, ref.images) or lookup.series(
                ledger_name, ref.study_uid, ref.uid
            )
        return lookup.objects(ledger_name, [ref.uid])

    def _announce(
        self, job: GroupJob, destination: str, ledger_name: str, verdict: GateVerdict
    ) -> None:
        label = escape(group_label(job.key))
        missing = escape(describe_missing(verdict.missing))
        path = str(job.park_root / job.key) if job.key else str(job.park_root)
        if verdict.action is GateAction.WAIT:
            logger.info(
                "WAITING group=%s destination=%s missing=%s waited=%.0fs wait=%gs then=%s",
                label,
                escape(destination),
                missing,
                verdict.waited_s,
                verdict.deadline_s,
                self.config.rt_incomplete_action,
                extra=ledger_extra(
                    EventKind.WAITING,
                    path=path,
                    destination=ledger_name,
                    reason=f"RT references missing: {describe_missing(verdict.missing)}",
                    size=len(job.files),
                ),
            )
        elif verdict.action is GateAction.SEND:
            logger.info(
                "RT-COMPLETE group=%s destination=%s waited=%.0fs: sending",
                label,
                escape(destination),
                verdict.waited_s,
            )
        else:
            logger.warning(
                "RT-INCOMPLETE group=%s destination=%s missing=%s waited=%.0fs action=%s",
                label,
                escape(destination),
                missing,
                verdict.waited_s,
                self.config.rt_incomplete_action,
            )


def incomplete_reason(verdict: GateVerdict) -> str:
    """Return the ``send_errors.log`` reason of a group parked by ``rt_incomplete_action = park``."""
    return (
        f"RT references missing after waiting {verdict.waited_s:.0f} s "
        f"(rt_completeness_wait_s={verdict.deadline_s:g}, rt_incomplete_action=park): "
        f"{describe_missing(verdict.missing)}"
    )
