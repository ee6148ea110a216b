"""What one running gateway holds, and how a new config replaces the old.

It is built in one place, ``gateway.runtime.build_state``; the routes reach it
through the Application (``gateway.api.keys.STATE``).

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
from gateway.cache.waiting import Waiters
from gateway.config import GatewayConfig, RateLimit
from gateway.datasets.links import DirectLinks, PartLinks
from gateway.errors import RedisDown
from gateway.events.base import EventLog
from gateway.events.follower import Follower
from gateway.events.sightings import Sightings
from gateway.events.usage import Usage
from gateway.events.webhooks import Webhooks
from gateway.ops.logs import AccessLog, RedactionForms, Redactor, set_level
from gateway.ops.metrics import Metrics
from gateway.records.base import Records
from gateway.replicas.link import RedisLink
from gateway.replicas.shared_budget import SharedCallerLimits
from gateway.upstream.client import UpstreamClient
from gateway.upstream.guards import Clock, TokenBucket


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: GatewayConfig
    callers: CallerDirectory


@dataclass(frozen=True, slots=True)
class Prepared:
    """A reloaded config ready to swap in: its snapshot and the redactor's new forms."""

    snapshot: Snapshot
    redaction: RedactionForms


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
    # The shared tier (docs/design.md §10), when redis.url is set.
    redis: RedisLink | None = None
    access_log: AccessLog = field(default_factory=AccessLog)
    # Each caller's own rate_limit: in this process, and with redis.url one bucket in Redis for every process.
    caller_buckets: dict[str, TokenBucket] = field(default_factory=dict)
    shared_caller_limits: SharedCallerLimits | None = None
    # What part URLs become in dataset answers (docs/design.md §11, "Downloads").
    links: PartLinks = field(default_factory=DirectLinks)
    # The event log (docs/design.md §12), when events.enabled.
    events: EventLog | None = None
    # What answers show, on its way to the event log (gateway.events.sightings), when events.enabled.
    sightings: Sightings | None = None
    # The follower and usage per caller (gateway.events.follower, gateway.events.usage), when events.enabled.
    follower: Follower | None = None
    usage: Usage | None = None
    # Webhook deliveries (docs/design.md §12), when events are on and some caller has a webhook to be.
    webhooks: Webhooks | None = None
    # Prometheus children by label values (bounded: callers x routes x statuses x cache states).
    metric_children: dict[object, Any] = field(default_factory=dict)

    def prepare(self, config: GatewayConfig) -> Prepared:
        """What ``apply`` swaps in for ``config``, built without touching what serves now.

        Safe off the event loop (a reload prepares in a thread): with thousands
        of callers, the key digests and the redactor's finder take tens of
        milliseconds that would otherwise stall every connection.
        """
        snapshot = Snapshot(config, CallerDirectory(config.callers))
        return Prepared(snapshot, self.redact.prepare(config.secrets))

    def apply(self, config: GatewayConfig | Prepared) -> None:
        """Swap in a validated config (prepared, or prepared here).

        ``cache.max_entries``, ``server``, ``store``, ``batches`` and ``redis`` keep their start-up values.
        """
        prepared = config if isinstance(config, Prepared) else self.prepare(config)
        new = prepared.snapshot.config
        self.redact.install(prepared.redaction)
        if new.logging.level != self.snapshot.config.logging.level:
            set_level(new.logging.level)
        self.upstream.reconfigure(new.upstream)
        self.cache.settings = new.cache
        # A caller that keeps its limit keeps its bucket (reconfigured on its next use).
        limited = {c.name for c in new.callers if c.rate_limit is not None}
        for name in list(self.caller_buckets):
            if name not in limited:
                del self.caller_buckets[name]
        self.snapshot = prepared.snapshot
        if self.webhooks is not None:
            self.webhooks.reconfigure(new)

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

        With redis.url, one bucket in Redis for every process (docs/design.md §7, §10).
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
