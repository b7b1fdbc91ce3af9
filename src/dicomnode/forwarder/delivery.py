"""Delivery of one group: send in clinical order, then apply each file's outcome on disk at once.

:func:`send_group` plans the associations of a claimed group
(:func:`~.batching.plan_stages`: one association, or with ``max_associations``
several at once per send-order class, :mod:`.lanes`), sends them with the SCU
(:func:`make_sender`: the lean SCU of :mod:`.lean`) and applies every per-file
decision immediately: delivered files are deleted, refused ones parked under
``failed/`` with a ``send_errors.log`` line (:func:`park_job_file`), files kept
by network trouble or a temporary refusal are returned for a retry. A kill at
any moment loses nothing. Used by the long-running :mod:`.scheduler` and the
one-shot :mod:`.oneshot`. Log verbs: ``SENT``, ``SEND-FAILED``, ``QUARANTINED``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Protocol

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder.batching import (
    ObjectInfo,
    RefusalVerdict,
    SendOutcome,
    category_rank,
    group_label,
    judge_refusal,
    order_objects,
    plan_stages,
)
from dicomnode.forwarder.completeness import GateAction, describe_missing
from dicomnode.forwarder.header import inspect_file
from dicomnode.forwarder.job import GroupJob, GroupResult, JobFile, is_unchanged
from dicomnode.forwarder.lanes import run_stage
from dicomnode.forwarder.lean import LeanAssociationSender
from dicomnode.forwarder.outcome import (
    ParkReason,
    delete_delivered,
    park_file,
    park_stamp,
    remove_empty_folders,
)
from dicomnode.forwarder.rtgate import GateCheck, incomplete_reason
from dicomnode.forwarder.sender import AssociationSender
from dicomnode.ledger.events import EventKind, ledger_extra

logger = logging.getLogger(__name__)


def make_sender(config: ForwarderConfig, ssl_context: ssl.SSLContext | None) -> AssociationSender:
    """Return the forwarder's SCU (the lean one; ``transport = pynetdicom`` is retired)."""
    return LeanAssociationSender(config, ssl_context)


class OutcomeApplier(Protocol):
    """What happens on disk (and in the delivery store) when a file reached an outcome."""

    def delivered(self, jf: JobFile, obj: ObjectInfo) -> Path | None:
        """The target acknowledged ``jf``; return a folder to prune at the end, if any."""

    def refused(self, jf: JobFile, why: ParkReason, stamp: str) -> bool:
        """The target refused ``jf`` (or it cannot be sent); True when it was parked."""


class MoveApplier:
    """The single-target outcome: delete what was acknowledged, move what was refused to failed/."""

    def __init__(self, job: GroupJob) -> None:
        self.job = job

    def delivered(self, jf: JobFile, obj: ObjectInfo) -> Path | None:
        """Delete the file; its folder is pruned once, at the end of the group."""
        if delete_delivered(jf.path, self.job.prune_root, prune=False):
            return jf.path.parent
        return None

    def refused(self, jf: JobFile, why: ParkReason, stamp: str) -> bool:
        """Move the file to ``failed/<stamp>_<group>/`` with a ``send_errors.log`` line."""
        return park_job_file(self.job, jf, why, stamp)


def send_group(
    job: GroupJob,
    config: ForwarderConfig,
    sender: AssociationSender,
    should_stop: Callable[[], bool],
    on_file_done: Callable[[], None] | None = None,
    refusals: Mapping[str, int] | None = None,
    max_associations: int = 1,
    apply: OutcomeApplier | None = None,
    name: str = "",
    known: Mapping[Path, ObjectInfo] | None = None,
    gate: GateCheck | None = None,
) -> GroupResult:
    """Send one group in clinical order and apply each file's outcome on disk at once.

    Delivered files (success or warning) are deleted; refused ones (failure
    status, SOP class or transfer syntax not accepted, empty, unreadable or
    non-DICOM) are parked with a ``send_errors.log`` line; files that were not
    delivered because of network trouble stay and are listed in
    ``GroupResult.retry``. A file whose size or mtime differs from the claim is
    neither sent nor deleted (``changed``).

    Parameters
    ----------
    job : GroupJob
        The claimed group.
    config : ForwarderConfig
        Send order and target.
    sender : AssociationSender
        Opens the associations.
    should_stop : callable
        True stops between files (files stay).
    on_file_done : callable, optional
        Called after each file reached an outcome (progress bars).
    refusals : mapping, optional
        Earlier temporary refusals per file (display name), from the retry state.
    max_associations : int
        Associations at once (:func:`~.batching.plan_stages`): with more than
        one, each send-order class goes over up to this many associations at
        the same time, and a class starts only when every object of the
        classes before it was answered.
    gate : callable, optional
        The RT completeness check of this destination (:meth:`.rtgate.RtGate.check`),
        asked after the headers are read and before any association: WAIT sends
        nothing and returns with ``waiting`` set; PARK parks the group.
    apply : OutcomeApplier, optional
        What an outcome does on disk; default :class:`MoveApplier` (delete or
        move to failed/). The router's applier records per destination and
        deletes a file only when all its destinations are done.
    name : str
        Destination name added to the log lines (empty for the single target).
    known : mapping of Path to ObjectInfo, optional
        Header facts already read for this claim (the router's), so files are not
        read twice; files not in it are inspected here.
    """
    applier: OutcomeApplier = apply if apply is not None else MoveApplier(job)
    suffix = f" destination={name}" if name else ""
    result = GroupResult()
    stamp = park_stamp(time.time())
    label = group_label(job.key)
    by_key: dict[PurePosixPath, JobFile] = {}
    infos: list[ObjectInfo] = []
    for index, jf in enumerate(job.files):
        if should_stop():
            result.stopped = True
            return result
        key = PurePosixPath(str(index), *jf.inside.parts)
        read = (known or {}).get(jf.path)
        found = replace(read, rel_path=key) if read is not None else inspect_file(jf, key)
        if isinstance(found, ParkReason):
            if not is_unchanged(jf):
                result.changed = True
                continue
            if applier.refused(jf, found, stamp):
                result.parked += 1
            if on_file_done:
                on_file_done()
            continue
        by_key[key] = jf
        infos.append(found)

    ordered = order_objects(infos, config.send_order)
    verdict = gate(job, ordered) if gate is not None and ordered else None
    if verdict is not None and verdict.action is GateAction.WAIT:
        result.waiting = describe_missing(verdict.missing)
        return result
    if verdict is not None and verdict.action is GateAction.PARK:
        for obj in ordered:
            jf = by_key[obj.rel_path]
            why = ParkReason(None, incomplete_reason(verdict), obj.sop_instance_uid)
            if is_unchanged(jf) and applier.refused(jf, why, stamp):
                result.parked += 1
        return result
    if ordered:
        logger.info(
            "BATCH-READY group=%s files=%d objects=%d target=%s@%s:%d%s",
            label,
            len(job.files),
            len(ordered),
            config.target_aet,
            config.target_ip,
            config.target_port,
            suffix,
        )

    destination = f"{config.target_aet}@{config.target_ip}:{config.target_port}"
    last_result = [time.monotonic()]  # per-object duration for the ledger
    counts = dict(refusals or {})
    decided: set[PurePosixPath] = set()
    emptied: set[Path] = set()  # folders of deleted files: pruned once, at the end
    stage_sent = [0]  # objects acknowledged in the current stage
    guard = threading.Lock()  # lanes of one stage report from several threads
    unlogged: list[tuple[JobFile, ObjectInfo, int, float]] = []  # SENT, line not yet written

    def log_sent() -> None:
        """Write the ``SENT`` lines (and ledger events) of the acknowledged, deleted files."""
        with guard:
            batch = unlogged[:]
            unlogged.clear()
        for jf, obj, status, took_ms in batch:
            logger.info(
                "SENT group=%s file=%s sop_instance_uid=%s status=0x%04X%s",
                label,
                jf.display,
                obj.sop_instance_uid,
                status,
                suffix,
                extra=ledger_extra(
                    EventKind.FORWARDED,
                    sop_uid=obj.sop_instance_uid or None,
                    series_uid=obj.series_instance_uid or None,
                    study_uid=obj.study_instance_uid or None,
                    path=str(jf.path),
                    destination=destination,
                    status=f"0x{status:04X}",
                    duration_ms=took_ms,
                ),
            )

    # a transient refusal whose meaning the next answer of the target decides
    pending: tuple[ObjectInfo, int | None, str] | None = None
    # lowest send-order rank of a refused object that is kept (neither acknowledged nor parked)
    unsettled_rank: int | None = None

    def rank(obj: ObjectInfo) -> int:
        return category_rank(obj, config.send_order)

    def refuse(jf: JobFile, obj: ObjectInfo, why: ParkReason) -> bool:
        """Log ``SEND-FAILED`` and park ``jf`` unless it changed; True when it was parked."""
        logger.warning(
            "SEND-FAILED group=%s file=%s sop_instance_uid=%s %s%s",
            label,
            jf.display,
            obj.sop_instance_uid,
            why.describe(),
            suffix,
            extra=ledger_extra(
                EventKind.FORWARD_REFUSED,
                sop_uid=obj.sop_instance_uid or None,
                path=str(jf.path),
                destination=destination,
                status=f"0x{why.status:04X}" if why.status is not None else None,
                reason=why.describe(),
            ),
        )
        if is_unchanged(jf) and applier.refused(jf, why, stamp):
            result.parked += 1
            counts.pop(jf.display, None)
            return True
        return False

    def settle(obj: ObjectInfo, status: int | None, reason: str, singled_out: bool | None) -> None:
        """Apply the verdict on a transient refusal (see :func:`judge_refusal`)."""
        nonlocal unsettled_rank
        jf = by_key[obj.rel_path]
        verdict, count = judge_refusal(
            counts.get(jf.display, 0), singled_out, config.max_object_refusals
        )
        if verdict is RefusalVerdict.TARGET_WIDE:
            # like network trouble: the group is retried with backoff
            result.network_error = result.network_error or reason
        else:
            counts[jf.display] = count
            result.deferred += 1
        if verdict is RefusalVerdict.PARK:
            why = ParkReason(
                status,
                f"refused {count} time(s) while the target accepted other objects "
                f"(max_object_refusals={config.max_object_refusals}): {reason}",
                obj.sop_instance_uid,
            )
            if refuse(jf, obj, why):
                result.deferred -= 1
                if on_file_done:
                    on_file_done()
                return
        elif verdict is RefusalVerdict.COUNTED:
            logger.warning(
                "DEFERRED group=%s file=%s sop_instance_uid=%s refusal=%d/%d: %s",
                label,
                jf.display,
                obj.sop_instance_uid,
                count,
                config.max_object_refusals,
                reason,
            )
        result.retry.append((jf, obj))  # kept: later kinds wait for it (clinical order)
        here = rank(obj)
        unsettled_rank = here if unsettled_rank is None else min(unsettled_rank, here)

    def resolve(singled_out: bool | None) -> None:
        """Settle the pending refusal, if any."""
        nonlocal pending
        if pending is not None:
            obj, status, reason = pending
            pending = None
            settle(obj, status, reason, singled_out)

    def on_result(obj: ObjectInfo, outcome: SendOutcome, status: int | None, reason: str) -> None:
        nonlocal pending
        jf = by_key[obj.rel_path]
        now = time.monotonic()
        took_ms, last_result[0] = (now - last_result[0]) * 1000, now
        decided.add(obj.rel_path)
        if outcome is SendOutcome.SENT or (outcome is SendOutcome.REFUSED and status is not None):
            resolve(True)  # the target answered another object: the refusal was that object's
        elif outcome is SendOutcome.RETRY:
            resolve(False)  # the target (or the network) fails for everything
        if outcome is SendOutcome.SENT:
            stage_sent[0] += 1
            counts.pop(jf.display, None)
            if not is_unchanged(jf):
                logger.warning(
                    "CHANGED-DURING-SEND group=%s file=%s: kept, will be sent again",
                    label,
                    jf.display,
                )
                result.changed = True
                return
            folder = applier.delivered(jf, obj)
            if folder is not None:
                emptied.add(folder)
            result.sent += 1
            # the SENT line is written while the target works on the next object
            unlogged.append((jf, obj, status if status is not None else 0, took_ms))
        elif outcome is SendOutcome.REFUSED:
            refuse(jf, obj, ParkReason(status, reason, obj.sop_instance_uid))
        elif outcome is SendOutcome.RETRY:
            result.retry.append((jf, obj))
        elif outcome is SendOutcome.DEFERRED:
            resolve(False)
            pending = (obj, status, reason)
            return  # reported when settled
        if on_file_done:
            on_file_done()

    def check(obj: ObjectInfo) -> bool:
        if not is_unchanged(by_key[obj.rel_path]):
            result.changed = True
            logger.info(
                "GROUP-CHANGED group=%s: %s changed, waiting for quiet", label, obj.rel_path
            )
            return False
        if pending is not None and rank(obj) > rank(pending[0]):
            resolve(None)  # nothing else of its kind is left to tell
        if unsettled_rank is not None and rank(obj) > unsettled_rank:
            # clinical order: nothing of a later kind before the earlier objects are
            # acknowledged or parked
            result.held = True
            logger.info(
                "HELD group=%s: %s waits until the object(s) the target refused are "
                "delivered or parked",
                label,
                obj.rel_path,
            )
            return False
        return True

    def locate(obj: ObjectInfo) -> Path:
        return by_key[obj.rel_path].path

    def on_result_guarded(
        obj: ObjectInfo, outcome: SendOutcome, status: int | None, reason: str
    ) -> None:
        with guard:
            on_result(obj, outcome, status, reason)

    def check_guarded(obj: ObjectInfo) -> bool:
        with guard:
            return check(obj)

    stages = plan_stages(ordered, config.send_order, max_associations)
    try:
        for n, stage in enumerate(stages):
            if len(stage) > 1:
                logger.debug("STAGE group=%s lanes=%d", label, len(stage))
            stage_sent[0] = 0
            end = run_stage(
                sender, stage, locate, on_result_guarded, check_guarded, should_stop, log_sent
            )
            log_sent()
            if len(stage) > 1:
                # Lanes answer at the same time: an object acknowledged on another lane
                # of this stage shows the target accepts others, whether its answer
                # came before or after the transient refusal.
                resolve(True if stage_sent[0] else None)
            if end.network_error is not None:
                result.network_error = end.network_error
                for obj in end.untried:
                    result.retry.append((by_key[obj.rel_path], obj))
                for later in stages[n + 1 :]:
                    for lane in later:
                        for objects, _ in lane:
                            for obj in objects:
                                result.retry.append((by_key[obj.rel_path], obj))
                break
            if end.stopped:
                result.stopped = not result.changed and not result.held
                break
    finally:
        log_sent()
        for folder in sorted(emptied, key=lambda f: len(f.parts), reverse=True):
            remove_empty_folders(folder, job.prune_root)
    resolve(None)
    if result.held:
        kept = {id(jf) for jf, _ in result.retry}
        for obj in ordered:
            jf = by_key[obj.rel_path]
            if obj.rel_path not in decided and id(jf) not in kept:
                result.retry.append((jf, obj))
    result.refusals = {
        jf.display: counts[jf.display] for jf, _ in result.retry if jf.display in counts
    }
    if result.network_error:
        logger.warning(
            "SEND-FAILED group=%s: %s (%d file(s) kept for retry)%s",
            label,
            result.network_error,
            len(result.retry),
            suffix,
        )
    return result


def park_job_file(
    job: GroupJob,
    jf: JobFile,
    why: ParkReason,
    stamp: str,
    destination: str = "",
    copy: bool = False,
) -> bool:
    """Park ``jf`` of ``job`` under ``failed/[<destination>/]`` with ``why``; True when parked.

    ``copy`` keeps the original (other destinations still need it).
    """
    return (
        park_file(
            jf.path,
            park_root=job.park_root,
            group=job.key,
            inside=jf.inside,
            display=jf.display,
            stamp=stamp,
            why=why,
            wall_time=time.time(),
            prune_root=job.prune_root,
            destination=destination,
            copy=copy,
        )
        is not None
    )
