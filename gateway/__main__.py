"""CLI: parse arguments, load the config, run the gateway on uvloop."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import uvloop

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.demo import DEMO_CALLERS, Simulator, demo_overrides, start_simulator
from gateway.logs import Redactor, configure_logging
from gateway.server import serve_until_signalled, start_gateway
from gateway.state import GatewayState


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cohere-gateway", description="A caching, authenticating gateway for Cohere's batch API."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("GATEWAY_CONFIG", "config.yaml")),
        help="path of config.yaml (default: $GATEWAY_CONFIG or ./config.yaml)",
    )
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config, print what is wrong, and exit"
    )
    parser.add_argument(
        "--demo", action="store_true", help="run against an in-process simulated upstream (no Cohere account needed)"
    )
    return parser.parse_args(argv)


def report(problems: list[str]) -> None:
    print("cohere-gateway: the config is not valid:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def print_demo_banner(url: str) -> None:
    print(f"cohere-gateway demo: serving {url} against a simulated upstream.", flush=True)
    print("Demo caller keys (valid only in demo mode):", flush=True)
    for caller in DEMO_CALLERS:
        print(f"  {caller['name']}: {caller['key']}", flush=True)
    key = DEMO_CALLERS[0]["key"]
    print(f"Try: curl -H 'Authorization: Bearer {key}' {url}/v2/batches/my-first-batch", flush=True)


async def run(args: argparse.Namespace, redact: Redactor) -> int:
    overrides: dict[str, Any] | None = None
    simulator_runner = None
    if args.demo:
        simulator = Simulator()
        simulator_runner, simulator_url = await start_simulator(simulator)
        overrides = demo_overrides(simulator_url, simulator.token)
    load: Callable[[], GatewayConfig] = partial(load_config, args.config, None, overrides)
    try:
        config = load()
    except ConfigError as exc:
        report(exc.problems)
        return 2
    configure_logging(config.logging.level, redact)
    try:
        running = await start_gateway(config, args.host, args.port, GatewayState.create(config, redact))
    except OSError as exc:
        print(f"cohere-gateway: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.demo:
        print_demo_banner(running.url.replace("0.0.0.0", "127.0.0.1"))
    await serve_until_signalled(running, load)
    if simulator_runner is not None:
        await simulator_runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    redact = Redactor()
    configure_logging("INFO", redact)
    if args.check_config:
        try:
            load_config(args.config)
        except ConfigError as exc:
            report(exc.problems)
            return 2
        print(f"{args.config}: OK")
        return 0
    result: int = uvloop.run(run(args, redact))
    return result


if __name__ == "__main__":
    sys.exit(main())
