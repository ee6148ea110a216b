"""A real ``redis-server`` (Debian's package) for the tests of docs/design.md §10, started by the tests themselves.

Each server listens on a free port of 127.0.0.1 with no persistence, and can
be killed (SIGKILL), paused (SIGSTOP) and continued, and restarted on the
same port, as the fault tests need. ``make test`` installs ``redis-server``
when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import tempfile

import redis.asyncio as aioredis

from tests.support import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_WITHIN_S = 10.0


class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="cohere-gateway-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> aioredis.Redis:
        """A plain client for the test's own looks (never the gateway's)."""
        return aioredis.Redis.from_url(self.url, socket_timeout=5)

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603 (a fixed program, fixed arguments)
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def start(self) -> RedisServer:
        self.proc = self._spawn()
        client = self.client()
        try:
            for _ in range(int(START_WITHIN_S / 0.02)):
                with contextlib.suppress(OSError, aioredis.ConnectionError):
                    if await client.ping():
                        return self
                assert self.proc.poll() is None, "redis-server exited at start"
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        raise AssertionError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: every connection drops, and everything it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def restart(self) -> None:
        """A new, empty server on the same port."""
        self.kill()
        await self.start()

    async def commands(self, name: str) -> int:
        """How many times Redis has run command ``name`` (INFO commandstats) since it started."""
        client = self.client()
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        found = stats.get(f"cmdstat_{name.lower()}")
        return int(found["calls"]) if found else 0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
        self.kill()
        self._dir.cleanup()
