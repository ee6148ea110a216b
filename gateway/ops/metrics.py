"""Prometheus collectors for the gateway, on a registry of the app's own.

A registry per app (not the global one) lets tests and the benchmark run
several gateways in one process. Labels are bounded: caller names come from
config, routes from the router, statuses and outcomes from small sets;
never a batch id.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from gateway import __version__
from gateway.ops.batching import BATCH_WITHIN_S, FlushSoon
from gateway.ops.dataset_metrics import DatasetMetrics
from gateway.ops.download_metrics import DownloadMetrics
from gateway.ops.event_metrics import EventMetrics
from gateway.ops.usage_metrics import UsageMetrics
from gateway.ops.webhook_metrics import WebhookMetrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every collector the gateway exports, named as the metric table of docs/observability.md."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The collectors by family; each is an attribute named for what it counts.
        self._requests(self.registry)
        self._upstream(self.registry)
        self._cache(self.registry)
        self._records(self.registry)
        self._waiting(self.registry)
        self._process(self.registry)
        self.downloads = DownloadMetrics(self.registry)
        self.datasets = DatasetMetrics(self.registry)
        self.events = EventMetrics(self.registry)
        self.webhooks = WebhookMetrics(self.registry)
        self.redis: RedisMetrics | None = None
        self.usage = UsageMetrics(self.registry)
        self.tally = Tally()

    def _requests(self, r: CollectorRegistry) -> None:
        """What callers asked and were answered."""
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by caller, route, status and cache result.",
            ["caller", "route", "status", "cache"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time to answer a request, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.caller_rejections = Counter(
            "gateway_caller_rate_limited",
            "Requests refused for being over the caller's own limit.",
            ["caller"],
            registry=r,
        )

    def _upstream(self, r: CollectorRegistry) -> None:
        """Calls to the upstream, and the guards (budget, pause, breaker) that hold them back."""
        self.upstream_calls = Counter(
            "gateway_upstream_calls",
            "HTTP calls made to the upstream (each retry is one), by outcome: an HTTP status or an error code.",
            ["outcome"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "gateway_upstream_duration_seconds",
            "Latency of one upstream HTTP call.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter("gateway_upstream_retries", "Upstream calls that were retries.", registry=r)
        self.upstream_rejected = Counter(
            "gateway_upstream_rejected",
            "Upstream calls not made, by reason: budget, paused (after an upstream 429/503), breaker_open.",
            ["reason"],
            registry=r,
        )
        self.upstream_pauses = Counter(
            "gateway_upstream_pauses",
            "Times the upstream asked the gateway to pause (429, or 503 with Retry-After).",
            registry=r,
        )
        self.budget_tokens = Gauge("gateway_upstream_budget_tokens", "Tokens left in the upstream budget.", registry=r)
        self.breaker_state = Gauge(
            "gateway_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open.", registry=r
        )
        self.paused_seconds = Gauge(
            "gateway_upstream_paused_seconds", "Seconds left before upstream calls resume.", registry=r
        )
        self.regressions = Counter(
            "gateway_upstream_regressions",
            "Upstream answers older than the one held (earlier updated_at, or active after terminal): not stored.",
            registry=r,
        )

    def _cache(self, r: CollectorRegistry) -> None:
        """The answer cache and single-flight."""
        self.cache_entries = Gauge("gateway_cache_entries", "Entries in the answer cache.", registry=r)
        self.cache_removals = Counter(
            "gateway_cache_removals",
            "Entries removed from the cache: evicted (for room, at max_entries) or expired.",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "gateway_singleflight_inflight", "Upstream fetches in flight (one per batch id).", registry=r
        )
        self.coalesced = Counter(
            "gateway_singleflight_coalesced", "Requests that waited on another request's upstream fetch.", registry=r
        )

    def _records(self, r: CollectorRegistry) -> None:
        """The ownership and idempotency records."""
        self.store_write_failures = Counter(
            "gateway_store_write_failures",
            "Records the store could not write: a new batch's owner, an idempotent create's outcome.",
            registry=r,
        )
        self.idempotency = Counter(
            "gateway_idempotency_keys",
            "Creates with an Idempotency-Key, by what the store said: new, replayed, in_use, reused.",
            ["outcome"],
            registry=r,
        )

    def _waiting(self, r: CollectorRegistry) -> None:
        """Prefer: wait, and how often active batches are refreshed."""
        self.waiters = Gauge("gateway_waiters", "Requests held by Prefer: wait until their batch changes.", registry=r)
        self.waits_ended = Counter(
            "gateway_waits_ended",
            "Prefer: wait requests answered, by why: changed, timeout, gone (the client left), shutdown,"
            " limit (past cache.max_waiters, answered at once), caller_limit (past the caller's"
            " cache.max_waiters_per_caller, answered at once).",
            ["reason"],
            registry=r,
        )
        self.refresh_interval = Gauge(
            "gateway_refresh_interval_seconds",
            "The refresh interval of an active batch now, by state: polled, or waited (on by Prefer: wait);"
            " it stretches when the upstream budget is short.",
            ["state"],
            registry=r,
        )
        self.followed_batches = Gauge(
            "gateway_followed_batches", "Active batches polled or waited on lately (sharing the budget).", registry=r
        )

    def _process(self, r: CollectorRegistry) -> None:
        """This gateway itself: its config reloads and its build."""
        self.reloads = Counter(
            "gateway_config_reloads", "Config reloads, by result: ok or error.", ["result"], registry=r
        )
        self.last_reload_ok = Gauge(
            "gateway_config_last_reload_success", "1 if the last reload succeeded (or none was tried).", registry=r
        )
        self.last_reload_ok.set(1)
        self.build_info = Gauge(
            "gateway_build_info",
            "Always 1; the labels say which gateway this is: its version and the Python running it.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)

    def track_redis(self) -> RedisMetrics:
        """The shared tier's collectors (docs/design.md §10), registered only when ``redis.url`` is set."""
        if self.redis is None:
            self.redis = RedisMetrics(self.registry)
        return self.redis

    def render(self) -> bytes:
        self.tally.flush()  # every request answered so far is in the scrape
        return generate_latest(self.registry)


class Tally:
    """Requests counted and timed as they are answered, added to their collectors together within ``BATCH_WITHIN_S``.

    prometheus_client takes a lock for each ``inc`` and ``observe`` (three a
    request: the count, the histogram's sum and its bucket), which cost as
    much as the rest of a cache hit's bookkeeping. The requests of a batch
    are added at once instead: a count, a sum and each bucket once.
    ``Metrics.render`` adds what is pending first, so a scrape holds every
    request answered before it. Outside a running loop they are added at once.
    """

    def __init__(self) -> None:
        self._counts: dict[Any, int] = {}  # a Counter child -> requests
        self._times: dict[Any, list[float]] = {}  # a Histogram child -> the seconds observed
        self._flush_soon = FlushSoon(self.flush, BATCH_WITHIN_S)

    def add(self, counter: Any, histogram: Any, seconds: float | None) -> None:
        """One request: ``counter`` (a Counter child) counts it; ``histogram`` times it unless ``seconds`` is None."""
        counts = self._counts
        counts[counter] = counts.get(counter, 0) + 1
        if seconds is not None:
            times = self._times.get(histogram)
            if times is None:
                times = self._times[histogram] = []
            times.append(seconds)
        self._flush_soon.request()

    def flush(self) -> None:
        self._flush_soon.done()
        counts, self._counts = self._counts, {}
        times, self._times = self._times, {}
        for counter, count in counts.items():
            counter.inc(count)
        for histogram, seconds in times.items():
            observe_all(histogram, seconds)


def observe_all(histogram: Any, seconds: list[float]) -> None:
    """``histogram.observe`` for each of ``seconds``: each bucket and the sum added to once.

    It reads the child's buckets as ``Histogram.observe`` does (a value
    counts in the first bucket whose bound it does not pass); a child made
    otherwise is observed value by value.
    """
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in seconds:
            histogram.observe(value)
        return
    per_bucket: dict[int, int] = {}
    for value in seconds:
        at = bisect_left(bounds, value)
        if at < len(bounds) and value <= bounds[at]:  # NaN passes no bound: observe counts it in no bucket
            per_bucket[at] = per_bucket.get(at, 0) + 1
    total.inc(sum(seconds))
    for at, count in per_bucket.items():
        buckets[at].inc(count)


class RedisMetrics:
    """How this process gets on with the shared Redis; absent from /metrics without ``redis.url``."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.up = Gauge(
            "gateway_redis_up", "1 while Redis answers, 0 while it is lost (each process by itself).", registry=r
        )
        self.transitions = Counter(
            "gateway_redis_transitions",
            "Times Redis was lost or regained, by event: lost, regained.",
            ["event"],
            registry=r,
        )
        self.errors = Counter(
            "gateway_redis_errors",
            "Redis calls that failed or timed out, by operation.",
            ["operation"],
            registry=r,
        )
        self.skipped = Counter(
            "gateway_redis_skipped",
            "Redis calls not tried because Redis is lost (served locally, or refused where the store must answer),"
            " by operation.",
            ["operation"],
            registry=r,
        )
        self.flights = Counter(
            "gateway_shared_flights",
            "Cache misses settled through Redis, by role: led (this process called the upstream), followed"
            " (another process did), adopted (a fresh answer was already in Redis).",
            ["role"],
            registry=r,
        )
        self.processes = Gauge(
            "gateway_processes_alive",
            "Gateway processes last seen alive on this Redis; each takes 1/N of the budget while Redis is lost.",
            registry=r,
        )
