"""The event log on Redis (docs/design.md §10, §12): replicas share one log, one event per change."""

from __future__ import annotations

import asyncio
import json
import secrets

from gateway.config import GatewayConfig
from gateway.edge.server import RunningGateway
from gateway.events.base import Sighting
from tests.conftest import GatewayFactory
from tests.redis_server import RedisServer
from tests.support import make_config, sdk
from tests.test_events import COMPLETED, checked_then_unfollowed, events_after, feed, latest
from tests.upstream import ACTIVE, Upstream, assert_error


def replica_config(upstream: Upstream, redis: RedisServer, prefix: str) -> GatewayConfig:
    # A patient timeout: two gateways and a Redis share two cores here.
    return make_config(
        upstream.url, redis={"url": redis.url, "key_prefix": prefix, "timeout_s": 2, "probe_interval_s": 0.1}
    )


async def two_replicas(upstream: Upstream, redis: RedisServer, start: GatewayFactory) -> list[RunningGateway]:
    prefix = f"events-{secrets.token_hex(4)}:"
    return [await start(replica_config(upstream, redis, prefix)) for _ in range(2)]


async def test_two_replicas_that_see_the_same_change_make_one_event_that_both_feeds_show(
    upstream: Upstream, redis_server: RedisServer, start: GatewayFactory
) -> None:
    one, two = await two_replicas(upstream, redis_server, start)
    upstream.seed("batch-1", status=ACTIVE)
    cursor = await latest(one)
    await sdk(one.url).batches.retrieve("batch-1")
    await sdk(two.url).batches.retrieve("batch-1")
    held = asyncio.ensure_future(feed(two, f"after={cursor}", wait_s=20))  # woken by the other replica's event
    upstream.set_status("batch-1", COMPLETED)
    for gateway in (one, two):
        await gateway.state.cache.evict("batch-1")  # the next retrieve asks the upstream
        await sdk(gateway.url).batches.retrieve("batch-1")
    for gateway in (one, two):
        assert gateway.state.sightings is not None
        await gateway.state.sightings.drained()
    first_page = await held
    assert [e["type"] for e in first_page.document["events"]][:1] == ["batch.in_progress"]
    from_one, from_two = await events_after(one, cursor, 2), await events_after(two, cursor, 2)
    assert from_one == from_two
    assert [e["type"] for e in from_one] == ["batch.in_progress", "batch.completed"]
    assert (await feed(one, f"after={from_one[-1]['id']}")).document["events"] == []


async def test_one_change_recorded_by_both_replicas_at_once_is_one_event(
    upstream: Upstream, redis_server: RedisServer, start: GatewayFactory
) -> None:
    one, two = await two_replicas(upstream, redis_server, start)
    assert one.state.events is not None
    assert two.state.events is not None
    assert one.state.events.log_id == two.state.events.log_id
    for n in range(50):
        data = json.dumps({"id": f"b{n}", "status": ACTIVE}).encode()
        sighting = Sighting("batch", f"b{n}", ACTIVE, False, 1.0, None, data)
        made = await asyncio.gather(one.state.events.record(sighting), two.state.events.record(sighting))
        assert sum(event is not None for event in made) == 1
    assert len(await one.state.events.read_after(0, 1000)) == 50
    assert sorted(await two.state.events.followed("batch", 100)) == sorted(f"b{n}" for n in range(50))


async def test_while_redis_is_lost_the_feed_answers_503_store_unavailable_and_then_serves_again(
    upstream: Upstream, redis_server: RedisServer, start: GatewayFactory
) -> None:
    (gateway,) = (await two_replicas(upstream, redis_server, start))[:1]
    upstream.seed("batch-1", status=ACTIVE)
    await sdk(gateway.url).batches.retrieve("batch-1")
    await events_after(gateway, None, 1)
    redis_server.kill()
    lost = await feed(gateway)
    assert_error(lost, 503, "store_unavailable")
    streamed = await feed(gateway, "after=latest", wait_s=1)
    assert_error(streamed, 503, "store_unavailable")
    await redis_server.start()
    link = gateway.state.redis
    assert link is not None
    await asyncio.wait_for(link.until_up(), 10)
    again = await feed(gateway)
    assert again.status == 200
    assert again.document["events"] == []  # a fresh Redis holds none: the gateway says so, never a guess


async def test_after_redis_loses_its_data_an_old_cursor_is_refused_and_new_events_flow(
    upstream: Upstream, redis_server: RedisServer, start: GatewayFactory
) -> None:
    (gateway,) = (await two_replicas(upstream, redis_server, start))[:1]
    for n in range(3):
        upstream.seed(f"batch-{n}", status=ACTIVE)
        await sdk(gateway.url).batches.retrieve(f"batch-{n}")
    old = await events_after(gateway, None, 3)
    first_cursor = old[0]["id"]
    client = redis_server.client()
    try:
        await client.flushall()
    finally:
        await client.aclose()
    upstream.seed("batch-new", status=ACTIVE)
    await sdk(gateway.url).batches.retrieve("batch-new")
    assert gateway.state.sightings is not None
    await gateway.state.sightings.drained()
    for cursor in (first_cursor, old[-1]["id"]):
        assert_error(await feed(gateway, f"after={cursor}"), 400, "invalid_request")
    fresh = await events_after(gateway, None, 1)
    assert [e["data"]["batch"]["id"] for e in fresh] == ["batch-new"]
    assert fresh[0]["id"] not in {e["id"] for e in old}


async def test_the_redis_log_puts_checked_subjects_last_and_forgets_unfollowed_ones(
    upstream: Upstream, redis_server: RedisServer, start: GatewayFactory
) -> None:
    (gateway,) = (await two_replicas(upstream, redis_server, start))[:1]
    log = gateway.state.events
    assert log is not None
    await checked_then_unfollowed(log)
