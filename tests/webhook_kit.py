"""Webhook tests: a receiver (aiohttp on 127.0.0.1) checking every signature with standardwebhooks; events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets as random_secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.events.base import EventLog, Sighting

RECEIVE_WITHIN_S = 20.0  # bound on every wait for deliveries (2 shared cores)


def new_secret(size: int = 24) -> str:
    return "whsec_" + base64.b64encode(random_secrets.token_bytes(size)).decode()


@dataclass
class Delivery:
    """One request the receiver got: its headers, body, when, and which of the receiver's secrets verify it."""

    headers: dict[str, str]
    body: bytes
    at: float
    verified_by: list[str]
    status: int
    path: str = ""

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


# What the receiver answers: a status, or None to hang until the client goes away.
Behaviour = Callable[[Delivery], Awaitable[int | None] | int | None]


@dataclass
class Receiver:
    """Verifies each request against ``secrets`` (any one must verify), records it, and answers per ``behaviour``."""

    secrets: list[str]
    behaviour: Behaviour = lambda _delivery: 204
    got: list[Delivery] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    url: str = ""
    runner: web.AppRunner | None = None
    # True: a 2xx answer sends its status and headers, then never the rest (its body stalls).
    stalled_bodies: bool = False

    async def start(self, path: str = "/hooks", port: int = 0) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}{path}"
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def port(self) -> int:
        return int(self.url.split(":")[2].split("/")[0])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified_by = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            verified_by.append(secret)
        delivery = Delivery(headers, body, time.monotonic(), verified_by, 0, request.path)
        status = self.behaviour(delivery)
        if asyncio.iscoroutine(status):
            status = await status
        delivery.status = status if isinstance(status, int) else 0
        async with self.changed:
            self.got.append(delivery)
            self.changed.notify_all()
        if status is None:
            await asyncio.sleep(3600)  # hangs: the gateway must give up by itself
        if self.stalled_bodies and isinstance(status, int) and 200 <= status < 300:
            started = web.StreamResponse(status=status)
            await started.prepare(request)  # the status is sent; the body never ends
            await asyncio.sleep(3600)
        if status in (301, 302, 307, 308):
            return web.Response(status=status, headers={"Location": self.url + "/elsewhere"})
        return web.Response(status=int(status or 500), text="a receiver's own words, never to be logged")

    @property
    def delivered(self) -> list[Delivery]:
        """The requests answered 2xx, in order."""
        return [d for d in self.got if 200 <= d.status < 300]

    async def wait_for(self, condition: Callable[[list[Delivery]], bool], within_s: float = RECEIVE_WITHIN_S) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: condition(self.got)), within_s)

    async def wait_delivered(self, count: int, within_s: float = RECEIVE_WITHIN_S) -> list[Delivery]:
        await self.wait_for(lambda _got: len(self.delivered) >= count, within_s)
        return self.delivered

    async def wait_distinct(self, count: int, within_s: float = RECEIVE_WITHIN_S) -> list[Delivery]:
        """Until ``count`` different events were answered 2xx; the first 2xx delivery of each, in order."""
        await self.wait_for(lambda _got: len({d.id for d in self.delivered}) >= count, within_s)
        firsts: dict[str, Delivery] = {}
        for delivery in self.delivered:
            firsts.setdefault(delivery.id, delivery)
        return list(firsts.values())


def batch_sighting(batch_id: str, status: str = "BATCH_STATUS_QUEUED", owner: str | None = None) -> Sighting:
    final = status in ("BATCH_STATUS_COMPLETED", "BATCH_STATUS_FAILED", "BATCH_STATUS_CANCELED")
    data = json.dumps({"id": batch_id, "status": status, "name": "nightly"}).encode()
    return Sighting("batch", batch_id, status, final, time.time(), owner, data)


def dataset_sighting(dataset_id: str, status: str = "validating", owner: str | None = None) -> Sighting:
    data = json.dumps({"id": dataset_id, "validation_status": status}).encode()
    return Sighting("dataset", dataset_id, status, status != "validating", time.time(), owner, data)


async def new_batches(log: EventLog, count: int, owner: str | None = None, prefix: str = "batch") -> list[str]:
    """``count`` new active batches seen: one event each (``batch.queued``); their ids, in order."""
    ids = [f"{prefix}-{i}-{random_secrets.token_hex(4)}" for i in range(count)]
    for batch_id in ids:
        assert await log.record(batch_sighting(batch_id, owner=owner)) is not None
    return ids


def subjects(deliveries: list[Delivery]) -> list[str]:
    return [d.event["data"]["batch"]["id"] for d in deliveries]


@contextlib.contextmanager
def never_accepting() -> Iterator[str]:
    """A webhook URL on 127.0.0.1 whose connections never complete: its one-place accept queue is kept full."""
    listener = socket.socket()
    fillers = [socket.socket() for _ in range(2)]
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for filler in fillers:  # the first fills the queue; the kernel drops every SYN after it
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        host, port = listener.getsockname()
        yield f"http://{host}:{port}/hooks"
    finally:
        for sock in (*fillers, listener):
            sock.close()
