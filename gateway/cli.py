"""CLI: parse arguments, load the config, run the gateway on uvloop."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import uvloop
from pydantic import ValidationError

from gateway import __version__
from gateway.config import (
    DEFAULT_ALLOW,
    OPERATIONS,
    CallerSettings,
    ConfigError,
    GatewayConfig,
    interpolate,
    load_config,
    read_yaml,
)
from gateway.config.features import WEBHOOK_SECRET_BYTES, WEBHOOK_SECRET_PREFIX, WebhookSettings
from gateway.demo.mode import DEMO_CALLERS, demo_overrides, set_aside_by_demo
from gateway.demo.simulator import Simulator, start_simulator
from gateway.edge.server import start_gateway
from gateway.errors import StoreUnavailable
from gateway.events import usage_report
from gateway.ops.logs import Redactor, configure_logging, log_event
from gateway.ops.workers import follow_the_parent, report_serving, supervise
from gateway.runtime import build_state, serve_until_signalled

log = logging.getLogger("gateway")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cohere-gateway", description="A caching, authenticating gateway for Cohere's batch API."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    parser.add_argument(
        "--demo-webhook",
        metavar="URL",
        type=webhook_url,
        help="with --demo: POST every event to URL, signed with a fresh secret the banner prints (docs/webhooks.md)",
    )
    # Set by the parent of server.workers for each worker it starts (gateway/ops/workers.py): the worker's
    # number, and the pipe on which it says that it serves. Not for operators.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    # Without a command the gateway runs, as it always did.
    commands = parser.add_subparsers(
        dest="command", title="commands", metavar="[COMMAND]", description="without one, the gateway runs"
    )
    new_caller = commands.add_parser(
        "new-caller",
        help="print a fresh caller key and the config lines for it",
        description="Print a fresh random caller key, its sha256, and the lines to paste under callers:.",
    )
    new_caller.add_argument("name", metavar="NAME", type=caller_name, help="the caller's name (sent as X-Client-Name)")
    _usage_parser(commands)
    new_caller.add_argument(
        "--webhook",
        metavar="URL",
        type=webhook_url,
        help="also print a fresh whsec_ secret and the webhook lines: the caller's events are POSTed to URL",
    )
    return parser.parse_args(argv)


def _usage_parser(commands: Any) -> None:
    usage = commands.add_parser(
        "usage",
        help="print the tokens and records of finished batches per caller and model",
        description="Print the usage totals the gateway keeps in its store (SQLite, or Redis with redis.url).",
    )
    # Its own dest: a default here would replace a --config given before the command.
    usage.add_argument(
        "--config", dest="usage_config", type=Path, metavar="PATH", help="path of config.yaml (as above)"
    )
    usage.add_argument(
        "--since", type=day, metavar="YYYY-MM-DD", help="first day counted, YYYY-MM-DD (UTC; default: the first kept)"
    )
    usage.add_argument(
        "--until", type=day, metavar="YYYY-MM-DD", help="last day counted, YYYY-MM-DD (UTC, inclusive; default: today)"
    )
    usage.add_argument("--format", choices=usage_report.FORMATS, default="table", help="table (default), csv or json")


def day(value: str) -> str:
    """A ``--since``/``--until`` date; argparse's error (exit 2) if it is not YYYY-MM-DD."""
    try:
        return usage_report.parse_day(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def usage(args: argparse.Namespace) -> int:
    """``cohere-gateway usage``: read the store the config names, print the report."""
    if args.since and args.until and args.since > args.until:
        print(f"cohere-gateway usage: --since {args.since} is after --until {args.until}", file=sys.stderr)
        return 2
    path = args.usage_config or args.config
    try:
        config = load_config(path)
    except ConfigError as exc:
        report(exc.problems)
        return 2
    try:
        rows = usage_report.read_usage(config, args.since, args.until)
    except Exception as exc:  # the store cannot be read: said in one line, never a traceback
        print(f"cohere-gateway usage: cannot read the store: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(usage_report.render(rows, args.format), end="", flush=True)
    return 0


# A caller key: 32 random bytes, URL-safe base64 (43 characters, well past MIN_CALLER_KEY_LENGTH).
NEW_CALLER_KEY_BYTES = 32
# A webhook secret: the Standard Webhooks specification's smallest (24 random bytes), base64 after whsec_.
NEW_WEBHOOK_SECRET_BYTES = WEBHOOK_SECRET_BYTES[0]


def webhook_url(value: str) -> str:
    """``value`` if config.yaml would accept it as ``callers[].webhook.url``; argparse's error (exit 2) if not."""
    try:
        WebhookSettings(url=value, secrets=(new_webhook_secret(),))
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors() if e["loc"] == ("url",))
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid webhook URL: {reasons}") from None
    return value


def new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(NEW_WEBHOOK_SECRET_BYTES)).decode()


def caller_name(value: str) -> str:
    """``value`` if config.yaml would accept it as ``callers[].name``; argparse's error (exit 2) if not."""
    try:
        # The config's own check, message included; the placeholder digest only completes the entry.
        CallerSettings(name=value, key_sha256="0" * 64)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors() if e["loc"] == ("name",))
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid caller name: {reasons}") from None
    return value


def new_caller_text(name: str, key: str, webhook: tuple[str, str] | None = None) -> str:
    """What ``new-caller`` prints: the key, once, and the config lines that hold only its sha256.

    ``webhook``: its URL and a fresh secret; the secret is printed in the lines, as the config holds it.
    """
    digest = hashlib.sha256(key.encode()).hexdigest()
    others = ", ".join(OPERATIONS)
    lines = [
        f"Caller key for {name} (give it to the service as its Bearer token; it is shown only this once):",
        "",
        f"    {key}",
        "",
    ]
    if webhook is not None:
        lines += [
            "Webhook secret (give it to the receiver, which verifies each delivery with it; docs/webhooks.md):",
            "",
            f"    {webhook[1]}",
            "",
        ]
    lines += [
        "Paste under callers: in config.yaml (only the key's sha256 is kept there):",
        "",
        f"  - name: {name}",
        f"    key_sha256: {digest}",
        f"    # allow: [retrieve, list]   # the default; any of: {others}",
        "    # batches: all              # the default; own: only the batches this caller creates",
    ]
    if webhook is not None:
        lines += [
            "    webhook:",
            f"      url: {json.dumps(webhook[0])}",
            f"      secrets: [{json.dumps(webhook[1])}]   # a second one rotates (both sign)",
        ]
    return "\n".join([*lines, ""])


def new_caller(name: str, webhook: str | None = None) -> int:
    key = secrets.token_urlsafe(NEW_CALLER_KEY_BYTES)
    hook = None if webhook is None else (webhook, new_webhook_secret())
    print(new_caller_text(name, key, hook), end="", flush=True)
    return 0


def report(problems: list[str]) -> None:
    print("cohere-gateway: the config is not valid:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def print_demo_banner(listening: str, webhook: tuple[str, str] | None = None) -> None:
    """The demo's keys and first steps; ``listening`` is the URL of where it really listens."""
    # A wildcard address is served on every interface; this machine reaches it on loopback.
    url = listening.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
    where = listening if url == listening else f"{listening} (every interface: the demo keys work from other machines)"
    print(f"cohere-gateway demo: serving {where} against a simulated upstream.", flush=True)
    print("Demo caller keys (valid only in demo mode):", flush=True)
    for caller in DEMO_CALLERS:
        allow = ", ".join(op for op in OPERATIONS if op in caller.get("allow", DEFAULT_ALLOW))
        print(f"  {caller['name']}: {caller['key']}  (may {allow}; sees {caller.get('batches', 'all')} batches)")
    reader = next(c for c in DEMO_CALLERS if c.get("batches", "all") == "all")
    writer = next(c for c in DEMO_CALLERS if "create" in c.get("allow", ()))
    print(f"Try: curl -H 'Authorization: Bearer {reader['key']}' {url}/v2/batches/my-first-batch")
    print("Or, with the cohere SDK (pip install cohere):")
    print(f"  co = cohere.ClientV2(api_key={writer['key']!r}, base_url={url!r})")
    print('  batch = co.batches.create(request=cohere.Batch(name="n", input_dataset_id="ds", model="m")).batch')
    print("  co.batches.retrieve(batch.id); co.batches.list(); co.batches.cancel(batch.id)", flush=True)
    if webhook is not None:
        print(
            f"Webhooks: every event is POSTed to {webhook[0]}, signed with {webhook[1]} (docs/webhooks.md)", flush=True
        )


def log_demo_set_aside(path: Path) -> None:
    """Say which of the config file's settings ``--demo`` ignores, so that nobody expects it to use them."""
    try:
        raw = read_yaml(path) if path.exists() else {}
    except ConfigError:
        return  # the config was loaded just before: cannot happen but for a race with an edit
    data, _ = interpolate(raw, os.environ)
    ignored = set_aside_by_demo(data)
    if ignored:
        log_event(
            log,
            logging.INFO,
            "demo mode ignores these config keys (no Redis, a temporary store, one process, 127.0.0.1 unless --host)",
            keys=ignored,
        )


async def run(args: argparse.Namespace, redact: Redactor) -> int:
    with contextlib.ExitStack() as stack:
        return await _serve(args, redact, stack)


async def _serve(args: argparse.Namespace, redact: Redactor, stack: contextlib.ExitStack) -> int:
    overrides: dict[str, Any] | None = None
    simulator_runner = None
    demo_webhook: tuple[str, str] | None = None
    if args.demo:
        simulator = Simulator()
        simulator_runner, simulator_url = await start_simulator(simulator)
        # The demo's batches are not the organisation's: a store of its own, removed at exit.
        demo_store = stack.enter_context(tempfile.TemporaryDirectory(prefix="cohere-gateway-demo-"))
        overrides = demo_overrides(simulator_url, simulator.token, str(Path(demo_store) / "records.db"))
        if args.demo_webhook:
            demo_webhook = (args.demo_webhook, new_webhook_secret())
            # The reading caller sees every batch: one webhook, so a receiver gets each event once.
            reader = next(c for c in overrides["callers"] if c.get("batches", "all") == "all")
            reader["webhook"] = {"url": demo_webhook[0], "secrets": [demo_webhook[1]]}
    load: Callable[[], GatewayConfig] = partial(load_config, args.config, None, overrides, demo=args.demo)
    try:
        config = load()
    except ConfigError as exc:
        report(exc.problems)
        return 2
    configure_logging(config.logging.level, redact)
    if args.demo:
        log_demo_set_aside(args.config)
    if args.worker is not None:
        follow_the_parent()
    elif config.server.workers > 1:
        return await supervise(config, load, args.config, args.host, args.port)
    try:
        state = build_state(config, redact)
        running = await start_gateway(state, args.host, args.port, reuse_port=args.worker is not None)
    except StoreUnavailable as exc:
        # The record store cannot be opened: as bad as a bad config (docs/design.md §3).
        report([exc.message])
        return 2
    except OSError as exc:
        print(f"cohere-gateway: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.demo:
        # Once the signal handlers are in place (as report_serving below): Ctrl-C after the banner stops it cleanly.
        asyncio.get_running_loop().call_soon(print_demo_banner, running.url, demo_webhook)
    if args.ready_fd is not None:
        # Runs once serve_until_signalled has put its signal handlers in place.
        asyncio.get_running_loop().call_soon(report_serving, args.ready_fd)
    # server.pid_file holds the pid to signal: a worker's parent writes its own.
    await serve_until_signalled(running, load, pid_file_path="" if args.worker is not None else config.server.pid_file)
    if simulator_runner is not None:
        await simulator_runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    redact = Redactor()
    configure_logging("INFO", redact)
    if args.command == "new-caller":
        return new_caller(args.name, args.webhook)
    if args.command == "usage":
        return usage(args)
    if args.demo_webhook and not args.demo:
        print(
            "cohere-gateway: --demo-webhook goes with --demo (otherwise: callers[].webhook in the config)",
            file=sys.stderr,
        )
        return 2
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
