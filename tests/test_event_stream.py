"""The event stream (docs/design.md §12, "The feed"): text/event-stream over raw HTTP, as any SSE client reads it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.conftest import GatewayFactory, ProcessFactory
from tests.support import BILLING_KEY, REPORTING_KEY, eventually, http, make_config, raw_config, sdk, write_config
from tests.test_events import COMPLETED, feed, latest
from tests.upstream import ACTIVE, QUEUED, Upstream, write_callers

READ_S = 10.0  # bound on every read from a stream
SSE = {"Accept": "text/event-stream"}


@dataclass
class Stream:
    """One text/event-stream answer read off a socket: the head, then chunks as they come."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    head: str
    text: str = ""
    ended: bool = False
    frames: list[dict[str, Any]] = field(default_factory=list)

    async def _chunk(self) -> None:
        size = int((await self.reader.readline()).strip() or b"0", 16)
        if size == 0:
            self.ended = True
            return
        data = await self.reader.readexactly(size + 2)
        self.text += data[:-2].decode()

    async def next_frame(self, timeout_s: float = READ_S) -> dict[str, Any] | None:
        """The next block (an event, or a comment); None once the stream has ended."""
        async with asyncio.timeout(timeout_s):
            while "\n\n" not in self.text:
                if self.ended:
                    return None
                await self._chunk()
        block, _, self.text = self.text.partition("\n\n")
        frame: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ") if not line.startswith(":") else ("comment", "", line[1:].strip())
            frame[name] = value
        return frame

    async def events(self, count: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while len(found) < count:
            frame = await self.next_frame()
            assert frame is not None, "the stream ended early"
            if "event" in frame:
                found.append(frame)
        return found

    def close(self) -> None:
        self.writer.close()


async def open_stream(url: str, query: str = "", key: str = BILLING_KEY, **headers: str) -> Stream:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [
        f"GET /gateway/v1/events?{query} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Authorization: Bearer {key}",
        "Accept: text/event-stream",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    async with asyncio.timeout(READ_S):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
    stream = Stream(reader, writer, int(head.split(" ", 2)[1]), head)
    if stream.status == 200:
        first = await stream.next_frame()
        assert first == {"retry": "1000"}
    return stream


async def test_a_stream_sends_each_event_with_its_id_type_and_json_and_resumes_from_last_event_id(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    stream = await open_stream(gateway.url)
    assert "text/event-stream" in stream.head
    upstream.seed("batch-1", status=QUEUED)
    await sdk(gateway.url).batches.retrieve("batch-1")
    upstream.set_status("batch-1", ACTIVE)
    await gateway.state.cache.evict("batch-1")
    await sdk(gateway.url).batches.retrieve("batch-1")
    first, second = await stream.events(2)
    stream.close()
    assert [first["event"], second["event"]] == ["batch.queued", "batch.in_progress"]
    paged = (await feed(gateway)).document["events"]
    assert [json.loads(first["data"]), json.loads(second["data"])] == paged
    assert [first["id"], second["id"]] == [e["id"] for e in paged]
    resumed = await open_stream(gateway.url, Last_Event_ID=first["id"])
    (again,) = await resumed.events(1)
    assert again == second
    resumed.close()


async def test_a_junk_last_event_id_or_after_is_a_json_400_before_any_stream(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    for junk in ("x" * 5000, "AAAA", "../../etc/passwd", "\x7f", "-1", "latest latest"):
        stream = await open_stream(gateway.url, Last_Event_ID=junk)
        assert stream.status in (400, 431), stream.head
        assert "application/json" in stream.head
        stream.close()
    stream = await open_stream(gateway.url, "after=nonsense")
    assert stream.status == 400
    stream.close()
    assert upstream.count() == 0


async def test_an_idle_stream_gets_a_comment_every_keepalive_and_ends_after_max_stream_s(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url, events={"keepalive_s": 0.2, "max_stream_s": 1.5}))
    stream = await open_stream(gateway.url, "after=latest")
    comments = 0
    started = asyncio.get_running_loop().time()
    while (frame := await stream.next_frame()) is not None:
        assert frame == {"comment": "keep-alive"}
        comments += 1
    elapsed = asyncio.get_running_loop().time() - started
    assert 1.0 <= elapsed < 5
    assert comments >= 4


async def test_an_own_callers_stream_carries_only_its_own_batches_events(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url, callers=write_callers(billing="own")))
    stream = await open_stream(gateway.url)
    upstream.seed("batch-not-mine", status=ACTIVE)
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-not-mine")
    mine = await sdk(gateway.url).batches.create(request={"name": "n", "input_dataset_id": "d", "model": "m"})
    (event,) = await stream.events(1)
    assert json.loads(event["data"])["data"]["batch"]["id"] == mine.batch.id
    stream.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_two_thousand_streams_opened_and_dropped_give_back_every_descriptor(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    metrics = gateway.state.metrics.events
    await latest(gateway)
    before = open_fds()
    for _ in range(10):
        streams = await asyncio.gather(*(open_stream(gateway.url, "after=latest") for _ in range(200)))
        assert all(s.status == 200 for s in streams)
        assert metrics.streams._value.get() == 200
        for stream in streams:
            stream.close()
        assert await eventually(lambda: metrics.streams._value.get() == 0)
    assert await eventually(lambda: open_fds() <= before + 2)


async def test_sigterm_ends_every_stream_at_once_and_the_gateway_exits_0(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    config = raw_config(upstream.url, server={"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 30})
    process = await gateway_process(write_config(tmp_path / "config.yaml", config))
    streams = [await open_stream(process.url, "after=latest") for _ in range(3)]
    upstream.seed("batch-1", status=ACTIVE)
    await sdk(process.url).batches.retrieve("batch-1")
    for stream in streams:
        (event,) = await stream.events(1)
        assert event["event"] == "batch.in_progress"
    started = asyncio.get_running_loop().time()
    process.signal(signal.SIGTERM)
    for stream in streams:
        while await stream.next_frame() is not None:
            pass
    assert await process.exit_code(10) == 0
    assert asyncio.get_running_loop().time() - started < 5
    upstream.set_status("batch-1", COMPLETED)


async def test_a_reload_reaches_an_open_stream_narrowed_to_own_then_ended_when_its_caller_is_removed(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url, callers=write_callers()))
    stream = await open_stream(gateway.url, "after=latest")
    gateway.state.apply(make_config(upstream.url, callers=write_callers(billing="own")))
    upstream.seed("batch-not-mine", status=ACTIVE)
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-not-mine")
    mine = await sdk(gateway.url).batches.create(request={"name": "n", "input_dataset_id": "d", "model": "m"})
    (event,) = await stream.events(1)
    assert json.loads(event["data"])["data"]["batch"]["id"] == mine.batch.id
    reporting_only = [c for c in write_callers() if c["name"] == "reporting"]
    gateway.state.apply(make_config(upstream.url, callers=reporting_only))
    upstream.seed("batch-2", status=ACTIVE)
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-2")
    while (frame := await stream.next_frame()) is not None:
        assert "event" not in frame, "a removed caller's stream carried an event"
    stream.close()


async def test_a_held_page_of_a_caller_removed_by_a_reload_is_refused_not_filled(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url, callers=write_callers()))
    after = await latest(gateway)
    held = asyncio.ensure_future(feed(gateway, f"after={after}", wait_s=20))
    assert await eventually(lambda: gateway.state.metrics.events.feed_waits._value.get() == 1)
    reporting_only = [c for c in write_callers() if c["name"] == "reporting"]
    gateway.state.apply(make_config(upstream.url, callers=reporting_only))
    upstream.seed("batch-2", status=ACTIVE)
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-2")
    answer = await held
    assert answer.status == 401, answer.document


async def test_streams_past_max_waiters_per_caller_or_max_waiters_are_answered_at_once_as_a_page(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(
        make_config(upstream.url, callers=write_callers(), cache={"max_waiters": 3, "max_waiters_per_caller": 2})
    )
    mine = [await open_stream(gateway.url, "after=latest") for _ in range(2)]
    refused = await http(f"{gateway.url}/gateway/v1/events?after=latest", headers=SSE)
    assert refused.status == 200, refused.body
    assert refused.document["events"] == []
    assert "Preference-Applied" not in refused.headers
    theirs = await open_stream(gateway.url, "after=latest", key=REPORTING_KEY)
    assert "text/event-stream" in theirs.head
    full = await http(f"{gateway.url}/gateway/v1/events?after=latest", key=REPORTING_KEY, headers=SSE)
    assert full.status == 200, full.body
    assert "next_after" in full.document
    assert gateway.state.metrics.events.streams._value.get() == 3
    for stream in (*mine, theirs):
        stream.close()
    assert await eventually(lambda: gateway.state.metrics.events.streams._value.get() == 0)
    again = await open_stream(gateway.url, "after=latest")
    assert "text/event-stream" in again.head
    again.close()
