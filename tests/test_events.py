"""The event log and the feed (docs/design.md §12): sightings from every answer, the rules, retention, pages."""

from __future__ import annotations

import json
from typing import Any

from gateway.config.features import EventsSettings
from gateway.edge.server import RunningGateway
from gateway.events.base import Event, Sighting
from gateway.events.sqlite import SqliteEventLog
from tests.conftest import GatewayFactory
from tests.support import FakeClock, fresh_store_path, make_config, sdk
from tests.upstream import ACTIVE, QUEUED, Upstream

COMPLETED = "BATCH_STATUS_COMPLETED"


def seen(subject: str, status: str, updated_at: float | None = None, *, final: bool | None = None) -> Sighting:
    data = json.dumps({"id": subject, "status": status}).encode()
    is_final = status == COMPLETED if final is None else final
    return Sighting("batch", subject, status, is_final, updated_at, "billing-service", data)


async def open_log(path: str, clock: FakeClock | None = None, **settings: Any) -> SqliteEventLog:
    configured = EventsSettings(**settings)
    log = SqliteEventLog(path, lambda: configured, **({"clock": clock} if clock else {}))
    await log.start()
    return log


async def logged(gateway: RunningGateway) -> list[Event]:
    """Every event kept, once the gateway has recorded what it has seen."""
    state = gateway.state
    assert state.events is not None
    assert state.sightings is not None
    await state.sightings.drained()
    return await state.events.read_after(0, 1000)


async def test_each_status_change_is_one_event_and_a_batch_first_seen_final_is_none() -> None:
    log = await open_log(fresh_store_path())
    try:
        assert await log.record(seen("old", COMPLETED)) is None
        first = await log.record(seen("b1", QUEUED, 1.0))
        assert first is not None
        assert first.type == "batch.queued"
        assert await log.record(seen("b1", QUEUED, 1.0)) is None
        assert await log.record(seen("b1", ACTIVE, 2.0)) is not None
        assert await log.record(seen("b1", QUEUED, 1.0)) is None  # a late, older answer
        done = await log.record(seen("b1", COMPLETED, 3.0))
        assert done is not None
        assert done.type == "batch.completed"
        assert await log.record(seen("b1", ACTIVE, 4.0)) is None  # after the end, nothing
        assert await log.followed("batch", 10) == []
        body = json.loads(done.payload)
        assert set(body) == {"id", "type", "created_at", "owner", "data"}
        assert body["data"] == {"batch": {"id": "b1", "status": COMPLETED}}
        assert [e.type for e in await log.read_after(0, 10)] == ["batch.queued", "batch.in_progress", "batch.completed"]
    finally:
        await log.close()


async def test_a_retrieve_of_an_active_batch_makes_one_event_and_a_finished_one_none(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    upstream.seed("batch-active", status=ACTIVE)
    upstream.seed("batch-done", status=COMPLETED)
    client = sdk(gateway.url)
    await client.batches.retrieve("batch-active")
    await client.batches.retrieve("batch-done")
    await client.batches.retrieve("batch-active")
    events = await logged(gateway)
    assert [(e.type, e.subject) for e in events] == [("batch.in_progress", "batch-active")]
