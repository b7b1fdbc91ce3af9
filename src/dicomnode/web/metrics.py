"""``/metrics``: Prometheus text exposition through ``prometheus_client``.

Counters and the store-duration histogram come from the ledger writer's
counters (persisted with the events, so they survive restarts and include every
receiver process); gauges are read at scrape time from the node and the disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dicomnode.ledger.tally import Labels, bucket_bounds

#: Counter name (ledger) -> (metric name without ``_total``, help, label names).
_COUNTERS = {
    "received_objects": (
        "dicomnode_received_objects",
        "Objects stored and acknowledged, by calling AE title.",
        ("calling_ae",),
    ),
    "store_failures": (
        "dicomnode_store_failures",
        "C-STORE requests answered with a failure status, by status.",
        ("status",),
    ),
    "rejected_associations": (
        "dicomnode_rejected_associations",
        "Association requests rejected, by reason.",
        ("reason",),
    ),
    "forwarded_objects": (
        "dicomnode_forwarded_objects",
        "Objects the target acknowledged, by destination.",
        ("destination",),
    ),
    "forward_failures": (
        "dicomnode_forward_failures",
        "Forwarding failures by destination and kind (refused object, network attempt).",
        ("destination", "kind"),
    ),
    "parked_objects": ("dicomnode_parked_objects", "Files parked in failed/.", ()),
    "skipped_duplicates": (
        "dicomnode_skipped_duplicates",
        "Objects not sent again because the destination acknowledged the same object "
        "(SOP Instance UID and content) within duplicate_window_s, by destination.",
        ("destination",),
    ),
}


@dataclass(frozen=True, slots=True)
class DestinationGauge:
    """Per-destination state read at scrape time (label: the destination's ``AE@host:port``)."""

    awaiting_files: int
    sending_groups: int
    backing_off_groups: int
    parked_files: int


@dataclass(frozen=True, slots=True)
class Gauges:
    """Values read at scrape time."""

    forward_pending_files: int
    parked_files: int
    disk_free_bytes: dict[str, int]
    active_associations: int
    ledger_available: bool
    awaiting_commitment: dict[str, int] = field(default_factory=dict)
    destinations: dict[str, DestinationGauge] = field(default_factory=dict)


class NodeCollector(Collector):
    """Yield the node's metrics from ``counters()`` and ``gauges()`` at each scrape."""

    def __init__(
        self,
        counters: Callable[[], dict[tuple[str, Labels], float]],
        gauges: Callable[[], Gauges],
    ) -> None:
        self._counters = counters
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        """Return the metric families (called by ``generate_latest``)."""
        values = self._counters()
        families: dict[str, CounterMetricFamily] = {}
        for key, (name, doc, names) in _COUNTERS.items():
            families[key] = CounterMetricFamily(name, doc, labels=list(names))
        for (key, labels), value in sorted(values.items()):
            family = families.get(key)
            if family is not None:
                family.add_metric([v for _, v in labels], value)
        # Series that exist without labels start at 0.
        for key in ("parked_objects",):
            if not any(k == key for k, _ in values):
                families[key].add_metric([], 0.0)
        yield from families.values()
        buckets = []
        cumulative = 0.0
        for le in bucket_bounds():  # stored per bucket, exposed cumulative
            cumulative += values.get(("store_duration_seconds_bucket", (("le", le),)), 0.0)
            buckets.append((le, cumulative))
        yield HistogramMetricFamily(
            "dicomnode_store_duration_seconds",
            "Time from the C-STORE request to the object being durable (filed).",
            buckets=buckets,
            sum_value=values.get(("store_duration_seconds_sum", ()), 0.0),
        )
        g = self._gauges()
        yield GaugeMetricFamily(
            "dicomnode_forward_pending_files",
            "Files waiting in the watch folder.",
            value=g.forward_pending_files,
        )
        yield GaugeMetricFamily(
            "dicomnode_parked_files", "Files parked in failed/ now.", value=g.parked_files
        )
        per_destination = (
            (
                "awaiting_files",
                "dicomnode_forward_awaiting_files",
                "Files a destination still needs.",
            ),
            (
                "sending_groups",
                "dicomnode_forward_sending_groups",
                "Groups being sent to a destination.",
            ),
            (
                "backing_off_groups",
                "dicomnode_forward_backing_off_groups",
                "Groups waiting to retry a destination after a network failure.",
            ),
            (
                "parked_files",
                "dicomnode_forward_parked_files",
                "Copies parked under failed/<destination>/ now.",
            ),
        )
        for attr, name, doc in per_destination:
            gauge_family = GaugeMetricFamily(name, doc, labels=["destination"])
            for dest, gauge in sorted(g.destinations.items()):
                gauge_family.add_metric([dest], getattr(gauge, attr))
            yield gauge_family
        disk = GaugeMetricFamily(
            "dicomnode_disk_free_bytes", "Free space of a data folder's volume.", labels=["path"]
        )
        for path, free in sorted(g.disk_free_bytes.items()):
            disk.add_metric([path], free)
        yield disk
        yield GaugeMetricFamily(
            "dicomnode_active_associations",
            "Associations being served now (all receiver processes).",
            value=g.active_associations,
        )
        awaiting = GaugeMetricFamily(
            "dicomnode_awaiting_commitment_files",
            "Files a destination acknowledged, held until it reports them committed.",
            labels=["destination"],
        )
        for name, files in sorted(g.awaiting_commitment.items()):
            awaiting.add_metric([name], files)
        yield awaiting
        yield GaugeMetricFamily(
            "dicomnode_ledger_available",
            "1 while the ledger can be written.",
            value=1 if g.ledger_available else 0,
        )


def exposition(collector: NodeCollector) -> bytes:
    """Return the Prometheus text exposition of ``collector``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
