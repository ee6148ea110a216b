"""Scenario 6: seconds to validate a config of CONFIG_CALLERS callers in this process; and with reading its YAML
too (once: it is for information)."""

from __future__ import annotations

import hashlib
import json
import secrets
import statistics
import time
from typing import Any

import yaml

from bench.harness import Env, fmt, log, round_or_none

CONFIG_CALLERS = 10_000
TITLE = f"scenario 6: loading {CONFIG_CALLERS} callers"


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


def measure(env: Env) -> dict[str, Any]:
    from gateway.config import load_config, validate

    raw: dict[str, Any] = {
        "upstream": {"base_url": "http://127.0.0.1:9", "token": env.token},
        "store": {"path": str(env.workdir / "config-bench.db")},
        "callers": filler_callers(CONFIG_CALLERS),
    }
    path = env.workdir / "config-10k.yaml"
    path.write_text(yaml.safe_dump(raw))
    rounds = 1 if env.mode.name == "smoke" else max(3, env.mode.hit_rounds)
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
    if env.mode.name != "smoke":  # reading the YAML takes about a second at this size: not in a smoke run
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


def keys(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "config_load_s_10k_callers": round(config["validate_s"], 3),
        "config_load_cpu_s_10k_callers": round(config["validate_cpu_s"], 3),
        "config_load_s_10k_callers_yaml": round_or_none(config["load_yaml_s"], 3),
    }


def lines(env: Env, config: dict[str, Any]) -> list[str]:
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
