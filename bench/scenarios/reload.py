"""Scenario 9: the stall a config reload puts on a busy connection.

The gateway starts as a process with a config of many callers (10,000 in a full or quick run; half by key, half by
key_sha256, as in scenario 6). One kept-alive connection asks for a cached batch again and again, one request at a
time, each as soon as the last is answered; then SIGHUP reloads the same file. The stall is the longest gap between
two consecutive answers from the SIGHUP until the reload is done (the gateway's /metrics counts it) and AFTER_S
more; the longest gap in the BEFORE_S before the SIGHUP is the quiet figure to compare it with. A reload that reads
and validates the file on the event loop holds every connection for as long as that takes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop

from bench.harness import HIT_BATCH_ID, Env, log
from bench.scenarios.config import filler_callers
from bench.scenarios.hits import fetch_status

TITLE = "scenario 9: reload under load"
BEFORE_S = 0.5  # answers before the SIGHUP: the quiet gaps
AFTER_S = 0.5  # answers after the reload is counted done
RELOAD_WITHIN_S = 30.0  # a bound on one reload (and on any one request)
METRICS_EVERY_S = 0.05  # how often /metrics is asked whether the reload is done
MAX_ANSWERS = 1_000_000  # a bound on the busy connection's loop, whatever goes wrong
_RELOADS = re.compile(r'^gateway_config_reloads_total\{result="(\w+)"\}\s+([\d.e+]+)$', re.MULTILINE)


@dataclass
class Answers:
    """When each answer on the busy connection arrived (perf_counter), and how many were not a 200."""

    at: list[float] = field(default_factory=list)
    failures: int = 0


async def hit_until(session: aiohttp.ClientSession, url: str, headers: dict[str, str], stop: asyncio.Event) -> Answers:
    """Sequential hits on one connection (the session holds one) until ``stop`` is set."""
    answers = Answers()
    while not stop.is_set() and len(answers.at) < MAX_ANSWERS:
        async with session.get(url, headers=headers) as r:
            await r.read()
        answers.at.append(time.perf_counter())
        answers.failures += r.status != 200
    return answers


async def reloads(control: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """The gateway's reloads so far, by result (ok, error)."""
    async with control.get(f"{url}/metrics") as r:
        text = await r.text()
    return {"ok": 0, "error": 0} | {result: int(float(n)) for result, n in _RELOADS.findall(text)}


async def reload_done(control: aiohttp.ClientSession, url: str, before: dict[str, int]) -> None:
    """Returns once /metrics counts one more reload done; raises if it was refused, or not done in time."""
    deadline = time.monotonic() + RELOAD_WITHIN_S
    while time.monotonic() < deadline:
        now = await reloads(control, url)
        if now["error"] > before["error"]:
            raise RuntimeError("the gateway refused the reload (see its log)")
        if now["ok"] > before["ok"]:
            return
        await asyncio.sleep(METRICS_EVERY_S)
    raise RuntimeError(f"the reload was not done within {RELOAD_WITHIN_S:g} s")


async def stall_round(url: str, pid: int, key: str) -> dict[str, float]:
    """One SIGHUP under a busy connection: the longest gap around it, the longest before it, and how long until
    /metrics counted it done."""
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=RELOAD_WITHIN_S)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1)) as busy,
        aiohttp.ClientSession(timeout=timeout) as control,
    ):
        before = await reloads(control, url)
        stop = asyncio.Event()
        hitter = asyncio.ensure_future(hit_until(busy, f"{url}/v2/batches/{HIT_BATCH_ID}", headers, stop))
        await asyncio.sleep(BEFORE_S)
        sent = time.perf_counter()
        os.kill(pid, signal.SIGHUP)
        try:
            await reload_done(control, url, before)
            done = time.perf_counter()
            await asyncio.sleep(AFTER_S)
        finally:
            stop.set()
            answers = await hitter
    pairs = list(zip(answers.at, answers.at[1:], strict=False))
    quiet = [b - a for a, b in pairs if b < sent]
    around = [b - a for a, b in pairs if b >= sent]
    if not quiet or not around or answers.failures:
        raise RuntimeError(f"reload: {len(answers.at)} answers, {answers.failures} not 200")
    return {
        "stall_ms": max(around) * 1000,
        "quiet_max_ms": max(quiet) * 1000,
        "quiet_p50_ms": statistics.median(quiet) * 1000,
        "done_s": done - sent,
        "answers": len(answers.at),
    }


def measure(env: Env) -> dict[str, Any]:
    count = env.mode.reload_callers
    few = [{"name": n, "key": k} for n, k in env.keys.items()]
    gateway = env.start_gateway("gateway-reload", "hit", callers=filler_callers(count - len(few)) + few)
    url = f"{gateway.url}/v2/batches/{HIT_BATCH_ID}"
    check = uvloop.run(fetch_status(url, env.key))  # the miss that fills the cache: then every request is a hit
    if check != 200:
        raise RuntimeError(f"the reload gateway answered {check} to the hit request")
    rounds = []
    for round_no in range(env.mode.reload_rounds):
        rounds.append(uvloop.run(stall_round(gateway.url, gateway.pid, env.key)))
        log(f"reload: round {round_no + 1}/{env.mode.reload_rounds}: stall {rounds[-1]['stall_ms']:.0f} ms")
    env.procs.stop(gateway)
    return {
        "callers": count,
        "rounds": rounds,
        "stall_ms": statistics.median(r["stall_ms"] for r in rounds),
        "quiet_max_ms": statistics.median(r["quiet_max_ms"] for r in rounds),
    }


def keys(reload: dict[str, Any]) -> dict[str, Any]:
    return {
        "reload_stall_ms_10k_callers": round(reload["stall_ms"], 1),
        "reload_stall_callers": reload["callers"],
        "reload_quiet_gap_ms": round(reload["quiet_max_ms"], 1),
    }


def lines(env: Env, reload: dict[str, Any]) -> list[str]:
    lines = ["", "### 9. A config reload under load (SIGHUP, one busy kept-alive connection)", ""]
    if not reload:
        return [*lines, "Skipped (not asked for)."]
    lines += [
        f"The gateway serves a config of {reload['callers']} callers (half by key, half by key_sha256). One "
        "kept-alive connection asks for a cached batch, one request at a time, each as soon as the last is "
        f"answered; {BEFORE_S:g} s in, SIGHUP reloads the same file. Stall: the longest gap between consecutive "
        f"answers from the SIGHUP until /metrics counts the reload done, and {AFTER_S:g} s more; quiet: the longest "
        f"gap in the {BEFORE_S:g} s before the SIGHUP. The key is the median of {len(reload['rounds'])} reload(s).",
        "",
        "| reload | stall ms | quiet longest gap ms | quiet median gap ms | reload counted done after s | answers |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    return lines + [
        f"| {n} | {r['stall_ms']:.1f} | {r['quiet_max_ms']:.2f} | {r['quiet_p50_ms']:.3f} | {r['done_s']:.3f} | "
        f"{r['answers']} |"
        for n, r in enumerate(reload["rounds"], start=1)
    ]
