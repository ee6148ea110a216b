"""The event log and the feed (docs/design.md §12): sightings from every answer, the rules, retention, pages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.config.features import EventsSettings
from gateway.edge.server import RunningGateway
from gateway.events.base import Event, Sighting, encode_cursor
from gateway.events.sqlite import SqliteEventLog
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    Answer,
    FakeClock,
    eventually,
    fresh_store_path,
    http,
    make_config,
    registry_value,
    sdk,
)
from tests.upstream import ACTIVE, QUEUED, Upstream, assert_error, caller, write_callers

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


# --- the feed, through a real gateway ---------------------------------------------------------------------------

FEED = "/gateway/v1/events"
LISTER_KEY = "lister-caller-key-0b7f3e"


async def feed(
    gateway: RunningGateway, query: str = "", *, key: str = BILLING_KEY, wait_s: int | None = None
) -> Answer:
    headers = {"Prefer": f"wait={wait_s}"} if wait_s is not None else {}
    return await http(f"{gateway.url}{FEED}?{query}", key=key, headers=headers)


async def events_after(gateway: RunningGateway, cursor: str | None, count: int, key: str = BILLING_KEY) -> list[Any]:
    """The next ``count`` events after ``cursor`` as the feed gives them, held with Prefer: wait (bounded)."""
    found: list[Any] = []
    query = "" if cursor is None else f"after={cursor}"
    for _ in range(count + 10):
        page = await feed(gateway, query, key=key, wait_s=10)
        assert page.status == 200, page.body
        found += page.document["events"]
        query = f"after={page.document['next_after']}"
        if len(found) >= count:
            return found
    raise AssertionError(f"only {len(found)} of {count} events came")


async def latest(gateway: RunningGateway) -> str:
    cursor: str = (await feed(gateway, "after=latest")).document["next_after"]
    return cursor


async def test_a_create_a_list_a_retrieve_and_a_refresh_each_give_their_event_once(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url, callers=write_callers()))
    client = sdk(gateway.url)
    created = await client.batches.create(request={"name": "n", "input_dataset_id": "dataset-1", "model": "m"})
    batch_id = created.batch.id
    listed = upstream.seed("batch-listed", status=ACTIVE)
    upstream.seed("batch-finished-long-ago", status=COMPLETED)
    await client.batches.list()
    await client.batches.list()
    upstream.seed("batch-retrieved", status=ACTIVE)
    await client.batches.retrieve("batch-retrieved")
    # A held retrieve: the refresher sees the batch complete, not the caller.
    await client.batches.retrieve(listed["id"])
    waiting = asyncio.ensure_future(
        client.batches.retrieve(
            listed["id"], request_options={"additional_headers": {"Prefer": "wait=20"}, "timeout_in_seconds": 40}
        )
    )
    assert await eventually(lambda: gateway.state.waiters.total == 1)
    upstream.set_status(listed["id"], COMPLETED)
    assert (await waiting).batch.status == COMPLETED
    events = await events_after(gateway, None, 4)
    await client.batches.list()
    await client.batches.retrieve(listed["id"])
    await client.batches.retrieve("batch-retrieved")
    page = await feed(gateway, f"after={events[-1]['id']}", wait_s=1)
    assert page.document["events"] == []
    seen = [(e["type"], e["data"]["batch"]["id"]) for e in events]
    assert sorted(seen) == sorted(
        [
            ("batch.queued", batch_id),
            ("batch.in_progress", "batch-listed"),
            ("batch.in_progress", "batch-retrieved"),
            ("batch.completed", "batch-listed"),
        ]
    )
    assert next(e for e in events if e["type"] == "batch.queued")["owner"] == "billing-service"
    assert next(e for e in events if e["data"]["batch"]["id"] == "batch-listed")["owner"] is None
    assert registry_value(gateway, "gateway_events_total", type="batch.in_progress") == 2
    assert registry_value(gateway, "gateway_events_total", type="batch.completed") == 1
    assert registry_value(gateway, "gateway_events_followed", kind="batch") == 2  # the created and the retrieved


async def test_an_own_caller_sees_only_its_batches_events_and_a_caller_without_retrieve_none(
    upstream: Upstream, start: GatewayFactory
) -> None:
    callers = [*write_callers(billing="own", reporting="all"), caller("lister", LISTER_KEY, ["list"])]
    gateway = await start(make_config(upstream.url, callers=callers))
    mine = await sdk(gateway.url).batches.create(request={"name": "n", "input_dataset_id": "d", "model": "m"})
    upstream.seed("batch-not-mine", status=ACTIVE)
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-not-mine")
    assert len(await events_after(gateway, None, 2, key=REPORTING_KEY)) == 2
    own = await feed(gateway)
    assert [e["data"]["batch"]["id"] for e in own.document["events"]] == [mine.batch.id]
    again = await feed(gateway, f"after={own.document['next_after']}")
    assert again.document["events"] == []
    refused = await feed(gateway, key=LISTER_KEY)
    assert_error(refused, 403, "operation_not_allowed")


async def test_after_latest_starts_after_the_newest_and_prefer_wait_holds_until_an_event(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    upstream.seed("batch-1", status=ACTIVE)
    await sdk(gateway.url).batches.retrieve("batch-1")
    await events_after(gateway, None, 1)
    cursor = await latest(gateway)
    empty = await feed(gateway, f"after={cursor}", wait_s=1)
    assert empty.document == {"events": [], "next_after": cursor}
    assert empty.header("Preference-Applied") == "wait=1"
    held = asyncio.ensure_future(feed(gateway, f"after={cursor}", wait_s=30))
    assert await eventually(lambda: registry_value(gateway, "gateway_event_feed_waits") == 1)
    upstream.seed("batch-2", status=QUEUED)
    started = asyncio.get_running_loop().time()
    await sdk(gateway.url).batches.retrieve("batch-2")
    page = await held
    assert asyncio.get_running_loop().time() - started < 10
    assert [e["type"] for e in page.document["events"]] == ["batch.queued"]
    assert page.header("Preference-Applied") == "wait=30"


async def test_events_and_cursors_outlive_a_restart_and_a_change_while_down_becomes_an_event(
    upstream: Upstream, start: GatewayFactory
) -> None:
    config = make_config(upstream.url)
    first = await start(config)
    upstream.seed("batch-1", status=ACTIVE)
    await sdk(first.url).batches.retrieve("batch-1")
    before = await events_after(first, None, 1)
    await first.stop()
    upstream.set_status("batch-1", COMPLETED)
    second = await start(config)
    assert second.state.events is not None
    assert await second.state.events.followed("batch", 10) == ["batch-1"]
    again = await feed(second)
    assert again.document["events"] == before
    await sdk(second.url).batches.retrieve("batch-1")
    after = await events_after(second, before[-1]["id"], 1)
    assert [e["type"] for e in after] == ["batch.completed"]


async def test_a_cursor_from_another_gateway_a_forged_one_or_one_past_the_newest_is_400(
    upstream: Upstream, start: GatewayFactory
) -> None:
    one, other = await start(make_config(upstream.url)), await start(make_config(upstream.url))
    foreign = await latest(other)
    assert_error(await feed(one, f"after={foreign}"), 400, "invalid_request")
    assert one.state.events is not None
    log_id = one.state.events.log_id
    for forged in (encode_cursor(log_id, 5), encode_cursor("x" + log_id, 0), "AAAA", "latest2", "%00", "é"):
        assert_error(await feed(one, f"after={forged}"), 400, "invalid_request")
    assert (await feed(one, f"after={encode_cursor(log_id, 0)}")).status == 200
    assert upstream.count() == 0


async def test_a_huge_negative_or_non_numeric_limit_is_400_and_never_reaches_the_upstream(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    for limit in ("1001", "99999999999999999999", "-1", "0", "1e3", "ten", "", "1&limit=2", "٣", "+5", " 5"):
        assert_error(await feed(gateway, f"limit={limit}"), 400, "invalid_request")
    assert (await feed(gateway, "limit=1000")).status == 200
    assert_error(await feed(gateway, "after=latest&after=latest"), 400, "invalid_request")
    assert upstream.count() == 0


async def test_a_cursor_older_than_the_events_kept_is_410_and_latest_resumes(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url, events={"max_events": 2}))
    first_cursor = await latest(gateway)
    for n in range(4):
        upstream.seed(f"batch-{n}", status=ACTIVE)
        await sdk(gateway.url).batches.retrieve(f"batch-{n}")
    assert gateway.state.sightings is not None
    await gateway.state.sightings.drained()
    kept = await events_after(gateway, None, 2)
    assert [e["data"]["batch"]["id"] for e in kept] == ["batch-2", "batch-3"]
    expired = await feed(gateway, f"after={first_cursor}")
    assert_error(expired, 410, "cursor_expired")
    assert (await feed(gateway, "after=latest")).status == 200


@pytest.mark.heavy
async def test_ten_thousand_events_page_through_with_no_gap_and_no_duplicate(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    log = gateway.state.events
    assert log is not None
    for first in range(0, 10_000, 1000):  # as a list page's sightings come: many at once
        await asyncio.gather(*(log.record(seen(f"b{n}", QUEUED)) for n in range(first, first + 1000)))
    ids: list[str] = []
    subjects: list[str] = []
    query = "limit=1000"
    for _ in range(20):
        page = (await feed(gateway, query)).document
        ids += [e["id"] for e in page["events"]]
        subjects += [e["data"]["batch"]["id"] for e in page["events"]]
        if not page["events"]:
            break
        query = f"limit=1000&after={page['next_after']}"
    assert subjects == [f"b{n}" for n in range(10_000)]
    assert len(set(ids)) == 10_000


async def test_an_own_callers_page_of_one_reads_the_store_in_a_few_chunks_not_once_per_event(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url, callers=write_callers(billing="own")))
    log = gateway.state.events
    assert log is not None
    for n in range(600):
        data = json.dumps({"id": f"theirs-{n}", "status": QUEUED}).encode()
        await log.record(Sighting("batch", f"theirs-{n}", QUEUED, False, 1.0, "reporting", data))
    mine = json.dumps({"id": "mine", "status": QUEUED}).encode()
    await log.record(Sighting("batch", "mine", QUEUED, False, 1.0, "billing-service", mine))
    reads = 0
    read_after = log.read_after

    async def counted(seq: int, limit: int) -> list[Event]:
        nonlocal reads
        reads += 1
        return await read_after(seq, limit)

    log.read_after = counted  # type: ignore[method-assign]
    page = await feed(gateway, "limit=1")
    assert [e["data"]["batch"]["id"] for e in page.document["events"]] == ["mine"]
    assert reads <= 4, reads


async def checked_then_unfollowed(log: Any) -> None:
    """What the follower relies on: the least recently checked come first, and an unfollowed subject is gone."""
    for n in range(25):
        await log.record(Sighting("dataset", f"d{n:02d}", "processing", False, 1.0, None, b"{}"))
    await log.checked("dataset", [f"d{n:02d}" for n in range(20)])
    assert sorted(await log.followed("dataset", 5)) == [f"d{n:02d}" for n in range(20, 25)]
    await log.unfollow("dataset", "d20")
    assert "d20" not in await log.followed("dataset", 100)
    assert await log.record(Sighting("dataset", "d20", "validated", True, 2.0, None, b"{}")) is None
    assert await log.record(Sighting("dataset", "d21", "validated", True, 2.0, None, b"{}")) is not None


async def test_the_sqlite_log_puts_checked_subjects_last_and_forgets_unfollowed_ones() -> None:
    clock = FakeClock()
    log = await open_log(fresh_store_path(), clock)
    try:
        original = log.checked

        async def later(kind: Any, subjects: list[str]) -> None:
            clock.advance(1.0)
            await original(kind, subjects)

        log.checked = later  # type: ignore[method-assign]
        await checked_then_unfollowed(log)
    finally:
        await log.close()
