"""Pipelined requests, as a client that pipelines sees them (issue #11).

Every request is answered, in order, matched here by the ``X-Request-ID``
it sent, or the connection is closed after the last one answered: never a
hang, never an answer that reads as another request's. Each case runs with
the request under test answered both ways a batch request can be: inline,
for a cached id, and by the app, for an uncached one.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from gateway.demo.simulator import Simulator
from gateway.edge.rejections import expect_error
from gateway.edge.server import RunningGateway
from tests.conftest import GatewayFactory
from tests.support import EXCHANGE_TIMEOUT_S, Answer, make_config, read_answer, request_bytes, sdk
from tests.upstream import Upstream, batch_body

CACHED = "batch-1"
_fresh = itertools.count()
# A budget no test here comes near: an answer is never a 429 for the gateway's own budget.
PLENTY = {"rate_limit": {"requests_per_s": 10_000, "burst": 10_000}}


def batch_id_for(way: str) -> str:
    """An id answered inline (cached, primed by the test) or by the app (never asked before)."""
    return CACHED if way == "cached" else f"fresh-{next(_fresh)}"


def x(request_id: str, batch_id: str = CACHED, *extra: tuple[str, str], version: str = "HTTP/1.1") -> bytes:
    """``GET /v2/batches/<batch_id>`` with a valid key, ``X-Request-ID: <request_id>``, kept alive."""
    return request_bytes(
        f"/v2/batches/{batch_id}", [("X-Request-ID", request_id), *extra], close=False, version=version
    )


@pytest.fixture(params=["cached", "uncached"])
def way(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answers(self, count: int) -> list[Answer]:
        return [await read_answer(self.reader) for _ in range(count)]

    async def closed(self, timeout_s: float = EXCHANGE_TIMEOUT_S) -> bool:
        """True once the gateway closes the connection with nothing more sent."""
        try:
            return await asyncio.wait_for(self.reader.read(1), timeout_s) == b""
        except ConnectionResetError:
            return True


LINGER_S = 10.0  # aiohttp's lingering_time: how long it reads on for a body after an answer that closes


@asynccontextmanager
async def connection(gateway: RunningGateway) -> AsyncIterator[Connection]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(gateway.host, gateway.port), EXCHANGE_TIMEOUT_S)
    try:
        yield Connection(reader, writer)
    finally:
        writer.close()


async def serving(simulator: Simulator, start: GatewayFactory, **server: object) -> RunningGateway:
    gateway = await start(make_config(simulator.url, upstream=PLENTY, server=server))
    await sdk(gateway.url).batches.retrieve(CACHED)
    return gateway


def ids_and_statuses(answers: list[Answer]) -> list[tuple[str | None, int]]:
    return [(a.header("X-Request-ID"), a.status) for a in answers]


# 1. A request whose body came late ------------------------------------------------------


async def test_forty_pipelined_requests_after_a_request_whose_body_came_late_are_all_answered(
    simulator: Simulator, start: GatewayFactory, way: str
) -> None:
    gateway = await serving(simulator, start)
    async with connection(gateway) as conn:
        await conn.send(x("late-body", batch_id_for(way), ("Content-Length", "10")))
        first = await conn.answers(1)
        # The body, and one request whose answer shows the gateway has read it.
        await conn.send(b"0123456789" + x("after-body", batch_id_for(way)))
        first += await conn.answers(1)
        await conn.send(b"".join(x(f"p{i}", batch_id_for(way)) for i in range(40)))
        answers = await conn.answers(40)

    assert ids_and_statuses(first) == [("late-body", 200), ("after-body", 200)]
    assert ids_and_statuses(answers) == [(f"p{i}", 200) for i in range(40)]


# 2. The head deadline behind a slow request ----------------------------------------------


async def test_a_half_sent_head_behind_a_slow_request_closes_the_connection_at_its_deadline(
    upstream: Upstream, start: GatewayFactory, way: str
) -> None:
    async def slow_for_slow_ids(request: web.Request) -> web.Response:
        batch_id = request.match_info["tail"].rsplit("/", 1)[-1]
        if batch_id.startswith("slow"):
            await asyncio.sleep(1.5)  # the upstream under test is a slow one
        return web.Response(body=batch_body(batch_id), content_type="application/json")

    upstream.script(slow_for_slow_ids)
    gateway = await start(
        make_config(upstream.url, upstream=PLENTY, server={"header_timeout_s": 0.5, "keepalive_timeout_s": 30})
    )
    await sdk(gateway.url).batches.retrieve(CACHED)
    async with connection(gateway) as conn:
        await conn.send(x("first", batch_id_for(way)) + x("slow", f"slow-{next(_fresh)}"))
        await conn.send(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        answers = await conn.answers(2)
        answered = time.monotonic()
        closed = await conn.closed()

    assert ids_and_statuses(answers) == [("first", 200), ("slow", 200)]
    assert closed
    assert time.monotonic() - answered < 5  # not the 30 s keep-alive timeout


# 3. Good requests, then bad bytes, in one read -------------------------------------------

BAD_TAILS = {
    "garbage": b"NOT HTTP AT ALL\r\n\r\n",
    "a request with no Host": request_bytes(host=None, close=False),
}


@pytest.mark.parametrize("tail", list(BAD_TAILS))
async def test_requests_before_bad_bytes_in_the_same_read_are_answered_before_the_400(
    simulator: Simulator, start: GatewayFactory, way: str, tail: str
) -> None:
    gateway = await serving(simulator, start)
    async with connection(gateway) as conn:
        await conn.send(x("X", batch_id_for(way)) + x("X2", batch_id_for(way)) + BAD_TAILS[tail])
        answers = await conn.answers(3)
        closed = await conn.closed()

    assert ids_and_statuses(answers[:2]) == [("X", 200), ("X2", 200)]
    assert (answers[2].status, answers[2].code) == (400, "malformed_request")
    assert answers[2].header("X-Request-ID") not in ("X", "X2")
    assert closed


# 4. Requests after Connection: close in the same read ------------------------------------


@pytest.mark.parametrize("closing", ["Connection: close", "HTTP/1.0 without keep-alive"])
async def test_requests_after_one_that_closes_the_connection_are_never_processed(
    simulator: Simulator, start: GatewayFactory, way: str, closing: str
) -> None:
    gateway = await serving(simulator, start)
    if closing == "Connection: close":
        last = x("X2", batch_id_for(way), ("Connection", "close"))
    else:
        last = x("X2", batch_id_for(way), version="HTTP/1.0")
    never = f"never-{next(_fresh)}"
    async with connection(gateway) as conn:
        await conn.send(x("X1", batch_id_for(way)) + last + x("X3", never))
        answers = await conn.answers(2)
        closed = await conn.closed()

    assert ids_and_statuses(answers) == [("X1", 200), ("X2", 200)]
    assert closed
    assert never not in {seen.path.rsplit("/", 1)[-1] for seen in simulator.seen}


# 5. A declined upgrade ---------------------------------------------------------------------


async def test_an_upgrade_the_gateway_does_not_perform_is_ignored_and_the_next_request_answered(
    simulator: Simulator, start: GatewayFactory, way: str
) -> None:
    gateway = await serving(simulator, start)
    upgrade = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")]
    async with connection(gateway) as conn:
        await conn.send(x("X", batch_id_for(way), *upgrade) + x("Y", batch_id_for(way)))
        answers = await conn.answers(2)
        await conn.send(x("Z", batch_id_for(way)))
        answers += await conn.answers(1)

    assert ids_and_statuses(answers) == [("X", 200), ("Y", 200), ("Z", 200)]
    assert {a.header("Upgrade") for a in answers} == {None}


# 6. Expect ---------------------------------------------------------------------------------


async def test_an_unknown_expect_gets_the_contracts_417_and_the_next_request_is_answered(
    simulator: Simulator, start: GatewayFactory, way: str
) -> None:
    gateway = await serving(simulator, start)
    refused_id = batch_id_for(way)
    async with connection(gateway) as conn:
        await conn.send(x("X", refused_id, ("Expect", "something-else")) + x("Y", batch_id_for(way)))
        refused, answered = await conn.answers(2)

    assert (refused.status, refused.header("X-Request-ID")) == (417, "X")
    assert refused.header("Content-Type") == "application/json"
    assert refused.json == {
        "message": refused.json["message"],
        "code": "expectation_failed",
        "request_id": "X",
    }
    assert "something-else" not in refused.json["message"]
    assert (answered.header("X-Request-ID"), answered.status) == ("Y", 200)
    assert refused_id == CACHED or refused_id not in {seen.path.rsplit("/", 1)[-1] for seen in simulator.seen}


async def test_a_100_continue_whose_length_is_past_the_limit_gets_413_at_once_and_no_continue(
    simulator: Simulator, start: GatewayFactory, way: str
) -> None:
    gateway = await serving(simulator, start)
    too_long = str(gateway.state.snapshot.config.server.max_body_bytes + 1)
    async with connection(gateway) as conn:
        await conn.send(x("X", batch_id_for(way), ("Expect", "100-continue"), ("Content-Length", too_long)))
        [refused] = await conn.answers(1)
        # Closed at once: no body is coming without a 100 Continue (aiohttp alone lingers 10 s for one).
        closed = await conn.closed(timeout_s=LINGER_S / 2)

    assert not refused.raw.startswith(b"HTTP/1.1 100")
    assert (refused.status, refused.code, refused.header("X-Request-ID")) == (413, "request_too_large", "X")
    assert refused.header("Content-Type") == "application/json"
    assert closed


async def test_a_100_continue_within_the_limit_is_still_answered_after_its_body(
    simulator: Simulator, start: GatewayFactory, way: str
) -> None:
    gateway = await serving(simulator, start)
    async with connection(gateway) as conn:
        await conn.send(x("X", batch_id_for(way), ("Expect", "100-continue"), ("Content-Length", "5")))
        continued = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), EXCHANGE_TIMEOUT_S)
        await conn.send(b"hello" + x("Y", batch_id_for(way)))
        answers = await conn.answers(2)

    assert continued == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert ids_and_statuses(answers) == [("X", 200), ("Y", 200)]


@pytest.mark.parametrize(
    ("expect", "content_length", "code"),
    [
        (["100-continue"], None, None),
        (["100-Continue"], 65536, None),
        ([" 100-continue "], 0, None),
        (["100-continue"], 65537, "request_too_large"),
        (["something-else"], None, "expectation_failed"),
        (["100-continue, something-else"], 5, "expectation_failed"),
        (["100-continue", "something-else"], 5, "expectation_failed"),
        ([""], None, None),
    ],
)
def test_expect_headers_map_to_the_contracts_rows(
    expect: list[str], content_length: int | None, code: str | None
) -> None:
    error = expect_error(expect, content_length, max_body_bytes=65536)
    assert (error.code if error else None) == code
