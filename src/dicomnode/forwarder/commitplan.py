"""Pure decisions of the forwarder's storage commitment (SCU side): what a report or a silence means.

A batch of held files (:class:`~dicomnode.awaiting.Record`) waits for the
destination's report. :func:`judge_report` splits it by a report: committed
files are deleted; a file not committed (in the Failed SOP Sequence, or left
out of the report) is sent again (from where it is held, to that destination
only) until it has been sent ``commitment_max_attempts`` times, then parked
with the reason.
:func:`next_step` decides when to (re)send the N-ACTION and when to give
up: no report within ``commitment_timeout_s`` of an accepted request is
treated like a network failure, the request is made again (new Transaction
UID; a late report to an earlier one still counts) until
``commitment_max_attempts`` requests went unanswered (or ``give_up_after_s``
passed since the first silence), then the batch is parked; a request that cannot be sent is retried with the forwarder's
backoff and parked after ``give_up_after_s``; so is a file that cannot be
sent again. No clock, no files.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from dicomnode.awaiting import HeldFile, Record

#: Failure Reasons of a storage commitment report (PS3.4 C.14.1.1, J.3.3.1.1).
FAILURE_REASONS: Final = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


def describe_reason(reason: int) -> str:
    """Return ``0x0112 no such object instance`` style text for a Failure Reason."""
    return f"0x{reason:04X} {FAILURE_REASONS.get(reason, 'failure')}"


@dataclass(frozen=True, slots=True)
class ReportVerdict:
    """What a report means for each held file of its batch.

    Attributes
    ----------
    committed : tuple of HeldFile
        Committed: delete.
    resend : tuple of (HeldFile, str)
        Not committed, attempts left: send again (with why).
    park : tuple of (HeldFile, str)
        Not committed, attempts used up: park (with why).
    """

    committed: tuple[HeldFile, ...]
    resend: tuple[tuple[HeldFile, str], ...]
    park: tuple[tuple[HeldFile, str], ...]

    @property
    def failed(self) -> int:
        """Return how many files were not committed."""
        return len(self.resend) + len(self.park)


def judge_report(
    record: Record,
    committed: tuple[tuple[str, str], ...],
    failed: tuple[tuple[str, str, int], ...],
    max_attempts: int,
) -> ReportVerdict:
    """Split ``record``'s files by a report (instances matched by SOP Instance UID).

    An instance both committed and failed counts as failed; one the report
    does not name at all is failed ("left out of the report").
    """
    done = {instance for _, instance in committed}
    reasons = {instance: reason for _, instance, reason in failed}
    ok: list[HeldFile] = []
    resend: list[tuple[HeldFile, str]] = []
    park: list[tuple[HeldFile, str]] = []
    for held in record.files:
        if held.sop_instance in reasons:
            why = (
                f"not committed by {record.ae_title}: {describe_reason(reasons[held.sop_instance])}"
            )
        elif held.sop_instance in done:
            ok.append(held)
            continue
        else:
            why = f"not committed by {record.ae_title}: left out of its report"
        if held.sends >= max_attempts:
            park.append(
                (
                    held,
                    f"{why}; sent {held.sends} time(s) (commitment_max_attempts={max_attempts})",
                )
            )
        else:
            resend.append((held, why))
    return ReportVerdict(tuple(ok), tuple(resend), tuple(park))


class Step(enum.Enum):
    """What to do next with a batch."""

    WAIT = "wait"
    RESEND = "resend"
    REQUEST = "request"
    PARK = "park"


@dataclass(frozen=True, slots=True)
class Next:
    """The next step of a batch and when (wall-clock seconds), with why for PARK/REQUEST."""

    step: Step
    at: float
    reason: str = ""


def next_step(
    record: Record,
    now: float,
    timeout_s: float,
    max_attempts: int,
    give_up_after_s: float,
) -> Next:
    """Decide the next step of a batch waiting for its report.

    Parameters
    ----------
    record : Record
        The batch.
    now : float
        Wall-clock time.
    timeout_s : float
        ``commitment_timeout_s`` of the destination.
    max_attempts : int
        ``commitment_max_attempts``: accepted requests left unanswered before parking.
    give_up_after_s : float
        The forwarder's limit for network trouble (from the first failed request).
    """
    first = Step.RESEND if any(f.resend for f in record.files) else Step.REQUEST
    if record.failures:
        if now - record.first_failure >= give_up_after_s:
            return Next(
                Step.PARK,
                now,
                f"network trouble with {record.ae_title} for {now - record.first_failure:.0f} s "
                f"over {record.failures} attempt(s) (give_up_after_s={give_up_after_s:g}): "
                f"{record.last_error}",
            )
        return Next(first, record.next_attempt, record.last_error)
    if record.requests == 0:
        return Next(first, record.next_attempt, "")
    deadline = record.requested_at + timeout_s
    if now < deadline:
        return Next(Step.WAIT, deadline)
    silence = f"no storage commitment report from {record.ae_title} within {timeout_s:g} s"
    if record.requests >= max_attempts:
        return Next(
            Step.PARK,
            now,
            f"{silence} of each of {record.requests} request(s) "
            f"(commitment_max_attempts={max_attempts})",
        )
    if record.first_silence and now - record.first_silence >= give_up_after_s:
        return Next(
            Step.PARK,
            now,
            f"{silence} of each of {record.requests} request(s) over "
            f"{now - record.first_silence:.0f} s (give_up_after_s={give_up_after_s:g})",
        )
    return Next(Step.REQUEST, now, f"{silence}; asking again")
