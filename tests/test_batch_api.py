"""The whole batch API, per caller (docs/design.md §8), as services and the upstream see it.

Create, list, retrieve and cancel through the real gateway, in front of the
fake Cohere batch API of ``tests/upstream.py``, with the cohere SDK as
the client wherever it can say what the test needs (aiohttp or a raw socket
elsewhere). Each test asserts what the caller gets and what the upstream
saw: usually, for a refused request, nothing at all.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from cohere.batches import Batch
from cohere.errors import BadRequestError, ForbiddenError, NotFoundError

from gateway.edge.server import RunningGateway
from tests.conftest import GatewayFactory
from tests.redis_server import RedisServer
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    Answer,
    FakeClock,
    assert_no_secrets,
    http,
    make_config,
    raw_request,
    read_answer,
    request_bytes,
    sdk,
)
from tests.upstream import (
    ACTIVE,
    ALL_OPERATIONS,
    CANCELING,
    Upstream,
    assert_error,
    caller,
    create_body,
    post_json,
    write_callers,
)

BOUND_S = 30


def batch(name: str = "nightly", input_dataset_id: str = "dataset-1", model: str = "command-r") -> Batch:
    return Batch(name=name, input_dataset_id=input_dataset_id, model=model)


async def writer_gateway(
    start: GatewayFactory, fake: Upstream, billing: str = "all", reporting: str = "all", **sections: Any
) -> RunningGateway:
    """A gateway in front of ``fake`` whose two callers may use every operation, with the given scopes."""
    return await start(make_config(fake.url, callers=write_callers(billing, reporting), **sections))


async def create(gateway: RunningGateway, key: str = BILLING_KEY, name: str = "nightly") -> str:
    """Create a batch through the gateway with the SDK; its id."""
    created = await asyncio.wait_for(sdk(gateway.url, key).batches.create(request=batch(name)), BOUND_S)
    assert created.batch.id is not None
    return created.batch.id


async def retrieve(gateway: RunningGateway, batch_id: str, key: str = BILLING_KEY) -> Answer:
    return await http(f"{gateway.url}/v2/batches/{batch_id}", key=key)


async def cancel(gateway: RunningGateway, batch_id: str, key: str = BILLING_KEY, body: bytes | None = None) -> Answer:
    headers = {"Content-Type": "application/json"} if body else None
    return await http(f"{gateway.url}/v2/batches/{batch_id}:cancel", method="POST", key=key, data=body, headers=headers)


async def send(
    operation: str, gateway: RunningGateway, batch_id: str = "seeded-1", *, key: str = BILLING_KEY, **kwargs: Any
) -> Answer:
    """One request for ``operation`` with aiohttp (``kwargs`` go to ``http``)."""
    if operation == "create":
        return await http(
            f"{gateway.url}/v2/batches",
            method="POST",
            key=key,
            data=create_body(),
            headers={"Content-Type": "application/json", **kwargs.pop("headers", {})},
            **kwargs,
        )
    if operation == "list":
        return await http(f"{gateway.url}/v2/batches", key=key, **kwargs)
    if operation == "retrieve":
        return await http(f"{gateway.url}/v2/batches/{batch_id}", key=key, **kwargs)
    return await http(f"{gateway.url}/v2/batches/{batch_id}:cancel", method="POST", key=key, **kwargs)


def raw_post(target: str, body: bytes, content_type: str | None = "application/json", **kwargs: Any) -> bytes:
    headers: list[tuple[str | bytes, str | bytes] | bytes] = [("Content-Length", str(len(body)))]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    return request_bytes(target, headers, method="POST", body=body, **kwargs)


# --- create ---------------------------------------------------------------------------


async def test_the_sdk_creates_a_batch_and_gets_the_upstreams_answer_byte_for_byte(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    raw = await asyncio.wait_for(sdk(gateway.url).batches.with_raw_response.create(request=batch("nightly")), BOUND_S)
    [seen] = upstream.calls("create")
    assert raw.response.content == seen.answer_body
    assert (raw.data.batch.name, raw.data.batch.input_dataset_id, raw.data.batch.model) == (
        "nightly",
        "dataset-1",
        "command-r",
    )
    assert raw.data.batch.id in upstream.batches
    assert raw.response.headers["Content-Type"].split(";")[0] == "application/json"
    assert raw.response.headers.get("X-Request-ID")
    assert "Idempotent-Replayed" not in raw.response.headers
    assert json.loads(seen.body) == {"name": "nightly", "input_dataset_id": "dataset-1", "model": "command-r"}


ODD_CREATE_BODY = (
    b'  {"model" :"command-r",\n"name":"caf\\u00e9 \xe2\x98\x95" , "input_dataset_id": "dataset-1",'
    b' "extra": [null, {}, 1.50e1], "metadata": {"team": "billing"}}\n'
)


async def test_a_create_body_is_forwarded_to_the_upstream_byte_for_byte(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    answer = await post_json(f"{gateway.url}/v2/batches", ODD_CREATE_BODY)
    assert answer.status == 200, answer.body[:300]
    [seen] = upstream.calls("create")
    assert seen.body == ODD_CREATE_BODY
    assert answer.json["batch"]["name"] == "caf\u00e9 \u2615"


async def test_a_created_batch_is_a_cache_hit_on_its_first_retrieve(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await writer_gateway(start, upstream)
    created = await post_json(f"{gateway.url}/v2/batches", create_body())
    batch_id = created.json["batch"]["id"]
    raw = await asyncio.wait_for(sdk(gateway.url).batches.with_raw_response.retrieve(batch_id), BOUND_S)
    assert raw.response.headers["X-Cache"] == "HIT"
    assert raw.response.content == created.body
    assert raw.data.batch.id == batch_id
    assert upstream.count("retrieve") == 0


@pytest.mark.parametrize("operation", ["create", "cancel"])
async def test_by_default_a_caller_may_not_create_or_cancel_and_nothing_reaches_the_upstream(
    operation: str, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await start(make_config(upstream.url))  # callers with the default allow: [retrieve, list]
    for key in (BILLING_KEY, REPORTING_KEY):
        assert_error(await send(operation, gateway, key=key), 403, "operation_not_allowed")
    assert upstream.count() == 0


INVALID_CREATE_FIELDS = [
    # (body, the fields the message must name)
    ({}, ["name", "input_dataset_id", "model"]),
    ({"input_dataset_id": "d", "model": "m"}, ["name"]),
    ({"name": "", "input_dataset_id": "d", "model": "m"}, ["name"]),
    ({"name": 5, "input_dataset_id": "d", "model": "m"}, ["name"]),
    ({"name": None, "input_dataset_id": "d", "model": "m"}, ["name"]),
    ({"name": "n", "input_dataset_id": [], "model": "m"}, ["input_dataset_id"]),
    ({"name": "n", "input_dataset_id": "d", "model": {}}, ["model"]),
    ({"name": "n", "input_dataset_id": "d"}, ["model"]),
    ({"name": True, "input_dataset_id": "d", "model": ""}, ["name", "model"]),
    ({"name": ["n"], "input_dataset_id": 1.5, "model": "m"}, ["name", "input_dataset_id"]),
]


@pytest.mark.parametrize(("document", "bad_fields"), INVALID_CREATE_FIELDS)
async def test_a_create_body_without_each_required_string_is_refused_naming_each_bad_field(
    document: dict[str, Any], bad_fields: list[str], upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    answer = await post_json(f"{gateway.url}/v2/batches", json.dumps(document).encode())
    assert_error(answer, 400, "invalid_request")
    for name in bad_fields:
        assert name in answer.document["message"], (name, answer.document["message"])
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "body",
    [b"[]", b'["name", "input_dataset_id", "model"]', b'"nightly"', b"null", b"42", b"true", b"not json", b"", b"{"],
)
async def test_a_create_body_that_is_not_a_json_object_is_refused(
    body: bytes, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    assert_error(await raw_request(gateway.url, raw_post("/v2/batches", body)), 400, "invalid_request")
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml"],
)
async def test_a_create_not_declared_as_json_is_refused(
    content_type: str | None, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    answer = await raw_request(gateway.url, raw_post("/v2/batches", create_body(), content_type))
    assert_error(answer, 400, "invalid_request")
    assert upstream.count() == 0


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
async def test_a_create_declared_as_json_with_or_without_parameters_is_accepted(
    content_type: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    answer = await raw_request(gateway.url, raw_post("/v2/batches", create_body(), content_type))
    assert answer.status == 200, answer.body[:300]
    assert upstream.count("create") == 1


def padded_create_body(size: int) -> bytes:
    """A valid create body of exactly ``size`` bytes (padded in a field the upstream ignores)."""
    empty = create_body(note="")
    body = create_body(note="x" * (size - len(empty)))
    assert len(body) == size
    return body


async def test_a_create_body_of_exactly_max_body_bytes_is_accepted_and_one_byte_more_is_413(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)  # server.max_body_bytes: the default, 65536
    at_limit = await raw_request(gateway.url, raw_post("/v2/batches", padded_create_body(65536)))
    assert at_limit.status == 200, at_limit.body[:300]
    over = await raw_request(gateway.url, raw_post("/v2/batches", padded_create_body(65537)))
    assert_error(over, 413, "request_too_large")
    assert upstream.count("create") == 1


def chunked(body: bytes, pieces: int) -> bytes:
    size = -(-len(body) // pieces)
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


async def test_a_chunked_create_body_within_the_limit_is_accepted_and_forwarded_whole(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    body = padded_create_body(3000)
    head = [("Transfer-Encoding", "chunked"), ("Content-Type", "application/json")]
    answer = await raw_request(gateway.url, request_bytes("/v2/batches", head, method="POST", body=chunked(body, 3)))
    assert answer.status == 200, answer.body[:300]
    [seen] = upstream.calls("create")
    assert seen.body == body


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("503", 503, "upstream_unavailable"),
        ("502", 502, "upstream_error"),
        ("504", 502, "upstream_error"),
        ("drop", 502, None),
        ("hang", 504, "upstream_timeout"),
    ],
)
async def test_a_create_that_may_have_reached_the_upstream_is_never_retried(
    fault: str, status: int, code: str | None, upstream: Upstream, start: GatewayFactory
) -> None:
    if fault == "drop":
        upstream.drop("create")
    elif fault == "hang":
        upstream.hang("create")
    else:
        upstream.fail("create", int(fault))
    gateway = await writer_gateway(start, upstream, upstream={"retries": 2, "timeout_s": 1})
    answer = await post_json(f"{gateway.url}/v2/batches", create_body())
    assert_error(answer, status, code)
    assert upstream.count("create") == 1


async def test_an_upstream_400_on_create_is_a_bad_request_with_the_upstreams_message(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.fail("create", 400, body={"message": "model command-zzz does not exist"})
    gateway = await writer_gateway(start, upstream)
    answer = await post_json(f"{gateway.url}/v2/batches", create_body(model="command-zzz"))
    assert_error(answer, 400, "bad_request")
    assert "model command-zzz does not exist" in answer.document["message"]
    assert upstream.count("create") == 1


async def test_the_sdk_raises_its_own_error_classes_with_the_gateways_message_for_refused_writes(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    callers = [caller("billing-service", BILLING_KEY), caller("reporting", REPORTING_KEY, ALL_OPERATIONS, "own")]
    gateway = await start(make_config(upstream.url, callers=callers))
    with pytest.raises(ForbiddenError) as forbidden:
        await asyncio.wait_for(sdk(gateway.url, BILLING_KEY).batches.create(request=batch()), BOUND_S)
    with pytest.raises(NotFoundError) as hidden:
        await asyncio.wait_for(sdk(gateway.url, REPORTING_KEY).batches.cancel("seeded-1"), BOUND_S)
    with pytest.raises(BadRequestError) as invalid:
        await asyncio.wait_for(sdk(gateway.url, REPORTING_KEY).batches.create(request=batch(name="")), BOUND_S)
    assert forbidden.value.body["code"] == "operation_not_allowed"
    assert hidden.value.body["code"] == "not_found"
    assert invalid.value.body["code"] == "invalid_request"
    assert "name" in invalid.value.body["message"]
    assert upstream.count() == 0


# --- what the upstream sees, for every operation ----------------------------------------

CALLER_EXTRAS = {
    "X-Client-Name": "impostor",
    "Cookie": "session=caller-cookie",
    "X-Api-Key": "another-credential",
    "X-Request-ID": "trace-write-42",
}


@pytest.mark.parametrize("operation", ALL_OPERATIONS)
async def test_every_operation_reaches_the_upstream_with_the_shared_token_and_the_callers_name_only(
    operation: str, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await writer_gateway(start, upstream)
    answer = await send(operation, gateway, key=REPORTING_KEY, headers=CALLER_EXTRAS)
    assert answer.status == 200, answer.body[:300]
    assert answer.header("X-Request-ID") == "trace-write-42"
    [seen] = upstream.calls()
    assert seen.endpoint == operation
    assert seen.headers.getall("Authorization") == [f"Bearer {UPSTREAM_TOKEN}"]
    assert seen.headers.getall("X-Client-Name") == ["reporting"]
    assert seen.headers.getall("X-Request-ID") == ["trace-write-42"]
    for name in ("Cookie", "X-Api-Key"):
        assert name not in seen.headers
    assert REPORTING_KEY not in str(dict(seen.headers))
    assert answer.body == seen.answer_body
    assert_no_secrets(answer.body)


# --- list -------------------------------------------------------------------------------


async def test_the_sdk_lists_batches_page_by_page_as_the_upstream_answers(
    upstream: Upstream, start: GatewayFactory
) -> None:
    for n in range(3):
        upstream.seed(f"seeded-{n}", age_s=100 - n)
    gateway = await start(make_config(upstream.url))  # list is allowed by default
    client = sdk(gateway.url, REPORTING_KEY)
    first = await asyncio.wait_for(client.batches.with_raw_response.list(page_size=2, order_by="created_at"), BOUND_S)
    assert [b.id for b in first.data.batches or []] == ["seeded-2", "seeded-1"]
    assert first.data.next_page_token == "page.2"
    second = await asyncio.wait_for(
        client.batches.with_raw_response.list(page_size=2, page_token="page.2", order_by="created_at"), BOUND_S
    )
    assert [b.id for b in second.data.batches or []] == ["seeded-0"]
    assert second.data.next_page_token is None

    seen = upstream.calls("list")
    assert [first.response.content, second.response.content] == [s.answer_body for s in seen]
    assert dict(seen[0].query) == {"page_size": "2", "order_by": "created_at"}
    assert dict(seen[1].query) == {"page_size": "2", "page_token": "page.2", "order_by": "created_at"}
    assert first.response.headers["Content-Type"].split(";")[0] == "application/json"
    assert first.response.headers.get("X-Request-ID")


async def test_a_list_without_parameters_forwards_none_and_is_never_cached(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await start(make_config(upstream.url))
    client = sdk(gateway.url)
    before = await asyncio.wait_for(client.batches.list(), BOUND_S)
    upstream.seed("seeded-2")
    after = await asyncio.wait_for(client.batches.list(), BOUND_S)
    assert [len(before.batches or []), len(after.batches or [])] == [1, 2]
    assert [s.query_string for s in upstream.calls("list")] == ["", ""]


INVALID_LIST_QUERIES = [
    "foo=1",
    "page_size=10&api_key=x",
    "PAGE_SIZE=10",
    "page_size=1&page_size=2",
    "page_size=0",
    "page_size=-1",
    "page_size=abc",
    "page_size=1.5",
    "page_size=",
    "page_size",
    "page_token=",
    "page_token=" + "a" * 1025,
    "page_token=a%2Fb",
    "page_token=a%20b",
    "page_token=a+b",
    "page_token=%C3%A9",
    "page_token=a%00",
    "page_token=a&page_token=b",
    "order_by=name",
    "order_by=",
    "order_by=CREATED_AT",
    "order_by=created_at&order_by=updated_at",
    "order_by=created_at%00",
]


@pytest.mark.parametrize("query", INVALID_LIST_QUERIES)
async def test_a_list_query_with_anything_but_the_three_known_valid_parameters_is_refused(
    query: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    answer = await raw_request(gateway.url, request_bytes(f"/v2/batches?{query}"))
    assert_error(answer, 400, "invalid_request")
    assert upstream.count() == 0


VALID_LIST_QUERIES = [
    ("page_size=1", {"page_size": "1"}),
    ("page_size=1000", {"page_size": "1000"}),
    ("order_by=updated_at", {"order_by": "updated_at"}),
    ("page_token=Az09._~=-", {"page_token": "Az09._~=-"}),
    ("page_token=abc%3D%3D", {"page_token": "abc=="}),
    ("page_token=" + "t" * 1024, {"page_token": "t" * 1024}),
    (
        "order_by=created_at&page_token=page.3&page_size=50",
        {"order_by": "created_at", "page_token": "page.3", "page_size": "50"},
    ),
]


@pytest.mark.parametrize(("query", "forwarded"), VALID_LIST_QUERIES)
async def test_a_valid_list_query_is_forwarded_with_exactly_its_parameters(
    query: str, forwarded: dict[str, str], upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    answer = await raw_request(gateway.url, request_bytes(f"/v2/batches?{query}"))
    assert answer.status == 200, answer.body[:300]
    [seen] = upstream.calls("list")
    assert sorted(seen.query.items()) == sorted(forwarded.items())
    assert answer.body == seen.answer_body


async def test_an_own_caller_lists_only_its_own_batches_with_the_page_token_kept(
    upstream: Upstream, start: GatewayFactory
) -> None:
    for n in range(4):
        upstream.seed(f"foreign-{n}", age_s=100 - n)  # older than anything created below
    gateway = await writer_gateway(start, upstream, billing="own")
    mine = await create(gateway, BILLING_KEY)
    own = sdk(gateway.url, BILLING_KEY)

    first = await asyncio.wait_for(own.batches.list(page_size=2, order_by="created_at"), BOUND_S)
    second = await asyncio.wait_for(own.batches.list(page_size=2, page_token="page.2", order_by="created_at"), BOUND_S)
    everything = await asyncio.wait_for(
        sdk(gateway.url, REPORTING_KEY).batches.list(page_size=2, order_by="created_at"), BOUND_S
    )

    assert ([b.id for b in first.batches or []], first.next_page_token) == ([mine], "page.2")
    assert (second.batches or [], second.next_page_token) == ([], "page.4")
    assert [b.id for b in everything.batches or []] == [mine, "foreign-3"]
    assert upstream.count("list") == 3


@pytest.mark.parametrize("operation", ["retrieve", "list"])
async def test_a_caller_without_an_operation_in_allow_is_refused_it(
    operation: str, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    others = [op for op in ALL_OPERATIONS if op != operation]
    config = make_config(upstream.url, callers=[caller("billing-service", BILLING_KEY, others)])
    gateway = await start(config)
    assert_error(await send(operation, gateway), 403, "operation_not_allowed")
    assert upstream.count() == 0


# --- retrieve, scoped --------------------------------------------------------------------


async def test_an_own_caller_retrieves_only_the_batches_it_created(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.seed("seeded-1")
    gateway = await writer_gateway(start, upstream, billing="own", reporting="own")
    mine = await create(gateway, BILLING_KEY, "mine")
    theirs = await create(gateway, REPORTING_KEY, "theirs")  # cached as well

    own = await retrieve(gateway, mine)
    assert (own.status, own.header("X-Cache"), own.json["batch"]["id"]) == (200, "HIT", mine)
    for other in (theirs, "seeded-1", "never-existed"):
        assert_error(await retrieve(gateway, other), 404, "not_found")
    assert upstream.count("retrieve") == 0


async def test_an_own_caller_gets_404_for_a_batch_another_caller_has_just_retrieved(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await writer_gateway(start, upstream, billing="own", reporting="all")
    warm = await retrieve(gateway, "seeded-1", REPORTING_KEY)
    assert (warm.status, warm.header("X-Cache")) == (200, "MISS")
    assert_error(await retrieve(gateway, "seeded-1", BILLING_KEY), 404, "not_found")
    assert upstream.count("retrieve") == 1


async def test_an_all_caller_retrieves_a_batch_an_own_caller_created(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await writer_gateway(start, upstream, billing="own", reporting="all")
    mine = await create(gateway, BILLING_KEY)
    answer = await retrieve(gateway, mine, REPORTING_KEY)
    assert (answer.status, answer.json["batch"]["id"]) == (200, mine)


async def test_an_own_callers_batch_is_fetched_again_from_the_upstream_once_its_entry_expires(
    upstream: Upstream, start: GatewayFactory
) -> None:
    clock = FakeClock()
    config = make_config(upstream.url, callers=write_callers("own"), cache={"active_jitter": 0})
    gateway = await start(config, clock=clock)
    mine = await create(gateway, BILLING_KEY)
    upstream.set_status(mine, ACTIVE)
    clock.advance(60)  # past ttl_s.active (5 s)
    answer = await retrieve(gateway, mine)
    assert (answer.status, answer.header("X-Cache"), answer.json["batch"]["status"]) == (200, "MISS", ACTIVE)
    assert upstream.count("retrieve") == 1


# --- cancel ------------------------------------------------------------------------------


async def test_the_sdk_cancels_a_batch_and_the_next_retrieve_shows_the_cancellation(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1", status=ACTIVE)
    gateway = await writer_gateway(start, upstream)
    assert [(await retrieve(gateway, "seeded-1")).header("X-Cache") for _ in range(2)] == ["MISS", "HIT"]

    raw = await asyncio.wait_for(sdk(gateway.url).batches.with_raw_response.cancel("seeded-1"), BOUND_S)
    [seen] = upstream.calls("cancel")
    assert raw.data == {}
    assert raw.response.content == seen.answer_body
    assert (seen.method, seen.path, seen.query_string, seen.body) == ("POST", "/v2/batches/seeded-1:cancel", "", b"")
    assert raw.response.headers.get("X-Request-ID")

    after = await retrieve(gateway, "seeded-1")
    assert (after.header("X-Cache"), after.json["batch"]["status"]) == ("MISS", CANCELING)
    assert upstream.count("retrieve") == 2


@pytest.mark.parametrize("body", [b"", b"{}"])
async def test_a_cancel_body_may_be_empty_or_an_empty_object_and_none_is_forwarded(
    body: bytes, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await writer_gateway(start, upstream)
    answer = await raw_request(gateway.url, raw_post("/v2/batches/seeded-1:cancel", body))
    assert answer.status == 200, answer.body[:300]
    [seen] = upstream.calls("cancel")
    assert seen.body == b""


@pytest.mark.parametrize("body", [b'{"reason": "too slow"}', b"[]", b"null", b'""', b"not json", b"{"])
async def test_a_cancel_body_other_than_an_empty_object_is_refused(
    body: bytes, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await writer_gateway(start, upstream)
    assert_error(await cancel(gateway, "seeded-1", body=body), 400, "invalid_request")
    assert upstream.count() == 0


@pytest.mark.parametrize("batch_id", ["-starts-with-a-dash", "_underscore", "a.b", "a" * 129, "caf%C3%A9"])
async def test_a_cancel_of_a_malformed_id_is_refused(batch_id: str, upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await writer_gateway(start, upstream)
    answer = await raw_request(gateway.url, raw_post(f"/v2/batches/{batch_id}:cancel", b""))
    assert_error(answer, 400, "invalid_batch_id")
    assert upstream.count() == 0


async def test_an_own_caller_cannot_cancel_a_batch_it_did_not_create_even_a_cached_one(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await writer_gateway(start, upstream, billing="own", reporting="own")
    mine = await create(gateway, BILLING_KEY, "mine")
    theirs = await create(gateway, REPORTING_KEY, "theirs")  # cached
    for other in (theirs, "seeded-1", "never-existed"):
        assert_error(await cancel(gateway, other), 404, "not_found")
    assert upstream.count("cancel") == 0
    assert (await cancel(gateway, mine)).status == 200
    assert [s.path for s in upstream.calls("cancel")] == [f"/v2/batches/{mine}:cancel"]


async def test_an_upstream_404_on_cancel_is_not_found(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await writer_gateway(start, upstream)
    assert_error(await cancel(gateway, "never-existed"), 404, "not_found")
    assert upstream.count("cancel") == 1


async def test_a_refresh_in_flight_when_a_cancel_succeeds_does_not_bring_back_the_old_state(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1", status=ACTIVE)
    gateway = await writer_gateway(start, upstream)
    release = upstream.hold("retrieve")  # answered with the state at arrival: IN_PROGRESS
    refresh = asyncio.create_task(retrieve(gateway, "seeded-1"))
    await upstream.arrival("retrieve")

    cancelled = await asyncio.wait_for(cancel(gateway, "seeded-1"), BOUND_S)
    assert cancelled.status == 200, cancelled.body[:300]
    release.set()
    assert (await asyncio.wait_for(refresh, BOUND_S)).status == 200

    after = await retrieve(gateway, "seeded-1")
    assert (after.status, after.json["batch"]["status"]) == (200, CANCELING)
    assert upstream.count("retrieve") == 2


# --- the order of the checks -------------------------------------------------------------


@pytest.mark.parametrize("operation", ALL_OPERATIONS)
async def test_an_unknown_key_is_refused_before_permission_validation_or_scope(
    operation: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))  # default allow: no create, no cancel
    answer = await send(operation, gateway, "-malformed-id", key="not-a-known-key-at-all-0")
    assert_error(answer, 401, "unauthorized")
    assert upstream.count() == 0


async def test_a_caller_past_its_own_rate_limit_is_refused_before_its_permissions_are_looked_at(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    limited = caller("reporting", REPORTING_KEY, ["retrieve"], rate_limit={"requests_per_s": 0.001, "burst": 1})
    gateway = await start(make_config(upstream.url, callers=[limited]))
    assert (await retrieve(gateway, "seeded-1", REPORTING_KEY)).status == 200
    answer = await send("create", gateway, key=REPORTING_KEY)
    assert_error(answer, 429, "caller_rate_limited")
    assert answer.retry_after is not None
    assert upstream.count() == 1


async def test_permission_is_checked_before_the_request_is_validated(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await start(make_config(upstream.url, callers=[caller("billing-service", BILLING_KEY, ["retrieve"])]))
    refused = [
        await post_json(f"{gateway.url}/v2/batches", b'{"name": 5}'),
        await cancel(gateway, "-malformed-id", body=b'{"reason": 1}'),
        await raw_request(gateway.url, request_bytes("/v2/batches?page_size=0&foo=bar")),
    ]
    for answer in refused:
        assert_error(answer, 403, "operation_not_allowed")
    assert upstream.count() == 0


async def test_the_request_is_validated_before_an_own_callers_scope_is_checked(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await writer_gateway(start, upstream, billing="own")
    assert_error(await cancel(gateway, "seeded-1", body=b'{"reason": 1}'), 400, "invalid_request")
    assert_error(await retrieve(gateway, "-malformed-id"), 400, "invalid_batch_id")
    assert_error(await cancel(gateway, "-malformed-id"), 400, "invalid_batch_id")
    assert upstream.count() == 0


# --- the upstream budget and the 429 pause -----------------------------------------------


@pytest.mark.parametrize("operation", ["create", "cancel"])
async def test_a_write_waits_for_upstream_budget_while_a_retrieve_is_refused_at_once(
    operation: str, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    # One token, then one every 2 s (real time); retrieves may not wait, writes may, up to timeout_s.
    budget = {"rate_limit": {"requests_per_s": 0.5, "burst": 1}, "budget_wait_s": 0, "timeout_s": 10}
    gateway = await writer_gateway(start, upstream, upstream=budget)
    assert (await retrieve(gateway, "spends-the-token")).status == 404  # an upstream 404 spends it too
    refused = await retrieve(gateway, "another")
    assert_error(refused, 429, "rate_limited")
    assert refused.retry_after is not None

    written = await send(operation, gateway)
    assert written.status == 200, written.body[:300]
    assert [s.endpoint for s in upstream.calls()] == ["retrieve", operation]


@pytest.mark.parametrize("operation", ["create", "cancel"])
async def test_during_an_upstream_429_pause_a_write_is_refused_at_once_without_an_upstream_call(
    operation: str, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    upstream.fail("retrieve", 429, headers={"Retry-After": "30"})
    gateway = await writer_gateway(start, upstream)
    assert_error(await retrieve(gateway, "other"), 429, "upstream_rate_limited")
    answer = await send(operation, gateway)
    assert_error(answer, 429, "upstream_rate_limited")
    assert answer.retry_after is not None
    assert 1 <= int(answer.retry_after) <= 30
    assert upstream.count(operation) == 0


# --- the store across a restart ------------------------------------------------------------


async def test_ownership_survives_a_restart_on_the_same_store(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path
) -> None:
    store = {"path": str(tmp_path / "s.db")}
    config = make_config(upstream.url, callers=write_callers("own", "own"), store=store)
    first = await start(config)
    mine = await create(first, BILLING_KEY)
    await first.stop()

    second = await start(make_config(upstream.url, callers=write_callers("own", "own"), store=store))
    own = await retrieve(second, mine, BILLING_KEY)
    assert (own.status, own.json["batch"]["id"]) == (200, mine)
    assert_error(await retrieve(second, mine, REPORTING_KEY), 404, "not_found")
    assert_error(await cancel(second, mine, REPORTING_KEY), 404, "not_found")
    assert upstream.count("cancel") == 0


async def test_renaming_a_caller_hands_its_batches_to_no_one(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path
) -> None:
    store = {"path": str(tmp_path / "s.db")}
    first = await start(make_config(upstream.url, callers=write_callers("own", "own"), store=store))
    mine = await create(first, BILLING_KEY)
    await first.stop()

    renamed = [caller("billing-v2", BILLING_KEY, ALL_OPERATIONS, "own"), *write_callers("own", "own")[1:]]
    second = await start(make_config(upstream.url, callers=renamed, store=store))
    assert_error(await retrieve(second, mine, BILLING_KEY), 404, "not_found")
    assert upstream.count("retrieve") == 0


# --- every rule on both ways a hit is answered -------------------------------------------
#
# A plain fresh hit on a kept-alive connection may be answered below the
# Application (tests/test_inline_hits.py). Each case opens one connection,
# gets a plain hit answered on it, then sends the request a rule is about on
# the same connection: the rule must hold there too, with no upstream call.


async def on_one_connection(gateway: RunningGateway, *requests: bytes) -> list[Answer]:
    """Each request sent only once the one before it is answered, all on one kept-alive connection."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        answers = []
        for data in requests:
            writer.write(data)
            answers.append(await read_answer(reader))
        return answers
    finally:
        writer.close()


def kept_alive_get(batch_id: str, key: str) -> bytes:
    return request_bytes(f"/v2/batches/{batch_id}", key=key, close=False)


async def test_a_caller_without_retrieve_gets_403_for_a_cached_batch_after_a_hit_on_the_same_connection(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    callers = [caller("billing-service", BILLING_KEY), caller("reporting", REPORTING_KEY, ["list"])]
    gateway = await start(make_config(upstream.url, callers=callers))
    assert (await retrieve(gateway, "seeded-1")).status == 200

    hit, refused = await on_one_connection(
        gateway, kept_alive_get("seeded-1", BILLING_KEY), kept_alive_get("seeded-1", REPORTING_KEY)
    )
    assert (hit.status, hit.header("X-Cache")) == (200, "HIT")
    assert_error(refused, 403, "operation_not_allowed")
    assert upstream.count() == 1


@pytest.mark.parametrize("cached_by", ["created by another caller", "retrieved by an all-scoped caller"])
async def test_an_own_caller_gets_404_for_a_cached_batch_not_its_own_after_a_hit_on_the_same_connection(
    cached_by: str, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("seeded-1")
    gateway = await writer_gateway(start, upstream, billing="own", reporting="all")
    mine = await create(gateway, BILLING_KEY, "mine")
    if cached_by == "created by another caller":
        other = await create(gateway, REPORTING_KEY, "theirs")
    else:
        other = "seeded-1"
        assert (await retrieve(gateway, other, REPORTING_KEY)).status == 200
    calls = upstream.count()

    hit, refused = await on_one_connection(
        gateway, kept_alive_get(mine, BILLING_KEY), kept_alive_get(other, BILLING_KEY)
    )
    assert (hit.status, hit.header("X-Cache"), hit.json["batch"]["id"]) == (200, "HIT", mine)
    assert_error(refused, 404, "not_found")
    assert upstream.count() == calls


async def test_an_own_caller_gets_its_own_cached_batch_on_a_kept_alive_connection_after_another_callers_hit(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream, billing="own", reporting="own")
    mine = await create(gateway, BILLING_KEY, "mine")
    theirs = await create(gateway, REPORTING_KEY, "theirs")

    their_hit, my_hit, refused = await on_one_connection(
        gateway,
        kept_alive_get(theirs, REPORTING_KEY),
        kept_alive_get(mine, BILLING_KEY),
        kept_alive_get(mine, REPORTING_KEY),
    )
    assert (their_hit.status, their_hit.header("X-Cache")) == (200, "HIT")
    assert (my_hit.status, my_hit.header("X-Cache"), my_hit.json["batch"]["id"]) == (200, "HIT", mine)
    assert_error(refused, 404, "not_found")
    assert upstream.count("retrieve") == 0


async def test_with_redis_lost_an_own_callers_unknown_owner_fails_closed_after_an_inline_hit_on_the_same_connection(
    upstream: Upstream, start: GatewayFactory, redis_server: RedisServer
) -> None:
    """docs/design.md §10: the owner this process knows still answers inline; one only Redis knew is 503,
    never a guess."""
    # Without the event log, whose sightings would read (and so teach this process) the owner of what it sees.
    shared = {"redis": {"url": redis_server.url, "probe_interval_s": 30}, "events": {"enabled": False}}
    here = await writer_gateway(start, upstream, billing="own", reporting="all", **shared)
    there = await writer_gateway(start, upstream, billing="own", reporting="all", **shared)
    mine = await create(here, BILLING_KEY, "mine")
    also_mine = await create(there, BILLING_KEY, "made through another replica")
    # Cached here by an all-scoped caller, whose retrieve never asks who created it.
    assert (await retrieve(here, also_mine, REPORTING_KEY)).status == 200
    calls = upstream.count()
    redis_server.kill()

    hit, refused, again = await on_one_connection(
        here,
        kept_alive_get(mine, BILLING_KEY),
        kept_alive_get(also_mine, BILLING_KEY),
        kept_alive_get(mine, BILLING_KEY),
    )
    assert (hit.status, hit.header("X-Cache"), hit.json["batch"]["id"]) == (200, "HIT", mine)
    assert_error(refused, 503, "store_unavailable")
    assert (again.status, again.header("X-Cache")) == (200, "HIT")
    assert upstream.count() == calls
