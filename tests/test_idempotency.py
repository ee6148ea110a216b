"""Idempotency-Key on create (docs/design.md §8), as a service retrying a create sees it.

A keyed create that finished is replayed, not repeated; a key reused with
another body is refused; a key whose first request still runs is busy; a
failure that did not create anything leaves the key free; an ambiguous one
(the batch may exist) is looked up upstream before anything is created
again. Records are per caller and survive a restart.
"""

from __future__ import annotations

import asyncio
import json
import string
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from cohere.batches import Batch

from gateway.edge.server import RunningGateway
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    BUSY_S,
    REPORTING_KEY,
    Answer,
    FakeClock,
    LogCapture,
    http,
    make_config,
    raw_request,
    registry_value,
    request_bytes,
    sdk,
    store_locked,
    store_stalled,
)
from tests.upstream import Upstream, assert_error, create_body, post_json, write_callers

BOUND_S = 30
KEY = "create-nightly-2026-12-01"


# The store's failures are made at merge, where the store's interface is known.
def break_store_reads(gateway: RunningGateway) -> AbstractContextManager[None]:
    """While the block runs, every read and write of ``gateway``'s records fails (its store stalled)."""
    return store_stalled(gateway.state.records)


def break_store_writes(gateway: RunningGateway) -> AbstractContextManager[None]:
    """While the block runs, every write of ``gateway``'s records fails, retries included; reads still work."""
    gateway.state.records.busy_timeout_s = BUSY_S  # type: ignore[attr-defined]
    return store_locked(gateway.state.snapshot.config.store.path)


async def writer_gateway(
    start: GatewayFactory, fake: Upstream, billing: str = "all", **sections: Any
) -> RunningGateway:
    return await start(make_config(fake.url, callers=write_callers(billing), **sections))


async def keyed_create(
    gateway: RunningGateway, key: str = KEY, body: bytes | None = None, caller_key: str = BILLING_KEY
) -> Answer:
    return await post_json(
        f"{gateway.url}/v2/batches", body if body is not None else create_body(), key=caller_key, idempotency_key=key
    )


def billing_posts(upstream: Upstream) -> int:
    return sum(1 for seen in upstream.calls("create") if seen.headers.get("X-Client-Name") == "billing-service")


def without_request_id(answer: Answer) -> dict[str, Any]:
    document = dict(answer.document)
    document.pop("request_id", None)
    return document


# --- replays -----------------------------------------------------------------------------


async def test_the_same_key_and_body_after_the_first_finished_replays_its_answer_without_an_upstream_call(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    client = sdk(gateway.url)
    options: Any = {"additional_headers": {"Idempotency-Key": KEY}}
    request = Batch(name="nightly", input_dataset_id="dataset-1", model="command-r")

    first = await asyncio.wait_for(
        client.batches.with_raw_response.create(request=request, request_options=options), BOUND_S
    )
    again = await asyncio.wait_for(
        client.batches.with_raw_response.create(request=request, request_options=options), BOUND_S
    )

    assert "Idempotent-Replayed" not in first.response.headers
    assert again.response.headers["Idempotent-Replayed"] == "true"
    assert (again.response.status_code, again.response.content) == (200, first.response.content)
    assert again.data.batch.id == first.data.batch.id
    assert again.response.headers["Content-Type"].split(";")[0] == "application/json"
    assert again.response.headers.get("X-Request-ID")
    assert upstream.count("create") == 1
    assert len(upstream.batches) == 1


async def test_the_same_body_with_keys_reordered_and_other_spacing_is_the_same_request(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    first = await keyed_create(
        gateway, body=b'{"name": "nightly", "input_dataset_id": "dataset-1", "model": "command-r"}'
    )
    again = await keyed_create(
        gateway, body=b'\n{ "model":"command-r",\t"input_dataset_id" : "dataset-1",  "name":"nightly" }  '
    )
    assert first.status == 200, first.body[:300]
    assert (again.status, again.body, again.header("Idempotent-Replayed")) == (200, first.body, "true")
    assert upstream.count("create") == 1


@pytest.mark.parametrize(
    "other_body",
    [
        create_body(name="weekly"),
        create_body(input_dataset_id="dataset-2"),
        create_body(model="command-a"),
        create_body(priority="high"),
    ],
)
async def test_the_same_key_with_another_body_is_refused_as_reused(
    other_body: bytes, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    assert (await keyed_create(gateway)).status == 200
    assert_error(await keyed_create(gateway, body=other_body), 422, "idempotency_key_reused")
    assert upstream.count("create") == 1


async def test_the_same_key_while_the_first_is_still_running_is_in_use_with_a_retry_after(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    release = upstream.hold("create")
    first = asyncio.create_task(keyed_create(gateway))
    await upstream.arrival("create")

    busy = await keyed_create(gateway)
    assert_error(busy, 409, "idempotency_key_in_use")
    assert busy.retry_after is not None
    assert int(busy.retry_after) >= 1

    release.set()
    done = await asyncio.wait_for(first, BOUND_S)
    assert done.status == 200, done.body[:300]
    replayed = await keyed_create(gateway)
    assert (replayed.status, replayed.body, replayed.header("Idempotent-Replayed")) == (200, done.body, "true")
    assert upstream.count("create") == 1


async def test_two_callers_using_the_same_key_are_independent(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await writer_gateway(start, upstream)
    billing = await keyed_create(gateway, caller_key=BILLING_KEY)
    reporting = await keyed_create(gateway, caller_key=REPORTING_KEY)
    other_body = await keyed_create(gateway, body=create_body(name="weekly"), caller_key=REPORTING_KEY)
    billing_again = await keyed_create(gateway, caller_key=BILLING_KEY)

    assert [billing.status, reporting.status] == [200, 200]
    assert billing.json["batch"]["id"] != reporting.json["batch"]["id"]
    assert [billing.header("Idempotent-Replayed"), reporting.header("Idempotent-Replayed")] == [None, None]
    assert_error(other_body, 422, "idempotency_key_reused")  # reporting's own record of the key
    assert (billing_again.body, billing_again.header("Idempotent-Replayed")) == (billing.body, "true")
    assert [s.headers["X-Client-Name"] for s in upstream.calls("create")] == ["billing-service", "reporting"]


# --- the key itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"k" * 256,
        b"has space",
        b"tab\tinside",
        "caf\u00e9".encode(),
        b"caf\xe9",
        "\u043a\u043b\u044e\u0447".encode(),
    ],
    ids=["empty", "256 characters", "a space", "a tab", "UTF-8", "latin-1", "cyrillic"],
)
async def test_an_idempotency_key_that_is_not_1_to_255_visible_ascii_characters_is_refused(
    value: bytes, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    body = create_body()
    headers: list[tuple[str | bytes, str | bytes] | bytes] = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        b"Idempotency-Key: " + value,
    ]
    answer = await raw_request(gateway.url, request_bytes("/v2/batches", headers, method="POST", body=body))
    assert_error(answer, 400, "invalid_request")
    assert upstream.count() == 0


VISIBLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


@pytest.mark.parametrize(
    "key", ["!", "~", "k" * 255, VISIBLE_ASCII, string.ascii_letters], ids=["!", "~", "255", "all", "letters"]
)
async def test_an_idempotency_key_of_1_to_255_visible_ascii_characters_is_accepted_and_recorded(
    key: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    first = await keyed_create(gateway, key)
    again = await keyed_create(gateway, key)
    assert first.status == 200, first.body[:300]
    assert (again.body, again.header("Idempotent-Replayed")) == (first.body, "true")
    assert upstream.count("create") == 1


@pytest.mark.parametrize("second", [KEY, "another-key"])
async def test_two_idempotency_key_headers_are_refused(second: str, upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await writer_gateway(start, upstream)
    body = create_body()
    headers: list[tuple[str | bytes, str | bytes] | bytes] = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Idempotency-Key", KEY),
        ("Idempotency-Key", second),
    ]
    answer = await raw_request(gateway.url, request_bytes("/v2/batches", headers, method="POST", body=body))
    assert_error(answer, 400, "invalid_request")
    assert upstream.count() == 0


# --- which outcomes are recorded -------------------------------------------------------------


@pytest.mark.parametrize("upstream_status", [400, 404, 422])
async def test_a_definite_refusal_by_the_upstream_is_recorded_and_replayed(
    upstream_status: int, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.fail("create", upstream_status, body={"message": "dataset-1 cannot be used"}, times=1)
    gateway = await writer_gateway(start, upstream)
    first = await keyed_create(gateway)
    again = await keyed_create(gateway)

    if upstream_status != 422:  # §5 maps an upstream 400 and 404; it does not say what a 422 becomes
        assert first.status == upstream_status, first.body[:300]
    assert_error(first, first.status)
    # The replay is the first answer: its status and body (whose request_id may be the first request's).
    assert (again.status, again.header("Content-Type")) == (first.status, first.header("Content-Type"))
    assert again.header("Idempotent-Replayed") == "true"
    assert without_request_id(again) == without_request_id(first)
    assert upstream.count("create") == 1


@pytest.mark.parametrize(
    ("upstream_status", "status", "code"),
    [
        (500, 502, "upstream_error"),
        (502, 502, "upstream_error"),
        (503, 503, "upstream_unavailable"),
        (504, 502, "upstream_error"),
    ],
)
async def test_after_an_upstream_5xx_the_key_is_free_again(
    upstream_status: int, status: int, code: str | None, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.fail("create", upstream_status, times=1)
    gateway = await writer_gateway(start, upstream)
    assert_error(await keyed_create(gateway), status, code)
    again = await keyed_create(gateway)
    assert again.status == 200, again.body[:300]
    assert again.header("Idempotent-Replayed") is None
    assert upstream.count("create") == 2


async def test_after_an_upstream_429_the_key_is_free_again_once_the_pause_is_over(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.fail("create", 429, headers={"Retry-After": "2"}, times=1)
    clock = FakeClock()
    gateway = await start(make_config(upstream.url, callers=write_callers()), clock=clock)
    assert_error(await keyed_create(gateway), 429, "upstream_rate_limited")
    clock.advance(3)
    again = await keyed_create(gateway)
    assert again.status == 200, again.body[:300]
    assert again.header("Idempotent-Replayed") is None
    assert upstream.count("create") == 2


async def test_a_keyed_create_refused_before_anything_was_sent_leaves_the_key_free(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.fail("retrieve", 429, headers={"Retry-After": "30"}, times=1)
    clock = FakeClock()
    gateway = await start(make_config(upstream.url, callers=write_callers()), clock=clock)
    assert_error(await http(f"{gateway.url}/v2/batches/seeded-1"), 429, "upstream_rate_limited")  # the pause begins
    assert_error(await keyed_create(gateway), 429, "upstream_rate_limited")
    assert upstream.count("create") == 0

    clock.advance(31)
    after = await keyed_create(gateway)
    assert after.status == 200, after.body[:300]
    assert after.header("Idempotent-Replayed") is None
    assert upstream.count("create") == 1


# --- ambiguous failures: the batch may exist -----------------------------------------------


def batches_named(upstream: Upstream, name: str, dataset: str) -> list[str]:
    return [b["id"] for b in upstream.batches.values() if (b["name"], b["input_dataset_id"]) == (name, dataset)]


@pytest.mark.parametrize("failure", ["timeout", "connection lost"])
async def test_a_retry_after_an_ambiguous_failure_finds_the_created_batch_and_replays_it(
    failure: str, upstream: Upstream, start: GatewayFactory
) -> None:
    older = upstream.seed("older-same-name", name="nightly", input_dataset_id="dataset-1", age_s=86400)["id"]
    if failure == "timeout":
        upstream.hang("create")  # the batch is created, the answer never comes
    else:
        upstream.drop("create")  # the batch is created, the connection is closed unanswered
    gateway = await writer_gateway(start, upstream, billing="own", upstream={"timeout_s": 1})

    first = await keyed_create(gateway)
    assert 500 <= first.status < 600, first.body[:300]
    if failure == "timeout":
        assert_error(first, 504, "upstream_timeout")
    [created] = [i for i in batches_named(upstream, "nightly", "dataset-1") if i != older]
    # Another caller creates a batch of the same name from another dataset meanwhile.
    await keyed_create(gateway, "reporting-key", create_body(input_dataset_id="dataset-2"), caller_key=REPORTING_KEY)

    again = await keyed_create(gateway)
    assert (again.status, again.header("Idempotent-Replayed")) == (200, "true"), again.body[:300]
    assert again.json == {"batch": upstream.batches[created]}
    assert billing_posts(upstream) == 1
    lookups = [s for s in upstream.calls("list") if s.headers.get("X-Client-Name") == "billing-service"]
    assert lookups
    assert all(s.query.get("order_by") == "created_at" for s in lookups)
    mine = await http(f"{gateway.url}/v2/batches/{created}")
    assert (mine.status, mine.json["batch"]["id"]) == (200, created)


async def test_an_ambiguous_create_whose_batch_is_not_found_upstream_is_created_on_retry(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("older-same-name", name="nightly", input_dataset_id="dataset-1", age_s=86400)
    upstream.hang("create", work=False)  # the upstream never got as far as creating it
    gateway = await writer_gateway(start, upstream, upstream={"timeout_s": 1})
    assert_error(await keyed_create(gateway), 504, "upstream_timeout")
    assert batches_named(upstream, "nightly", "dataset-1") == ["older-same-name"]

    again = await keyed_create(gateway)
    assert again.status == 200, again.body[:300]
    assert again.header("Idempotent-Replayed") is None
    assert again.json["batch"]["id"] != "older-same-name"
    assert upstream.count("list") >= 1
    assert upstream.count("create") == 2


async def ambiguous_first_try(gateway: RunningGateway, upstream: Upstream) -> None:
    """A keyed create that times out before the upstream made anything: a retry looks before it creates."""
    upstream.hang("create", work=False)
    assert_error(await keyed_create(gateway), 504, "upstream_timeout")


async def test_a_retry_after_an_ambiguous_failure_never_adopts_another_callers_batch(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream, billing="own", upstream={"timeout_s": 1})
    theirs = await keyed_create(gateway, "reporting-key", caller_key=REPORTING_KEY)  # the same fields exactly
    assert theirs.status == 200, theirs.body[:300]
    their_id = theirs.json["batch"]["id"]
    await ambiguous_first_try(gateway, upstream)

    again = await keyed_create(gateway)
    assert again.status == 200, again.body[:300]
    assert again.header("Idempotent-Replayed") is None
    assert again.json["batch"]["id"] != their_id
    assert billing_posts(upstream) == 2  # the ambiguous try, then a create of its own
    assert_error(await http(f"{gateway.url}/v2/batches/{their_id}"), 404, "not_found")
    assert_error(await post_json(f"{gateway.url}/v2/batches/{their_id}:cancel", b""), 404, "not_found")
    assert upstream.batches[their_id]["status"] != "BATCH_STATUS_CANCELING"


@pytest.mark.parametrize(
    "seeded",
    [
        {"model": "command-a"},
        {"age_s": -3600},
        {"age_s": 0, "twice": True},
    ],
    ids=["another model", "created long after the first try", "two that match"],
)
async def test_a_retry_after_an_ambiguous_failure_adopts_no_batch_created_outside_unless_it_alone_matches(
    seeded: dict[str, Any], upstream: Upstream, start: GatewayFactory
) -> None:
    fields = {"name": "nightly", "input_dataset_id": "dataset-1", "age_s": 0, **seeded}
    twice = fields.pop("twice", False)
    outside = [upstream.seed("outside-1", **fields)["id"]]
    if twice:
        outside.append(upstream.seed("outside-2", **fields)["id"])
    gateway = await writer_gateway(start, upstream, billing="own", upstream={"timeout_s": 1})
    await ambiguous_first_try(gateway, upstream)

    again = await keyed_create(gateway)
    assert again.status == 200, again.body[:300]
    assert again.header("Idempotent-Replayed") is None
    assert again.json["batch"]["id"] not in outside
    assert billing_posts(upstream) == 2
    for batch_id in outside:  # still no one's: the own-scoped caller cannot see or cancel it
        assert_error(await http(f"{gateway.url}/v2/batches/{batch_id}"), 404, "not_found")


async def test_a_retry_after_an_ambiguous_failure_adopts_the_one_batch_made_outside_that_matches_every_field(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.seed("outside-1", name="nightly", input_dataset_id="dataset-1", age_s=0, model="command-r")
    upstream.seed("outside-2", name="nightly", input_dataset_id="dataset-1", age_s=0, model="command-a")
    gateway = await writer_gateway(start, upstream, billing="own", upstream={"timeout_s": 1})
    await ambiguous_first_try(gateway, upstream)

    again = await keyed_create(gateway)
    assert (again.status, again.header("Idempotent-Replayed")) == (200, "true"), again.body[:300]
    assert again.json["batch"]["id"] == "outside-1"
    assert billing_posts(upstream) == 1


# --- records outlive the process -------------------------------------------------------------


async def test_a_replay_survives_a_restart_on_the_same_store(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path
) -> None:
    store = {"path": str(tmp_path / "s.db")}
    first_gateway = await writer_gateway(start, upstream, store=store)
    first = await keyed_create(first_gateway)
    assert first.status == 200, first.body[:300]
    await first_gateway.stop()

    second_gateway = await writer_gateway(start, upstream, store=store)
    again = await keyed_create(second_gateway)
    assert (again.status, again.body, again.header("Idempotent-Replayed")) == (200, first.body, "true")
    assert_error(await keyed_create(second_gateway, body=create_body(name="weekly")), 422, "idempotency_key_reused")
    assert upstream.count("create") == 1


# --- the store failing -------------------------------------------------------------------------


async def test_a_create_whose_record_cannot_be_written_still_answers_and_is_logged_and_counted(
    upstream: Upstream, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await writer_gateway(start, upstream, billing="own")
    with break_store_writes(gateway):
        answer = await post_json(f"{gateway.url}/v2/batches", create_body())
    assert answer.status == 200, answer.body[:300]
    batch_id = answer.json["batch"]["id"]
    assert registry_value(gateway, "gateway_store_write_failures_total") == 1
    logged = [json.dumps(line) for line in logs.events()]
    assert any(batch_id in line and "billing-service" in line for line in logged), logs.text[-2000:]


async def test_an_own_callers_retrieve_when_the_store_cannot_be_read_is_503_never_the_batch(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path
) -> None:
    upstream.seed("seeded-1")
    store = {"path": str(tmp_path / "s.db")}
    first_gateway = await writer_gateway(start, upstream, billing="own", store=store)
    mine = (await keyed_create(first_gateway)).json["batch"]["id"]
    await first_gateway.stop()

    gateway = await writer_gateway(start, upstream, billing="own", store=store)  # nothing of it in memory
    with break_store_reads(gateway):
        for batch_id in (mine, "seeded-1"):
            answer = await http(f"{gateway.url}/v2/batches/{batch_id}")
            assert_error(answer, 503, "store_unavailable")
            assert "batch" not in answer.document


async def test_a_keyed_create_when_the_store_cannot_be_read_is_503_without_an_upstream_call(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    with break_store_reads(gateway):
        assert_error(await keyed_create(gateway), 503, "store_unavailable")
    assert upstream.count("create") == 0
