"""``server.workers: N`` (docs/design.md §10): N gateway processes on one port under one parent.

Real processes: ``python -m gateway`` with two workers, a real redis-server
(N > 1 needs ``redis.url``) and a fake upstream served by the test. Which
worker answered a request is read from /proc: the worker holding the
server end of the request's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.config import RedisSettings
from gateway.ops.metrics import Metrics
from gateway.replicas.link import HEARTBEAT_S, RedisLink
from tests.conftest import ProcessFactory
from tests.redis_server import RedisServer
from tests.support import (
    ANALYTICS_KEY,
    BILLING_KEY,
    PROCESS_WAIT_S,
    Answer,
    GatewayProcess,
    eventually,
    free_port,
    process_config,
    read_answer,
    request_bytes,
    sdk,
    write_config,
)
from tests.upstream import Upstream, json_handler

# The gateway processes run on uvloop whatever loop a test runs on; the test's loop only drives the
# client, so each of these tests runs once, on the first loop of LOOPS (process starts are the cost).
pytestmark = pytest.mark.one_loop

WORKERS = 2
CONNECTIONS = 24  # new connections per check: all landing on one of two workers has odds of 2 in 16 million


def workers_config(base_url: str, redis_url: str | None, **sections: Any) -> dict[str, Any]:
    raw = process_config(base_url, **sections)
    raw["server"]["workers"] = WORKERS
    if redis_url is not None:
        raw["redis"] = {"url": redis_url}
    return raw


# --- which worker holds a connection ------------------------------------------------------------


def _hex_address(port: int) -> str:
    return f"0100007F:{port:04X}"  # 127.0.0.1 as /proc/net/tcp writes it (little-endian)


def connection_holder(server_port: int, client_port: int, pids: list[int]) -> int:
    """The pid, among ``pids``, holding the server end of the connection from ``client_port``."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    inodes = {row[9] for row in rows if row[1:3] == [_hex_address(server_port), _hex_address(client_port)]}
    assert len(inodes) == 1, f"no single server end for the connection from port {client_port}"
    link = f"socket:[{inodes.pop()}]"
    holders = []
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    holders.append(pid)
    assert len(holders) == 1, f"the connection is held by {holders}, not by one of {pids}"
    return holders[0]


async def answered_by(url: str, pids: list[int], *, key: str = BILLING_KEY) -> tuple[Answer, int]:
    """One request for batch-1 on a new connection: the answer, and the pid of the worker that answered."""
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1"
    assert parts.port is not None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), PROCESS_WAIT_S)
    try:
        writer.write(request_bytes("/v2/batches/batch-1", key=key, close=False))
        answer = await read_answer(reader)
        return answer, connection_holder(parts.port, writer.get_extra_info("sockname")[1], pids)
    finally:
        writer.close()


async def answering_pids(url: str, pids: list[int], *, key: str = BILLING_KEY) -> set[int]:
    """The workers that answered CONNECTIONS requests on new connections, each answer a 200 for batch-1."""
    holders = set()
    for _ in range(CONNECTIONS):
        answer, pid = await answered_by(url, pids, key=key)
        assert answer.status == 200, answer.body
        assert answer.document["batch"]["id"] == "batch-1"
        holders.add(pid)
    return holders


# --- the processes ------------------------------------------------------------------------------

WorkersFactory = Callable[[dict[str, Any]], Awaitable[tuple[GatewayProcess, list[int]]]]


@pytest.fixture
async def workers(gateway_process: ProcessFactory, tmp_path: Path) -> AsyncIterator[WorkersFactory]:
    """Start the parent with a config; once every worker serves: the parent, and the workers' pids.

    Each parent still running at the end is stopped with SIGTERM (its workers with it) and must exit 0.
    """
    started: list[GatewayProcess] = []

    async def _start(raw: dict[str, Any]) -> tuple[GatewayProcess, list[int]]:
        parent = await gateway_process(write_config(tmp_path / "config.yaml", raw))
        started.append(parent)
        serving = next(e for e in await parent.wait_for_events("serving", WORKERS + 1) if "workers" in e)
        assert serving["workers"] == WORKERS
        assert serving["url"] == parent.url
        assert serving["pid"] == parent.proc.pid
        pids: list[int] = serving["pids"]
        assert len(set(pids)) == WORKERS
        assert parent.proc.pid not in pids, "the parent serves no request itself"
        return parent, pids

    yield _start
    for parent in started:
        if parent.proc.returncode is None:
            parent.signal(signal.SIGTERM)
            assert await parent.exit_code(within_s=PROCESS_WAIT_S) == 0, parent.text


# --- the config ---------------------------------------------------------------------------------


def run_gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (a fixed argument list)
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=PROCESS_WAIT_S, check=False
    )


def test_workers_without_redis_are_refused_by_the_config_check_and_at_start_naming_server_workers(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "config.yaml", workers_config("http://127.0.0.1:9", redis_url=None))

    checked = run_gateway("--config", str(config), "--check-config")
    assert checked.returncode == 2
    assert "server.workers" in checked.stderr
    assert "redis.url" in checked.stderr

    started = run_gateway("--config", str(config))
    assert started.returncode == 2
    assert "server.workers" in started.stderr
    assert "serving" not in started.stderr


def test_a_worker_that_cannot_start_stops_the_start_with_its_exit_code_and_message(tmp_path: Path) -> None:
    # Another program holds the port without SO_REUSEPORT: no worker can listen on it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        raw = workers_config("http://127.0.0.1:9", f"redis://127.0.0.1:{free_port()}/0")
        raw["server"]["port"] = port
        started = run_gateway("--config", str(write_config(tmp_path / "config.yaml", raw)))
    assert started.returncode == 1, started.stderr
    assert "cannot listen" in started.stderr
    assert "a worker failed to start" in started.stderr
    assert '"event":"serving"' not in started.stderr


# --- serving, reloading, restarting, stopping ---------------------------------------------------


async def test_two_workers_answer_on_one_port_and_each_reloads_on_sighup(
    upstream: Upstream, redis_server: RedisServer, workers: WorkersFactory, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    parent, pids = await workers(workers_config(upstream.url, redis_server.url))

    assert await answering_pids(parent.url, pids) == set(pids)

    # The operator adds a caller, then sends SIGHUP to the parent only.
    raw = workers_config(upstream.url, redis_server.url)
    raw["callers"].append({"name": "analytics", "key": ANALYTICS_KEY})
    write_config(tmp_path / "config.yaml", raw)
    mark = parent.signal(signal.SIGHUP)
    reloaded = await parent.wait_for_events("config reloaded", WORKERS, after=mark)
    assert all(event["callers"] == len(raw["callers"]) for event in reloaded)  # counts, never the names

    assert await answering_pids(parent.url, pids, key=ANALYTICS_KEY) == set(pids)


async def test_a_worker_killed_is_started_again_and_the_port_keeps_serving(
    upstream: Upstream, redis_server: RedisServer, workers: WorkersFactory
) -> None:
    upstream.script(json_handler())
    parent, pids = await workers(workers_config(upstream.url, redis_server.url))
    killed, survivor = pids

    mark = len(parent.events)
    os.kill(killed, signal.SIGKILL)
    exited = await parent.wait_for_event("worker exited unexpectedly", after=mark)
    assert exited["pid"] == killed
    assert exited["exit"] == "SIGKILL"
    assert exited["restart_in_s"] == 0.5
    restarted = await parent.wait_for_event("worker serving", after=mark)
    assert restarted["worker"] == exited["worker"]
    replacement = restarted["pid"]
    assert replacement not in pids

    assert await answering_pids(parent.url, [survivor, replacement]) == {survivor, replacement}
    assert parent.proc.returncode is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_lets_the_request_in_flight_finish_and_the_parent_exits_0(
    signum: int, upstream: Upstream, redis_server: RedisServer, workers: WorkersFactory
) -> None:
    upstream.script(json_handler())
    release = upstream.hold(times=None)
    parent, _pids = await workers(workers_config(upstream.url, redis_server.url))
    in_flight = asyncio.ensure_future(sdk(parent.url).batches.retrieve("batch-1"))
    await asyncio.wait_for(upstream.arrived.wait(), PROCESS_WAIT_S)

    mark = parent.signal(signum)
    await parent.wait_for_events("stopping", 1 + WORKERS, after=mark)
    release.set()

    response = await asyncio.wait_for(in_flight, PROCESS_WAIT_S)
    assert response.batch.id == "batch-1"
    assert await parent.exit_code(within_s=PROCESS_WAIT_S) == 0
    stopped = next(e for e in parent.events[mark:] if e["event"] == "stopped" and "workers" in e)
    assert stopped["workers"] == {str(index): "exit 0" for index in range(WORKERS)}


def has_ended(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie no one has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def refuses_connections(url: str) -> bool:
    """Whether nothing listens on ``url``'s port any more (polled, bounded: a close is no event to await)."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PROCESS_WAIT_S
    while loop.time() < give_up:
        try:
            _reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        except ConnectionRefusedError:
            return True
        writer.close()
        await asyncio.sleep(0.05)
    return False


async def test_the_workers_stop_and_free_the_port_when_the_parent_is_killed(
    upstream: Upstream, redis_server: RedisServer, workers: WorkersFactory
) -> None:
    upstream.script(json_handler())
    parent, pids = await workers(workers_config(upstream.url, redis_server.url))

    parent.proc.kill()
    await parent.proc.wait()

    assert await refuses_connections(parent.url), "a worker outlived its parent, holding the port"
    assert await eventually(lambda: all(has_ended(pid) for pid in pids), PROCESS_WAIT_S)
    stopped = await parent.wait_for_events("stopped", WORKERS)
    assert all(event["logger"] == "gateway" for event in stopped), "each worker stopped as on SIGTERM"


# --- a worker's stop is not held by its Redis link ----------------------------------------------

CLOSE_WITHIN_S = 2 * HEARTBEAT_S + 1  # the link's loops notice a close within HEARTBEAT_S each


async def test_closing_the_redis_link_at_any_moment_ends_within_a_heartbeat(redis_server: RedisServer) -> None:
    """On Python 3.11, redis-py can swallow the cancel of a task in a command; a close must not wait for ever.

    A worker that never finished its stop was killed after the grace period,
    and its parent exited 1. Closed at random moments of its first heartbeat
    and subscription, a link lost the cancel of a task about one time in
    three on uvloop (less often on asyncio).
    """
    moments = random.Random(8)
    for attempt in range(12):
        link = RedisLink(RedisSettings(url=redis_server.url), Metrics())
        await link.start()
        await asyncio.sleep(moments.uniform(0, 0.01))  # the moment of the stop, not a wait for an event
        closing = asyncio.ensure_future(link.close())
        done, _ = await asyncio.wait([closing], timeout=CLOSE_WITHIN_S)
        if not done:
            await cancel_until_done(closing)
            pytest.fail(f"close {attempt} still waited on the link's tasks after {CLOSE_WITHIN_S} s")


async def cancel_until_done(closing: asyncio.Future[None]) -> None:
    """Cancel every other task again and again, until ``closing`` ends: a failure is reported, not a hung run."""
    for _ in range(100):
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        done, _ = await asyncio.wait([closing], timeout=0.1)
        if done:
            return


# --- one upstream call across the workers (the shared tier, docs/design.md §10) -------------------

CONCURRENT = 60


async def test_sixty_concurrent_requests_for_one_uncached_batch_across_both_workers_make_one_upstream_call(
    upstream: Upstream, redis_server: RedisServer, workers: WorkersFactory
) -> None:
    upstream.script(json_handler())
    release = upstream.hold(times=None)
    parent, pids = await workers(workers_config(upstream.url, redis_server.url))
    parts = urlsplit(parent.url)
    assert parts.port is not None
    connections = [
        await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), PROCESS_WAIT_S)
        for _ in range(CONCURRENT)
    ]
    try:
        for _reader, writer in connections:
            writer.write(request_bytes("/v2/batches/batch-shared", close=False))
        # All sixty are sent before the first fetch is let go: the others wait for it, on either worker.
        await asyncio.wait_for(upstream.arrived.wait(), PROCESS_WAIT_S)
        release.set()
        answers = await asyncio.gather(*(read_answer(reader) for reader, _writer in connections))
        holders = {connection_holder(parts.port, w.get_extra_info("sockname")[1], pids) for _r, w in connections}
    finally:
        for _reader, writer in connections:
            writer.close()

    assert [answer.status for answer in answers] == [200] * CONCURRENT
    assert {answer.document["batch"]["id"] for answer in answers} == {"batch-shared"}
    assert holders == set(pids), "both workers answered"
    assert upstream.count() == 1, f"{upstream.count()} upstream calls for one batch"
