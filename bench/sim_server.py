"""The benchmark's upstream: the gateway's own Simulator, served in its own process.

Each contender gets its own namespace (``/{ns}/v2/batches...``: the whole
batch API), a fresh
``gateway.demo.simulator.Simulator`` with its own lifetime, so that the same batch
ids follow the same lifecycle for every contender and every contender's
upstream calls are counted apart. ``/_bench/...`` routes (never counted)
report and reset the counters, and schedule batches' completions
(``POST /_bench/schedule?ns=N`` with ``{"complete_in": {id: seconds}}``
answers ``{"complete_at": {id: clock time}, "now": clock time}``, on the
simulator's clock, CLOCK_MONOTONIC).

    BENCH_UPSTREAM_TOKEN=T python bench/sim_server.py --port 0 --ns hit=0.001 --ns gw=25

prints ``listening <url>`` on stdout once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Awaitable, Callable

import uvloop
from aiohttp import web

from gateway.demo.simulator import Simulator

Route = Callable[[Simulator], Callable[[web.Request], Awaitable[web.Response]]]
ROUTES: tuple[tuple[str, str, Route], ...] = (
    # {id}:cancel first, so that {id} does not claim it.
    ("POST", "/v2/batches/{id}:cancel", lambda sim: sim.cancel_batch),
    ("GET", "/v2/batches/{id}", lambda sim: sim.get_batch),
    ("GET", "/v2/batches", lambda sim: sim.list_batches),
    ("POST", "/v2/batches", lambda sim: sim.create_batch),
)


class Namespaces:
    def __init__(self, token: str, lifetimes: dict[str, float]) -> None:
        self.token = token
        self.lifetimes = lifetimes
        self.sims = {ns: Simulator(token=token, lifetime_s=life) for ns, life in lifetimes.items()}

    def route(self, handler: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        """``handler`` of the namespace's current Simulator (a reset replaces it)."""

        async def dispatch(request: web.Request) -> web.Response:
            sim = self.sims.get(request.match_info["ns"])
            if sim is None:
                raise web.HTTPNotFound()
            return await handler(sim)(request)

        return dispatch

    async def stats(self, request: web.Request) -> web.Response:
        sim = self.sims[request.query["ns"]]
        body: dict[str, object] = {"calls": sim.calls}
        if request.query.get("detail"):
            first = sim.first_seen()
            body["by_id"] = dict(sim.calls_by_id.items())
            body["first_seen"] = first
            body["span_s"] = {b: sim.span_s(b) for b in first}
            body["now"] = sim.now()
            body["complete_at"] = {b: sim.changed_at(b) for b in first if sim.changed_at(b) is not None}
        return web.json_response(body)

    async def schedule(self, request: web.Request) -> web.Response:
        """Each batch of ``complete_in`` completes that many seconds from now (``Simulator.schedule``)."""
        sim = self.sims[request.query["ns"]]
        document = await request.json()
        complete_in = document.get("complete_in") if isinstance(document, dict) else None
        if not isinstance(complete_in, dict):
            raise web.HTTPBadRequest(text='expected {"complete_in": {id: seconds}}')
        now = sim.now()
        for batch_id, seconds in complete_in.items():
            sim.schedule(batch_id, complete_at=now + float(seconds))
        return web.json_response({"complete_at": {b: sim.changed_at(b) for b in complete_in}, "now": now})

    async def reset(self, request: web.Request) -> web.Response:
        ns = request.query["ns"]
        self.sims[ns] = Simulator(token=self.token, lifetime_s=self.lifetimes[ns])
        return web.json_response({"ok": True})


async def serve(port: int, token: str, lifetimes: dict[str, float]) -> None:
    spaces = Namespaces(token, lifetimes)
    app = web.Application()
    for method, path, handler in ROUTES:
        app.router.add_route(method, "/{ns}" + path, spaces.route(handler))
    app.router.add_get("/_bench/stats", spaces.stats)
    app.router.add_post("/_bench/reset", spaces.reset)
    app.router.add_post("/_bench/schedule", spaces.schedule)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    print(f"listening http://{host}:{bound}", flush=True)
    # The runner ends this process; the bound keeps a forgotten one from living forever.
    await asyncio.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ns", action="append", default=[], help="name=lifetime_s")
    args = parser.parse_args()
    lifetimes = {}
    for item in args.ns:
        name, _, life = item.partition("=")
        lifetimes[name] = float(life)
        if not (math.isfinite(lifetimes[name]) and lifetimes[name] > 0):
            parser.error(f"--ns {item}: the lifetime must be a positive number of seconds")
    uvloop.run(serve(args.port, os.environ["BENCH_UPSTREAM_TOKEN"], lifetimes))


if __name__ == "__main__":
    sys.exit(main())
