"""Soak test: a fixed mixed load against the simulator, watching the gateway for growth.

Starts the simulator in this process and the gateway as a subprocess
(``python -m gateway``), both on 127.0.0.1, then sends a fixed mix of
requests for ``--duration`` seconds: cache hits, misses (fresh ids), 404s,
bad keys and bad ids. Every ``--sample-s`` seconds it records the gateway's
RSS, open file descriptors and threads (from /proc), its in-flight upstream
fetches and cache size (from /metrics), and the upstream calls made.

It fails (exit 1) if any of those keeps growing: the median of the last
third of the samples is compared with the median of the middle third (the
first third is warm-up, while the cache fills). It also fails on any
unexpected status or if the gateway does not stop cleanly on SIGTERM.
It prints a table, then one JSON line with the figures.

    python bench/soak.py --duration 30     # what CI runs
    python bench/soak.py --duration 600    # the 10-minute soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.demo.simulator import Simulator, start_simulator

TOKEN = "soak-upstream-token-5e2a9c41"
KEY = "soak-caller-key-0b7d3e9f"
HOT_IDS = [f"hot-{i}" for i in range(100)]
MISSING_IDS = [f"missing-{i}" for i in range(200)]
BAD_IDS = ["bad.id", "-leading-dash", "a" * 129, "x%252Fy", "batch%00"]
# The mix, in tenths: what each request of a round of ten is.
MIX = ["hit", "hit", "hit", "hit", "hit", "miss", "miss", "not_found", "bad_key", "bad_id"]
EXPECTED = {"hit": 200, "miss": 200, "not_found": 404, "bad_key": 401, "bad_id": 400}
WORKERS = 20


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    fds: int
    threads: int
    inflight: float
    cache_entries: float
    upstream_calls: int
    upstream_per_s: float
    requests: int


@dataclass(frozen=True)
class Tolerance:
    """How much the last third's median may exceed the middle third's."""

    relative: float
    absolute: float


TOLERANCES = {
    "rss_mb": Tolerance(0.10, 5.0),
    "fds": Tolerance(0.0, 5.0),
    "threads": Tolerance(0.0, 2.0),
    "inflight": Tolerance(0.0, 5.0),
    "upstream_per_s": Tolerance(0.25, 5.0),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def parse_metrics(text: str) -> dict[str, float]:
    """Sum every sample of each metric name (labels dropped)."""
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        totals[name_labels.partition("{")[0]] += float(value)
    return dict(totals)


def write_config(directory: Path, simulator_url: str) -> Path:
    config = {
        "upstream": {
            "base_url": simulator_url,
            "token": TOKEN,
            "timeout_s": 5,
            "rate_limit": {"requests_per_s": 2000, "burst": 2000},
        },
        # A small cache, so that misses keep it full and evicting from early on.
        "cache": {"max_entries": 500, "ttl_s": {"active": 2, "terminal": 30, "not_found": 2}},
        "logging": {"level": "WARNING", "access_log": False},
        "callers": [{"name": "soak", "key": KEY}],
    }
    path = directory / "soak.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_gateway_process(config: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m gateway`` on 127.0.0.1:``port``, its output to ``log_path``."""
    command = [sys.executable, "-m", "gateway", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(session: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"soak: the gateway exited with {process.returncode} before serving")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise SystemExit("soak: the gateway did not become ready within 20 s")


class Load:
    """WORKERS workers sending the fixed mix at ``rate`` requests per second overall."""

    def __init__(self, session: aiohttp.ClientSession, url: str, rate: float) -> None:
        self.session = session
        self.url = url
        self.interval = WORKERS / rate
        self.sent = 0
        self.miss_counter = 0
        self.statuses: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()

    def next_request(self) -> tuple[str, str, str]:
        kind = MIX[self.sent % len(MIX)]
        self.sent += 1
        key = KEY
        if kind == "hit":
            batch_id = HOT_IDS[self.sent % len(HOT_IDS)]
        elif kind == "miss":
            self.miss_counter += 1
            batch_id = f"soak-miss-{self.miss_counter}"
        elif kind == "not_found":
            batch_id = MISSING_IDS[self.sent % len(MISSING_IDS)]
        elif kind == "bad_key":
            batch_id, key = HOT_IDS[0], "not-a-valid-soak-key"
        else:
            batch_id = BAD_IDS[self.sent % len(BAD_IDS)]
        return kind, batch_id, key

    async def worker(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            kind, batch_id, key = self.next_request()
            try:
                async with self.session.get(
                    f"{self.url}/v2/batches/{batch_id}", headers={"Authorization": f"Bearer {key}"}
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.unexpected[f"{kind}:{type(exc).__name__}"] += 1
                continue
            self.statuses[f"{kind}:{status}"] += 1
            if status != EXPECTED[kind]:
                self.unexpected[f"{kind}:{status}"] += 1
            next_at += self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))


async def sample(
    session: aiohttp.ClientSession, url: str, pid: int, simulator: Simulator, started: float, load: Load
) -> Sample:
    async with session.get(f"{url}/metrics") as response:
        metrics = parse_metrics(await response.text())
    status = proc_status(pid)
    return Sample(
        t_s=round(time.monotonic() - started, 1),
        rss_mb=round(int(status["VmRSS"].split()[0]) / 1024, 1),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        inflight=metrics.get("gateway_singleflight_inflight", 0.0),
        cache_entries=metrics.get("gateway_cache_entries", 0.0),
        upstream_calls=simulator.calls,
        upstream_per_s=0.0,
        requests=sum(load.statuses.values()),
    )


def growth(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Middle-third and last-third medians of each watched series, and whether it grew."""
    third = len(samples) // 3
    middle, last = samples[third : 2 * third], samples[2 * third :]
    verdicts: dict[str, dict[str, Any]] = {}
    for name, tolerance in TOLERANCES.items():
        before = statistics.median(getattr(s, name) for s in middle)
        after = statistics.median(getattr(s, name) for s in last)
        limit = before * (1 + tolerance.relative) + tolerance.absolute
        verdicts[name] = {"middle": before, "last": after, "limit": round(limit, 2), "grew": after > limit}
    return verdicts


def print_table(samples: list[Sample]) -> None:
    columns = ["t_s", "rss_mb", "fds", "threads", "inflight", "cache_entries", "upstream_calls", "upstream_per_s"]
    print(" ".join(f"{c:>14}" for c in columns), file=sys.stderr)
    for s in samples:
        print(" ".join(f"{getattr(s, c):>14}" for c in columns), file=sys.stderr)


async def run_load(load: Load, pid: int, simulator: Simulator, duration_s: float, sample_s: float) -> list[Sample]:
    """The mix sent for ``duration_s`` by WORKERS workers, sampled every ``sample_s``; the samples."""
    stop = asyncio.Event()
    workers = [asyncio.ensure_future(load.worker(stop)) for _ in range(WORKERS)]
    started = time.monotonic()
    samples: list[Sample] = []
    while time.monotonic() - started < duration_s:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), sample_s)
        current = await sample(load.session, load.url, pid, simulator, started, load)
        if samples:
            elapsed = current.t_s - samples[-1].t_s
            current.upstream_per_s = round(
                (current.upstream_calls - samples[-1].upstream_calls) / max(elapsed, 1e-3), 1
            )
        samples.append(current)
    stop.set()
    await asyncio.gather(*workers)
    return samples


async def soak(duration_s: float, rate: float, sample_s: float) -> int:
    simulator = Simulator(token=TOKEN, lifetime_s=20)
    sim_runner, sim_url = await start_simulator(simulator)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as directory:
        config = write_config(Path(directory), sim_url)
        log_path = Path(directory) / "gateway.log"
        process = start_gateway_process(config, port, log_path)
        connector = aiohttp.TCPConnector(limit=WORKERS + 2)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
            try:
                await wait_ready(session, url, process)
                load = Load(session, url, rate)
                samples = await run_load(load, process.pid, simulator, duration_s, sample_s)
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    exit_code = await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    exit_code = await asyncio.to_thread(process.wait)
                await sim_runner.cleanup()
        gateway_log = log_path.read_text(errors="replace")
    samples = samples[1:]  # the first has no upstream rate
    print_table(samples)
    verdicts = growth(samples)
    grew = sorted(name for name, verdict in verdicts.items() if verdict["grew"])
    secret_leaked = TOKEN in gateway_log or KEY in gateway_log
    ok = not grew and not load.unexpected and exit_code == 0 and not secret_leaked
    summary = {
        "ok": ok,
        "duration_s": duration_s,
        "rate_target": rate,
        "requests": sum(load.statuses.values()),
        "statuses": dict(sorted(load.statuses.items())),
        "unexpected": dict(load.unexpected),
        "upstream_calls": simulator.calls,
        "gateway_exit_code": exit_code,
        "secret_in_gateway_log": secret_leaked,
        "grew": grew,
        "series": verdicts,
        "first": asdict(samples[0]),
        "last": asdict(samples[-1]),
        "max": {name: max(getattr(s, name) for s in samples) for name in TOLERANCES},
    }
    print(json.dumps(summary))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="Soak the gateway with a fixed mixed load; fail on growth.")
    parser.add_argument("--duration", type=float, default=30, help="seconds of load (default 30)")
    parser.add_argument("--rate", type=float, default=200, help="requests per second, all kinds (default 200)")
    parser.add_argument("--sample-s", type=float, default=None, help="seconds between samples (default duration/30)")
    args = parser.parse_args()
    if args.duration < 9:
        parser.error("--duration must be at least 9 seconds (three thirds of samples)")
    sample_s = args.sample_s or max(1.0, args.duration / 30)
    return asyncio.run(soak(args.duration, args.rate, sample_s))


if __name__ == "__main__":
    sys.exit(main())
