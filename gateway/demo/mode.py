"""``--demo``: the config a demo runs with (the simulator as upstream, demo
callers, nothing shared), and what it sets aside.
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlsplit

from gateway.config import DEMO_BILLING_KEY, DEMO_REPORTING_KEY

# Their keys are refused outside --demo (gateway/config/keys.py): they are published.
DEMO_CALLERS: tuple[dict[str, Any], ...] = (
    # Runs whole batch jobs: every operation, and sees only the batches and datasets it made.
    {
        "name": "demo-billing",
        "key": DEMO_BILLING_KEY,
        "allow": [
            *("retrieve", "list", "create", "cancel"),
            *("upload_dataset", "read_dataset", "delete_dataset", "dataset_usage"),
        ],
        "batches": "own",
    },
    # Reads: the defaults (retrieve and list, every batch).
    {"name": "demo-reporting", "key": DEMO_REPORTING_KEY},
)


# Where the demo listens unless --host says otherwise: its keys are published, so not on every interface.
DEMO_HOST = "127.0.0.1"


def demo_overrides(simulator_url: str, token: str, store_path: str) -> dict[str, Any]:
    """Point a config at the simulator, with its token and the demo callers, and keep it off shared state.

    The simulator serves dataset parts itself (``gateway.demo.storage``), so
    its origin is the one storage origin the demo fetches parts from.

    The demo's batches and simulated failures are not the organisation's: the
    demo never writes to a configured Redis or store (docs/design.md §7). It runs one
    process, since the simulator lives in it, whatever ``server.workers`` says.
    """
    return {
        "upstream": {"base_url": simulator_url, "token": token, "token_file": None},
        "callers": copy.deepcopy(list(DEMO_CALLERS)),
        "store": {"path": store_path},
        "redis": {"url": None},
        "server": {"workers": 1, "host": DEMO_HOST},
        "datasets": {"part_origins": [_origin(simulator_url)]},
    }


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL (the simulator's base URL has no path, but say so exactly)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    section = data.get(name)
    return section if isinstance(section, dict) else {}


def set_aside_by_demo(data: Any) -> list[str]:
    """The keys of an interpolated config document that ``demo_overrides`` ignores although they are set."""
    if not isinstance(data, dict):
        return []
    server, redis, store = (_section(data, name) for name in ("server", "redis", "store"))
    ignored = []
    if str(redis.get("url") or "").strip():
        ignored.append("redis.url")
    if str(server.get("workers", 1)).strip() != "1":
        ignored.append("server.workers")
    if str(server.get("host", DEMO_HOST)).strip() != DEMO_HOST:
        ignored.append("server.host")
    if "path" in store:
        ignored.append("store.path")
    return ignored
