"""``/healthz`` and ``dicomnode status``: the pure health decision.

Healthy means: the receiver (when enabled) listens, every data folder's volume
has more free space than ``min_free_space_mb``, and the forwarder (when enabled)
runs and has no group that has been failing for longer than twice
``retry_max_delay_s``. No I/O: the caller gathers the facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Facts:
    """What the health decision needs.

    Attributes
    ----------
    receiver_listening : bool or None
        None when the receiver is not run.
    disk_free_bytes : mapping of str to int
        Free bytes per data folder.
    guard_bytes : int
        ``min_free_space_mb`` in bytes.
    forwarder_running : bool or None
        None when the forwarder is not run.
    failing_groups : mapping of str to tuple of (float, str)
        Group -> (seconds failing, last error) for groups in retry.
    stuck_after_s : float
        How long a group may fail before the forwarder counts as stuck.
    """

    receiver_listening: bool | None
    disk_free_bytes: Mapping[str, int]
    guard_bytes: int
    forwarder_running: bool | None
    failing_groups: Mapping[str, tuple[float, str]]
    stuck_after_s: float


def assess(facts: Facts) -> list[str]:
    """Return the reasons the node is unhealthy (empty when healthy)."""
    reasons: list[str] = []
    if facts.receiver_listening is False:
        reasons.append("receiver is not listening")
    for path, free in sorted(facts.disk_free_bytes.items()):
        if facts.guard_bytes and free < facts.guard_bytes:
            reasons.append(
                f"free space on {path} is {free // 1_000_000} MB, below min_free_space_mb="
                f"{facts.guard_bytes // 1_000_000}"
            )
    if facts.forwarder_running is False:
        reasons.append("forwarder is not running")
    for group, (seconds, error) in sorted(facts.failing_groups.items()):
        if seconds > facts.stuck_after_s:
            reasons.append(
                f"forwarder stuck: group {group or '(top level)'} failing for {seconds:.0f} s: {error}"
            )
    return reasons
