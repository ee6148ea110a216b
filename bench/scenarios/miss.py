"""Scenario 3: miss-path overhead: sequential uncached requests through the gateway, interleaved request by request
with the same requests straight to the simulator; the overhead is the difference of their percentiles."""

from __future__ import annotations

import statistics
import time
from typing import Any

import aiohttp
import uvloop

from bench.harness import Env, percentile

TITLE = "scenario 3: miss-path overhead"


async def timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    """Milliseconds for one request, which must be a 200 and (through the gateway) a miss."""
    began = time.perf_counter()
    async with session.get(url, headers=headers) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"miss request answered {r.status}")
        if "X-Cache" in r.headers and r.headers["X-Cache"] != "MISS":
            raise RuntimeError(f"miss request was a {r.headers['X-Cache']}")
    return (time.perf_counter() - began) * 1000


async def miss_latencies(env: Env, gateway_url: str) -> list[dict[str, float]]:
    """Each round's p50 and p99, through the gateway and direct."""
    assert env.sim is not None
    direct_url = f"{env.sim.url}/miss/v2/batches"
    gw_headers = {"Authorization": f"Bearer {env.key}"}
    direct_headers = {"Authorization": f"Bearer {env.token}"}
    timeout = aiohttp.ClientTimeout(total=10)
    rounds = []
    async with (
        aiohttp.ClientSession(timeout=timeout) as gw_session,
        aiohttp.ClientSession(timeout=timeout) as direct_session,
    ):
        for warm in range(20):
            await timed(gw_session, f"{gateway_url}/v2/batches/warm-{warm}", gw_headers)
            await timed(direct_session, f"{direct_url}/warm-d-{warm}", direct_headers)
        for round_no in range(env.mode.miss_rounds):
            gw, direct = [], []
            for i in range(env.mode.miss_per_round):
                # Interleaved request by request; distinct ids, so every gateway request is a miss.
                direct.append(await timed(direct_session, f"{direct_url}/d-{round_no}-{i}", direct_headers))
                gw.append(await timed(gw_session, f"{gateway_url}/v2/batches/g-{round_no}-{i}", gw_headers))
            rounds.append(
                {
                    "gateway_p50": percentile(gw, 50),
                    "gateway_p99": percentile(gw, 99),
                    "direct_p50": percentile(direct, 50),
                    "direct_p99": percentile(direct, 99),
                }
            )
    return rounds


def measure(env: Env) -> dict[str, Any]:
    result: dict[str, Any] = {}
    configs = (("access_log on", True), ("access_log off", False))
    for label, access_log in configs[:1] if env.mode.name == "smoke" else configs:
        gateway = env.start_gateway(f"gateway-miss-{'log' if access_log else 'nolog'}", "miss", access_log=access_log)
        rounds = uvloop.run(miss_latencies(env, gateway.url))
        env.procs.stop(gateway)
        summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        summary["overhead_p50_ms"] = statistics.median(r["gateway_p50"] - r["direct_p50"] for r in rounds)
        summary["overhead_p99_ms"] = statistics.median(r["gateway_p99"] - r["direct_p99"] for r in rounds)
        result[label] = summary
    return result


def keys(miss: dict[str, Any]) -> dict[str, Any]:
    on = miss["access_log on"]
    return {
        "miss_overhead_p50_ms": round(on["overhead_p50_ms"], 3),
        "miss_overhead_p99_ms": round(on["overhead_p99_ms"], 3),
    }


def lines(env: Env, miss: dict[str, Any]) -> list[str]:
    lines = ["", "### 3. Miss-path overhead (sequential requests, distinct ids, interleaved with direct calls)", ""]
    if not miss:
        return [*lines, "Skipped (not asked for)."]
    lines += [
        "| gateway config | gateway p50 ms | direct p50 ms | overhead p50 ms | gateway p99 ms | direct p99 ms "
        "| overhead p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    return lines + [
        f"| {label} | {s['gateway_p50']:.3f} | {s['direct_p50']:.3f} | {s['overhead_p50_ms']:.3f} | "
        f"{s['gateway_p99']:.3f} | {s['direct_p99']:.3f} | {s['overhead_p99_ms']:.3f} |"
        for label, s in miss.items()
    ]
