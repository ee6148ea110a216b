"""Waiting for a change (docs/design.md §9), as a caller sees it.

ETags and 304 on both ways a hit is answered, ``Prefer: wait=N`` with and
without ``If-None-Match``, the bounds on waiting (``cache.max_wait_s``,
``cache.max_waiters``, the caller's rate limit), what wakes a waiter (a
refresh that changed the body, a cancel, SIGTERM, its client leaving), what
waiting costs the upstream, and answers that only move forward.

The length of a wait and the refresher's sleeps are on real time: the
waits here are short (``wait=1`` or ``wait=2``) where the passing of time is
the behaviour, and ``cache.ttl_s.active_min`` is small where the refresher's
cadence matters.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.demo.simulator import Simulator, start_simulator
from gateway.edge.server import RunningGateway, start_gateway
from gateway.runtime import build_state
from tests.conftest import GatewayFactory, ProcessFactory
from tests.support import (
    BILLING_KEY,
    PROCESS_WAIT_S,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    Answer,
    FakeClock,
    eventually,
    http,
    make_config,
    pipelined,
    process_config,
    registry_value,
    request_bytes,
    sample_value,
    scrape_metrics,
    sdk,
    write_config,
)
from tests.upstream import Upstream, batch_body, json_handler, post_json, write_callers

# Headers that differ between any two answers, whichever way they were made.
PER_ANSWER = {"Date", "X-Request-ID", "Connection"}
CACHE_HEADERS = ("X-Cache", "Age", "Cache-Control", "ETag")
HELD_WITHIN_S = 10.0  # bound on waiting for requests to be held (2 shared cores)
# The refresher's cadence in tests where it matters.
QUICK_TTL = {"active": 1, "active_min": 0.2, "active_max": 10}


def kept_alive(target: str = "/v2/batches/batch-1", **kwargs: Any) -> bytes:
    return request_bytes(target, close=False, **kwargs)


def waiting(seconds: int, etag: str | None = None) -> dict[str, str]:
    headers = {"Prefer": f"wait={seconds}"}
    if etag is not None:
        headers["If-None-Match"] = etag
    return headers


def waiters(gateway: RunningGateway) -> float:
    return registry_value(gateway, "gateway_waiters")


def waits_ended(gateway: RunningGateway, reason: str) -> float:
    return registry_value(gateway, "gateway_waits_ended_total", reason=reason)


async def held(gateway: RunningGateway, count: int) -> None:
    """Until ``count`` requests are held by the gateway (bounded)."""
    assert await eventually(lambda: waiters(gateway) >= count, HELD_WITHIN_S), waiters(gateway)


class Switchable:
    """An upstream handler whose answer the test changes: ``body`` for every id."""

    def __init__(self, body: bytes, status: int = 200) -> None:
        self.body = body
        self.status = status

    async def __call__(self, request: web.Request) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type="application/json")


async def timed(answer: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = await answer
    return result, time.monotonic() - started


def stamp(seconds_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat().replace("+00:00", "Z")


# --- ETag and 304 ----------------------------------------------------------------------------------------------


async def a_gateway_holding_batch_1(
    upstream: Upstream, start: GatewayFactory
) -> tuple[RunningGateway, Upstream, Answer, str]:
    """A gateway in front of a steady upstream, with batch-1 cached: both, the first answer, and its ETag."""
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    first = await http(f"{gateway.url}/v2/batches/batch-1")
    etag = first.header("ETag")
    assert etag is not None
    return gateway, upstream, first, etag


async def test_every_batch_answer_carries_a_strong_etag_that_follows_its_body(
    upstream: Upstream, start: GatewayFactory
) -> None:
    handler = Switchable(batch_body("batch-1", num_successful_records=1))
    upstream.script(handler)
    clock = FakeClock()
    gateway = await start(make_config(upstream.url), clock=clock)
    url = f"{gateway.url}/v2/batches/batch-1"

    first, again = await http(url), await http(url)
    handler.body = batch_body("batch-1", num_successful_records=2)
    clock.advance(10)  # past ttl_s.active: the next answer is the upstream's new one
    changed = await http(url)

    etag = first.header("ETag")
    assert etag is not None
    assert etag.startswith('"')  # strong: no W/
    assert etag.endswith('"')
    assert len(etag) > 2
    assert (first.header("X-Cache"), again.header("X-Cache"), again.header("ETag")) == ("MISS", "HIT", etag)
    assert changed.body != first.body
    assert changed.header("ETag") not in (None, etag)


async def test_a_cached_404_carries_an_etag_and_a_wait_on_it_is_answered_at_once(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler(404, b'{"message": "no such batch"}'))
    gateway = await start(make_config(upstream.url))
    url = f"{gateway.url}/v2/batches/batch-gone"
    first = await http(url)
    etag = first.header("ETag")

    waited, elapsed = await timed(http(url, headers=waiting(30, etag)))
    unconditional, _ = await timed(http(url, headers=waiting(30)))

    assert (first.status, first.code) == (404, "not_found")
    assert etag is not None
    assert etag.startswith('"')
    for answer in (waited, unconditional):
        assert (answer.status, answer.code, answer.header("X-Cache")) == (404, "not_found", "HIT")
        assert answer.header("ETag") == etag
        assert answer.header("Preference-Applied") is None
    assert elapsed < 2
    assert upstream.count() == 1


def if_none_match_forms(etag: str) -> dict[str, str]:
    return {
        "the tag": etag,
        "star": "*",
        "weak form": f"W/{etag}",
        "in a list": f'"something-else", {etag}',
    }


@pytest.mark.parametrize("form", ["the tag", "star", "weak form", "in a list"])
async def test_if_none_match_naming_the_answer_gets_304_with_the_cache_headers_on_both_answer_paths(
    form: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway, upstream, _first, etag = await a_gateway_holding_batch_1(upstream, start)
    conditional = [("If-None-Match", if_none_match_forms(etag)[form])]

    # After a plain hit on the connection, a kept-alive hit is answered inline.
    plain, inline = await pipelined(gateway.url, kept_alive() + kept_alive(headers=conditional), 2)
    # Connection: close always goes through the app.
    [through_app] = await pipelined(gateway.url, request_bytes(headers=conditional), 1)

    assert plain.status == 200
    for answer in (inline, through_app):
        assert (answer.status, answer.body) == (304, b"")
        assert answer.header("ETag") == etag
        assert answer.header("X-Cache") == "HIT"
        for name in CACHE_HEADERS:
            assert answer.header(name) is not None, name
    assert set(inline.headers) - PER_ANSWER == set(through_app.headers) - PER_ANSWER
    for name in set(inline.headers) - PER_ANSWER:
        assert inline.headers.getall(name) == through_app.headers.getall(name), name
    assert upstream.count() == 1


async def test_if_none_match_naming_another_answer_gets_the_200_on_both_answer_paths(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    first = await http(f"{gateway.url}/v2/batches/batch-1")
    conditional = [("If-None-Match", '"not-this-one", W/"nor-this"')]

    _plain, inline = await pipelined(gateway.url, kept_alive() + kept_alive(headers=conditional), 2)
    [through_app] = await pipelined(gateway.url, request_bytes(headers=conditional), 1)

    for answer in (inline, through_app):
        assert (answer.status, answer.body, answer.header("ETag")) == (200, first.body, first.header("ETag"))
        assert answer.header("X-Cache") == "HIT"
    assert set(inline.headers) - PER_ANSWER == set(through_app.headers) - PER_ANSWER


# --- Prefer: wait ------------------------------------------------------------------------------------------------


async def test_a_wait_with_the_current_etag_ends_in_200_with_the_new_body_when_the_batch_changes(
    upstream: Upstream, start: GatewayFactory
) -> None:
    handler = Switchable(batch_body("batch-1", num_successful_records=1))
    upstream.script(handler)
    gateway = await start(make_config(upstream.url, cache={"ttl_s": QUICK_TTL}))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")

    waiter = asyncio.ensure_future(timed(http(url, headers=waiting(10, etag))))
    await held(gateway, 1)
    handler.body = batch_body("batch-1", num_successful_records=2)
    answer, elapsed = await waiter

    assert answer.status == 200
    assert answer.body == handler.body
    assert answer.header("ETag") not in (None, etag)
    assert answer.header("Preference-Applied") == "wait=10"
    assert elapsed < 5  # woken by the change, long before its 10 s were up
    assert (waits_ended(gateway, "changed"), waiters(gateway)) == (1, 0)


async def test_a_wait_on_a_kept_alive_connection_with_the_current_etag_ends_in_304_once_its_time_is_up(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway, _upstream, _first, etag = await a_gateway_holding_batch_1(upstream, start)
    wait = [("Prefer", "wait=1"), ("If-None-Match", etag)]

    # A plain hit first, so that the connection is one the inline path answers: the wait is held all the same.
    exchange = pipelined(gateway.url, kept_alive() + kept_alive(headers=wait), 2)
    (hit, waited), elapsed = await timed(exchange)

    assert (hit.status, hit.header("X-Cache")) == (200, "HIT")
    assert (waited.status, waited.body) == (304, b"")
    assert waited.header("Preference-Applied") == "wait=1"
    assert waited.header("ETag") == etag
    for name in CACHE_HEADERS:
        assert waited.header(name) is not None, name
    assert 1 - 1 / 16 - 0.02 <= elapsed < 3  # the end of a wait is jittered by at most N/16
    assert (waits_ended(gateway, "timeout"), waiters(gateway)) == (1, 0)


async def test_waiters_on_one_batch_do_not_all_return_together(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")
    started = time.monotonic()

    async def wait_once() -> float:
        answer = await http(url, headers=waiting(2, etag))
        assert (answer.status, answer.header("Preference-Applied")) == (304, "wait=2")
        return time.monotonic() - started

    ended = await asyncio.gather(*(wait_once() for _ in range(8)))

    assert min(ended) >= 2 - 2 / 16 - 0.02  # each ends within N/16 of its N seconds
    assert max(ended) < 4
    assert max(ended) - min(ended) > 0.01  # spread by the jitter (up to 125 ms here), not all at one moment


async def test_the_sdk_waiting_without_if_none_match_gets_the_new_state_when_the_batch_moves_on(
    start: GatewayFactory,
) -> None:
    # The simulator on a clock of the test's: the batch moves on when the test says so.
    upstream_clock = FakeClock()
    simulator = Simulator(token=UPSTREAM_TOKEN, lifetime_s=60, clock=upstream_clock)
    runner, _url = await start_simulator(simulator)
    try:
        gateway = await start(make_config(simulator.url, cache={"ttl_s": QUICK_TTL}))
        co = sdk(gateway.url)
        before = await co.batches.retrieve("batch-1")

        options: Any = {"additional_headers": {"Prefer": "wait=25"}, "timeout_in_seconds": 40}
        waiter = asyncio.ensure_future(timed(co.batches.retrieve("batch-1", request_options=options)))
        await held(gateway, 1)
        upstream_clock.advance(55)  # past 10% of its span at least: IN_PROGRESS, records done
        after, elapsed = await waiter
    finally:
        await runner.cleanup()

    assert before.batch.status == "BATCH_STATUS_QUEUED"
    assert after.batch.status != before.batch.status
    assert elapsed < 10
    assert waits_ended(gateway, "changed") == 1


async def test_a_wait_without_if_none_match_that_sees_no_change_ends_in_200_with_the_current_state(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    url = f"{gateway.url}/v2/batches/batch-1"
    first = await http(url)

    answer, elapsed = await timed(http(url, headers=waiting(1)))

    assert (answer.status, answer.body, answer.header("ETag")) == (200, first.body, first.header("ETag"))
    assert answer.header("Preference-Applied") == "wait=1"
    assert 1 - 1 / 16 - 0.02 <= elapsed < 3
    assert waits_ended(gateway, "timeout") == 1


async def test_a_wait_for_a_batch_the_gateway_never_saw_is_answered_at_once(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))

    answer, elapsed = await timed(http(f"{gateway.url}/v2/batches/batch-new", headers=waiting(30)))

    # Nothing was held on arrival: the first answer is the change the caller waits for.
    assert (answer.status, answer.header("X-Cache")) == (200, "MISS")
    assert answer.document["batch"]["id"] == "batch-new"
    assert elapsed < 2


async def test_a_wait_is_capped_at_max_wait_s_and_preference_applied_says_so(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url, cache={"max_wait_s": 1}))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")

    answer, elapsed = await timed(http(url, headers=waiting(30, etag)))

    assert (answer.status, answer.header("Preference-Applied")) == (304, "wait=1")
    assert 1 - 1 / 16 - 0.02 <= elapsed < 3


@pytest.mark.parametrize("conditional", [True, False], ids=["with If-None-Match", "without"])
async def test_a_terminal_batch_is_answered_at_once_without_preference_applied(
    conditional: bool, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler(body=batch_body("batch-1", "BATCH_STATUS_COMPLETED")))
    gateway = await start(make_config(upstream.url))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")

    answer, elapsed = await timed(http(url, headers=waiting(30, etag if conditional else None)))

    assert answer.status == (304 if conditional else 200)
    assert answer.header("Preference-Applied") is None
    assert answer.header("ETag") == etag
    assert elapsed < 2
    assert waiters(gateway) == 0


async def test_a_wait_whose_if_none_match_does_not_match_is_answered_at_once_with_200(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    url = f"{gateway.url}/v2/batches/batch-1"
    first = await http(url)

    answer, elapsed = await timed(http(url, headers=waiting(30, '"an-answer-it-no-longer-is"')))

    assert (answer.status, answer.body, answer.header("ETag")) == (200, first.body, first.header("ETag"))
    assert answer.header("Preference-Applied") is None
    assert elapsed < 2


async def test_past_max_waiters_a_new_wait_is_answered_at_once_without_preference_applied_and_counted(
    upstream: Upstream, start: GatewayFactory
) -> None:
    handler = Switchable(batch_body("batch-1", num_successful_records=1))
    upstream.script(handler)
    gateway = await start(make_config(upstream.url, cache={"max_waiters": 2, "ttl_s": QUICK_TTL}))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")

    first_two = [asyncio.ensure_future(http(url, headers=waiting(10, etag))) for _ in range(2)]
    await held(gateway, 2)
    third, elapsed = await timed(http(url, headers=waiting(10, etag)))
    handler.body = batch_body("batch-1", num_successful_records=2)
    woken = await asyncio.gather(*first_two)

    assert (third.status, third.header("Preference-Applied")) == (304, None)
    assert elapsed < 2
    assert waits_ended(gateway, "limit") == 1
    assert [(a.status, a.header("Preference-Applied")) for a in woken] == [(200, "wait=10")] * 2


async def test_a_caller_past_its_own_waiter_cap_is_answered_at_once_while_another_caller_still_waits(
    upstream: Upstream, start: GatewayFactory
) -> None:
    handler = Switchable(batch_body("batch-1", num_successful_records=1))
    upstream.script(handler)
    config = make_config(upstream.url, cache={"max_waiters": 100, "max_waiters_per_caller": 2, "ttl_s": QUICK_TTL})
    gateway = await start(config)
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")

    billings = [asyncio.ensure_future(http(url, headers=waiting(10, etag))) for _ in range(2)]
    await held(gateway, 2)
    past_cap, elapsed = await timed(http(url, headers=waiting(10, etag)))
    reporting = asyncio.ensure_future(http(url, key=REPORTING_KEY, headers=waiting(10, etag)))
    await held(gateway, 3)
    handler.body = batch_body("batch-1", num_successful_records=2)
    woken = await asyncio.gather(*billings, reporting)

    assert (past_cap.status, past_cap.header("Preference-Applied")) == (304, None)
    assert elapsed < 2
    assert waits_ended(gateway, "caller_limit") == 1
    assert waits_ended(gateway, "limit") == 0
    assert [(a.status, a.header("Preference-Applied")) for a in woken] == [(200, "wait=10")] * 3


async def test_a_wait_counts_once_against_the_callers_rate_limit(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler())
    limited = [{"name": "billing-service", "key": BILLING_KEY, "rate_limit": {"requests_per_s": 0.01, "burst": 3}}]
    gateway = await start(make_config(upstream.url, callers=limited, cache={"ttl_s": QUICK_TTL}))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")  # token 1 of 3

    # Held through several refreshes of the batch, then its own read of the cache: one token all the same.
    waited = await http(url, headers=waiting(1, etag))  # token 2
    third = await http(url)  # token 3
    fourth = await http(url)

    assert (waited.status, waited.header("Preference-Applied")) == (304, "wait=1")
    assert third.status == 200
    assert (fourth.status, fourth.code) == (429, "caller_rate_limited")


# --- what waiting costs, and what wakes a waiter -----------------------------------------------------------------


async def test_a_hundred_waiters_on_one_batch_cost_at_most_one_upstream_call_per_active_min(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url, cache={"ttl_s": QUICK_TTL, "max_waiters": 1000}))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")
    wait_s = 2

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def wait_once() -> int:
            headers = {"Authorization": f"Bearer {BILLING_KEY}", **waiting(wait_s, etag)}
            async with session.get(url, headers=headers) as response:
                assert response.headers.get("Preference-Applied") == f"wait={wait_s}"
                return response.status

        calls_before = upstream.count()
        started = time.monotonic()
        waits = [asyncio.ensure_future(wait_once()) for _ in range(100)]
        await held(gateway, 100)
        statuses = await asyncio.gather(*waits)
        elapsed = time.monotonic() - started

    assert statuses == [304] * 100
    refreshes = upstream.count() - calls_before
    assert 1 <= refreshes <= elapsed / QUICK_TTL["active_min"] + 1, (refreshes, elapsed)


async def test_a_refresh_whose_body_changed_wakes_every_waiter(upstream: Upstream, start: GatewayFactory) -> None:
    handler = Switchable(batch_body("batch-1", num_successful_records=1))
    upstream.script(handler)
    gateway = await start(make_config(upstream.url, cache={"ttl_s": QUICK_TTL}))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")

    conditional = [asyncio.ensure_future(http(url, headers=waiting(20, etag))) for _ in range(10)]
    unconditional = [asyncio.ensure_future(http(url, headers=waiting(20))) for _ in range(10)]
    await held(gateway, 20)
    handler.body = batch_body("batch-1", num_successful_records=2)
    answers, elapsed = await timed(asyncio.gather(*conditional, *unconditional))

    assert {(a.status, a.body, a.header("Preference-Applied")) for a in answers} == {(200, handler.body, "wait=20")}
    assert elapsed < 5
    assert (waits_ended(gateway, "changed"), waiters(gateway)) == (20, 0)


async def test_a_poll_that_fetches_a_changed_body_wakes_the_waiters_at_once(
    upstream: Upstream, start: GatewayFactory
) -> None:
    handler = Switchable(batch_body("batch-1", num_successful_records=1))
    upstream.script(handler)
    clock = FakeClock()
    # The refresher's own next call is 5 s away: only the poll can bring the change sooner.
    slow = {"active": 5, "active_min": 5, "active_max": 10}
    gateway = await start(make_config(upstream.url, cache={"ttl_s": slow}), clock=clock)
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")

    waiter = asyncio.ensure_future(timed(http(url, headers=waiting(20, etag))))
    await held(gateway, 1)
    handler.body = batch_body("batch-1", num_successful_records=2)
    clock.advance(10)  # the entry is past its time: the next poll asks the upstream
    polled = await http(url)
    answer, elapsed = await waiter

    assert (polled.status, polled.body, polled.header("X-Cache")) == (200, handler.body, "MISS")
    assert (answer.status, answer.body, answer.header("Preference-Applied")) == (200, handler.body, "wait=20")
    assert elapsed < 4


async def test_a_hit_pipelined_behind_a_held_wait_is_answered_after_it(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway, _upstream, first, etag = await a_gateway_holding_batch_1(upstream, start)
    wait = [("Prefer", "wait=1"), ("If-None-Match", etag)]

    answers = await pipelined(gateway.url, kept_alive() + kept_alive(headers=wait) + kept_alive(), 3)

    assert [(a.status, a.header("Preference-Applied")) for a in answers] == [(200, None), (304, "wait=1"), (200, None)]
    assert answers[2].body == first.body


async def test_a_cancel_wakes_the_waiters_of_that_batch_with_the_new_state(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("batch-a")
    upstream.seed("batch-b")
    gateway = await start(make_config(upstream.url, callers=write_callers()))
    co = sdk(gateway.url)
    await co.batches.retrieve("batch-a")
    other_etag = (await http(f"{gateway.url}/v2/batches/batch-b")).header("ETag")

    options: Any = {"additional_headers": {"Prefer": "wait=25"}, "timeout_in_seconds": 40}
    on_a = [asyncio.ensure_future(co.batches.retrieve("batch-a", request_options=options)) for _ in range(3)]
    on_b = asyncio.ensure_future(http(f"{gateway.url}/v2/batches/batch-b", headers=waiting(2, other_etag)))
    await held(gateway, 4)
    cancel = await post_json(f"{gateway.url}/v2/batches/batch-a:cancel", b"")
    woken, elapsed = await timed(asyncio.gather(*on_a))
    other = await on_b

    assert cancel.status == 200
    assert [answer.batch.status for answer in woken] == ["BATCH_STATUS_CANCELING"] * 3
    assert elapsed < 5
    assert other.status == 304  # the other batch's waiter was not woken: its time ran out
    assert (waits_ended(gateway, "changed"), waits_ended(gateway, "timeout")) == (3, 1)


async def test_a_waiter_whose_client_disconnects_is_dropped_at_once(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    etag = (await http(f"{gateway.url}/v2/batches/batch-1")).header("ETag")
    assert etag is not None
    _reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(request_bytes(headers=[("Prefer", "wait=30"), ("If-None-Match", etag)]))
        await held(gateway, 1)
    finally:
        writer.close()

    assert await eventually(lambda: waiters(gateway) == 0, 3), "the waiter was still held after its client left"
    assert waits_ended(gateway, "gone") == 1


@pytest.mark.one_loop
async def test_sigterm_answers_every_waiter_at_once_and_the_process_exits_0(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    gateway = await gateway_process(write_config(tmp_path / "config.yaml", process_config(upstream.url)))
    co = sdk(gateway.url)
    first = await co.batches.retrieve("batch-1")
    etag = (await http(f"{gateway.url}/v2/batches/batch-1")).header("ETag")

    options: Any = {"additional_headers": {"Prefer": "wait=25"}, "timeout_in_seconds": 40}
    by_sdk = [asyncio.ensure_future(co.batches.retrieve("batch-1", request_options=options)) for _ in range(3)]
    conditional = [
        asyncio.ensure_future(http(f"{gateway.url}/v2/batches/batch-1", headers=waiting(25, etag))) for _ in range(2)
    ]

    async def all_held() -> bool:
        for _ in range(int(HELD_WITHIN_S / 0.05)):
            _text, samples = await scrape_metrics(gateway.url)
            if sample_value(samples, "gateway_waiters") >= 5:
                return True
            await asyncio.sleep(0.05)
        return False

    assert await all_held()
    gateway.signal(signal.SIGTERM)
    (sdk_answers, raw_answers), elapsed = await timed(
        asyncio.wait_for(asyncio.gather(asyncio.gather(*by_sdk), asyncio.gather(*conditional)), PROCESS_WAIT_S)
    )

    assert [answer.batch.id for answer in sdk_answers] == [first.batch.id] * 3
    assert [(a.status, a.header("Preference-Applied")) for a in raw_answers] == [(304, "wait=25")] * 2
    assert elapsed < 5  # at once: not at the end of their 25 s
    assert await gateway.exit_code(within_s=PROCESS_WAIT_S) == 0


async def test_stopping_the_gateway_answers_every_waiter_at_once_with_the_current_state(
    upstream: Upstream,
) -> None:
    upstream.script(json_handler())
    # Started here, not by the fixture, so that the test stops it itself (once).
    gateway = await start_gateway(build_state(make_config(upstream.url)), "127.0.0.1", 0)
    try:
        url = f"{gateway.url}/v2/batches/batch-1"
        first = await http(url)
        conditional = [asyncio.ensure_future(http(url, headers=waiting(25, first.header("ETag")))) for _ in range(2)]
        unconditional = [asyncio.ensure_future(http(url, headers=waiting(25))) for _ in range(2)]
        await held(gateway, 4)
    finally:
        await gateway.stop()
    answers, elapsed = await timed(asyncio.gather(*conditional, *unconditional))

    # Each with the state current at the stop: unchanged, so 304 for those naming it and 200 for the others.
    expected = [(304, "wait=25")] * 2 + [(200, "wait=25")] * 2
    assert [(a.status, a.header("Preference-Applied")) for a in answers] == expected
    assert answers[2].body == answers[3].body == first.body
    assert elapsed < 5
    assert (waits_ended(gateway, "shutdown"), waiters(gateway)) == (4, 0)


async def test_a_wait_of_zero_seconds_is_no_wait_on_either_answer_path(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    etag = (await http(f"{gateway.url}/v2/batches/batch-1")).header("ETag")
    assert etag is not None
    conditional = [("Prefer", "wait=0"), ("If-None-Match", etag)]

    (_plain, kept), elapsed = await timed(pipelined(gateway.url, kept_alive() + kept_alive(headers=conditional), 2))
    [closing] = await pipelined(gateway.url, request_bytes(headers=conditional), 1)

    for answer in (kept, closing):
        assert (answer.status, answer.header("Preference-Applied"), answer.header("ETag")) == (304, None, etag)
    assert elapsed < 2


# --- monotonic answers ------------------------------------------------------------------------------------------


def newer_then_older(newer: bytes, older: bytes) -> Callable[[web.Request], Any]:
    """An upstream that answers ``newer`` once, then ``older`` ever after (a replica behind)."""
    answered = 0

    async def handler(_request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        return web.Response(body=newer if answered == 1 else older, content_type="application/json")

    return handler


REGRESSIONS = {
    "earlier updated_at": (
        batch_body("batch-1", num_successful_records=5, updated_at=stamp(10)),
        batch_body("batch-1", num_successful_records=4, updated_at=stamp(20)),
    ),
    "active after terminal": (
        batch_body("batch-1", "BATCH_STATUS_COMPLETED", num_successful_records=10),
        batch_body("batch-1", "BATCH_STATUS_IN_PROGRESS", num_successful_records=9),
    ),
}


@pytest.mark.parametrize("kind", list(REGRESSIONS))
async def test_an_older_upstream_answer_is_not_stored_and_the_held_one_keeps_serving(
    kind: str, upstream: Upstream, start: GatewayFactory
) -> None:
    newer, older = REGRESSIONS[kind]
    upstream.script(newer_then_older(newer, older))
    clock = FakeClock()
    gateway = await start(make_config(upstream.url, cache={"ttl_s": {"active": 1, "terminal": 1}}), clock=clock)
    url = f"{gateway.url}/v2/batches/batch-1"
    first = await http(url)

    clock.advance(5)  # the entry expires: the next poll asks the upstream, which answers an older state
    refreshed = await http(url)
    later = await http(url)

    assert upstream.count() == 2
    assert refreshed.body == later.body == first.body
    assert refreshed.header("ETag") == first.header("ETag")
    assert later.header("X-Cache") == "HIT"  # the held answer is fresh again
    assert registry_value(gateway, "gateway_upstream_regressions_total") == 1


async def test_waiters_on_a_batch_whose_upstream_answers_an_older_state_still_cost_one_call_per_active_min(
    upstream: Upstream, start: GatewayFactory
) -> None:
    newer, older = REGRESSIONS["earlier updated_at"]
    upstream.script(newer_then_older(newer, older))
    gateway = await start(make_config(upstream.url, cache={"ttl_s": QUICK_TTL}))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")

    answer, elapsed = await timed(http(url, headers=waiting(2, etag)))

    assert (answer.status, answer.header("ETag")) == (304, etag)  # the older state never reached the caller
    refreshes = upstream.count() - 1
    assert registry_value(gateway, "gateway_upstream_regressions_total") >= 1
    assert refreshes <= elapsed / QUICK_TTL["active_min"] + 1, (refreshes, elapsed)


# --- freshness follows the budget ---------------------------------------------------------------------------------


async def test_polled_active_batches_share_a_short_budget_by_stretching_their_intervals_and_nobody_gets_429(
    upstream: Upstream, start: GatewayFactory
) -> None:
    finished: set[str] = set()

    async def handler(request: web.Request) -> web.Response:
        batch_id = request.path.rsplit("/", 1)[-1]
        status = "BATCH_STATUS_COMPLETED" if batch_id in finished else "BATCH_STATUS_IN_PROGRESS"
        return web.Response(body=batch_body(batch_id, status), content_type="application/json")

    upstream.script(handler)
    clock = FakeClock()
    ttl = {"active": 1, "active_min": 0.5, "active_max": 10}
    config = make_config(upstream.url, upstream={"rate_limit": {"requests_per_s": 4, "burst": 4}}, cache={"ttl_s": ttl})
    gateway = await start(config, clock=clock)
    ids = [f"batch-{n:02d}" for n in range(20)]
    statuses: list[int] = []
    caches: list[str | None] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def poll(batch_id: str) -> dict[str, Any]:
            headers = {"Authorization": f"Bearer {BILLING_KEY}"}
            async with session.get(f"{gateway.url}/v2/batches/{batch_id}", headers=headers) as response:
                statuses.append(response.status)
                caches.append(response.headers.get("X-Cache"))
                body: dict[str, Any] = json.loads(await response.read()) if response.status == 200 else {}
                return body

        # New ids arrive at the budget's pace (4 a second) until all 20 are polled.
        for first in range(0, len(ids), 4):
            await asyncio.gather(*(poll(batch_id) for batch_id in ids[first : first + 4]))
            clock.advance(1)
        # Then every batch is polled four times a second for 12 seconds (on the gateway's clock).
        for _ in range(48):
            await asyncio.gather(*(poll(batch_id) for batch_id in ids))
            clock.advance(0.25)
        polled_interval = registry_value(gateway, "gateway_refresh_interval_seconds", state="polled")
        followed = registry_value(gateway, "gateway_followed_batches")
        calls = {batch_id: sum(r.path.endswith(batch_id) for r in upstream.requests) for batch_id in ids}

        # One batch finishes: once its terminal answer is in, it no longer shares the budget.
        finished.add(ids[0])
        for _ in range(48):
            documents = await asyncio.gather(*(poll(batch_id) for batch_id in ids))
            clock.advance(0.25)
            if documents[0]["batch"]["status"] == "BATCH_STATUS_COMPLETED":
                break
        assert documents[0]["batch"]["status"] == "BATCH_STATUS_COMPLETED"
        followed_after = registry_value(gateway, "gateway_followed_batches")
        # Refreshes never take the whole budget: a new id still finds some.
        new_id = await poll("batch-new")

    assert set(statuses) == {200}  # no poll refused: a batch with an answer is served from the cache
    assert "STALE" in caches  # the budget was short: some polls were answered from an entry past its time
    assert new_id["batch"]["id"] == "batch-new"
    assert all(count >= 2 for count in calls.values()), calls  # every batch was refreshed over time
    assert ttl["active"] < polled_interval <= ttl["active_max"]
    assert followed == 20
    assert followed_after == 19


async def test_a_stretched_refresh_interval_never_passes_active_max(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler())
    clock = FakeClock()
    ttl = {"active": 1, "active_min": 0.5, "active_max": 3}
    config = make_config(upstream.url, upstream={"rate_limit": {"requests_per_s": 4, "burst": 4}}, cache={"ttl_s": ttl})
    gateway = await start(config, clock=clock)

    # 20 active batches at 4 calls a second would need their intervals stretched to about 6 s.
    for first in range(0, 20, 4):
        answers = await asyncio.gather(*(http(f"{gateway.url}/v2/batches/batch-{n}") for n in range(first, first + 4)))
        assert {a.status for a in answers} == {200}
        clock.advance(1)

    assert registry_value(gateway, "gateway_refresh_interval_seconds", state="polled") == ttl["active_max"]
    assert registry_value(gateway, "gateway_refresh_interval_seconds", state="waited") <= ttl["active_max"]


async def test_a_wait_without_if_none_match_on_an_entry_that_changed_upstream_since_it_expired_is_answered_at_once(
    upstream: Upstream, start: GatewayFactory
) -> None:
    handler = Switchable(batch_body("batch-1", num_successful_records=1))
    upstream.script(handler)
    clock = FakeClock()
    gateway = await start(make_config(upstream.url), clock=clock)
    url = f"{gateway.url}/v2/batches/batch-1"
    first = await http(url)
    handler.body = batch_body("batch-1", num_successful_records=2)
    clock.advance(10)  # the entry held on arrival is past its time: the request's own fetch sees the change

    answer, elapsed = await timed(http(url, headers=waiting(30)))

    assert (answer.status, answer.body, answer.header("X-Cache")) == (200, handler.body, "MISS")
    assert answer.header("ETag") != first.header("ETag")
    assert elapsed < 2


async def test_waiters_see_the_change_soon_after_an_upstream_outage_that_outlasted_their_entry(
    upstream: Upstream, start: GatewayFactory
) -> None:
    handler = Switchable(batch_body("batch-1", num_successful_records=1))
    upstream.script(handler)
    config = make_config(
        upstream.url,
        upstream={"retries": 0, "breaker": {"failures": 1000}},
        cache={"ttl_s": QUICK_TTL, "stale_if_error_s": 0},
    )
    gateway = await start(config)
    url = f"{gateway.url}/v2/batches/batch-1"
    fetched = time.monotonic()
    etag = (await http(url)).header("ETag")

    handler.status, handler.body = 500, b'{"message": "down for a moment"}'
    waiter = asyncio.ensure_future(http(url, headers=waiting(6, etag)))
    await held(gateway, 1)
    # The outage outlasts the entry (ttl_s.active: 1 s, nothing kept past it): the passing of time is the point.
    assert await eventually(lambda: time.monotonic() > fetched + QUICK_TTL["active"] + 0.3, 5)
    handler.status, handler.body = 200, batch_body("batch-1", num_successful_records=2)
    recovered = time.monotonic()
    answer = await waiter

    assert (answer.status, answer.body) == (200, handler.body)
    # Refreshed every active_min while it has waiters: noticed within a few intervals, not at the end of the wait.
    assert time.monotonic() - recovered < 2, "the waiter saw the change only when its wait ended"
    assert waits_ended(gateway, "changed") == 1
