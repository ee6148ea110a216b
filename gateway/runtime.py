"""The composition root: build everything one running gateway holds, from a config.

Each collaborator is handed to the one that uses it when it is built: the
cache gets its hooks (waiters, the refresh schedule, metrics) and its shared
tier, the upstream client its shared budget. The hooks name objects built
after the cache (the refresher needs the cache), which is why they are
closures: they are only called once everything here exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from gateway.api.auth import CallerDirectory
from gateway.api.dataset_scope import record_outputs
from gateway.api.state import GatewayState, Snapshot
from gateway.cache.batch_cache import BatchCache, CacheHooks
from gateway.cache.entry import CacheEntry, Role
from gateway.cache.refresher import Freshness, Refresher
from gateway.cache.store import MemoryStore
from gateway.cache.waiting import Waiters
from gateway.config import ConfigError, GatewayConfig
from gateway.config.features import EventsSettings
from gateway.datasets.links import DirectLinks, PartLinks
from gateway.datasets.signing import SignedLinks
from gateway.edge.server import RunningGateway
from gateway.events.base import Kind
from gateway.events.follower import Follower
from gateway.events.positions import Positions, RedisPositions, SqlitePositions
from gateway.events.redis import RedisEventLog
from gateway.events.sightings import Sightings
from gateway.events.sqlite import SqliteEventLog
from gateway.events.usage import CountingLog, Usage
from gateway.events.usage_redis import RedisUsage
from gateway.events.usage_sqlite import SqliteUsage
from gateway.events.webhooks import Shared, Webhooks
from gateway.ops.logs import Redactor, log_event
from gateway.ops.metrics import Metrics
from gateway.ops.workers import pid_file
from gateway.records.base import Records
from gateway.records.redis import RedisRecords
from gateway.records.sqlite import SqliteRecords
from gateway.replicas.lease import Lease
from gateway.replicas.link import EVICTED, PAUSED, STORED, RedisLink
from gateway.replicas.shared_budget import SharedBudget, SharedCallerLimits
from gateway.replicas.shared_cache import LOCK_MARGIN_S, SharedCache
from gateway.upstream.client import UpstreamClient
from gateway.upstream.guards import Clock

log = logging.getLogger("gateway")

# How long past upstream.timeout_s a create may hold its Idempotency-Key: its
# search for an earlier try's batch and the create each take up to one timeout.
CLAIM_MARGIN_S = 5.0


def records_for(config: GatewayConfig, link: RedisLink | None) -> Records:
    """Ownership and idempotency records: on Redis with the replicas (docs/design.md §10), else in ``store.path``."""
    lease_s = 2 * config.upstream.timeout_s + CLAIM_MARGIN_S
    if link is not None:
        return RedisRecords(link, config.batches.idempotency_ttl_s, lease_s)
    return SqliteRecords(config.store.path, config.batches.idempotency_ttl_s, lease_s=lease_s)


def links_for(config: GatewayConfig, link: RedisLink | None, current: Callable[[], GatewayConfig]) -> PartLinks:
    """Part URLs in dataset answers (docs/design.md §11): signed gateway URLs, or the upstream's (``direct``).

    The mode is read at start; the TTL and a configured key follow reloads (``current``).
    """
    if config.datasets.downloads == "direct":
        return DirectLinks()
    return SignedLinks(lambda: current().datasets, link)


def build_state(config: GatewayConfig, redact: Redactor | None = None, clock: Clock = time.monotonic) -> GatewayState:
    """Everything a gateway serving ``config`` holds; with ``redis.url``, shared through Redis (§10)."""
    metrics = Metrics()
    link = RedisLink(config.redis, metrics, processes=config.server.workers) if config.redis.url else None
    store = MemoryStore(
        config.cache.max_entries, clock, on_remove=lambda reason, n: metrics.cache_removals.labels(reason).inc(n)
    )
    metrics.cache_entries.set_function(lambda: len(store))
    state_of: list[GatewayState] = []  # the state, once built: the shared cache's lock follows reloads
    shared_cache = (
        SharedCache(link, clock, lambda: state_of[0].snapshot.config.upstream.timeout_s + LOCK_MARGIN_S)
        if link is not None
        else None
    )
    waiters, freshness = Waiters(), Freshness(clock)
    records = records_for(config, link)
    events, usage, sightings = _event_parts(config, link, records, metrics, lambda: state_of[0].snapshot.config.events)
    hooks = CacheHooks(
        on_change=waiters.changed,
        on_regression=metrics.regressions.inc,
        on_active=freshness.note_active,
        on_terminal=freshness.forget,
        stretch=partial(_stretch, state_of),
        on_join=metrics.coalesced.inc,
        on_shared=(lambda role: link.metrics.flights.labels(role.value).inc()) if link is not None else _no_role,
        on_stored=sightings.stored if sightings is not None else _no_sighting,
    )
    cache = BatchCache(store, config.cache, clock, hooks=hooks, shared=shared_cache)
    upstream = UpstreamClient(
        config.upstream, metrics, clock, shared=SharedBudget(link, clock) if link is not None else None
    )
    refresher = Refresher(cache, waiters, clock, upstream.budget.refresh_wait_s, upstream.flight_wait_s)
    _watch(metrics, cache, waiters, freshness)
    _watch_events(metrics, events)
    state = GatewayState(
        snapshot=Snapshot(config, CallerDirectory(config.callers)),
        upstream=upstream,
        cache=cache,
        metrics=metrics,
        redact=redact or Redactor(),
        records=records,
        waiters=waiters,
        freshness=freshness,
        refresher=refresher,
        clock=clock,
        redis=link,
        shared_caller_limits=SharedCallerLimits(link) if link is not None else None,
        events=events,
        sightings=sightings,
        usage=usage,
        links=links_for(config, link, lambda: state_of[0].snapshot.config),
    )
    state_of.append(state)
    state.follower = _follower(state, link)
    state.webhooks = webhooks_for(config, state)
    state.redact.update(config.secrets)
    if link is not None and shared_cache is not None:
        _hear_other_processes(link, cache, shared_cache, upstream)
    return state


def _event_parts(
    config: GatewayConfig,
    link: RedisLink | None,
    records: Records,
    metrics: Metrics,
    settings: Callable[[], EventsSettings],
) -> tuple[SqliteEventLog | RedisEventLog | None, Usage | None, Sightings | None]:
    """The event log, usage per caller and the sightings (docs/design.md §12), when events.enabled.

    Usage counts each event as it is appended: the log the sightings record into counts it.
    """
    events = events_for(config, link, settings)
    if events is None:
        return None, None, None
    usage = Usage(RedisUsage(link) if link is not None else SqliteUsage(config.store.path), metrics.usage)
    return events, usage, Sightings(CountingLog(events, usage), records, metrics.events)


def _follower(state: GatewayState, link: RedisLink | None) -> Follower | None:
    """The follower (docs/design.md §12), when events.enabled: one process at a time holds its lease.

    What it stores of a finished batch records the batch's output dataset as its owner's first, as a
    caller's retrieve does (docs/design.md §11): a caller may then read the answer from the cache.
    """
    if state.events is None:
        return None
    return Follower(
        state.events,
        state.cache,
        state.upstream,
        state.refresher,
        partial(Lease, link, "follower"),
        lambda: state.snapshot.config.events,
        state.upstream.metrics.usage,
        state.clock,
        partial(record_outputs, state),
    )


def _stretch(state_of: list[GatewayState]) -> float:
    """How far active intervals stretch (§9), on the budget that following leaves to refreshes (§12)."""
    state = state_of[0]
    rate = state.upstream.settings.rate_limit.requests_per_s
    taken = state.follower.calls_per_s if state.follower is not None else 0.0
    return state.freshness.stretch(state.cache.settings.ttl_s, max(rate / 4, rate - taken), state.refresher.batches)


def webhooks_for(config: GatewayConfig, state: GatewayState) -> Webhooks | None:
    """Webhook deliveries (docs/design.md §12) over the event log; positions where the records are."""
    if state.events is None or not config.events.enabled:
        return None
    positions: Positions = (
        RedisPositions(state.redis) if state.redis is not None else SqlitePositions(config.store.path)
    )
    return Webhooks(Shared(config, state.events, positions, state.metrics.webhooks, state.redis))


def _watch_events(metrics: Metrics, events: SqliteEventLog | RedisEventLog | None) -> None:
    """The event log's gauges read at each scrape: what it follows, by kind."""
    if events is not None:
        for kind in ("batch", "dataset"):
            metrics.events.followed.labels(kind).set_function(partial(_followed, events, kind))


def _followed(events: SqliteEventLog | RedisEventLog, kind: Kind) -> int:
    return events.followed_count[kind]


def _no_role(_role: Role) -> None:
    return None


def _no_sighting(_key: str, _entry: CacheEntry) -> None:
    return None


def events_for(
    config: GatewayConfig, link: RedisLink | None, settings: Callable[[], EventsSettings]
) -> SqliteEventLog | RedisEventLog | None:
    """The event log (docs/design.md §12), when events.enabled: on Redis with the replicas, else in ``store.path``."""
    if not config.events.enabled:
        return None
    if link is not None:
        return RedisEventLog(link, settings)
    return SqliteEventLog(config.store.path, settings)


def _watch(metrics: Metrics, cache: BatchCache, waiters: Waiters, freshness: Freshness) -> None:
    """The gauges read at each scrape."""
    metrics.inflight.set_function(lambda: len(cache.flights))
    metrics.waiters.set_function(lambda: waiters.total)
    metrics.followed_batches.set_function(lambda: freshness.followed(cache.settings.ttl_s))
    metrics.refresh_interval.labels("polled").set_function(lambda: cache.active_interval_s(cache.settings.ttl_s.active))
    metrics.refresh_interval.labels("waited").set_function(
        lambda: cache.active_interval_s(cache.settings.ttl_s.active_min)
    )


def _hear_other_processes(link: RedisLink, cache: BatchCache, shared: SharedCache, upstream: UpstreamClient) -> None:
    """What other processes say on the link: an answer stored or evicted, a flight settled, a pause (§10)."""

    def heard(kind: str, batch_id: str, payload: bytes) -> None:
        if kind == PAUSED:
            with contextlib.suppress(ValueError):
                upstream.budget.hold(float(payload))
            return
        if kind == EVICTED:
            cache.forget(batch_id)
        elif kind == STORED:
            cache.stored_elsewhere(batch_id, payload)
        shared.heard(kind, batch_id, payload)

    link.subscribe(heard)


# --- reload and signals -------------------------------------------------------------------------------------------


async def reload_config(state: GatewayState, load: Callable[[], GatewayConfig]) -> bool:
    """Re-read the config (and token file); swap it in if valid, else keep the old one.

    The file is read, parsed and validated in a thread: with thousands of
    callers that takes long enough to stall every connection if done on the
    event loop. Only the swap (``GatewayState.apply`` of what ``prepare`` built) runs on the loop.
    """
    try:
        # Read, validated and prepared (key digests, the redactor's finder) in the thread.
        with _full_collections_deferred():
            prepared = await asyncio.to_thread(lambda: state.prepare(load()))
    except ConfigError as exc:
        return _refuse_reload(state, exc.problems)
    except Exception as exc:  # a reload must never take the serving gateway down
        log.exception("config reload failed")
        return _refuse_reload(state, [f"config: {type(exc).__name__}"])
    state.apply(prepared)
    config = prepared.snapshot.config
    state.metrics.reloads.labels("ok").inc()
    state.metrics.last_reload_ok.set(1)
    # Counts, not names: a list of 10,000 callers is no log line.
    limited = sum(1 for c in config.callers if c.rate_limit is not None)
    log_event(log, logging.INFO, "config reloaded", callers=len(config.callers), rate_limited_callers=limited)
    return True


@contextlib.contextmanager
def _full_collections_deferred() -> Iterator[None]:
    """No full garbage collection while a reload builds its config.

    A config of 10,000 callers is some 100,000 new objects; the full
    (generation 2) collections they set off stop every thread, the event
    loop's too, for 20 to 50 ms each (measured: the longest pause between
    hits during a reload of 10,000 callers fell from 85-90 ms to 18-30 ms
    without them: bench/run.py --quick --only reload).
    The young generations still run; the full one comes when it is next due.
    """
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, 1_000_000)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, full)


def _refuse_reload(state: GatewayState, problems: list[str]) -> bool:
    state.metrics.reloads.labels("error").inc()
    state.metrics.last_reload_ok.set(0)
    log_event(log, logging.ERROR, "config reload refused; the old config keeps serving", problems=problems)
    return False


class Reloader:
    """SIGHUP's reloads: one at a time; signals that come during one coalesce into one more after it.

    The one after it reads the file as it is by then, so no change signalled
    is missed, and a burst of signals costs two reloads at most.
    """

    def __init__(self, state: GatewayState, load: Callable[[], GatewayConfig]) -> None:
        self._state = state
        self._load = load
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self.done = asyncio.Event()  # set whenever no reload is running or due

    def signalled(self) -> None:
        """The SIGHUP handler: start a reload, or ask for one more after the one running."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self.done.clear()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:  # bounded: each turn needs a signal that came during the last one
                self._again = False
                await reload_config(self._state, self._load)
                if not self._again:
                    return
        finally:
            self.done.set()

    async def close(self) -> None:
        """Let a reload under way finish (it is short; a stop must not leave a thread behind)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


async def serve_until_signalled(
    running: RunningGateway, load: Callable[[], GatewayConfig], *, pid_file_path: str = ""
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the config (``Reloader``).

    ``pid_file_path``: where to write this process's pid while it serves (a worker passes "").
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    reloader = Reloader(running.state, load)
    loop.add_signal_handler(signal.SIGHUP, reloader.signalled)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    serving: dict[str, Any] = {"url": running.url}
    if running.metrics_port is not None:
        serving["metrics_url"] = running.metrics_url
    log_event(log, logging.INFO, "serving", **serving)
    with pid_file(pid_file_path):
        await stopping.wait()
        loop.remove_signal_handler(signal.SIGHUP)
        await reloader.close()
        await _stop(running)


async def _stop(running: RunningGateway) -> None:
    log_event(
        log,
        logging.INFO,
        "stopping: finishing requests in flight",
        grace_s=running.state.snapshot.config.server.shutdown_grace_s,
    )
    await running.stop()
    log_event(log, logging.INFO, "stopped")
