"""The cache without HTTP: MemoryStore, SingleFlight and BatchCache on a FakeClock.

Gateway-level behaviour (headers, metrics, the SDK's view) is in test_cache.py;
here are the rules themselves, table-driven where they are tables.
"""

from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from gateway import errors
from gateway.cache.batch_cache import BatchCache
from gateway.cache.entry import CacheEntry, CacheState
from gateway.cache.flight import SingleFlight
from gateway.cache.store import MemoryStore
from gateway.config import CacheSettings
from gateway.upstream.answers import UpstreamReply
from gateway.upstream.cohere import Lifetime, parse_batch_body
from tests.support import FakeClock
from tests.upstream import batch_body

ACTIVE, TERMINAL, NOT_FOUND, KEEP = 5.0, 86400.0, 10.0, 600.0


def settings(jitter: float = 0.0, stale_if_error_s: float = KEEP, max_entries: int = 100) -> CacheSettings:
    return CacheSettings.model_validate(
        {
            "max_entries": max_entries,
            "ttl_s": {"active": ACTIVE, "terminal": TERMINAL, "not_found": NOT_FOUND},
            "stale_if_error_s": stale_if_error_s,
            "active_jitter": jitter,
        }
    )


def entry(now: float, fresh_s: float = 5.0, keep_s: float = 60.0, body: bytes = b"{}") -> CacheEntry:
    return CacheEntry(200, body, now, now + fresh_s, now + fresh_s + keep_s)


class ScriptedFetch:
    """A fetch that answers from a script, one item per call, recording ``may_wait``."""

    def __init__(self, *script: UpstreamReply | errors.GatewayError) -> None:
        self.script = list(script)
        self.may_wait: list[bool] = []

    @property
    def calls(self) -> int:
        return len(self.may_wait)

    async def __call__(self, may_wait: bool) -> UpstreamReply:
        self.may_wait.append(may_wait)
        step = self.script[min(len(self.may_wait), len(self.script)) - 1]
        if isinstance(step, errors.GatewayError):
            raise step
        return step


def reply(status: str = "BATCH_STATUS_IN_PROGRESS") -> UpstreamReply:
    body = batch_body(status=status)
    return UpstreamReply(200, body, parse_batch_body(body))


NOT_FOUND_REPLY = UpstreamReply(404, b'{"message": "batch not found"}', Lifetime.NOT_FOUND)


def make_cache(clock: FakeClock, **kwargs: float) -> tuple[BatchCache, MemoryStore]:
    store = MemoryStore(100, clock)
    return BatchCache(store, settings(**kwargs), clock, jitter=lambda: 0.0), store


# --- TTL from the body --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "ttl"),
    [
        (batch_body(status="BATCH_STATUS_QUEUED"), ACTIVE),
        (batch_body(status="BATCH_STATUS_IN_PROGRESS"), ACTIVE),
        (batch_body(status="BATCH_STATUS_CANCELING"), ACTIVE),
        (batch_body(status="BATCH_STATUS_UNSPECIFIED"), ACTIVE),
        (batch_body(status="BATCH_STATUS_SOMETHING_NEW"), ACTIVE),
        (b'{"batch": {"id": "b"}}', ACTIVE),
        (b'{"batch": {"id": "b", "status": null}}', ACTIVE),
        (batch_body(status="BATCH_STATUS_COMPLETED"), TERMINAL),
        (batch_body(status="BATCH_STATUS_FAILED"), TERMINAL),
        (batch_body(status="BATCH_STATUS_CANCELED"), TERMINAL),
    ],
)
def test_the_ttl_is_chosen_from_the_batch_status_in_the_body(body: bytes, ttl: float) -> None:
    cache, _store = make_cache(FakeClock())
    assert cache.ttl_s(parse_batch_body(body)) == ttl


def test_a_404_gets_the_not_found_ttl() -> None:
    cache, _store = make_cache(FakeClock())
    assert cache.ttl_s(Lifetime.NOT_FOUND) == NOT_FOUND


# --- Spread expiry ------------------------------------------------------------


@pytest.mark.parametrize(
    ("draw", "lifetime", "ttl"),
    [
        (0.0, Lifetime.ACTIVE, 5.0),
        (0.5, Lifetime.ACTIVE, 4.75),
        (0.999, Lifetime.ACTIVE, 5.0 * (1 - 0.1 * 0.999)),
        (0.999, Lifetime.TERMINAL, TERMINAL),
        (0.999, Lifetime.NOT_FOUND, NOT_FOUND),
    ],
)
def test_only_active_ttls_are_shortened_by_up_to_active_jitter(draw: float, lifetime: Lifetime, ttl: float) -> None:
    cache = BatchCache(MemoryStore(10), settings(jitter=0.1), jitter=lambda: draw)
    assert cache.ttl_s(lifetime) == pytest.approx(ttl)


async def test_entries_stored_together_expire_spread_over_the_jitter_window() -> None:
    clock = FakeClock()
    store = MemoryStore(1000, clock)
    cache = BatchCache(store, settings(jitter=0.1, max_entries=1000), clock, jitter=random.Random(7).random)
    for i in range(500):
        await cache.get(f"b{i}", ScriptedFetch(reply()), wait_s=1)
    ttls = [store_entry.fresh_until - clock.now for store_entry in map(store.get, (f"b{i}" for i in range(500)))]
    assert min(ttls) >= ACTIVE * 0.9
    assert max(ttls) <= ACTIVE
    assert max(ttls) - min(ttls) > ACTIVE * 0.08  # spread over (almost) the whole window
    # Ten equal slices of the window each hold about a tenth of the entries.
    slices = Counter(min(9, int((ACTIVE - ttl) / (ACTIVE * 0.1) * 10)) for ttl in ttls)
    assert sorted(slices) == list(range(10))
    assert all(25 <= count <= 75 for count in slices.values()), slices


# --- MemoryStore: get / put / evict, the bound, expiry ------------------------


def test_the_store_returns_what_was_put_until_it_is_evicted() -> None:
    clock = FakeClock()
    store = MemoryStore(10, clock)
    stored = entry(clock.now)
    store.put("b1", stored)
    assert store.get("b1") is stored
    store.evict("b1")
    assert store.get("b1") is None
    store.evict("never-stored")  # evicting what is not there is not an error
    assert len(store) == 0


def test_an_entry_is_kept_until_keep_until_and_then_expires() -> None:
    clock = FakeClock()
    removed: Counter[str] = Counter()
    store = MemoryStore(10, clock, on_remove=lambda reason, n: removed.update({reason: n}))
    store.put("b1", entry(clock.now, fresh_s=5, keep_s=60))
    clock.advance(64.9)
    assert store.get("b1") is not None  # past freshness, still kept for stale-if-error
    clock.advance(0.2)
    assert store.get("b1") is None
    assert len(store) == 0
    assert removed == {"expired": 1}


def test_the_least_recently_used_entry_is_evicted_for_room() -> None:
    clock = FakeClock()
    removed: Counter[str] = Counter()
    store = MemoryStore(3, clock, on_remove=lambda reason, n: removed.update({reason: n}))
    for key in ("a", "b", "c"):
        store.put(key, entry(clock.now))
    assert store.get("a") is not None  # "a" is now the most recently used
    store.put("d", entry(clock.now))
    assert store.get("b") is None
    assert [key for key in "acd" if store.get(key) is not None] == ["a", "c", "d"]
    assert removed == {"evicted": 1}


@pytest.mark.heavy
def test_a_hundred_thousand_distinct_ids_never_grow_the_cache_past_max_entries() -> None:
    clock = FakeClock()
    removed: Counter[str] = Counter()
    store = MemoryStore(1000, clock, on_remove=lambda reason, n: removed.update({reason: n}))
    cache = BatchCache(store, settings(max_entries=1000), clock)
    fetch = ScriptedFetch(reply())

    async def ask_for_every_id() -> int:
        largest = 0
        for i in range(100_000):
            await cache.get(f"batch-{i}", fetch, wait_s=1)
            largest = max(largest, len(store))
        return largest

    assert asyncio.run(ask_for_every_id()) == 1000
    assert fetch.calls == 100_000
    assert removed == {"evicted": 99_000}
    assert len(cache.flights) == 0
    assert store.get("batch-99999") is not None
    assert store.get("batch-0") is None


def _put_distinct(store: MemoryStore, first: int, count: int) -> None:
    for i in range(first, first + count):
        body = b'{"batch": {"id": "batch-%d", "status": "BATCH_STATUS_QUEUED"}}' % i
        store.put(f"batch-{i}", CacheEntry(200, body, 1000.0, 1005.0, 1605.0))


@pytest.mark.heavy
def test_memory_stays_within_what_max_entries_entries_need_across_a_hundred_thousand_ids() -> None:
    store = MemoryStore(1000, FakeClock())
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _put_distinct(store, 0, 1000)  # the store is full: this is what 1000 entries need
        full = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.reset_peak()
        _put_distinct(store, 1000, 99_000)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(store) == 1000
    # 99 times as many ids again cost at most one more full store (the expiry
    # heap is compacted at twice the entry count); unbounded growth would be
    # about 100 times ``full``.
    assert after - before < 2 * full, (after - before, full)
    assert peak - before < 3 * full, (peak - before, full)


# --- BatchCache: HIT, MISS, expiry, 404, errors, STALE -----------------------


async def test_a_fresh_entry_is_a_hit_and_an_expired_active_entry_is_fetched_again() -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock)
    fetch = ScriptedFetch(reply())
    assert (await cache.get("b", fetch, 1)).state is CacheState.MISS
    clock.advance(ACTIVE - 0.01)
    assert (await cache.get("b", fetch, 1)).state is CacheState.HIT
    clock.advance(0.02)
    assert (await cache.get("b", fetch, 1)).state is CacheState.MISS
    assert fetch.calls == 2


async def test_a_terminal_entry_outlives_the_active_ttl() -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock)
    fetch = ScriptedFetch(reply("BATCH_STATUS_COMPLETED"))
    await cache.get("b", fetch, 1)
    for _ in range(10):
        clock.advance(ACTIVE * 2)
        assert (await cache.get("b", fetch, 1)).state is CacheState.HIT
    clock.advance(TERMINAL)
    assert (await cache.get("b", fetch, 1)).state is CacheState.MISS
    assert fetch.calls == 2


async def test_a_404_is_cached_for_the_not_found_ttl() -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock)
    fetch = ScriptedFetch(NOT_FOUND_REPLY)
    first = await cache.get("b", fetch, 1)
    assert (first.state, first.entry.status) == (CacheState.MISS, 404)
    clock.advance(NOT_FOUND - 0.01)
    assert (await cache.get("b", fetch, 1)).state is CacheState.HIT
    clock.advance(0.02)
    assert (await cache.get("b", fetch, 1)).state is CacheState.MISS
    assert fetch.calls == 2


UPSTREAM_FAILURES = [
    errors.UpstreamError("500", upstream_status=500),
    errors.UpstreamUnavailable("503", upstream_status=503, retry_after_s=5),
    errors.UpstreamTimeout(),
    errors.UpstreamUnreachable(),
    errors.UpstreamAuthFailed(upstream_status=401),
    errors.UpstreamRateLimited(retry_after_s=3),
    errors.RateLimited(retry_after_s=1),
    errors.UpstreamInvalidResponse(),
]


@pytest.mark.parametrize("error", [errors.BadRequest("bad", upstream_status=400), *UPSTREAM_FAILURES])
async def test_an_error_is_not_cached_and_the_next_request_asks_again(error: errors.GatewayError) -> None:
    cache, store = make_cache(FakeClock())
    fetch = ScriptedFetch(error, reply())
    with pytest.raises(type(error)):
        await cache.get("b", fetch, 1)
    assert store.get("b") is None
    assert len(cache.flights) == 0
    assert (await cache.get("b", fetch, 1)).state is CacheState.MISS
    assert fetch.calls == 2


@pytest.mark.parametrize("error", UPSTREAM_FAILURES)
async def test_an_upstream_failure_is_answered_from_a_kept_entry(error: errors.GatewayError) -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock, stale_if_error_s=60)
    fetch = ScriptedFetch(reply(), error)
    fresh = await cache.get("b", fetch, 1)
    clock.advance(ACTIVE + 59.9)
    stale = await cache.get("b", fetch, 1)
    assert stale.state is CacheState.STALE
    assert stale.entry is fresh.entry


async def test_an_answer_about_the_batch_itself_is_never_replaced_by_a_kept_entry() -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock)
    fetch = ScriptedFetch(reply(), errors.BadRequest("no such thing", upstream_status=400))
    await cache.get("b", fetch, 1)
    clock.advance(ACTIVE + 1)
    with pytest.raises(errors.BadRequest):
        await cache.get("b", fetch, 1)


@pytest.mark.parametrize(("keep_s", "past_fresh_s"), [(60, 60.01), (60, 1000), (0, 0.01)])
async def test_no_stale_answer_past_stale_if_error(keep_s: float, past_fresh_s: float) -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock, stale_if_error_s=keep_s)
    fetch = ScriptedFetch(reply(), errors.UpstreamError(upstream_status=500))
    await cache.get("b", fetch, 1)
    clock.advance(ACTIVE + past_fresh_s)
    with pytest.raises(errors.UpstreamError):
        await cache.get("b", fetch, 1)


async def test_a_newer_answer_replaces_a_kept_one() -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock)
    fetch = ScriptedFetch(reply("BATCH_STATUS_IN_PROGRESS"), reply("BATCH_STATUS_COMPLETED"))
    await cache.get("b", fetch, 1)
    clock.advance(ACTIVE + 1)
    result = await cache.get("b", fetch, 1)
    assert result.state is CacheState.MISS
    assert b"BATCH_STATUS_COMPLETED" in result.entry.body


@pytest.mark.parametrize(
    ("has_entry", "may_wait"),
    [(False, True), (True, False)],
    ids=["nothing-cached-waits-for-budget", "kept-entry-answers-at-once"],
)
async def test_the_fetch_may_wait_for_budget_only_when_no_kept_entry_can_answer(
    has_entry: bool, may_wait: bool
) -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock)
    fetch = ScriptedFetch(reply())
    if has_entry:
        await cache.get("b", ScriptedFetch(reply()), 1)
        clock.advance(ACTIVE + 1)
    await cache.get("b", fetch, 1)
    assert fetch.may_wait == [may_wait]


# --- SingleFlight -------------------------------------------------------------


class HeldCall:
    """A call that starts when asked and ends when the test says, counting starts."""

    def __init__(self, result: CacheEntry | Exception) -> None:
        self.result = result
        self.starts = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self) -> CacheEntry:
        self.starts += 1
        self.started.set()
        await self.release.wait()
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


async def _until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until ``predicate`` holds (bounded)."""
    async with asyncio.timeout(5):
        # No event exists for "n callers have joined"; yield until they have.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0)


def _spawn(
    flights: SingleFlight, call: Callable[[], Awaitable[CacheEntry]], n: int, wait_s: float = 5
) -> list[asyncio.Task[tuple[CacheEntry, bool]]]:
    return [asyncio.ensure_future(flights.run("k", call, wait_s)) for _ in range(n)]


def _other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def test_concurrent_callers_share_one_call_and_its_result() -> None:
    joins: list[int] = []
    flights = SingleFlight(on_join=lambda: joins.append(1))
    call = HeldCall(entry(0.0, body=b"the one answer"))
    tasks = _spawn(flights, call, 50)
    await _until(lambda: len(joins) == 49)
    call.release.set()
    results = await asyncio.gather(*tasks)
    assert call.starts == 1
    assert {result.body for result in results} == {b"the one answer"}
    assert len(joins) == 49  # every caller but the one that started the call joined it
    assert len(flights) == 0
    assert not _other_tasks()


async def test_every_waiter_gets_the_same_error_and_the_failure_leaves_nothing_behind() -> None:
    joins: list[int] = []
    flights = SingleFlight(on_join=lambda: joins.append(1))
    call = HeldCall(errors.UpstreamError("boom", upstream_status=500))
    tasks = _spawn(flights, call, 10)
    await _until(lambda: len(joins) == 9)
    call.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, errors.UpstreamError) for result in results)
    assert len(joins) == 9  # waiters are counted even when the call fails
    assert len(flights) == 0
    retry = HeldCall(entry(0.0))
    retry.release.set()
    await flights.run("k", retry, 5)
    assert retry.starts == 1


async def test_the_leader_going_away_does_not_cancel_the_call_for_the_others() -> None:
    flights = SingleFlight()
    call = HeldCall(entry(0.0, body=b"answer"))
    leader = _spawn(flights, call, 1)[0]
    await call.started.wait()
    waiters = _spawn(flights, call, 5)
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert len(flights) == 1  # the call is still out
    call.release.set()
    results = await asyncio.gather(*waiters)
    assert {result.body for result in results} == {b"answer"}
    assert call.starts == 1
    assert len(flights) == 0
    assert not _other_tasks()


async def test_a_call_whose_every_caller_left_still_finishes_and_then_leaves_the_table() -> None:
    flights = SingleFlight()
    call = HeldCall(entry(0.0))
    (only,) = _spawn(flights, call, 1)
    await call.started.wait()
    only.cancel()
    await asyncio.gather(only, return_exceptions=True)
    (task,) = _other_tasks()
    call.release.set()
    await task
    assert len(flights) == 0
    assert not _other_tasks()


async def test_a_waiter_gives_up_at_its_own_deadline_and_the_call_goes_on() -> None:
    flights = SingleFlight()
    call = HeldCall(entry(0.0, body=b"late"))
    patient = _spawn(flights, call, 1, wait_s=30)[0]
    await call.started.wait()
    with pytest.raises(errors.UpstreamTimeout):
        # wait_for only bounds the test: the waiter's own deadline is 0.01 s.
        await asyncio.wait_for(flights.run("k", call, wait_s=0.01), 5)
    assert not patient.done()
    call.release.set()
    result = await patient
    assert result.body == b"late"
    assert call.starts == 1
    assert len(flights) == 0
    assert not _other_tasks()


async def test_a_waiter_past_its_deadline_is_served_a_kept_entry() -> None:
    clock = FakeClock()
    cache, _store = make_cache(clock)
    await cache.get("b", ScriptedFetch(reply()), 1)
    clock.advance(ACTIVE + 1)
    release = asyncio.Event()

    async def slow(_may_wait: bool) -> UpstreamReply:
        await release.wait()
        return reply("BATCH_STATUS_COMPLETED")

    patient = asyncio.ensure_future(cache.get("b", slow, 30))
    await asyncio.sleep(0)
    hurried = await asyncio.wait_for(cache.get("b", slow, 0.01), 5)
    assert hurried.state is CacheState.STALE
    release.set()
    assert (await patient).state is CacheState.MISS
    assert len(cache.flights) == 0


async def test_a_cached_404_is_never_served_stale() -> None:
    clock = FakeClock()
    cache, store = make_cache(clock)
    fetch = ScriptedFetch(NOT_FOUND_REPLY, errors.UpstreamError(upstream_status=500))
    await cache.get("b", fetch, 1)
    clock.advance(NOT_FOUND + 0.01)
    assert store.get("b") is None  # dropped at the end of its TTL, not kept for stale-if-error
    with pytest.raises(errors.UpstreamError):
        await cache.get("b", fetch, 1)
    assert fetch.may_wait == [True, True]
