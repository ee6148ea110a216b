"""Resources: idle sockets, many ids and many misses leave the gateway serving and bounded.

Bounds asserted here are the contract's (``max_entries``, ``max_connections``,
``header_timeout_s``, nothing left in flight, no descriptor left open), not
speed targets: those belong to the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from typing import Any

import aiohttp
import pytest

from gateway.cache.batch_cache import BatchCache
from gateway.cache.store import MemoryStore
from gateway.config import CacheSettings
from gateway.demo.simulator import Simulator
from gateway.edge.server import RunningGateway, start_gateway
from gateway.ops.logs import Redactor
from gateway.runtime import build_state
from gateway.upstream.answers import UpstreamReply
from gateway.upstream.cohere import Lifetime
from tests.conftest import GatewayFactory
from tests.support import BILLING_KEY, FakeClock, LogCapture, assert_no_secrets, eventually, make_config, sdk
from tests.upstream import Upstream, batch_body, http_answer

BOUND_S = 60.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def get_many(url: str, ids: list[str], concurrency: int) -> list[int]:
    """GET every id, ``concurrency`` at a time; the statuses, in order."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    statuses: list[int] = [0] * len(ids)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int, batch_id: str) -> None:
            headers = {"Authorization": f"Bearer {BILLING_KEY}"}
            async with session.get(f"{url}/v2/batches/{batch_id}", headers=headers) as response:
                assert_no_secrets(await response.read())
                statuses[index] = response.status

        await asyncio.wait_for(asyncio.gather(*(one(i, b) for i, b in enumerate(ids))), BOUND_S)
    return statuses


# ---------------------------------------------------------------------------
# Slow and idle connections
# ---------------------------------------------------------------------------


async def _trickle_forever(writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
    head = b"GET /v2/batches/batch-1 HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 10_000
    with contextlib.suppress(ConnectionError):
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
            if stop.is_set():
                return


async def test_two_hundred_idle_or_trickling_connections_do_not_starve_a_normal_request_and_are_closed(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url, server={"header_timeout_s": 2}))
    host, port = gateway.host, gateway.port
    stop = asyncio.Event()
    sockets = [await asyncio.open_connection(host, port) for _ in range(200)]
    trickling = [asyncio.ensure_future(_trickle_forever(writer, stop)) for _, writer in sockets[150:]]
    try:
        # A normal SDK request, while 150 sockets sit idle and 50 trickle their heads.
        response = await asyncio.wait_for(sdk(gateway.url).batches.retrieve("batch-1"), 10)
        assert response.batch.id == "batch-1"
        assert simulator.calls == 1

        # Every one of them is closed by the gateway after header_timeout_s, trickling or not.
        async def closed(reader: asyncio.StreamReader) -> bool:
            try:
                rest = await asyncio.wait_for(reader.read(), 15)
            except ConnectionError:
                return True
            assert_no_secrets(rest)
            return True

        results = await asyncio.gather(*(closed(reader) for reader, _ in sockets))
        assert all(results)
        # And the gateway still serves.
        again = await asyncio.wait_for(sdk(gateway.url).batches.retrieve("batch-2"), 10)
        assert again.batch.id == "batch-2"
    finally:
        stop.set()
        await asyncio.gather(*trickling, return_exceptions=True)
        for _, writer in sockets:
            writer.close()


async def test_clients_that_never_read_their_answers_do_not_block_others(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    request = (
        b"GET /v2/batches/batch-1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + BILLING_KEY.encode() + b"\r\n\r\n"
    )
    sockets = [await asyncio.open_connection(gateway.host, gateway.port) for _ in range(100)]
    try:
        for _, writer in sockets:
            writer.write(request * 20)  # pipelined, and never read
        response = await asyncio.wait_for(sdk(gateway.url).batches.retrieve("batch-2"), 10)
        assert response.batch.id == "batch-2"
    finally:
        for _, writer in sockets:
            writer.close()


# ---------------------------------------------------------------------------
# Many distinct ids
# ---------------------------------------------------------------------------

DISTINCT_IDS = 1_000_000
WAVE = 1_000
MAX_ENTRIES = 1_000


def resident_bytes() -> int:
    """This process's resident memory, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(300)  # about a minute per loop on this 2-core machine
async def test_a_million_distinct_ids_in_concurrent_waves_keep_memory_flat_and_drain_in_flight() -> None:
    clock = FakeClock()
    store = MemoryStore(MAX_ENTRIES, clock)
    cache = BatchCache(store, CacheSettings(max_entries=MAX_ENTRIES), clock)
    reply = UpstreamReply(200, batch_body(), Lifetime.ACTIVE)
    in_flight_seen = 0

    async def fetch(_may_wait: bool) -> UpstreamReply:
        nonlocal in_flight_seen
        in_flight_seen = max(in_flight_seen, len(cache.flights))
        await asyncio.sleep(0)  # every wave's calls are in flight together
        return reply

    largest = 0
    resident: dict[int, int] = {}
    # What the rest of the suite left alive is not this test's business: frozen,
    # the collector does not walk it again on every one of a million allocations.
    gc.collect()
    gc.freeze()
    try:
        for first in range(0, DISTINCT_IDS, WAVE):
            wave = [cache.get(f"batch-{i}", fetch, wait_s=5) for i in range(first, first + WAVE)]
            results = await asyncio.gather(*wave)
            assert len(results) == WAVE
            largest = max(largest, len(store))
            if first + WAVE in (DISTINCT_IDS // 5, DISTINCT_IDS):
                gc.collect()
                resident[first + WAVE] = resident_bytes()
    finally:
        gc.unfreeze()
    assert largest == MAX_ENTRIES
    assert in_flight_seen == WAVE
    assert len(cache.flights) == 0
    early, late = resident[DISTINCT_IDS // 5], resident[DISTINCT_IDS]
    # Past the first 200,000 ids a bounded store only replaces what it evicts.
    # Unbounded, the last 800,000 entries would add about a gigabyte.
    assert late - early < 32 * 2**20, (early, late)


async def test_distinct_ids_through_the_gateway_keep_the_cache_at_max_entries_and_nothing_in_flight(
    simulator: Simulator, start: GatewayFactory
) -> None:
    # No follower: its list call, once a round (events.interval_s) on a slow run, would count as a call too.
    config = make_config(
        simulator.url,
        cache={"max_entries": 300},
        upstream={"rate_limit": {"requests_per_s": 10_000, "burst": 5_000}},
        events={"enabled": False},
    )
    gateway = await start(config)
    ids = [f"distinct-{i}" for i in range(3_000)]
    statuses = await get_many(gateway.url, ids, concurrency=100)
    assert statuses == [200] * len(ids)
    assert simulator.calls == len(ids)
    registry = gateway.state.metrics.registry
    assert registry.get_sample_value("gateway_cache_entries") == 300
    assert registry.get_sample_value("gateway_singleflight_inflight") == 0
    assert registry.get_sample_value("gateway_cache_removals_total", {"reason": "evicted"}) == len(ids) - 300


# ---------------------------------------------------------------------------
# Many concurrent misses: connection limit and descriptors
# ---------------------------------------------------------------------------

MAX_CONNECTIONS = 20
MISSES = 1_000


CONNECT_WAVE = 100  # below the listen backlog (128): a burst of SYNs past it waits for retransmits


async def concurrent_misses(gateway: RunningGateway, ids: list[str]) -> list[int]:
    """One connection per id, all open first, then every request at once; the statuses."""
    server = gateway.runner.server
    assert server is not None
    baseline = len(server.connections)
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for first in range(0, len(ids), CONNECT_WAVE):
        wave = min(CONNECT_WAVE, len(ids) - first)
        connections += await asyncio.gather(*(asyncio.open_connection(gateway.host, gateway.port) for _ in range(wave)))
        opened = baseline + len(connections)
        assert await eventually(lambda: len(server.connections) >= opened)  # noqa: B023
    key = BILLING_KEY.encode()
    for (_, writer), batch_id in zip(connections, ids, strict=True):
        writer.write(
            b"GET /v2/batches/%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
            % (batch_id.encode(), key)
        )

    async def status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        try:
            raw = await reader.read()
        finally:
            writer.close()
        assert_no_secrets(raw)
        return int(raw.split(b" ", 2)[1]) if raw else 0

    return list(await asyncio.wait_for(asyncio.gather(*(status(r, w) for r, w in connections)), BOUND_S))


async def _start_own(config: Any, redactor: Redactor) -> RunningGateway:
    return await start_gateway(build_state(config, redactor), "127.0.0.1", 0)


async def test_a_thousand_concurrent_misses_stay_within_max_connections_and_leak_no_descriptors(
    logs: LogCapture, redactor: Redactor
) -> None:
    def config_for(upstream: Upstream) -> Any:
        limits = {"max_connections": MAX_CONNECTIONS, "rate_limit": {"requests_per_s": 10_000, "burst": 5_000}}
        return make_config(upstream.url, upstream=limits)

    # A first, small round opens what a process opens once (a library's /dev/null, ...).
    upstream = await _counting_upstream()
    gateway = await _start_own(config_for(upstream), redactor)
    assert await concurrent_misses(gateway, [f"warm-{i}" for i in range(MAX_CONNECTIONS)]) == [200] * MAX_CONNECTIONS
    await gateway.stop()
    await upstream.stop()
    gc.collect()
    before = open_fds()

    upstream = await _counting_upstream()
    gateway = await _start_own(config_for(upstream), redactor)
    try:
        first = await concurrent_misses(gateway, [f"miss-{i}" for i in range(MISSES)])
        assert first == [200] * MISSES
        assert upstream.count() == MISSES
        assert upstream.max_open == MAX_CONNECTIONS  # the limit was reached, and never passed
        # Kept-alive upstream connections (both ends live in this process), the new gateway's store (the SQLite
        # file and its -wal for each of its three connections: records, event log, usage; one -shm for all)
        # and nothing else.
        assert await eventually(lambda: open_fds() <= before + 2 * MAX_CONNECTIONS + 4 + 7), open_fds() - before
        after_first = open_fds()

        second = await concurrent_misses(gateway, [f"again-{i}" for i in range(MISSES)])
        assert second == [200] * MISSES
        assert upstream.max_open == MAX_CONNECTIONS
        assert upstream.connections <= MAX_CONNECTIONS + 2  # the pool was reused, not reopened
        assert await eventually(lambda: open_fds() <= after_first), open_fds() - after_first
        assert gateway.state.metrics.registry.get_sample_value("gateway_singleflight_inflight") == 0
    finally:
        await gateway.stop()
        await upstream.stop()
    gc.collect()
    assert await eventually(lambda: open_fds() <= before), open_fds() - before


async def _counting_upstream() -> Upstream:
    """A keep-alive upstream that holds answers until ``MAX_CONNECTIONS`` requests are open at once."""
    in_progress = 0
    release = asyncio.Event()

    async def respond(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        nonlocal in_progress
        in_progress += 1
        if in_progress >= MAX_CONNECTIONS:
            release.set()
        await asyncio.wait_for(release.wait(), BOUND_S)
        batch_id = head.split(b" ", 2)[1].rsplit(b"/", 1)[-1].decode()
        writer.write(http_answer(200, batch_body(batch_id), reason="OK"))
        await writer.drain()
        in_progress -= 1

    return (await Upstream().start()).raw(respond)
