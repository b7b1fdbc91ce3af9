"""Per-destination delivery state of one file, and the decisions made from it (pure).

Each (file, destination) pair is in one :class:`DeliveryState`. A file is
*settled* - and may leave the watch folder - when every destination it was
routed to is in a final state (:func:`is_settled`). :func:`next_action`
decides, from what the delivery store recorded, whether a destination still
needs the file, already has it (progress before a restart), or has an identical
copy acknowledged within the duplicate window (``SKIPPED-DUPLICATE``).
``ACKNOWLEDGED`` is final here; a destination that asks for storage commitment
will need ``COMMITTED`` instead (:data:`FINAL_STATES` takes that into account
through ``requires_commitment``). Takes values, returns decisions: no I/O, no clock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping


class DeliveryState(str, enum.Enum):
    """Where one file stands with one destination (stored as the value)."""

    #: Not yet delivered (the absence of a record means the same).
    PENDING = "pending"
    #: The destination answered success or warning to the C-STORE.
    ACKNOWLEDGED = "acknowledged"
    #: The destination refused it, or network trouble outlasted give_up_after_s:
    #: a copy is parked under failed/<destination>/.
    REFUSED = "refused"
    #: An identical object (SOP Instance UID and content) was acknowledged within the window.
    DUPLICATE = "duplicate"
    #: Acknowledged and confirmed by storage commitment (for destinations that ask for it).
    COMMITTED = "committed"


class Action(enum.Enum):
    """What to do about one file for one destination."""

    SEND = "send"
    SKIP_DUPLICATE = "skip-duplicate"
    DONE = "done"


def is_final(state: DeliveryState | None, requires_commitment: bool = False) -> bool:
    """Return True when ``state`` needs nothing more from this node for this destination."""
    if state in (DeliveryState.REFUSED, DeliveryState.DUPLICATE, DeliveryState.COMMITTED):
        return True
    return state is DeliveryState.ACKNOWLEDGED and not requires_commitment


def next_action(
    recorded: DeliveryState | None,
    last_acknowledged_at: float | None,
    now: float,
    duplicate_window_s: float,
    requires_commitment: bool = False,
) -> Action:
    """Decide what one destination needs of one file.

    Parameters
    ----------
    recorded : DeliveryState or None
        What the store recorded for this very file (path, size, mtime, checksum)
        and destination; None when nothing.
    last_acknowledged_at : float or None
        Latest time (epoch s) the destination acknowledged an object with the same
        SOP Instance UID and checksum (from any file), or None.
    now : float
        Current wall time (epoch s).
    duplicate_window_s : float
        The window; 0 turns duplicate detection off.
    requires_commitment : bool
        True when only ``COMMITTED`` settles an acknowledged object.

    Returns
    -------
    Action
        ``DONE`` when this file already reached a final state for the
        destination, ``SKIP_DUPLICATE`` when an identical object was acknowledged
        less than ``duplicate_window_s`` ago, else ``SEND``.
    """
    if is_final(recorded, requires_commitment):
        return Action.DONE
    if (
        recorded is None
        and duplicate_window_s > 0
        and last_acknowledged_at is not None
        and 0 <= now - last_acknowledged_at < duplicate_window_s
    ):
        return Action.SKIP_DUPLICATE
    return Action.SEND


def is_settled(
    routed: Iterable[str],
    states: Mapping[str, DeliveryState],
    requires_commitment: frozenset[str] = frozenset(),
) -> bool:
    """Return True when every destination in ``routed`` reached a final state.

    A file routed nowhere is not settled (it is parked by the router instead).
    """
    names = list(routed)
    return bool(names) and all(is_final(states.get(n), n in requires_commitment) for n in names)


def pending_destinations(
    routed: Iterable[str],
    states: Mapping[str, DeliveryState],
    requires_commitment: frozenset[str] = frozenset(),
) -> tuple[str, ...]:
    """Return the destinations of ``routed`` not yet in a final state, in order."""
    return tuple(n for n in routed if not is_final(states.get(n), n in requires_commitment))
