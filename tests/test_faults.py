"""Upstream faults: every waiter on a batch gets the right answer, whatever the upstream does.

Each fault is met by ``WAITERS`` concurrent requests for the same id. The
upstream call is held (``hold_fetch_until_all_wait``) until all of them
wait on it, so every case exercises one shared fetch and its one outcome.
Faults that aiohttp cannot produce (silence, trickling, resets, truncation,
interim responses, compressed bombs) come from ``Upstream``: a server on
127.0.0.1 that writes whatever bytes the test gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import struct
import zlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from functools import cache
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.edge.server import RunningGateway
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    UPSTREAM_TOKEN,
    Answer,
    FakeClock,
    assert_no_secrets,
    free_port,
    make_config,
    registry_value,
)
from tests.upstream import Respond, Upstream, batch_body, http_answer

WAITERS = 50
BOUND_S = 30.0

# ---------------------------------------------------------------------------
# Furniture: raw answers, the hold, the fan-out
# ---------------------------------------------------------------------------


def answer_with(data: bytes, *, close: bool = False) -> Respond:
    async def respond(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _head: bytes) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return respond


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class HeldFetch:
    """Hold the gateway's upstream fetch until ``waiters`` requests wait on it.

    This wraps two methods of the in-process gateway (the cache's ``get`` and
    the upstream client's ``fetch``) only to count and to wait; it changes no
    answer. Without it, a fast fault could end before the last waiter came,
    and that waiter would start a second call.
    """

    def __init__(self, gateway: RunningGateway, waiters: int) -> None:
        self.entered = 0
        self.all_waiting = asyncio.Event()
        cache_ = gateway.state.cache
        upstream = gateway.state.upstream
        get, fetch = cache_.get, upstream.fetch

        async def counting_get(*args: Any, **kwargs: Any) -> Any:
            self.entered += 1
            if self.entered >= waiters:
                self.all_waiting.set()
            return await get(*args, **kwargs)

        async def held_fetch(*args: Any, **kwargs: Any) -> Any:
            await asyncio.wait_for(self.all_waiting.wait(), BOUND_S)
            return await fetch(*args, **kwargs)

        cache_.get = counting_get  # type: ignore[method-assign]
        upstream.fetch = held_fetch  # type: ignore[method-assign]


async def ask(url: str, batch_id: str = "batch-1", waiters: int = 1) -> list[Answer]:
    """``waiters`` concurrent requests for one id; every answer, secrets checked."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> Answer:
            headers = {"Authorization": f"Bearer {BILLING_KEY}"}
            async with session.get(f"{url}/v2/batches/{batch_id}", headers=headers) as response:
                body = await response.read()
                assert_no_secrets(body)
                assert_no_secrets(str(response.headers))
                return Answer(response.status, CIMultiDict(response.headers), body)

        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(waiters))), BOUND_S)


async def fan_out(gateway: RunningGateway, batch_id: str = "batch-1") -> list[Answer]:
    HeldFetch(gateway, WAITERS)
    answers = await ask(gateway.url, batch_id, WAITERS)
    assert len(answers) == WAITERS
    assert len(gateway.state.cache.flights) == 0
    return answers


def assert_all(answers: list[Answer], status: int, code: str | None, upstream_status: int | None = None) -> None:
    for answer in answers:
        assert answer.status == status, answer.body[:200]
        assert answer.headers["Content-Type"].startswith("application/json")
        if code is not None:
            assert answer.code == code
            assert answer.json.get("upstream_status") == upstream_status
            assert answer.json["message"]


# The deadline of the tests whose upstream never answers in time: short, so they stay fast.
SHORT_TIMEOUT_S = 0.5


def fault_config(base_url: str, **upstream: Any) -> Any:
    # Every other fault is answered at once; a deadline with room to spare keeps a busy
    # event loop (50 waiters, the client in the same loop) from turning it into a 504.
    settings = {"timeout_s": 5, "retries": 2, "retry_backoff_s": 0.01, "max_body_bytes": 65536, **upstream}
    return make_config(base_url, upstream=settings)


async def fan_out_through(
    start: GatewayFactory, upstream: Upstream, respond: Respond, **settings: Any
) -> tuple[Upstream, list[Answer]]:
    """A gateway in front of a raw upstream that answers with ``respond``; every waiter's answer."""
    raw = upstream.raw(respond)
    gateway = await start(fault_config(raw.url, **settings))
    return raw, await fan_out(gateway)


# ---------------------------------------------------------------------------
# The connection fails
# ---------------------------------------------------------------------------


async def test_a_refused_connection_is_502_unreachable_for_every_waiter_after_the_retries(
    start: GatewayFactory,
) -> None:
    gateway = await start(fault_config(f"http://127.0.0.1:{free_port()}"))
    answers = await fan_out(gateway)
    assert_all(answers, 502, "upstream_unreachable")
    # One call and two retries, shared by all.
    assert registry_value(gateway, "gateway_upstream_calls_total", outcome="upstream_unreachable") == 3


async def test_an_upstream_that_accepts_and_stays_silent_is_504_for_every_waiter(
    start: GatewayFactory, upstream: Upstream
) -> None:
    async def silent(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter, _head: bytes) -> None:
        await upstream.stopping.wait()

    upstream.raw(silent)
    gateway = await start(fault_config(upstream.url, timeout_s=SHORT_TIMEOUT_S))
    answers = await fan_out(gateway)
    assert_all(answers, 504, "upstream_timeout")
    assert upstream.count() == 1


async def test_an_upstream_that_accepts_and_never_reads_is_504_for_every_waiter(start: GatewayFactory) -> None:
    # A listening socket nobody accepts from: the kernel completes the handshake, then nothing.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(100)
        gateway = await start(fault_config(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout_s=SHORT_TIMEOUT_S))
        answers = await fan_out(gateway)
    assert_all(answers, 504, "upstream_timeout")


async def _trickle(writer: asyncio.StreamWriter, data: bytes, done: asyncio.Event) -> None:
    for byte in data:
        writer.write(bytes([byte]))
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.05)
        if done.is_set():
            return


@pytest.mark.parametrize("where", ["head", "body"])
async def test_an_answer_that_trickles_past_the_deadline_is_504_for_every_waiter(
    start: GatewayFactory, upstream: Upstream, where: str
) -> None:
    answer = http_answer(200, batch_body() + b" " * 200)

    async def trickle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _head: bytes) -> None:
        head, _, body = answer.partition(b"\r\n\r\n")
        if where == "head":
            await _trickle(writer, answer, upstream.stopping)
        else:
            writer.write(head + b"\r\n\r\n")
            await _trickle(writer, body, upstream.stopping)

    upstream.raw(trickle)
    gateway = await start(fault_config(upstream.url, timeout_s=SHORT_TIMEOUT_S))
    answers = await fan_out(gateway)
    assert_all(answers, 504, "upstream_timeout")
    assert upstream.count() == 1


async def reset_at_once(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _head: bytes) -> None:
    reset(writer)


@pytest.mark.parametrize("respond", [reset_at_once, answer_with(b"", close=True)], ids=["reset", "close"])
async def test_a_reset_or_close_before_any_answer_is_502_unreachable_after_the_retries(
    start: GatewayFactory, upstream: Upstream, respond: Respond
) -> None:
    upstream, answers = await fan_out_through(start, upstream, respond)
    assert_all(answers, 502, "upstream_unreachable")
    assert upstream.count() == 3


# A 200 whose body does not arrive whole is a 2xx that is not the expected JSON:
# 502 upstream_invalid_response, not retried (the upstream did answer).
async def test_a_reset_mid_body_is_502_invalid_response_for_every_waiter(
    start: GatewayFactory, upstream: Upstream
) -> None:
    async def reset_mid_body(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _head: bytes) -> None:
        writer.write(http_answer(200, batch_body() + b" " * 1000)[:150])
        await writer.drain()
        reset(writer)

    upstream, answers = await fan_out_through(start, upstream, reset_mid_body)
    assert_all(answers, 502, "upstream_invalid_response", None)
    assert upstream.count() == 1


@pytest.mark.parametrize(
    "data",
    [
        # A body that does not arrive whole or whose framing is broken.
        http_answer(200, batch_body())[:-10],
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + batch_body(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n" + batch_body()[:16],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot chunked\r\n",
        # An answer that is not HTTP at all.
        b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/9.9 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"this is not http\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nBad Header\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=[
        "short-by-10",
        "length-larger-than-sent",
        "chunked-without-end",
        "broken-chunk-size",
        "non-numeric-status",
        "unknown-version",
        "not-http",
        "two-content-lengths",
        "bad-header",
    ],
)
async def test_a_truncated_misframed_or_non_http_answer_is_502_invalid_response_for_every_waiter_never_a_500(
    start: GatewayFactory, upstream: Upstream, data: bytes
) -> None:
    upstream, answers = await fan_out_through(start, upstream, answer_with(data, close=True))
    assert_all(answers, 502, "upstream_invalid_response", None)
    assert upstream.count() == 1


# ---------------------------------------------------------------------------
# The body is wrong
# ---------------------------------------------------------------------------

NOT_A_BATCH = [
    b"not json",
    b"",
    b"\xff\xfe\x00",
    b"[]",
    b'"batch"',
    b"null",
    b"42",
    b'{"batch": []}',
    b'{"batch": null}',
    b'{"batch": "batch-1"}',
    b'{"data": {"id": "batch-1"}}',
    b'{"batch": {"id": "batch-1"}',
    b'{"batch": {"id": "batch-1"}} trailing',
    b"[" * 100000 + b"]" * 100000,
]


@pytest.mark.parametrize("body", NOT_A_BATCH, ids=[repr(b[:30]) for b in NOT_A_BATCH])
async def test_a_200_that_is_not_a_batch_object_is_502_for_every_waiter_and_not_cached(
    start: GatewayFactory, upstream: Upstream, body: bytes
) -> None:
    upstream.script(_fixed(200, body))
    gateway = await start(fault_config(upstream.url, max_body_bytes=1048576))
    answers = await fan_out(gateway)
    assert_all(answers, 502, "upstream_invalid_response", 200)
    assert upstream.count() == 1
    await ask(gateway.url)
    assert upstream.count() == 2  # an invalid answer is never cached


def _fixed(status: int, body: bytes, headers: dict[str, str] | None = None) -> Any:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    return handler


@pytest.mark.parametrize(
    "batch",
    [
        {"id": "batch-1"},
        {"id": "batch-1", "status": None},
        {"id": "batch-1", "status": "BATCH_STATUS_EXPLODED"},
        {"id": "batch-1", "status": ""},
        {"id": "batch-1", "status": "batch_status_completed"},
    ],
    ids=["missing", "null", "unknown", "empty", "lowercase-terminal"],
)
async def test_a_batch_without_a_known_status_is_served_to_every_waiter_and_cached_as_active(
    start: GatewayFactory, upstream: Upstream, batch: dict[str, Any]
) -> None:
    body = json.dumps({"batch": batch}).encode()
    upstream.script(_fixed(200, body))
    clock = FakeClock()
    config = make_config(upstream.url, cache={"ttl_s": {"active": 5, "terminal": 86400}, "active_jitter": 0})
    gateway = await start(config, clock=clock)
    answers = await fan_out(gateway)
    for answer in answers:
        assert answer.status == 200
        assert answer.body == body  # byte for byte
        assert answer.headers["Cache-Control"] == "private, max-age=5"
    assert upstream.count() == 1
    clock.advance(4)
    assert (await ask(gateway.url))[0].headers["X-Cache"] == "HIT"
    clock.advance(2)
    assert (await ask(gateway.url))[0].headers["X-Cache"] == "MISS"
    assert upstream.count() == 2


# ---------------------------------------------------------------------------
# The body is too large
# ---------------------------------------------------------------------------

CAP = 65536


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close-delimited"])
async def test_a_body_past_max_body_bytes_is_502_for_every_waiter(
    start: GatewayFactory, upstream: Upstream, framing: str
) -> None:
    body = b'{"batch": {"id": "batch-1", "pad": "' + b"x" * (4 * CAP) + b'"}}'

    async def huge(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _head: bytes) -> None:
        if framing == "content-length":
            writer.write(http_answer(200, body))
        elif framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for start_at in range(0, len(body), 4096):
                chunk = body[start_at : start_at + 4096]
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    upstream, answers = await fan_out_through(start, upstream, huge, max_body_bytes=CAP)
    assert_all(answers, 502, "upstream_invalid_response", 200)
    assert upstream.count() == 1


async def test_a_body_of_exactly_max_body_bytes_is_served(start: GatewayFactory, upstream: Upstream) -> None:
    prefix = b'{"batch": {"id": "batch-1", "pad": "'
    body = prefix + b"x" * (CAP - len(prefix) - 3) + b'"}}'
    assert len(body) == CAP
    upstream.script(_fixed(200, body))
    gateway = await start(fault_config(upstream.url, max_body_bytes=CAP))
    answers = await fan_out(gateway)
    assert all(answer.status == 200 and answer.body == body for answer in answers)


@cache
def gzip_bomb(inflated_mb: int = 64) -> bytes:
    """A valid gzip member of a batch-shaped JSON padded with ``inflated_mb`` MiB of spaces."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(b'{"batch": {"id": "batch-1", "status": "BATCH_STATUS_COMPLETED", "pad": "')]
    block = b" " * (1 << 20)
    parts += [compressor.compress(block) for _ in range(inflated_mb)]
    parts.append(compressor.compress(b'"}}'))
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_that_inflates_past_the_cap_is_502_for_every_waiter(
    start: GatewayFactory, upstream: Upstream, encoding: str
) -> None:
    bomb = gzip_bomb()
    if encoding == "deflate":
        bomb = zlib.compress(gzip.decompress(bomb)[: 8 * CAP], 9)
    assert len(bomb) < CAP  # small on the wire: only the inflated size is past the cap
    upstream, answers = await fan_out_through(
        start, upstream, answer_with(http_answer(200, bomb, {"Content-Encoding": encoding})), max_body_bytes=CAP
    )
    assert_all(answers, 502, "upstream_invalid_response", 200)
    assert upstream.count() == 1


async def test_a_compressed_body_within_the_cap_is_served_inflated(start: GatewayFactory, upstream: Upstream) -> None:
    body = batch_body(status="BATCH_STATUS_COMPLETED")
    _, answers = await fan_out_through(
        start,
        upstream,
        answer_with(http_answer(200, gzip.compress(body), {"Content-Encoding": "gzip"})),
        max_body_bytes=CAP,
    )
    assert all(answer.status == 200 and answer.body == body for answer in answers)
    assert all("Content-Encoding" not in answer.headers for answer in answers)


async def test_a_body_that_claims_gzip_but_is_not_is_502_for_every_waiter(
    start: GatewayFactory, upstream: Upstream
) -> None:
    upstream, answers = await fan_out_through(
        start,
        upstream,
        answer_with(http_answer(200, batch_body(), {"Content-Encoding": "gzip"})),
        max_body_bytes=CAP,
    )
    assert_all(answers, 502, "upstream_invalid_response", None)
    assert upstream.count() == 1


# ---------------------------------------------------------------------------
# Redirects, interim answers and odd statuses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [300, 301, 302, 303, 305, 307, 308])
async def test_a_redirect_is_502_for_every_waiter_and_never_followed(
    start: GatewayFactory, upstream: Upstream, status: int
) -> None:
    target = (await upstream.another()).script(_fixed(200, batch_body()))
    location = f"{target.url}/v2/batches/batch-1?stolen=1"
    upstream.script(_fixed(status, b"", {"Location": location}))
    gateway = await start(fault_config(upstream.url))
    answers = await fan_out(gateway)
    assert_all(answers, 502, "upstream_error", status)
    assert all("Location" not in answer.headers for answer in answers)
    assert upstream.count() == 1
    assert target.count() == 0


@pytest.mark.parametrize("interim", [b"100 Continue", b"102 Processing", b"103 Early Hints\r\nLink: </x>; rel=preload"])
async def test_interim_1xx_answers_are_skipped_and_the_final_answer_served(
    start: GatewayFactory, upstream: Upstream, interim: bytes
) -> None:
    body = batch_body()
    data = b"HTTP/1.1 " + interim + b"\r\n\r\n" + http_answer(200, body)
    upstream, answers = await fan_out_through(start, upstream, answer_with(data))
    assert all(answer.status == 200 and answer.body == body for answer in answers)
    assert upstream.count() == 1


async def test_an_interim_answer_with_no_final_answer_is_502_for_every_waiter(
    start: GatewayFactory, upstream: Upstream
) -> None:
    _, answers = await fan_out_through(start, upstream, answer_with(b"HTTP/1.1 100 Continue\r\n\r\n", close=True))
    for answer in answers:
        assert answer.status == 502
        assert answer.code in ("upstream_unreachable", "upstream_invalid_response")


async def test_an_unasked_101_switching_protocols_is_502_for_every_waiter(
    start: GatewayFactory, upstream: Upstream
) -> None:
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + batch_body()
    upstream, answers = await fan_out_through(start, upstream, answer_with(data, close=True))
    assert_all(answers, 502, "upstream_error", 101)
    assert upstream.count() == 1


ODD_STATUSES = [
    # (status, gateway status, code, upstream calls: retried statuses are tried 3 times)
    (201, 502, "upstream_invalid_response", 1),
    (202, 502, "upstream_invalid_response", 1),
    (204, 502, "upstream_invalid_response", 1),
    (206, 502, "upstream_invalid_response", 1),
    (299, 502, "upstream_invalid_response", 1),
    (304, 502, "upstream_error", 1),
    (402, 502, "upstream_error", 1),
    (405, 502, "upstream_error", 1),
    (409, 502, "upstream_error", 1),
    (418, 502, "upstream_error", 1),
    (451, 502, "upstream_error", 1),
    (499, 502, "upstream_error", 1),
    (500, 502, "upstream_error", 1),
    (501, 502, "upstream_error", 1),
    (502, 502, "upstream_error", 3),
    (504, 502, "upstream_error", 3),
    (507, 502, "upstream_error", 1),
    (599, 502, "upstream_error", 1),
]


@pytest.mark.parametrize(("status", "gateway_status", "code", "calls"), ODD_STATUSES)
async def test_odd_statuses_get_their_row_of_the_error_table_for_every_waiter(
    start: GatewayFactory, upstream: Upstream, status: int, gateway_status: int, code: str, calls: int
) -> None:
    body = b"" if status in (204, 304) else json.dumps({"message": f"status {status}"}).encode()
    upstream.raw(answer_with(http_answer(status, body)))
    gateway = await start(fault_config(upstream.url))
    answers = await fan_out(gateway)
    assert_all(answers, gateway_status, code, status)
    assert upstream.count() == calls
    await ask(gateway.url)
    assert upstream.count() == 2 * calls  # never cached


@pytest.mark.parametrize("status", [600, 999])
async def test_a_status_past_599_is_502_for_every_waiter_and_never_a_500(
    start: GatewayFactory, upstream: Upstream, status: int
) -> None:
    _, answers = await fan_out_through(start, upstream, answer_with(http_answer(status, b"{}")))
    for answer in answers:
        assert answer.status == 502
        assert answer.code in ("upstream_error", "upstream_invalid_response")


@pytest.mark.parametrize("status", [400, 404, 409, 500])
async def test_an_upstream_message_that_echoes_the_token_never_reaches_the_caller(
    start: GatewayFactory, upstream: Upstream, status: int
) -> None:
    # A buggy or hostile upstream may echo the credentials it was sent.
    message = f"bad request: Authorization was 'Bearer {UPSTREAM_TOKEN}' (token {UPSTREAM_TOKEN})"
    upstream.script(_fixed(status, json.dumps({"message": message}).encode()))
    gateway = await start(fault_config(upstream.url))
    answers = await fan_out(gateway)  # ask() fails if a secret is in any answer
    assert len({answer.status for answer in answers}) == 1


# ---------------------------------------------------------------------------
# Retry-After in every form
# ---------------------------------------------------------------------------


class HttpDate:
    """An HTTP date ``offset_s`` from the moment the test runs (not from collection)."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def __str__(self) -> str:
        return format_datetime(datetime.now(UTC) + timedelta(seconds=self.offset_s), usegmt=True)

    def __repr__(self) -> str:
        return f"http-date{self.offset_s:+g}s"


RETRY_AFTER: list[tuple[str | HttpDate | None, int, int, bool]] = [
    # (header value, lowest and highest Retry-After the callers get, whether the upstream pauses)
    ("7", 7, 7, True),
    ("1", 1, 1, True),
    (" 12 ", 12, 12, True),
    ("120", 120, 120, True),
    (HttpDate(30), 28, 31, True),
    (HttpDate(10 * 365 * 86400), 300, 300, True),
    ("99999999999", 300, 300, True),
    # "Come back now": callers are told 1 s (never 0), and the upstream is not paused.
    ("0", 1, 1, False),
    (HttpDate(-3600), 1, 1, False),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 1, 1, False),
    # Garbage gets upstream.retry_after_default_s (5).
    ("999999999999999999999999", 5, 5, True),
    ("-5", 5, 5, True),
    ("1.5", 5, 5, True),
    ("7, 8", 5, 5, True),
    ("soon", 5, 5, True),
    ("", 5, 5, True),
    ("\u00e9t\u00e9", 5, 5, True),
    (None, 5, 5, True),
]


@pytest.mark.parametrize("upstream_status", [429, 503])
@pytest.mark.parametrize(("value", "low", "high", "pauses"), RETRY_AFTER, ids=[repr(r[0]) for r in RETRY_AFTER])
async def test_retry_after_in_every_form_reaches_every_waiter_capped_and_pauses_the_upstream(
    start: GatewayFactory,
    upstream: Upstream,
    upstream_status: int,
    value: str | HttpDate | None,
    low: int,
    high: int,
    pauses: bool,
) -> None:
    headers = {} if value is None else {"Retry-After": str(value)}
    upstream.raw(answer_with(http_answer(upstream_status, b'{"message": "slow down"}', headers)))
    clock = FakeClock()
    gateway = await start(fault_config(upstream.url), clock=clock)
    answers = await fan_out(gateway)
    code = "upstream_rate_limited" if upstream_status == 429 else "upstream_unavailable"
    assert_all(answers, upstream_status, code, upstream_status)
    given = {int(answer.headers["Retry-After"]) for answer in answers}
    assert len(given) == 1
    assert low <= given.pop() <= high
    told_when = upstream_status == 429 or value is not None
    assert upstream.count() == (1 if told_when else 3)  # only a 503 without Retry-After is retried
    if told_when and pauses:
        # While paused, no upstream call for any id; the rest of the wait is told.
        follow_up = (await ask(gateway.url, "another-batch"))[0]
        assert (follow_up.status, follow_up.code) == (429, "upstream_rate_limited")
        assert 1 <= int(follow_up.headers["Retry-After"]) <= high
        assert upstream.count() == 1
        clock.advance(high + 1)
    await ask(gateway.url, "another-batch")
    assert upstream.count() == (2 if told_when else 6)
