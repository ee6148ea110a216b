"""The framework ceiling: the fastest answer aiohttp's public server gives to one fixed request, with no logging.

aiohttp's low-level server (``web.Server``, no ``Application``: no router,
no middleware, no signals) on uvloop, with its access log off, and a
handler that looks at nothing in the request and returns a new
``web.Response`` around the prebuilt body (a ``Response`` is written once,
so one cannot be reused). No caller check, request id, metrics, log or
cache headers. The bench sends it the gateway's hit request, so whatever
the gateway costs above this is the gateway's own.

    python bench/ceiling.py --port P --body-file F [--batch-id ID]

prints ``listening <url>`` on stdout once it serves. ``--batch-id`` and
``BENCH_CALLER_KEYS`` are accepted (the harness passes them to every
contender) and ignored: every request gets the same answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import uvloop
from aiohttp import web

JSON = "application/json"


def build_server(body: bytes) -> web.Server:
    async def answer(_request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    # access_log=None: aiohttp's RequestHandler then never formats a line.
    return web.Server(answer, access_log=None)


async def serve(port: int, body: bytes) -> None:
    runner = web.ServerRunner(build_server(body), handle_signals=False)
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
    parser.add_argument("--batch-id", help="ignored: every request gets the same answer")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.body_file.read_bytes()))


if __name__ == "__main__":
    sys.exit(main())
