"""Scenario 11: the event feed (docs/design.md §12): time to notice on the stream, and one event to many streams.

- **Time to notice on the feed**: scenario 7's workload (the same batches, completing at the same moments), but
  the consumer retrieves each batch once and then reads one event stream, instead of waiting per batch. Compared
  with scenario 7's nginx round (run again here, so the scenario stands alone) at the same upstream budget.
- **Fan-out**: N streams open on one gateway, one event (a batch first seen active); the delay until each stream
  has it, and the gateway's memory per open stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import uvloop

from bench.harness import Env, Proc, log, percentile
from bench.scenarios.notice import NOTICE_GRACE_S, nginx_round, notice_schedule, schedule_changes

TITLE = "scenario 11: the event feed"
FEED_NS = "feed-wait"
FANOUT_NS = "feed-fanout"
# How often the gateway checks followed batches here (events.interval_s): its list calls count in its calls.
FEED_INTERVAL_S = 1.0
TERMINAL_TYPES = frozenset({"batch.completed", "batch.failed", "batch.canceled"})
OPEN_BATCH = 100  # streams opened at once


def fanout_streams(env: Env) -> int:
    return {"full": 1000, "quick": 1000, "smoke": 50}.get(env.mode.name, 1000)


class RawStream:
    """One event stream read off a raw socket: as cheap for the client as a stream can be."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, key: str, query: str = "after=latest") -> RawStream:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            f"GET /gateway/v1/events?{query} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the feed refused a stream: {head[:80]!r}")
        return cls(reader, writer)

    async def next_event(self) -> dict[str, Any]:
        """The next event's JSON (chunk framing and comments skipped)."""
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("the stream ended")
            if line.startswith(b"data: "):
                document: dict[str, Any] = json.loads(line[6:])
                return document

    def close(self) -> None:
        self.writer.close()


async def _retrieve_each(url: str, key: str, batch_ids: list[str]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for batch_id in batch_ids:
            async with session.get(f"{url}/v2/batches/{batch_id}", headers=headers) as r:
                await r.read()


async def feed_round(env: Env, url: str, schedule: dict[str, float]) -> dict[str, Any]:
    """The consumer: open one stream, retrieve each batch once (so it is followed), then read until each is done."""
    assert env.sim is not None
    stream = await RawStream.open(url, env.key)
    noticed: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as control:
        start, changed = await schedule_changes(control, env.sim.url, FEED_NS, schedule)
        await _retrieve_each(url, env.key, list(schedule))
        deadline = start + max(schedule.values()) + NOTICE_GRACE_S
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while len(noticed) < len(schedule):
                    event = await stream.next_event()
                    batch_id = event["data"].get("batch", {}).get("id")
                    if event["type"] in TERMINAL_TYPES and batch_id in schedule:
                        noticed.setdefault(batch_id, time.monotonic())
        stream.close()
        async with control.get(f"{env.sim.url}/_bench/stats", params={"ns": FEED_NS}) as r:
            calls = (await r.json())["calls"]
    bounded = [noticed.get(b, deadline) - changed[b] for b in schedule]
    return {
        "p50_s": percentile(bounded, 50),
        "p99_s": percentile(bounded, 99),
        "unnoticed": len(schedule) - len(noticed),
        "calls": calls,
    }


async def fanout_round(env: Env, gateway: Proc, streams: int) -> dict[str, Any]:
    """``streams`` streams open; one event; each stream's delay to it, and the memory they take."""
    url = gateway.url
    await _retrieve_each(url, env.key, ["fanout-warm"])  # the gateway's first sighting paths warmed up
    rss_before = gateway.rss_bytes()
    opened: list[RawStream] = []
    for first in range(0, streams, OPEN_BATCH):
        count = min(OPEN_BATCH, streams - first)
        opened += await asyncio.gather(*(RawStream.open(url, env.key) for _ in range(count)))
    await asyncio.sleep(1.0)  # let the gateway settle before its memory is read
    rss_open = gateway.rss_bytes()
    received: list[float] = []

    async def one(stream: RawStream) -> None:
        while (await stream.next_event())["data"]["batch"]["id"] != "fanout-1":
            pass  # the warm-up's event, appended after this stream opened
        received.append(time.monotonic())

    readers = [asyncio.ensure_future(one(s)) for s in opened]
    began = time.monotonic()
    await _retrieve_each(url, env.key, ["fanout-1"])  # a batch first seen active: one event
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), 30)
    for stream in opened:
        stream.close()
    delays = [at - began for at in received] + [math.inf] * (streams - len(received))
    return {
        "streams": streams,
        "p99_s": percentile(delays, 99),
        "max_s": max(delays),
        "missed": streams - len(received),
        "rss_per_stream_kb": max(0.0, (rss_open - rss_before) / 1024 / streams),
    }


def measure(env: Env) -> dict[str, Any]:
    schedule = {b.replace("notice-", "feed-"): at for b, at in notice_schedule(env.mode).items()}
    headers = {"Authorization": f"Bearer {env.key}"}
    nginx, rate, budget_from = nginx_round(
        env, {b.replace("feed-", "notice-"): t for b, t in schedule.items()}, headers
    )
    budget = (max(0.1, math.floor(rate * 100) / 100), len(schedule))
    log(f"feed: gateway budget {budget[0]:g} calls/s ({budget_from}); events.interval_s {FEED_INTERVAL_S:g}")
    sections = {"events": {"interval_s": FEED_INTERVAL_S}, "store": {"path": str(env.workdir / "feed.db")}}
    gateway = env.start_gateway("gateway-feed", FEED_NS, budget=budget, sections=sections)
    feed = uvloop.run(feed_round(env, gateway.url, schedule))
    env.procs.stop(gateway)
    streams = fanout_streams(env)
    fanout_sections = {"store": {"path": str(env.workdir / "fanout.db")}}
    fanout_gateway = env.start_gateway("gateway-fanout", FANOUT_NS, access_log=False, sections=fanout_sections)
    log(f"feed: {streams} streams, one event")
    fanout = uvloop.run(fanout_round(env, fanout_gateway, streams))
    env.procs.stop(fanout_gateway)
    return {"nginx": nginx, "feed": feed, "fanout": fanout, "budget": budget[0], "batches": len(schedule)}


def keys(result: dict[str, Any]) -> dict[str, Any]:
    nginx, feed, fanout = result.get("nginx"), result["feed"], result["fanout"]
    return {
        "feed_notice_p50_s": round(feed["p50_s"], 3),
        "feed_calls": feed["calls"],
        "feed_notice_p50_vs_nginx": round(feed["p50_s"] / nginx["p50_s"], 3) if nginx else None,
        "feed_calls_vs_nginx": round(feed["calls"] / nginx["calls"], 3) if nginx else None,
        "sse_fanout_p99_s": round(fanout["p99_s"], 3) if math.isfinite(fanout["p99_s"]) else None,
        "sse_rss_per_stream_kb": round(fanout["rss_per_stream_kb"], 1),
    }


def lines(env: Env, result: dict[str, Any]) -> list[str]:
    lines = ["", "### 11. The event feed (docs/design.md §12)", ""]
    if not result:
        return [*lines, "Skipped (not asked for)."]
    nginx, feed, fanout = result.get("nginx"), result["feed"], result["fanout"]
    lines += [
        f"Time to notice, scenario 7's {result['batches']} batches and moments: one consumer retrieves each batch "
        f"once, then reads one event stream (`events.interval_s: {FEED_INTERVAL_S:g}`), at nginx's upstream call "
        f"rate ({result['budget']:g} calls/s).",
        "",
        "| contender | delay p50 s | delay p99 s | not noticed | upstream calls |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in (("nginx (polling)", nginx), ("gateway (event stream)", feed)):
        if row:
            lines.append(f"| {name} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['unnoticed']} | {row['calls']} |")
    lines += [
        "",
        f"Fan-out: {fanout['streams']} streams open, one event: p99 {fanout['p99_s']:.3f} s, "
        f"last {fanout['max_s']:.3f} s, {fanout['missed']} missed; "
        f"{fanout['rss_per_stream_kb']:.1f} KiB of gateway memory per open stream.",
    ]
    return lines
