"""Hostile uploads (docs/design.md §11), byte by byte on raw sockets: limits, lies, stalls, hang-ups, floods.

The upstream here is ``Sink``: a raw responder that reads each upload as it
streams in (chunked or by Content-Length), keeps nothing of it, and notes
whether it came whole or was cut off. An upload the gateway must abort is
one the upstream sees cut off, never whole.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.edge.server import RunningGateway
from gateway.records.base import dataset_key
from tests.conftest import GatewayFactory, ProcessFactory
from tests.support import (
    EXCHANGE_TIMEOUT_S,
    PROCESS_WAIT_S,
    Answer,
    parse_response,
    process_config,
    raw_request,
    read_answer,
    registry_value,
    request_bytes,
    write_config,
)
from tests.test_uploads import EMBED, UPLOAD_PATH, multipart, upload_gateway, uploaders
from tests.upstream import Upstream, assert_error, create_body, http_answer

TARGET = f"{UPLOAD_PATH}?name=nightly&type={EMBED}"
LIMIT = 65536 * 4  # datasets.max_upload_bytes in these tests
IDLE_S = 0.5  # datasets.upload_idle_timeout_s in these tests
SMALL_LIMIT = 16384  # an upload limit below server.max_body_bytes


@dataclass
class Sink:
    """A raw upstream that drains each upload and answers a new id; ``outcomes``: "whole" or "cut" per request."""

    outcomes: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        headers = head.decode("latin-1").lower()
        size = 0
        try:
            if "transfer-encoding: chunked" in headers:
                while True:
                    length = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    size += len(await reader.readexactly(length + 2)) - 2
                    if length == 0:
                        break
            else:
                match = re.search(r"content-length: (\d+)", headers)
                left = int(match.group(1)) if match else 0
                while left:
                    piece = await reader.readexactly(min(left, 65536))
                    left -= len(piece)
                    size += len(piece)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self._note("cut", size)
            writer.close()
            return
        await self._note("whole", size)
        answer = json.dumps({"id": f"dataset-{len(self.outcomes):04d}"}).encode()
        writer.write(http_answer(200, answer))
        await writer.drain()

    async def _note(self, outcome: str, size: int) -> None:
        async with self.changed:
            self.outcomes.append(outcome)
            self.sizes.append(size)
            self.changed.notify_all()

    async def ended(self, count: int = 1) -> list[str]:
        """The outcomes once ``count`` uploads have ended (bounded wait)."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.outcomes) >= count), EXCHANGE_TIMEOUT_S)
        return self.outcomes


def sink(upstream: Upstream) -> Sink:
    made = Sink()
    upstream.raw(made.respond)
    return made


async def hostile_gateway(start: GatewayFactory, upstream: Upstream, **sections: Any) -> RunningGateway:
    datasets = {"max_upload_bytes": LIMIT, "upload_idle_timeout_s": IDLE_S, **sections.pop("datasets", {})}
    return await upload_gateway(start, upstream, datasets=datasets, **sections)


def upload_head(content_type: str, *headers: tuple[str, str], target: str = TARGET) -> bytes:
    return request_bytes(target, [("Content-Type", content_type), *headers], method="POST", close=False)


async def trickle(writer: asyncio.StreamWriter, data: bytes, piece: int = 16384, pause_s: float = 0.02) -> None:
    """``data`` a piece at a time, with a pause between (well within the idle timeout), so each is read alone."""
    for i in range(0, len(data), piece):
        writer.write(data[i : i + piece])
        await writer.drain()
        await asyncio.sleep(pause_s)


def chunked(data: bytes, piece: int = 16384) -> bytes:
    """``data`` in chunked framing, without the last chunk."""
    return b"".join(
        b"%x\r\n%s\r\n" % (len(data[i : i + piece]), data[i : i + piece]) for i in range(0, len(data), piece)
    )


async def connect(gateway: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(gateway.url)
    return await asyncio.open_connection(parts.hostname, parts.port)


# --- limits ------------------------------------------------------------------------------


async def test_a_content_length_past_the_upload_limit_is_413_at_once_with_no_upstream_call(
    upstream: Upstream, start: GatewayFactory
) -> None:
    # An upload limit below server.max_body_bytes (65536), so that only the upload's own limit can refuse it.
    gateway = await hostile_gateway(start, upstream, datasets={"max_upload_bytes": SMALL_LIMIT})
    content_type, _ = multipart()
    reader, writer = await connect(gateway)
    try:
        writer.write(upload_head(content_type, ("Content-Length", str(SMALL_LIMIT + 1))))  # and not one body byte
        answer = await read_answer(reader)
    finally:
        writer.close()

    assert_error(answer, 413, "request_too_large")
    assert upstream.count() == 0


async def test_expect_100_continue_past_the_upload_limit_gets_413_and_never_a_100_continue(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await hostile_gateway(start, upstream, datasets={"max_upload_bytes": SMALL_LIMIT})
    content_type, _ = multipart()
    reader, writer = await connect(gateway)
    try:
        writer.write(upload_head(content_type, ("Content-Length", str(SMALL_LIMIT + 1)), ("Expect", "100-continue")))
        raw = await asyncio.wait_for(reader.read(65536), EXCHANGE_TIMEOUT_S)
    finally:
        writer.close()

    assert b"100 Continue" not in raw
    assert_error(parse_response(raw), 413, "request_too_large")
    assert upstream.count() == 0


async def test_expect_100_continue_within_the_upload_limit_is_continued_and_uploaded(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = sink(upstream)
    gateway = await hostile_gateway(start, upstream)
    content_type, body = multipart()
    reader, writer = await connect(gateway)
    try:
        writer.write(upload_head(content_type, ("Content-Length", str(len(body))), ("Expect", "100-continue")))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EXCHANGE_TIMEOUT_S)
        writer.write(body)
        answer = await read_answer(reader)
    finally:
        writer.close()

    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert answer.status == 200, answer.body
    assert (await fake.ended(), fake.sizes) == (["whole"], [len(body)])


async def test_a_chunked_upload_that_grows_past_the_limit_is_cut_off_with_413_and_aborted_upstream(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = sink(upstream)
    gateway = await hostile_gateway(start, upstream)
    content_type, body = multipart(b"x" * (LIMIT + 65536))
    reader, writer = await connect(gateway)
    try:
        writer.write(upload_head(content_type, ("Transfer-Encoding", "chunked")))
        await trickle(writer, chunked(body), piece=32768)  # streamed upstream, until it passes the limit
        answer = await read_answer(reader)
    finally:
        writer.close()

    assert_error(answer, 413, "request_too_large")
    assert await fake.ended() == ["cut"]
    assert fake.sizes[0] <= LIMIT


async def test_a_batch_create_past_the_json_body_limit_is_still_413(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await hostile_gateway(start, upstream, server={"max_body_bytes": 1024})
    body = create_body(name="n" * 2000)
    with_length = request_bytes(
        "/v2/batches", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], method="POST"
    )
    chunked = request_bytes(
        "/v2/batches",
        [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        method="POST",
        body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    )
    expecting = request_bytes(
        "/v2/batches",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Expect", "100-continue")],
        method="POST",
    )

    for request in (with_length + body, chunked):
        assert_error(await raw_request(gateway.url, request), 413, "request_too_large")
    reader, writer = await connect(gateway)
    try:
        writer.write(expecting)
        raw = await asyncio.wait_for(reader.read(65536), EXCHANGE_TIMEOUT_S)  # the answer, not the close
    finally:
        writer.close()
    assert_error(parse_response(raw), 413, "request_too_large")
    assert upstream.count() == 0


# --- lies, stalls and hang-ups -----------------------------------------------------------


async def test_a_content_length_shorter_than_the_body_is_400_and_never_a_whole_upload(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = sink(upstream)
    gateway = await hostile_gateway(start, upstream)
    content_type, body = multipart(b"y" * 100_000)
    head = upload_head(content_type, ("Content-Length", str(len(body) - 5000)), ("Connection", "close"))

    answer = await raw_request(gateway.url, head + body)

    assert_error(answer, 400, "invalid_request")  # the body ends before its closing boundary
    assert "whole" not in fake.outcomes
    assert await gateway.state.records.owner_of(dataset_key("dataset-0001")) is None


async def test_a_content_length_longer_than_the_body_times_out_with_408_and_is_aborted_upstream(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = sink(upstream)
    gateway = await hostile_gateway(start, upstream)
    content_type, body = multipart(b"z" * 100_000)
    reader, writer = await connect(gateway)
    try:
        writer.write(upload_head(content_type, ("Content-Length", str(len(body) + 5000))))
        await trickle(writer, body)
        await upstream.arrival()  # streaming upstream; then the 5000 bytes promised never come
        answer = await read_answer(reader)
    finally:
        writer.close()

    assert_error(answer, 408, "request_timeout")
    assert await fake.ended() == ["cut"]


async def test_a_slowloris_upload_that_stops_sending_is_408_and_aborted_upstream(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = sink(upstream)
    gateway = await hostile_gateway(start, upstream)
    content_type, body = multipart(b"s" * 100_000)
    reader, writer = await connect(gateway)
    try:
        writer.write(upload_head(content_type, ("Transfer-Encoding", "chunked")))
        for i in range(0, 70_000, 10_000):  # a trickle, each piece well within the idle timeout
            piece = body[i : i + 10_000]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await asyncio.sleep(IDLE_S / 5)
        answer = await read_answer(reader)  # ... and then nothing
    finally:
        writer.close()

    assert_error(answer, 408, "request_timeout")
    assert await fake.ended() == ["cut"]
    assert fake.sizes[0] >= 60_000  # the trickle itself was streamed, not refused


async def test_a_caller_that_hangs_up_mid_upload_aborts_the_upstream_request_and_nothing_is_recorded(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = sink(upstream)
    gateway = await hostile_gateway(start, upstream, datasets={"upload_idle_timeout_s": 30})
    content_type, body = multipart(b"d" * 200_000)
    _, writer = await connect(gateway)
    writer.write(upload_head(content_type, ("Content-Length", str(len(body)))))
    await trickle(writer, body[:150_000])
    await upstream.arrival()  # the upload is streaming upstream
    writer.transport.abort()

    assert await fake.ended() == ["cut"]
    assert await _outcome_counted(gateway, "client_closed_request")
    assert await gateway.state.records.owner_of(dataset_key("dataset-0001")) is None


async def _outcome_counted(gateway: RunningGateway, outcome: str) -> bool:
    for _ in range(200):
        if registry_value(gateway, "gateway_dataset_uploads_total", caller="billing-service", outcome=outcome):
            return True
        await asyncio.sleep(0.02)
    return False


# --- what is not an upload ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "target"),
    [
        ("multipart/form-data; boundary=abc", b"this is not multipart at all, no boundary in sight\r\n\r\n", TARGET),
        ("multipart/form-data", multipart()[1], TARGET),
        ("application/json", b'{"data": "rows"}', TARGET),
        (multipart()[0], b"--b0undary\r\nContent-Type: text/plain\r\n\r\nno name\r\n--b0undary--\r\n", TARGET),
        (multipart()[0], multipart()[1][:-20], TARGET),
        (multipart()[0], multipart()[1], f"{UPLOAD_PATH}?name=nightly&type={EMBED}&model=command-r"),
        (multipart()[0], multipart()[1], f"{UPLOAD_PATH}?type={EMBED}"),
        (multipart()[0], multipart()[1], f"{UPLOAD_PATH}?name=a&name=b&type={EMBED}"),
    ],
    ids=[
        "garbage",
        "no-boundary",
        "not-multipart",
        "part-without-name",
        "no-closing-boundary",
        "unknown-query",
        "no-name",
        "name-twice",
    ],
)
async def test_a_body_that_is_not_a_multipart_upload_or_a_bad_query_is_400_with_no_upstream_call(
    upstream: Upstream, start: GatewayFactory, content_type: str, body: bytes, target: str
) -> None:
    sink(upstream)
    gateway = await hostile_gateway(start, upstream)
    head = upload_head(content_type, ("Content-Length", str(len(body))), ("Connection", "close"), target=target)

    answer = await raw_request(gateway.url, head + body)

    assert_error(answer, 400, "invalid_request")
    assert upstream.count() == 0


async def test_a_keyed_upload_malformed_after_its_opening_is_400_and_never_reaches_the_upstream_whole(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = sink(upstream)
    gateway = await hostile_gateway(start, upstream)
    content_type, body = multipart(b"m" * 100_000)
    broken = body[: -len(b"--b0undary--\r\n")] + b"--b0undary\r\nno header line\r\n\r\nzz\r\n--b0undary--\r\n"
    reader, writer = await connect(gateway)
    try:
        head = upload_head(content_type, ("Content-Length", str(len(broken))), ("Idempotency-Key", "malformed-1"))
        writer.write(head)
        await trickle(writer, broken)
        answer = await read_answer(reader)
    finally:
        writer.close()

    assert_error(answer, 400, "invalid_request")
    assert await fake.ended() == ["cut"]


# --- a flood -----------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.one_loop
async def test_a_flood_of_concurrent_uploads_keeps_the_gateways_memory_bounded(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    fake = sink(upstream)
    raw = process_config(upstream.url, callers=uploaders())
    gateway = await gateway_process(write_config(tmp_path / "config.yaml", raw))
    assert gateway.proc.pid is not None
    uploads, size = 16, 24 * 1024 * 1024  # 384 MiB in all, at once
    before = _rss_mb(gateway.proc.pid)
    peak = before
    piece = b"f" * 262144

    async def one() -> int:
        content_type, empty = multipart(b"")
        head, tail = empty.split(b"\r\n\r\n", 1)
        parts = urlsplit(gateway.url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            length = len(head) + 4 + size + len(tail)
            writer.write(upload_head(content_type, ("Content-Length", str(length)), ("Connection", "close")))
            writer.write(head + b"\r\n\r\n")
            for _ in range(size // len(piece)):
                writer.write(piece)
                await writer.drain()
            writer.write(tail)
            return (await read_answer(reader, PROCESS_WAIT_S * 4)).status
        finally:
            writer.close()

    flood = asyncio.gather(*(one() for _ in range(uploads)))
    for _ in range(2000):  # sampled every 10 ms while the flood runs (bounded)
        if flood.done():
            break
        peak = max(peak, _rss_mb(gateway.proc.pid))
        await asyncio.sleep(0.01)
    statuses = await asyncio.wait_for(flood, PROCESS_WAIT_S * 4)

    assert statuses == [200] * uploads
    assert fake.outcomes == ["whole"] * uploads
    assert peak - before < 64, f"RSS grew {peak - before:.1f} MB for {uploads * size >> 20} MiB uploaded"


async def test_an_upstream_that_stops_reading_an_upload_ends_it_with_504_and_the_caller_is_answered(
    upstream: Upstream, start: GatewayFactory
) -> None:
    read_some = asyncio.Event()
    done = asyncio.Event()

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        await reader.readexactly(65536)  # a little of the body...
        read_some.set()
        await done.wait()  # ...then nothing more, while the test runs
        writer.close()

    upstream.raw(stalls)
    size = 32 * 1024 * 1024  # more than every socket buffer between the gateway and the upstream
    gateway = await hostile_gateway(start, upstream, datasets={"max_upload_bytes": 2 * size})
    content_type, body = multipart(b"u" * size)
    try:
        answer = await _upload_while_sending(gateway, content_type, body, after=read_some)
    finally:
        done.set()

    assert_error(answer, 504, "upstream_timeout")
    assert await _outcome_counted(gateway, "upstream_timeout")


async def _upload_while_sending(
    gateway: RunningGateway, content_type: str, body: bytes, key: str | None = None, after: asyncio.Event | None = None
) -> Answer:
    """An upload on a raw socket (keyed if ``key``), its answer read while it is sent (it may come before the body
    ends), once ``after`` is set if given."""
    reader, writer = await connect(gateway)
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if key is not None:
        headers.append(("Idempotency-Key", key))

    async def send() -> None:
        writer.write(request_bytes(TARGET, headers, method="POST", close=True))
        for i in range(0, len(body), 1 << 20):
            writer.write(body[i : i + (1 << 20)])
            await writer.drain()

    sending = asyncio.create_task(send())
    try:
        if after is not None:
            await asyncio.wait_for(after.wait(), EXCHANGE_TIMEOUT_S)
        answer = await read_answer(reader)
        # The gateway reads the rest of the body (aiohttp's lingering read), then closes as asked.
        for _ in range(10_000):
            if not await asyncio.wait_for(reader.read(1 << 16), EXCHANGE_TIMEOUT_S):
                break
        return answer
    finally:
        sending.cancel()
        writer.transport.abort()


async def test_a_keyed_upload_refused_by_the_upstream_before_its_body_ended_is_refused_again_on_retry_not_422(
    upstream: Upstream, start: GatewayFactory
) -> None:
    heads: list[bytes] = []
    done = asyncio.Event()

    async def refuses_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        heads.append(head)
        writer.write(http_answer(400, json.dumps({"message": "invalid dataset type"}).encode()))
        await writer.drain()
        await done.wait()  # the body is never read
        writer.close()

    upstream.raw(refuses_at_once)
    size = 32 * 1024 * 1024  # more than every socket buffer: the answer comes long before the body's end
    gateway = await hostile_gateway(start, upstream, datasets={"max_upload_bytes": 2 * size})
    content_type, body = multipart(b"r" * size)
    try:
        first = await _upload_while_sending(gateway, content_type, body, "refused-early")
        again = await _upload_while_sending(gateway, content_type, body, "refused-early")
    finally:
        done.set()

    assert first.status == 400
    # The same key and the same file: the upstream's refusal again, not "this key was used for another file".
    assert (again.status, again.json["code"]) == (first.status, first.json["code"])
    assert len(heads) == 2
