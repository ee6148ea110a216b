"""Scenario 12: the cost of following (docs/design.md §12, "Following"): upstream calls to follow 1,000 batches
against 10, with the same 10 changing in both.

Each contender is a gateway alone on a simulator namespace of its own. Its batches are scheduled
(``Simulator.schedule``): 10 complete at spread moments within the window, the others stay IN_PROGRESS with steady
counters. One caller's list through the gateway shows them all, so the gateway follows every one; then, with no
caller asking anything, the simulator counts the gateway's upstream calls over the window.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import uvloop

from bench.harness import Env, log

TITLE = "scenario 12: the cost of following"
CHANGING = 10
FOLLOWED = (10, 1000)
NAMESPACES = {count: f"follow-{count}" for count in FOLLOWED}
SEED = 22
TIMEOUT = aiohttp.ClientTimeout(total=30)
SETTLE_S = 2.0  # after the list that shows the batches: the gateway records them as followed


def window_s(env: Env) -> float:
    return 60.0 if env.mode.name == "full" else 10.0 if env.mode.name == "quick" else 4.0


def interval_s(env: Env) -> float:
    """events.interval_s: the default (5 s) in a full run; shorter when scaled down, for as many rounds."""
    return 5.0 if env.mode.name == "full" else 1.0


def schedule(count: int, window: float) -> dict[str, float]:
    """Batch id -> seconds until it completes: the same CHANGING ids in the window, the rest long after it."""
    pick = random.Random(SEED)
    return {
        f"follow-{n:04d}": round(pick.uniform(1.0, window - 1.0), 3) if n < CHANGING else 100 * window
        for n in range(count)
    }


async def _calls(control: aiohttp.ClientSession, sim_url: str, ns: str) -> int:
    async with control.get(f"{sim_url}/_bench/stats", params={"ns": ns}) as r:
        calls: int = (await r.json())["calls"]
        return calls


async def follow_run(env: Env, gateway_url: str, count: int) -> dict[str, Any]:
    """Schedule ``count`` batches, make the gateway follow them, count its upstream calls over the window."""
    assert env.sim is not None
    ns, window = NAMESPACES[count], window_s(env)
    headers = {"Authorization": f"Bearer {env.key}"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as control:
        async with control.post(f"{env.sim.url}/_bench/reset", params={"ns": ns}) as r:
            r.raise_for_status()
        plan = schedule(count, window)
        async with control.post(f"{env.sim.url}/_bench/schedule", params={"ns": ns}, json={"complete_in": plan}) as r:
            r.raise_for_status()
        async with control.get(f"{gateway_url}/v2/batches", params={"page_size": "1000"}, headers=headers) as r:
            r.raise_for_status()
            listed = len((await r.json())["batches"])
        await asyncio.sleep(SETTLE_S)
        before = await _calls(control, env.sim.url, ns)
        await asyncio.sleep(window)
        after = await _calls(control, env.sim.url, ns)
    return {"followed": count, "listed": listed, "calls": after - before, "window_s": window}


def measure(env: Env) -> dict[str, Any]:
    runs = {}
    for count in FOLLOWED:
        events = {"interval_s": interval_s(env)}
        store = {"path": str(env.workdir / f"follow-{count}.db")}
        gateway = env.start_gateway(
            f"gateway-follow-{count}", NAMESPACES[count], sections={"events": events, "store": store}
        )
        log(f"following {count} batches ({CHANGING} changing) for {window_s(env):g} s")
        try:
            runs[count] = uvloop.run(follow_run(env, gateway.url, count))
        finally:
            env.procs.stop(gateway)
    return {"runs": runs, "interval_s": interval_s(env)}


def keys(follow: dict[str, Any]) -> dict[str, Any]:
    runs = follow["runs"]
    few, many = runs[FOLLOWED[0]]["calls"], runs[FOLLOWED[1]]["calls"]
    return {
        "follow_calls_ratio_1000_vs_10": round(many / few, 3) if few else None,
        "follow_calls": {str(count): run["calls"] for count, run in runs.items()},
    }


def lines(env: Env, follow: dict[str, Any]) -> list[str]:
    lines = ["", "### 12. The cost of following (1,000 batches against 10)", ""]
    if not follow:
        return [*lines, "Skipped (not asked for)."]
    lines += [
        f"A gateway follows N batches it was shown once (one caller's list), with no caller asking anything; "
        f"{CHANGING} of them complete at spread moments, the others stay IN_PROGRESS. events.interval_s is "
        f"{follow['interval_s']:g} s. Calls: the simulator's count of the gateway's upstream calls over the window.",
        "",
        "| followed | listed by the caller | window s | upstream calls |",
        "|---:|---:|---:|---:|",
    ]
    return lines + [
        f"| {run['followed']} | {run['listed']} | {run['window_s']:g} | {run['calls']} |"
        for run in follow["runs"].values()
    ]
