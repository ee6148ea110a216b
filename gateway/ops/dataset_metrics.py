"""Prometheus collectors of the dataset routes (docs/design.md §11): uploads (and downloads), by caller.

Caller names come from the config and outcomes from a small set (``created``,
``replayed``, or an error code), so the labels stay bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# An upload takes as long as its bytes keep coming: seconds to an hour.
TRANSFER_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class DatasetMetrics:
    """What callers uploaded through the gateway: bytes, time and outcome."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.upload_bytes = Counter(
            "gateway_dataset_upload_bytes",
            "Bytes of upload bodies received from callers (every upload, whatever its outcome), by caller.",
            ["caller"],
            registry=r,
        )
        self.upload_seconds = Histogram(
            "gateway_dataset_upload_duration_seconds",
            "Time from an upload's head to its answer, by caller.",
            ["caller"],
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.uploads = Counter(
            "gateway_dataset_uploads",
            "Uploads answered, by caller and outcome: created, replayed, or the error code.",
            ["caller", "outcome"],
            registry=r,
        )
