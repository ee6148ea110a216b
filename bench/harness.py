"""What every scenario stands on: the run's modes, the processes it starts and their ports, the tools it installs
(wrk, nginx, redis-server, from Debian), and wrk itself.

Every server runs in its own process on 127.0.0.1 (``Processes`` stops them all on the way out); ``Env`` holds what
the scenarios share and starts each kind of server: the simulated upstream (bench/sim_server.py), the gateway
(``python -m gateway --config <generated>``), the framework ceiling (bench/ceiling.py), Debian's nginx
(bench/nginx.conf.template) and Debian's redis-server.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.modes import Mode

BENCH = Path(__file__).resolve().parent
TTL_ACTIVE_S = 5.0
TTL_TERMINAL_S = 86400.0
TTL_NOT_FOUND_S = 10.0
HIT_BATCH_ID = "hit-batch-0001"
# A bound, not a wait: on a shared 2-core machine, several gateways starting at once took 17 s (scenario 8).
START_WITHIN_S = 60.0
# libyaml's dumper when PyYAML has it: the pure-Python one takes seconds for a config of 10,000 callers.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a (skipped)"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[index]


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


# --- the servers ---------------------------------------------------------------------------------------------------


@dataclass
class Env:
    """What every scenario shares: the processes, the simulator, the secrets, the tools found."""

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
        ttl = {"active": TTL_ACTIVE_S, "terminal": TTL_TERMINAL_S, "not_found": TTL_NOT_FOUND_S}
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
            "cache": {"max_entries": max_entries, "ttl_s": {**ttl, **extra.pop("ttl_s", {})}, **extra},
            "logging": {"level": "INFO", "access_log": access_log},
            "callers": callers if callers is not None else [{"name": n, "key": k} for n, k in self.keys.items()],
            # A store of its own: what one gateway followed or recorded must not reach the next scenario's.
            "store": {"path": str(self.workdir / f"{name}.db")},
            **(sections or {}),
        }
        path = self.workdir / f"{name}.yaml"
        # Block-style YAML, as an operator writes it (a SIGHUP reads this file again: scenario 9).
        path.write_text(yaml.dump(config, Dumper=_YAML_DUMPER, sort_keys=False))
        return self.procs.start(name, [python, "-m", "gateway", "--config", str(path)], port)

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


def _found_tools() -> dict[str, str | None]:
    return {
        tool: shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
        for tool in TOOLS
    }


def find_tools(allow_install: bool) -> tuple[dict[str, str | None], list[str]]:
    """wrk, nginx and redis-server (name -> path, None if missing), installed from Debian if missing and allowed;
    and what was done."""
    notes: list[str] = []
    tools = _found_tools()
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
    return _found_tools(), notes


# --- wrk -----------------------------------------------------------------------------------------------------------

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
