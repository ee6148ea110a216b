"""``--demo`` keeps off everything real (docs/design.md §7): a configured Redis, the store, every interface.

The config file given to the demo is the production one, as in a Kubernetes
pod where ``$REDIS_URL`` is set: it names a real Redis (a redis-server this
test starts), a store path, two workers and ``host: 0.0.0.0``. The demo must
ignore them all, and say so.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.support import http, write_config

# The gateway under test runs in child processes (on uvloop whatever the test's loop): one loop is enough.
pytestmark = pytest.mark.one_loop

BOUND_S = 30.0
DEMO_IGNORES = "demo mode ignores these config keys (no Redis, a temporary store, one process, 127.0.0.1 unless --host)"


@dataclass
class Demo:
    process: asyncio.subprocess.Process
    banner: str
    url: str  # where the banner says to reach it
    keys: dict[str, str]  # demo caller name -> key

    async def stop(self) -> tuple[int, str]:
        """SIGINT, as Ctrl-C; the exit code and everything the demo logged."""
        self.process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(self.process.communicate(), BOUND_S)
        assert self.process.returncode is not None
        return self.process.returncode, stderr.decode()


@pytest.fixture
def production_config(tmp_path: Path, redis_server: RedisServer) -> tuple[Path, dict[str, str]]:
    """A production-like config file, and the environment that points it at the test's Redis."""
    (tmp_path / "data").mkdir()
    raw = {
        "server": {"host": "0.0.0.0", "port": 0, "workers": 2, "shutdown_grace_s": 5},
        "upstream": {"token": "${COHERE_API_KEY}"},
        "store": {"path": str(tmp_path / "data" / "cohere-gateway.db")},
        "redis": {"url": "${REDIS_URL:-}"},
        "callers": [{"name": "billing-service", "key": "${BILLING_GATEWAY_KEY}"}],
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "COHERE_", "BILLING_"))}
    return write_config(tmp_path / "config.yaml", raw), {**env, "REDIS_URL": redis_server.url}


async def start_demo(config: Path, env: dict[str, str], *extra: str) -> Demo:
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "gateway", "--demo", "--config", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=config.parent,
    )
    assert process.stdout is not None
    banner = ""
    try:
        while "Try:" not in banner:
            line = await asyncio.wait_for(process.stdout.readline(), BOUND_S)
            assert line, "the demo exited before printing its banner"
            banner += line.decode()
    except BaseException:
        process.kill()
        await process.wait()
        raise
    url = re.search(r"serving (http://\S+)", banner)
    assert url is not None, banner
    keys = dict(re.findall(r"^  (demo-\w+): (\S+)", banner, flags=re.MULTILINE))
    return Demo(process, banner, url.group(1), keys)


def logged(stderr: str, event: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


async def test_the_demo_never_writes_to_the_configured_redis_or_store(
    production_config: tuple[Path, dict[str, str]], redis_server: RedisServer, tmp_path: Path
) -> None:
    config, env = production_config
    demo = await start_demo(config, env)
    try:
        # A simulated failure, cached, and a create: before, both landed in the shared Redis.
        reader = await http(f"{demo.url}/v2/batches/fail-nightly", key=demo.keys["demo-reporting"])
        assert reader.status == 200
        created = await http(
            f"{demo.url}/v2/batches",
            method="POST",
            key=demo.keys["demo-billing"],
            headers={"Content-Type": "application/json", "Idempotency-Key": "demo-create-1"},
            data=json.dumps({"name": "n", "input_dataset_id": "ds", "model": "m"}).encode(),
        )
        assert created.status == 200
    finally:
        code, stderr = await demo.stop()
    assert code == 0
    client = redis_server.client()
    try:
        assert await client.keys("*") == []
    finally:
        await client.aclose()
    assert not (tmp_path / "data" / "cohere-gateway.db").exists()
    [ignored] = logged(stderr, DEMO_IGNORES)
    assert set(ignored["keys"]) == {"redis.url", "server.workers", "server.host", "store.path"}  # type: ignore[arg-type]
    assert redis_server.url not in stderr


async def test_the_demo_listens_on_loopback_whatever_server_host_says(
    production_config: tuple[Path, dict[str, str]],
) -> None:
    demo = await start_demo(*production_config)
    try:
        assert demo.url.startswith("http://127.0.0.1:")
        assert "every interface" not in demo.banner
        assert (await http(f"{demo.url}/healthz")).status == 200
    finally:
        code, stderr = await demo.stop()
    assert code == 0
    # Where it really listened (before, the banner said 127.0.0.1 while it served 0.0.0.0).
    [serving] = logged(stderr, "serving")
    assert serving["url"] == demo.url


async def test_the_demo_on_every_interface_says_so_in_its_banner(
    production_config: tuple[Path, dict[str, str]],
) -> None:
    demo = await start_demo(*production_config, "--host", "0.0.0.0")
    try:
        assert demo.url.startswith("http://0.0.0.0:")
        assert "every interface" in demo.banner
        port = demo.url.rsplit(":", 1)[1]
        assert f"http://127.0.0.1:{port}/v2/batches/my-first-batch" in demo.banner
    finally:
        assert (await demo.stop())[0] == 0
