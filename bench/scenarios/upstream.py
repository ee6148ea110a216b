"""Scenario 2: upstream calls on a lifecycle workload.

Pollers poll batches that run to COMPLETED or FAILED at random times, through the gateway, through nginx and
directly; the simulator counts each one's upstream calls, against the ideal cache's. ``lifecycle`` is the workload
itself, which scenario 8 runs again through replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop

from bench.harness import TTL_ACTIVE_S, Env, log
from bench.modes import Mode

TITLE = "scenario 2: upstream amplification"
# A lifecycle target: its simulator namespace, the servers its pollers are spread over (poller n keeps to server
# n mod their number, as a load balancer spreads connections round-robin), and the headers the pollers send.
Target = tuple[str, tuple[str, ...], dict[str, str]]
TIMEOUT = aiohttp.ClientTimeout(total=10)


def lifecycle_ids(count: int, prefix: str = "life") -> list[str]:
    # Every tenth batch ends FAILED rather than COMPLETED (the Simulator's rule for ids with "fail").
    return [f"{prefix}-fail-{i:03d}" if i % 10 == 9 else f"{prefix}-{i:03d}" for i in range(count)]


def ideal_calls(first_seen: float, span_s: float, end: float, ttl_s: float) -> list[float]:
    """The ideal cache's upstream calls for one batch, up to ``end``.

    One call per active-TTL window while the batch is active (so no answer is
    staler than the TTL), and one more, at the next window, that finds it
    terminal; after that, nothing.
    """
    calls = []
    t = first_seen
    while t <= end:
        calls.append(t)
        if t >= first_seen + span_s:
            break
        t += ttl_s
    return calls


def ideal_times(details: dict[str, Any]) -> list[float]:
    """The ideal cache's upstream calls (simulator clock), from the batches' real lifecycles in one namespace."""
    times: list[float] = []
    for batch_id, first in details["first_seen"].items():
        times += ideal_calls(first, details["span_s"][batch_id], details["now"], TTL_ACTIVE_S)
    return sorted(times)


def poll_failed(status: int) -> bool:
    """An answer that is not the batch: anything but 2xx or 304 (no answer at all is a failed poll too)."""
    return not (200 <= status < 300 or status == 304)


@dataclass
class Workload:
    """One lifecycle run under way: its window, and what the pollers and the sampler saw, by target."""

    mode: Mode
    sim_url: str
    targets: dict[str, Target]
    start: float
    end: float
    polls: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    failure_kinds: dict[str, dict[str, int]] = field(default_factory=dict)
    timeline: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.polls = dict.fromkeys(self.targets, 0)
        self.failures = dict.fromkeys(self.targets, 0)
        self.failure_kinds = {name: {} for name in self.targets}

    async def poller(self, name: str, base: str, headers: dict[str, str], batch_id: str, phase: float) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
            next_at = self.start + phase
            while True:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                if time.monotonic() >= self.end:
                    return
                kind = None
                try:
                    async with session.get(f"{base}/v2/batches/{batch_id}", headers=headers) as r:
                        await r.read()
                        self.polls[name] += 1
                        kind = str(r.status) if poll_failed(r.status) else None
                except (aiohttp.ClientError, TimeoutError) as error:
                    kind = type(error).__name__
                if kind is not None:
                    self.failures[name] += 1
                    self.failure_kinds[name][kind] = self.failure_kinds[name].get(kind, 0) + 1
                # A late poller does not burst to catch up: it keeps its pace from now.
                next_at = max(next_at + self.mode.poll_interval_s, time.monotonic())

    async def sampler(self, control: aiohttp.ClientSession) -> None:
        """Every target's upstream calls so far, every 0.5 s (the chart's lines)."""
        while time.monotonic() < self.end + 0.5:
            counts = {}
            for name, (ns, _bases, _headers) in self.targets.items():
                async with control.get(f"{self.sim_url}/_bench/stats", params={"ns": ns}) as r:
                    counts[name] = (await r.json())["calls"]
            self.timeline.append((time.monotonic() - self.start, counts))
            await asyncio.sleep(0.5)


async def lifecycle(
    env: Env,
    targets: dict[str, Target],
    fault: Callable[[float, float], Awaitable[None]] | None = None,
    prefix: str = "life",
) -> dict[str, Any]:
    """Pollers against every target at once; the simulator counts each target's upstream calls.

    ``fault(start, end)``, if given, runs alongside the pollers (scenario 8 kills Redis with it); ``prefix``
    names the batches (another prefix: batches the targets have never seen).
    """
    mode = env.mode
    assert env.sim is not None
    sim_url = env.sim.url
    ids = lifecycle_ids(mode.batches, prefix)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0)) as control:
        for ns, _bases, _headers in targets.values():
            async with control.post(f"{sim_url}/_bench/reset", params={"ns": ns}) as r:
                r.raise_for_status()
        start = time.monotonic()
        run = Workload(mode, sim_url, targets, start, start + mode.window_s)
        tasks = [asyncio.ensure_future(run.sampler(control))]
        if fault is not None:
            tasks.append(asyncio.ensure_future(fault(start, run.end)))
        for name, (_ns, bases, headers) in targets.items():
            for p in range(mode.pollers):
                phase = (p * 0.6180339887) % 1.0 * mode.poll_interval_s
                poller = run.poller(name, bases[p % len(bases)], headers, ids[p % len(ids)], phase)
                tasks.append(asyncio.ensure_future(poller))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=mode.window_s + 30)
        details = {}
        for name, (ns, _bases, _headers) in targets.items():
            async with control.get(f"{sim_url}/_bench/stats", params={"ns": ns, "detail": "1"}) as r:
                details[name] = await r.json()
    return {
        "timeline": run.timeline,
        "details": details,
        "polls": run.polls,
        "failures": run.failures,
        "failure_kinds": run.failure_kinds,
        "start": start,
    }


def measure(env: Env) -> dict[str, Any]:
    assert env.sim is not None
    gateway = env.start_gateway("gateway-life", "gw")
    headers = {"Authorization": f"Bearer {env.key}"}
    targets: dict[str, Target] = {"gateway": ("gw", (gateway.url,), headers)}
    nginx = None
    if env.nginx is not None:
        nginx = env.start_nginx("nginx-life", "nginx")
        targets["nginx"] = ("nginx", (nginx.url,), headers)
    targets["direct"] = ("direct", (f"{env.sim.url}/direct",), {"Authorization": f"Bearer {env.token}"})
    log(f"lifecycle: {env.mode.pollers} pollers x {len(targets)} targets for {env.mode.window_s:g} s")
    result = uvloop.run(lifecycle(env, targets))
    env.procs.stop(gateway)
    if nginx is not None:
        env.procs.stop(nginx)
    # The ideal, from the batches' real lifecycles as the gateway's namespace saw them.
    ideal = ideal_times(result["details"]["gateway"])
    result["ideal_times"] = [t - result["start"] for t in ideal]
    result["mode"] = env.mode
    result["ideal"] = len(ideal)
    result["calls"] = {name: d["calls"] for name, d in result["details"].items()}
    return result


def keys(life: dict[str, Any]) -> dict[str, Any]:
    calls = life["calls"]
    return {
        "upstream_amplification": round(calls["gateway"] / life["ideal"], 3),
        "upstream_calls_vs_nginx": round(calls["gateway"] / calls["nginx"], 3) if "nginx" in calls else None,
        "upstream_calls": {**calls, "ideal": life["ideal"]},
    }


def lines(env: Env, life: dict[str, Any]) -> list[str]:
    lines = ["", "### 2. Upstream calls on a lifecycle workload", ""]
    if not life:
        return [*lines, "Skipped (not asked for)."]
    mode = env.mode
    lines += [
        f"{mode.pollers} pollers per contender poll {mode.batches} batches every {mode.poll_interval_s:g} s for "
        f"{mode.window_s:g} s; each batch is active for 50-100% of {mode.lifetime_s:g} s from its first poll, "
        f"then COMPLETED or FAILED. Active TTL {TTL_ACTIVE_S:g} s (nginx: a fixed {TTL_ACTIVE_S:g} s for every "
        "answer). Ideal: per batch, one call per active-TTL window while active, plus one.",
        "",
        "| contender | upstream calls | vs ideal | polls served | failed polls |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, calls in life["calls"].items():
        lines.append(
            f"| {name} | {calls} | {calls / life['ideal']:.3f} | {life['polls'][name]} | {life['failures'][name]} |"
        )
    return [*lines, f"| ideal | {life['ideal']} | 1.000 | | |"]
