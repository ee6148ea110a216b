"""Scenario 7: time to notice a change (docs/design.md §9): from a batch changing upstream to its waiting caller
holding the new state.

nginx runs first, then the gateway with polling callers, then with long-poll callers, each alone on a fresh
simulator namespace whose batches complete at scheduled moments; the gateways run at nginx's upstream call rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import uvloop

from bench.harness import TTL_ACTIVE_S, Env, Proc, log, percentile
from bench.modes import Mode

TITLE = "scenario 7: time to notice"
NOTICE_POLL_S = 0.5  # the polling callers' interval (nginx and the gateway with plain polling)
NOTICE_WAIT_S = 25  # the long-poll callers' Prefer: wait=N
NOTICE_GRACE_S = 15.0  # after the last change, how long callers may still take to notice it
NOTICE_MAX_REQUESTS = 10_000  # per caller: a bound on any loop that goes wrong
NOTICE_SEED = 9  # the same completion moments for every contender, and in every run
# What each caller counts (NoticeCaller's fields), summed over the callers of a round.
COUNTED = ("requests", "not_modified", "failures", "without_etag", "waits_applied")
NOTICE_CONTENDERS = ("nginx", "gateway (polling)", "gateway (long-poll)")
TERMINAL_STATUSES = frozenset({"BATCH_STATUS_COMPLETED", "BATCH_STATUS_FAILED", "BATCH_STATUS_CANCELED"})
# The §9 settings of the long-poll gateway, at their documented defaults, written out.
NOTICE_CACHE_SETTINGS: dict[str, Any] = {"max_wait_s": 55, "max_waiters": 10_000}
NOTICE_TTL_SETTINGS: dict[str, Any] = {"active_min": 1, "active_max": 60}


def notice_schedule(mode: Mode) -> dict[str, float]:
    """Batch id -> seconds after the callers start at which it completes upstream (uniform over the window)."""
    pick = random.Random(NOTICE_SEED)
    return {f"notice-{n:03d}": round(pick.uniform(1.0, mode.notice_window_s), 3) for n in range(mode.notice_batches)}


@dataclass
class NoticeCaller:
    """What one caller saw: when it held the terminal state (local monotonic time), and how it got there."""

    noticed_at: float | None = None
    requests: int = 0
    not_modified: int = 0
    failures: int = 0
    without_etag: int = 0
    waits_applied: int = 0


def _terminal_in(body: bytes) -> bool:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return json.loads(body)["batch"]["status"] in TERMINAL_STATUSES
    return False


async def poll_until_terminal(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], deadline: float, seen: NoticeCaller
) -> None:
    """Plain polling: a GET every NOTICE_POLL_S (no catching up) until the answer is terminal."""
    next_at = time.monotonic()
    while time.monotonic() < deadline and seen.requests < NOTICE_MAX_REQUESTS:
        seen.requests += 1
        try:
            async with session.get(url, headers=headers) as r:
                body = await r.read()
                if r.status == 200 and _terminal_in(body):
                    seen.noticed_at = time.monotonic()
                    return
                seen.failures += r.status != 200
        except (aiohttp.ClientError, TimeoutError):
            seen.failures += 1
        next_at = max(next_at + NOTICE_POLL_S, time.monotonic())
        await asyncio.sleep(next_at - time.monotonic())


async def wait_until_terminal(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], deadline: float, seen: NoticeCaller
) -> None:
    """Long-poll: one request at a time with ``Prefer: wait`` and ``If-None-Match`` of the answer it holds.

    304 means no change within the wait: ask again at once. 200 is the new
    answer (and its ETag). Anything that did not wait (no ETag, no
    Preference-Applied, an error) is followed by a NOTICE_POLL_S pause, so a
    gateway without §9 is polled, never hammered.
    """
    etag: str | None = None
    while time.monotonic() < deadline and seen.requests < NOTICE_MAX_REQUESTS:
        seen.requests += 1
        sent = {**headers, "Prefer": f"wait={NOTICE_WAIT_S}"}
        if etag is not None:
            sent["If-None-Match"] = etag
        waited = False
        try:
            async with session.get(url, headers=sent) as r:
                body = await r.read()
                waited = "Preference-Applied" in r.headers
                seen.waits_applied += waited
                if r.status == 304:
                    seen.not_modified += 1
                    etag = r.headers.get("ETag", etag)
                elif r.status == 200:
                    if _terminal_in(body):
                        seen.noticed_at = time.monotonic()
                        return
                    etag = r.headers.get("ETag")
                    seen.without_etag += etag is None
                else:
                    seen.failures += 1
                    waited = False
        except (aiohttp.ClientError, TimeoutError):
            seen.failures += 1
        if not (waited and etag is not None):
            await asyncio.sleep(NOTICE_POLL_S)


async def schedule_changes(
    control: aiohttp.ClientSession, sim_url: str, ns: str, schedule: dict[str, float]
) -> tuple[float, dict[str, float]]:
    """A fresh namespace with the changes scheduled: when the callers start, and when each batch changes (both on
    this process's monotonic clock)."""
    async with control.post(f"{sim_url}/_bench/reset", params={"ns": ns}) as r:
        r.raise_for_status()
    before = time.monotonic()
    async with control.post(f"{sim_url}/_bench/schedule", params={"ns": ns}, json={"complete_in": schedule}) as r:
        r.raise_for_status()
        scheduled = await r.json()
    start = (before + time.monotonic()) / 2
    # The simulator's clock time -> this process's, within half a round trip (both are monotonic clocks).
    return start, {b: start + (at - scheduled["now"]) for b, at in scheduled["complete_at"].items()}


async def run_callers(
    base: str, headers: dict[str, str], long_poll: bool, batch_ids: list[str], deadline: float
) -> dict[str, NoticeCaller]:
    """One caller per batch, polling or long-polling until it holds the terminal state or the deadline passes."""
    callers = {batch_id: NoticeCaller() for batch_id in batch_ids}
    per_request_s = NOTICE_WAIT_S + 10 if long_poll else 10
    loop = wait_until_terminal if long_poll else poll_until_terminal

    async def caller(batch_id: str, phase: float) -> None:
        await asyncio.sleep(phase)
        connector = aiohttp.TCPConnector(limit=1)
        client_timeout = aiohttp.ClientTimeout(total=per_request_s)
        async with aiohttp.ClientSession(timeout=client_timeout, connector=connector) as session:
            url = f"{base}/v2/batches/{batch_id}"
            with contextlib.suppress(TimeoutError):
                # The deadline also ends a long poll in flight.
                remaining = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(loop(session, url, headers, deadline, callers[batch_id]), remaining)

    # Callers arrive spread over one poll interval, as independent pollers would.
    phases = [(n * 0.6180339887) % 1.0 * NOTICE_POLL_S for n in range(len(batch_ids))]
    await asyncio.wait_for(
        asyncio.gather(*(caller(b, p) for b, p in zip(batch_ids, phases, strict=True))),
        timeout=deadline - time.monotonic() + per_request_s + 5,
    )
    return callers


async def notice_round(
    env: Env, ns: str, base: str, headers: dict[str, str], long_poll: bool, schedule: dict[str, float]
) -> dict[str, Any]:
    """One contender on a fresh simulator namespace: schedule the changes, run one caller per batch until it notices."""
    assert env.sim is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as control:
        start, changed = await schedule_changes(control, env.sim.url, ns, schedule)
        deadline = start + max(schedule.values()) + NOTICE_GRACE_S
        callers = await run_callers(base, headers, long_poll, list(schedule), deadline)
        ended = max((c.noticed_at for c in callers.values() if c.noticed_at is not None), default=time.monotonic())
        async with control.get(f"{env.sim.url}/_bench/stats", params={"ns": ns}) as r:
            calls = (await r.json())["calls"]
    delays = {b: (c.noticed_at - changed[b]) if c.noticed_at is not None else None for b, c in callers.items()}
    # An unnoticed change counts with the delay it had reached at the deadline: a lower bound, never left out.
    bounded = [d if d is not None else deadline - changed[b] for b, d in delays.items()]
    return {
        "delays": delays,
        "p50_s": percentile(bounded, 50),
        "p99_s": percentile(bounded, 99),
        "mean_s": statistics.fmean(bounded),
        "unnoticed": sum(d is None for d in delays.values()),
        "calls": calls,
        "duration_s": ended - start,
        "calls_per_s": calls / max(ended - start, 1e-9),
        **{counted: sum(getattr(c, counted) for c in callers.values()) for counted in COUNTED},
    }


async def probe_long_poll(url: str, key: str) -> tuple[str | None, str | None]:
    """One ``Prefer: wait=1`` request: the gateway's ETag and Preference-Applied, if it sends them."""
    headers = {"Authorization": f"Bearer {key}", "Prefer": "wait=1"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.get(f"{url}/v2/batches/notice-probe", headers=headers) as r,
    ):
        await r.read()
        return r.headers.get("ETag"), r.headers.get("Preference-Applied")


def start_long_poll_gateway(env: Env, budget: tuple[float, int]) -> Proc | None:
    """The gateway with §9's settings; without them if this gateway does not know them yet; None if it fails."""
    for cache in ({**NOTICE_CACHE_SETTINGS, "ttl_s": NOTICE_TTL_SETTINGS}, None):
        try:
            return env.start_gateway("gateway-notice-wait", "notice-wait", budget=budget, cache=cache)
        except RuntimeError as error:
            log(f"notice: the long-poll gateway did not start{' with the §9 settings' if cache else ''}: {error}")
            if cache is not None:
                env.notes.append(
                    "time to notice: this gateway refuses the §9 config keys (cache.max_wait_s, cache.max_waiters, "
                    "cache.ttl_s.active_min/active_max); the long-poll contender ran at their defaults"
                )
    return None


def nginx_round(
    env: Env, schedule: dict[str, float], headers: dict[str, str]
) -> tuple[dict[str, Any] | None, float, str]:
    """nginx's round (None without nginx), and the upstream call rate the gateways get: nginx's, and whence."""
    if env.nginx is None:
        env.notes.append("time to notice: nginx is not installed; the gateway's budget is one call per batch per 5 s")
        return None, len(schedule) / TTL_ACTIVE_S, "one call per batch per active TTL (nginx is not installed)"
    nginx = env.start_nginx("nginx-notice", "notice-nginx")
    log(f"notice: nginx, {len(schedule)} callers polling every {NOTICE_POLL_S:g} s")
    measured = uvloop.run(notice_round(env, "notice-nginx", nginx.url, headers, False, schedule))
    env.procs.stop(nginx)
    return measured, measured["calls_per_s"], "nginx's upstream call rate in this set-up"


def long_poll_round(
    env: Env, schedule: dict[str, float], headers: dict[str, str], budget: tuple[float, int]
) -> dict[str, Any] | None:
    """The long-poll gateway's round; None if it did not start or sent no ETag (docs/design.md §9 not in this build)."""
    waiting = start_long_poll_gateway(env, budget)
    if waiting is None:
        return None
    measured = None
    etag, applied = uvloop.run(probe_long_poll(waiting.url, env.key))
    if etag is None:
        env.notes.append(
            "time to notice: the gateway sent no ETag (docs/design.md §9 is not in this build): "
            "the long-poll contender was not run and its figures are null"
        )
    else:
        log(f"notice: gateway, {len(schedule)} long-poll callers (Prefer: wait={NOTICE_WAIT_S}; probe: {applied})")
        measured = uvloop.run(notice_round(env, "notice-wait", waiting.url, headers, True, schedule))
    env.procs.stop(waiting)
    return measured


def measure(env: Env) -> dict[str, Any]:
    schedule = notice_schedule(env.mode)
    headers = {"Authorization": f"Bearer {env.key}"}
    results: dict[str, dict[str, Any] | None] = dict.fromkeys(NOTICE_CONTENDERS)
    # nginx first: its upstream call rate in this set-up is the gateway's budget.
    results["nginx"], rate, budget_from = nginx_round(env, schedule, headers)
    # Rounded down, so never above nginx's rate; the burst lets every batch's first fetch through at once,
    # as nginx's own first fetches go.
    budget = (max(0.1, math.floor(rate * 100) / 100), len(schedule))
    log(f"notice: gateway budget {budget[0]:g} calls/s, burst {budget[1]} ({budget_from})")
    polling = env.start_gateway("gateway-notice-poll", "notice-poll", budget=budget)
    log(f"notice: gateway, {len(schedule)} callers polling every {NOTICE_POLL_S:g} s")
    results["gateway (polling)"] = uvloop.run(notice_round(env, "notice-poll", polling.url, headers, False, schedule))
    env.procs.stop(polling)
    results["gateway (long-poll)"] = long_poll_round(env, schedule, headers, budget)
    return {
        "contenders": results,
        "budget": {"requests_per_s": budget[0], "burst": budget[1], "from": budget_from},
        "batches": len(schedule),
        "window_s": env.mode.notice_window_s,
    }


def keys(notice: dict[str, Any]) -> dict[str, Any]:
    """Null for a contender that did not run (nginx missing, or a gateway without §9)."""
    by = notice["contenders"]
    suffixes = {"gateway (long-poll)": "", "gateway (polling)": "_polling", "nginx": "_nginx"}
    out: dict[str, Any] = {}
    for name, suffix in suffixes.items():
        row = by.get(name)
        out[f"notice_p50_s{suffix}"] = round(row["p50_s"], 3) if row else None
        out[f"notice_p99_s{suffix}"] = round(row["p99_s"], 3) if row else None
        out[f"notice_calls{suffix}"] = row["calls"] if row else None
        out[f"notice_unnoticed{suffix}"] = row["unnoticed"] if row else None
    wait, nginx = by.get("gateway (long-poll)"), by.get("nginx")
    out["notice_p50_vs_nginx"] = out["notice_calls_vs_nginx"] = None
    if wait is not None and nginx is not None:
        out["notice_p50_vs_nginx"] = round(wait["p50_s"] / nginx["p50_s"], 3)
        out["notice_calls_vs_nginx"] = round(wait["calls"] / nginx["calls"], 3)
    out["notice_budget_per_s"] = notice["budget"]["requests_per_s"]
    out["notice_batches"] = notice["batches"]
    return out


def lines(env: Env, notice: dict[str, Any]) -> list[str]:
    lines = ["", "### 7. Time to notice a change (docs/design.md §9)", ""]
    if not notice:
        return [*lines, "Skipped (not asked for)."]
    budget = notice["budget"]
    lines += [
        f"{notice['batches']} batches stay IN_PROGRESS upstream, each until its own moment, uniform over the first "
        f"{notice['window_s']:g} s (fixed seed: the same moments for every contender), then COMPLETED; one caller per "
        "batch until it holds COMPLETED. Each contender runs alone, on a fresh simulator. **nginx** (fixed "
        f"{TTL_ACTIVE_S:g} s TTL) and **gateway (polling)** (active TTL {TTL_ACTIVE_S:g} s): callers GET every "
        f"{NOTICE_POLL_S:g} s. **gateway (long-poll)**: callers send `Prefer: wait={NOTICE_WAIT_S}` with "
        "`If-None-Match` of the answer they hold, one request at a time. Delay: from the moment the simulator "
        "changed the batch to the moment its caller received the answer that shows it. Both gateways run on the "
        f"same upstream budget: {budget['requests_per_s']:g} calls/s, burst {budget['burst']} ({budget['from']}). "
        "A change not noticed by the end counts with the delay it had reached then.",
        "",
        "| contender | delay p50 s | delay p99 s | mean s | not noticed | upstream calls | calls/s | requests "
        "| 304s | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in notice["contenders"].items():
        if row is None:
            lines.append(f"| {name} | n/a | n/a | n/a | | | | | | |")
            continue
        lines.append(
            f"| {name} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['mean_s']:.2f} | {row['unnoticed']} | "
            f"{row['calls']} | {row['calls_per_s']:.2f} | {row['requests']} | {row['not_modified']} | "
            f"{row['failures']} |"
        )
    return lines
