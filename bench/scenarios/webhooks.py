"""Scenario 14: webhook deliveries (docs/design.md §12, "Webhooks"): how fast, and what an outage costs.

The receiver is an aiohttp server in this process; its answers are 204 at once (each signature is checked with the
``standardwebhooks`` library for one request in VERIFY_EVERY). Events come from what the gateway relays: each new,
active batch retrieved through it is one event.

- Rate: the receiver refuses (503) while EVENTS events are made, then answers; ``webhook_events_per_s`` is EVENTS
  over the time from its first 2xx to its last (the backlog, sent one at a time in order, as a receiver that was
  away gets it).
- Outage: the receiver refuses for OUTAGE_S while events keep coming, and the gateway is SIGKILLed halfway through
  and started again; then the receiver answers. ``webhook_lost_after_outage``: events (batches retrieved) never
  delivered; ``webhook_duplicates_after_outage``: 2xx deliveries beyond one per event.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from bench.harness import Env, Proc, log
from gateway.cli import new_webhook_secret

TITLE = "scenario 14: webhook deliveries"
NS = "webhooks"  # the simulator's namespace: batches stay active for an hour
EVENTS = {"full": 10_000, "quick": 2_000, "smoke": 200}
OUTAGE_S = {"full": 30.0, "quick": 10.0, "smoke": 4.0}
OUTAGE_EVENTS_PER_S = 20
VERIFY_EVERY = 100
CONCURRENT_RETRIEVES = 32
WITHIN_S = 120.0  # a bound on every wait of this scenario
RETRY_S = 0.5  # the gateway's retry wait here (the default schedule starts at 5 s)


@dataclass
class Receiver:
    secret: str
    answering: bool = False
    first_ok: float | None = None
    last_ok: float = 0.0
    ok: list[str] = field(default_factory=list)  # the batch id of each 2xx delivery, in order
    seqs: list[int] = field(default_factory=list)  # the seq in each 2xx delivery's webhook-id, in order
    refused: int = 0
    bad_signatures: int = 0
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self.answering:
            self.refused += 1
            return web.Response(status=503)
        if len(self.ok) % VERIFY_EVERY == 0:
            try:
                Webhook(self.secret).verify(body, dict(request.headers))
            except Exception:  # any failure to verify is counted
                self.bad_signatures += 1
        now = time.perf_counter()
        self.first_ok = self.first_ok or now
        self.last_ok = now
        # The batch id without parsing JSON: the subject is the object's first "id" after "data".
        cursor = request.headers["webhook-id"]
        self.seqs.append(int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).rpartition(b".")[2]))
        self.ok.append(body.split(b'"data"', 1)[1].split(b'"id":', 1)[1].split(b'"', 2)[1].decode())
        return web.Response(status=204)

    async def until(self, count: int) -> bool:
        deadline = time.monotonic() + WITHIN_S
        while len(set(self.ok)) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def start(env: Env, name: str, receiver: Receiver) -> Proc:
    webhook = {"url": receiver.url, "secrets": [receiver.secret]}
    callers = [
        {"name": n, "key": k, **({"webhook": webhook} if n == next(iter(env.keys)) else {})}
        for n, k in env.keys.items()
    ]
    sections = {
        "store": {"path": str(env.workdir / f"{name}.db")},
        "events": {"webhook_retry_s": [RETRY_S], "webhook_timeout_s": 5},
    }
    return env.start_gateway(name, NS, access_log=False, callers=callers, sections=sections)


async def restart(env: Env, gateway: Proc) -> Proc:
    port = int(gateway.url.rsplit(":", 1)[1])
    cmd = [sys.executable, "-m", "gateway", "--config", str(env.workdir / f"{gateway.name}.yaml")]
    return await asyncio.to_thread(env.procs.start, f"{gateway.name}-again", cmd, port)


async def retrieve(session: aiohttp.ClientSession, url: str, ids: list[str]) -> None:
    """Each batch once through the gateway, a few at a time: each a new active batch, so one event."""
    queue = list(reversed(ids))

    async def worker() -> None:
        while queue:
            async with session.get(f"{url}/v2/batches/{queue.pop()}") as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"webhooks: a retrieve answered {r.status}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENT_RETRIEVES)))


async def appended(session: aiohttp.ClientSession, url: str, count: int) -> None:
    """Until the gateway's log counts ``count`` events (sightings are recorded off the request path)."""
    deadline = time.monotonic() + WITHIN_S
    while time.monotonic() < deadline:
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
        total = sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gateway_events_total")
        )
        if total >= count:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"webhooks: the gateway did not record {count} events within {WITHIN_S:g} s")


async def first_refusal(receiver: Receiver, session: aiohttp.ClientSession, url: str, tag: str) -> str:
    """One event, refused: once it reaches the receiver, the webhook has its position (later events all follow)."""
    await retrieve(session, url, [f"{tag}-first"])
    deadline = time.monotonic() + WITHIN_S
    while receiver.refused == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("webhooks: the first event never reached the receiver")
        await asyncio.sleep(0.05)
    return f"{tag}-first"


async def rate(env: Env, receiver: Receiver, count: int) -> dict[str, Any]:
    gateway = await asyncio.to_thread(start, env, "gateway-webhooks", receiver)
    headers = {"Authorization": f"Bearer {env.key}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            ids = [await first_refusal(receiver, session, gateway.url, "rate")]
            ids += [f"rate-{n}" for n in range(count - 1)]
            await retrieve(session, gateway.url, ids[1:])
            await appended(session, gateway.url, count)
        receiver.answering = True
        if not await receiver.until(count):
            raise RuntimeError(f"webhooks: {len(set(receiver.ok))} of {count} delivered within {WITHIN_S:g} s")
    finally:
        env.procs.stop(gateway)
    assert receiver.first_ok is not None
    elapsed = receiver.last_ok - receiver.first_ok
    return {
        "events": count,
        "seconds": elapsed,
        "per_s": count / elapsed if elapsed > 0 else float("inf"),
        "in_order": receiver.seqs == sorted(set(receiver.seqs)),
        "bad_signatures": receiver.bad_signatures,
    }


async def outage(env: Env, receiver: Receiver, outage_s: float) -> dict[str, Any]:
    gateway = await asyncio.to_thread(start, env, "gateway-webhook-outage", receiver)
    again: Proc | None = None
    headers = {"Authorization": f"Bearer {env.key}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            ids = [await first_refusal(receiver, session, gateway.url, "outage")]
            began, killed, n, since_restart = time.monotonic(), False, 0, 0
            while time.monotonic() - began < outage_s:
                batch = [f"outage-{n + i}" for i in range(OUTAGE_EVENTS_PER_S // 10)]
                n += len(batch)
                await retrieve(session, (again or gateway).url, batch)
                ids += batch
                since_restart += len(batch) if killed else 0
                if not killed and time.monotonic() - began >= outage_s / 2:
                    await appended(session, gateway.url, len(ids))  # what was seen is in the store
                    gateway.popen.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(gateway.popen.wait, 10)
                    again, killed = await restart(env, gateway), True
                    log(f"webhooks: gateway SIGKILLed and started again after {time.monotonic() - began:.1f} s")
                await asyncio.sleep(0.1)
            assert again is not None
            await appended(session, again.url, since_restart)
        receiver.answering = True
        await receiver.until(len(ids))
    finally:
        env.procs.stop(gateway)
        if again is not None:
            env.procs.stop(again)
    delivered = set(receiver.ok)
    return {
        "events": len(ids),
        "outage_s": outage_s,
        "lost": sum(1 for i in ids if i not in delivered),
        "duplicates": len(receiver.ok) - len(delivered),
        "bad_signatures": receiver.bad_signatures,
    }


async def _measure(env: Env) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for part in ("rate", "outage"):
        receiver = Receiver(new_webhook_secret())
        await receiver.start()
        try:
            if part == "rate":
                results["rate"] = await rate(env, receiver, EVENTS[env.mode.name])
            else:
                results["outage"] = await outage(env, receiver, OUTAGE_S[env.mode.name])
        finally:
            assert receiver.runner is not None
            await receiver.runner.cleanup()
    return results


def measure(env: Env) -> dict[str, Any]:
    result = uvloop.run(_measure(env))
    log(
        f"webhooks: {result['rate']['per_s']:.0f} events/s; after the outage "
        f"{result['outage']['lost']} lost, {result['outage']['duplicates']} duplicates"
    )
    return result


def keys(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "webhook_events_per_s": round(result["rate"]["per_s"], 1),
        "webhook_lost_after_outage": result["outage"]["lost"],
        "webhook_duplicates_after_outage": result["outage"]["duplicates"],
    }


def lines(env: Env, result: dict[str, Any]) -> list[str]:
    lines = ["", "### 14. Webhook deliveries (one caller, a local receiver)", ""]
    if not result:
        return [*lines, "Skipped (not asked for)."]
    r, o = result["rate"], result["outage"]
    return [
        *lines,
        f"Rate: {r['events']} events made while the receiver refused, then sent one at a time in order: "
        f"{r['per_s']:.0f} events/s ({r['seconds']:.1f} s; in order: {'yes' if r['in_order'] else 'NO'}). "
        f"Outage: the receiver refused for {o['outage_s']:g} s while {o['events']} events were made, and the "
        f"gateway was SIGKILLed and started again halfway: {o['lost']} lost, {o['duplicates']} duplicates. "
        f"Signatures checked and failed: {r['bad_signatures'] + o['bad_signatures']}.",
    ]
