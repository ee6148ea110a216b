"""Protecting the upstream, through the real gateway: budget, pauses, retries, breaker, caller limits.

Upstream calls are counted where they land, at a fake upstream on
127.0.0.1. Budgets, pauses and cooldowns run on the gateway's clock, so a
FakeClock makes them exact without sleeping; only the flood test runs on
real time, because its bound is about real time.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cohere.core.api_error import ApiError
from cohere.errors import BadRequestError

from gateway.edge.server import RunningGateway
from gateway.upstream.guards import BreakerState
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    Answer,
    FakeClock,
    http,
    make_config,
    sample_value,
    scrape_metrics,
    sdk,
)
from tests.upstream import Upstream, batch_body

BOUND_S = 20  # no exchange in this file may take longer


# --- helpers -----------------------------------------------------------------------


async def get(gateway: RunningGateway, batch_id: str, key: str = BILLING_KEY) -> Answer:
    """One ``GET /v2/batches/{id}`` with aiohttp, which shows every header."""
    return await http(f"{gateway.url}/v2/batches/{batch_id}", key=key, timeout_s=BOUND_S)


async def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    _, samples = await scrape_metrics(gateway.url)
    return sample_value(samples, name, **labels)


@dataclass
class Script:
    """What the fake upstream answers, call after call; the last answer repeats."""

    answers: list[tuple[int, dict[str, str]]]
    served: list[str] = field(default_factory=list)  # the batch id of every call, in order
    _since: int = 0  # calls made before ``answers`` was set

    async def __call__(self, request: web.Request) -> web.Response:
        batch_id = request.path.rsplit("/", 1)[-1]
        self.served.append(batch_id)
        status, headers = self.answers[min(len(self.served) - self._since, len(self.answers)) - 1]
        body = batch_body(batch_id) if status == 200 else json.dumps({"message": f"upstream says {status}"}).encode()
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    def then(self, *answers: int | tuple[int, dict[str, str]]) -> None:
        """From the next call on, answer these (the last one repeats)."""
        self.answers = [a if isinstance(a, tuple) else (a, {}) for a in answers]
        self._since = len(self.served)


async def scripted(fake: Upstream, *answers: int | tuple[int, dict[str, str]]) -> tuple[Upstream, Script]:
    script = Script([a if isinstance(a, tuple) else (a, {}) for a in answers])
    return fake.script(script), script


def budget(requests_per_s: float, burst: int, wait_s: float = 0.0, **upstream: Any) -> dict[str, Any]:
    return {"rate_limit": {"requests_per_s": requests_per_s, "burst": burst}, "budget_wait_s": wait_s, **upstream}


NO_JITTER = {"active_jitter": 0}  # active entries live exactly ttl_s.active (5 s)


async def start_scripted(
    fake: Upstream, start: GatewayFactory, *answers: int | tuple[int, dict[str, str]], **sections: Any
) -> tuple[Upstream, Script, FakeClock, RunningGateway]:
    """A scripted upstream and a gateway in front of it on a FakeClock; ``sections`` go to ``make_config``."""
    upstream, script = await scripted(fake, *answers)
    clock = FakeClock()
    gateway = await start(make_config(upstream.url, **sections), clock=clock)
    return upstream, script, clock, gateway


# --- the budget --------------------------------------------------------------------


async def test_a_flood_of_distinct_ids_never_exceeds_burst_plus_rate_times_elapsed(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream, _ = await scripted(upstream, 200)
    rate, burst = 5, 5
    gateway = await start(make_config(upstream.url, upstream=budget(rate, burst, wait_s=0.3)))
    answers: list[Answer] = []
    window_s, workers, per_worker = 2.0, 8, 200  # bounded in time and in count
    started = time.monotonic()

    async def worker(n: int) -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {BILLING_KEY}"}) as session:
            for i in range(per_worker):
                if time.monotonic() - started > window_s:
                    return
                async with session.get(f"{gateway.url}/v2/batches/flood-{n}-{i}") as response:
                    answers.append(Answer(response.status, response.headers, await response.read()))

    await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(workers))), BOUND_S)
    elapsed = time.monotonic() - started

    assert upstream.count() <= burst + rate * elapsed
    assert upstream.count() >= burst  # the budget was used, not just refused
    refused = [a for a in answers if a.status != 200]
    assert len(answers) - len(refused) == upstream.count()
    assert refused, "the flood never ran the budget dry"
    assert {(a.status, a.code) for a in refused} == {(429, "rate_limited")}
    assert all(a.retry_after is not None and int(a.retry_after) >= 1 for a in refused)
    assert await metric(gateway, "gateway_upstream_rejected_total", reason="budget") == len(refused)
    assert await metric(gateway, "gateway_upstream_calls_total", outcome="200") == upstream.count()


async def test_cache_hits_are_served_while_the_budget_is_empty(upstream: Upstream, start: GatewayFactory) -> None:
    upstream, _ = await scripted(upstream, 200)
    gateway = await start(make_config(upstream.url, upstream=budget(0.5, 2)), clock=FakeClock())
    for batch_id in ("batch-a", "batch-b"):
        assert (await get(gateway, batch_id)).status == 200
    assert await metric(gateway, "gateway_upstream_budget_tokens") == 0

    refused = await get(gateway, "batch-c")
    assert (refused.status, refused.code, refused.retry_after) == (429, "rate_limited", "2")  # 1 token at 0.5/s
    for batch_id in ("batch-a", "batch-b", "batch-a"):
        hit = await get(gateway, batch_id)
        assert (hit.status, hit.headers["X-Cache"]) == (200, "HIT")
        assert json.loads(hit.body)["batch"]["id"] == batch_id
    assert upstream.count() == 2


async def test_a_kept_entry_answers_at_once_while_a_request_without_one_waits_for_budget(
    upstream: Upstream, start: GatewayFactory
) -> None:
    _, script, clock, gateway = await start_scripted(
        upstream, start, 200, upstream=budget(1, 2, wait_s=4), cache=NO_JITTER
    )
    assert (await get(gateway, "kept")).status == 200
    clock.advance(6)  # "kept" is stale now; the budget is full again
    for batch_id in ("spend-1", "spend-2"):
        assert (await get(gateway, batch_id)).status == 200

    waiter = asyncio.create_task(get(gateway, "waiter"))  # no entry: waits up to budget_wait_s for a token
    stale = await asyncio.wait_for(get(gateway, "kept"), BOUND_S)
    assert (stale.status, stale.headers["X-Cache"]) == (200, "STALE")
    assert not waiter.done()  # the kept entry did not wait behind it
    assert script.served == ["kept", "spend-1", "spend-2"]

    clock.advance(1)  # a token is due: the waiter gets it
    answer = await asyncio.wait_for(waiter, BOUND_S)
    assert (answer.status, answer.headers["X-Cache"]) == (200, "MISS")
    assert script.served[-1] == "waiter"


async def test_a_budget_wait_never_outlasts_the_upstream_deadline(upstream: Upstream, start: GatewayFactory) -> None:
    upstream, _ = await scripted(upstream, 200)
    config = make_config(upstream.url, upstream=budget(2, 1, wait_s=30, timeout_s=1))
    gateway = await start(config, clock=FakeClock())  # frozen: no token ever comes
    assert (await get(gateway, "first")).status == 200
    started = time.monotonic()
    answer = await get(gateway, "second")
    # Refused for budget once the deadline is near, not cut off as a timeout.
    assert (answer.status, answer.code) == (429, "rate_limited")
    assert time.monotonic() - started < 1 + 1  # the deadline, plus slack for a busy machine
    assert upstream.count() == 1


# --- the upstream's 429 --------------------------------------------------------------


async def test_after_an_upstream_429_no_id_is_fetched_until_retry_after_has_passed(
    upstream: Upstream, start: GatewayFactory
) -> None:
    _, script, clock, gateway = await start_scripted(upstream, start, (429, {"Retry-After": "2"}), 200)

    first = await get(gateway, "batch-a")
    assert (first.status, first.code, first.retry_after) == (429, "upstream_rate_limited", "2")
    for batch_id in ("batch-b", "batch-c", "batch-a"):
        answer = await get(gateway, batch_id)
        assert (answer.status, answer.code, answer.retry_after) == (429, "upstream_rate_limited", "2")
    clock.advance(1.5)
    later = await get(gateway, "batch-d")
    assert (later.status, later.code, later.retry_after) == (429, "upstream_rate_limited", "1")  # 0.5 s, rounded up
    clock.advance(0.49)
    assert (await get(gateway, "batch-e")).status == 429
    assert script.served == ["batch-a"]

    clock.advance(0.01)  # 2 s after the 429: calls resume
    for batch_id in ("batch-f", "batch-a"):
        assert (await get(gateway, batch_id)).status == 200
    assert script.served == ["batch-a", "batch-f", "batch-a"]
    assert await metric(gateway, "gateway_upstream_pauses_total") == 1
    assert await metric(gateway, "gateway_upstream_rejected_total", reason="paused") == 5
    assert await metric(gateway, "gateway_upstream_calls_total", outcome="429") == 1


async def test_during_a_pause_a_kept_entry_answers_stale(upstream: Upstream, start: GatewayFactory) -> None:
    _, script, clock, gateway = await start_scripted(
        upstream, start, 200, (429, {"Retry-After": "30"}), cache=NO_JITTER
    )
    assert (await get(gateway, "kept")).status == 200
    clock.advance(6)
    assert (await get(gateway, "other")).status == 429
    stale = await get(gateway, "kept")
    assert (stale.status, stale.headers["X-Cache"]) == (200, "STALE")
    assert script.served == ["kept", "other"]


def http_date(offset_s: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=offset_s), usegmt=True)


@pytest.mark.parametrize(
    ("retry_after", "told", "paused_s"),
    [
        ("date+20", {"19", "20"}, 20.0),  # whole-second dates: 19.x s left, rounded up
        ("date+3600", {"60"}, 60.0),  # capped
        ("86400", {"60"}, 60.0),  # capped
        ("garbage", {"7"}, 7.0),  # the default
        ("-3", {"7"}, 7.0),
        (None, {"7"}, 7.0),
        ("date-60", {"1"}, 0.0),  # a date in the past: no pause (callers still wait 1 s)
    ],
    ids=["http-date", "http-date-capped", "seconds-capped", "garbage", "negative", "absent", "past-date"],
)
async def test_retry_after_dates_garbage_and_huge_values_pause_as_long_as_they_should(
    upstream: Upstream, start: GatewayFactory, retry_after: str | None, told: set[str], paused_s: float
) -> None:
    if retry_after is not None and retry_after.startswith("date"):
        retry_after = http_date(float(retry_after.removeprefix("date")))
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    _, script, clock, gateway = await start_scripted(
        upstream, start, (429, headers), 200, upstream={"retry_after_default_s": 7, "retry_after_max_s": 60}
    )

    answer = await get(gateway, "batch-a")
    assert (answer.status, answer.code) == (429, "upstream_rate_limited")
    assert answer.retry_after in told
    if paused_s:
        clock.advance(paused_s - 1.01)
        assert (await get(gateway, "batch-b")).code == "upstream_rate_limited"
        assert script.served == ["batch-a"]
        clock.advance(1.01)
    assert (await get(gateway, "batch-c")).status == 200
    assert script.served == ["batch-a", "batch-c"]


# --- retries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "status", "code", "calls"),
    [
        ([502, 502, 200], 200, None, 3),
        ([504, 200], 200, None, 2),
        ([503, 200], 200, None, 2),  # a 503 that does not say when: retried
        ([502, 504, 503, 200], 503, "upstream_unavailable", 3),  # retries: 2
        ([400], 400, "bad_request", 1),
        ([404], 404, "not_found", 1),
        ([401], 502, "upstream_auth_failed", 1),
        ([403], 502, "upstream_auth_failed", 1),
        ([500], 502, "upstream_error", 1),
        ([501], 502, "upstream_error", 1),
        ([422], 502, "upstream_error", 1),
        ([429], 429, "upstream_rate_limited", 1),
        ([(503, {"Retry-After": "3"})], 503, "upstream_unavailable", 1),  # said when: not retried
    ],
    ids=str,
)
async def test_only_connect_errors_502_503_and_504_are_retried(
    upstream: Upstream,
    start: GatewayFactory,
    answers: list[int | tuple[int, dict[str, str]]],
    status: int,
    code: str | None,
    calls: int,
) -> None:
    upstream, _ = await scripted(upstream, *answers)
    gateway = await start(make_config(upstream.url, upstream={"retries": 2}), clock=FakeClock())
    answer = await get(gateway, "batch-1")
    assert (answer.status, answer.code) == (status, code)
    assert upstream.count() == calls
    assert await metric(gateway, "gateway_upstream_retries_total") == calls - 1


async def test_a_transient_502_twice_then_200_reaches_the_sdk_as_the_batch(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream, _ = await scripted(upstream, 502, 502, 200)
    gateway = await start(make_config(upstream.url, upstream={"retries": 2}))
    response = await sdk(gateway.url).batches.retrieve("batch-1")
    assert response.batch.id == "batch-1"
    assert upstream.count() == 3
    assert await metric(gateway, "gateway_upstream_calls_total", outcome="502") == 2
    assert await metric(gateway, "gateway_upstream_calls_total", outcome="200") == 1
    assert await metric(gateway, "gateway_upstream_retries_total") == 2


async def test_an_upstream_400_is_called_exactly_once_and_its_message_reaches_the_sdk(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream, _ = await scripted(upstream, 400)
    gateway = await start(make_config(upstream.url, upstream={"retries": 5}))
    with pytest.raises(BadRequestError) as raised:
        await sdk(gateway.url).batches.retrieve("batch-1")
    assert raised.value.body["message"] == "upstream says 400"
    assert upstream.count() == 1


async def test_a_503_with_retry_after_is_not_retried_and_pauses_every_id(
    upstream: Upstream, start: GatewayFactory
) -> None:
    _, script, clock, gateway = await start_scripted(
        upstream, start, (503, {"Retry-After": "3"}), 200, upstream={"retries": 2}
    )
    answer = await get(gateway, "batch-a")
    assert (answer.status, answer.code, answer.retry_after) == (503, "upstream_unavailable", "3")
    clock.advance(1)
    paused = await get(gateway, "batch-b")
    assert (paused.status, paused.code, paused.retry_after) == (429, "upstream_rate_limited", "2")
    clock.advance(2)
    assert (await get(gateway, "batch-b")).status == 200
    assert script.served == ["batch-a", "batch-b"]
    assert await metric(gateway, "gateway_upstream_pauses_total") == 1


async def test_connect_errors_are_retried(start: GatewayFactory) -> None:
    with socket_closed_port() as port:
        gateway = await start(make_config(f"http://127.0.0.1:{port}", upstream={"retries": 2}))
        answer = await get(gateway, "batch-1")
    assert (answer.status, answer.code) == (502, "upstream_unreachable")
    assert await metric(gateway, "gateway_upstream_calls_total", outcome="upstream_unreachable") == 3
    assert await metric(gateway, "gateway_upstream_retries_total") == 2


class socket_closed_port:
    """A port on 127.0.0.1 that nothing listens on (bound, never listening)."""

    def __enter__(self) -> int:
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        port: int = self._socket.getsockname()[1]
        return port

    def __exit__(self, *_exc: object) -> None:
        self._socket.close()


async def test_every_retry_spends_budget(upstream: Upstream, start: GatewayFactory) -> None:
    upstream, _ = await scripted(upstream, 502)
    gateway = await start(make_config(upstream.url, upstream=budget(0.5, 2, retries=5)), clock=FakeClock())
    answer = await get(gateway, "batch-1")
    # Two tokens, two calls; the third try finds no budget and the real failure is reported.
    assert (answer.status, answer.code) == (502, "upstream_error")
    assert upstream.count() == 2
    assert await metric(gateway, "gateway_upstream_budget_tokens") == 0
    assert await metric(gateway, "gateway_upstream_retries_total") == 1


async def test_a_dropped_connection_costs_one_budget_token_per_try(start: GatewayFactory) -> None:
    """No hidden resend below the gateway: every HTTP call upstream is one the budget paid for."""
    connections = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()  # the request arrived; no answer comes

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = make_config(f"http://127.0.0.1:{port}", upstream=budget(0.5, 2, retries=5))
        gateway = await start(config, clock=FakeClock())
        answer = await get(gateway, "batch-1")
    finally:
        server.close()
    assert (answer.status, answer.code) == (502, "upstream_unreachable")
    assert connections == 2
    assert await metric(gateway, "gateway_upstream_calls_total", outcome="upstream_unreachable") == 2


async def test_retries_stop_before_the_deadline_and_report_the_real_failure(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream, _ = await scripted(upstream, 502)
    config = make_config(upstream.url, upstream={"retries": 5, "retry_backoff_s": 0.4, "timeout_s": 1})
    gateway = await start(config)
    gateway.state.upstream.jitter = lambda _low, high: high  # backoffs 0.4 s, then 0.8 s: past the deadline
    started = time.monotonic()
    answer = await get(gateway, "batch-1")
    assert (answer.status, answer.code) == (502, "upstream_error")  # not a 504 from a sleep cut short
    assert upstream.count() == 2
    assert time.monotonic() - started < 1 + 1


async def test_a_silent_upstream_is_answered_504_within_timeout_s(upstream: Upstream, start: GatewayFactory) -> None:
    upstream, _ = await scripted(upstream, 200)
    upstream.hold(times=None)  # never set while the gateway waits
    gateway = await start(make_config(upstream.url, upstream={"retries": 3, "timeout_s": 0.5}))
    answer = await get(gateway, "batch-1")
    assert (answer.status, answer.code) == (504, "upstream_timeout")
    assert upstream.count() == 1
    assert await metric(gateway, "gateway_upstream_calls_total", outcome="upstream_timeout") == 1


# --- the circuit breaker -------------------------------------------------------------

BREAKER = {"retries": 0, "breaker": {"failures": 3, "cooldown_s": 10}}


async def open_the_breaker(gateway: RunningGateway, script: Script) -> None:
    script.then(500)
    for n in range(3):
        assert (await get(gateway, f"failing-{n}")).code == "upstream_error"
    assert await metric(gateway, "gateway_breaker_state") == BreakerState.OPEN.value


async def test_the_breaker_opens_after_consecutive_failures_and_fails_fast_or_stale(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream, script, clock, gateway = await start_scripted(upstream, start, 200, upstream=BREAKER, cache=NO_JITTER)
    assert (await get(gateway, "kept")).status == 200
    clock.advance(6)  # "kept" is stale
    await open_the_breaker(gateway, script)
    calls = upstream.count()

    fast = await get(gateway, "other")
    assert (fast.status, fast.code, fast.retry_after) == (503, "upstream_unavailable", "10")
    stale = await get(gateway, "kept")
    assert (stale.status, stale.headers["X-Cache"]) == (200, "STALE")
    clock.advance(4)
    later = await get(gateway, "other")
    assert (later.status, later.retry_after) == (503, "6")
    assert upstream.count() == calls
    assert await metric(gateway, "gateway_upstream_rejected_total", reason="breaker_open") == 3


@pytest.mark.parametrize(
    ("probe_answer", "state_after", "next_answer"),
    [
        (200, BreakerState.CLOSED, (200, None)),
        (500, BreakerState.OPEN, (503, "10")),
    ],
    ids=["probe-succeeds-and-closes", "probe-fails-and-reopens"],
)
async def test_after_the_cooldown_exactly_one_probe_goes_upstream(
    upstream: Upstream,
    start: GatewayFactory,
    probe_answer: int,
    state_after: BreakerState,
    next_answer: tuple[int, str | None],
) -> None:
    upstream, script, clock, gateway = await start_scripted(upstream, start, 200, upstream=BREAKER)
    await open_the_breaker(gateway, script)
    clock.advance(10)
    assert await metric(gateway, "gateway_breaker_state") == BreakerState.HALF_OPEN.value

    script.then(probe_answer, 200)
    release = upstream.hold(times=None)
    upstream.arrived.clear()
    probe = asyncio.create_task(get(gateway, "probe"))
    await asyncio.wait_for(upstream.arrived.wait(), BOUND_S)
    calls = upstream.count()
    others = [await get(gateway, f"while-probing-{n}") for n in range(3)]
    assert {(a.status, a.code, a.retry_after) for a in others} == {(503, "upstream_unavailable", "1")}
    assert upstream.count() == calls  # only the probe is out
    release.set()
    assert (await asyncio.wait_for(probe, BOUND_S)).status == (200 if probe_answer == 200 else 502)

    assert await metric(gateway, "gateway_breaker_state") == state_after.value
    after = await get(gateway, "after")
    assert (after.status, after.retry_after) == next_answer
    assert script.served[-2:] == (["probe", "after"] if probe_answer == 200 else ["failing-2", "probe"])


async def test_a_probe_refused_for_budget_neither_closes_the_breaker_nor_keeps_the_slot(
    upstream: Upstream, start: GatewayFactory
) -> None:
    _, script, clock, gateway = await start_scripted(upstream, start, 200, upstream={**BREAKER, **budget(0.01, 3)})
    await open_the_breaker(gateway, script)  # spends the 3 tokens
    clock.advance(10)  # cooldown over; 0.1 token back

    refused = await get(gateway, "probe-1")
    assert (refused.status, refused.code) == (429, "rate_limited")
    assert await metric(gateway, "gateway_breaker_state") == BreakerState.HALF_OPEN.value

    clock.advance(90)  # a whole token: the next request is the probe
    script.then(200)
    assert (await get(gateway, "probe-2")).status == 200
    assert script.served[-1] == "probe-2"
    assert await metric(gateway, "gateway_breaker_state") == BreakerState.CLOSED.value


async def test_a_cancelled_probe_frees_the_slot_for_the_next_call(upstream: Upstream, start: GatewayFactory) -> None:
    """A probe cut off mid-call (the gateway shutting down) must not leave the breaker stuck."""
    upstream, script, clock, gateway = await start_scripted(upstream, start, 200, upstream=BREAKER)
    await open_the_breaker(gateway, script)
    clock.advance(10)
    client = gateway.state.upstream
    upstream.hold(times=None)
    upstream.arrived.clear()
    from gateway.upstream.answers import accept_batch
    from gateway.upstream.client import UpstreamRequest, batch_path

    call = UpstreamRequest(batch_path("probe"), "billing-service", "req-1")
    probe = asyncio.create_task(client.fetch(call, True, accept_batch))
    await asyncio.wait_for(upstream.arrived.wait(), BOUND_S)
    assert not client.breaker.admit().admitted  # the probe is out
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert client.breaker.state is BreakerState.HALF_OPEN
    assert client.breaker.admit().probe


# --- per-caller limits ---------------------------------------------------------------


async def test_a_caller_over_its_own_limit_is_refused_while_another_is_still_served(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream, _ = await scripted(upstream, 200)
    clock = FakeClock()
    limit = {"requests_per_s": 0.5, "burst": 2}
    callers = [
        {"name": "billing-service", "key": BILLING_KEY, "rate_limit": limit},
        {"name": "reporting", "key": REPORTING_KEY, "rate_limit": limit},
    ]
    gateway = await start(make_config(upstream.url, callers=callers), clock=clock)
    noisy = sdk(gateway.url, REPORTING_KEY)
    for _ in range(2):
        assert (await noisy.batches.retrieve("batch-1")).batch.id == "batch-1"
    with pytest.raises(ApiError) as raised:
        await noisy.batches.retrieve("batch-1")  # a cache hit counts too
    assert (raised.value.status_code, raised.value.body["code"]) == (429, "caller_rate_limited")
    assert (await get(gateway, "batch-1", REPORTING_KEY)).retry_after == "2"

    quiet = sdk(gateway.url, BILLING_KEY)
    for batch_id in ("batch-1", "batch-2"):
        assert (await quiet.batches.retrieve(batch_id)).batch.id == batch_id
    assert upstream.count() == 2
    assert await metric(gateway, "gateway_caller_rate_limited_total", caller="reporting") == 2
    assert await metric(gateway, "gateway_caller_rate_limited_total", caller="billing-service") == 0

    clock.advance(2)  # one token back
    assert (await noisy.batches.retrieve("batch-1")).batch.id == "batch-1"
