"""What one running gateway holds, and how a new config replaces the old.

The config and the callers built from it travel together in a frozen
``Snapshot``; a reload swaps the whole snapshot in one assignment, so a
request that picked up the old one finishes with it. The cache, the upstream
client and the budgets outlive reloads. The redactor only ever learns
secrets: a rotated-out token stays redacted for the life of the process.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.api.auth import CallerDirectory
from gateway.cache.batch_cache import BatchCache
from gateway.cache.refresher import Freshness, Refresher
from gateway.cache.store import MemoryStore
from gateway.cache.waiting import Waiters
from gateway.config import GatewayConfig, RateLimit
from gateway.errors import RedisDown
from gateway.ops.logs import AccessLog, Redactor, set_level
from gateway.ops.metrics import Metrics
from gateway.records.base import Records
from gateway.records.redis import RedisRecords
from gateway.records.sqlite import SqliteRecords
from gateway.replicas.link import PAUSED, RedisLink
from gateway.replicas.shared_budget import SharedBudget, SharedCallerLimits
from gateway.replicas.shared_cache import LOCK_MARGIN_S, SharedCache
from gateway.upstream.client import UpstreamClient
from gateway.upstream.guards import Clock, TokenBucket

# How long past upstream.timeout_s a create may hold its Idempotency-Key: its
# search for an earlier try's batch and the create each take up to one timeout.
CLAIM_MARGIN_S = 5.0


def records_for(config: GatewayConfig, link: RedisLink | None) -> Records:
    """Ownership and idempotency records: on Redis with the replicas (DESIGN §10), else in ``store.path``."""
    lease_s = 2 * config.upstream.timeout_s + CLAIM_MARGIN_S
    if link is not None:
        return RedisRecords(link, config.batches.idempotency_ttl_s, lease_s)
    return SqliteRecords(config.store.path, config.batches.idempotency_ttl_s, lease_s=lease_s)


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: GatewayConfig
    callers: CallerDirectory


@dataclass
class GatewayState:
    snapshot: Snapshot
    upstream: UpstreamClient
    cache: BatchCache
    metrics: Metrics
    redact: Redactor
    records: Records
    waiters: Waiters
    freshness: Freshness
    refresher: Refresher
    clock: Clock = time.monotonic
    # The shared tier (DESIGN §10), when redis.url is set.
    redis: RedisLink | None = None
    access_log: AccessLog = field(default_factory=AccessLog)
    # Each caller's own rate_limit: in this process, and with redis.url one bucket in Redis for every process.
    caller_buckets: dict[str, TokenBucket] = field(default_factory=dict)
    shared_caller_limits: SharedCallerLimits | None = None
    # Prometheus children by label values (bounded: callers x routes x statuses x cache states).
    metric_children: dict[object, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls, config: GatewayConfig, redact: Redactor | None = None, clock: Clock = time.monotonic
    ) -> GatewayState:
        metrics = Metrics()
        link = RedisLink(config.redis, metrics, processes=config.server.workers) if config.redis.url else None
        store = MemoryStore(
            config.cache.max_entries, clock, on_remove=lambda reason, n: metrics.cache_removals.labels(reason).inc(n)
        )
        metrics.cache_entries.set_function(lambda: len(store))
        cache = BatchCache(store, config.cache, clock, on_join=metrics.coalesced.inc)
        metrics.inflight.set_function(lambda: len(cache.flights))
        waiters, freshness = Waiters(), Freshness(clock)
        upstream = UpstreamClient(config.upstream, metrics, clock)
        refresher = Refresher(cache, waiters, clock, upstream.refresh_wait_s, upstream.flight_wait_s)
        cache.on_change = waiters.changed
        cache.on_regression = metrics.regressions.inc
        cache.on_active = freshness.note_active
        cache.on_terminal = freshness.forget
        cache.stretch = lambda: freshness.stretch(
            cache.settings.ttl_s, upstream.settings.rate_limit.requests_per_s, refresher.batches
        )
        metrics.waiters.set_function(lambda: waiters.total)
        metrics.followed_batches.set_function(lambda: freshness.followed(cache.settings.ttl_s))
        metrics.refresh_interval.labels("polled").set_function(
            lambda: cache.active_interval_s(cache.settings.ttl_s.active)
        )
        metrics.refresh_interval.labels("waited").set_function(
            lambda: cache.active_interval_s(cache.settings.ttl_s.active_min)
        )
        state = cls(
            snapshot=Snapshot(config, CallerDirectory(config.callers)),
            upstream=upstream,
            cache=cache,
            metrics=metrics,
            redact=redact or Redactor(),
            records=records_for(config, link),
            waiters=waiters,
            freshness=freshness,
            refresher=refresher,
            clock=clock,
            redis=link,
        )
        state.redact.update(config.secrets)
        if link is not None:
            state.share_through(link)
        return state

    def share_through(self, link: RedisLink) -> None:
        """Put Redis behind the cache, the budget and the pause, and hear what other processes do (DESIGN §10)."""
        shared_cache = SharedCache(link, self.clock, lambda: self.snapshot.config.upstream.timeout_s + LOCK_MARGIN_S)
        self.cache.shared = shared_cache
        self.upstream.shared = SharedBudget(link, self.clock)
        self.shared_caller_limits = SharedCallerLimits(link)
        flights = link.metrics.flights
        self.cache.on_shared = lambda role: flights.labels(role.value).inc()

        def heard(kind: str, batch_id: str, payload: bytes) -> None:
            if kind == PAUSED:
                with contextlib.suppress(ValueError):
                    self.upstream.hold(float(payload))
                return
            self.cache.heard(kind, batch_id, payload)
            shared_cache.heard(kind, batch_id, payload)

        link.subscribe(heard)

    def apply(self, config: GatewayConfig) -> None:
        """Swap in a validated config.

        ``cache.max_entries``, ``server``, ``store``, ``batches`` and ``redis`` keep their start-up values.
        """
        self.redact.update(config.secrets)
        if config.logging.level != self.snapshot.config.logging.level:
            set_level(config.logging.level)
        self.upstream.reconfigure(config.upstream)
        self.cache.settings = config.cache
        # A caller that keeps its limit keeps its bucket (reconfigured on its next use).
        limited = {c.name for c in config.callers if c.rate_limit is not None}
        for name in list(self.caller_buckets):
            if name not in limited:
                del self.caller_buckets[name]
        self.snapshot = Snapshot(config, CallerDirectory(config.callers))

    def caller_bucket(self, name: str, limit: RateLimit, shares: int = 1) -> TokenBucket:
        """The caller's bucket in this process: its whole limit, or its share of it (``shares`` processes)."""
        rate, burst = limit.requests_per_s / shares, max(1, limit.burst // shares)
        bucket = self.caller_buckets.get(name)
        if bucket is None:
            bucket = self.caller_buckets[name] = TokenBucket(rate, burst, self.clock)
        elif (bucket.rate, bucket.burst) != (rate, burst):
            bucket.reconfigure(rate, burst)  # a reload, or Redis lost or regained: no fresh burst
        return bucket

    async def take_caller_token(self, name: str, limit: RateLimit) -> float:
        """0 with a token of caller ``name``'s ``rate_limit`` taken, else the seconds until one is due.

        With redis.url, one bucket in Redis for every process (DESIGN §7, §10).
        While Redis is lost, or fails this call, this process takes its share:
        the rate (and burst) divided by the processes last seen alive, as the
        upstream budget does, so N processes never give a caller N limits.
        """
        shared = self.shared_caller_limits
        if shared is None:
            return self.caller_bucket(name, limit).try_take()
        if shared.link.usable:
            with contextlib.suppress(RedisDown):
                return await shared.take(name, limit.requests_per_s, limit.burst)
        return self.caller_bucket(name, limit, shares=shared.link.alive).try_take()
