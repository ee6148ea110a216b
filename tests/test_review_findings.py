"""Request bodies (docs/design.md §7, §8): they must keep arriving, and a body that arrived is judged by the config
in force.

A caller is admitted when the head of its request arrives; its body may
come much later. These tests hold a body back over a raw socket (the head
asks for ``100-continue``, so the test knows the head was admitted before it
changes anything), then: let it stall past ``server.body_timeout_s``; reload
the config under it; or hang up. Nothing may reach the upstream as a caller
that the config in force no longer admits, a stalled body is a 408 that
closes the connection, and a client that hangs up is no server error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.edge.server import RunningGateway
from tests.conftest import GatewayFactory
from tests.support import (
    ANALYTICS_KEY,
    BILLING_KEY,
    REPORTING_KEY,
    Answer,
    LogCapture,
    eventually,
    http,
    make_config,
    read_answer,
    registry_value,
)
from tests.upstream import ACTIVE, ALL_OPERATIONS, Upstream, assert_error, caller, create_body, write_callers

WAIT_S = 10.0  # bound on every wait in this module
CREATE = "/v2/batches"
CANCEL = "/v2/batches/batch-1:cancel"


@dataclass
class OpenBody:
    """A request whose head was admitted and whose body is still to come."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    rest: bytes

    async def finish(self) -> Answer:
        self.writer.write(self.rest)
        await self.writer.drain()
        return await read_answer(self.reader, WAIT_S)


@asynccontextmanager
async def body_held_back(
    gateway: RunningGateway, target: str, body: bytes, *, sent: int = 1, key: str = BILLING_KEY, **headers: str
) -> AsyncIterator[OpenBody]:
    """Send ``target``'s head and the first ``sent`` bytes of ``body``; the rest is the test's to send.

    The head asks for ``100-continue``: aiohttp answers it right before the
    route's handler runs, which admits the caller and then waits for the body.
    """
    parts = urlsplit(gateway.url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), WAIT_S)
    head = [
        f"POST {target} HTTP/1.1",
        "Host: gateway.internal",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Expect: 100-continue",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    try:
        writer.write("\r\n".join(head).encode() + b"\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        writer.write(body[:sent])
        await writer.drain()
        yield OpenBody(reader, writer, body[sent:])
    finally:
        writer.close()


async def writers_gateway(start: GatewayFactory, upstream: Upstream, **server: Any) -> RunningGateway:
    upstream.seed("batch-1", status=ACTIVE)
    return await start(make_config(upstream.url, callers=write_callers(), server=server))


def body_for(target: str) -> bytes:
    return create_body() if target == CREATE else b"{}"


# ---------------------------------------------------------------------------
# A body that stops arriving
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [CREATE, CANCEL], ids=["create", "cancel"])
async def test_a_body_that_stops_arriving_is_answered_408_and_its_connection_closed(
    target: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writers_gateway(start, upstream, body_timeout_s=0.3)
    async with body_held_back(gateway, target, body_for(target)) as held:
        started = time.monotonic()
        answer = await read_answer(held.reader, WAIT_S)
        assert_error(answer, 408, "request_timeout")
        assert time.monotonic() - started >= 0.25
        # Then the connection is closed, at once: no lingering for the rest of the body.
        assert await asyncio.wait_for(held.reader.read(), 2.0) == b""
    assert upstream.count() == 0
    route = target.replace("batch-1", "{id}")
    labels = {"caller": "billing-service", "route": route, "status": "408", "cache": "-"}
    assert registry_value(gateway, "gateway_requests_total", **labels) == 1


async def test_a_body_that_keeps_arriving_slowly_is_not_cut_off(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await writers_gateway(start, upstream, body_timeout_s=1.0)
    body = create_body()
    async with body_held_back(gateway, CREATE, body, sent=0) as held:
        # Five pieces 0.4 s apart: 2 s in all, past the deadline, but never 1 s without a byte.
        piece = len(body) // 5 + 1
        for offset in range(0, len(body), piece):
            held.writer.write(body[offset : offset + piece])
            await held.writer.drain()
            await asyncio.sleep(0.4)
        answer = await read_answer(held.reader, WAIT_S)
    assert answer.status == 200, answer.body[:300]
    assert upstream.count("create") == 1


# ---------------------------------------------------------------------------
# A reload while a body is arriving
# ---------------------------------------------------------------------------

BILLING_REMOVED = [caller("reporting", REPORTING_KEY, ALL_OPERATIONS)]
BILLING_REKEYED = [caller("billing-service", ANALYTICS_KEY, ALL_OPERATIONS), *BILLING_REMOVED]


def billing_allowed(allow: list[str], batches: str = "all") -> list[dict[str, Any]]:
    return [caller("billing-service", BILLING_KEY, allow, batches), *BILLING_REMOVED]


@pytest.mark.parametrize(
    ("target", "callers", "status", "code"),
    [
        (CREATE, BILLING_REMOVED, 401, "unauthorized"),
        (CREATE, BILLING_REKEYED, 401, "unauthorized"),
        (CREATE, billing_allowed(["retrieve", "list", "cancel"]), 403, "operation_not_allowed"),
        (CANCEL, BILLING_REMOVED, 401, "unauthorized"),
        (CANCEL, BILLING_REKEYED, 401, "unauthorized"),
        (CANCEL, billing_allowed(["retrieve", "list", "create"]), 403, "operation_not_allowed"),
        (CANCEL, billing_allowed(ALL_OPERATIONS, "own"), 404, "not_found"),
    ],
    ids=[
        "create, caller removed",
        "create, key changed",
        "create, permission dropped",
        "cancel, caller removed",
        "cancel, key changed",
        "cancel, permission dropped",
        "cancel, scope narrowed to own",
    ],
)
async def test_a_caller_revoked_while_its_body_was_arriving_is_refused_without_an_upstream_call(
    target: str,
    callers: list[dict[str, Any]],
    status: int,
    code: str,
    upstream: Upstream,
    start: GatewayFactory,
) -> None:
    gateway = await writers_gateway(start, upstream)
    async with body_held_back(gateway, target, body_for(target)) as held:
        gateway.state.apply(make_config(upstream.url, callers=callers))
        if status == 401:
            assert_error(await http(f"{gateway.url}/v2/batches/batch-1"), 401, "unauthorized")
        answer = await held.finish()
    assert_error(answer, status, code)
    assert upstream.count() == 0
    assert upstream.batches["batch-1"]["status"] == ACTIVE


async def test_a_body_that_arrives_after_a_reload_goes_to_the_upstream_configured_then(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writers_gateway(start, upstream)
    moved = await Upstream().start()
    try:
        async with body_held_back(gateway, CREATE, create_body()) as held:
            gateway.state.apply(make_config(moved.url, callers=write_callers()))
            answer = await held.finish()
        assert answer.status == 200, answer.body[:300]
        assert (upstream.count("create"), moved.count("create")) == (0, 1)
    finally:
        await moved.stop()


# ---------------------------------------------------------------------------
# A client that hangs up mid-body
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("idempotency_key", [None, "hang-up-1"], ids=["plain", "keyed"])
@pytest.mark.parametrize("target", [CREATE, CANCEL], ids=["create", "cancel"])
async def test_a_client_that_hangs_up_mid_body_is_no_server_error(
    target: str, idempotency_key: str | None, upstream: Upstream, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await writers_gateway(start, upstream)
    headers = {"Idempotency_Key": idempotency_key} if idempotency_key else {}
    async with body_held_back(gateway, target, body_for(target), **headers):
        pass  # the connection is closed with the body unfinished

    await assert_no_server_error(gateway, upstream, logs)


async def test_a_client_that_hangs_up_mid_chunked_body_is_no_server_error(
    upstream: Upstream, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await writers_gateway(start, upstream)
    parts = urlsplit(gateway.url)
    _reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), WAIT_S)
    head = (
        f"POST {CREATE} HTTP/1.1\r\nHost: gateway.internal\r\nAuthorization: Bearer {BILLING_KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    writer.write(head.encode() + b"8\r\n" + create_body()[:8] + b"\r\n")
    await writer.drain()
    writer.close()
    await assert_no_server_error(gateway, upstream, logs)


async def assert_no_server_error(gateway: RunningGateway, upstream: Upstream, logs: LogCapture) -> None:
    """Once the request is accounted for: no upstream call, no ERROR line, and counted as 499, not as a 5xx."""

    def answered() -> bool:
        samples = gateway.state.metrics.registry.collect()
        return any(s.name == "gateway_requests_total" and s.value for f in samples for s in f.samples)

    assert await eventually(answered, WAIT_S)
    assert upstream.count() == 0
    errors = [e for e in logs.events() if e["level"] in ("error", "critical")]
    assert errors == [], errors
    requests = [
        (s.labels["status"], s.value)
        for f in gateway.state.metrics.registry.collect()
        for s in f.samples
        if s.name == "gateway_requests_total"
    ]
    assert [status for status, _ in requests] == ["499"], requests
