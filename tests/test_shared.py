"""The pieces of the shared tier (docs/design.md §10) on a real Redis, mostly without HTTP.

Entries travel between processes with wall-clock times; the budget and the
pause are Lua scripts on Redis's clock. The black-box tests with three
gateway processes are in tests/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from gateway import errors
from gateway.cache.entry import CacheEntry, Role
from gateway.config import RedisSettings
from gateway.demo.simulator import Simulator
from gateway.edge.server import RunningGateway
from gateway.errors import RedisDown
from gateway.replicas.shared_budget import SharedBudget, SharedCallerLimits
from gateway.replicas.shared_cache import SharedCache, decode_entry, decode_error, encode_entry, encode_error
from gateway.upstream.budget import TOKEN, WAIT
from tests.conftest import GatewayFactory, OpenLink
from tests.redis_server import RedisServer
from tests.support import BILLING_KEY, FakeClock, http, make_config, pipelined, registry_value, request_bytes


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll (bounded) for state another task changes; there is no event to await for it."""
    for _ in range(int(within_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def until_async(ask: Callable[[], Awaitable[int]], want: bool, within_s: float) -> None:
    """Ask Redis (bounded) until its answer is ``want``: a state another task changes."""
    for _ in range(int(within_s / 0.01)):
        if bool(await ask()) == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"Redis never answered {want}")


def entry(fetched_at: float, body: bytes = b'{"batch": {"id": "b"}}') -> CacheEntry:
    return CacheEntry(200, body, fetched_at, fetched_at + 5, fetched_at + 600, '"e1"', 1_700_000_000.5, False)


def test_an_entry_keeps_its_age_and_lifetimes_across_processes_with_other_monotonic_clocks() -> None:
    wall = FakeClock(now=1_800_000_000.0)
    here, there = FakeClock(now=100.0), FakeClock(now=98_000.0)
    sent = entry(fetched_at=97.0)  # three seconds old here
    wall.advance(0.5)
    there.advance(0.5)
    got = decode_entry(encode_entry(sent, here, wall), there, wall)
    assert got is not None
    assert got.age_s(there()) == 3
    assert got.fresh_until - got.fetched_at == pytest.approx(5)
    assert got.keep_until - got.fetched_at == pytest.approx(600)
    assert (got.status, got.body, got.etag, got.updated_at, got.terminal) == (
        200,
        sent.body,
        sent.etag,
        sent.updated_at,
        False,
    )


@pytest.mark.parametrize("value", [b"", b"not json\n{}", b'["too", "short"]\n{}', b'{"a": 1}\nbody'])
def test_an_entry_another_version_wrote_is_ignored_not_a_crash(value: bytes) -> None:
    assert decode_entry(value, time.monotonic, time.time) is None


@pytest.mark.parametrize(
    "error",
    [
        errors.UpstreamRateLimited(retry_after_s=7),
        errors.UpstreamUnavailable("down", retry_after_s=3),
        errors.UpstreamAuthFailed(upstream_status=401),
        errors.UpstreamTimeout("slow"),
    ],
)
def test_a_leaders_error_reaches_its_followers_as_the_same_contract_error(error: errors.GatewayError) -> None:
    got = decode_error(encode_error(error))
    assert type(got) is type(error)
    assert (got.status, got.code, got.message, got.retry_after_s, got.upstream_status) == (
        error.status,
        error.code,
        error.message,
        error.retry_after_s,
        error.upstream_status,
    )


@pytest.mark.parametrize("payload", [b"", b"{}", b'{"error": "SystemExit", "message": "x"}'])
def test_an_unreadable_or_foreign_error_becomes_an_upstream_error(payload: bytes) -> None:
    assert isinstance(decode_error(payload), errors.UpstreamError)


async def test_the_budget_is_one_bucket_for_every_process(open_link: OpenLink) -> None:
    budgets = [SharedBudget(await open_link(), time.monotonic) for _ in range(3)]
    # rate 0.01/s: no refill to speak of during the test.
    taken = [await budgets[i % 3].take(0.01, 4, reserve=0) for i in range(9)]
    assert [kind for kind, _ in taken] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert all(wait > 50 for kind, wait in taken if kind == 1)


async def test_a_reserve_leaves_the_last_tokens_to_others(open_link: OpenLink) -> None:
    budget = SharedBudget(await open_link(), time.monotonic)
    assert [(await budget.take(0.01, 4, reserve=2))[0] for _ in range(3)] == [0, 0, 1]
    assert (await budget.take(0.01, 4, reserve=0))[0] == 0


async def test_a_write_waiting_in_one_process_comes_before_reads_in_every_other(open_link: OpenLink) -> None:
    here, there = SharedBudget(await open_link(), time.monotonic), SharedBudget(await open_link(), time.monotonic)
    rate = 20.0  # a token every 50 ms, on Redis's clock (which a test cannot move: it waits for it)
    assert (await here.take(rate, 1, reserve=0))[0] == TOKEN
    kind, wait = await here.take(rate, 1, reserve=0, writer="create-1")
    assert kind == WAIT
    await asyncio.sleep(wait + 0.02)
    assert (await there.take(rate, 1, reserve=0))[0] == WAIT  # the token that came is the create's
    assert (await here.take(rate, 1, reserve=0, writer="create-1"))[0] == TOKEN
    kind, wait = await there.take(rate, 1, reserve=0)
    await asyncio.sleep(wait + 0.02)
    assert (await there.take(rate, 1, reserve=0))[0] == TOKEN  # no write waits now: reads go on


async def test_a_pause_stops_every_process_and_a_shorter_one_never_cuts_it(open_link: OpenLink) -> None:
    one, other = SharedBudget(await open_link(), time.monotonic), SharedBudget(await open_link(), time.monotonic)
    await one.pause(30)
    await other.pause(1)
    kind, left = await other.take(100, 100, reserve=0)
    assert kind == 2
    assert 28 < left <= 30


async def test_followers_wait_for_the_leaders_answer_and_one_upstream_call_is_made(open_link: OpenLink) -> None:
    caches = [SharedCache(link, time.monotonic, lambda: 5.0) for link in [await open_link() for _ in range(3)]]
    for cache in caches:
        cache.link.subscribe(cache.heard)
    release, called = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def produce() -> tuple[CacheEntry, bool]:
        calls.append(1)
        called.set()
        await release.wait()
        return entry(time.monotonic()), True

    settled = [
        asyncio.ensure_future(cache.settle("b", lambda e: time.monotonic() < e.fresh_until, produce))
        for cache in caches
    ]
    async with asyncio.timeout(10):
        await called.wait()
        # All three listen for the flight's word: the leader (until it is done) and the two that wait for it.
        await until(lambda: all(len(c._following.get("b", ())) == 1 for c in caches))
        release.set()
        results = await asyncio.gather(*settled)
    assert len(calls) == 1
    roles = [role for _, role in results]
    # The others waited for it, or (had the lock just come free) found its answer stored.
    assert roles.count(Role.LED) == 1
    assert set(roles) - {Role.LED} <= {Role.FOLLOWED, Role.ADOPTED}
    assert {e.etag for e, _ in results} == {'"e1"'}


async def test_a_leaders_failure_is_answered_to_its_followers_without_another_call(open_link: OpenLink) -> None:
    leader, follower = (
        SharedCache(link, time.monotonic, lambda: 5.0) for link in [await open_link(), await open_link()]
    )
    follower.link.subscribe(follower.heard)
    release, called = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def fail() -> tuple[CacheEntry, bool]:
        calls.append(1)
        called.set()
        await release.wait()
        raise errors.UpstreamUnavailable("The upstream is failing.", retry_after_s=4)

    led = asyncio.ensure_future(leader.settle("b", lambda _e: True, fail))
    async with asyncio.timeout(10):
        await called.wait()
        followed = asyncio.ensure_future(follower.settle("b", lambda _e: True, fail))
        await until(lambda: "b" in follower._following)  # it listens before it tries the lock...
        await until(lambda: "b" not in follower._following or bool(follower._following["b"]))
        release.set()
        with pytest.raises(errors.UpstreamUnavailable):
            await led
        with pytest.raises(errors.UpstreamUnavailable) as raised:
            await followed
    assert raised.value.retry_after_s == 4
    assert len(calls) == 1


async def test_a_lock_whose_holder_vanished_is_taken_over_after_its_ttl(open_link: OpenLink) -> None:
    link = await open_link()
    # A holder that died: its lock stays until the TTL runs out.
    await link.client.set(link.key("lock", "b"), "dead-holder", px=600)
    cache = SharedCache(await open_link(), time.monotonic, lambda: 5.0)
    started = time.monotonic()

    async def produce() -> tuple[CacheEntry, bool]:
        return entry(time.monotonic()), True

    async with asyncio.timeout(10):
        _, role = await cache.settle("b", lambda e: time.monotonic() < e.fresh_until, produce)
    assert role is Role.LED
    assert 0.4 < time.monotonic() - started < 3


async def test_a_cancelled_leader_leaves_no_lock_behind(open_link: OpenLink) -> None:
    link = await open_link()
    cache = SharedCache(link, time.monotonic, lambda: 30.0)
    entered = asyncio.Event()

    async def hang() -> tuple[CacheEntry, bool]:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    led = asyncio.ensure_future(cache.settle("b", lambda _e: False, hang))
    async with asyncio.timeout(10):
        await entered.wait()
        assert await link.client.exists(link.key("lock", "b"))
        led.cancel()
        with pytest.raises(asyncio.CancelledError):
            await led
        for _ in range(500):
            if not await link.client.exists(link.key("lock", "b")):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the cancelled leader's lock stayed")


async def test_with_redis_lost_every_call_fails_at_once_and_nothing_waits(
    open_link: OpenLink, redis_server: RedisServer
) -> None:
    link = await open_link(timeout_s=RedisSettings().timeout_s)
    cache = SharedCache(link, time.monotonic, lambda: 5.0)
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(RedisDown):
            await cache.load("b")
        assert time.monotonic() - started < 1.0  # one redis.timeout_s (0.25 s), not a retry more
        await until(lambda: not link.up)  # a ping on a fresh connection did not answer either
        started = time.monotonic()
        for _ in range(100):
            with pytest.raises(RedisDown):
                await cache.load("b")
        assert time.monotonic() - started < 0.1
    finally:
        redis_server.resume()
    async with asyncio.timeout(10):
        await link.until_up()
    assert await cache.load("b") is None


async def test_a_lock_whose_taking_went_unanswered_is_freed_at_once_not_after_its_ttl(open_link: OpenLink) -> None:
    """Redis took the lock but its answer was lost (a timeout just after it ran the script)."""
    link = await open_link()
    cache = SharedCache(link, time.monotonic, lambda: 30.0)
    take_lock = cache._lock

    async def lock_then_lose_the_answer(batch_id: str, token: str) -> tuple[int, object]:
        await take_lock(batch_id, token)
        raise RedisDown("lock")

    cache._lock = lock_then_lose_the_answer  # type: ignore[method-assign]

    async def produce() -> tuple[CacheEntry, bool]:
        return entry(time.monotonic()), True

    with pytest.raises(RedisDown):
        await cache.settle("b", lambda _e: False, produce)
    # Nobody else knows its token: left alone, it would hold every process up for 30 s.
    async with asyncio.timeout(10):
        await until_async(lambda: link.client.exists(link.key("lock", "b")), want=False, within_s=2)


async def test_an_older_answer_never_replaces_a_newer_one_in_redis(open_link: OpenLink) -> None:
    cache = SharedCache(await open_link(), time.monotonic, lambda: 5.0)
    newer = CacheEntry(200, b'{"v": 2}', time.monotonic(), time.monotonic() + 5, time.monotonic() + 600, '"2"', 2000.0)
    older = CacheEntry(200, b'{"v": 1}', time.monotonic(), time.monotonic() + 5, time.monotonic() + 600, '"1"', 1500.0)
    active_again = CacheEntry(
        200, b'{"v": 3}', time.monotonic(), time.monotonic() + 5, time.monotonic() + 600, '"3"', 2500.0
    )
    done = CacheEntry(
        200, b'{"v": 9}', time.monotonic(), time.monotonic() + 5, time.monotonic() + 600, '"9"', 2400.0, True
    )
    assert await cache.save("b", newer)
    assert not await cache.save("b", older)
    assert (await cache.load("b")).etag == '"2"'  # type: ignore[union-attr]
    assert await cache.save("b", done)
    # Active after terminal is older, whatever its updated_at says.
    assert not await cache.save("b", active_again)
    assert (await cache.load("b")).etag == '"9"'  # type: ignore[union-attr]


async def test_a_flight_that_lost_its_lock_to_a_cancel_stores_nothing(open_link: OpenLink) -> None:
    cache = SharedCache(await open_link(), time.monotonic, lambda: 5.0)
    started, release = asyncio.Event(), asyncio.Event()

    async def produce() -> tuple[CacheEntry, bool]:
        started.set()
        await release.wait()
        return entry(time.monotonic(), body=b'{"batch": {"status": "before the cancel"}}'), True

    async with asyncio.timeout(10):
        flight = asyncio.ensure_future(cache.settle("b", lambda _e: False, produce))
        await started.wait()
        await cache.drop("b")  # a cancel through another process
        release.set()
        await flight
        assert await cache.load("b") is None


async def test_a_redis_that_refuses_calls_fails_no_request(
    start: GatewayFactory, simulator: Simulator, redis_server: RedisServer
) -> None:
    gateway = await start(make_config(simulator.url, redis={"url": redis_server.url}))
    admin = redis_server.client()
    try:
        # A key of the wrong type where the budget lives: its script fails with an error reply.
        await admin.set("cohere-gateway:budget", "not a hash")
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)  # every write is refused: OOM
        async with asyncio.timeout(30):
            answers = [await http(f"{gateway.url}/v2/batches/batch-oom-{n}") for n in range(3)]
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
    assert [answer.status for answer in answers] == [200, 200, 200]
    # Each refusal failed that call alone: the lock (OOM), the budget (WRONGTYPE); Redis was never "lost".
    assert registry_value(gateway, "gateway_redis_errors_total", operation="lock") == 3
    assert registry_value(gateway, "gateway_redis_errors_total", operation="budget") == 3
    assert registry_value(gateway, "gateway_redis_up") == 1


# --- a caller's own rate_limit, shared (docs/design.md §7) ------------------------------------------------------

# rate 0.01/s: no refill to speak of during a test.
CALLER_LIMIT = {"requests_per_s": 0.01, "burst": 4}


async def test_a_callers_bucket_is_one_for_every_process_and_apart_from_other_callers_and_the_budget(
    open_link: OpenLink,
) -> None:
    here, there = SharedCallerLimits(await open_link()), SharedCallerLimits(await open_link())
    waits = [await (here, there)[n % 2].take("billing-service", 0.01, 4) for n in range(6)]
    budget = SharedBudget(here.link, time.monotonic)

    assert waits[:4] == [0.0] * 4
    assert all(wait > 50 for wait in waits[4:])
    assert await there.take("reporting", 0.01, 4) == 0.0
    assert (await budget.take(0.01, 4, reserve=0))[0] == TOKEN


async def two_gateways_on_one_redis(
    start: GatewayFactory, simulator: Simulator, redis_server: RedisServer
) -> list[RunningGateway]:
    limited = [{"name": "billing-service", "key": BILLING_KEY, "rate_limit": CALLER_LIMIT}]
    config = make_config(simulator.url, callers=limited, redis={"url": redis_server.url, "probe_interval_s": 0.1})
    return [await start(config), await start(config)]


async def test_two_gateways_on_one_redis_give_a_caller_its_rate_limit_once_not_twice(
    start: GatewayFactory, simulator: Simulator, redis_server: RedisServer
) -> None:
    gateways = await two_gateways_on_one_redis(start, simulator, redis_server)

    # Kept-alive hits on one connection, which a gateway answers inline when it can.
    async with asyncio.timeout(30):
        answers = [
            await pipelined(gateway.url, request_bytes("/v2/batches/batch-limited", close=False) * 2, 2)
            for gateway in gateways * 2
        ]

    statuses = [answer.status for pair in answers for answer in pair]
    assert statuses.count(200) == 4, statuses
    assert {(a.status, a.code) for pair in answers for a in pair if a.status != 200} == {(429, "caller_rate_limited")}
    refused = sum(registry_value(g, "gateway_caller_rate_limited_total", caller="billing-service") for g in gateways)
    assert refused == 4


async def test_with_redis_lost_each_gateway_gives_a_caller_its_share_of_the_rate_limit(
    start: GatewayFactory, simulator: Simulator, redis_server: RedisServer
) -> None:
    gateways = await two_gateways_on_one_redis(start, simulator, redis_server)
    links = [gateway.state.redis for gateway in gateways]
    await until(lambda: all(link is not None and link.alive == 2 for link in links))  # each heard the other

    redis_server.kill()
    async with asyncio.timeout(30):
        answers = [[await http(f"{g.url}/v2/batches/batch-limited") for _ in range(4)] for g in gateways]

    # Each of the two last seen alive takes half the burst: 2 each, 4 in all, as with Redis.
    assert [[answer.status for answer in served] for served in answers] == [[200, 200, 429, 429]] * 2
    assert all(link is not None and not link.up for link in links)
