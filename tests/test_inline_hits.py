"""Fresh hits answered as soon as they are parsed (gateway/edge/inline.py), as a client sees them.

A plain fresh hit on a kept-alive connection is answered before aiohttp's
Application; these tests pin down what that must not change: the order of
pipelined answers, the answer itself, the connection's life and the
access log. ``test_hostile.py`` sends every hostile case against a cached
batch as well.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.demo.simulator import Simulator
from gateway.edge import connection as gateway_connection
from tests.conftest import GatewayFactory
from tests.support import (
    REPORTING_KEY,
    LogCapture,
    http,
    make_config,
    pipelined,
    read_answer,
    registry_value,
    request_bytes,
    sdk,
)
from tests.upstream import Upstream, json_handler

# Headers that differ between any two answers, whichever way they were made.
PER_ANSWER = {"Date", "X-Request-ID", "Connection"}


def kept_alive(target: str = "/v2/batches/batch-1", **kwargs: object) -> bytes:
    return request_bytes(target, close=False, **kwargs)  # type: ignore[arg-type]


async def test_pipelined_hits_behind_a_miss_are_answered_after_it(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    await sdk(gateway.url).batches.retrieve("cached")
    release = upstream.hold(times=None)
    upstream.arrived.clear()

    exchange = asyncio.create_task(
        pipelined(gateway.url, kept_alive("/v2/batches/slow") + kept_alive("/v2/batches/cached") * 2, 3)
    )
    await asyncio.wait_for(upstream.arrived.wait(), 10)  # the miss is held at the upstream
    release.set()
    answers = await exchange

    assert [(a.json["batch"]["id"], a.header("X-Cache")) for a in answers] == [
        ("slow", "MISS"),
        ("cached", "HIT"),
        ("cached", "HIT"),
    ]


async def test_hits_around_a_request_for_the_app_in_a_long_pipeline_are_all_answered_in_order(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    await sdk(gateway.url).batches.retrieve("batch-1")

    # 36 requests: more than aiohttp's parser hands over at once (32), with the
    # app's request among the first 32 (found by the review of the inline path).
    answers = await pipelined(gateway.url, kept_alive() * 5 + kept_alive("/healthz") + kept_alive() * 30, 36)

    assert [a.header("X-Cache") for a in answers] == ["HIT"] * 5 + [None] + ["HIT"] * 30
    assert answers[5].json == {"status": "ok"}


async def test_a_hit_on_a_kept_alive_connection_is_the_answer_the_app_gives(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    await sdk(gateway.url).batches.retrieve("batch-1")

    [inline] = await pipelined(gateway.url, kept_alive(), 1)
    # Connection: close always goes through the Application.
    [through_app] = await pipelined(gateway.url, request_bytes("/v2/batches/batch-1", close=True), 1)

    assert inline.status == through_app.status == 200
    assert inline.body == through_app.body
    assert set(inline.headers) - PER_ANSWER == set(through_app.headers) - PER_ANSWER
    for name in set(inline.headers) - PER_ANSWER:
        assert inline.headers.getall(name) == through_app.headers.getall(name), name
    assert inline.header("X-Cache") == "HIT"
    assert inline.header("X-Request-ID") != through_app.header("X-Request-ID")


async def test_a_caller_request_id_comes_back_on_a_hit(simulator: Simulator, start: GatewayFactory) -> None:
    gateway = await start(make_config(simulator.url))
    await sdk(gateway.url).batches.retrieve("batch-1")

    [answer] = await pipelined(gateway.url, kept_alive(headers=[("X-Request-ID", "trace-42.a:b")]), 1)

    assert (answer.header("X-Cache"), answer.header("X-Request-ID")) == ("HIT", "trace-42.a:b")


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout_following_hits(
    simulator: Simulator, start: GatewayFactory
) -> None:
    keepalive_s = 0.5
    gateway = await start(make_config(simulator.url, server={"keepalive_timeout_s": keepalive_s}))
    await sdk(gateway.url).batches.retrieve("batch-1")
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        for _ in range(3):
            writer.write(kept_alive())
            assert (await read_answer(reader)).header("X-Cache") == "HIT"
        last_answer = time.monotonic()

        assert await asyncio.wait_for(reader.read(1), 10) == b""  # closed by the gateway
        assert time.monotonic() - last_answer >= keepalive_s * 0.8
    finally:
        writer.close()


async def test_garbage_after_hits_on_a_connection_gets_a_json_400_and_the_connection_closed(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    await sdk(gateway.url).batches.retrieve("batch-1")
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(kept_alive() * 2)
        hits = [await read_answer(reader) for _ in range(2)]
        writer.write(b"NOT HTTP AT ALL\r\n\r\n" + kept_alive())
        refused = await read_answer(reader)

        assert [(a.status, a.header("X-Cache")) for a in hits] == [(200, "HIT"), (200, "HIT")]
        assert (refused.status, refused.code) == (400, "malformed_request")
        assert await asyncio.wait_for(reader.read(1), 10) == b""  # nothing after the garbage is answered
    finally:
        writer.close()


async def test_a_cached_404_on_a_kept_alive_connection_is_the_contract_error(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    first, second = await pipelined(gateway.url, kept_alive("/v2/batches/missing-1") * 2, 2)

    assert (first.status, first.code, first.header("X-Cache")) == (404, "not_found", "MISS")
    assert (second.status, second.code, second.header("X-Cache")) == (404, "not_found", "HIT")
    assert simulator.calls == 1


async def test_every_pipelined_hit_gets_its_own_access_line_and_metric(
    simulator: Simulator, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await start(make_config(simulator.url))
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")

    # More than aiohttp's parser hands over at once (32): it must be resumed after the first 32.
    answers = await pipelined(gateway.url, kept_alive(key=REPORTING_KEY) * 80, 80)
    await http(f"{gateway.url}/healthz")  # a later request: the hits' lines are written by then

    hits = [line for line in logs.events("gateway.access") if line["cache"] == "HIT"]
    assert [line["request_id"] for line in hits] == [a.header("X-Request-ID") for a in answers]
    assert {(line["caller"], line["status"], line["batch_id"], line["path"]) for line in hits} == {
        ("reporting", 200, "batch-1", "/v2/batches/{id}")
    }
    labels = {"caller": "reporting", "route": "/v2/batches/{id}", "status": "200", "cache": "HIT"}
    assert registry_value(gateway, "gateway_requests_total", **labels) == 80


async def test_a_hit_the_inline_path_fails_on_is_still_answered_by_the_app(
    simulator: Simulator, start: GatewayFactory, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = await start(make_config(simulator.url))
    await sdk(gateway.url).batches.retrieve("batch-1")

    def broken(*_args: object) -> bytes:
        raise RuntimeError("a bug in the inline path")

    monkeypatch.setattr(gateway_connection, "answer_fresh_hit", broken)
    [answer] = await pipelined(gateway.url, kept_alive(), 1)

    assert (answer.status, answer.header("X-Cache")) == (200, "HIT")
    assert any("could not answer a cache hit inline" in line["event"] for line in logs.events("gateway"))


async def test_a_client_pipelining_hits_cannot_make_the_gateway_hold_what_it_sends(
    simulator: Simulator, start: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the gateway has read but not parsed stays within about one read, as in aiohttp's own path."""
    gateway = await start(make_config(simulator.url, logging={"access_log": False}))
    await sdk(gateway.url).batches.retrieve("batch-1")
    request = kept_alive()
    received: dict[int, int] = {}
    most_held = 0
    answer_data = gateway_connection.GatewayConnection.data_received

    def measured(connection: gateway_connection.GatewayConnection, data: bytes) -> None:
        nonlocal most_held
        received[id(connection)] = received.get(id(connection), 0) + len(data)
        answer_data(connection, data)
        most_held = max(most_held, received[id(connection)] - connection.requests_parsed * len(request))

    monkeypatch.setattr(gateway_connection.GatewayConnection, "data_received", measured)
    count = 36_000  # about 4 MB, sent at once; the answers are read as they come
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(request * count)
        answered, tail = 0, b""
        while answered < count:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
            assert chunk, f"closed after {answered} answers"
            answered += (tail + chunk).count(b"HTTP/1.1 200 ")
            tail = chunk[-12:]
    finally:
        writer.close()

    assert most_held <= 300_000  # one read is at most 256 KiB
