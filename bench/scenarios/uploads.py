"""Scenario 13: a dataset upload through the gateway against the same upload straight to the simulator.

A simulator of its own (``gateway.demo.simulator.Simulator``, whose dataset routes stream an upload to disk) runs in
its own process. One upload of ``UPLOAD_BYTES[mode]`` (1 GiB full, 256 MiB quick), generated on the fly (the same
1 MiB block, never the whole body in memory), is sent straight to the simulator and through the gateway,
alternately, ``ROUNDS[mode]`` times each; each dataset is deleted at the simulator afterwards. ``upload_vs_direct``
is the best throughput through the gateway over the best straight (other load on the machine only ever slows a
round); ``upload_rss_growth_mb`` the gateway's largest RSS during its uploads minus its RSS before the first.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.harness import Env, Proc, free_port, log

TITLE = "scenario 13: dataset uploads"
UPLOAD_BYTES = {"full": 1 << 30, "quick": 256 << 20, "smoke": 16 << 20}
ROUNDS = {"full": 3, "quick": 3, "smoke": 1}
BLOCK = b'{"custom_id": "row", "body": {"texts": ["the quick brown fox jumps over the lazy dog"]}}\n' * 11_650
BOUNDARY = "bench-upload-3f9a1c"
# A type the simulator stores but does not parse: the measured work is the upload, not a validation after it.
DATASET_TYPE = "embed-input"
UPLOAD_WITHIN_S = 600.0  # a bound on one upload
RSS_EVERY_S = 0.02
ROOT = Path(__file__).resolve().parents[2]


def start_dataset_simulator(env: Env) -> Proc:
    port = free_port()
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.scenarios.uploads import serve; serve({port})"
    return env.procs.start("dataset-simulator", [sys.executable, "-c", code], port, {"BENCH_UPSTREAM_TOKEN": env.token})


def serve(port: int) -> None:
    """The simulator, dataset routes included, on ``port`` (run in its own process)."""
    from aiohttp import web

    from gateway.demo.simulator import Simulator

    simulator = Simulator(token=os.environ["BENCH_UPSTREAM_TOKEN"], lifetime_s=60)
    web.run_app(simulator.app(), host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


def _framing(size: int) -> tuple[bytes, bytes, int]:
    """The multipart head and tail around ``size`` bytes of data, and the whole body's length."""
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="data"; filename="rows.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    return head, tail, len(head) + size + len(tail)


async def _body(size: int) -> AsyncIterator[bytes]:
    head, tail, _ = _framing(size)
    yield head
    left = size
    while left:
        piece = BLOCK if left >= len(BLOCK) else BLOCK[:left]
        left -= len(piece)
        yield piece
    yield tail


async def upload(url: str, key: str, size: int) -> tuple[float, str]:
    """One upload of ``size`` data bytes to ``url`` (a base URL); seconds taken and the new dataset's id."""
    _, _, length = _framing(size)
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(length),
    }
    target = f"{url}/v1/datasets?name=bench-upload&type={DATASET_TYPE}"
    timeout = aiohttp.ClientTimeout(total=UPLOAD_WITHIN_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        began = time.perf_counter()
        async with session.post(target, data=_body(size), headers=headers) as response:
            answer = await response.json()
            took = time.perf_counter() - began
            if response.status != 200:
                raise RuntimeError(f"upload to {url}: {response.status} {answer}")
    return took, answer["id"]


async def delete(sim_url: str, token: str, dataset_id: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.delete(f"{sim_url}/v1/datasets/{dataset_id}", headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        await r.read()


async def watched_upload(gateway: Proc, key: str, size: int) -> tuple[float, str, int]:
    """An upload through the gateway, its RSS sampled meanwhile: seconds, id, the largest RSS seen."""
    task = asyncio.ensure_future(upload(gateway.url, key, size))
    peak = gateway.rss_bytes()
    while not task.done():
        peak = max(peak, gateway.rss_bytes())
        await asyncio.wait({task}, timeout=RSS_EVERY_S)
    took, dataset_id = task.result()
    return took, dataset_id, peak


def measure(env: Env) -> dict[str, Any]:
    size = UPLOAD_BYTES[env.mode.name]
    sim = start_dataset_simulator(env)
    name, key = next(iter(env.keys.items()))
    upstream = {
        "base_url": sim.url,
        "token": env.token,
        "timeout_s": 60,
        "rate_limit": {"requests_per_s": 1000, "burst": 1000},
    }
    gateway = env.start_gateway(
        "gateway-upload",
        "hit",
        callers=[{"name": name, "key": key, "allow": ["retrieve", "list", "upload_dataset"]}],
        sections={"upstream": upstream},
    )
    direct_s: list[float] = []
    gateway_s: list[float] = []
    cpu_s: list[float] = []
    rss_before = gateway.rss_bytes()
    rss_peak = rss_before
    for round_no in range(ROUNDS[env.mode.name]):
        took, dataset_id = uvloop.run(upload(sim.url, env.token, size))
        direct_s.append(took)
        uvloop.run(delete(sim.url, env.token, dataset_id))
        cpu_before = gateway.cpu_seconds()
        took, dataset_id, peak = uvloop.run(watched_upload(gateway, key, size))
        cpu_s.append(gateway.cpu_seconds() - cpu_before)
        gateway_s.append(took)
        rss_peak = max(rss_peak, peak)
        uvloop.run(delete(sim.url, env.token, dataset_id))
        log(
            f"uploads: round {round_no + 1}: direct {size / direct_s[-1] / 2**20:.0f} MiB/s, "
            f"gateway {size / gateway_s[-1] / 2**20:.0f} MiB/s (its CPU {cpu_s[-1]:.2f} s)"
        )
    env.procs.stop(gateway)
    env.procs.stop(sim)
    # The fastest round of each: on a shared machine other load only ever slows a round down.
    direct, through = min(direct_s), min(gateway_s)
    return {
        "bytes": size,
        "direct_mib_s": size / direct / 2**20,
        "gateway_mib_s": size / through / 2**20,
        "ratio": direct / through,
        "rss_before_mb": rss_before / 2**20,
        "rss_growth_mb": (rss_peak - rss_before) / 2**20,
        "rounds": len(direct_s),
        "gateway_cpu_s_per_gib": statistics.median(cpu_s) * (1 << 30) / size,
    }


def keys(result: dict[str, Any]) -> dict[str, Any]:
    if not result:
        return {"upload_vs_direct": None, "upload_rss_growth_mb": None}
    return {"upload_vs_direct": round(result["ratio"], 3), "upload_rss_growth_mb": round(result["rss_growth_mb"], 1)}


def lines(env: Env, result: dict[str, Any]) -> list[str]:
    lines = ["", "### 13. Dataset uploads (through the gateway against straight to the simulator)", ""]
    if not result:
        return [*lines, "Skipped (not asked for)."]
    return [
        *lines,
        f"One upload of {result['bytes'] >> 20} MiB (multipart, generated on the fly), straight to the simulator "
        f"and through the gateway, alternately, {result['rounds']} time(s) each; the fastest of each. The gateway's "
        f"RSS is sampled every 20 ms during its uploads; its CPU: {result['gateway_cpu_s_per_gib']:.2f} s per GiB.",
        "",
        "| path | MiB/s |",
        "|---|---:|",
        f"| straight to the simulator | {result['direct_mib_s']:.0f} |",
        f"| through the gateway | {result['gateway_mib_s']:.0f} |",
        "",
        f"`upload_vs_direct` {result['ratio']:.3f} (target >= 0.8); `upload_rss_growth_mb` "
        f"{result['rss_growth_mb']:.1f} from {result['rss_before_mb']:.1f} MB (target <= 64).",
    ]
