"""Download URLs under attack (docs/design.md §11): tampered, expired, another caller's, a caller's rights gone,
path tricks, and upstream part URLs that point elsewhere or redirect.

Each refusal is the contract's JSON error, and none costs an upstream call
or a storage request unless the URL itself holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web

from gateway.records.base import dataset_key
from tests.support import BILLING_KEY, Answer, http, make_config, raw_request, registry_value, request_bytes
from tests.test_downloads import (
    DATASET_ID,
    PART_ID,
    READ_ALL,
    GatewayFactory,
    Storage,
    avro_bytes,
    dataset_calls,
    dataset_object,
    download_config,
    serve_datasets,
    signed,
    storage,
)
from tests.upstream import Upstream, assert_error

# The storage host fixture, shared with tests/test_downloads.py.
__all__ = ["storage"]


def query_of(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def with_query(url: str, **changes: str) -> str:
    query = {**query_of(url), **changes}
    return url.split("?")[0] + "?" + "&".join(f"{k}={v}" for k, v in query.items())


async def get(url: str) -> Answer:
    """A download URL fetched as ``save_dataset`` does: no caller key."""
    return await http(url, key=None)


def nothing_fetched(upstream: Upstream, storage: Storage) -> None:
    assert dataset_calls(upstream) == 0
    assert storage.requests == []


# ---------------------------------------------------------------------------
# The URL itself
# ---------------------------------------------------------------------------


async def test_a_tampered_url_is_refused_whatever_was_changed_and_nothing_is_fetched(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    storage.files["dataset-other.avro"] = avro_bytes([])
    gateway = await start(download_config(upstream, storage))
    url = signed(gateway, storage, caller="reporting")
    signature = query_of(url)["signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    tampered = [
        with_query(url, caller="billing-service"),  # another caller's name on reporting's URL
        with_query(url, expires=str(int(query_of(url)["expires"]) + 3600)),
        with_query(url, signature=flipped),
        with_query(url, signature=signature.upper()),
        url.replace(DATASET_ID, "dataset-other"),
        url.replace(f"/parts/{PART_ID}", "/parts/part-1"),
        url.split("?")[0],  # no query at all
        url + "&caller=reporting",  # a field twice
        url + "&extra=1",
        url.replace("signature=", "sig="),
    ]

    answers = [await get(bad) for bad in tampered]

    for bad, answer in zip(tampered, answers, strict=True):
        assert answer.status == 403, bad
        assert_error(answer, 403, "download_url_invalid")
    nothing_fetched(upstream, storage)
    assert registry_value(gateway, "gateway_downloads_total", caller="-", outcome="download_url_invalid") == len(
        tampered
    )
    assert (await get(url)).status == 200  # the URL as given still works


async def test_an_expired_url_is_refused_as_expired_and_a_fresh_one_works(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage, datasets={"url_ttl_s": 1}))
    url = signed(gateway, storage)
    expires = int(query_of(url)["expires"])
    assert expires <= time.time() + 2
    # Wall-clock expiry (epoch seconds, as every replica reads it): no event to await, so wait it out.
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)

    answer = await get(url)

    assert_error(answer, 403, "download_url_expired")
    nothing_fetched(upstream, storage)
    assert (await get(signed(gateway, storage))).status == 200


async def test_a_url_of_a_caller_removed_by_a_reload_is_refused(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    url = signed(gateway, storage, caller="reporting")
    assert (await get(url)).status == 200
    storage.requests.clear()
    before = dataset_calls(upstream)

    gateway.state.apply(
        make_config(
            upstream.url,
            callers=[{"name": "billing-service", "key": BILLING_KEY, "allow": READ_ALL}],
            datasets={"part_origins": [storage.url]},
        )
    )
    answer = await get(url)

    assert_error(answer, 403, "download_url_invalid")
    assert dataset_calls(upstream) == before
    assert storage.requests == []


async def test_a_url_of_a_caller_whose_allow_lost_read_dataset_is_refused(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    url = signed(gateway, storage)

    gateway.state.apply(
        download_config(upstream, storage, callers=[{"name": "billing-service", "key": BILLING_KEY, "allow": ["list"]}])
    )
    answer = await get(url)

    assert_error(answer, 403, "download_url_invalid")
    nothing_fetched(upstream, storage)


async def test_an_own_callers_url_works_only_for_a_dataset_of_its_own(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    storage.files["dataset-mine.avro"] = avro_bytes([])
    own = [{"name": "billing-service", "key": BILLING_KEY, "allow": READ_ALL, "batches": "own"}]
    gateway = await start(download_config(upstream, storage, callers=own))
    await gateway.state.records.record_owner(dataset_key("dataset-mine"), "billing-service")
    await gateway.state.records.record_owner(dataset_key(DATASET_ID), "reporting")

    theirs = await get(signed(gateway, storage, dataset_id=DATASET_ID))
    unknown = await get(signed(gateway, storage, dataset_id="dataset-mine").replace("dataset-mine", "dataset-x"))

    assert_error(theirs, 403, "download_url_invalid")
    assert_error(unknown, 403, "download_url_invalid")
    nothing_fetched(upstream, storage)
    mine = await get(signed(gateway, storage, dataset_id="dataset-mine"))
    assert mine.status == 200


@pytest.mark.parametrize(
    "target",
    [
        "/v1/datasets/dataset%2Fout/parts/part-0",  # an encoded slash in the id
        "/v1/datasets/dataset-out-1/parts/part%2F0",  # and in the part id
        "/v1/datasets/%2E%2E/parts/part-0",  # an encoded ..
        "/v1/datasets/dataset-out-1/parts/%2E%2E",
        "/v1/datasets/" + "a" * 129 + "/parts/part-0",  # over-long
        "/v1/datasets/dataset-out-1/parts/" + "p" * 129,
        "/v1/datasets/dataset-out-1/parts/part-0%00",
        "/v1/datasets/_x/parts/part-0",
    ],
)
async def test_path_tricks_in_ids_are_400_before_anything_is_checked_or_fetched(
    start: GatewayFactory, upstream: Upstream, storage: Storage, target: str
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    query = "?" + signed(gateway, storage).split("?")[1]

    answer = await raw_request(gateway.url, request_bytes(target + query, key=None))

    assert_error(answer, 400, "invalid_request")
    nothing_fetched(upstream, storage)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/datasets/../parts/part-0",
        "/v1/datasets/dataset-out-1/parts/part-0/../../../../v2/batches/x",
        "/v1/datasets/dataset-out-1/parts/part-0/original/more",
        "/v1/datasets/dataset-out-1/parts//original",
    ],
)
async def test_dot_segments_and_extra_segments_never_reach_the_download_route(
    start: GatewayFactory, upstream: Upstream, storage: Storage, target: str
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    query = "?" + signed(gateway, storage).split("?")[1]

    answer = await raw_request(gateway.url, request_bytes(target + query, key=None))

    assert answer.status in (400, 401, 404)
    assert_error(answer, answer.status)
    assert dataset_calls(upstream) == 0
    assert storage.requests == []


# ---------------------------------------------------------------------------
# Where the upstream says the part is
# ---------------------------------------------------------------------------


@pytest.fixture
async def elsewhere() -> AsyncIterator[Storage]:
    """A second storage host, on an origin no config allows."""
    other = await Storage().start()
    other.files[f"{DATASET_ID}.avro"] = avro_bytes([])
    yield other
    await other.stop()


async def test_a_part_url_on_an_origin_not_in_part_origins_is_a_502_and_never_fetched(
    start: GatewayFactory, upstream: Upstream, storage: Storage, elsewhere: Storage
) -> None:
    serve_datasets(upstream, storage, part_origin=elsewhere.url)
    gateway = await start(download_config(upstream, storage))

    answer = await get(signed(gateway, storage))

    assert_error(answer, 502, "upstream_invalid_response")
    assert elsewhere.requests == []
    assert storage.requests == []


async def test_the_same_host_on_another_scheme_or_port_is_another_origin(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage, part_origin=storage.url.replace("http://", "https://"))
    https_part = await start(download_config(upstream, storage))
    port = int(storage.url.rsplit(":", 1)[1])
    another_port = f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}"
    port_allowed = await start(download_config(upstream, storage, datasets={"part_origins": [another_port]}))

    assert_error(await get(signed(https_part, storage)), 502, "upstream_invalid_response")
    serve_datasets(upstream, storage)
    assert_error(await get(signed(port_allowed, storage)), 502, "upstream_invalid_response")
    assert storage.requests == []


async def test_a_storage_answer_that_redirects_is_not_followed(
    start: GatewayFactory, upstream: Upstream, storage: Storage, elsewhere: Storage
) -> None:
    serve_datasets(upstream, storage)
    storage.redirect_to = elsewhere.url_of(f"{DATASET_ID}.avro")
    gateway = await start(download_config(upstream, storage, datasets={"part_origins": [storage.url, elsewhere.url]}))

    answer = await get(signed(gateway, storage))

    assert_error(answer, 502, "upstream_error")
    assert len(storage.requests) == 1
    assert elsewhere.requests == []


async def test_a_dataset_the_upstream_does_not_know_is_404_and_a_part_it_does_not_list_too(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    async def gone(request: web.Request) -> web.Response:
        if request.path == f"/v1/datasets/{DATASET_ID}":
            return web.json_response({"dataset": {**dataset_object(storage), "dataset_parts": []}})
        return web.json_response({"message": "dataset not found"}, status=404)

    upstream.script(gone)
    storage.files["dataset-gone.avro"] = avro_bytes([])
    gateway = await start(download_config(upstream, storage))

    missing = await get(signed(gateway, storage, dataset_id="dataset-gone"))
    no_part = await get(signed(gateway, storage))

    assert_error(missing, 404, "not_found")
    assert_error(no_part, 404, "not_found")
    assert storage.requests == []
