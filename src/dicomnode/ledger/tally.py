"""Pure derivation of the Prometheus counters from ledger events.

Every event row that counts for a metric yields increments here; the writer
adds them to the ``counters`` table in the same transaction as the event, so
counters survive restarts and retention, and are correct with a receiver
process pool (every process's events reach the one writer). No I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any, Final

from dicomnode.ledger.events import EventKind

#: Upper bounds (seconds) of the ``dicomnode_store_duration_seconds`` buckets.
STORE_DURATION_BUCKETS_S: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

Labels = tuple[tuple[str, str], ...]
Increment = tuple[str, Labels, float]


def _le(bound: float) -> str:
    return repr(bound) if bound != float("inf") else "+Inf"


_BUCKET_LABELS: Final = tuple((("le", _le(b)),) for b in (*STORE_DURATION_BUCKETS_S, float("inf")))


def counter_increments(row: Mapping[str, Any]) -> list[Increment]:
    """Return ``(counter name, labels, amount)`` for one event row.

    Names are the metric names without the ``dicomnode_`` prefix and ``_total``
    suffix; the histogram keeps ``store_duration_seconds_bucket`` per ``le`` *not*
    cumulative (one increment per event: the smallest bound that holds it; the
    exposition adds them up) and ``store_duration_seconds_sum``.
    """
    kind = row.get("kind")
    out: list[Increment] = []
    if kind == EventKind.STORED.value:
        out.append(("received_objects", (("calling_ae", str(row.get("calling_ae") or "")),), 1.0))
        ms = row.get("duration_ms")
        if ms is not None:
            seconds = float(ms) / 1000.0
            index = bisect.bisect_left(STORE_DURATION_BUCKETS_S, seconds)
            out.append(("store_duration_seconds_bucket", _BUCKET_LABELS[index], 1.0))
            out.append(("store_duration_seconds_sum", (), seconds))
    elif kind == EventKind.STORE_REFUSED.value:
        out.append(("store_failures", (("status", str(row.get("status") or "")),), 1.0))
    elif kind == EventKind.ASSOCIATION_REJECTED.value:
        # a summary of rate-limited refusal lines stands for ``size`` rejections
        amount = float(row.get("size") or 1)
        out.append(("rejected_associations", (("reason", str(row.get("status") or "")),), amount))
    elif kind == EventKind.FORWARDED.value:
        out.append(
            ("forwarded_objects", (("destination", str(row.get("destination") or "")),), 1.0)
        )
    elif kind == EventKind.FORWARD_REFUSED.value:
        labels = (("destination", str(row.get("destination") or "")), ("kind", "refused"))
        out.append(("forward_failures", labels, 1.0))
    elif kind == EventKind.RETRIED.value:
        labels = (("destination", str(row.get("destination") or "")), ("kind", "network"))
        out.append(("forward_failures", labels, 1.0))
    elif kind == EventKind.SKIPPED_DUPLICATE.value:
        out.append(
            ("skipped_duplicates", (("destination", str(row.get("destination") or "")),), 1.0)
        )
    elif kind == EventKind.PARKED.value:
        out.append(("parked_objects", (), 1.0))
    return out


def bucket_bounds() -> list[str]:
    """Return the ``le`` label values of the histogram, ``+Inf`` last."""
    return [_le(b) for b in (*STORE_DURATION_BUCKETS_S, float("inf"))]
