"""The collectors of downloads through gateway URLs (docs/design.md §11, docs/observability.md).

Labelled by the caller a URL was given to, once its signature holds (``-``
before: a forged URL's caller name is anyone's to choose, and must not make
series), and by outcome: ``ok``, ``client_gone``, ``storage_failed`` (cut
after the head was sent), or the code of the error answered.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

DOWNLOAD_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)


class DownloadMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.downloads = Counter(
            "gateway_downloads",
            "Requests of download URLs, by the caller named in the URL and outcome.",
            ["caller", "outcome"],
            registry=r,
        )
        self.bytes = Counter(
            "gateway_download_bytes",
            "Bytes of dataset parts sent to callers, by caller.",
            ["caller"],
            registry=r,
        )
        self.seconds = Histogram(
            "gateway_download_duration_seconds",
            "Time from a download URL's request to its last byte sent, by caller.",
            ["caller"],
            buckets=DOWNLOAD_BUCKETS,
            registry=r,
        )

    def observe(self, caller: str, outcome: str, sent: int, seconds: float) -> None:
        self.downloads.labels(caller, outcome).inc()
        if sent:
            self.bytes.labels(caller).inc(sent)
        self.seconds.labels(caller).observe(seconds)
