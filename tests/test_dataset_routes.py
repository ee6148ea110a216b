"""The dataset read routes (docs/design.md §11) and the §8 conformance fixes, seen from outside.

A real gateway in front of the fake upstream (``tests/upstream.py``) with
its dataset routes scripted (``tests/dataset_kit.py``); the cohere SDK as
the client where it fits, aiohttp or raw bytes where the headers or the
exact path matter.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cohere.core.api_error import ApiError

from gateway.config import GatewayConfig
from gateway.records.base import dataset_key
from tests.conftest import GatewayFactory
from tests.dataset_kit import STORAGE, CountingLinks, FakeDatasets
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    Answer,
    FakeClock,
    eventually,
    http,
    make_config,
    raw_request,
    request_bytes,
    sdk,
)
from tests.upstream import Upstream, assert_error, caller

BOUND_S = 30.0
DATASET_OPERATIONS = ["retrieve", "list", "create", "cancel", "read_dataset", "delete_dataset", "dataset_usage"]


def dataset_config(url: str, scope: str = "all", **sections: Any) -> GatewayConfig:
    """Both callers allowed every batch and dataset read operation, with ``scope``."""
    return make_config(
        url,
        callers=[
            caller("billing-service", BILLING_KEY, DATASET_OPERATIONS, scope),
            caller("reporting", REPORTING_KEY, DATASET_OPERATIONS, scope),
        ],
        **sections,
    )


async def get(url: str, path: str, **headers: str) -> Answer:
    return await http(f"{url}{path}", headers=headers)


def calls_for(fake: FakeDatasets, path: str, method: str = "GET") -> int:
    return sum(1 for seen in fake.calls(path) if seen.path == path and seen.method == method)


# ---------------------------------------------------------------------------
# The SDK's dataset calls
# ---------------------------------------------------------------------------


async def test_the_sdk_gets_lists_deletes_and_sizes_datasets_through_the_gateway(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-done", "validated")
    fake.add("ds-busy", "processing")
    gateway = await start(dataset_config(upstream.url))
    co = sdk(gateway.url)

    got = await asyncio.wait_for(co.datasets.get("ds-done"), BOUND_S)
    listed = await asyncio.wait_for(
        co.datasets.list(
            dataset_type="batch-embed-v2-input",
            before=datetime(2030, 1, 1, tzinfo=UTC),
            after=datetime(2020, 1, 1, tzinfo=UTC),
            limit=10,
            offset=0,
            validation_status="validated",
        ),
        BOUND_S,
    )
    usage = await asyncio.wait_for(co.datasets.get_usage(), BOUND_S)
    busy = await asyncio.wait_for(co.datasets.get("ds-busy"), BOUND_S)
    await asyncio.wait_for(co.datasets.delete("ds-busy"), BOUND_S)
    with pytest.raises(ApiError) as gone:
        await asyncio.wait_for(co.datasets.get("ds-busy"), BOUND_S)

    assert (got.dataset.id, got.dataset.validation_status) == ("ds-done", "validated")
    assert {d.id for d in listed.datasets or []} == {"ds-done", "ds-busy"}
    assert usage.organization_usage == 12345
    assert busy.dataset.validation_status == "processing"
    # The delete evicted the cached answer: the next get asked the upstream, which no longer has it.
    assert gone.value.status_code == 404
    assert calls_for(fake, "/v1/datasets/ds-busy") == 2
    listing = next(seen for seen in fake.calls() if seen.path == "/v1/datasets")
    assert dict(listing.query) == {
        "datasetType": "batch-embed-v2-input",
        "before": "2030-01-01T00:00:00Z",
        "after": "2020-01-01T00:00:00Z",
        "limit": "10",
        "offset": "0",
        "validationStatus": "validated",
    }
    for seen in fake.calls():
        assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
        assert seen.headers["X-Client-Name"] == "billing-service"


async def test_the_sdk_reads_the_simulated_upstreams_datasets_through_the_gateway(
    upstream: Upstream, start: GatewayFactory
) -> None:
    seeded = upstream.seed_dataset([{"custom_id": str(n), "body": "{}"} for n in range(3)], name="embed-in")
    gateway = await start(dataset_config(upstream.url))
    gateway.state.links = CountingLinks()
    co = sdk(gateway.url)

    got = await asyncio.wait_for(co.datasets.get(seeded), BOUND_S)
    again = await asyncio.wait_for(co.datasets.with_raw_response.get(seeded), BOUND_S)
    listed = await asyncio.wait_for(co.datasets.list(validation_status="validated"), BOUND_S)
    usage = await asyncio.wait_for(co.datasets.get_usage(), BOUND_S)
    await asyncio.wait_for(co.datasets.delete(seeded), BOUND_S)
    after = await asyncio.wait_for(co.datasets.list(), BOUND_S)

    assert got.dataset.validation_status == "validated"
    assert again.headers["x-cache"] == "HIT"
    assert again.headers["etag"].startswith('W/"')
    parts = [*(got.dataset.dataset_parts or []), *((listed.datasets or [])[0].dataset_parts or [])]
    assert parts
    assert all((p.url or "").startswith(f"{gateway.url}/v1/datasets/{seeded}/parts/") for p in parts)
    assert upstream.url not in json.dumps([p.url for p in parts])
    assert [d.id for d in listed.datasets or []] == [seeded]
    assert (usage.organization_usage or 0) > 0
    assert after.datasets in (None, [])
    assert [upstream.count(r) for r in ("dataset", "datasets", "dataset_usage", "delete_dataset")] == [1, 2, 1, 1]


async def test_co_wait_returns_once_validation_ends_with_few_upstream_calls(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "queued")
    gateway = await start(dataset_config(upstream.url, cache={"ttl_s": {"active": 1, "active_min": 1}}))
    co = sdk(gateway.url)
    created = await co.datasets.get("ds-1")
    polled = asyncio.ensure_future(co.wait(created, timeout=BOUND_S, interval=0.05))
    assert await eventually(lambda: calls_for(fake, "/v1/datasets/ds-1") >= 1)
    fake.set_status("ds-1", "validated")

    done = await asyncio.wait_for(polled, BOUND_S)

    assert done.dataset.validation_status == "validated"
    # The SDK polled every 50 ms; the gateway asked the upstream about once per active TTL.
    assert calls_for(fake, "/v1/datasets/ds-1") <= 4


# ---------------------------------------------------------------------------
# Caching by validation_status, both answer paths
# ---------------------------------------------------------------------------


async def test_a_dataset_is_cached_for_as_long_as_its_validation_status_allows(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-busy", "processing")
    fake.add("ds-done", "failed", validation_error="line 3: not JSON")
    clock = FakeClock()
    gateway = await start(dataset_config(upstream.url), clock=clock)

    first = [await get(gateway.url, f"/v1/datasets/{d}") for d in ("ds-busy", "ds-done", "ds-none")]
    second = [await get(gateway.url, f"/v1/datasets/{d}") for d in ("ds-busy", "ds-done", "ds-none")]
    clock.advance(6)  # past ttl_s.active (5), within ttl_s.terminal
    third = [await get(gateway.url, f"/v1/datasets/{d}") for d in ("ds-busy", "ds-done")]

    assert [a.header("X-Cache") for a in first] == ["MISS", "MISS", "MISS"]
    assert [a.header("X-Cache") for a in second] == ["HIT", "HIT", "HIT"]
    assert [a.header("X-Cache") for a in third] == ["MISS", "HIT"]
    assert [a.status for a in first + second + third] == [200, 200, 404, 200, 200, 404, 200, 200]
    assert_error(second[2], 404, "not_found")
    assert first[1].document["dataset"]["validation_error"] == "line 3: not JSON"
    assert [calls_for(fake, f"/v1/datasets/{d}") for d in ("ds-busy", "ds-done", "ds-none")] == [2, 1, 1]
    assert all((a.header("Content-Type") or "").startswith("application/json") for a in first + second + third)


async def test_a_dataset_answer_older_than_the_cached_one_is_not_served(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "processing", updated_at="2026-01-01T00:00:10.000000Z")
    clock = FakeClock()
    gateway = await start(dataset_config(upstream.url), clock=clock)
    before = await get(gateway.url, "/v1/datasets/ds-1")
    fake.datasets["ds-1"].update(validation_status="queued", updated_at="2026-01-01T00:00:05.000000Z")
    clock.advance(6)

    after = await get(gateway.url, "/v1/datasets/ds-1")

    assert after.header("X-Cache") == "MISS"
    assert after.document["dataset"]["validation_status"] == "processing"
    assert after.header("ETag") == before.header("ETag")


async def test_a_cached_dataset_is_served_stale_while_the_upstream_fails(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "processing")
    clock = FakeClock()
    gateway = await start(dataset_config(upstream.url), clock=clock)
    await get(gateway.url, "/v1/datasets/ds-1")
    clock.advance(6)
    upstream.fail("*", 500)

    stale = await get(gateway.url, "/v1/datasets/ds-1")

    assert (stale.status, stale.header("X-Cache")) == (200, "STALE")
    assert stale.document["dataset"]["id"] == "ds-1"


# ---------------------------------------------------------------------------
# Part URLs, the weak ETag, 304 and Prefer: wait
# ---------------------------------------------------------------------------


async def test_every_dataset_answer_carries_part_urls_of_its_own_under_one_weak_etag(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "processing")
    clock = FakeClock()
    gateway = await start(dataset_config(upstream.url), clock=clock)
    gateway.state.links = CountingLinks()

    miss = await get(gateway.url, "/v1/datasets/ds-1")
    hit = await get(gateway.url, "/v1/datasets/ds-1")
    listed = await get(gateway.url, "/v1/datasets")
    etag = miss.header("ETag") or ""
    hit_304 = await get(gateway.url, "/v1/datasets/ds-1", **{"If-None-Match": etag})
    clock.advance(6)
    miss_304 = await get(gateway.url, "/v1/datasets/ds-1", **{"If-None-Match": etag})
    fake.set_status("ds-1", "validated")
    clock.advance(6)
    changed = await get(gateway.url, "/v1/datasets/ds-1", **{"If-None-Match": etag})

    assert etag.startswith('W/"')
    assert hit.header("ETag") == etag
    urls = [a.document["dataset"]["dataset_parts"][0]["url"] for a in (miss, hit)]
    urls.append(listed.document["datasets"][0]["dataset_parts"][0]["url"])
    assert len(set(urls)) == 3
    assert all(u.startswith(f"{gateway.url}/v1/datasets/ds-1/parts/ds-1-part-0?caller=billing-service") for u in urls)
    for answer in (miss, hit, listed, changed):
        assert STORAGE.encode() not in answer.body
    assert [(a.status, a.header("X-Cache"), a.body) for a in (hit_304, miss_304)] == [
        (304, "HIT", b""),
        (304, "MISS", b""),
    ]
    assert hit_304.header("ETag") == miss_304.header("ETag") == etag
    assert changed.status == 200
    assert changed.document["dataset"]["validation_status"] == "validated"
    assert (changed.header("ETag") or "").startswith('W/"')
    assert changed.header("ETag") != etag


async def test_part_urls_start_with_the_public_url_when_one_is_configured(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "validated")
    gateway = await start(dataset_config(upstream.url, server={"public_url": "https://gw.example.internal/"}))
    gateway.state.links = CountingLinks()

    answer = await get(gateway.url, "/v1/datasets/ds-1")

    part = answer.document["dataset"]["dataset_parts"][0]
    assert part["url"].startswith("https://gw.example.internal/v1/datasets/ds-1/parts/")
    assert part["original_url"].startswith("https://gw.example.internal/v1/datasets/ds-1/parts/ds-1-part-0/original?")


async def test_with_direct_links_a_dataset_answer_is_the_upstreams_bytes(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "validated")
    gateway = await start(dataset_config(upstream.url, datasets={"downloads": "direct"}))

    answer = await get(gateway.url, "/v1/datasets/ds-1")

    assert answer.body == json.dumps({"dataset": fake.datasets["ds-1"]}).encode()


async def test_prefer_wait_holds_a_dataset_get_until_its_validation_ends(
    upstream: Upstream, start: GatewayFactory
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "processing")
    fake.add("ds-done", "validated")
    gateway = await start(dataset_config(upstream.url))
    co = sdk(gateway.url)
    await co.datasets.get("ds-1")
    options: Any = {"additional_headers": {"Prefer": "wait=20"}, "timeout_in_seconds": BOUND_S}

    held = asyncio.ensure_future(co.datasets.with_raw_response.get("ds-1", request_options=options))
    assert await eventually(lambda: gateway.state.waiters.held_for(dataset_key("ds-1")) == 1)
    fake.set_status("ds-1", "validated")
    answer = await asyncio.wait_for(held, BOUND_S)
    at_once = await asyncio.wait_for(co.datasets.with_raw_response.get("ds-done", request_options=options), 5)

    assert answer.data.dataset.validation_status == "validated"
    assert answer.headers["preference-applied"] == "wait=20"
    # A dataset whose validation has ended will not change: answered at once, not held.
    assert at_once.data.dataset.validation_status == "validated"
    assert "preference-applied" not in at_once.headers


async def test_waiting_on_datasets_makes_no_batch_list_calls(upstream: Upstream, start: GatewayFactory) -> None:
    fake = FakeDatasets(upstream)
    ids = [f"ds-{n}" for n in range(4)]
    for dataset_id in ids:
        fake.add(dataset_id, "processing")
    gateway = await start(dataset_config(upstream.url))
    for dataset_id in ids:
        await get(gateway.url, f"/v1/datasets/{dataset_id}")

    held = [
        asyncio.ensure_future(get(gateway.url, f"/v1/datasets/{dataset_id}", Prefer="wait=3")) for dataset_id in ids
    ]
    # Each waited dataset is refreshed on its own, at least once, while the requests are held.
    assert await eventually(lambda: all(calls_for(fake, f"/v1/datasets/{d}") >= 2 for d in ids), BOUND_S)
    answers = await asyncio.gather(*held)

    assert [a.status for a in answers] == [200] * 4
    assert upstream.count("list") == 0
    assert upstream.count("retrieve") == 0


# ---------------------------------------------------------------------------
# Usage, and what the routes refuse
# ---------------------------------------------------------------------------


async def test_dataset_usage_is_asked_of_the_upstream_once_a_minute(upstream: Upstream, start: GatewayFactory) -> None:
    fake = FakeDatasets(upstream, usage=777)
    clock = FakeClock()
    gateway = await start(dataset_config(upstream.url), clock=clock)

    first = await get(gateway.url, "/v1/datasets/usage")
    clock.advance(59)
    second = await get(gateway.url, "/v1/datasets/usage")
    clock.advance(2)
    third = await get(gateway.url, "/v1/datasets/usage")

    assert [a.document for a in (first, second, third)] == [{"organization_usage": 777}] * 3
    assert [a.header("X-Cache") for a in (first, second, third)] == ["MISS", "HIT", "MISS"]
    assert second.header("Cache-Control") == "private, max-age=1"
    assert calls_for(fake, "/v1/datasets/usage") == 2


INVALID_DATASET_LIST_QUERIES = [
    "foo=1",
    "dataset_type=batch-embed-v2-input",
    "datasetType=",
    "datasetType=Batch%20Embed",
    "datasetType=a&datasetType=b",
    "before=yesterday",
    "before=2024-01-01",
    "after=2024-13-01T00:00:00Z",
    "after=2024-01-01T00:00:00",
    "limit=-1",
    "limit=ten",
    "offset=1e3",
    "validationStatus=VALIDATED",
    "validation_status=validated",
    "page_size=10",
]


@pytest.mark.parametrize("query", INVALID_DATASET_LIST_QUERIES)
async def test_a_dataset_list_query_the_upstream_does_not_take_is_refused_without_an_upstream_call(
    upstream: Upstream, start: GatewayFactory, query: str
) -> None:
    fake = FakeDatasets(upstream)
    gateway = await start(dataset_config(upstream.url))

    answer = await get(gateway.url, f"/v1/datasets?{query}")

    assert_error(answer, 400, "invalid_request")
    assert fake.calls() == []


MALFORMED_IDS = [
    ("/v1/datasets/a%2Fb", 400, "invalid_request"),
    ("/v1/datasets/a%3Ab", 400, "invalid_request"),
    ("/v1/datasets/a:b", 400, "invalid_request"),
    ("/v1/datasets/-a", 400, "invalid_request"),
    ("/v1/datasets/%C3%A9", 400, "invalid_request"),
    ("/v1/datasets/a%00b", 400, "invalid_request"),
    ("/v1/datasets/a%20b", 400, "invalid_request"),
    ("/v1/datasets/" + "a" * 129, 400, "invalid_request"),
    ("/v1/datasets/%2E%2E", 400, "invalid_request"),
    ("/v1/datasets/..%2Fusage", 400, "invalid_request"),
    ("/v1/datasets/../v2/batches/x", 404, "route_not_found"),
    ("/v1/datasets/a/b", 404, "route_not_found"),
]


@pytest.mark.parametrize(("path", "status", "code"), MALFORMED_IDS)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_a_malformed_dataset_id_is_refused_without_an_upstream_call(
    upstream: Upstream, start: GatewayFactory, method: str, path: str, status: int, code: str
) -> None:
    fake = FakeDatasets(upstream)
    gateway = await start(dataset_config(upstream.url))

    answer = await raw_request(gateway.url, request_bytes(path, method=method))

    assert_error(answer, status, code)
    assert upstream.requests == []
    assert fake.calls() == []


DATASET_ROUTES = [
    ("GET", "/v1/datasets"),
    ("GET", "/v1/datasets/ds-1"),
    ("HEAD", "/v1/datasets/ds-1"),
    ("DELETE", "/v1/datasets/ds-1"),
    ("GET", "/v1/datasets/usage"),
]


@pytest.mark.parametrize(("method", "path"), DATASET_ROUTES)
@pytest.mark.parametrize("key", [None, "not-a-caller-key"])
async def test_a_request_without_a_known_key_is_401_on_every_dataset_route(
    upstream: Upstream, start: GatewayFactory, method: str, path: str, key: str | None
) -> None:
    fake = FakeDatasets(upstream)
    fake.add("ds-1", "validated")
    gateway = await start(dataset_config(upstream.url))
    await get(gateway.url, "/v1/datasets/ds-1")  # cached: a hit must not answer without a key either
    before = len(upstream.requests)

    answer = await http(f"{gateway.url}{path}", method=method, key=key)

    assert answer.status == 401
    if method != "HEAD":
        assert_error(answer, 401, "unauthorized")
    assert len(upstream.requests) == before


@pytest.mark.parametrize(("method", "path"), [r for r in DATASET_ROUTES if r[0] != "HEAD"])
async def test_a_caller_with_the_default_allow_may_not_touch_datasets(
    upstream: Upstream, start: GatewayFactory, method: str, path: str
) -> None:
    FakeDatasets(upstream).add("ds-1", "validated")
    gateway = await start(make_config(upstream.url))

    answer = await http(f"{gateway.url}{path}", method=method)

    assert_error(answer, 403, "operation_not_allowed")
    assert "batches" not in answer.document["message"]
    assert upstream.requests == []


# ---------------------------------------------------------------------------
# §8: what Cohere does, the gateway does
# ---------------------------------------------------------------------------


async def test_a_batch_list_page_size_above_1000_is_sent_upstream_as_1000(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await start(make_config(upstream.url))

    listed = await asyncio.wait_for(sdk(gateway.url).batches.list(page_size=5000), BOUND_S)
    huge = await get(gateway.url, "/v2/batches?page_size=123456789012")

    assert [b.id for b in listed.batches or []] == ["seeded-1"]
    assert huge.status == 200
    assert [seen.query.get("page_size") for seen in upstream.calls("list")] == ["1000", "1000"]


METHODS_405 = [
    ("GET", "/v2/batches/batch-1:cancel", "POST"),
    ("DELETE", "/v2/batches/batch-1:cancel", "POST"),
    ("PUT", "/v2/batches/batch-1:cancel", "POST"),
    ("DELETE", "/v2/batches/batch-1", "GET, HEAD"),
    ("PUT", "/v1/datasets/ds-1", "DELETE, GET, HEAD"),
    ("POST", "/v1/datasets/ds-1", "DELETE, GET, HEAD"),
    ("DELETE", "/v1/datasets/usage", "GET, HEAD"),
]


@pytest.mark.parametrize(("method", "path", "allowed"), METHODS_405)
async def test_a_405_lists_exactly_the_methods_of_the_resource_it_names(
    upstream: Upstream, start: GatewayFactory, method: str, path: str, allowed: str
) -> None:
    gateway = await start(dataset_config(upstream.url))

    answer = await http(f"{gateway.url}{path}", method=method)

    assert_error(answer, 405, "method_not_allowed")
    assert answer.header("Allow") == allowed
    assert upstream.requests == []
