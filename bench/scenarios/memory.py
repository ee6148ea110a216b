"""Scenario 4: memory per cached entry: the RSS of the running gateway before and after caching N more entries,
filled through requests."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import uvloop

from bench.harness import Env

TITLE = "scenario 4: memory per entry"


async def fill(url: str, key: str, prefix: str, count: int, concurrency: int = 48) -> int:
    """``count`` distinct ids requested, ``concurrency`` at a time; how many did not answer 200."""
    headers = {"Authorization": f"Bearer {key}"}
    counter = iter(range(count))
    errors = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in counter:
            async with session.get(f"{url}/v2/batches/{prefix}-{i:07d}", headers=headers) as r:
                await r.read()
                errors += r.status != 200

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return errors


async def cache_entries(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as r:
        text = await r.text()
    found = re.search(r"^gateway_cache_entries\s+([\d.e+]+)$", text, re.MULTILINE)
    return int(float(found.group(1))) if found else -1


async def fetch_any(url: str, key: str, batch_id: str) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v2/batches/{batch_id}", headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return await r.read()


def measure(env: Env) -> dict[str, Any]:
    entries = env.mode.memory_entries
    warm = min(2000, entries)
    gateway = env.start_gateway("gateway-mem", "mem", max_entries=entries + warm + 100)
    uvloop.run(fill(gateway.url, env.key, "warm", warm))
    time.sleep(0.5)
    before = gateway.rss_bytes()
    began = time.monotonic()
    errors = uvloop.run(fill(gateway.url, env.key, "mem", entries))
    took = time.monotonic() - began
    time.sleep(0.5)
    after = gateway.rss_bytes()
    cached = uvloop.run(cache_entries(gateway.url))
    body = uvloop.run(fetch_any(gateway.url, env.key, "mem-0000000"))
    env.procs.stop(gateway)
    # Each new batch is also an event and an owner lookup in the store: what the store could not answer in time.
    store_failures = gateway.log_path.read_text(errors="replace").count('"record store failed"')
    if errors or cached != entries + warm:
        raise RuntimeError(f"memory fill: {errors} errors, {cached} entries cached, {entries + warm} expected")
    return {
        "entries": entries,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "bytes_per_entry": (after - before) / entries,
        "body_bytes": len(body),
        "fill_rps": entries / took,
        "store_failures": store_failures,
    }


def keys(mem: dict[str, Any]) -> dict[str, Any]:
    return {"bytes_per_entry": round(mem["bytes_per_entry"])}


def lines(env: Env, mem: dict[str, Any]) -> list[str]:
    lines = ["", "### 4. Memory per cached entry (RSS of the running gateway, filled through requests)", ""]
    if not mem:
        return [*lines, "Skipped (not asked for)."]
    return [
        *lines,
        "| entries added | body bytes | RSS before MiB | RSS after MiB | bytes per entry | fill req/s "
        "| store failures |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {mem['entries']} | {mem['body_bytes']} | {mem['rss_before_mb']:.1f} | {mem['rss_after_mb']:.1f} | "
        f"{mem['bytes_per_entry']:.0f} | {mem['fill_rps']:.0f} | {mem['store_failures']} |",
    ]
