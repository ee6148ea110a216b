"""Scenario 10: downloading one dataset part through a gateway URL, against fetching it straight from storage.

A storage host and the dataset route of an upstream run in a process of their own (this file, ``--serve``): one
part of ``size`` bytes (1 GiB; 256 MiB in --quick), streamed from memory at a signed URL, and
``GET /v1/datasets/{id}`` naming it. The gateway (``datasets.part_origins``: that origin) serves a signed download
URL for the part (signed here with the configured ``datasets.url_signing_key``, as a dataset answer would carry
it). curl downloads the part straight from storage, then through the gateway, in turns (ROUNDS each); the key is
the ratio of the best throughputs. While the gateway serves, its RSS is sampled: the growth over its RSS before is
the second key (the part is streamed, never held).

    python bench/run.py --quick --only downloads
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import Env, fmt, free_port, log

TITLE = "scenario 10: downloads"
DATASET_ID = "bench-dataset-1"
PART_ID = "part-0"
ROUNDS = 3
SAMPLE_EVERY_S = 0.02
BLOCK = 4 * 1024 * 1024  # the storage host writes this block again and again
REPO = Path(__file__).resolve().parents[2]
SIZES = {"full": 1 << 30, "quick": 256 << 20, "smoke": 16 << 20}


def measure(env: Env) -> dict[str, Any]:
    size = SIZES[env.mode.name]
    token = secrets.token_hex(8)
    port = free_port()
    storage = env.procs.start(
        "download-storage",
        [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", str(port), "--size", str(size)],
        port,
        env={
            "BENCH_STORAGE_TOKEN": token,
            "BENCH_UPSTREAM_TOKEN": env.token,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
    )
    key = secrets.token_hex(24)
    caller = next(iter(env.keys))
    gateway = env.start_gateway(
        "gateway-downloads",
        "unused",
        access_log=True,
        callers=[{"name": caller, "key": env.keys[caller], "allow": ["retrieve", "list", "read_dataset"]}],
        sections={
            "upstream": {"base_url": storage.url, "token": env.token, "timeout_s": 15},
            "datasets": {"part_origins": [storage.url], "url_signing_key": key},
        },
    )
    direct_url = f"{storage.url}/storage/{DATASET_ID}.avro?token={token}"
    through_url = gateway_url(gateway.url, caller, key)
    try:
        rss_before = gateway.rss_bytes()
        peak = [rss_before]
        direct, through = [], []
        for _ in range(ROUNDS):
            direct.append(download(direct_url, size))
            with Sampling(gateway.rss_bytes, peak):
                through.append(download(through_url, size))
        rates = f"direct {[fmt(d / 2**20, 0) for d in direct]} MiB/s, gateway {[fmt(t / 2**20, 0) for t in through]}"
        log(f"downloads: {rates}")
    finally:
        env.procs.stop(gateway)
        env.procs.stop(storage)
    return {
        "size_mb": size / 2**20,
        "direct_mb_s": max(direct) / 2**20,
        "gateway_mb_s": max(through) / 2**20,
        "rss_before_mb": rss_before / 2**20,
        "rss_peak_mb": peak[0] / 2**20,
    }


def gateway_url(base: str, caller: str, key: str) -> str:
    """The part's download URL as a dataset answer gives it to ``caller``."""
    from gateway.datasets.signing import SignedLinks, SignedPart

    expires = int(time.time()) + 3600
    return SignedLinks.url(base, SignedPart(DATASET_ID, PART_ID, False, caller), expires, key.encode())


def download(url: str, size: int) -> float:
    """One download with curl to /dev/null: bytes per second (raises unless every byte came with a 200)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", url],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout.split()
    status, got, seconds = int(out[0]), int(out[1]), float(out[2])
    if status != 200 or got != size:
        raise RuntimeError(f"download of {url.split('?')[0]}: status {status}, {got} of {size} bytes")
    return size / seconds


class Sampling:
    """Samples ``read()`` in a thread while the block runs, keeping the largest in ``peak[0]``."""

    def __init__(self, read: Any, peak: list[int]) -> None:
        self.read, self.peak = read, peak
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(SAMPLE_EVERY_S):
            self.peak[0] = max(self.peak[0], self.read())

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *_exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.peak[0] = max(self.peak[0], self.read())


def keys(result: dict[str, Any]) -> dict[str, Any]:
    if not result:
        return {"download_vs_direct": None, "download_rss_growth_mb": None}
    return {
        "download_vs_direct": round(result["gateway_mb_s"] / result["direct_mb_s"], 3),
        "download_rss_growth_mb": round(result["rss_peak_mb"] - result["rss_before_mb"], 1),
    }


def lines(env: Env, result: dict[str, Any]) -> list[str]:
    head = ["", "### 10. Downloading one dataset part (a gateway URL against storage directly, curl)", ""]
    if not result:
        return [*head, "Skipped (not asked for)."]
    figures = keys(result)
    return [
        *head,
        "| part MiB | direct MiB/s | gateway MiB/s | ratio | gateway RSS before MiB | peak MiB | growth MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['size_mb']:.0f} | {result['direct_mb_s']:.0f} | {result['gateway_mb_s']:.0f} | "
        f"{figures['download_vs_direct']:.2f} | {result['rss_before_mb']:.1f} | {result['rss_peak_mb']:.1f} | "
        f"{figures['download_rss_growth_mb']:.1f} |",
    ]


# --- the storage host and dataset route, in a process of their own ----------------------------------------------


def serve(port: int, size: int) -> None:
    import asyncio
    import json
    import os

    import uvloop
    from aiohttp import web

    token, upstream_token = os.environ["BENCH_STORAGE_TOKEN"], os.environ["BENCH_UPSTREAM_TOKEN"]
    block = secrets.token_bytes(BLOCK)
    base = f"http://127.0.0.1:{port}"

    async def dataset(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {upstream_token}":
            return web.json_response({"message": "no"}, status=401)
        part = {"id": PART_ID, "name": "part-0.avro", "index": 0, "size_bytes": size}
        part["url"] = f"{base}/storage/{DATASET_ID}.avro?token={token}"
        body = {"id": DATASET_ID, "name": "bench", "validation_status": "validated", "dataset_parts": [part]}
        return web.Response(body=json.dumps({"dataset": body}), content_type="application/json")

    async def part(request: web.Request) -> web.StreamResponse:
        if request.query.get("token") != token or "Authorization" in request.headers:
            return web.Response(status=403)
        response = web.StreamResponse(headers={"Content-Type": "application/avro"})
        response.content_length = size
        await response.prepare(request)
        view, left = memoryview(block), size
        while left:
            await response.write(view[: min(left, BLOCK)])
            left -= min(left, BLOCK)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get(f"/v1/datasets/{DATASET_ID}", dataset)
    app.router.add_get(f"/storage/{DATASET_ID}.avro", part)

    async def forever() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    uvloop.run(forever())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    arguments = parser.parse_args()
    serve(arguments.port, arguments.size)
