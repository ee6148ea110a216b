"""Which datasets an ``own`` caller sees (docs/design.md §11, "Scope"), on every route and both answer paths.

billing-service and reporting are both ``batches: own``. A dataset is a
caller's when it uploaded it (recorded here as the upload route records it:
``record_owner(dataset_key(id), caller)``) or when it is the output of one
of its batches, which the gateway records as a batch answer naming
``output_dataset_id`` passes through it.
"""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from cohere.batches import Batch
from cohere.core.api_error import ApiError

from gateway.edge.server import RunningGateway
from gateway.records.base import dataset_key
from tests.conftest import GatewayFactory
from tests.dataset_kit import FakeDatasets
from tests.redis_server import RedisServer
from tests.support import BILLING_KEY, REPORTING_KEY, Answer, FakeClock, eventually, http, sdk, store_stalled
from tests.test_dataset_routes import dataset_config
from tests.upstream import Upstream, assert_error, create_body, post_json

BOUND_S = 30.0
COMPLETED = "BATCH_STATUS_COMPLETED"


async def uploaded(gateway: RunningGateway, dataset_id: str, caller: str) -> None:
    """``dataset_id`` recorded as ``caller``'s, as an upload through the gateway records it."""
    await gateway.state.records.record_owner(dataset_key(dataset_id), caller)


async def as_reporting(url: str, method: str = "GET") -> Answer:
    return await http(url, method=method, key=REPORTING_KEY)


async def test_an_own_caller_sees_only_its_datasets_on_every_route_cached_or_not(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    for dataset_id in ("ds-billing", "ds-reporting", "ds-nobody"):
        fake.add(dataset_id, "validated")
    gateway = await start(dataset_config(upstream.url, "own"))
    await uploaded(gateway, "ds-billing", "billing-service")
    await uploaded(gateway, "ds-reporting", "reporting")
    url = gateway.url

    before_cached = await as_reporting(f"{url}/v1/datasets/ds-billing")
    own = await http(f"{url}/v1/datasets/ds-billing")  # now cached
    after_cached = await as_reporting(f"{url}/v1/datasets/ds-billing")
    nobodys = await as_reporting(f"{url}/v1/datasets/ds-nobody")
    deleted = await as_reporting(f"{url}/v1/datasets/ds-billing", "DELETE")
    listed = await as_reporting(f"{url}/v1/datasets")
    usage = await as_reporting(f"{url}/v1/datasets/usage")

    for answer in (before_cached, after_cached, nobodys, deleted):
        assert_error(answer, 404, "not_found")
        assert "dataset" in answer.document["message"]
    assert own.status == 200
    assert [d["id"] for d in listed.document["datasets"]] == ["ds-reporting"]
    assert usage.document == {"organization_usage": 12345}  # organisation-wide: no scope
    assert [seen.path for seen in fake.calls()] == ["/v1/datasets/ds-billing", "/v1/datasets", "/v1/datasets/usage"]
    assert "ds-billing" in fake.datasets


async def test_an_own_caller_deletes_its_dataset_and_no_one_elses(upstream: Upstream, start: GatewayFactory) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-reporting", "validated")
    gateway = await start(dataset_config(upstream.url, "own"))
    await uploaded(gateway, "ds-reporting", "reporting")

    refused = await http(f"{gateway.url}/v1/datasets/ds-reporting", method="DELETE")
    deleted = await as_reporting(f"{gateway.url}/v1/datasets/ds-reporting", "DELETE")

    assert_error(refused, 404, "not_found")
    assert (deleted.status, deleted.document) == (200, {})
    assert [(seen.method, seen.path) for seen in fake.calls()] == [("DELETE", "/v1/datasets/ds-reporting")]


async def test_an_own_caller_may_not_create_a_batch_from_another_callers_dataset(
    upstream: Upstream, start: GatewayFactory
) -> None:
    FakeDatasets(upstream)
    gateway = await start(dataset_config(upstream.url, "own"))
    await uploaded(gateway, "ds-reporting", "reporting")
    await uploaded(gateway, "ds-billing", "billing-service")
    url = f"{gateway.url}/v2/batches"

    refused = await post_json(url, create_body(input_dataset_id="ds-reporting"))
    keyed = await post_json(url, create_body(input_dataset_id="ds-reporting"), idempotency_key="k-1")
    mine = await post_json(url, create_body(input_dataset_id="ds-billing"))
    never_seen = await post_json(url, create_body(input_dataset_id="ds-uploaded-around-the-gateway"))

    for answer in (refused, keyed):
        assert_error(answer, 404, "not_found")
        assert "ds-reporting" in answer.document["message"]
    assert [mine.status, never_seen.status] == [200, 200]
    created = [json.loads(seen.body)["input_dataset_id"] for seen in upstream.calls("create")]
    assert created == ["ds-billing", "ds-uploaded-around-the-gateway"]


async def test_a_caller_with_every_batch_in_scope_reads_and_names_any_dataset(
    upstream: Upstream, start: GatewayFactory
) -> None:
    FakeDatasets(upstream).add("ds-reporting", "validated")
    gateway = await start(dataset_config(upstream.url, "all"))
    await uploaded(gateway, "ds-reporting", "reporting")

    read = await http(f"{gateway.url}/v1/datasets/ds-reporting")
    created = await post_json(f"{gateway.url}/v2/batches", create_body(input_dataset_id="ds-reporting"))

    assert (read.status, read.document["dataset"]["id"]) == (200, "ds-reporting")
    assert created.status == 200


async def finish(upstream: Upstream, batch_id: str, output: str) -> None:
    upstream.batches[batch_id].update(output_dataset_id=output)
    upstream.set_status(batch_id, COMPLETED)


async def test_the_output_of_an_own_callers_batch_is_its_own_however_the_batch_answer_came(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    clock = FakeClock()
    gateway = await start(dataset_config(upstream.url, "own"), clock=clock)
    co = sdk(gateway.url)
    batches = []
    for n in range(3):
        created = (await co.batches.create(request=Batch(name=f"b{n}", input_dataset_id="ds-in", model="m"))).batch
        batches.append(created.id)
    for n, batch_id in enumerate(batches):
        await finish(upstream, batch_id, f"ds-out-{n}")
        fake.add(f"ds-out-{n}", "validated")
    clock.advance(6)  # the created batches' cached answers are no longer fresh

    await co.batches.retrieve(batches[0])  # a retrieve (a miss)
    await co.batches.list()  # a list page
    waited = await http(f"{gateway.url}/v2/batches/{batches[2]}", headers={"Prefer": "wait=1"})

    assert waited.status == 200
    for n in range(3):
        mine = await co.datasets.get(f"ds-out-{n}")
        assert mine.dataset.id == f"ds-out-{n}"
        assert_error(await as_reporting(f"{gateway.url}/v1/datasets/ds-out-{n}"), 404, "not_found")
    listed = await co.datasets.list()
    assert sorted(d.id for d in listed.datasets or []) == ["ds-out-0", "ds-out-1", "ds-out-2"]


async def test_the_output_of_an_own_callers_batch_is_its_own_when_the_follower_saw_it_finish_first(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    gateway = await start(dataset_config(upstream.url, "own"))
    events, follower = gateway.state.events, gateway.state.follower
    assert events is not None
    assert follower is not None
    co = sdk(gateway.url)
    created = (await co.batches.create(request=Batch(name="b", input_dataset_id="ds-in", model="m"))).batch
    assert await eventually(lambda: events.followed_count["batch"] == 1, BOUND_S)
    await finish(upstream, created.id, "ds-out")
    fake.add("ds-out", "validated")

    await follower.round()  # its list shows the batch finished: stored before any caller asked for it
    seen = await co.batches.retrieve(created.id)  # a hit on what the follower stored

    assert seen.batch.status == COMPLETED
    assert seen.batch.output_dataset_id == "ds-out"
    mine = await co.datasets.get("ds-out")
    assert mine.dataset.id == "ds-out"
    assert_error(await as_reporting(f"{gateway.url}/v1/datasets/ds-out"), 404, "not_found")


async def test_an_output_is_recorded_once_however_often_its_batch_is_seen(
    upstream: Upstream, start: GatewayFactory
) -> None:
    FakeDatasets(upstream)
    clock = FakeClock()
    gateway = await start(dataset_config(upstream.url, "own"), clock=clock)
    co = sdk(gateway.url)
    created = (await co.batches.create(request=Batch(name="b", input_dataset_id="ds-in", model="m"))).batch
    await finish(upstream, created.id, "ds-out")
    records = gateway.state.records
    writes: list[str] = []
    record_owner = records.record_owner

    async def counted(key: str, caller: str) -> None:
        writes.append(key)
        await record_owner(key, caller)

    records.record_owner = counted  # type: ignore[method-assign]
    for _ in range(3):
        clock.advance(6)
        await co.batches.retrieve(created.id)
        await co.batches.list()
    hits = [await co.batches.retrieve(created.id) for _ in range(5)]

    assert {b.batch.status for b in hits} == {"BATCH_STATUS_COMPLETED"}
    assert writes == [dataset_key("ds-out")]


async def test_an_output_of_a_batch_no_caller_created_stays_out_of_own_scope(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    upstream.seed("seeded-1", status=COMPLETED, output_dataset_id="ds-seeded-out")
    fake.add("ds-seeded-out", "validated")
    gateway = await start(dataset_config(upstream.url, "own"))

    await http(f"{gateway.url}/v2/batches")
    answer = await http(f"{gateway.url}/v1/datasets/ds-seeded-out")

    assert_error(answer, 404, "not_found")


async def test_dataset_ownership_holds_across_replicas_on_one_redis(
    upstream: Upstream, start: GatewayFactory, redis_server: RedisServer
) -> None:
    fake = FakeDatasets(upstream)
    redis = {"url": redis_server.url, "key_prefix": f"ds-{secrets.token_hex(4)}:", "timeout_s": 2.0}
    config = dataset_config(upstream.url, "own", redis=redis)
    first, second = await start(config), await start(config)
    co_first, co_second = sdk(first.url), sdk(second.url)
    created = (await co_first.batches.create(request=Batch(name="b", input_dataset_id="ds-in", model="m"))).batch
    await finish(upstream, created.id, "ds-out")
    fake.add("ds-out", "validated")
    fake.add("ds-up", "validated")
    await uploaded(first, "ds-up", "reporting")
    await second.state.cache.evict(created.id)

    await co_second.batches.retrieve(created.id)  # the output is recorded through the second replica

    assert (await co_first.datasets.get("ds-out")).dataset.id == "ds-out"
    assert (await co_second.datasets.get("ds-out")).dataset.id == "ds-out"
    assert_error(await as_reporting(f"{first.url}/v1/datasets/ds-out"), 404, "not_found")
    assert (await as_reporting(f"{second.url}/v1/datasets/ds-up")).status == 200
    refused = await post_json(f"{second.url}/v2/batches", create_body(input_dataset_id="ds-up"))
    assert_error(refused, 404, "not_found")


async def test_a_store_that_cannot_answer_is_503_on_an_own_callers_dataset_routes(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "validated")
    gateway = await start(dataset_config(upstream.url, "own"))
    with store_stalled(gateway.state.records):
        got = await asyncio.wait_for(http(f"{gateway.url}/v1/datasets/ds-1"), BOUND_S)
        deleted = await asyncio.wait_for(http(f"{gateway.url}/v1/datasets/ds-1", method="DELETE"), BOUND_S)
        listed = await asyncio.wait_for(http(f"{gateway.url}/v1/datasets"), BOUND_S)

    for answer in (got, deleted):
        assert_error(answer, 503, "store_unavailable")
    assert_error(listed, 503, "store_unavailable")
    assert [seen.path for seen in fake.calls()] == ["/v1/datasets"]


async def test_the_sdk_sees_another_callers_dataset_as_not_found(upstream: Upstream, start: GatewayFactory) -> None:
    FakeDatasets(upstream).add("ds-1", "validated")
    gateway = await start(dataset_config(upstream.url, "own"))
    await uploaded(gateway, "ds-1", "reporting")

    with pytest.raises(ApiError) as refused:
        await asyncio.wait_for(sdk(gateway.url, BILLING_KEY).datasets.get("ds-1"), BOUND_S)

    assert refused.value.status_code == 404
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["code"] == "not_found"
    assert upstream.requests == []


async def test_an_own_caller_reads_the_simulated_output_of_its_batch_and_no_other_caller_does(
    upstream: Upstream, start: GatewayFactory
) -> None:
    seeded = upstream.seed_dataset([{"custom_id": str(n), "body": "{}"} for n in range(3)], name="embed-in")
    gateway = await start(dataset_config(upstream.url, "own"))
    await uploaded(gateway, seeded, "billing-service")
    co, other = sdk(gateway.url), sdk(gateway.url, REPORTING_KEY)
    created = (await co.batches.create(request=Batch(name="b", input_dataset_id=seeded, model="embed"))).batch
    output = upstream.datasets.batch_output(created.id, seeded, upstream.datasets.now())
    assert output is not None
    upstream.batches[created.id]["output_dataset_id"] = output
    upstream.set_status(created.id, COMPLETED)
    await gateway.state.cache.evict(created.id)

    finished = (await co.batches.retrieve(created.id)).batch
    results = await asyncio.wait_for(co.wait(await co.datasets.get(output), timeout=BOUND_S, interval=0.05), BOUND_S)
    with pytest.raises(ApiError) as refused:
        await other.datasets.get(output)
    with pytest.raises(ApiError) as not_an_input:
        await other.batches.create(request=Batch(name="b", input_dataset_id=output, model="embed"))

    assert finished.output_dataset_id == output
    assert results.dataset.validation_status == "validated"
    assert sum(p.num_rows or 0 for p in results.dataset.dataset_parts or []) == 3
    assert [refused.value.status_code, not_an_input.value.status_code] == [404, 404]
    assert upstream.count("create") == 1
