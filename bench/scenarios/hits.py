"""Scenario 1: cache-hit throughput and latency, wrk against every contender in turn.

The gateway (access log on and off; a candidate install too with ``--candidate-python``), the framework ceiling and
nginx, alternated round by round at each connection count. ``compare_hits`` is the same measure for two gateways
alike but for one setting (scenarios 5 and 8).
"""

from __future__ import annotations

import statistics
from typing import Any

import aiohttp
import uvloop

from bench.harness import HIT_BATCH_ID, Env, Proc, fmt, log, round_or_none, run_wrk

TITLE = "scenario 1: cache hits"
Samples = dict[tuple[str, int], list[dict[str, float]]]


def measure(env: Env) -> dict[str, Any]:
    if env.wrk is None:
        env.notes.append("scenario 1 (cache hits) skipped: wrk is not installed")
        return {}
    contenders, body = start_contenders(env)
    urls = {name: f"{p.url}/v2/batches/{HIT_BATCH_ID}" for name, p in contenders.items()}
    check_and_warm(env, urls, env.key, env.mode.connections[0])
    samples: Samples = {}
    names = list(urls)
    for round_no in range(env.mode.hit_rounds):
        # Rotate the order each round, so no contender always follows the same one.
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for conns in env.mode.connections:
            for name in order:
                run = run_wrk(env, urls[name], conns, env.mode.hit_seconds, contenders[name])
                samples.setdefault((name, conns), []).append(run)
        log(f"hits: round {round_no + 1}/{env.mode.hit_rounds} done")
    for proc in contenders.values():
        env.procs.stop(proc)
    table: dict[str, Any] = {}
    for (name, conns), runs in samples.items():
        table.setdefault(name, {})[conns] = tabulate(runs)
    pairs = [(g, other) for g in names if g.startswith(("gateway", "candidate")) for other in ("ceiling", "nginx")]
    if "candidate" in names:
        pairs += [("candidate", "gateway"), ("candidate (access_log off)", "gateway (access_log off)")]
    at = [(a, b, c) for c in env.mode.connections for a, b in pairs]
    return {
        "table": table,
        "ratios": {f"{a}/{b}@{c}": ratio(samples, a, b, c, "rps") for a, b, c in at},
        "cpu_ratios": {f"{a}/{b}@{c}": ratio(samples, a, b, c, "cpu_us") for a, b, c in at},
        "body_bytes": len(body),
    }


def start_contenders(env: Env) -> tuple[dict[str, Proc], bytes]:
    """Every contender, started and its cache filled; and the hit's body (the ceiling serves these very bytes)."""
    contenders: dict[str, Proc] = {
        "gateway": env.start_gateway("gateway-hit", "hit"),
        "gateway (access_log off)": env.start_gateway("gateway-hit-nolog", "hit", access_log=False),
    }
    if env.candidate_python:
        # Another install of the gateway (a patched copy), measured alongside.
        python = env.candidate_python
        contenders["candidate"] = env.start_gateway("candidate-hit", "hit", python=python)
        contenders["candidate (access_log off)"] = env.start_gateway(
            "candidate-hit-nolog", "hit", access_log=False, python=python
        )
    body = uvloop.run(fetch_body(contenders["gateway"].url, env.key))
    contenders["ceiling"] = env.start_ceiling(body)
    if env.nginx is not None:
        contenders["nginx"] = env.start_nginx("nginx-hit", "hit")
    else:
        env.notes.append("nginx contender skipped: nginx is not installed")
    return contenders, body


def check_and_warm(env: Env, urls: dict[str, str], key: str, conns: int) -> None:
    """One request each (the miss that fills the cache; it must then answer 200), then a discarded 1 s of wrk."""
    for name, url in urls.items():
        check = uvloop.run(fetch_status(url, key))
        if check != 200:
            raise RuntimeError(f"{name} answered {check} to the hit request")
        if env.mode.name != "smoke":
            run_wrk(env, url, conns, 1, key=key)  # warm-up, discarded


def tabulate(runs: list[dict[str, float]]) -> dict[str, Any]:
    """One contender's wrk runs: medians, errors summed, and each round's req/s."""
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs),
        "cpu_us": statistics.median(r["cpu_us"] for r in runs),
        "rounds_rps": [round(r["rps"]) for r in runs],
    }


def ratio(samples: Samples, a: str, b: str, conns: int, figure: str) -> float | None:
    """``a`` over ``b`` within each round (the two ran minutes apart at most), then the median; for ``cpu_us`` the
    inverse (CPU efficiency)."""
    if (a, conns) not in samples or (b, conns) not in samples:
        return None
    pairs = zip(samples[(a, conns)], samples[(b, conns)], strict=True)
    if figure == "cpu_us":
        return statistics.median(y["cpu_us"] / x["cpu_us"] for x, y in pairs)
    return statistics.median(x[figure] / y[figure] for x, y in pairs)


def compare_hits(env: Env, contenders: dict[str, Proc], key: str, label: str) -> dict[str, Any]:
    """Cache hits of two gateways alike but for one setting, alternated round by round (wrk, as the caller with
    ``key``, at the first connection count), then stopped; ``ratio`` is the second's req/s over the first's."""
    mode = env.mode
    urls = {name: f"{p.url}/v2/batches/{HIT_BATCH_ID}" for name, p in contenders.items()}
    conns = mode.connections[0]
    check_and_warm(env, urls, key, conns)
    names = list(urls)
    samples: Samples = {(name, conns): [] for name in names}
    for round_no in range(mode.hit_rounds):
        order = names[round_no % 2 :] + names[: round_no % 2]
        for name in order:
            run = run_wrk(env, urls[name], conns, mode.hit_seconds, contenders[name], key=key)
            samples[(name, conns)].append(run)
        log(f"{label}: round {round_no + 1}/{mode.hit_rounds} done")
    env.procs.stop_together(list(contenders.values()))
    table = {name: tabulate(samples[(name, conns)]) for name in names}
    # Ratio within each round, then the median, as for the hit comparisons.
    return {"table": table, "ratio": ratio(samples, names[1], names[0], conns, "rps"), "connections": conns}


async def fetch_body(url: str, key: str) -> bytes:
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {key}"}
        async with session.get(f"{url}/v2/batches/{HIT_BATCH_ID}", headers=headers) as response:
            response.raise_for_status()
            return await response.read()


async def fetch_status(url: str, key: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        await response.read()
        return response.status


def keys(hits: dict[str, Any]) -> dict[str, Any]:
    table, ratios = hits["table"], hits["ratios"]
    conns = min(next(iter(table.values())))
    return {
        "hit_rps": round(table["gateway"][conns]["rps"]),
        "ceiling_rps": round(table["ceiling"][conns]["rps"]),
        "nginx_rps": round(table["nginx"][conns]["rps"]) if "nginx" in table else None,
        "hit_vs_ceiling": round_or_none(ratios.get(f"gateway/ceiling@{conns}"), 3),
        "hit_vs_nginx": round_or_none(ratios.get(f"gateway/nginx@{conns}"), 3),
        "hit_connections": conns,
        "hit_rps_access_log_off": round(table["gateway (access_log off)"][conns]["rps"]),
        "hit_vs_ceiling_access_log_off": round_or_none(ratios.get(f"gateway (access_log off)/ceiling@{conns}"), 3),
        "hit_vs_ceiling_cpu": round_or_none(hits["cpu_ratios"].get(f"gateway/ceiling@{conns}"), 3),
    }


def table_row(name: str, row: dict[str, Any]) -> str:
    """One contender's line in a table of hits (scenarios 5 and 8 too)."""
    return (
        f"| {name} | {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['cpu_us']:.1f} | "
        f"{row['errors']:.0f} | {', '.join(map(str, row['rounds_rps']))} |"
    )


TABLE_HEAD = [
    "| gateway | req/s | p50 ms | p99 ms | server CPU µs/req | errors | req/s per round |",
    "|---|---:|---:|---:|---:|---:|---|",
]


def lines(env: Env, hits: dict[str, Any]) -> list[str]:
    lines = ["### 1. Cache-hit throughput and latency (wrk, 1 thread, keep-alive)", ""]
    if not hits:
        return [*lines, "Skipped: wrk is not installed (hit_rps, ceiling_rps, nginx_rps and their ratios are null)."]
    lines += [
        f"Body: {hits['body_bytes']} bytes. Median of {env.mode.hit_rounds} rounds of {env.mode.hit_seconds} s "
        "each, contenders alternated.",
        "",
        "| contender | connections | req/s | p50 ms | p99 ms | server CPU µs/req | errors | req/s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, by_conns in hits["table"].items():
        lines += [table_row(f"{name} | {conns}", row) for conns, row in sorted(by_conns.items())]
    lines += [
        "",
        "| ratio (median over rounds) | throughput (req/s ratio) | CPU efficiency (inverse CPU µs/req ratio) |",
        "|---|---:|---:|",
    ]
    return lines + [
        f"| {name} | {fmt(value, 3)} | {fmt(hits['cpu_ratios'][name], 3)} |"
        for name, value in hits["ratios"].items()
        if value is not None
    ]
