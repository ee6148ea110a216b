"""Replicas on one Redis that follow batches (docs/design.md §10, §12), counted at the fake upstream.

Three ``python -m gateway`` processes share one ``redis-server``; one of
them holds the follower lease. What a user must notice: a batch polled
through all three costs the upstream what it costs through one gateway,
because the follower's list call each interval keeps its answer fresh for
every replica, however long a round takes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from gateway.events.follower import CLIENT_NAME
from tests.test_replicas import REPLICAS, Replica, StartReplicas, replicas, retrieves
from tests.upstream import ACTIVE, Upstream

__all__ = ["replicas"]  # the fixture, used by name

pytestmark = pytest.mark.one_loop

INTERVAL_S = 0.5  # events.interval_s
TTL_S = 0.7  # cache.ttl_s.active, unjittered: longer than an interval, shorter than an interval and a slow list
SLOW_LIST_S = 0.35  # how long the upstream takes to answer a list call
POLL_S = 0.02
ROUNDS = 6
BOUND_S = 30.0


def slow_moving_list(upstream: Upstream, batch_id: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A list answer that shows ``batch_id`` one record further each time (a change to store), after a while."""

    async def answer(_request: web.Request) -> web.Response:
        batch = upstream.batches[batch_id]
        batch["num_successful_records"] += 1
        upstream.set_status(batch_id, ACTIVE)  # updated_at moves on with it
        shown = json.loads(json.dumps(batch))
        await asyncio.sleep(SLOW_LIST_S)
        return web.json_response({"batches": [shown]})

    return answer


def follower_lists(upstream: Upstream) -> int:
    return sum(1 for seen in upstream.calls("list") if seen.headers.get("X-Client-Name") == CLIENT_NAME)


async def poll_until_lists(group: list[Replica], upstream: Upstream, batch_id: str, lists: int) -> list[int]:
    """Poll ``batch_id`` round-robin through the replicas until the follower has listed ``lists`` times in all;
    the records done that each answer showed."""
    seen: list[int] = []
    loop = asyncio.get_running_loop()
    give_up = loop.time() + BOUND_S
    while follower_lists(upstream) < lists:
        assert loop.time() < give_up, f"the follower listed {follower_lists(upstream)} times in {BOUND_S} s"
        answer = await group[len(seen) % REPLICAS].retrieve(batch_id)
        assert answer.status == 200, answer.body[:300]
        seen.append(answer.document["batch"]["num_successful_records"])
        await asyncio.sleep(POLL_S)
    return seen


async def test_a_batch_polled_through_three_replicas_is_kept_fresh_by_the_follower_however_slowly_the_upstream_lists(
    replicas: StartReplicas, upstream: Upstream
) -> None:
    upstream.seed("batch-moving", status=ACTIVE)
    upstream.script(slow_moving_list(upstream, "batch-moving"), "list")
    group = await replicas(
        events={"interval_s": INTERVAL_S},
        cache={"ttl_s": {"active": TTL_S, "active_min": INTERVAL_S}, "active_jitter": 0},
    )
    # The first poll is a miss (one retrieve) and makes the batch followed; the follower settles in.
    await poll_until_lists(group, upstream, "batch-moving", 2)
    before = retrieves(upstream, "batch-moving")
    seen = await poll_until_lists(group, upstream, "batch-moving", 2 + ROUNDS)
    # Each round stored the batch's new state for every replica before the last one's went stale: the
    # pollers saw it move on round after round, and none of them had to retrieve it.
    assert max(seen) >= seen[0] + ROUNDS - 1
    assert retrieves(upstream, "batch-moving") == before
