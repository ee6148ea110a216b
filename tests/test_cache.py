"""The cache as a poller sees it: through the real gateway, with a fake upstream.

Time that decides freshness is a FakeClock; the upstream holds its answers
(``up.hold``) until every request a test sends is in flight.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import cohere
import pytest
from aiohttp import web

from gateway.edge.server import RunningGateway
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    FakeClock,
    Samples,
    eventually,
    make_config,
    registry_value,
    scrape_metrics,
    sdk,
)
from tests.upstream import Upstream, batch_body, json_handler

ACTIVE, TERMINAL, NOT_FOUND, KEEP = 5, 3600, 10, 60
AUTH = {"Authorization": f"Bearer {BILLING_KEY}"}


def cache_config(url: str, **cache: Any) -> Any:
    """Round TTLs, no jitter (tests that want it say so), one upstream call per failure."""
    settings = {
        "ttl_s": {"active": ACTIVE, "terminal": TERMINAL, "not_found": NOT_FOUND},
        "stale_if_error_s": KEEP,
        "active_jitter": 0,
        **cache,
    }
    return make_config(url, cache=settings, upstream={"retries": 0})


class Scripted:
    """An upstream handler whose answer the test changes as it goes: (status, body)."""

    def __init__(self, status: int = 200, body: bytes | None = None) -> None:
        self.status = status
        self.body = body

    def answer(self, status: int, body: bytes | None = None) -> None:
        self.status, self.body = status, body

    async def __call__(self, request: web.Request) -> web.Response:
        batch_id = request.path.rsplit("/", 1)[-1]
        body = self.body if self.body is not None else batch_body(batch_id)
        if self.status != 200 and self.body is None:
            body = json.dumps({"message": f"upstream says {self.status}"}).encode()
        return web.Response(status=self.status, body=body, content_type="application/json")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client: no connection limit, so hundreds of requests can be in flight."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as client:
        yield client


async def ask(session: aiohttp.ClientSession, gateway: RunningGateway, batch_id: str) -> tuple[int, Any, bytes]:
    async with session.get(f"{gateway.url}/v2/batches/{batch_id}", headers=AUTH) as response:
        return response.status, response.headers, await response.read()


def requests_with_cache(scraped: Samples, cache: str) -> float:
    return sum(
        value
        for (name, labels), value in scraped.items()
        if name == "gateway_requests_total" and ("cache", cache) in labels and ("route", "/v2/batches/{id}") in labels
    )


# --- Single-flight ------------------------------------------------------------


async def test_two_hundred_concurrent_requests_for_one_id_make_one_upstream_call(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    body = batch_body("batch-hot", status="BATCH_STATUS_IN_PROGRESS", name="the one answer")
    up = upstream.script(json_handler(body=body))
    release = up.hold(times=None)
    gateway = await start(cache_config(up.url))
    requests = [asyncio.ensure_future(ask(session, gateway, "batch-hot")) for _ in range(200)]
    await up.arrived.wait()
    assert await eventually(lambda: registry_value(gateway, "gateway_singleflight_coalesced_total") == 199)
    assert len(gateway.state.cache.flights) == 1
    release.set()
    answers = await asyncio.gather(*requests)
    assert up.count() == 1
    assert {status for status, _headers, _body in answers} == {200}
    assert {answer_body for _status, _headers, answer_body in answers} == {body}
    assert {headers["X-Cache"] for _status, headers, _body in answers} == {"MISS"}
    assert len(gateway.state.cache.flights) == 0
    status, headers, again = await ask(session, gateway, "batch-hot")
    assert (status, headers["X-Cache"], again, up.count()) == (200, "HIT", body, 1)


async def test_leader_disconnect_does_not_cancel_the_shared_fetch(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    up = upstream.script(json_handler())
    release = up.hold(times=None)
    gateway = await start(cache_config(up.url))
    leader = asyncio.ensure_future(ask(session, gateway, "batch-1"))
    await up.arrived.wait()
    waiters = [asyncio.ensure_future(ask(session, gateway, "batch-1")) for _ in range(5)]
    assert await eventually(lambda: registry_value(gateway, "gateway_singleflight_coalesced_total") == 5)
    leader.cancel()  # closes the leader's connection mid-fetch
    await asyncio.gather(leader, return_exceptions=True)
    release.set()
    answers = await asyncio.gather(*waiters)
    assert [status for status, _headers, _body in answers] == [200] * 5
    assert {body for _status, _headers, body in answers} == {batch_body("batch-1")}
    assert up.count() == 1
    assert len(gateway.state.cache.flights) == 0


async def test_a_fetch_whose_only_caller_left_still_fills_the_cache(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    up = upstream.script(json_handler())
    release = up.hold(times=None)
    gateway = await start(cache_config(up.url))
    only = asyncio.ensure_future(ask(session, gateway, "batch-1"))
    await up.arrived.wait()
    only.cancel()
    await asyncio.gather(only, return_exceptions=True)
    release.set()
    assert await eventually(lambda: len(gateway.state.cache.flights) == 0)
    status, headers, _body = await ask(session, gateway, "batch-1")
    assert (status, headers["X-Cache"], up.count()) == (200, "HIT", 1)


async def test_concurrent_waiters_share_one_failure_and_the_next_request_tries_again(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    scripted = Scripted(500)
    up = upstream.script(scripted)
    release = up.hold(times=None)
    gateway = await start(cache_config(up.url))
    requests = [asyncio.ensure_future(ask(session, gateway, "batch-1")) for _ in range(20)]
    await up.arrived.wait()
    assert await eventually(lambda: registry_value(gateway, "gateway_singleflight_coalesced_total") == 19)
    release.set()
    answers = await asyncio.gather(*requests)
    assert {status for status, _headers, _body in answers} == {502}
    assert {json.loads(body)["code"] for _status, _headers, body in answers} == {"upstream_error"}
    assert up.count() == 1
    assert len(gateway.state.cache.flights) == 0  # nothing left behind
    scripted.answer(200)
    status, headers, body = await ask(session, gateway, "batch-1")
    assert (status, headers["X-Cache"], body, up.count()) == (200, "MISS", batch_body("batch-1"), 2)


# --- TTLs ---------------------------------------------------------------------


async def test_active_entries_expire_after_the_active_ttl(start: GatewayFactory, upstream: Upstream) -> None:
    up = upstream.script(json_handler())
    clock = FakeClock()
    gateway = await start(cache_config(up.url), clock=clock)
    client = sdk(gateway.url)
    first = await client.batches.with_raw_response.retrieve("batch-1")
    assert (first.headers["x-cache"], first.headers["age"], first.headers["cache-control"]) == (
        "MISS",
        "0",
        f"private, max-age={ACTIVE}",
    )
    clock.advance(ACTIVE - 0.5)
    hit = await client.batches.with_raw_response.retrieve("batch-1")
    assert (hit.headers["x-cache"], hit.headers["age"], hit.headers["cache-control"]) == (
        "HIT",
        "4",
        "private, max-age=0",
    )
    assert up.count() == 1
    clock.advance(1)
    refreshed = await client.batches.with_raw_response.retrieve("batch-1")
    assert (refreshed.headers["x-cache"], refreshed.headers["age"]) == ("MISS", "0")
    assert refreshed.data.batch.id == "batch-1"
    assert up.count() == 2


async def test_terminal_entries_outlive_the_active_ttl(start: GatewayFactory, upstream: Upstream) -> None:
    up = upstream.script(json_handler(body=batch_body("batch-1", status="BATCH_STATUS_COMPLETED")))
    clock = FakeClock()
    gateway = await start(cache_config(up.url), clock=clock)
    client = sdk(gateway.url)
    await client.batches.retrieve("batch-1")
    clock.advance(ACTIVE * 100)
    late = await client.batches.with_raw_response.retrieve("batch-1")
    assert late.headers["x-cache"] == "HIT"
    assert late.headers["cache-control"] == f"private, max-age={TERMINAL - ACTIVE * 100}"
    assert late.data.batch.status == "BATCH_STATUS_COMPLETED"
    assert up.count() == 1
    clock.advance(TERMINAL)
    assert (await client.batches.with_raw_response.retrieve("batch-1")).headers["x-cache"] == "MISS"
    assert up.count() == 2


async def test_an_active_batch_turning_terminal_is_seen_at_the_next_refresh_then_pinned(
    start: GatewayFactory, upstream: Upstream
) -> None:
    scripted = Scripted(200, batch_body("batch-1", status="BATCH_STATUS_IN_PROGRESS"))
    up = upstream.script(scripted)
    clock = FakeClock()
    gateway = await start(cache_config(up.url), clock=clock)
    client = sdk(gateway.url)
    assert (await client.batches.retrieve("batch-1")).batch.status == "BATCH_STATUS_IN_PROGRESS"
    scripted.answer(200, batch_body("batch-1", status="BATCH_STATUS_COMPLETED"))
    clock.advance(ACTIVE - 1)
    assert (await client.batches.retrieve("batch-1")).batch.status == "BATCH_STATUS_IN_PROGRESS"  # still fresh
    clock.advance(2)
    seen = await client.batches.with_raw_response.retrieve("batch-1")
    assert (seen.data.batch.status, seen.headers["x-cache"]) == ("BATCH_STATUS_COMPLETED", "MISS")
    assert seen.headers["cache-control"] == f"private, max-age={TERMINAL}"
    scripted.answer(500)  # the upstream is never asked again while the terminal TTL lasts
    for _ in range(5):
        clock.advance(TERMINAL / 6)
        pinned = await client.batches.with_raw_response.retrieve("batch-1")
        assert (pinned.data.batch.status, pinned.headers["x-cache"]) == ("BATCH_STATUS_COMPLETED", "HIT")
    assert up.count() == 2


async def test_a_404_is_cached_for_the_not_found_ttl(start: GatewayFactory, upstream: Upstream) -> None:
    up = upstream.script(json_handler(404, b'{"message": "batch missing-1 not found"}'))
    clock = FakeClock()
    gateway = await start(cache_config(up.url), clock=clock)
    client = sdk(gateway.url)
    with pytest.raises(cohere.NotFoundError) as first:
        await client.batches.retrieve("missing-1")
    assert first.value.headers is not None
    assert first.value.headers["x-cache"] == "MISS"
    assert first.value.body["code"] == "not_found"
    clock.advance(NOT_FOUND - 1)
    with pytest.raises(cohere.NotFoundError) as second:
        await client.batches.retrieve("missing-1")
    assert second.value.headers is not None
    assert (second.value.headers["x-cache"], second.value.headers["age"]) == ("HIT", str(NOT_FOUND - 1))
    assert second.value.body["message"] == "batch missing-1 not found"
    assert up.count() == 1
    clock.advance(2)
    with pytest.raises(cohere.NotFoundError):
        await client.batches.retrieve("missing-1")
    assert up.count() == 2


@pytest.mark.parametrize(
    ("upstream_status", "gateway_status"),
    [(400, 400), (401, 502), (403, 502), (500, 502), (502, 502), (503, 503), (504, 502)],
)
async def test_other_upstream_errors_are_not_cached(
    start: GatewayFactory,
    upstream: Upstream,
    session: aiohttp.ClientSession,
    upstream_status: int,
    gateway_status: int,
) -> None:
    scripted = Scripted(upstream_status)
    up = upstream.script(scripted)
    gateway = await start(cache_config(up.url))
    for calls in (1, 2):
        status, headers, _body = await ask(session, gateway, "batch-1")
        assert (status, up.count()) == (gateway_status, calls)
        # Still a batch answer, but nothing was cached and nothing may be reused.
        assert (headers["X-Cache"], headers["Cache-Control"]) == ("MISS", "no-store")
    assert len(gateway.state.cache.flights) == 0
    assert len(gateway.state.cache.store) == 0
    scripted.answer(200)
    status, headers, _body = await ask(session, gateway, "batch-1")
    assert (status, headers["X-Cache"], up.count()) == (200, "MISS", 3)


# --- Stale-if-error -----------------------------------------------------------


@pytest.mark.parametrize("upstream_status", [500, 502, 503, 504, 401, 403, 429])
async def test_a_stale_entry_is_served_when_the_upstream_fails(
    start: GatewayFactory, upstream: Upstream, upstream_status: int
) -> None:
    scripted = Scripted(200)
    up = upstream.script(scripted)
    clock = FakeClock()
    gateway = await start(cache_config(up.url), clock=clock)
    client = sdk(gateway.url)
    await client.batches.retrieve("batch-1")
    scripted.answer(upstream_status)
    clock.advance(ACTIVE + KEEP - 1)
    stale = await client.batches.with_raw_response.retrieve("batch-1")
    assert stale.data.batch.id == "batch-1"
    assert (stale.headers["x-cache"], stale.headers["age"], stale.headers["cache-control"]) == (
        "STALE",
        str(ACTIVE + KEEP - 1),
        "private, max-age=0",
    )
    assert up.count() == 2


async def ask_again_after_a_failure(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession, status: int, after_s: float
) -> tuple[Upstream, tuple[int, Any, bytes]]:
    """Cache batch-1, let the upstream answer ``status`` from now on, move ``after_s`` on and ask again."""
    scripted = Scripted(200)
    up = upstream.script(scripted)
    clock = FakeClock()
    gateway = await start(cache_config(up.url), clock=clock)
    await ask(session, gateway, "batch-1")
    scripted.answer(status)
    clock.advance(after_s)
    return up, await ask(session, gateway, "batch-1")


async def test_no_stale_entry_is_served_past_stale_if_error(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    up, (status, headers, body) = await ask_again_after_a_failure(start, upstream, session, 500, ACTIVE + KEEP + 0.5)
    assert (status, json.loads(body)["code"]) == (502, "upstream_error")
    assert "X-Cache" not in headers or headers["X-Cache"] != "STALE"
    assert up.count() == 2


async def test_an_upstream_400_is_passed_on_even_when_a_stale_entry_is_kept(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    _up, (status, _headers, body) = await ask_again_after_a_failure(start, upstream, session, 400, ACTIVE + 1)
    assert (status, json.loads(body)["code"]) == (400, "bad_request")


# --- Spread expiry ------------------------------------------------------------


async def test_active_ttls_are_shortened_by_the_configured_spread(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    up = upstream.script(json_handler())
    clock = FakeClock()
    gateway = await start(cache_config(up.url, ttl_s={"active": 10}, active_jitter=0.5), clock=clock)
    gateway.state.cache.jitter = lambda: 0.5  # 10 s shortened by 0.5 * 0.5 = 25 %: 7.5 s
    _status, headers, _body = await ask(session, gateway, "batch-1")
    assert headers["Cache-Control"] == "private, max-age=7"
    clock.advance(7.4)
    assert (await ask(session, gateway, "batch-1"))[1]["X-Cache"] == "HIT"
    clock.advance(0.2)
    assert (await ask(session, gateway, "batch-1"))[1]["X-Cache"] == "MISS"
    assert up.count() == 2


# --- The bound, the budget, the metrics ---------------------------------------


async def test_the_cache_never_holds_more_than_max_entries(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    up = upstream.script(json_handler())
    gateway = await start(cache_config(up.url, max_entries=20))
    for i in range(60):
        status, _headers, _body = await ask(session, gateway, f"batch-{i}")
        assert status == 200
        assert len(gateway.state.cache.store) <= 20
    _, scraped = await scrape_metrics(gateway.url)
    assert scraped[("gateway_cache_entries", frozenset())] == 20
    assert scraped[("gateway_cache_removals_total", frozenset({("reason", "evicted")}))] == 40
    # The least recently used went first: the newest answer is there, the oldest is asked again.
    assert (await ask(session, gateway, "batch-59"))[1]["X-Cache"] == "HIT"
    assert (await ask(session, gateway, "batch-0"))[1]["X-Cache"] == "MISS"
    assert up.count() == 61


async def test_a_poller_with_nothing_cached_waits_briefly_for_budget_instead_of_a_429(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    up = upstream.script(json_handler())
    # Real clock: one token now, the next in 50 ms (well within budget_wait_s).
    config = make_config(up.url, upstream={"rate_limit": {"requests_per_s": 20, "burst": 1}, "budget_wait_s": 5})
    gateway = await start(config)
    assert (await ask(session, gateway, "batch-1"))[0] == 200
    status, headers, _body = await ask(session, gateway, "batch-2")
    assert (status, headers["X-Cache"], up.count()) == (200, "MISS", 2)


async def test_metrics_count_hits_misses_stale_answers_coalesced_waiters_entries_and_removals(
    start: GatewayFactory, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    scripted = Scripted(200)
    up = upstream.script(scripted)
    clock = FakeClock()
    gateway = await start(cache_config(up.url, max_entries=2), clock=clock)
    release = up.hold(times=None)
    together = [asyncio.ensure_future(ask(session, gateway, "batch-a")) for _ in range(4)]
    await up.arrived.wait()
    assert await eventually(lambda: registry_value(gateway, "gateway_singleflight_coalesced_total") == 3)
    release.set()
    await asyncio.gather(*together)  # 4 MISS, 3 of them coalesced
    for _ in range(2):
        await ask(session, gateway, "batch-a")  # 2 HIT
    clock.advance(ACTIVE + 1)
    scripted.answer(503)
    await ask(session, gateway, "batch-a")  # 1 STALE
    scripted.answer(200)
    await ask(session, gateway, "batch-b")  # 1 MISS
    await ask(session, gateway, "batch-c")  # 1 MISS, evicts the least recently used (batch-a)
    clock.advance(ACTIVE + KEEP + 1)  # batch-b and batch-c expire
    _, scraped = await scrape_metrics(gateway.url)
    assert requests_with_cache(scraped, "MISS") == 6
    assert requests_with_cache(scraped, "HIT") == 2
    assert requests_with_cache(scraped, "STALE") == 1
    assert scraped[("gateway_singleflight_coalesced_total", frozenset())] == 3
    assert scraped[("gateway_cache_entries", frozenset())] == 0
    assert scraped[("gateway_cache_removals_total", frozenset({("reason", "evicted")}))] == 1
    assert scraped[("gateway_cache_removals_total", frozenset({("reason", "expired")}))] == 2
    assert scraped[("gateway_singleflight_inflight", frozenset())] == 0
    assert up.count() == 4


async def test_every_caller_shares_one_entry_per_batch_id(start: GatewayFactory, upstream: Upstream) -> None:
    up = upstream.script(json_handler())
    gateway = await start(cache_config(up.url))
    await sdk(gateway.url, BILLING_KEY).batches.retrieve("batch-1")
    again = await sdk(gateway.url, REPORTING_KEY).batches.with_raw_response.retrieve("batch-1")
    assert (again.headers["x-cache"], up.count()) == ("HIT", 1)
