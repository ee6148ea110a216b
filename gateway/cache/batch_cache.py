"""The answer cache: a bounded store with per-entry TTL, and single-flight.

The store is ``MemoryStore`` (``gateway.cache.store``), single-flight is
``SingleFlight`` (``gateway.cache.flight``). ``MemoryStore`` holds at most
``cache.max_entries`` entries (cachetools' ``TLRUCache``): storing one more
evicts the least recently used. An entry is *fresh* until ``fresh_until``:
``ttl_s.terminal`` for a terminal batch, ``ttl_s.active`` (shortened by a
random fraction of up to ``active_jitter``, so that entries stored together
do not expire together) for any other, ``ttl_s.not_found`` for an upstream
404. A batch entry is then kept ``stale_if_error_s`` longer, to answer while
the upstream fails; a 404 is not (a stale "not found" could make a poller
give up on a batch that exists). Past ``keep_until`` an entry expires and is dropped.

``BatchCache.get`` is the request path: a fresh entry answers at once (HIT);
otherwise one upstream call per id is made however many callers ask
(MISS); if that call fails in a way that allows it, a kept entry answers
(STALE). Only 200 and 404 answers are ever stored. ``put`` stores what a
create answered; ``evict`` drops an id after a cancel, and a refresh
already in flight for it then answers its waiters but stores nothing, so
the state from before the cancel never comes back.

Answers only move forward (docs/design.md §9): an upstream answer older than the
entry held (an earlier ``updated_at``, or an active status after a terminal
one) is not stored; the held entry keeps serving, fresh again, and the
regression is counted. Every stored answer whose body differs from the one
before (and every eviction) is reported to ``hooks.on_change``, which wakes the
requests waiting on that batch. The active TTL stretches by ``stretch()``
when the upstream budget cannot refresh every active batch that often
(``gateway.cache.refresher``), never past ``ttl_s.active_max``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

from gateway import errors
from gateway.cache.entry import CacheEntry, CacheResult, CacheState, Clock, Role, etag_of, is_older
from gateway.cache.flight import SingleFlight
from gateway.cache.store import BatchStore
from gateway.config import CacheSettings
from gateway.errors import RedisDown
from gateway.upstream.answers import UpstreamReply
from gateway.upstream.cohere import Lifetime


class SharedTier(Protocol):
    """A cache behind this process's memory, shared with other processes (``gateway.replicas.shared_cache``).

    Every call may raise ``errors.RedisDown``: the cache then works from memory alone.
    """

    @property
    def usable(self) -> bool:
        """Calls may go to the shared tier now (it was not lost, or was regained)."""
        ...

    async def settle(
        self,
        batch_id: str,
        will_do: Callable[[CacheEntry], bool],
        produce: Callable[[], Awaitable[tuple[CacheEntry, bool]]],
    ) -> tuple[CacheEntry, Role]: ...

    async def save(self, batch_id: str, entry: CacheEntry, token: str = "") -> bool: ...

    async def drop(self, batch_id: str) -> None: ...


def _nothing(*_args: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class CacheHooks:
    """What the rest of the gateway learns from the cache; each is a no-op for a bare cache."""

    # An id's answer changed, or it was evicted: its waiters wake (gateway.cache.waiting).
    on_change: Callable[[str], None] = _nothing
    # An answer older than the one held was refused (docs/design.md §9).
    on_regression: Callable[[], None] = _nothing
    # A batch was seen active, or terminal: the refresh schedule counts it, or forgets it.
    on_active: Callable[[str], None] = _nothing
    on_terminal: Callable[[str], None] = _nothing
    # How much the budget stretches active intervals (gateway.cache.refresher); 1: not at all.
    stretch: Callable[[], float] = lambda: 1.0
    # A caller joined a call already out; a miss was settled through the shared tier, in this role.
    on_join: Callable[[], None] = _nothing
    on_shared: Callable[[Role], None] = _nothing
    # An answer different from the one held was stored, by key (a batch id, or records.base.dataset_key):
    # what it shows of its subject becomes a sighting for the event log (gateway.events.sightings).
    on_stored: Callable[[str, CacheEntry], None] = _nothing


# Two readings of one answer's fetch time, through Redis and back, may differ by this much.
SAME_FETCH_S = 0.05


# The upstream call; its argument says whether it may wait (briefly) for the
# upstream budget. It may not when a kept entry can answer instead.
Fetch = Callable[[bool], Awaitable[UpstreamReply]]


class BatchCache:
    """Fresh entries, single-flight refreshes and stale-if-error, by batch id."""

    def __init__(
        self,
        store: BatchStore,
        settings: CacheSettings,
        clock: Clock = time.monotonic,
        jitter: Callable[[], float] = random.random,
        hooks: CacheHooks = CacheHooks(),
        shared: SharedTier | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.hooks = hooks
        self.flights: SingleFlight[CacheResult] = SingleFlight(hooks.on_join)
        # Redis behind the memory (docs/design.md §10), when configured.
        self.shared = shared
        self._clock = clock
        # Draws in [0, 1) for the active TTL's spread; tests pin it.
        self.jitter = jitter

    def active_interval_s(self, target_s: float) -> float:
        """``target_s`` stretched as the upstream budget requires, never past ``ttl_s.active_max``."""
        return min(max(target_s, target_s * self.hooks.stretch()), self.settings.ttl_s.active_max)

    def ttl_s(self, lifetime: Lifetime) -> float:
        if lifetime is not Lifetime.ACTIVE:
            ttl: float = getattr(self.settings.ttl_s, lifetime.value)
            return ttl
        # Shorten by up to active_jitter so entries stored together spread out.
        return self.active_interval_s(self.settings.ttl_s.active) * (1 - self.settings.active_jitter * self.jitter())

    def _entry(self, reply: UpstreamReply) -> CacheEntry:
        now = self._clock()
        fresh_until = now + self.ttl_s(reply.lifetime)
        keep_s = self.settings.stale_if_error_s if reply.lifetime is not Lifetime.NOT_FOUND else 0.0
        return CacheEntry(
            reply.status,
            reply.body,
            now,
            fresh_until,
            fresh_until + keep_s,
            etag_of(reply.body),
            reply.updated_at,
            reply.lifetime is Lifetime.TERMINAL,
        )

    async def _refresh(
        self, batch_id: str, fetch: Fetch, has_stale: bool, will_do: Callable[[CacheEntry], bool]
    ) -> CacheResult:
        """This flight's answer: from Redis if it holds one that ``will_do``, else from the upstream."""

        async def produce() -> tuple[CacheEntry, bool]:
            # With a kept entry to fall back on, a spent budget answers STALE at
            # once instead of making the caller wait for a token.
            return self._keep(batch_id, self._entry(await fetch(not has_stale)))

        shared = self.shared
        if shared is not None and shared.usable:
            try:
                entry, role = await shared.settle(batch_id, will_do, produce)
            except RedisDown:
                pass  # Redis lost before this process called the upstream: single-flight per process
            else:
                self.hooks.on_shared(role)
                if role is not Role.LED:
                    entry = self._keep(batch_id, entry)[0]
                return CacheResult(entry, CacheState.HIT if role is Role.ADOPTED else CacheState.MISS)
        return CacheResult((await produce())[0], CacheState.MISS)

    def _keep(self, batch_id: str, entry: CacheEntry) -> tuple[CacheEntry, bool]:
        """Store an answer this flight got, unless the id was evicted meanwhile (a cancel: it may predate the change).

        Returns what the cache holds now, and whether it was stored.
        """
        current = self.flights.current(batch_id) is asyncio.current_task()
        if current:
            entry = self._store(batch_id, entry)
        if entry.status == 200:
            if entry.terminal:
                self.hooks.on_terminal(batch_id)
            else:
                self.hooks.on_active(batch_id)
        return entry, current

    def _store(self, batch_id: str, entry: CacheEntry) -> CacheEntry:
        """Store ``entry`` unless it is older than the one held; return what is held now."""
        held = self.store.get(batch_id)
        if held is not None and is_older(entry, held):
            self.hooks.on_regression()
            # The held answer keeps serving, as fresh as the upstream's answer would have been.
            entry = replace(held, fresh_until=entry.fresh_until, keep_until=entry.keep_until)
        self.store.put(batch_id, entry)
        if held is None or held.etag != entry.etag:
            self.hooks.on_change(batch_id)
            self.hooks.on_stored(batch_id, entry)
        return entry

    async def put(self, batch_id: str, reply: UpstreamReply) -> None:
        """Store an answer got outside ``get`` (a create's), for every process; it replaces any call out for the id."""
        self.flights.forget(batch_id)
        entry = self._store(batch_id, self._entry(reply))
        if self.shared is not None:
            with contextlib.suppress(RedisDown):
                await self.shared.save(batch_id, entry)

    async def evict(self, batch_id: str) -> None:
        """Drop the id's entry in every process; a call out for it stores nothing (see the module's docstring)."""
        self.forget(batch_id)
        if self.shared is not None:
            with contextlib.suppress(RedisDown):
                await self.shared.drop(batch_id)

    def forget(self, batch_id: str) -> None:
        """Drop the id's entry from this process's memory, and wake its waiters."""
        self.flights.forget(batch_id)
        self.store.evict(batch_id)
        self.hooks.on_change(batch_id)

    def stored_elsewhere(self, batch_id: str, etag: bytes) -> None:
        """Another process stored an answer for ``batch_id`` (the shared tier's event).

        A different answer than the one held stops being fresh here, so the
        next request (and every waiter, woken now) takes the shared one. It
        stays held: if the shared answer is the older one, it is refused as
        any older answer is (``is_older``), and the held one serves on.
        """
        held = self.store.get(batch_id)
        if held is not None and held.etag.encode() != etag:
            self.store.put(batch_id, replace(held, fresh_until=min(held.fresh_until, self._clock())))
            self.hooks.on_change(batch_id)
        elif held is None:
            self.hooks.on_change(batch_id)

    async def refresh(self, batch_id: str, fetch: Fetch, wait_s: float) -> CacheEntry:
        """Fetch ``batch_id`` again now, fresh or not (a batch with waiters), under single-flight.

        It never waits for budget: a refresh refused one round is tried the next.
        """
        held = self.store.get(batch_id)
        seen = float("-inf") if held is None else held.fetched_at + SAME_FETCH_S

        def newer(entry: CacheEntry) -> bool:
            # Another process's answer fetched since ours: the refresh this one would make.
            return entry.fetched_at > seen and self._clock() < entry.fresh_until

        return (await self.flights.run(batch_id, partial(self._refresh, batch_id, fetch, True, newer), wait_s)).entry

    def _is_fresh(self, entry: CacheEntry) -> bool:
        return self._clock() < entry.fresh_until

    def fresh(self, batch_id: str) -> CacheEntry | None:
        """The entry for ``batch_id`` if it is still fresh: a hit, with no waiting."""
        cached = self.store.get(batch_id)
        if cached is not None and self._clock() < cached.fresh_until:
            return cached
        return None

    async def get(self, batch_id: str, fetch: Fetch, wait_s: float) -> CacheResult:
        """Answer from a fresh entry, one shared upstream call, or a kept entry."""
        fresh = self.fresh(batch_id)
        if fresh is not None:
            return CacheResult(fresh, CacheState.HIT)
        cached = self.store.get(batch_id)  # past its freshness, kept for stale-if-error
        usable_stale = cached is not None and self.settings.stale_if_error_s > 0
        try:
            return await self.flights.run(
                batch_id, partial(self._refresh, batch_id, fetch, usable_stale, self._is_fresh), wait_s
            )
        except errors.UpstreamFailure:
            if cached is not None and self._clock() < cached.keep_until:
                return CacheResult(cached, CacheState.STALE)
            raise
