"""The benchmark: the gateway side by side with what users would run instead.

    python bench/run.py            # full run (about 10 minutes): writes bench/RESULTS.md and its two charts
    python bench/run.py --quick    # about 4 minutes; results go to a temporary folder
    python bench/run.py --smoke    # a few seconds: every scenario once, minimally (CI)
    python bench/run.py --quick --only callers,config   # just some scenarios (see --help)
    python bench/run.py --quick --only notice           # time to notice a change (DESIGN §9)
    python bench/run.py --quick --only replicas         # replicas sharing one Redis (DESIGN §10)

Every server runs in its own process on 127.0.0.1: the simulated upstream
(bench/sim_server.py, the gateway's own ``gateway.demo.Simulator``), the
gateway (``python -m gateway --config <generated>``), the framework
ceiling (bench/ceiling.py) and Debian's nginx (bench/nginx.conf.template).
wrk generates the cache-hit load; the other scenarios use an aiohttp client
in this process. Each comparison alternates its contenders within one run,
for several rounds, and reports medians and ratios. The config scenario
times ``gateway.config.validate`` in this process. The time-to-notice
scenario (DESIGN §9) runs nginx, then the gateway with polling callers, then
with long-poll callers, each alone on a fresh simulator whose batches
complete at scheduled moments, and the gateways at nginx's upstream call
rate (bench/notice_delays.png). The replicas scenario (DESIGN §10) runs the
lifecycle workload through 3 gateway processes sharing one redis-server
(Debian's, started here on a free port, no persistence), through 3 without
Redis and through 1; then the 3 on Redis again with Redis killed for a few
seconds in the middle; then cache hits of one process with ``redis.url``
against one without.

The last line on stdout is one JSON object (see ``KEYS``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml

BENCH = Path(__file__).resolve().parent
KEYS = (
    "hit_rps",
    "ceiling_rps",
    "nginx_rps",
    "hit_vs_ceiling",
    "hit_vs_nginx",
    "upstream_amplification",
    "upstream_calls_vs_nginx",
    "miss_overhead_p50_ms",
    "miss_overhead_p99_ms",
    "bytes_per_entry",
    "hit_rps_many_callers_ratio",
    "config_load_s_10k_callers",
    "notice_p50_s",
    "notice_p99_s",
    "notice_p50_s_polling",
    "notice_p50_s_nginx",
    "notice_calls",
    "notice_calls_nginx",
    "notice_p50_vs_nginx",
    "notice_calls_vs_nginx",
    "replica_amplification",
    "replica_amplification_no_redis",
    "redis_outage_failed_polls",
    "hit_rps_redis_vs_local",
)
# key: (comparison, bound)
TARGETS = {
    "hit_vs_ceiling": (">=", 0.9),
    "upstream_amplification": ("<=", 1.05),
    "miss_overhead_p50_ms": ("<=", 2.0),
    "bytes_per_entry": ("<=", 2048.0),
    "hit_rps_many_callers_ratio": (">=", 0.9),
    "config_load_s_10k_callers": ("<=", 0.5),
    # DESIGN §9: long-poll callers notice a change in half nginx's time (p50), at no more upstream calls.
    "notice_p50_vs_nginx": ("<=", 0.5),
    "notice_calls_vs_nginx": ("<=", 1.0),
    # DESIGN §10: 3 replicas on one Redis make the upstream calls of one process, survive Redis going away
    # with no failed poll, and a process with redis.url serves hits as fast as one without.
    "replica_amplification": ("<=", 1.1),
    "redis_outage_failed_polls": ("<=", 0),
    "hit_rps_redis_vs_local": (">=", 0.9),
}
TTL_ACTIVE_S = 5.0
TTL_TERMINAL_S = 86400.0
TTL_NOT_FOUND_S = 10.0
HIT_BATCH_ID = "hit-batch-0001"
SCENARIOS = ("hits", "upstream", "miss", "memory", "callers", "config", "notice", "replicas")
MANY_CALLERS = 2_000  # scenario 5: hits with this many callers configured, against 2
CONFIG_CALLERS = 10_000  # scenario 6: a config with this many callers, loaded and validated
CONTENDERS = (
    "Contenders: **gateway** is `python -m gateway` with a generated config (production defaults, access log on, "
    "written to a file; upstream budget set high); **ceiling** is bench/ceiling.py, a bare aiohttp + uvloop handler "
    "that looks the whole Authorization header up in a dict and returns the cached bytes (no hashing, middleware, "
    "request id, metrics, log or cache headers); **nginx** is Debian's nginx, one worker, unprivileged, configured "
    "by bench/nginx.conf.template (caller-key map, token injection, X-Client-Name, proxy_cache keyed by the id, "
    "a fixed 5 s TTL, proxy_cache_lock, proxy_cache_use_stale), access log on; **direct** polls the simulator. "
    "Every server runs in its own process; the simulator (gateway.demo.Simulator) in another. "
    "The gateway answers a plain fresh hit as soon as its request head is parsed, below aiohttp's Application "
    "(gateway/fastpath.py), while the ceiling goes through the Application's per-request machinery (a task, a "
    "Request, the router, a Response): that is how the gateway, doing more per hit, can answer faster.",
)


@dataclass(frozen=True)
class Mode:
    name: str
    hit_rounds: int
    hit_seconds: int
    connections: tuple[int, ...]
    pollers: int
    batches: int
    poll_interval_s: float
    lifetime_s: float
    window_s: float
    miss_rounds: int
    miss_per_round: int
    memory_entries: int
    install: bool
    notice_batches: int  # scenario 7: batches, one caller each
    notice_window_s: float  # scenario 7: each batch completes at a random moment within this window
    outage_s: float  # scenario 8: how long Redis stays killed, in the middle of the lifecycle window


MODES = {
    "full": Mode("full", 5, 4, (64, 256), 200, 50, 0.5, 25.0, 45.0, 5, 400, 100_000, True, 40, 60.0, 5.0),
    "quick": Mode("quick", 3, 2, (64, 256), 200, 50, 0.5, 10.0, 20.0, 3, 300, 25_000, True, 20, 30.0, 5.0),
    "smoke": Mode("smoke", 1, 1, (64,), 20, 5, 0.5, 2.0, 3.0, 1, 30, 500, False, 3, 2.0, 1.0),
}


# A bound, not a wait: on a shared 2-core machine, several gateways starting at once took 17 s (scenario 8).
START_WITHIN_S = 60.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the process and its children (nginx's worker)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rpartition(")")[2].split()
                pid, ppid = int(stat.parent.name), int(fields[1])
                if self.pid in (pid, ppid):
                    total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


class Processes:
    """Every process the benchmark starts; all are stopped on the way out."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Proc] = []

    def start(
        self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None, user: str | None = None
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as out:
            popen = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                user=user,
                cwd=self.workdir,
            )
        proc = Proc(name, popen, f"http://127.0.0.1:{port}", log_path)
        self.running.append(proc)
        deadline = time.monotonic() + START_WITHIN_S
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}: {tail(log_path)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start listening within {START_WITHIN_S:g} s: {tail(log_path)}")

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.running:
            self.running.remove(proc)

    def stop_together(self, procs: list[Proc]) -> None:
        """SIGTERM to all at once, then wait for each: their drains overlap."""
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        for proc in procs:
            self.stop(proc)

    def kill(self, proc: Proc) -> None:
        """SIGKILL: no drain, no goodbye (the Redis outage of scenario 8)."""
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait(timeout=10)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            with contextlib.suppress(Exception):
                proc.stop()
        self.running.clear()


def start_together(starters: list[Callable[[], Proc]]) -> list[Proc]:
    """Start processes side by side (each start waits for its own port), so that several cost about one start."""
    with ThreadPoolExecutor(max_workers=len(starters)) as pool:
        return list(pool.map(lambda start: start(), starters))


def tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Env:
    """What every scenario shares: the processes, the simulator, the secrets."""

    mode: Mode
    procs: Processes
    workdir: Path
    token: str
    keys: dict[str, str]  # caller name -> key
    sim: Proc | None = None
    wrk: str | None = None
    nginx: str | None = None
    redis: str | None = None  # Debian's redis-server (scenario 8)
    candidate_python: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return next(iter(self.keys.values()))

    def start_simulator(self, lifetimes: dict[str, float]) -> None:
        port = free_port()
        cmd = [sys.executable, str(BENCH / "sim_server.py"), "--port", str(port)]
        for ns, life in lifetimes.items():
            cmd += ["--ns", f"{ns}={life}"]
        self.sim = self.procs.start("simulator", cmd, port, env={"BENCH_UPSTREAM_TOKEN": self.token})

    def start_gateway(
        self,
        name: str,
        ns: str,
        access_log: bool = True,
        max_entries: int = 100_000,
        python: str = sys.executable,
        callers: list[dict[str, str]] | None = None,
        budget: tuple[float, int] | None = None,
        cache: dict[str, Any] | None = None,
        sections: dict[str, Any] | None = None,
    ) -> Proc:
        """A gateway on namespace ``ns``; ``budget`` (calls/s, burst) replaces the unshaping default,
        ``cache`` adds settings to the cache section (its ``ttl_s`` merged into the TTLs), and ``sections``
        adds whole sections (``redis``, ``store``)."""
        assert self.sim is not None
        port = free_port()
        rate, burst = budget if budget is not None else (1_000_000, 1_000_000)
        extra = dict(cache or {})
        ttl = {
            "active": TTL_ACTIVE_S,
            "terminal": TTL_TERMINAL_S,
            "not_found": TTL_NOT_FOUND_S,
            **extra.pop("ttl_s", {}),
        }
        config = {
            "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 2},
            "upstream": {
                "base_url": f"{self.sim.url}/{ns}",
                "token": self.token,
                "timeout_s": 15,
                "max_connections": 100,
                # By default high enough that the budget never shapes what is measured.
                "rate_limit": {"requests_per_s": rate, "burst": burst},
            },
            "cache": {"max_entries": max_entries, "ttl_s": ttl, **extra},
            "logging": {"level": "INFO", "access_log": access_log},
            "callers": callers if callers is not None else [{"name": n, "key": k} for n, k in self.keys.items()],
            **(sections or {}),
        }
        path = self.workdir / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        cmd = [python, "-m", "gateway", "--config", str(path)]
        return self.procs.start(name, cmd, port)

    def start_redis(self, name: str, port: int | None = None) -> Proc:
        """Debian's redis-server on 127.0.0.1 with no persistence (tests/redis_server.py's command line); ``port``
        starts it again on the port of one that was killed."""
        assert self.redis is not None
        port = port or free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        cmd = [self.redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(data), "--protected-mode", "no", "--loglevel", "warning"]
        return self.procs.start(name, cmd, port)

    def start_ceiling(self, body: bytes) -> Proc:
        port = free_port()
        body_file = self.workdir / "hit-body.json"
        body_file.write_bytes(body)
        cmd = [sys.executable, str(BENCH / "ceiling.py"), "--port", str(port)]
        cmd += ["--body-file", str(body_file), "--batch-id", HIT_BATCH_ID]
        return self.procs.start("ceiling", cmd, port, env={"BENCH_CALLER_KEYS": ",".join(self.keys.values())})

    def start_nginx(self, name: str, ns: str, access_log: bool = True) -> Proc:
        assert self.sim is not None
        assert self.nginx is not None
        port = free_port()
        prefix = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        for sub in ("logs", "tmp", "cache"):
            (prefix / sub).mkdir()
        caller_map = "\n".join(f'        "Bearer {k}" "{n}";' for n, k in self.keys.items())
        conf = (BENCH / "nginx.conf.template").read_text()
        for placeholder, value in {
            "@PREFIX@": str(prefix),
            "@ACCESS_LOG@": f"{prefix}/logs/access.log" if access_log else "off",
            "@CALLER_MAP@": caller_map,
            "@UPSTREAM_HOSTPORT@": self.sim.url.removeprefix("http://"),
            "@UPSTREAM_PATH@": f"/{ns}",
            "@UPSTREAM_TOKEN@": self.token,
            "@PORT@": str(port),
            "@TTL_ACTIVE@": str(int(TTL_ACTIVE_S)),
            "@TTL_NOT_FOUND@": str(int(TTL_NOT_FOUND_S)),
        }.items():
            conf = conf.replace(placeholder, value)
        (prefix / "nginx.conf").write_text(conf)
        user = None
        if os.geteuid() == 0:
            # Unprivileged: the whole process tree runs as nobody, in its own prefix.
            user = "nobody"
            os.chmod(prefix.parent, 0o755)  # noqa: S103 (nobody must reach its prefix; no secret is world-readable)
            for path in [prefix, *prefix.rglob("*")]:
                os.chown(path, _nobody_uid(), -1)
        cmd = [self.nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "logs/error.log")]
        return self.procs.start(name, cmd, port, user=user)


def _nobody_uid() -> int:
    import pwd

    return pwd.getpwnam("nobody").pw_uid


# --- tools ---------------------------------------------------------------------------------------------------------


TOOLS = ("wrk", "nginx", "redis-server")  # each is its own Debian package's name


def find_tools(allow_install: bool) -> tuple[dict[str, str | None], list[str]]:
    """wrk, nginx and redis-server (name -> path, None if missing), installed from Debian if missing and allowed;
    and what was done."""
    notes: list[str] = []

    def found() -> dict[str, str | None]:
        return {
            tool: shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}",) if Path(p).exists()), None)
            for tool in TOOLS
        }

    tools = found()
    missing = [tool for tool, path in tools.items() if path is None]
    if not missing:
        return tools, notes
    named = "/".join(missing)
    if not allow_install:
        notes.append(f"{named} missing and installing was not attempted (--smoke or --no-install)")
        return tools, notes
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        notes.append(f"{named} missing and cannot be installed here (not root, or no apt-get)")
        return tools, notes
    log(f"installing {' and '.join(missing)} from Debian")
    install = ["apt-get", "install", "-y", "-q", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(install, capture_output=True, timeout=300, env=env, check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300, env=env, check=False)
            done = subprocess.run(install, capture_output=True, timeout=300, env=env, check=False)
        notes.append(f"apt-get install {' '.join(missing)}: exit {done.returncode}")
    except subprocess.TimeoutExpired:
        notes.append(f"apt-get install {' '.join(missing)} timed out")
    return found(), notes


# --- scenario 1: cache hits ----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(text: str) -> dict[str, float]:
    """Requests/sec, p50 and p99 (ms) and error counts from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rps is None:
        raise RuntimeError(f"wrk gave no Requests/sec: {text[-400:]}")
    result = {"rps": float(rps.group(1))}
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        found = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        result[key] = float(found.group(1)) * _UNITS[found.group(2)] if found else math.nan
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    result["non2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    result["socket_errors"] = float(sum(int(g) for g in errors.groups())) if errors else 0.0
    return result


def run_wrk(
    env: Env, url: str, connections: int, seconds: int, server: Proc | None = None, key: str | None = None
) -> dict[str, float]:
    """One wrk run (as the caller with ``key``, default the first); with ``server``, also its CPU µs per request."""
    assert env.wrk is not None
    cpu_before = server.cpu_seconds() if server else 0.0
    cmd = [env.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
    cmd += ["-H", f"Authorization: Bearer {key or env.key}", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-400:]}")
    result = parse_wrk(done.stdout)
    if server is not None:
        requests = result["rps"] * seconds
        result["cpu_us"] = (server.cpu_seconds() - cpu_before) * 1e6 / requests if requests else math.nan
    return result


def scenario_hits(env: Env) -> dict[str, Any]:
    """Cache-hit throughput and latency, wrk against every contender in turn."""
    mode = env.mode
    if env.wrk is None:
        env.notes.append("scenario 1 (cache hits) skipped: wrk is not installed")
        return {}
    assert env.sim is not None
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
    # Warm: one miss each, then the ceiling gets the very bytes the gateway serves.
    body = uvloop.run(fetch_body(contenders["gateway"].url, env.key))
    contenders["ceiling"] = env.start_ceiling(body)
    if env.nginx is not None:
        contenders["nginx"] = env.start_nginx("nginx-hit", "hit")
    else:
        env.notes.append("nginx contender skipped: nginx is not installed")
    urls = {name: f"{p.url}/v2/batches/{HIT_BATCH_ID}" for name, p in contenders.items()}
    for name, url in urls.items():
        check = uvloop.run(fetch_status(url, env.key))
        if check != 200:
            raise RuntimeError(f"{name} answered {check} to the hit request")
        if mode.name != "smoke":
            run_wrk(env, url, mode.connections[0], 1)  # warm-up, discarded
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    names = list(urls)
    for round_no in range(mode.hit_rounds):
        # Rotate the order each round, so no contender always follows the same one.
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for conns in mode.connections:
            for name in order:
                samples.setdefault((name, conns), []).append(
                    run_wrk(env, urls[name], conns, mode.hit_seconds, contenders[name])
                )
        log(f"hits: round {round_no + 1}/{mode.hit_rounds} done")
    for proc in contenders.values():
        env.procs.stop(proc)
    table: dict[str, Any] = {}
    for (name, conns), runs in samples.items():
        table.setdefault(name, {})[conns] = {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs),
            "cpu_us": statistics.median(r["cpu_us"] for r in runs),
            "rounds_rps": [round(r["rps"]) for r in runs],
        }

    def ratio(a: str, b: str, conns: int) -> float | None:
        if (a, conns) not in samples or (b, conns) not in samples:
            return None
        # Ratio within each round (the two ran minutes apart at most), then the median.
        pairs = zip(samples[(a, conns)], samples[(b, conns)], strict=True)
        return statistics.median(x["rps"] / y["rps"] for x, y in pairs)

    def cpu_ratio(a: str, b: str, conns: int) -> float | None:
        if (a, conns) not in samples or (b, conns) not in samples:
            return None
        pairs = zip(samples[(a, conns)], samples[(b, conns)], strict=True)
        return statistics.median(y["cpu_us"] / x["cpu_us"] for x, y in pairs)

    pairs_to_compare = [
        (g, other) for g in names if g.startswith(("gateway", "candidate")) for other in ("ceiling", "nginx")
    ]
    if "candidate" in names:
        pairs_to_compare += [("candidate", "gateway"), ("candidate (access_log off)", "gateway (access_log off)")]
    ratios = {f"{a}/{b}@{c}": ratio(a, b, c) for c in mode.connections for a, b in pairs_to_compare}
    cpu_ratios = {f"{a}/{b}@{c}": cpu_ratio(a, b, c) for c in mode.connections for a, b in pairs_to_compare}
    return {"table": table, "ratios": ratios, "cpu_ratios": cpu_ratios, "body_bytes": len(body)}


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


# --- scenario 2: upstream amplification ----------------------------------------------------------------------------


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


# A lifecycle target: its simulator namespace, the servers its pollers are spread over (poller n keeps to server
# n mod their number, as a load balancer spreads connections round-robin), and the headers the pollers send.
Target = tuple[str, tuple[str, ...], dict[str, str]]


def poll_failed(status: int) -> bool:
    """An answer that is not the batch: anything but 2xx or 304 (no answer at all is a failed poll too)."""
    return not (200 <= status < 300 or status == 304)


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
    timeout = aiohttp.ClientTimeout(total=10)
    polls = dict.fromkeys(targets, 0)
    failures = dict.fromkeys(targets, 0)
    failure_kinds: dict[str, dict[str, int]] = {name: {} for name in targets}
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as control:
        for _name, (ns, _bases, _headers) in targets.items():
            async with control.post(f"{sim_url}/_bench/reset", params={"ns": ns}) as r:
                r.raise_for_status()
        start = time.monotonic()
        end = start + mode.window_s
        timeline: list[tuple[float, dict[str, int]]] = []

        async def poller(name: str, base: str, headers: dict[str, str], batch_id: str, phase: float) -> None:
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                next_at = start + phase
                while True:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    if time.monotonic() >= end:
                        return
                    kind = None
                    try:
                        async with session.get(f"{base}/v2/batches/{batch_id}", headers=headers) as r:
                            await r.read()
                            polls[name] += 1
                            kind = str(r.status) if poll_failed(r.status) else None
                    except (aiohttp.ClientError, TimeoutError) as error:
                        kind = type(error).__name__
                    if kind is not None:
                        failures[name] += 1
                        failure_kinds[name][kind] = failure_kinds[name].get(kind, 0) + 1
                    # A late poller does not burst to catch up: it keeps its pace from now.
                    next_at = max(next_at + mode.poll_interval_s, time.monotonic())

        async def sampler() -> None:
            while time.monotonic() < end + 0.5:
                counts = {}
                for name, (ns, _bases, _headers) in targets.items():
                    async with control.get(f"{sim_url}/_bench/stats", params={"ns": ns}) as r:
                        counts[name] = (await r.json())["calls"]
                timeline.append((time.monotonic() - start, counts))
                await asyncio.sleep(0.5)

        tasks = [asyncio.ensure_future(sampler())]
        if fault is not None:
            tasks.append(asyncio.ensure_future(fault(start, end)))
        for name, (_ns, bases, headers) in targets.items():
            for p in range(mode.pollers):
                phase = (p * 0.6180339887) % 1.0 * mode.poll_interval_s
                base = bases[p % len(bases)]
                tasks.append(asyncio.ensure_future(poller(name, base, headers, ids[p % len(ids)], phase)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=mode.window_s + 30)
        details = {}
        for name, (ns, _bases, _headers) in targets.items():
            async with control.get(f"{sim_url}/_bench/stats", params={"ns": ns, "detail": "1"}) as r:
                details[name] = await r.json()
    return {
        "timeline": timeline,
        "details": details,
        "polls": polls,
        "failures": failures,
        "failure_kinds": failure_kinds,
        "start": start,
    }


def ideal_times(details: dict[str, Any]) -> list[float]:
    """The ideal cache's upstream calls (simulator clock), from the batches' real lifecycles in one namespace."""
    times: list[float] = []
    for batch_id, first in details["first_seen"].items():
        times += ideal_calls(first, details["span_s"][batch_id], details["now"], TTL_ACTIVE_S)
    return sorted(times)


def scenario_lifecycle(env: Env) -> dict[str, Any]:
    assert env.sim is not None
    gateway = env.start_gateway("gateway-life", "gw")
    targets: dict[str, Target] = {}
    keys = list(env.keys.values())
    targets["gateway"] = ("gw", (gateway.url,), {"Authorization": f"Bearer {keys[0]}"})
    nginx = None
    if env.nginx is not None:
        nginx = env.start_nginx("nginx-life", "nginx")
        targets["nginx"] = ("nginx", (nginx.url,), {"Authorization": f"Bearer {keys[0]}"})
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


# --- scenario 3: miss-path overhead --------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[index]


async def miss_latencies(env: Env, gateway_url: str) -> dict[str, Any]:
    assert env.sim is not None
    mode = env.mode
    gw_headers = {"Authorization": f"Bearer {env.key}"}
    direct_headers = {"Authorization": f"Bearer {env.token}"}
    timeout = aiohttp.ClientTimeout(total=10)
    rounds = []
    async with (
        aiohttp.ClientSession(timeout=timeout) as gw_session,
        aiohttp.ClientSession(timeout=timeout) as direct_session,
    ):

        async def timed(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
            began = time.perf_counter()
            async with session.get(url, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"miss request answered {r.status}")
                if "X-Cache" in r.headers and r.headers["X-Cache"] != "MISS":
                    raise RuntimeError(f"miss request was a {r.headers['X-Cache']}")
            return (time.perf_counter() - began) * 1000

        for warm in range(20):
            await timed(gw_session, f"{gateway_url}/v2/batches/warm-{warm}", gw_headers)
            await timed(direct_session, f"{env.sim.url}/miss/v2/batches/warm-d-{warm}", direct_headers)
        for round_no in range(mode.miss_rounds):
            gw, direct = [], []
            for i in range(mode.miss_per_round):
                # Interleaved request by request; distinct ids, so every gateway request is a miss.
                direct.append(
                    await timed(direct_session, f"{env.sim.url}/miss/v2/batches/d-{round_no}-{i}", direct_headers)
                )
                gw.append(await timed(gw_session, f"{gateway_url}/v2/batches/g-{round_no}-{i}", gw_headers))
            rounds.append(
                {
                    "gateway_p50": percentile(gw, 50),
                    "gateway_p99": percentile(gw, 99),
                    "direct_p50": percentile(direct, 50),
                    "direct_p99": percentile(direct, 99),
                }
            )
    return {"rounds": rounds}


def scenario_miss(env: Env) -> dict[str, Any]:
    result: dict[str, Any] = {}
    configs = (("access_log on", True), ("access_log off", False))
    for label, access_log in configs[:1] if env.mode.name == "smoke" else configs:
        gateway = env.start_gateway(f"gateway-miss-{'log' if access_log else 'nolog'}", "miss", access_log=access_log)
        measured = uvloop.run(miss_latencies(env, gateway.url))
        env.procs.stop(gateway)
        rounds = measured["rounds"]
        summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        summary["overhead_p50_ms"] = statistics.median(r["gateway_p50"] - r["direct_p50"] for r in rounds)
        summary["overhead_p99_ms"] = statistics.median(r["gateway_p99"] - r["direct_p99"] for r in rounds)
        result[label] = summary
    return result


# --- scenario 4: memory per entry ----------------------------------------------------------------------------------


async def fill(url: str, key: str, prefix: str, count: int, concurrency: int = 48) -> int:
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


def scenario_memory(env: Env) -> dict[str, Any]:
    """RSS of the real gateway process before and after caching N more entries (filled through requests)."""
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
    if errors or cached != entries + warm:
        raise RuntimeError(f"memory fill: {errors} errors, {cached} entries cached, {entries + warm} expected")
    return {
        "entries": entries,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "bytes_per_entry": (after - before) / entries,
        "body_bytes": len(body),
        "fill_rps": entries / took,
    }


async def fetch_any(url: str, key: str, batch_id: str) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v2/batches/{batch_id}", headers={"Authorization": f"Bearer {key}"}) as r,
    ):
        return await r.read()


# --- scenario 5: many callers --------------------------------------------------------------------------------------


def filler_callers(count: int) -> list[dict[str, str]]:
    """``count`` made-up callers, every other one by ``key_sha256``, as a large organisation would list them."""
    callers = []
    for n in range(count):
        key = secrets.token_urlsafe(24)
        if n % 2:
            callers.append({"name": f"filler-{n:05d}", "key_sha256": hashlib.sha256(key.encode()).hexdigest()})
        else:
            callers.append({"name": f"filler-{n:05d}", "key": key})
    return callers


def scenario_callers(env: Env) -> dict[str, Any]:
    """Cache hits with MANY_CALLERS callers configured against 2, alternated, as the last caller configured."""
    if env.wrk is None:
        env.notes.append("scenario 5 (many callers) skipped: wrk is not installed")
        return {}
    few = [{"name": n, "key": k} for n, k in env.keys.items()]
    key = few[-1]["key"]  # the last caller in both configs: a caller list walked in order would find it last
    many = filler_callers(MANY_CALLERS - len(few)) + few
    contenders = {
        f"{len(few)} callers": env.start_gateway("gateway-few-callers", "hit", callers=few),
        f"{len(many)} callers": env.start_gateway("gateway-many-callers", "hit", callers=many),
    }
    compared = compare_hits(env, contenders, key, "callers")
    return {**compared, "many": len(many), "few": len(few)}


def compare_hits(env: Env, contenders: dict[str, Proc], key: str, label: str) -> dict[str, Any]:
    """Cache hits of two gateways alike but for one setting, alternated round by round (wrk, as the caller with
    ``key``, at the first connection count), then stopped; ``ratio`` is the second's req/s over the first's."""
    mode = env.mode
    urls = {name: f"{p.url}/v2/batches/{HIT_BATCH_ID}" for name, p in contenders.items()}
    conns = mode.connections[0]
    for name, url in urls.items():
        check = uvloop.run(fetch_status(url, key))  # the miss that fills the cache
        if check != 200:
            raise RuntimeError(f"{name} answered {check} to the hit request")
        if mode.name != "smoke":
            run_wrk(env, url, conns, 1, key=key)  # warm-up, discarded
    names = list(urls)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_no in range(mode.hit_rounds):
        order = names[round_no % 2 :] + names[: round_no % 2]
        for name in order:
            samples[name].append(run_wrk(env, urls[name], conns, mode.hit_seconds, contenders[name], key=key))
        log(f"{label}: round {round_no + 1}/{mode.hit_rounds} done")
    env.procs.stop_together(list(contenders.values()))
    table = {
        name: {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs),
            "cpu_us": statistics.median(r["cpu_us"] for r in runs),
            "rounds_rps": [round(r["rps"]) for r in runs],
        }
        for name, runs in samples.items()
    }
    # Ratio within each round, then the median, as for the hit comparisons.
    pairs = zip(samples[names[1]], samples[names[0]], strict=True)
    ratio = statistics.median(second["rps"] / first["rps"] for second, first in pairs)
    return {"table": table, "ratio": ratio, "connections": conns}


# --- scenario 6: loading a large config ----------------------------------------------------------------------------


def scenario_config(env: Env) -> dict[str, Any]:
    """Seconds to validate a config of CONFIG_CALLERS callers in this process; and with reading its YAML too."""
    from gateway.config import load_config, validate

    raw: dict[str, Any] = {
        "upstream": {"base_url": "http://127.0.0.1:9", "token": env.token},
        "store": {"path": str(env.workdir / "config-bench.db")},
        "callers": filler_callers(CONFIG_CALLERS),
    }
    path = env.workdir / "config-10k.yaml"
    path.write_text(yaml.safe_dump(raw))
    rounds = 1 if env.mode.name == "smoke" else max(3, env.mode.hit_rounds)
    # Reading the YAML takes seconds at this size (pure-Python PyYAML): not in a smoke run.
    read_yaml = env.mode.name != "smoke"
    validate_s: list[float] = []
    validate_cpu_s: list[float] = []
    for _ in range(rounds):
        document = json.loads(json.dumps(raw))  # a fresh document each time, copied outside the timing
        began, began_cpu = time.perf_counter(), time.process_time()
        config = validate(document, {})
        validate_s.append(time.perf_counter() - began)
        # CPU time too: on a shared machine the wall clock also counts waiting for a core.
        validate_cpu_s.append(time.process_time() - began_cpu)
        if len(config.callers) != CONFIG_CALLERS:
            raise RuntimeError(f"validate kept {len(config.callers)} of {CONFIG_CALLERS} callers")
    load_yaml_s = None
    if read_yaml:  # once: it is for information, and slow
        began = time.perf_counter()
        load_config(path, {})
        load_yaml_s = time.perf_counter() - began
    log(f"config: validate {statistics.median(validate_s):.3f} s, with YAML {fmt(load_yaml_s, 3)} s")
    return {
        "callers": CONFIG_CALLERS,
        "rounds": rounds,
        "validate_s": statistics.median(validate_s),
        "validate_max_s": max(validate_s),
        "validate_cpu_s": statistics.median(validate_cpu_s),
        "load_yaml_s": load_yaml_s,
        "yaml_bytes": path.stat().st_size,
    }


# --- scenario 7: time to notice (DESIGN §9) ------------------------------------------------------------------------

NOTICE_POLL_S = 0.5  # the polling callers' interval (nginx and the gateway with plain polling)
NOTICE_WAIT_S = 25  # the long-poll callers' Prefer: wait=N
NOTICE_GRACE_S = 15.0  # after the last change, how long callers may still take to notice it
NOTICE_MAX_REQUESTS = 10_000  # per caller: a bound on any loop that goes wrong
NOTICE_SEED = 9  # the same completion moments for every contender, and in every run
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


async def notice_round(
    env: Env, ns: str, base: str, headers: dict[str, str], long_poll: bool, schedule: dict[str, float]
) -> dict[str, Any]:
    """One contender on a fresh simulator namespace: schedule the changes, run one caller per batch until it notices."""
    assert env.sim is not None
    sim_url = env.sim.url
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as control:
        async with control.post(f"{sim_url}/_bench/reset", params={"ns": ns}) as r:
            r.raise_for_status()
        before = time.monotonic()
        async with control.post(f"{sim_url}/_bench/schedule", params={"ns": ns}, json={"complete_in": schedule}) as r:
            r.raise_for_status()
            scheduled = await r.json()
        start = (before + time.monotonic()) / 2
        # The simulator's clock time -> this process's, within half a round trip (both are monotonic clocks).
        changed = {b: start + (at - scheduled["now"]) for b, at in scheduled["complete_at"].items()}
        deadline = start + max(schedule.values()) + NOTICE_GRACE_S
        callers = {batch_id: NoticeCaller() for batch_id in schedule}
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
        phases = [(n * 0.6180339887) % 1.0 * NOTICE_POLL_S for n in range(len(schedule))]
        await asyncio.wait_for(
            asyncio.gather(*(caller(b, p) for b, p in zip(schedule, phases, strict=True))),
            timeout=deadline - time.monotonic() + per_request_s + 5,
        )
        ended = max((c.noticed_at for c in callers.values() if c.noticed_at is not None), default=time.monotonic())
        async with control.get(f"{sim_url}/_bench/stats", params={"ns": ns}) as r:
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
        "requests": sum(c.requests for c in callers.values()),
        "not_modified": sum(c.not_modified for c in callers.values()),
        "failures": sum(c.failures for c in callers.values()),
        "without_etag": sum(c.without_etag for c in callers.values()),
        "waits_applied": sum(c.waits_applied for c in callers.values()),
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


def scenario_notice(env: Env) -> dict[str, Any]:
    """DESIGN §9's figure: from a batch changing upstream to its waiting caller holding the new state."""
    mode = env.mode
    schedule = notice_schedule(mode)
    headers = {"Authorization": f"Bearer {env.key}"}
    results: dict[str, dict[str, Any] | None] = dict.fromkeys(NOTICE_CONTENDERS)
    # nginx first: its upstream call rate in this set-up is the gateway's budget.
    if env.nginx is not None:
        nginx = env.start_nginx("nginx-notice", "notice-nginx")
        log(f"notice: nginx, {len(schedule)} callers polling every {NOTICE_POLL_S:g} s")
        measured = uvloop.run(notice_round(env, "notice-nginx", nginx.url, headers, False, schedule))
        env.procs.stop(nginx)
        results["nginx"] = measured
        rate = measured["calls_per_s"]
        budget_from = "nginx's upstream call rate in this set-up"
    else:
        env.notes.append("time to notice: nginx is not installed; the gateway's budget is one call per batch per 5 s")
        rate = len(schedule) / TTL_ACTIVE_S
        budget_from = "one call per batch per active TTL (nginx is not installed)"
    # Rounded down, so never above nginx's rate; the burst lets every batch's first fetch through at once,
    # as nginx's own first fetches go.
    budget = (max(0.1, math.floor(rate * 100) / 100), len(schedule))
    log(f"notice: gateway budget {budget[0]:g} calls/s, burst {budget[1]} ({budget_from})")
    polling = env.start_gateway("gateway-notice-poll", "notice-poll", budget=budget)
    log(f"notice: gateway, {len(schedule)} callers polling every {NOTICE_POLL_S:g} s")
    results["gateway (polling)"] = uvloop.run(notice_round(env, "notice-poll", polling.url, headers, False, schedule))
    env.procs.stop(polling)
    waiting = start_long_poll_gateway(env, budget)
    if waiting is not None:
        etag, applied = uvloop.run(probe_long_poll(waiting.url, env.key))
        if etag is None:
            env.notes.append(
                "time to notice: the gateway sent no ETag (DESIGN §9 is not in this build): the long-poll contender "
                "was not run and its figures are null"
            )
        else:
            log(f"notice: gateway, {len(schedule)} long-poll callers (Prefer: wait={NOTICE_WAIT_S}; probe: {applied})")
            results["gateway (long-poll)"] = uvloop.run(
                notice_round(env, "notice-wait", waiting.url, headers, True, schedule)
            )
        env.procs.stop(waiting)
    return {
        "contenders": results,
        "budget": {"requests_per_s": budget[0], "burst": budget[1], "from": budget_from},
        "batches": len(schedule),
        "window_s": mode.notice_window_s,
    }


# --- scenario 8: replicas on one Redis (DESIGN §10) ----------------------------------------------------------------

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


def scenario_replicas(env: Env) -> dict[str, Any]:
    """DESIGN §10: the lifecycle workload through 3 replicas on one Redis, 3 without and 1 process; the 3 on Redis
    again with Redis killed in the middle; then hits of one process with redis.url against one without."""
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
    env.procs.stop_together(groups["no_redis"])
    before = [uvloop.run(redis_transitions(p.url)) for p in groups["redis"]]

    outage = RedisOutage(env, redis, mode.outage_s)
    log(f"replicas: again on new batches, Redis killed for {mode.outage_s:g} s in the middle of {mode.window_s:g} s")
    again = {"outage": targets["redis"]}
    rows |= replica_rows(uvloop.run(lifecycle(env, again, fault=outage, prefix="again")), {"outage": OUTAGE_RUN})
    after = [uvloop.run(redis_transitions(p.url)) for p in groups["redis"]]
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


def replica_hits(env: Env, redis: Proc) -> dict[str, Any]:
    """Cache hits of a fresh process with redis.url set against a fresh one without, alike but for that, alternated
    (a fresh hit in a process's own memory does not touch Redis, DESIGN §10)."""
    if env.wrk is None:
        env.notes.append("scenario 8: hits with redis.url not measured: wrk is not installed")
        return {}
    starters = [
        replica_starters(env, ReplicaRun(label, "hit", 1, on_redis), redis, f"gateway-hit-{tag}")[0]
        for label, on_redis, tag in ((HIT_LOCAL, False, "local"), (HIT_REDIS, True, "redis"))
    ]
    contenders = dict(zip((HIT_LOCAL, HIT_REDIS), start_together(starters), strict=True))
    return compare_hits(env, contenders, env.key, "replicas: hits")


def summarize_replicas(replicas: dict[str, Any]) -> dict[str, Any]:
    """Scenario 8's keys: upstream calls of the 3 replicas (on Redis, then without) over those of 1 process; failed
    polls while Redis was killed; hits with redis.url over hits without."""
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


def replicas_lines(env: Env, replicas: dict[str, Any]) -> list[str]:
    lines = ["", f"### 8. {REPLICAS} replicas sharing one Redis (DESIGN §10)", ""]
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
        "| set-up | processes | upstream calls | vs 1 process | vs ideal | polls served | failed polls |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    one = rows["one"]["calls"]
    for row in rows.values():
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(row["failure_kinds"].items()))
        lines.append(
            f"| {row['label']} | {row['processes']} | {row['calls']} | {fmt(row['calls'] / one if one else None, 3)} | "
            f"{fmt(row['calls'] / row['ideal'] if row['ideal'] else None, 3)} | {row['polls']} | "
            f"{row['failures']}{f' ({kinds})' if kinds else ''} |"
        )
    hits = replicas["hits"]
    if not hits:
        return [*lines, "", "Cache hits with redis.url: not measured (wrk is not installed)."]
    lines += [
        "",
        f"Cache hits, then, of two fresh processes alike but for redis.url (on the restarted Redis), the others "
        f"stopped: wrk on one id, terminal and cached, {hits['connections']} connections, {mode.hit_rounds} round(s) "
        f"of {mode.hit_seconds} s, alternated:",
        "",
        "| gateway | req/s | p50 ms | p99 ms | server CPU µs/req | errors | req/s per round |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in hits["table"].items():
        lines.append(
            f"| {name} | {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['cpu_us']:.1f} | "
            f"{row['errors']:.0f} | {', '.join(map(str, row['rounds_rps']))} |"
        )
    return [*lines, "", f"Ratio (with over without, median of the rounds' ratios): {hits['ratio']:.3f}."]


# --- report --------------------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    versions = {}
    for tool, args in (("wrk", ["wrk", "--version"]), ("nginx", ["nginx", "-v"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(args, capture_output=True, text=True, timeout=5, check=False)
            versions[tool] = (out.stdout + out.stderr).strip().splitlines()[0]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "os": platform.platform(),
        **versions,
    }


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON line: every key of KEYS (None when its scenario was skipped), a few more, and the verdicts."""
    hits, life, miss, mem = (results[key] for key in ("hits", "upstream", "miss", "memory"))
    callers, config = results["callers"], results["config"]
    out: dict[str, Any] = dict.fromkeys(KEYS)
    if hits:
        table, ratios = hits["table"], hits["ratios"]
        conns = min(next(iter(table.values())))
        out["hit_rps"] = round(table["gateway"][conns]["rps"])
        out["ceiling_rps"] = round(table["ceiling"][conns]["rps"])
        out["nginx_rps"] = round(table["nginx"][conns]["rps"]) if "nginx" in table else None
        out["hit_vs_ceiling"] = _round(ratios.get(f"gateway/ceiling@{conns}"), 3)
        out["hit_vs_nginx"] = _round(ratios.get(f"gateway/nginx@{conns}"), 3)
        out["hit_connections"] = conns
        out["hit_rps_access_log_off"] = round(table["gateway (access_log off)"][conns]["rps"])
        out["hit_vs_ceiling_access_log_off"] = _round(ratios.get(f"gateway (access_log off)/ceiling@{conns}"), 3)
        out["hit_vs_ceiling_cpu"] = _round(hits["cpu_ratios"].get(f"gateway/ceiling@{conns}"), 3)
    if life:
        calls = life["calls"]
        out["upstream_amplification"] = round(calls["gateway"] / life["ideal"], 3)
        out["upstream_calls_vs_nginx"] = round(calls["gateway"] / calls["nginx"], 3) if "nginx" in calls else None
        out["upstream_calls"] = {**calls, "ideal": life["ideal"]}
    if miss:
        on = miss["access_log on"]
        out["miss_overhead_p50_ms"] = round(on["overhead_p50_ms"], 3)
        out["miss_overhead_p99_ms"] = round(on["overhead_p99_ms"], 3)
    if mem:
        out["bytes_per_entry"] = round(mem["bytes_per_entry"])
    if callers:
        out["hit_rps_many_callers_ratio"] = round(callers["ratio"], 3)
        out["hit_rps_many_callers"] = round(callers["table"][f"{callers['many']} callers"]["rps"])
    if config:
        out["config_load_s_10k_callers"] = round(config["validate_s"], 3)
        out["config_load_cpu_s_10k_callers"] = round(config["validate_cpu_s"], 3)
        out["config_load_s_10k_callers_yaml"] = _round(config["load_yaml_s"], 3)
    if results.get("notice"):
        out.update(summarize_notice(results["notice"]))
    if results.get("replicas"):
        out.update(summarize_replicas(results["replicas"]))
    out["targets"] = {key: verdict(out.get(key), op, bound) for key, (op, bound) in TARGETS.items()}
    return out


def summarize_notice(notice: dict[str, Any]) -> dict[str, Any]:
    """Scenario 7's keys: null for a contender that did not run (nginx missing, or a gateway without §9)."""
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


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def verdict(value: float | None, op: str, bound: float) -> str:
    if value is None:
        return "SKIPPED"
    ok = value >= bound if op == ">=" else value <= bound
    return "PASS" if ok else "MISS"


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a (skipped)"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report_lines(env: Env, results: dict[str, dict[str, Any]], out: dict[str, Any]) -> list[str]:
    """The results as Markdown tables (printed as they are, and written to RESULTS.md)."""
    hits, life, miss, mem = (results[key] for key in ("hits", "upstream", "miss", "memory"))
    lines = ["### 1. Cache-hit throughput and latency (wrk, 1 thread, keep-alive)", ""]
    if hits:
        lines += [
            f"Body: {hits['body_bytes']} bytes. Median of {env.mode.hit_rounds} rounds of {env.mode.hit_seconds} s "
            "each, contenders alternated.",
            "",
            "| contender | connections | req/s | p50 ms | p99 ms | server CPU µs/req | errors | req/s per round |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, by_conns in hits["table"].items():
            for conns, row in sorted(by_conns.items()):
                lines.append(
                    f"| {name} | {conns} | {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                    f"{row['cpu_us']:.1f} | {row['errors']:.0f} | {', '.join(map(str, row['rounds_rps']))} |"
                )
        lines += [
            "",
            "| ratio (median over rounds) | throughput (req/s ratio) | CPU efficiency (inverse CPU µs/req ratio) |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {name} | {fmt(value, 3)} | {fmt(hits['cpu_ratios'][name], 3)} |"
            for name, value in hits["ratios"].items()
            if value is not None
        ]
    else:
        lines.append("Skipped: wrk is not installed (hit_rps, ceiling_rps, nginx_rps and their ratios are null).")
    lines += ["", "### 2. Upstream calls on a lifecycle workload", ""]
    if life:
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
        lines.append(f"| ideal | {life['ideal']} | 1.000 | | |")
    lines += ["", "### 3. Miss-path overhead (sequential requests, distinct ids, interleaved with direct calls)", ""]
    if miss:
        lines += [
            "| gateway config | gateway p50 ms | direct p50 ms | overhead p50 ms | gateway p99 ms | direct p99 ms "
            "| overhead p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, s in miss.items():
            lines.append(
                f"| {label} | {s['gateway_p50']:.3f} | {s['direct_p50']:.3f} | {s['overhead_p50_ms']:.3f} | "
                f"{s['gateway_p99']:.3f} | {s['direct_p99']:.3f} | {s['overhead_p99_ms']:.3f} |"
            )
    lines += ["", "### 4. Memory per cached entry (RSS of the running gateway, filled through requests)", ""]
    if mem:
        lines += [
            "| entries added | body bytes | RSS before MiB | RSS after MiB | bytes per entry | fill req/s |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {mem['entries']} | {mem['body_bytes']} | {mem['rss_before_mb']:.1f} | {mem['rss_after_mb']:.1f} | "
            f"{mem['bytes_per_entry']:.0f} | {mem['fill_rps']:.0f} |",
        ]
    lines += callers_lines(env, results["callers"]) + config_lines(results["config"])
    lines += notice_lines(results.get("notice") or {})
    lines += replicas_lines(env, results.get("replicas") or {})
    lines += ["", "### Targets", "", "| key | value | target | verdict |", "|---|---:|---|---|"]
    for key, (op, bound) in TARGETS.items():
        lines.append(f"| {key} | {fmt(out.get(key), 3)} | {op} {bound:g} | {out['targets'][key]} |")
    if env.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in env.notes]
    return lines


def callers_lines(env: Env, callers: dict[str, Any]) -> list[str]:
    lines = ["", f"### 5. Cache hits with {MANY_CALLERS} callers configured against 2 (wrk, as the last caller)", ""]
    if not callers:
        return [*lines, "Skipped (wrk is not installed, or not asked for)."]
    lines += [
        f"Two gateways, alike but for their caller lists, alternated; {env.mode.hit_rounds} round(s) of "
        f"{env.mode.hit_seconds} s at {callers['connections']} connections; every request uses the key of the last "
        f"caller configured (of {MANY_CALLERS}: half by key, half by key_sha256). Ratio: {callers['many']}-caller "
        f"req/s over {callers['few']}-caller req/s, within each round, median.",
        "",
        "| gateway | req/s | p50 ms | p99 ms | server CPU µs/req | errors | req/s per round |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in callers["table"].items():
        lines.append(
            f"| {name} | {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['cpu_us']:.1f} | "
            f"{row['errors']:.0f} | {', '.join(map(str, row['rounds_rps']))} |"
        )
    return [*lines, "", f"Ratio: {callers['ratio']:.3f}."]


def config_lines(config: dict[str, Any]) -> list[str]:
    lines = ["", f"### 6. Loading a config with {CONFIG_CALLERS} callers (in-process)", ""]
    if not config:
        return [*lines, "Skipped (not asked for)."]
    return [
        *lines,
        f"Callers half by key, half by key_sha256; median of {config['rounds']} runs.",
        "",
        "| step | seconds (median) | seconds (max) | CPU seconds (median) |",
        "|---|---:|---:|---:|",
        f"| gateway.config.validate | {config['validate_s']:.3f} | {config['validate_max_s']:.3f} | "
        f"{config['validate_cpu_s']:.3f} |",
        f"| load_config: read {config['yaml_bytes'] / 2**20:.1f} MiB of YAML, then validate (one run) | "
        f"{fmt(config['load_yaml_s'], 3)} | | |",
    ]


def notice_lines(notice: dict[str, Any]) -> list[str]:
    lines = ["", "### 7. Time to notice a change (DESIGN §9)", ""]
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


def notice_chart(notice: dict[str, Any], path: Path) -> bool:
    """The three contenders' notice delays side by side: a box per contender, every batch as a dot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install '.[bench]'): no chart")
        return False
    fig, axis = plt.subplots(figsize=(8, 4.8))
    colors = {"nginx": "tab:orange", "gateway (polling)": "tab:cyan", "gateway (long-poll)": "tab:blue"}
    for position, (name, row) in enumerate(notice["contenders"].items(), start=1):
        if row is None:
            axis.text(position, 0.5, "not run", ha="center", color="gray")
            continue
        delays = [d for d in row["delays"].values() if d is not None]
        if delays:
            axis.boxplot([delays], positions=[position], widths=0.5, showfliers=False)
            spread = [position + ((n * 0.6180339887) % 1.0 - 0.5) * 0.3 for n in range(len(delays))]
            axis.scatter(spread, delays, s=12, alpha=0.6, color=colors.get(name))
    labels = []
    for name, row in notice["contenders"].items():
        labels.append(f"{name}\np50 {row['p50_s']:.2f} s, {row['calls']} calls" if row else f"{name}\n(not run)")
    axis.set_xticks(range(1, len(labels) + 1), labels)
    axis.set_xlim(0.5, len(labels) + 0.5)
    axis.set_ylabel("seconds from the upstream change to the caller holding it")
    axis.set_ylim(bottom=0)
    axis.grid(axis="y", alpha=0.3)
    budget = notice["budget"]
    axis.set_title(
        f"Time to notice: {notice['batches']} batches complete within {notice['window_s']:g} s; "
        f"gateway budget {budget['requests_per_s']:g} calls/s",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def chart(life: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install '.[bench]'): no chart")
        return False
    fig, (near, everything) = plt.subplots(1, 2, figsize=(12, 4.8))
    times = [0.0] + [t for t, _ in life["timeline"]]
    colors = {"gateway": "tab:blue", "nginx": "tab:orange", "direct": "tab:red"}
    ideal = life["ideal_times"]
    for axis, names in ((near, [n for n in life["calls"] if n != "direct"]), (everything, list(life["calls"]))):
        for name in names:
            counts = [0] + [c[name] for _, c in life["timeline"]]
            axis.plot(times, counts, label=f"{name}: {life['calls'][name]} calls", color=colors.get(name))
        axis.step([0.0, *ideal], range(len(ideal) + 1), where="post", color="gray", ls="--")
        axis.plot([], [], color="gray", ls="--", label=f"ideal: {len(ideal)} calls")
        axis.set_xlabel("seconds since the pollers started")
        axis.set_ylabel("upstream calls so far")
        axis.legend(loc="upper left")
        axis.grid(alpha=0.3)
    near.set_title("Gateway and nginx (fixed TTL) against the ideal")
    everything.set_yscale("log")
    everything.set_title("With direct polling (log scale)")
    mode = life["mode"]
    fig.suptitle(
        f"Upstream calls: {mode.pollers} pollers poll {mode.batches} batches every {mode.poll_interval_s:g} s; "
        f"batches end within {mode.lifetime_s:g} s",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(
    path: Path, env: Env, lines: list[str], out: dict[str, Any], took_s: float, chart_name: str, notice_chart_name: str
) -> None:
    info = machine()
    header = [
        "# Benchmark results",
        "",
        f"Full run of `python bench/run.py` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"took {took_s / 60:.1f} minutes.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} memory, {info['os']}; "
        f"Python {info['python']}, aiohttp {info['aiohttp']}; {info.get('wrk', 'no wrk')}; "
        f"{info.get('nginx', 'no nginx')}. The CPUs were shared with other work during the run, so absolute "
        "numbers are noisy; the ratios compare contenders measured alternately within the run.",
        "",
        f"![upstream calls over time]({chart_name})",
        "",
        f"![time to notice a change, per contender]({notice_chart_name})",
        "",
        *CONTENDERS,
        "",
    ]
    footer = ["", "JSON line:", "", "```json", json.dumps(out), "```", ""]
    path.write_text("\n".join(header + lines + footer))


# --- main ----------------------------------------------------------------------------------------------------------


def run(mode: Mode, out_dir: Path, allow_install: bool, only: set[str], candidate: str | None = None) -> int:
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        keys = {f"bench-caller-{n}": secrets.token_urlsafe(24) for n in range(2)}
        env = Env(mode, procs, workdir, token=f"bench-upstream-{secrets.token_hex(12)}", keys=keys)
        env.candidate_python = candidate
        tools, notes = find_tools(allow_install and mode.install)
        env.wrk, env.nginx, env.redis = tools["wrk"], tools["nginx"], tools["redis-server"]
        env.notes += notes
        try:
            env.start_simulator(
                {
                    "hit": 0.001,
                    "gw": mode.lifetime_s,
                    "nginx": mode.lifetime_s,
                    "direct": mode.lifetime_s,
                    "miss": 60,
                    "mem": 0.001,
                    # Scenario 7's batches are scheduled (Simulator.schedule): their lifetime plays no part.
                    "notice-nginx": 3600,
                    "notice-poll": 3600,
                    "notice-wait": 3600,
                    # Scenario 8: the lifecycle workload again, once per set-up.
                    **{run.ns: mode.lifetime_s for run in REPLICA_RUNS.values()},
                }
            )
            steps: dict[str, tuple[str, Callable[[Env], dict[str, Any]]]] = {
                "hits": ("scenario 1: cache hits", scenario_hits),
                "upstream": ("scenario 2: upstream amplification", scenario_lifecycle),
                "miss": ("scenario 3: miss-path overhead", scenario_miss),
                "memory": ("scenario 4: memory per entry", scenario_memory),
                "callers": (f"scenario 5: hits with {MANY_CALLERS} callers", scenario_callers),
                "config": (f"scenario 6: loading {CONFIG_CALLERS} callers", scenario_config),
                "notice": ("scenario 7: time to notice", scenario_notice),
                "replicas": ("scenario 8: replicas on Redis", scenario_replicas),
            }
            results = {key: timed_step(key, name, only, partial(step, env)) for key, (name, step) in steps.items()}
        finally:
            procs.stop_all()
        if env.nginx is None:
            env.notes.append("nginx is not installed: nginx_rps, hit_vs_nginx and upstream_calls_vs_nginx are null")
        out = summarize(results)
        out["mode"] = mode.name
        lines = report_lines(env, results, out)
        life = results["upstream"]
        print("\n".join(lines))
        out_dir.mkdir(parents=True, exist_ok=True)
        chart_path = out_dir / "upstream_calls.png"
        if life and chart(life, chart_path):
            print(f"\nChart: {chart_path}")
        notice_path = out_dir / "notice_delays.png"
        if results["notice"] and notice_chart(results["notice"], notice_path):
            print(f"Chart: {notice_path}")
        if mode.name == "full" and only == set(SCENARIOS):
            took = time.monotonic() - began
            write_results(out_dir / "RESULTS.md", env, lines, out, took, chart_path.name, notice_path.name)
            print(f"Results: {out_dir / 'RESULTS.md'}")
        for key, verdict_ in out["targets"].items():
            print(f"{verdict_}: {key} = {fmt(out.get(key), 3)} (target {TARGETS[key][0]} {TARGETS[key][1]:g})")
        print(f"Took {time.monotonic() - began:.0f} s ({mode.name}).")
        print(json.dumps(out))
    return 0


def timed_step(key: str, name: str, only: set[str], step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if key not in only:
        return {}
    log(f"{name}...")
    began = time.monotonic()
    result = step()
    log(f"{name}: {time.monotonic() - began:.0f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about 4 minutes)")
    group.add_argument("--smoke", action="store_true", help="every scenario once, minimally (a few seconds)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk/nginx")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated scenarios to run (default: all of {SCENARIOS})"
    )
    parser.add_argument(
        "--candidate-python",
        help="also measure cache hits of the gateway installed for this interpreter (e.g. a patched copy's venv)",
    )
    parser.add_argument("--out", type=Path, help="where the chart (and, in a full run, RESULTS.md) go")
    args = parser.parse_args(argv)
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.out is None:
        args.out = BENCH if mode.name == "full" else Path(tempfile.gettempdir()) / f"gateway-bench-{mode.name}"
    only = set(args.only.split(","))
    if only - set(SCENARIOS):
        parser.error(f"--only: unknown scenario(s) {sorted(only - set(SCENARIOS))}")
    return run(mode, args.out, allow_install=not args.no_install, only=only, candidate=args.candidate_python)


if __name__ == "__main__":
    sys.exit(main())
