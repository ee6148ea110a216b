"""The framework ceiling: the least an aiohttp + uvloop app can do to answer a cache hit.

It checks the caller the cheapest way (the whole ``Authorization`` header
looked up in a dict of known ``Bearer <key>`` values: no hashing, no
constant-time compare), looks the batch id up in a dict of cached bodies,
and returns those bytes as ``application/json``. No middleware, no request
id, no metrics, no access log, no cache headers. Whatever the gateway costs
above this is the gateway's own.

    BENCH_CALLER_KEYS=k1,k2 python bench/ceiling.py --port P --body-file F --batch-id ID

prints ``listening <url>`` on stdout once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import uvloop
from aiohttp import web


def build_app(bodies: dict[str, bytes], keys: set[str]) -> web.Application:
    callers = {f"Bearer {key}": f"caller-{n}" for n, key in enumerate(sorted(keys))}
    unauthorized = b'{"message": "Unknown caller key."}'
    not_found = b'{"message": "not cached"}'

    async def get_batch(request: web.Request) -> web.Response:
        if callers.get(request.headers.get("Authorization", "")) is None:
            return web.Response(status=401, body=unauthorized, content_type="application/json")
        body = bodies.get(request.match_info["id"])
        if body is None:
            return web.Response(status=404, body=not_found, content_type="application/json")
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v2/batches/{id}", get_batch)
    return app


async def serve(port: int, bodies: dict[str, bytes], keys: set[str]) -> None:
    runner = web.AppRunner(build_app(bodies, keys), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    print(f"listening http://{host}:{bound}", flush=True)
    await asyncio.sleep(3600)  # the runner ends this process; the bound is a backstop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--batch-id", required=True)
    args = parser.parse_args()
    keys = {k for k in os.environ.get("BENCH_CALLER_KEYS", "").split(",") if k}
    uvloop.run(serve(args.port, {args.batch_id: args.body_file.read_bytes()}, keys))


if __name__ == "__main__":
    sys.exit(main())
