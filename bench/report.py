"""The results, reported: the JSON line (``KEYS`` and the verdicts on ``TARGETS``), the Markdown tables (each
scenario writes its own section), RESULTS.md for a full run, and the two charts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import Env, fmt, log
from bench.scenarios import SCENARIOS

# Every key of the JSON line that docs/benchmark.md describes: null when its scenario was skipped.
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
    "reload_stall_ms_10k_callers",
    "follow_calls_ratio_1000_vs_10",
    "webhook_events_per_s",
    "webhook_lost_after_outage",
    "webhook_duplicates_after_outage",
    "feed_notice_p50_s",
    "feed_calls",
    "feed_notice_p50_vs_nginx",
    "feed_calls_vs_nginx",
    "sse_fanout_p99_s",
    "sse_rss_per_stream_kb",
    "download_vs_direct",
    "download_rss_growth_mb",
    "upload_vs_direct",
    "upload_rss_growth_mb",
)
# key: (comparison, bound)
TARGETS = {
    "hit_vs_ceiling": (">=", 0.9),
    "upstream_amplification": ("<=", 1.05),
    "miss_overhead_p50_ms": ("<=", 2.0),
    "bytes_per_entry": ("<=", 2048.0),
    "hit_rps_many_callers_ratio": (">=", 0.9),
    "config_load_s_10k_callers": ("<=", 0.5),
    # docs/design.md §9: long-poll callers notice a change in half nginx's time (p50), at no more upstream calls.
    "notice_p50_vs_nginx": ("<=", 0.5),
    "notice_calls_vs_nginx": ("<=", 1.0),
    # docs/design.md §10: 3 replicas on one Redis make the upstream calls of one process, survive Redis going away
    # with no failed poll, and a process with redis.url serves hits as fast as one without.
    "replica_amplification": ("<=", 1.1),
    "redis_outage_failed_polls": ("<=", 0),
    "hit_rps_redis_vs_local": (">=", 0.9),
    # A SIGHUP holds no connection longer than a slow answer: the reload is read and checked off the event loop.
    "reload_stall_ms_10k_callers": ("<=", 50.0),
    # docs/design.md §12: following 1,000 batches costs about what following 10 does (one list call per interval).
    "follow_calls_ratio_1000_vs_10": ("<=", 1.5),
    # docs/design.md §12: webhooks keep up with a backlog, and an outage with a crash in it loses nothing.
    "webhook_events_per_s": (">=", 500.0),
    "webhook_lost_after_outage": ("<=", 0),
    "webhook_duplicates_after_outage": ("<=", 1),
    # docs/design.md §12: a consumer of the event stream notices a change in a third of nginx's time, at no more
    # upstream calls; one event reaches 1,000 open streams within a second; an open stream costs little memory.
    "feed_notice_p50_vs_nginx": ("<=", 0.35),
    "feed_calls_vs_nginx": ("<=", 1.0),
    "sse_fanout_p99_s": ("<=", 1.0),
    "sse_rss_per_stream_kb": ("<=", 64.0),
    # docs/design.md §11: a part downloaded through a gateway URL comes nearly as fast as from storage, never held.
    "download_vs_direct": (">=", 0.8),
    "download_rss_growth_mb": ("<=", 64.0),
    # docs/design.md §11: an upload through the gateway runs at 80% of one straight to the upstream, in bounded memory.
    "upload_vs_direct": (">=", 0.8),
    "upload_rss_growth_mb": ("<=", 64.0),
}
# The charts: the scenario each draws, its file name and its alt text in RESULTS.md.
CHARTS = {
    "upstream": ("upstream_calls.png", "upstream calls over time"),
    "notice": ("notice_delays.png", "time to notice a change, per contender"),
}
CONTENDERS = (
    "Contenders: **gateway** is `python -m gateway` with a generated config (production defaults, access log on, "
    "written to a file; upstream budget set high); **ceiling** is bench/ceiling.py, the fastest answer aiohttp's "
    "public server gives to one fixed request, with no logging: the low-level `web.Server` (no Application, router, "
    "middleware or signals) on uvloop, access log off, whose handler reads nothing of the request and returns a "
    "`web.Response` around the prebuilt hit body (no caller check, request id, metrics, log or cache headers); "
    "**nginx** is Debian's nginx, one worker, unprivileged, configured "
    "by bench/nginx.conf.template (caller-key map, token injection, X-Client-Name, proxy_cache keyed by the id, "
    "a fixed 5 s TTL, proxy_cache_lock, proxy_cache_use_stale), access log on; **direct** polls the simulator. "
    "Every server runs in its own process; the simulator (gateway.demo.Simulator) in another. "
    "The gateway answers a plain fresh hit as soon as its request head is parsed, below aiohttp's Application "
    "(gateway/edge/inline.py); the ceiling still makes a Request and a Response per answer, which is how the "
    "gateway, doing more per hit, can come near it."
)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON line: every key of KEYS (None when its scenario was skipped), a few more, and the verdicts."""
    out: dict[str, Any] = dict.fromkeys(KEYS)
    for name, scenario in SCENARIOS.items():
        if results.get(name):
            out.update(scenario.keys(results[name]))
    out["targets"] = {key: verdict(out.get(key), op, bound) for key, (op, bound) in TARGETS.items()}
    return out


def verdict(value: float | None, op: str, bound: float) -> str:
    if value is None:
        return "SKIPPED"
    ok = value >= bound if op == ">=" else value <= bound
    return "PASS" if ok else "MISS"


def report_lines(env: Env, results: dict[str, dict[str, Any]], out: dict[str, Any]) -> list[str]:
    """The results as Markdown tables (printed as they are, and written to RESULTS.md)."""
    lines = [line for name, scenario in SCENARIOS.items() for line in scenario.lines(env, results.get(name) or {})]
    lines += ["", "### Targets", "", "| key | value | target | verdict |", "|---|---:|---|---|"]
    for key, (op, bound) in TARGETS.items():
        lines.append(f"| {key} | {fmt(out.get(key), 3)} | {op} {bound:g} | {out['targets'][key]} |")
    if env.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in env.notes]
    return lines


def verdict_lines(out: dict[str, Any]) -> list[str]:
    """PASS, MISS or SKIPPED for each target, one line each."""
    return [
        f"{verdict_}: {key} = {fmt(out.get(key), 3)} (target {TARGETS[key][0]} {TARGETS[key][1]:g})"
        for key, verdict_ in out["targets"].items()
    ]


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
            done = subprocess.run(args, capture_output=True, text=True, timeout=5, check=False)
            versions[tool] = (done.stdout + done.stderr).strip().splitlines()[0]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "os": platform.platform(),
        **versions,
    }


def write_results(path: Path, lines: list[str], out: dict[str, Any], took_s: float) -> None:
    """RESULTS.md (beside the charts): the machine, the contenders, the tables and the JSON line."""
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
    ]
    for file_name, alt in CHARTS.values():
        header += [f"![{alt}]({file_name})", ""]
    footer = ["", "JSON line:", "", "```json", json.dumps(out), "```", ""]
    path.write_text("\n".join([*header, CONTENDERS, "", *lines, *footer]))


# --- charts --------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files, no display); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install '.[bench]'): no chart")
        return None
    return plt


def draw_charts(results: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """The chart of each scenario in CHARTS that ran, written to ``out_dir``; the paths written."""
    drawers = {"upstream": upstream_chart, "notice": notice_chart}
    ran = [name for name in CHARTS if results.get(name)]
    plt = _pyplot() if ran else None
    if plt is None:
        return []
    for name in ran:
        fig = drawers[name](plt, results[name])
        fig.tight_layout()
        fig.savefig(out_dir / CHARTS[name][0], dpi=110)
        plt.close(fig)
    return [out_dir / CHARTS[name][0] for name in ran]


def upstream_chart(plt: Any, life: dict[str, Any]) -> Any:
    """Scenario 2: upstream calls over time of every contender and the ideal; near (linear) and all (log)."""
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
    return fig


def notice_chart(plt: Any, notice: dict[str, Any]) -> Any:
    """Scenario 7: the three contenders' notice delays side by side, a box per contender, every batch as a dot."""
    fig, axis = plt.subplots(figsize=(8, 4.8))
    colors = {"nginx": "tab:orange", "gateway (polling)": "tab:cyan", "gateway (long-poll)": "tab:blue"}
    labels = []
    for position, (name, row) in enumerate(notice["contenders"].items(), start=1):
        if row is None:
            axis.text(position, 0.5, "not run", ha="center", color="gray")
            labels.append(f"{name}\n(not run)")
            continue
        labels.append(f"{name}\np50 {row['p50_s']:.2f} s, {row['calls']} calls")
        delays = [d for d in row["delays"].values() if d is not None]
        if delays:
            axis.boxplot([delays], positions=[position], widths=0.5, showfliers=False)
            spread = [position + ((n * 0.6180339887) % 1.0 - 0.5) * 0.3 for n in range(len(delays))]
            axis.scatter(spread, delays, s=12, alpha=0.6, color=colors.get(name))
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
    return fig
