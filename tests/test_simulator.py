"""The simulated upstream serves the whole batch API as Cohere does (docs/design.md §2): create, list, retrieve, cancel.

These drive the simulator directly, with the cohere SDK and aiohttp, on
127.0.0.1; the gateway is not involved.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import cohere
import pytest
from cohere.batches import Batch

from gateway.config import validate
from gateway.demo.mode import DEMO_CALLERS, demo_overrides
from gateway.demo.simulator import MAX_TRACKED_IDS, SimulatedBatch, Simulator, start_simulator
from tests.support import UPSTREAM_TOKEN, FakeClock, fresh_store_path, http, sdk

FIELDS = {
    "id",
    "name",
    "creator_id",
    "org_id",
    "status",
    "created_at",
    "updated_at",
    "input_dataset_id",
    "output_dataset_id",
    "input_tokens",
    "output_tokens",
    "model",
    "num_records",
    "num_successful_records",
    "num_failed_records",
    "status_reason",
}
NEW_BATCH = {"name": "nightly-embeddings", "input_dataset_id": "dataset-42", "model": "command-a"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    """A simulator on a clock the test moves: batches live 10 to 20 s, a cancel takes 1 s."""
    simulator = Simulator(token=UPSTREAM_TOKEN, lifetime_s=20, clock=clock, cancel_s=1.0)
    runner, _url = await start_simulator(simulator)
    yield simulator
    await runner.cleanup()


def client(simulator: Simulator) -> cohere.AsyncClientV2:
    return sdk(simulator.url, key=simulator.token)


async def create(simulator: Simulator, **fields: str) -> Batch:
    answer = await client(simulator).batches.create(request=Batch(**{**NEW_BATCH, **fields}))
    batch: Batch | None = answer.batch
    assert batch is not None
    return batch


def parse_rfc3339(stamp: str) -> datetime:
    assert stamp.endswith("Z"), stamp
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


async def test_a_created_batch_is_queued_with_every_field_and_real_timestamps(sim: Simulator) -> None:
    answer = await http(f"{sim.url}/v2/batches", method="POST", key=sim.token, data=json.dumps(NEW_BATCH).encode())
    assert answer.status == 200
    batch = answer.document["batch"]
    assert set(batch) == FIELDS
    assert batch["status"] == "BATCH_STATUS_QUEUED"
    assert {k: batch[k] for k in NEW_BATCH} == NEW_BATCH
    assert batch["created_at"] == batch["updated_at"]
    assert abs((parse_rfc3339(batch["created_at"]) - datetime.now(UTC)).total_seconds()) < 60
    [seen] = sim.seen
    assert (seen.method, seen.path, json.loads(seen.body)) == ("POST", "/v2/batches", NEW_BATCH)


async def test_each_create_gets_a_fresh_id(sim: Simulator) -> None:
    first, second = await create(sim), await create(sim)
    assert first.id
    assert second.id
    assert first.id != second.id


async def test_a_created_batch_runs_its_course_and_updated_at_moves_with_it(sim: Simulator, clock: FakeClock) -> None:
    created = await create(sim)
    assert created.id is not None
    co = client(sim)
    seen: list[tuple[str | None, int | None, datetime | None]] = []
    for _ in range(30):
        batch = (await co.batches.retrieve(created.id)).batch
        assert batch is not None
        assert (batch.name, batch.input_dataset_id, batch.model) == tuple(NEW_BATCH.values())
        seen.append((batch.status, batch.num_successful_records, batch.updated_at))
        clock.advance(1.0)
    statuses = [status for status, _, _ in seen]
    assert statuses[0] == "BATCH_STATUS_QUEUED"
    assert "BATCH_STATUS_IN_PROGRESS" in statuses
    assert statuses[-1] == "BATCH_STATUS_COMPLETED"
    for (status, done, updated), (next_status, next_done, next_updated) in itertools.pairwise(seen):
        assert updated is not None
        assert next_updated is not None
        changed = (status, done) != (next_status, next_done)
        assert (next_updated > updated) == changed, "updated_at moves exactly when the status or counters do"
        assert next_updated >= updated


async def test_the_same_state_gives_the_same_answer(sim: Simulator, clock: FakeClock) -> None:
    clock.advance(0)
    first = await http(f"{sim.url}/v2/batches/steady-1", key=sim.token)
    again = await http(f"{sim.url}/v2/batches/steady-1", key=sim.token)
    assert first.body == again.body


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"", "JSON object"),
        (b"not json", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({}).encode(), "name, input_dataset_id, model"),
        (json.dumps({**NEW_BATCH, "name": ""}).encode(), "name"),
        (json.dumps({**NEW_BATCH, "model": 7}).encode(), "model"),
        (json.dumps({"name": "x", "model": "m"}).encode(), "input_dataset_id"),
    ],
)
async def test_an_invalid_create_is_400_naming_what_is_wrong(sim: Simulator, body: bytes, named: str) -> None:
    answer = await http(f"{sim.url}/v2/batches", method="POST", key=sim.token, data=body)
    assert answer.status == 400
    assert named in answer.document["message"]
    listed = await http(f"{sim.url}/v2/batches", key=sim.token)
    assert listed.document == {"batches": []}


async def test_the_sdk_sees_a_400_for_an_invalid_create(sim: Simulator) -> None:
    with pytest.raises(cohere.BadRequestError):
        await create(sim, model="")


async def test_list_pages_through_every_known_batch_newest_first(sim: Simulator, clock: FakeClock) -> None:
    created = []
    for _ in range(5):
        created.append((await create(sim)).id)
        clock.advance(0.5)
    await client(sim).batches.retrieve("seen-by-retrieve")  # known from its first retrieve on
    co = client(sim)
    ids: list[str | None] = []
    token: str | None = None
    pages = 0
    while True:
        page = await co.batches.list(page_size=2, page_token=token, order_by="created_at")
        assert page.batches is not None
        assert len(page.batches) <= 2
        ids += [batch.id for batch in page.batches]
        pages += 1
        token = page.next_page_token
        if token is None:
            break
    assert ids == ["seen-by-retrieve", *reversed(created)]
    assert pages == 3


async def test_list_by_updated_at_puts_the_latest_change_first(sim: Simulator, clock: FakeClock) -> None:
    older = await create(sim)
    clock.advance(1)
    newer = await create(sim)
    assert older.id is not None
    assert newer.id is not None
    clock.advance(1)
    assert sim.cancel(older.id)  # a change: CANCELING now
    by_created = await client(sim).batches.list(order_by="created_at")
    by_updated = await client(sim).batches.list(order_by="updated_at")
    assert [b.id for b in by_created.batches or []] == [newer.id, older.id]
    assert [b.id for b in by_updated.batches or []] == [older.id, newer.id]
    assert by_updated.next_page_token is None


async def test_list_answers_the_default_page_of_50_and_keeps_the_token_off_the_last_page(sim: Simulator) -> None:
    for n in range(51):
        sim.batch(f"known-{n:02d}")
    first = await http(f"{sim.url}/v2/batches", key=sim.token)
    assert len(first.document["batches"]) == 50
    token = first.document["next_page_token"]
    last = await http(f"{sim.url}/v2/batches?page_token={token}", key=sim.token)
    assert len(last.document["batches"]) == 1
    assert "next_page_token" not in last.document


@pytest.mark.parametrize(
    "query", ["order_by=name", "page_size=-1", "page_size=ten", "page_token=not-a-token", "page_token=%21%21"]
)
async def test_an_invalid_list_query_is_400(sim: Simulator, query: str) -> None:
    answer = await http(f"{sim.url}/v2/batches?{query}", key=sim.token)
    assert answer.status == 400
    assert answer.document["message"]


async def test_a_page_token_is_only_good_for_its_own_order(sim: Simulator) -> None:
    for n in range(3):
        sim.batch(f"known-{n}")
    page = await http(f"{sim.url}/v2/batches?page_size=1&order_by=created_at", key=sim.token)
    token = page.document["next_page_token"]
    assert (await http(f"{sim.url}/v2/batches?page_token={token}&order_by=updated_at", key=sim.token)).status == 400


async def test_a_cancelled_batch_is_canceling_then_canceled_with_its_counters_frozen(
    sim: Simulator, clock: FakeClock
) -> None:
    created = await create(sim)
    assert created.id is not None
    clock.advance(sim.span_s(created.id) / 2)
    co = client(sim)
    running = (await co.batches.retrieve(created.id)).batch
    assert running is not None
    assert running.status == "BATCH_STATUS_IN_PROGRESS"
    clock.advance(0.25)
    answer = await http(f"{sim.url}/v2/batches/{created.id}:cancel", method="POST", key=sim.token)
    assert (answer.status, answer.document) == (200, {})
    assert sim.seen[-1].path == f"/v2/batches/{created.id}:cancel"
    canceling = (await co.batches.retrieve(created.id)).batch
    assert canceling is not None
    assert canceling.status == "BATCH_STATUS_CANCELING"
    assert canceling.updated_at is not None
    assert running.updated_at is not None
    assert canceling.updated_at > running.updated_at
    clock.advance(sim.cancel_s)
    canceled = (await co.batches.retrieve(created.id)).batch
    assert canceled is not None
    assert canceled.status == "BATCH_STATUS_CANCELED"
    assert canceled.updated_at is not None
    assert canceled.updated_at > canceling.updated_at
    clock.advance(sim.lifetime_s)
    later = (await co.batches.retrieve(created.id)).batch
    assert later == canceled
    assert canceled.num_successful_records == canceling.num_successful_records


async def test_the_sdk_cancels_a_batch(sim: Simulator, clock: FakeClock) -> None:
    created = await create(sim)
    assert created.id is not None
    co = client(sim)
    await co.batches.cancel(created.id)
    clock.advance(sim.cancel_s)
    batch = (await co.batches.retrieve(created.id)).batch
    assert batch is not None
    assert batch.status == "BATCH_STATUS_CANCELED"


async def test_cancelling_twice_or_a_finished_batch_changes_nothing(sim: Simulator, clock: FakeClock) -> None:
    finished = sim.batch("finished-1")
    clock.advance(sim.lifetime_s)
    finished = sim.batch("finished-1")
    assert finished["status"] == "BATCH_STATUS_COMPLETED"
    answer = await http(f"{sim.url}/v2/batches/finished-1:cancel", method="POST", key=sim.token)
    assert (answer.status, answer.document) == (200, {})
    assert sim.batch("finished-1") == finished
    created = await create(sim)
    assert created.id is not None
    for _ in range(2):
        assert (await http(f"{sim.url}/v2/batches/{created.id}:cancel", method="POST", key=sim.token)).status == 200
    assert sim.batch(created.id)["status"] == "BATCH_STATUS_CANCELING"


async def test_cancelling_an_unknown_batch_is_404(sim: Simulator) -> None:
    answer = await http(f"{sim.url}/v2/batches/never-seen:cancel", method="POST", key=sim.token)
    assert answer.status == 404
    assert "never-seen" in answer.document["message"]
    with pytest.raises(cohere.NotFoundError):
        await client(sim).batches.cancel("never-seen-either")


async def test_a_colon_in_a_retrieve_path_is_not_a_cancel(sim: Simulator) -> None:
    answer = await http(f"{sim.url}/v2/batches/abc:cancel", key=sim.token)
    assert answer.status == 200
    assert answer.document["batch"]["id"] == "abc:cancel"
    assert (await http(f"{sim.url}/v2/batches/abc", method="POST", key=sim.token)).status == 405


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v2/batches/b-1"), ("GET", "/v2/batches"), ("POST", "/v2/batches"), ("POST", "/v2/batches/b-1:cancel")],
)
async def test_every_route_refuses_a_wrong_token(sim: Simulator, method: str, path: str) -> None:
    answer = await http(f"{sim.url}{path}", method=method, key="not-the-token", data=json.dumps(NEW_BATCH).encode())
    assert answer.status == 401
    assert answer.document == {"message": "invalid api token"}
    assert sim.first_seen() == {}


async def test_missing_ids_are_404_as_before(sim: Simulator) -> None:
    answer = await http(f"{sim.url}/v2/batches/missing-1", key=sim.token)
    assert answer.status == 404
    assert sim.calls == 1
    assert sim.calls_by_id["missing-1"] == 1


def test_created_batches_share_the_bound_on_what_is_remembered() -> None:
    simulator = Simulator(token=UPSTREAM_TOKEN)
    bound = MAX_TRACKED_IDS
    assert simulator._batches.maxsize == bound
    simulator._batches.update({f"old-{n}": SimulatedBatch(f"old-{n}", 0.0, "n", "d", "m") for n in range(bound)})
    fresh = simulator.create("name", "dataset", "model")
    assert len(simulator._batches) == bound
    assert fresh["id"] in simulator._batches
    assert "old-0" not in simulator._batches


def test_the_demo_callers_are_a_valid_config() -> None:
    config = validate(demo_overrides("http://127.0.0.1:1", "token", fresh_store_path()), {}, demo=True)
    billing, reporting = config.callers
    assert (billing.name, billing.allow, billing.batches) == (
        "demo-billing",
        frozenset({"retrieve", "list", "create", "cancel"})
        | frozenset({"upload_dataset", "read_dataset", "delete_dataset", "dataset_usage"}),
        "own",
    )
    # The simulator is the demo's storage host: its parts download through the gateway.
    assert config.datasets.part_origins == ("http://127.0.0.1:1",)
    assert (reporting.name, reporting.allow, reporting.batches) == (
        "demo-reporting",
        frozenset({"retrieve", "list"}),
        "all",
    )
    assert [c["name"] for c in DEMO_CALLERS] == ["demo-billing", "demo-reporting"]


# --- a lagging read replica, and scheduled completions (docs/design.md §9) -----------------------------------------


async def retrieve(simulator: Simulator, batch_id: str) -> dict[str, Any]:
    answer = await http(f"{simulator.url}/v2/batches/{batch_id}", key=simulator.token)
    assert answer.status == 200
    batch: dict[str, Any] = answer.document["batch"]
    return batch


async def test_a_forced_lag_answers_the_batch_as_it_was_then_once(sim: Simulator, clock: FakeClock) -> None:
    sim.schedule("lagged-1", complete_at=clock.now + 5)
    running = await retrieve(sim, "lagged-1")
    clock.advance(10)
    completed = await retrieve(sim, "lagged-1")
    assert (running["status"], completed["status"]) == ("BATCH_STATUS_IN_PROGRESS", "BATCH_STATUS_COMPLETED")
    sim.lag_next("lagged-1", 8.0)
    lagging = await retrieve(sim, "lagged-1")
    assert lagging["status"] == "BATCH_STATUS_IN_PROGRESS", "the lag reaches back before the completion"
    assert parse_rfc3339(lagging["updated_at"]) < parse_rfc3339(completed["updated_at"])
    assert lagging == running
    assert await retrieve(sim, "lagged-1") == completed, "only the next answer lagged"


async def test_a_forced_lag_serves_count_answers_and_shows_earlier_counters(sim: Simulator, clock: FakeClock) -> None:
    clock.advance(0)
    await retrieve(sim, "paced-1")
    clock.advance(sim.span_s("paced-1") * 0.9)
    now = await retrieve(sim, "paced-1")
    sim.lag_next("paced-1", sim.span_s("paced-1") * 0.4, count=2)
    first, second = await retrieve(sim, "paced-1"), await retrieve(sim, "paced-1")
    assert first == second
    assert first["status"] == now["status"] == "BATCH_STATUS_IN_PROGRESS"
    assert first["num_successful_records"] < now["num_successful_records"]
    assert parse_rfc3339(first["updated_at"]) < parse_rfc3339(now["updated_at"])
    assert await retrieve(sim, "paced-1") == now


async def test_every_nth_get_of_a_batch_lags_when_both_options_are_set(clock: FakeClock) -> None:
    simulator = Simulator(token=UPSTREAM_TOKEN, clock=clock, lag_s=6.0, lag_every=3)
    runner, _url = await start_simulator(simulator)
    try:
        simulator.schedule("replica-1", complete_at=clock.now + 2)
        simulator.schedule("replica-2", complete_at=clock.now + 2)
        clock.advance(4)
        statuses = [(await retrieve(simulator, "replica-1"))["status"] for _ in range(6)]
        lagged = ["BATCH_STATUS_IN_PROGRESS" if n % 3 == 2 else "BATCH_STATUS_COMPLETED" for n in range(6)]
        assert statuses == lagged
        # Counted per batch: another id's first GETs do not lag.
        assert (await retrieve(simulator, "replica-2"))["status"] == "BATCH_STATUS_COMPLETED"
    finally:
        await runner.cleanup()


async def test_without_both_lag_options_no_answer_lags(clock: FakeClock) -> None:
    for simulator in (Simulator(clock=clock, lag_s=6.0), Simulator(clock=clock, lag_every=2)):
        simulator.schedule("steady-1", complete_at=clock.now)
        statuses = {simulator.batch("steady-1", simulator._lag_for_get("steady-1"))["status"] for _ in range(4)}
        assert statuses == {"BATCH_STATUS_COMPLETED"}


async def test_a_lag_never_reaches_back_before_the_batch_existed(sim: Simulator, clock: FakeClock) -> None:
    first = await retrieve(sim, "young-1")
    sim.lag_next("young-1", 3600)
    assert await retrieve(sim, "young-1") == first


async def test_a_scheduled_batch_stays_active_and_completes_at_the_chosen_moment(
    sim: Simulator, clock: FakeClock
) -> None:
    sim.schedule("sched-1", complete_at=clock.now + 100)
    sim.schedule("sched-fail-1", complete_at=clock.now + 100)
    assert sim.changed_at("sched-1") == clock.now + 100
    assert sim.changed_at("never-scheduled") is None
    created = parse_rfc3339((await retrieve(sim, "sched-1"))["created_at"])
    seen = []
    for _ in range(5):
        seen.append(await retrieve(sim, "sched-1"))
        clock.advance(19.9)
    assert all(batch == seen[0] for batch in seen), "steady while active, far past the batch's own pace"
    assert seen[0]["status"] == "BATCH_STATUS_IN_PROGRESS"
    clock.advance(0.5)
    done = await retrieve(sim, "sched-1")
    assert done["status"] == "BATCH_STATUS_COMPLETED"
    assert done["num_successful_records"] == done["num_records"]
    assert (parse_rfc3339(done["updated_at"]) - created).total_seconds() == pytest.approx(100, abs=1e-5)
    assert (await retrieve(sim, "sched-fail-1"))["status"] == "BATCH_STATUS_FAILED"


async def test_a_scheduled_batch_cancelled_before_its_moment_ends_canceled(sim: Simulator, clock: FakeClock) -> None:
    sim.schedule("sched-2", complete_at=clock.now + 10)
    await retrieve(sim, "sched-2")
    assert (await http(f"{sim.url}/v2/batches/sched-2:cancel", method="POST", key=sim.token)).status == 200
    clock.advance(20)
    assert (await retrieve(sim, "sched-2"))["status"] == "BATCH_STATUS_CANCELED"
