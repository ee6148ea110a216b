"""A request for a batch gets one decision, whichever way it is answered (gateway/api/decide.py).

A kept-alive request is offered to the inline path first; one with
``Connection: close`` always goes through the Application. Both ask the
same ``decide``: the same answer, the same headers, the same refusals, and
the inline path answers what it can carry, ``Prefer: wait=0`` and a
percent-encoded id included.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

from gateway.demo.simulator import Simulator
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    EXCHANGE_TIMEOUT_S,
    REPORTING_KEY,
    Answer,
    http,
    make_config,
    parse_response,
    read_answer,
    registry_value,
    request_bytes,
    sdk,
)
from tests.test_batch_api import create
from tests.upstream import ALL_OPERATIONS, Upstream, caller, write_callers

# A third caller, allowed the defaults over every batch, with no limit of its own.
OPS_KEY = "ops-caller-key-00000000000000000001"

# Headers that differ between any two answers, whichever way they were made.
PER_ANSWER = {"Date", "X-Request-ID", "Connection"}


async def one_answer(url: str, data: bytes, *, head: bool = False) -> Answer:
    """The answer to the one request in ``data``, on a connection of its own."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        if head:
            return parse_response(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EXCHANGE_TIMEOUT_S))
        return await read_answer(reader)
    finally:
        writer.close()


async def both_ways(url: str, target: str, *, method: str = "GET", **kwargs: object) -> tuple[Answer, Answer]:
    """The answer offered to the inline path (kept alive), and the app's (Connection: close)."""
    head = method == "HEAD"
    kept = await one_answer(url, request_bytes(target, method=method, close=False, **kwargs), head=head)  # type: ignore[arg-type]
    closing = await one_answer(url, request_bytes(target, method=method, close=True, **kwargs), head=head)  # type: ignore[arg-type]
    return kept, closing


def assert_same_answer(kept: Answer, closing: Answer, *, also_differ: frozenset[str] = frozenset()) -> None:
    assert kept.status == closing.status
    if kept.status >= 400:  # the contract's error: the same but for its request id
        assert {**kept.json, "request_id": "-"} == {**closing.json, "request_id": "-"}
    else:
        assert kept.body == closing.body
    differ = PER_ANSWER | also_differ
    assert set(kept.headers) - differ == set(closing.headers) - differ
    for name in set(kept.headers) - differ:
        assert kept.headers.getall(name) == closing.headers.getall(name), name


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        ("GET", "/v2/batches/batch-1", [], 200),
        ("HEAD", "/v2/batches/batch-1", [], 200),
        ("GET", "/v2/batches/batch-1", [("If-None-Match", "ETAG")], 304),
        ("HEAD", "/v2/batches/batch-1", [("If-None-Match", "ETAG")], 304),
        ("GET", "/v2/batches/batch-1", [("Prefer", "wait=0")], 200),
        ("GET", "/v2/batches/batch-1", [("Prefer", "wait=0"), ("If-None-Match", "ETAG")], 304),
        ("GET", "/v2/batches/batch%2D1", [], 200),  # the decoded id, as the router gives it
        ("GET", "/v2/batches/batch-1?view=full", [], 200),  # the query is no part of the route
    ],
    ids=["get", "head", "304", "head-304", "wait=0", "wait=0-304", "percent-encoded", "query"],
)
async def test_a_fresh_hit_gets_the_same_answer_inline_and_through_the_app_and_the_inline_path_answers_it(
    simulator: Simulator,
    start: GatewayFactory,
    inline_answers: list[bytes],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    status: int,
) -> None:
    gateway = await start(make_config(simulator.url))
    etag = (await http(f"{gateway.url}/v2/batches/batch-1")).header("ETag")
    assert etag is not None
    sent = [(name, etag if value == "ETAG" else value) for name, value in headers]
    inline_answers.clear()

    kept, closing = await both_ways(gateway.url, target, method=method, headers=sent)

    assert (kept.status, kept.header("X-Cache"), kept.header("Preference-Applied")) == (status, "HIT", None)
    assert_same_answer(kept, closing)
    assert len(inline_answers) == 1  # the kept-alive one; Connection: close always goes to the app


async def test_a_caller_over_its_rate_limit_is_refused_the_same_way_on_both_paths_and_counted_once_each(
    simulator: Simulator, start: GatewayFactory, inline_answers: list[bytes]
) -> None:
    limited = {"name": "billing-service", "key": BILLING_KEY, "rate_limit": {"requests_per_s": 0.001, "burst": 2}}
    gateway = await start(make_config(simulator.url, callers=[limited, {"name": "reporting", "key": REPORTING_KEY}]))
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")  # cached, without spending billing's tokens
    inline_answers.clear()

    allowed = await both_ways(gateway.url, "/v2/batches/batch-1")
    refused = await both_ways(gateway.url, "/v2/batches/batch-1")

    assert [a.status for a in (*allowed, *refused)] == [200, 200, 429, 429]
    assert_same_answer(*refused, also_differ=frozenset({"Retry-After"}))
    assert refused[0].json["code"] == refused[1].json["code"] == "caller_rate_limited"
    assert len(inline_answers) == 1  # a refusal is the app's to answer
    # Each refusal counted once: the one the inline path handed on was not counted twice, nor charged.
    assert registry_value(gateway, "gateway_caller_rate_limited_total", caller="billing-service") == 2


async def test_an_own_scoped_caller_gets_its_own_batch_inline_and_another_callers_batch_is_a_404_on_both_paths(
    upstream: Upstream, start: GatewayFactory, inline_answers: list[bytes]
) -> None:
    gateway = await start(make_config(upstream.url, callers=write_callers(billing="own", reporting="own")))
    batch_id = await create(gateway, BILLING_KEY)
    await http(f"{gateway.url}/v2/batches/{batch_id}")  # cached
    inline_answers.clear()

    own = await both_ways(gateway.url, f"/v2/batches/{batch_id}")
    assert len(inline_answers) == 1  # the owner is known in memory since the create
    others = await both_ways(gateway.url, f"/v2/batches/{batch_id}", key=REPORTING_KEY)

    assert [a.status for a in (*own, *others)] == [200, 200, 404, 404]
    assert_same_answer(*own)
    assert_same_answer(*others)
    assert others[0].json["code"] == "not_found"
    assert len(inline_answers) == 1  # not the refusals


async def test_on_one_kept_alive_connection_each_request_gets_its_own_decision_after_a_fast_answer(
    upstream: Upstream, start: GatewayFactory, inline_answers: list[bytes]
) -> None:
    """A connection that has just had an inline answer asks every rule again for the next request:
    the caller's limit, its scope and the wait; a refusal goes to the app, and the next hit is inline again."""
    limited = caller(
        "billing-service", BILLING_KEY, ALL_OPERATIONS, "own", rate_limit={"requests_per_s": 0.001, "burst": 3}
    )
    callers = [limited, caller("reporting", REPORTING_KEY, ALL_OPERATIONS, "own"), caller("ops", OPS_KEY)]
    gateway = await start(make_config(upstream.url, callers=callers))
    batch_id = await create(gateway, BILLING_KEY)  # billing's first token; the answer is the cached entry
    inline_answers.clear()
    target = f"/v2/batches/{batch_id}"
    sent = [
        request_bytes(target, key=BILLING_KEY, close=False),  # a hit: billing's second token
        request_bytes(target, method="HEAD", key=BILLING_KEY, close=False),  # its third
        request_bytes(target, key=BILLING_KEY, close=False),  # past its limit
        request_bytes(target, key=REPORTING_KEY, close=False),  # not reporting's batch
        request_bytes(target, [("Prefer", "wait=0")], key=OPS_KEY, close=False),  # no wait: a hit
    ]

    parts = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    answers: list[Answer] = []
    try:
        for request in sent:
            writer.write(request)
            if request.startswith(b"HEAD"):
                answers.append(
                    parse_response(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EXCHANGE_TIMEOUT_S))
                )
            else:
                answers.append(await read_answer(reader))
    finally:
        writer.close()

    assert [a.status for a in answers] == [200, 200, 429, 404, 200]
    assert answers[2].json["code"] == "caller_rate_limited"
    assert answers[3].json["code"] == "not_found"
    assert answers[4].header("Preference-Applied") is None
    assert len(inline_answers) == 3  # the two hits of billing and the one of ops; the refusals were the app's
    assert registry_value(gateway, "gateway_caller_rate_limited_total", caller="billing-service") == 1
