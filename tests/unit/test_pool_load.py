"""SharedLoad: how a receiver pool shares out new connections and counts associations."""

from __future__ import annotations

import multiprocessing

from dicomnode.receiver.admission import SharedLoad


def test_pool_load_counts_connections_still_negotiating_when_sharing_out() -> None:
    counts = multiprocessing.Array("i", 2)
    negotiating = multiprocessing.Array("i", 2, lock=False)
    first, second = SharedLoad(counts, 0, negotiating), SharedLoad(counts, 1, negotiating)
    assert first.may_accept(0, 0)
    assert not first.may_accept(0, 1)  # one negotiating here, none there: leave it
    assert second.may_accept(0, 0)
    assert second.may_accept(0, 1)
    assert first.may_accept(0, 1)  # even again
    # max_associations counts admitted associations only, never those negotiating.
    assert first.admit(1, 2) and list(counts) == [1, 0]
    assert not second.admit(2, 2)


def test_pool_load_without_negotiating_slots_weighs_admitted_associations() -> None:
    counts = multiprocessing.Array("i", 2)
    first, second = SharedLoad(counts, 0), SharedLoad(counts, 1)
    assert not second.may_accept(1)
    assert first.may_accept(0, 3)  # nothing to weigh the three negotiating against
    assert second.may_accept(0)
