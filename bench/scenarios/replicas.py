"""Scenario 8: replicas sharing one Redis (docs/design.md §10).

The lifecycle workload of scenario 2 through 3 gateway processes sharing one redis-server (Debian's, started here
on a free port, no persistence), through 3 without Redis and through 1, at once; then the 3 on Redis again with
Redis killed for a few seconds in the middle; then cache hits of one process with ``redis.url`` against one without.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import aiohttp
import uvloop

from bench.harness import Env, Proc, fmt, log, start_together
from bench.scenarios.hits import TABLE_HEAD, compare_hits, table_row
from bench.scenarios.upstream import ideal_times, lifecycle

TITLE = "scenario 8: replicas on Redis"
REPLICAS = 3
HIT_LOCAL, HIT_REDIS = "without redis.url", "with redis.url"


@dataclass(frozen=True)
class ReplicaRun:
    """One set-up of scenario 8: gateway processes on their own namespace of the simulator, on Redis or not."""

    label: str
    ns: str
    processes: int
    on_redis: bool


# Run at once, each on its own namespace: the same batches with the same lifecycles, under the same load.
REPLICA_RUNS = {
    "redis": ReplicaRun(f"{REPLICAS} replicas, one Redis", "rep-redis", REPLICAS, True),
    "no_redis": ReplicaRun(f"{REPLICAS} replicas, no Redis", "rep-local", REPLICAS, False),
    "one": ReplicaRun("1 process", "rep-one", 1, False),
}
# Then alone: the same replicas on Redis again, on batches they have never seen, with Redis killed in the middle.
OUTAGE_RUN = replace(REPLICA_RUNS["redis"], label=f"{REPLICAS} replicas, Redis killed in the middle")


def redis_url(redis: Proc) -> str:
    return f"{redis.url.replace('http://', 'redis://', 1)}/0"


def replica_starters(env: Env, run: ReplicaRun, redis: Proc, named: str | None = None) -> list[Callable[[], Proc]]:
    """Each replica (``named``-0, -1...) with its own store file (replicas on different hosts share none), and the
    shared Redis if ``run`` is on it, under a key prefix of its set-up's own, so that no set-up finds another's
    entries."""
    starters: list[Callable[[], Proc]] = []
    base = named or f"gateway-{run.ns}"
    for n in range(run.processes):
        name = f"{base}-{n}"
        sections: dict[str, Any] = {"store": {"path": str(env.workdir / f"{name}.db")}}
        if run.on_redis:
            sections["redis"] = {"url": redis_url(redis), "key_prefix": f"bench-{base}:"}
        starters.append(partial(env.start_gateway, name, run.ns, sections=sections))
    return starters


def replica_rows(measured: dict[str, Any], runs: dict[str, ReplicaRun]) -> dict[str, dict[str, Any]]:
    """Each run's upstream calls (counted by the simulator), its ideal, and its pollers' polls and failures."""
    return {
        key: {
            "label": run.label,
            "processes": run.processes,
            "on_redis": run.on_redis,
            "calls": measured["details"][key]["calls"],
            "ideal": len(ideal_times(measured["details"][key])),
            "polls": measured["polls"][key],
            "failures": measured["failures"][key],
            "failure_kinds": measured["failure_kinds"][key],
        }
        for key, run in runs.items()
    }


@dataclass
class RedisOutage:
    """Redis killed (SIGKILL) in the middle of a lifecycle run, then started again, empty, on the same port."""

    env: Env
    redis: Proc
    seconds: float
    killed_s: float = math.nan  # seconds since the pollers started
    restarted_s: float = math.nan
    listening_s: float = math.nan

    async def __call__(self, start: float, end: float) -> None:
        await asyncio.sleep(max(0.0, start + (end - start - self.seconds) / 2 - time.monotonic()))
        port = int(self.redis.url.rpartition(":")[2])
        # In a thread: the pollers keep their pace while processes are killed and started.
        await asyncio.to_thread(self.env.procs.kill, self.redis)
        self.killed_s = time.monotonic() - start
        await asyncio.sleep(self.seconds)
        self.restarted_s = time.monotonic() - start
        self.redis = await asyncio.to_thread(self.env.start_redis, "redis-restarted", port)
        self.listening_s = time.monotonic() - start


def measure(env: Env) -> dict[str, Any]:
    """The 3 replicas on one Redis, 3 without and 1 process; the 3 on Redis again with Redis killed in the middle;
    then hits of one process with redis.url against one without."""
    if env.redis is None:
        env.notes.append("scenario 8 (replicas) skipped: redis-server is not installed")
        return {}
    mode = env.mode
    headers = {"Authorization": f"Bearer {env.key}"}
    redis = env.start_redis("redis")
    starters = {key: replica_starters(env, run, redis) for key, run in REPLICA_RUNS.items()}
    started = iter(start_together([start for group in starters.values() for start in group]))
    groups = {key: [next(started) for _ in group] for key, group in starters.items()}
    targets = {key: (REPLICA_RUNS[key].ns, tuple(p.url for p in procs), headers) for key, procs in groups.items()}
    log(f"replicas: {mode.pollers} pollers x {len(targets)} set-ups for {mode.window_s:g} s")
    rows = replica_rows(uvloop.run(lifecycle(env, targets)), REPLICA_RUNS)
    kinds = {key: [uvloop.run(calls_by_kind(p.url)) for p in procs] for key, procs in groups.items()}
    env.procs.stop_together(groups["no_redis"])
    before = [uvloop.run(redis_transitions(p.url)) for p in groups["redis"]]

    outage = RedisOutage(env, redis, mode.outage_s)
    log(f"replicas: again on new batches, Redis killed for {mode.outage_s:g} s in the middle of {mode.window_s:g} s")
    again = {"outage": targets["redis"]}
    rows |= replica_rows(uvloop.run(lifecycle(env, again, fault=outage, prefix="again")), {"outage": OUTAGE_RUN})
    after = [uvloop.run(redis_transitions(p.url)) for p in groups["redis"]]
    since = [uvloop.run(calls_by_kind(p.url)) for p in groups["redis"]]
    kinds["outage"] = [{k: n[k] - b[k] for k in n} for n, b in zip(since, kinds["redis"], strict=True)]
    for key, row in rows.items():
        row["kinds"] = kinds[key]
    seen = [{event: a[event] - b[event] for event in a} for a, b in zip(after, before, strict=True)]
    calls = ", ".join(f"{row['label']} {row['calls']}" for row in rows.values())
    log(f"replicas: upstream calls: {calls}; failed polls with Redis killed: {rows['outage']['failures']}")

    env.procs.stop_together(groups["redis"] + groups["one"])
    hits = replica_hits(env, outage.redis)
    env.procs.stop(outage.redis)
    timing = {"seconds": mode.outage_s, "killed_s": outage.killed_s, "restarted_s": outage.restarted_s}
    felt = {"seen": seen, "seen_before": before}
    return {"runs": rows, "outage": {**timing, "listening_s": outage.listening_s, **felt}, "hits": hits}


async def redis_transitions(url: str) -> dict[str, int]:
    """How many times a gateway saw Redis lost and regained (its /metrics): proof that the outage was felt."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as r:
        text = await r.text()
    found = re.findall(r'^gateway_redis_transitions_total\{event="(\w+)"\}\s+([\d.e+]+)$', text, re.MULTILINE)
    return {"lost": 0, "regained": 0} | {event: int(float(n)) for event, n in found}


# What each process's /metrics says of its upstream calls: the follower's list and retrieve calls, and the rest
# (its callers' misses: retrieves).
KINDS = ("follower_list", "follower_retrieve", "callers")


async def calls_by_kind(url: str) -> dict[str, int]:
    """One process's upstream calls so far, by kind (``KINDS``), from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as r:
        text = await r.text()

    def total(name: str, labels: str = "") -> int:
        found = re.findall(rf"^{name}\{{{labels}[^}}]*\}}\s+([\d.e+]+)$", text, re.MULTILINE)
        return int(sum(float(n) for n in found))

    follower = {kind: total("gateway_follow_calls_total", f'kind="{kind}"') for kind in ("list", "retrieve")}
    everything = total("gateway_upstream_calls_total")
    rest = everything - sum(follower.values())
    return {"follower_list": follower["list"], "follower_retrieve": follower["retrieve"], "callers": rest}


def kinds_cell(kinds: list[dict[str, int]]) -> str:
    """``lists / follower retrieves / callers' calls (per process)``, summed over a set-up's processes."""
    sums = [sum(k[kind] for k in kinds) for kind in KINDS]
    per_process = ", ".join(str(sum(k.values())) for k in kinds)
    return " / ".join(map(str, sums)) + (f" ({per_process})" if len(kinds) > 1 else "")


def replica_hits(env: Env, redis: Proc) -> dict[str, Any]:
    """Cache hits of a fresh process with redis.url set against a fresh one without, alike but for that, alternated
    (a fresh hit in a process's own memory does not touch Redis, docs/design.md §10)."""
    if env.wrk is None:
        env.notes.append("scenario 8: hits with redis.url not measured: wrk is not installed")
        return {}
    starters = [
        replica_starters(env, ReplicaRun(label, "hit", 1, on_redis), redis, f"gateway-hit-{tag}")[0]
        for label, on_redis, tag in ((HIT_LOCAL, False, "local"), (HIT_REDIS, True, "redis"))
    ]
    contenders = dict(zip((HIT_LOCAL, HIT_REDIS), start_together(starters), strict=True))
    return compare_hits(env, contenders, env.key, "replicas: hits")


def keys(replicas: dict[str, Any]) -> dict[str, Any]:
    """Upstream calls of the 3 replicas (on Redis, then without) over those of 1 process; failed polls while Redis
    was killed; hits with redis.url over hits without."""
    rows, hits = replicas["runs"], replicas["hits"]
    one = rows["one"]["calls"]
    out: dict[str, Any] = {
        "replica_amplification": round(rows["redis"]["calls"] / one, 3) if one else None,
        "replica_amplification_no_redis": round(rows["no_redis"]["calls"] / one, 3) if one else None,
        "redis_outage_failed_polls": rows["outage"]["failures"],
        "replica_upstream_calls": {key: row["calls"] for key, row in rows.items()},
        "hit_rps_redis_vs_local": None,
    }
    if hits:
        out["hit_rps_redis_vs_local"] = round(hits["ratio"], 3)
        out["hit_rps_redis"] = round(hits["table"][HIT_REDIS]["rps"])
        out["hit_rps_local"] = round(hits["table"][HIT_LOCAL]["rps"])
    return out


def counts(seen: list[dict[str, int]], event: str) -> str:
    return ", ".join(str(n[event]) for n in seen)


def lines(env: Env, replicas: dict[str, Any]) -> list[str]:
    lines = ["", f"### 8. {REPLICAS} replicas sharing one Redis (docs/design.md §10)", ""]
    if not replicas:
        return [*lines, "Skipped (redis-server is not installed, or not asked for)."]
    mode, rows, outage = env.mode, replicas["runs"], replicas["outage"]
    lines += [
        f"The lifecycle workload of section 2 ({mode.pollers} pollers, {mode.batches} batches, a poll every "
        f"{mode.poll_interval_s:g} s for {mode.window_s:g} s) through each set-up; the first three at once, each on "
        f"its own namespace of the simulator. Poller n keeps to process n mod {REPLICAS} (a load balancer's round "
        "robin), so every batch is polled through every process. The replicas on Redis share one redis-server "
        "(Debian's, no persistence). Then the same replicas on Redis again, alone, on batches they had never seen: "
        f"Redis was killed (SIGKILL) {outage['killed_s']:.1f} s after the pollers started and started again, empty, "
        f"on the same port {outage['seconds']:g} s later (listening at {outage['listening_s']:.1f} s). In that run "
        f"the replicas' /metrics counted Redis lost {counts(outage['seen'], 'lost')} time(s) and regained "
        f"{counts(outage['seen'], 'regained')} (in the first run, Redis up all along: lost "
        f"{counts(outage['seen_before'], 'lost')}). A failed poll: any answer but 2xx or 304, or none within 10 s.",
        "",
        "The calls by kind, from the processes' own /metrics (they count each try, as the simulator does): the "
        "follower's list calls / the follower's retrieves / the callers' misses, and in brackets each process's calls.",
        "",
        "| set-up | processes | upstream calls | by kind | vs 1 process | vs ideal | polls served | failed polls |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    one = rows["one"]["calls"]
    for row in rows.values():
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(row["failure_kinds"].items()))
        lines.append(
            f"| {row['label']} | {row['processes']} | {row['calls']} | {kinds_cell(row['kinds'])} | "
            f"{fmt(row['calls'] / one if one else None, 3)} | "
            f"{fmt(row['calls'] / row['ideal'] if row['ideal'] else None, 3)} | {row['polls']} | "
            f"{row['failures']}{f' ({kinds})' if kinds else ''} |"
        )
    return lines + hits_lines(env, replicas["hits"])


def hits_lines(env: Env, hits: dict[str, Any]) -> list[str]:
    if not hits:
        return ["", "Cache hits with redis.url: not measured (wrk is not installed)."]
    lines = [
        "",
        f"Cache hits, then, of two fresh processes alike but for redis.url (on the restarted Redis), the others "
        f"stopped: wrk on one id, terminal and cached, {hits['connections']} connections, {env.mode.hit_rounds} "
        f"round(s) of {env.mode.hit_seconds} s, alternated:",
        "",
        *TABLE_HEAD,
    ]
    lines += [table_row(name, row) for name, row in hits["table"].items()]
    return [*lines, "", f"Ratio (with over without, median of the rounds' ratios): {hits['ratio']:.3f}."]
