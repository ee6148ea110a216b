"""Fixtures: the event loop (uvloop and asyncio), the simulator, the fake upstream, gateways, log capture."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import settings

from gateway.api.state import GatewayState
from gateway.config import GatewayConfig, RedisSettings
from gateway.demo.simulator import Simulator, start_simulator
from gateway.edge import connection as gateway_connection
from gateway.edge.server import RunningGateway, start_gateway
from gateway.ops.logs import Redactor
from gateway.ops.metrics import Metrics
from gateway.replicas.link import RedisLink
from gateway.runtime import build_state
from tests.records_kit import open_redis_records, open_sqlite_records
from tests.redis_server import RedisServer
from tests.support import (
    PROCESS_WAIT_S,
    UPSTREAM_TOKEN,
    GatewayProcess,
    LogCapture,
    assert_no_reload_secrets,
    assert_no_secrets,
    attach_log_capture,
    serves_healthz,
)
from tests.upstream import upstream

# Fixtures of other modules, for every test module: the fake upstream, the two backends of Records.
__all__ = ["open_redis_records", "open_sqlite_records", "upstream"]

# The whole suite runs on each loop named here (docs/design.md §3: the server runs on uvloop;
# the default loop must work too). GATEWAY_TEST_LOOPS=uvloop narrows it.
LOOPS = os.environ.get("GATEWAY_TEST_LOOPS", "uvloop,asyncio").split(",")


LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "one_loop: run on the first loop of LOOPS only: the gateway under test runs in child processes"
        " (on uvloop whatever the test's loop), so a second loop would only repeat the same test",
    )
    config.addinivalue_line(
        "markers",
        "heavy: several seconds of work (100,000 ids, 10,000 events, rounds of the follower):"
        " make test runs it, make check leaves it out to stay the inner loop",
    )


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Run every async test once per loop in LOOPS (on the first only, when marked ``one_loop``)."""
    names = LOOPS[:1] if item.get_closest_marker("one_loop") else LOOPS
    return {name: LOOP_FACTORIES[name] for name in names}


@pytest.fixture
def redactor() -> Redactor:
    return Redactor()


@pytest.fixture
def logs(redactor: Redactor) -> Iterator[LogCapture]:
    """Captures every log line; at the end, asserts that none holds a secret."""
    capture, handler = attach_log_capture(redactor)
    yield capture
    logging.getLogger().removeHandler(handler)
    assert_no_secrets(capture.text)


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(token=UPSTREAM_TOKEN, lifetime_s=60)
    runner, _url = await start_simulator(sim)
    yield sim
    await runner.cleanup()


GatewayFactory = Callable[[GatewayConfig], Awaitable[RunningGateway]]


@pytest.fixture
async def start(logs: LogCapture, redactor: Redactor) -> AsyncIterator[GatewayFactory]:
    """Start gateways on 127.0.0.1 (port 0); all are stopped at the end."""
    running: list[RunningGateway] = []

    async def _start(config: GatewayConfig, **kwargs: Any) -> RunningGateway:
        state = build_state(config, redactor, **kwargs)
        gateway = await start_gateway(state, "127.0.0.1", 0)
        running.append(gateway)
        return gateway

    yield _start
    for gateway in running:
        await gateway.stop()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A real, empty redis-server of this test's own (docs/design.md §10), killed afterwards."""
    server = await RedisServer().start()
    try:
        yield server
    finally:
        server.close()


OpenLink = Callable[..., Awaitable[RedisLink]]
PATIENT_REDIS_TIMEOUT_S = 2.0


@pytest.fixture
async def open_link(redis_server: RedisServer) -> AsyncIterator[OpenLink]:
    """Open links to ``redis_server``, started, as one process each would; all closed at the end."""
    opened: list[RedisLink] = []

    # Patient by default: most link tests are about what Redis answers, and a loaded machine (the
    # suite runs on two processes) can take longer than redis.timeout_s (0.25 s), which would mark
    # Redis lost. The tests of a dead or stalled Redis pass the configured timeout themselves.
    async def _open(timeout_s: float = PATIENT_REDIS_TIMEOUT_S) -> RedisLink:
        link = RedisLink(RedisSettings(url=redis_server.url, timeout_s=timeout_s, probe_interval_s=0.1), Metrics())
        await link.start()
        opened.append(link)
        return link

    yield _open
    for link in opened:
        await link.close()


ProcessFactory = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def gateway_process() -> AsyncIterator[ProcessFactory]:
    """Start ``python -m gateway --config PATH``; wait (bounded) until it serves /healthz.

    The URL is read from the gateway's "serving" log line, or given by the
    test when the configured log level hides that line.
    """
    started: list[GatewayProcess] = []

    async def _start(config_path: Path, url: str | None = None) -> GatewayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "COHERE_"))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        gateway = GatewayProcess(proc)
        gateway._reader = asyncio.ensure_future(gateway._read())
        started.append(gateway)
        gateway.url = url or (await gateway.wait_for_event("serving"))["url"]
        assert await serves_healthz(gateway.url), f"the gateway never served /healthz:\n{gateway.text}"
        return gateway

    yield _start
    for gateway in started:
        if gateway.proc.returncode is None:
            gateway.proc.kill()
            await gateway.proc.wait()
        if gateway._reader is not None:
            await asyncio.wait_for(gateway._reader, PROCESS_WAIT_S)
        assert_no_reload_secrets(gateway.text)


# In CI, hypothesis draws the same examples every run, so a red build is
# reproducible; locally it explores new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def inline_answers(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every answer the inline path made during the test."""
    made: list[bytes] = []
    answer = gateway_connection.answer_fresh_hit

    def recorded(state: GatewayState, message: object) -> bytes | None:
        response = answer(state, message)  # type: ignore[arg-type]
        if response is not None:
            made.append(response)
        return response

    monkeypatch.setattr(gateway_connection, "answer_fresh_hit", recorded)
    return made
