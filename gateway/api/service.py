"""The service endpoints, no caller key needed: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from aiohttp import web

from gateway.api.keys import STATE


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ready = bool(state.snapshot.config.upstream.token_value) and state.upstream.started
    return web.json_response({"status": "ready" if ready else "starting"}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
