"""A simulated Cohere batch endpoint, for ``--demo``, the tests and the benchmark.

Any id starts QUEUED when first asked for, moves to IN_PROGRESS with growing
record counters, and ends COMPLETED within about ``lifetime_s`` (each id
gets its own pace). Ids containing ``fail`` end FAILED; ids starting with
``missing`` answer 404. A wrong token gets 401, as upstream does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cachetools import LRUCache
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.protection import Clock

# Bounds for what the simulator remembers, so long benchmark runs stay flat.
MAX_TRACKED_IDS = 200_000
MAX_RECORDED_REQUESTS = 10_000


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as the simulated upstream received it."""

    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]


def _fraction(batch_id: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{batch_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


class Simulator:
    """The simulated upstream's state; ``app()`` serves it."""

    def __init__(self, token: str | None = None, lifetime_s: float = 60.0, clock: Clock = time.monotonic) -> None:
        self.token = token or f"demo-upstream-{secrets.token_hex(8)}"
        self.url = ""  # set by start_simulator
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._first_seen: LRUCache[str, float] = LRUCache(MAX_TRACKED_IDS)
        self.calls = 0
        self.calls_by_id: LRUCache[str, int] = LRUCache(MAX_TRACKED_IDS)
        self.seen: deque[SeenRequest] = deque(maxlen=MAX_RECORDED_REQUESTS)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch's state now, advancing from the first time it was asked for."""
        now = self._clock()
        started = self._first_seen.setdefault(batch_id, now)
        # Each id gets a lifetime between 50% and 100% of lifetime_s.
        span = self.lifetime_s * (0.5 + 0.5 * _fraction(batch_id, "pace"))
        progress = min(1.0, (now - started) / span)
        records = 1000 + int(9000 * _fraction(batch_id, "size"))
        done = int(records * max(0.0, (progress - 0.1) / 0.9))
        if progress < 0.1:
            status = "BATCH_STATUS_QUEUED"
        elif progress < 1.0:
            status = "BATCH_STATUS_IN_PROGRESS"
        else:
            status = "BATCH_STATUS_FAILED" if "fail" in batch_id else "BATCH_STATUS_COMPLETED"
        failed = done // 50 if "fail" in batch_id else 0
        stamp = "2026-01-15T09:30:00Z"
        return {
            "id": batch_id,
            "name": f"demo-{batch_id}",
            "creator_id": "b5e1ffb9-49a1-4653-9927-94083316309d",
            "org_id": "62603116-1750-4c04-b1b6-9d5046764bc4",
            "status": status,
            "created_at": stamp,
            "updated_at": stamp,
            "input_dataset_id": f"{batch_id}-requests",
            "output_dataset_id": f"{batch_id}-output",
            "input_tokens": str(done * 120),
            "output_tokens": str(done * 80),
            "model": "batch-command",
            "num_records": records,
            "num_successful_records": done - failed,
            "num_failed_records": failed,
            "status_reason": "some records failed" if failed else "",
        }

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {self.token}".encode())

    async def get_batch(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.seen.append(
            SeenRequest(
                request.method, request.path, request.query_string, CIMultiDictProxy(CIMultiDict(request.headers))
            )
        )
        batch_id = request.match_info["id"]
        self.calls_by_id[batch_id] = self.calls_by_id.get(batch_id, 0) + 1
        if not self._authorized(request):
            return _error(401, "invalid api token")
        if batch_id.startswith("missing"):
            return _error(404, f"batch {batch_id} not found")
        return web.json_response({"batch": self.batch(batch_id)})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/batches/{id}", self.get_batch)
        return app


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=json.dumps({"message": message}), content_type="application/json")


DEMO_CALLERS = (
    {"name": "demo-billing", "key": "demo-billing-key-0001"},
    {"name": "demo-reporting", "key": "demo-reporting-key-0002"},
)


def demo_overrides(simulator_url: str, token: str) -> dict[str, Any]:
    """Point a config at the simulator, with its token and the demo callers."""
    return {
        "upstream": {"base_url": simulator_url, "token": token, "token_file": None},
        "callers": [dict(c) for c in DEMO_CALLERS],
    }


async def start_simulator(simulator: Simulator, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve the simulator; returns its runner and base URL."""
    runner = web.AppRunner(simulator.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    simulator.url = f"http://{bound_host}:{bound_port}"
    return runner, simulator.url
