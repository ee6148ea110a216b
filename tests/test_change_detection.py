"""One list call looks for the changes of many waited batches (docs/design.md §9, gateway/cache/refresher.py).

With three or more batches waited on, the gateway asks
``GET /v2/batches?order_by=updated_at`` once per interval instead of
refreshing each batch, and fetches only the batches whose ``updated_at`` or
status moved. These tests count what the upstream saw. Also here: the
simulator asked to lag, and the gateway keeping the newer answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.demo.simulator import Simulator, start_simulator
from tests.conftest import GatewayFactory
from tests.support import UPSTREAM_TOKEN, FakeClock, eventually, http, make_config, registry_value
from tests.upstream import Upstream

BOUND_S = 20.0
WAITED = ("batch-a", "batch-b", "batch-c", "batch-d")
# Waited batches refreshed (or looked for in a list) every 0.2 s; a wait ends after 10 s at most.
FAST = {"ttl_s": {"active": 1, "active_min": 0.2}}


@pytest.fixture
async def steady_simulator() -> AsyncIterator[Simulator]:
    """A simulator whose batches stay IN_PROGRESS, unchanged, until a test schedules their completion."""
    sim = Simulator(token=UPSTREAM_TOKEN, lifetime_s=3600)
    runner, _url = await start_simulator(sim)
    yield sim
    await runner.cleanup()


def upstream_gets(sim: Simulator, path: str) -> int:
    return sum(1 for seen in sim.seen if seen.method == "GET" and seen.path == path)


async def hold_waiters(url: str, batch_ids: tuple[str, ...]) -> dict[str, asyncio.Task[object]]:
    """One `Prefer: wait=10` request per batch, each naming the answer it holds."""
    waiters = {}
    for batch_id in batch_ids:
        first = await http(f"{url}/v2/batches/{batch_id}")
        headers = {"Prefer": "wait=10", "If-None-Match": first.header("ETag") or ""}
        waiters[batch_id] = asyncio.create_task(http(f"{url}/v2/batches/{batch_id}", headers=headers))
    return waiters


async def test_waited_batches_are_looked_after_by_one_list_call_and_only_the_changed_one_is_fetched(
    steady_simulator: Simulator, start: GatewayFactory
) -> None:
    sim = steady_simulator
    for batch_id in WAITED:
        sim.schedule(batch_id, complete_at=sim.now() + 3600)
    # The §9 detector alone: the follower (§12) also lists, and may retrieve a batch its pages left out,
    # which is its own rule (tests/test_follower.py), not the detector's.
    gateway = await start(make_config(sim.url, cache=FAST, events={"enabled": False}))
    waiters = await hold_waiters(gateway.url, WAITED)
    assert await eventually(lambda: gateway.state.waiters.total == len(WAITED), BOUND_S)
    # Steady: one list call per interval stands for all four (a batch whose own refresh was in flight when a
    # page came back is refreshed once more on its own; three list calls alone did not rule that out).
    assert await eventually(lambda: gateway.state.refresher.batches == 1, BOUND_S)
    gets_before = {b: upstream_gets(sim, f"/v2/batches/{b}") for b in WAITED}

    sim.schedule("batch-c", complete_at=sim.now())  # batch-c completes upstream now
    answer = await asyncio.wait_for(waiters.pop("batch-c"), BOUND_S)

    assert answer.status == 200  # type: ignore[attr-defined]
    assert answer.json["batch"]["status"] == "BATCH_STATUS_COMPLETED"  # type: ignore[attr-defined]
    gets_after = {b: upstream_gets(sim, f"/v2/batches/{b}") for b in WAITED}
    assert gets_after["batch-c"] > gets_before["batch-c"]
    # The batches that did not change were looked at through the list only.
    assert all(gets_after[b] == gets_before[b] for b in WAITED if b != "batch-c")
    listed = [seen.query for seen in sim.seen if seen.path == "/v2/batches"]
    assert all("order_by=updated_at" in query for query in listed)
    for task in waiters.values():
        task.cancel()


async def test_a_list_that_comes_back_oldest_first_hands_every_batch_back_to_its_own_refresh(
    upstream: Upstream, start: GatewayFactory
) -> None:
    status = {b: "BATCH_STATUS_IN_PROGRESS" for b in WAITED}

    def batch(batch_id: str, minute: int) -> dict[str, object]:
        return {"id": batch_id, "status": status[batch_id], "updated_at": f"2026-12-01T10:{minute:02d}:00Z"}

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/v2/batches":  # oldest first: the direction the detector cannot use
            page = {"batches": [batch(b, minute) for minute, b in enumerate(WAITED)]}
            return web.json_response(page)
        batch_id = request.path.rsplit("/", 1)[-1]
        return web.json_response({"batch": batch(batch_id, 30 if status[batch_id].endswith("COMPLETED") else 0)})

    upstream.script(handler)
    gateway = await start(make_config(upstream.url, cache=FAST))
    waiters = await hold_waiters(gateway.url, WAITED)
    assert await eventually(lambda: not gateway.state.refresher.detecting, BOUND_S)

    status["batch-b"] = "BATCH_STATUS_COMPLETED"
    answer = await asyncio.wait_for(waiters.pop("batch-b"), BOUND_S)

    assert json.loads(answer.body)["batch"]["status"] == "BATCH_STATUS_COMPLETED"  # type: ignore[attr-defined]
    for task in waiters.values():
        task.cancel()


async def test_a_lagging_simulator_answer_is_dropped_and_the_newer_one_keeps_serving(
    steady_simulator: Simulator, start: GatewayFactory
) -> None:
    sim = steady_simulator
    complete_at = sim.now() + 0.2
    sim.schedule("lagging", complete_at=complete_at)
    clock = FakeClock()
    gateway = await start(make_config(sim.url, cache={"ttl_s": {"terminal": 10}}), clock=clock)
    url = f"{gateway.url}/v2/batches/lagging"
    assert (await http(url)).json["batch"]["status"] == "BATCH_STATUS_IN_PROGRESS"
    assert await eventually(lambda: sim.now() > complete_at, BOUND_S)
    clock.advance(6)  # past the active TTL: the next poll sees the completion
    completed = await http(url)
    assert completed.json["batch"]["status"] == "BATCH_STATUS_COMPLETED"

    sim.lag_next("lagging", seconds=60)  # the next answer describes the batch as it was a minute ago
    clock.advance(11)  # the entry expires: the next poll asks the upstream, which lags
    calls = sim.calls
    again = await http(url)

    assert sim.calls == calls + 1
    assert again.json["batch"]["status"] == "BATCH_STATUS_COMPLETED"
    assert again.header("ETag") == completed.header("ETag")
    assert registry_value(gateway, "gateway_upstream_regressions_total") == 1
