"""Run one planned stage of a group: its lanes of associations at the same time.

:func:`run_stage` takes a stage from :func:`~.batching.plan_stages` (lanes that
run at once, each a list of associations run one after another) and runs
lane 0 on the calling thread and every other lane on a thread of its own,
each with its own SCU (the sender's :meth:`~.sender.AssociationSender.helpers`).
It returns when every lane has finished, which is the barrier between send-order
classes. The callbacks are the caller's; they are called from several threads
and must serialise themselves (:func:`~.delivery.send_group` holds one lock).
A lane that meets network trouble stops; the objects of its associations not
yet tried are returned as ``untried``. Opens no files; starts and joins threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.forwarder.batching import AssociationPlan, ObjectInfo
from dicomnode.forwarder.sender import (
    AssociationSender,
    CheckCallback,
    ResultCallback,
    RunEnd,
)


@dataclass(slots=True)
class StageEnd:
    """How one stage ended.

    Attributes
    ----------
    network_error : str or None
        The first network trouble any lane met, or None.
    stopped : bool
        True when a lane ended early (stop requested, a changed file, a hold).
    untried : list of ObjectInfo
        Objects of associations a lane did not start because of network trouble.
    associations : int
        Associations started (for the log).
    """

    network_error: str | None = None
    stopped: bool = False
    untried: list[ObjectInfo] = field(default_factory=list)
    associations: int = 0


def _run_lane(
    sender: AssociationSender,
    lane: Sequence[AssociationPlan],
    locate: Callable[[ObjectInfo], Path],
    on_result: ResultCallback,
    check: CheckCallback,
    should_stop: Callable[[], bool],
    idle: Callable[[], None] | None,
) -> tuple[RunEnd, list[ObjectInfo], int]:
    """Run the associations of one lane in order; return its end, untried objects, runs."""
    runs = 0
    for n, (objects, contexts) in enumerate(lane):
        end = sender.run(locate, objects, contexts, on_result, check, should_stop, idle)
        runs += 1
        if end.network_error is not None:
            return end, [obj for later, _ in lane[n + 1 :] for obj in later], runs
        if end.stopped:
            return end, [], runs
    return RunEnd(), [], runs


def run_stage(
    sender: AssociationSender,
    stage: Sequence[Sequence[AssociationPlan]],
    locate: Callable[[ObjectInfo], Path],
    on_result: ResultCallback,
    check: CheckCallback,
    should_stop: Callable[[], bool],
    idle: Callable[[], None] | None = None,
) -> StageEnd:
    """Run the lanes of ``stage`` at once and wait for all of them.

    Parameters
    ----------
    sender : AssociationSender
        Runs lane 0; ``sender.helpers(n - 1)`` run the others.
    stage : sequence of lanes
        From :func:`~.batching.plan_stages`.
    locate, on_result, check, should_stop, idle
        As for :meth:`~.sender.AssociationSender.run`; called from several threads.

    Returns
    -------
    StageEnd
        Network trouble, stop, untried objects.

    Raises
    ------
    Exception
        What a lane raised (a bug): re-raised after every lane has finished.
    """
    ends: list[tuple[RunEnd, list[ObjectInfo], int] | None] = [None] * len(stage)
    errors: list[BaseException] = []
    senders = [sender, *sender.helpers(len(stage) - 1)] if len(stage) > 1 else [sender]

    def lane_worker(index: int) -> None:
        try:
            ends[index] = _run_lane(
                senders[index], stage[index], locate, on_result, check, should_stop, idle
            )
        except BaseException as exc:  # handed to the calling thread
            errors.append(exc)

    threads = [
        threading.Thread(target=lane_worker, args=(i,), name=f"dicomnode-lane-{i}", daemon=True)
        for i in range(1, len(stage))
    ]
    for thread in threads:
        thread.start()
    lane_worker(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    result = StageEnd()
    for found in ends:
        if found is None:
            continue
        end, untried, runs = found
        result.associations += runs
        result.untried.extend(untried)
        if end.network_error is not None and result.network_error is None:
            result.network_error = end.network_error
        result.stopped = result.stopped or end.stopped
    return result
