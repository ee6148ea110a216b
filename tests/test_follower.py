"""The follower (docs/design.md §12, "Following"): changes become events with no caller asking, at a flat cost.

Real gateways on 127.0.0.1 in front of the fake upstream, whose batches
change under them (``Upstream.set_status``). The follower's own upstream
calls are told apart by their ``X-Client-Name``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.edge.server import RunningGateway
from gateway.events.base import Event
from gateway.events.follower import CLIENT_NAME, next_beat
from tests.conftest import GatewayFactory, ProcessFactory
from tests.redis_server import RedisServer
from tests.support import (
    BILLING_KEY,
    fresh_store_path,
    http,
    lease_losing_one_cancellation,
    make_config,
    raw_config,
    sample_value,
    scrape_metrics,
    sdk,
    write_config,
)
from tests.test_replicas import poll_until
from tests.upstream import ACTIVE, Seen, Upstream

COMPLETED = "BATCH_STATUS_COMPLETED"
FAILED = "BATCH_STATUS_FAILED"
WAIT_S = 15.0
INTERVAL_S = 0.25


# billing-service, allowed to read batches and datasets: the dataset half of following.
DATASET_READER = [{"name": "billing-service", "key": BILLING_KEY, "allow": ["retrieve", "read_dataset"]}]


def following(upstream: Upstream, store: str | None = None, **sections: Any) -> Any:
    """A config whose follower checks every INTERVAL_S."""
    return make_config(
        upstream.url,
        store={"path": store or fresh_store_path()},
        events={"interval_s": INTERVAL_S, **sections.pop("events", {})},
        **sections,
    )


def by_follower(upstream: Upstream, route: str = "*") -> list[Seen]:
    return [s for s in upstream.calls(route) if s.headers.get("X-Client-Name") == CLIENT_NAME]  # type: ignore[arg-type]


async def next_events(gateway: RunningGateway, after: int, count: int = 1) -> list[Event]:
    """The ``count`` events after seq ``after``, awaited (bounded) as the gateway appends them."""
    log = gateway.state.events
    assert log is not None
    deadline = time.monotonic() + WAIT_S
    events: list[Event] = []
    while len(events) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {[e.type for e in events]} after {WAIT_S} s"
        newest = events[-1].seq if events else after
        await log.wait_beyond(newest, left)
        events += await log.read_after(newest, count - len(events))
    return events


async def newest_seq(gateway: RunningGateway) -> int:
    assert gateway.state.sightings is not None
    assert gateway.state.events is not None
    await gateway.state.sightings.drained()
    return (await gateway.state.events.bounds())[1]


async def follower_lists(upstream: Upstream, count: int) -> None:
    """Until the follower has made ``count`` list calls in all."""
    for n in range(1, 10_000):
        await upstream.arrival("list", n, timeout_s=WAIT_S)
        if len(by_follower(upstream, "list")) >= count:
            return


async def test_an_active_batch_seen_once_is_followed_and_its_completion_is_an_event_without_a_caller_asking(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(following(upstream))
    upstream.seed("batch-run", status=ACTIVE, input_tokens="1200", output_tokens="300")
    await sdk(gateway.url).batches.retrieve("batch-run")
    seen = await newest_seq(gateway)
    upstream.set_status("batch-run", COMPLETED)
    [event] = await next_events(gateway, seen)
    assert (event.type, event.subject) == ("batch.completed", "batch-run")
    assert json.loads(event.payload)["data"]["batch"]["status"] == COMPLETED
    # Nobody retrieved it again: the follower's list call showed the whole new state.
    assert upstream.count("retrieve") == 1
    assert by_follower(upstream, "list")
    answer = await sdk(gateway.url).batches.retrieve("batch-run")
    assert answer.batch.status == COMPLETED
    assert upstream.count("retrieve") == 1  # and the list entry now answers callers too


async def follow_cost(upstream: Upstream, start: GatewayFactory, followed: int, rounds: int) -> tuple[int, int]:
    """Upstream calls (lists, retrieves) the follower makes over ``rounds`` while the same 10 batches change."""
    for n in range(followed):
        upstream.seed(f"batch-{n:05d}", status=ACTIVE, age_s=3600 - n)
    gateway = await start(following(upstream))
    # One caller's list shows them all: each is followed from then on.
    answer = await http(f"{gateway.url}/v2/batches?page_size=1000", key=None, headers=_billing())
    assert answer.status == 200
    assert gateway.state.events is not None
    await newest_seq(gateway)
    assert len(await gateway.state.events.followed("batch", 5000)) == followed
    first = len(by_follower(upstream))
    before = len(by_follower(upstream, "list"))
    for round_number in range(rounds):
        for n in range(10):
            upstream.batches[f"batch-{n:05d}"]["num_successful_records"] = round_number + 1
            upstream.set_status(f"batch-{n:05d}", ACTIVE)  # updated_at moves: a change to notice
        await follower_lists(upstream, before + round_number + 1)
    await follower_lists(upstream, before + rounds + 1)
    calls = by_follower(upstream)[first:]
    return sum(1 for s in calls if s.endpoint == "list"), sum(1 for s in calls if s.endpoint == "retrieve")


def _billing() -> dict[str, str]:
    return {"Authorization": f"Bearer {BILLING_KEY}"}


async def test_following_a_thousand_batches_costs_the_same_list_calls_as_following_ten(
    upstream: Upstream, start: GatewayFactory
) -> None:
    lists_10, retrieves_10 = await follow_cost(upstream, start, 10, rounds=4)
    other = await upstream.another()
    lists_1000, retrieves_1000 = await follow_cost(other, start, 1000, rounds=4)
    assert retrieves_10 == retrieves_1000 == 0  # every change was read off the list page
    assert lists_1000 <= lists_10 + 1
    assert lists_1000 <= 8


async def test_a_batch_the_follower_sees_unchanged_is_renewed_so_a_later_poll_is_a_hit(
    upstream: Upstream, start: GatewayFactory
) -> None:
    config = following(upstream, cache={"ttl_s": {"active": 1.0, "active_min": 1.0}})
    gateway = await start(config)
    upstream.seed("batch-slow", status=ACTIVE)
    first = await http(f"{gateway.url}/v2/batches/batch-slow", key=None, headers=_billing())
    assert first.header("X-Cache") == "MISS"
    polled_at = time.monotonic()
    # Wait, through the follower's own list calls, until the first answer's freshness is long gone.
    for _ in range(100):
        await follower_lists(upstream, len(by_follower(upstream, "list")) + 1)
        if time.monotonic() - polled_at > 2.5:
            break
    again = await http(f"{gateway.url}/v2/batches/batch-slow", key=None, headers=_billing())
    assert again.status == 200
    assert again.header("X-Cache") == "HIT"
    assert upstream.count("retrieve") == 1


async def test_after_a_restart_a_change_made_while_the_gateway_was_down_becomes_an_event(
    upstream: Upstream, start: GatewayFactory
) -> None:
    store = fresh_store_path()
    upstream.seed("batch-night", status=ACTIVE)
    gateway = await start(following(upstream, store))
    await sdk(gateway.url).batches.retrieve("batch-night")
    seen = await newest_seq(gateway)
    await gateway.stop()
    upstream.set_status("batch-night", FAILED)
    restarted = await start(following(upstream, store))
    [event] = await next_events(restarted, seen)
    assert (event.type, event.subject) == ("batch.failed", "batch-night")
    assert upstream.count("retrieve") == 1  # nobody asked after the restart: the follower found it


@pytest.mark.heavy
async def test_while_waiters_keep_the_refresher_listing_the_follower_reads_its_pages_and_lists_nothing_itself(
    upstream: Upstream, start: GatewayFactory
) -> None:
    config = following(upstream, events={"interval_s": 1.5}, cache={"ttl_s": {"active_min": 1.0}})
    gateway = await start(config)
    ids = [f"batch-waited-{n}" for n in range(3)]
    for batch_id in ids:
        upstream.seed(batch_id, status=ACTIVE)
        await http(f"{gateway.url}/v2/batches/{batch_id}", key=None, headers=_billing())  # held: a wait waits
    headers = {**_billing(), "Prefer": "wait=20"}
    waits = [asyncio.ensure_future(http(f"{gateway.url}/v2/batches/{b}", key=None, headers=headers)) for b in ids]
    follower = gateway.state.follower
    assert follower is not None
    try:
        for n in range(1, 200):  # the refresher's list calls, one a second, until the follower has had 3 rounds
            await upstream.arrival("list", n, timeout_s=WAIT_S)
            if follower.rounds >= 3:
                break
        assert follower.rounds >= 3
        assert by_follower(upstream, "list") == []  # each round read the refresher's page instead
        assert follower.calls_last_round == 0
        seen = await newest_seq(gateway)
        upstream.set_status(ids[0], COMPLETED)
        [event] = await next_events(gateway, seen)
        assert (event.type, event.subject) == ("batch.completed", ids[0])
        done = await asyncio.wait_for(waits[0], WAIT_S)
        assert json.loads(done.body)["batch"]["status"] == COMPLETED
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


@pytest.mark.heavy
async def test_two_replicas_on_redis_follow_through_one_and_the_other_takes_over_when_it_is_killed(
    gateway_process: ProcessFactory, redis_server: RedisServer, upstream: Upstream, tmp_path: Path
) -> None:
    shared = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5},
        "logging": {"access_log": False},
        "redis": {"url": redis_server.url, "key_prefix": f"follow-{secrets.token_hex(4)}:", "probe_interval_s": 0.2},
        "events": {"interval_s": INTERVAL_S},
    }
    paths = [write_config(tmp_path / f"replica-{n}.yaml", raw_config(upstream.url, **shared)) for n in range(2)]
    group = list(await asyncio.gather(*(gateway_process(path) for path in paths)))
    for n, replica in enumerate(group):
        upstream.seed(f"batch-{n}", status=ACTIVE, model="command-r")
        await sdk(replica.url).batches.retrieve(f"batch-{n}")
    await follower_lists(upstream, 8)
    lists = [await metric(r.url, "gateway_follow_calls_total", kind="list") for r in group]
    assert sorted(lists)[0] == 0, lists  # one process follows
    assert sorted(lists)[1] >= 1, lists
    leader, other = (group[0], group[1]) if lists[0] else (group[1], group[0])
    leader.proc.kill()
    await leader.proc.wait()
    for n in range(2):
        upstream.set_status(f"batch-{n}", COMPLETED)

    async def both_events() -> bool:
        return await metric(other.url, "gateway_events_total", type="batch.completed") >= 2

    assert await poll_until(both_events, WAIT_S), "the survivor never took over"
    assert await metric(other.url, "gateway_follow_calls_total", kind="list") >= 1
    await sdk(other.url).batches.retrieve("batch-0")  # seen once more: no second event, no second count
    finished = {"caller": "-", "model": "command-r", "status": "completed"}
    assert await metric(other.url, "gateway_events_total", type="batch.completed") == 2
    assert await metric(other.url, "gateway_batches_finished_total", **finished) == 2


async def metric(url: str, name: str, **labels: str) -> float:
    _text, samples = await scrape_metrics(url)
    return sample_value(samples, name, **labels)


@pytest.mark.heavy
async def test_a_dataset_seen_while_validating_becomes_an_event_when_its_validation_ends_without_a_caller_asking(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(following(upstream, callers=DATASET_READER))
    upstream.datasets.validation_s = 2.0
    dataset_id = upstream.seed_dataset([{"custom_id": "0", "body": "{}"}], name="nightly")
    first = await http(f"{gateway.url}/v1/datasets/{dataset_id}", key=None, headers=_billing())
    assert first.status == 200
    assert first.document["dataset"]["validation_status"] in ("queued", "processing")
    seen = await newest_seq(gateway)
    events = await next_events(gateway, seen)
    if events[0].type != "dataset.validated":  # queued, then processing: the next one
        events = await next_events(gateway, events[0].seq)
    assert (events[0].type, events[0].subject) == ("dataset.validated", dataset_id)
    assert [s for s in by_follower(upstream, "dataset") if s.path.endswith(dataset_id)]
    assert upstream.count("dataset") == len(by_follower(upstream, "dataset")) + 1  # the caller asked once


async def test_after_its_first_round_the_follower_asks_for_more_pages_only_while_they_hold_changes_since_its_last(
    upstream: Upstream, start: GatewayFactory
) -> None:
    for n in range(2500):  # finished batches, not followed, that fill the pages
        upstream.seed(f"batch-done-{n:04d}", status=COMPLETED, age_s=600 + n / 100)
    upstream.seed("batch-old", status=ACTIVE, age_s=7200)  # followed, and on the third page
    upstream.seed("batch-new", status=ACTIVE, age_s=1)
    gateway = await start(following(upstream))
    for batch_id in ("batch-old", "batch-new"):
        await sdk(gateway.url).batches.retrieve(batch_id)
    follower = gateway.state.follower
    assert follower is not None
    await newest_seq(gateway)
    await follower_lists(upstream, 1)
    first = len(by_follower(upstream, "list"))
    for n in range(100):  # past the first round, whatever it took
        await follower_lists(upstream, first + n + 1)
        if follower.rounds >= 2 and follower.calls_last_round == 1:
            break
    rounds, lists = follower.rounds, len(by_follower(upstream, "list"))
    await follower_lists(upstream, lists + 3)
    assert len(by_follower(upstream, "list")) - lists == follower.rounds - rounds  # one page a round
    assert not [s for s in by_follower(upstream, "list")[lists:] if s.query.get("page_token")]
    assert [s for s in by_follower(upstream, "list")[:lists] if s.query.get("page_token")]  # the first round paged
    seen = await newest_seq(gateway)
    upstream.set_status("batch-old", COMPLETED)  # its change puts it on the first page
    [event] = await next_events(gateway, seen)
    assert (event.type, event.subject) == ("batch.completed", "batch-old")
    assert upstream.count("retrieve") == 2


@pytest.mark.heavy
async def test_datasets_deleted_while_validating_do_not_stall_following_of_the_others(
    upstream: Upstream, start: GatewayFactory
) -> None:
    # No jitter: every answer stays fresh as long, so the deleted ones (seen first) are stale before the kept
    # ones are, and the last round below retrieves them; with it, a deleted one could still be fresh then.
    gateway = await start(following(upstream, callers=DATASET_READER, cache={"active_jitter": 0}))
    upstream.datasets.validation_s = 1.0
    ids = [upstream.seed_dataset([{"custom_id": "0", "body": "{}"}], name=f"d{n:02d}") for n in range(25)]
    for dataset_id in ids:  # seen in this order: the 20 to be deleted are the least recently seen
        first = await http(f"{gateway.url}/v1/datasets/{dataset_id}", key=None, headers=_billing())
        assert first.document["dataset"]["validation_status"] in ("queued", "processing")
    deleted, kept = ids[:20], ids[20:]
    for dataset_id in deleted:
        del upstream.datasets.datasets[dataset_id]
    seq = await newest_seq(gateway)
    validated: set[str] = set()
    for _ in range(100):  # each wait bounded by WAIT_S; a few events per dataset at most
        if validated == set(kept):
            break
        (event,) = await next_events(gateway, seq)
        seq = event.seq
        if event.type == "dataset.validated":
            validated.add(event.subject)
    assert validated == set(kept)
    # A round checks the 20 least recently checked: one more round has looked at every deleted one left.
    assert gateway.state.follower is not None
    await gateway.state.follower.round()
    assert gateway.state.events is not None
    assert not set(deleted) & set(await gateway.state.events.followed("dataset", 100))


@pytest.mark.parametrize(
    ("now", "starts_at"),
    [
        (10.2, 15.0),  # a quick round: the next starts on the beat, however long this one took
        (14.9, 15.0),
        (15.0, 15.0),
        (15.1, 20.0),  # overran its beat: the next beat, not at once (rounds never run back to back)
        (27.0, 30.0),  # overran three beats: they are skipped
    ],
)
def test_a_round_starts_on_the_next_beat_of_the_interval_and_one_that_overran_waits_for_the_next(
    now: float, starts_at: float
) -> None:
    assert next_beat(10.0, 5.0, now) == pytest.approx(starts_at)


async def test_the_gateway_stops_even_when_the_followers_lease_call_loses_the_cancellation(
    upstream: Upstream, start: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = await start(following(upstream))
    # A lease renewal whose Redis call swallows the stop's cancellation.
    renewing, lost = lease_losing_one_cancellation(monkeypatch, WAIT_S)
    await asyncio.wait_for(renewing.wait(), WAIT_S)  # the follower's next round is renewing its lease

    started = time.monotonic()
    await asyncio.wait_for(gateway.stop(), WAIT_S)
    # At once, not when the wait gives up on it (a stop's cleanup swallows the cancellation of its own wait).
    assert time.monotonic() - started < WAIT_S / 3
    assert lost.is_set()
