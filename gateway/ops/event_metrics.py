"""The event log's collectors (docs/design.md §12, "Metrics"): followed subjects, events by type, open streams."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class EventMetrics:
    """Named as the metric table of docs/observability.md."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.followed = Gauge(
            "gateway_events_followed",
            "Batches (or datasets) followed for events: seen active, not yet seen final.",
            ["kind"],
            registry=r,
        )
        self.events = Counter(
            "gateway_events",
            "Events appended to the log by this process, by type (batch.completed, ...).",
            ["type"],
            registry=r,
        )
        self.sightings_lost = Counter(
            "gateway_event_sightings_lost",
            "Sightings not recorded, by reason: store (the store failed), full (the queue was full).",
            ["reason"],
            registry=r,
        )
        self.streams = Gauge("gateway_event_streams", "Event streams (text/event-stream) open now.", registry=r)
        self.feed_waits = Gauge(
            "gateway_event_feed_waits", "Feed requests held by Prefer: wait for an event.", registry=r
        )
