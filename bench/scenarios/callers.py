"""Scenario 5: cache hits with MANY_CALLERS callers configured against 2, alternated, as the last caller configured
(a caller list walked in order would find it last)."""

from __future__ import annotations

from typing import Any

from bench.harness import Env
from bench.scenarios.config import filler_callers
from bench.scenarios.hits import TABLE_HEAD, compare_hits, table_row

MANY_CALLERS = 2_000
TITLE = f"scenario 5: hits with {MANY_CALLERS} callers"


def measure(env: Env) -> dict[str, Any]:
    if env.wrk is None:
        env.notes.append("scenario 5 (many callers) skipped: wrk is not installed")
        return {}
    few = [{"name": n, "key": k} for n, k in env.keys.items()]
    key = few[-1]["key"]  # the last caller in both configs
    many = filler_callers(MANY_CALLERS - len(few)) + few
    contenders = {
        f"{len(few)} callers": env.start_gateway("gateway-few-callers", "hit", callers=few),
        f"{len(many)} callers": env.start_gateway("gateway-many-callers", "hit", callers=many),
    }
    compared = compare_hits(env, contenders, key, "callers")
    return {**compared, "many": len(many), "few": len(few)}


def keys(callers: dict[str, Any]) -> dict[str, Any]:
    return {
        "hit_rps_many_callers_ratio": round(callers["ratio"], 3),
        "hit_rps_many_callers": round(callers["table"][f"{callers['many']} callers"]["rps"]),
    }


def lines(env: Env, callers: dict[str, Any]) -> list[str]:
    lines = ["", f"### 5. Cache hits with {MANY_CALLERS} callers configured against 2 (wrk, as the last caller)", ""]
    if not callers:
        return [*lines, "Skipped (wrk is not installed, or not asked for)."]
    lines += [
        f"Two gateways, alike but for their caller lists, alternated; {env.mode.hit_rounds} round(s) of "
        f"{env.mode.hit_seconds} s at {callers['connections']} connections; every request uses the key of the last "
        f"caller configured (of {MANY_CALLERS}: half by key, half by key_sha256). Ratio: {callers['many']}-caller "
        f"req/s over {callers['few']}-caller req/s, within each round, median.",
        "",
        *TABLE_HEAD,
    ]
    lines += [table_row(name, row) for name, row in callers["table"].items()]
    return [*lines, "", f"Ratio: {callers['ratio']:.3f}."]
