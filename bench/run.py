"""The benchmark: the gateway side by side with what users would run instead.

    python bench/run.py            # full run (about 20 minutes): writes bench/RESULTS.md and its two charts
    python bench/run.py --quick    # about 5 minutes; results go to a temporary folder
    python bench/run.py --smoke    # under a minute: every scenario once, minimally (CI)
    python bench/run.py --quick --only callers,config   # just some scenarios (see --help)
    python bench/run.py --quick --only notice           # time to notice a change (docs/design.md §9)
    python bench/run.py --quick --only replicas         # replicas sharing one Redis (docs/design.md §10)
    python bench/run.py --quick --only reload           # a SIGHUP under a busy connection
    python bench/run.py --quick --only feed             # the event feed: notice on a stream, fan-out (§12)

Every server runs in its own process on 127.0.0.1: the simulated upstream
(bench/sim_server.py, the gateway's own ``gateway.demo.simulator.Simulator``), the
gateway (``python -m gateway --config <generated>``), the framework
ceiling (bench/ceiling.py) and Debian's nginx (bench/nginx.conf.template).
wrk generates the cache-hit load; the other scenarios use an aiohttp client
in this process. Each comparison alternates its contenders within one run,
for several rounds, and reports medians and ratios. The scenarios, one module
each in bench/scenarios/: 1 hits, 2 upstream (calls on a lifecycle workload),
3 miss (overhead), 4 memory (per entry), 5 callers (hits with 2,000 callers),
6 config (validating 10,000 callers, in this process), 7 notice (time to
notice a change, docs/design.md §9: nginx, the gateway polled, the gateway waited on),
8 replicas (docs/design.md §10: 3 processes on one redis-server, Debian's, then
Redis killed mid-run, then hits with redis.url), 9 reload (the longest gap
between answers on a busy connection while SIGHUP reloads 10,000 callers),
10 downloads (a dataset part through the gateway against storage directly),
11 feed (the event feed's time to notice, and a stream's fan-out), 12 follow
(the calls of following 1,000 batches against 10), 13 uploads (a dataset
upload through the gateway against straight to storage), 14 webhooks
(deliveries per second, and what an outage and a SIGKILL cost).

The last line on stdout is one JSON object (see ``bench.report.KEYS``).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# `python bench/run.py` puts bench/ itself first on the path; the package is imported from the folder above it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.harness import BENCH, Env, Processes, find_tools, log
from bench.modes import MODES, Mode
from bench.scenarios import SCENARIOS
from bench.scenarios.replicas import REPLICA_RUNS


def simulator_namespaces(mode: Mode) -> dict[str, float]:
    """Each namespace of the simulator the scenarios use, and how long its batches stay active (seconds)."""
    return {
        "hit": 0.001,  # scenarios 1, 5, 8 (hits) and 9: terminal at once, then cached
        "gw": mode.lifetime_s,
        "nginx": mode.lifetime_s,
        "direct": mode.lifetime_s,
        "miss": 60,
        "mem": 0.001,
        # Scenario 7's batches are scheduled (Simulator.schedule): their lifetime plays no part.
        "notice-nginx": 3600,
        "notice-poll": 3600,
        "notice-wait": 3600,
        # Scenario 12's batches are scheduled too.
        "follow-10": 3600,
        "follow-1000": 3600,
        "webhooks": 3600,  # scenario 14: each batch retrieved is new and active, so one event
        # Scenario 11: the feed's time to notice (scheduled, as scenario 7's) and its fan-out (active all along).
        "feed-wait": 3600,
        "feed-fanout": 3600,
        # Scenario 8: the lifecycle workload again, once per set-up.
        **{run.ns: mode.lifetime_s for run in REPLICA_RUNS.values()},
    }


def measure(env: Env, only: set[str]) -> dict[str, dict[str, Any]]:
    """Every scenario asked for, in order (``{}`` for the others); every process stopped at the end."""
    try:
        env.start_simulator(simulator_namespaces(env.mode))
        results: dict[str, dict[str, Any]] = {}
        for name, scenario in SCENARIOS.items():
            results[name] = {}
            if name in only:
                log(f"{scenario.TITLE}...")
                began = time.monotonic()
                results[name] = scenario.measure(env)
                log(f"{scenario.TITLE}: {time.monotonic() - began:.0f} s")
        return results
    finally:
        env.procs.stop_all()


def run(mode: Mode, out_dir: Path, allow_install: bool, only: set[str], candidate: str | None = None) -> int:
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)
        keys = {f"bench-caller-{n}": secrets.token_urlsafe(24) for n in range(2)}
        token = f"bench-upstream-{secrets.token_hex(12)}"
        env = Env(mode, Processes(workdir), workdir, token=token, keys=keys, candidate_python=candidate)
        tools, notes = find_tools(allow_install and mode.install)
        env.wrk, env.nginx, env.redis = tools["wrk"], tools["nginx"], tools["redis-server"]
        env.notes += notes
        results = measure(env, only)
        if env.nginx is None:
            env.notes.append("nginx is not installed: nginx_rps, hit_vs_nginx and upstream_calls_vs_nginx are null")
        out = report.summarize(results)
        out["mode"] = mode.name
        lines = report.report_lines(env, results, out)
        print("\n".join(lines))
        out_dir.mkdir(parents=True, exist_ok=True)
        charts = report.draw_charts(results, out_dir)
        if charts:
            print("\n" + "\n".join(f"Chart: {path}" for path in charts))
        if mode.name == "full" and only == set(SCENARIOS):
            report.write_results(out_dir / "RESULTS.md", lines, out, time.monotonic() - began)
            print(f"Results: {out_dir / 'RESULTS.md'}")
        print("\n".join(report.verdict_lines(out)))
        print(f"Took {time.monotonic() - began:.0f} s ({mode.name}).")
        print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about 5 minutes)")
    group.add_argument("--smoke", action="store_true", help="every scenario once, minimally (under a minute)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk/nginx/redis-server")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run (default: all of {tuple(SCENARIOS)})",
    )
    parser.add_argument(
        "--candidate-python",
        help="also measure cache hits of the gateway installed for this interpreter (e.g. a patched copy's venv)",
    )
    parser.add_argument("--out", type=Path, help="where the charts (and, in a full run, RESULTS.md) go")
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
