"""Shared test furniture: secrets, configs, fake upstreams, log capture.

Everything runs on 127.0.0.1: the simulator or a hand-written fake upstream,
the gateway served for real by ``start_gateway``, and the cohere SDK.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import cohere
import httpx
from aiohttp import web

from gateway.config import GatewayConfig, deep_merge, validate
from gateway.logs import JsonFormatter, Redactor

UPSTREAM_TOKEN = "upstream-secret-token-4f9d2c"
BILLING_KEY = "billing-caller-key-7a1e5b"
REPORTING_KEY = "reporting-caller-key-3c8d0f"
SECRETS = (UPSTREAM_TOKEN, BILLING_KEY, REPORTING_KEY)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def raw_config(base_url: str, **sections: Any) -> dict[str, Any]:
    """A valid config document for tests; ``sections`` deep-merge over it."""
    raw: dict[str, Any] = {
        "upstream": {
            "base_url": base_url,
            "token": UPSTREAM_TOKEN,
            "timeout_s": 5,
            "retry_backoff_s": 0.01,
            "rate_limit": {"requests_per_s": 1000, "burst": 1000},
        },
        "callers": [
            {"name": "billing-service", "key": BILLING_KEY},
            {"name": "reporting", "key_sha256": sha256_hex(REPORTING_KEY)},
        ],
    }
    return deep_merge(raw, sections)


def make_config(base_url: str, **sections: Any) -> GatewayConfig:
    return validate(raw_config(base_url, **sections), {})


def assert_no_secrets(text: str | bytes) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in text, "a secret leaked"


def sdk(url: str, key: str = BILLING_KEY, **kwargs: Any) -> cohere.AsyncClientV2:
    """The real client our users run, pointed at the gateway, with SDK retries off."""
    return cohere.AsyncClientV2(
        api_key=key, base_url=url, httpx_client=httpx.AsyncClient(timeout=30), max_retries=0, **kwargs
    )


@dataclass
class LogCapture:
    """Every log line the process writes during a test, as the gateway renders it."""

    stream: io.StringIO = field(default_factory=io.StringIO)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def events(self, logger: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.text.splitlines() if line.strip()]
        return [line for line in lines if logger is None or line["logger"] == logger]


def attach_log_capture(redact: Redactor) -> tuple[LogCapture, logging.Handler]:
    capture = LogCapture()
    handler = logging.StreamHandler(capture.stream)
    handler.setFormatter(JsonFormatter(redact))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return capture, handler


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeUpstream:
    """A hand-written upstream on 127.0.0.1: ``handler`` answers, every request is recorded.

    ``release`` lets a test hold answers until it has seen all the requests it
    expects (set it to an unset ``asyncio.Event``; the handler waits on it).
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[web.Request] = []
        self.headers: list[dict[str, str]] = []
        self.arrived = asyncio.Event()
        self.release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        self.headers.append(dict(request.headers))
        self.arrived.set()
        if self.release is not None:
            await self.release.wait()
        return await self.handler(request)

    async def start(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def batch_body(batch_id: str = "batch-1", status: str = "BATCH_STATUS_IN_PROGRESS", **fields: Any) -> bytes:
    return json.dumps({"batch": {"id": batch_id, "status": status, "num_records": 10, **fields}}).encode()


def json_handler(status: int = 200, body: bytes | None = None, headers: dict[str, str] | None = None) -> Handler:
    """A handler that always gives the same answer."""

    async def handler(request: web.Request) -> web.Response:
        payload = body if body is not None else batch_body(request.match_info.get("tail", "x").rsplit("/", 1)[-1])
        return web.Response(status=status, body=payload, headers=headers, content_type="application/json")

    return handler


class FakeClock:
    """A monotonic clock the test moves by hand: TTLs, budgets and pauses follow it.

    Pass it as ``start(config, clock=clock)``. Only the gateway's decisions use
    it; asyncio's own timers (and ``upstream.timeout_s``) stay on real time.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
