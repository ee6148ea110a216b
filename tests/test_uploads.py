"""Dataset uploads through the gateway (docs/design.md §11), as a service using the SDK sees them.

The upload reaches the upstream byte for byte with the upstream's token and
the caller's name, the new dataset is the caller's, and an upload repeated
with the same ``Idempotency-Key`` and file is replayed, not made twice,
even though the SDK picks a new multipart boundary every time.

The fake upstream's dataset routes are the simulator's (``tests.upstream``):
it parses the multipart body as it streams, as Cohere does, keeps each
part's size and SHA-256, answers ``{"id": ...}`` and lists what it holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from aiohttp import web

from gateway.edge.server import RunningGateway
from gateway.records.base import dataset_key
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    Answer,
    LogCapture,
    http,
    make_config,
    registry_value,
    sdk,
)
from tests.upstream import ALL_OPERATIONS, Seen, Upstream, assert_error, caller

BOUND_S = 30
UPLOAD_PATH = "/v1/datasets"
EMBED = "batch-embed-v2-input"
ROWS = b"".join(b'{"custom_id": "r%d", "body": {"texts": ["hello %d"]}}\n' % (i, i) for i in range(200))
KEY = "upload-nightly-2026-12-01"


def uploaders(**extra: Any) -> list[dict[str, Any]]:
    """billing-service may upload; reporting may do everything but upload."""
    return [
        caller("billing-service", BILLING_KEY, [*ALL_OPERATIONS, "upload_dataset"], **extra),
        caller("reporting", REPORTING_KEY, ALL_OPERATIONS),
    ]


async def upload_gateway(start: GatewayFactory, fake: Upstream, **sections: Any) -> RunningGateway:
    return await start(make_config(fake.url, callers=uploaders(), **sections))


def uploads_seen(upstream: Upstream) -> list[Seen]:
    return upstream.calls("upload")


async def sdk_upload(gateway: RunningGateway, data: bytes = ROWS, key: str | None = None, **kwargs: Any) -> Any:
    """``co.datasets.create`` through the gateway, raw (headers visible)."""
    options: Any = {"additional_headers": {"Idempotency-Key": key}} if key else None
    return await asyncio.wait_for(
        sdk(gateway.url, **kwargs).datasets.with_raw_response.create(
            name="nightly", type=EMBED, data=("rows.jsonl", data, "application/jsonl"), request_options=options
        ),
        BOUND_S,
    )


def multipart(data: bytes = ROWS, boundary: str = "b0undary") -> tuple[str, bytes]:
    """A Content-Type and body as the SDK makes them, with a boundary of the test's choosing."""
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="data"; filename="rows.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


async def post_upload(
    gateway: RunningGateway,
    body: bytes,
    content_type: str,
    *,
    query: str = f"name=nightly&type={EMBED}",
    key: str | None = BILLING_KEY,
    idempotency_key: str | None = None,
) -> Answer:
    headers = {"Content-Type": content_type}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return await http(f"{gateway.url}{UPLOAD_PATH}?{query}", method="POST", key=key, headers=headers, data=body)


# --- uploads -----------------------------------------------------------------------------


async def test_an_sdk_upload_reaches_the_upstream_as_sent_and_the_new_dataset_is_the_callers(
    upstream: Upstream, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await upload_gateway(start, upstream)

    answer = await sdk_upload(gateway)

    dataset_id = answer.data.id
    assert dataset_id in upstream.datasets.datasets
    [seen] = uploads_seen(upstream)
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert seen.headers["X-Client-Name"] == "billing-service"
    assert (seen.query["name"], seen.query["type"]) == ("nightly", EMBED)
    assert seen.upload is not None
    assert [(p.name, p.filename, p.size) for p in seen.upload.parts] == [("data", "rows.jsonl", len(ROWS))]
    assert seen.data_sha256 == hashlib.sha256(ROWS).hexdigest()
    assert await gateway.state.records.owner_of(dataset_key(dataset_id)) == "billing-service"
    assert registry_value(gateway, "gateway_dataset_upload_bytes_total", caller="billing-service") >= len(ROWS)
    assert registry_value(gateway, "gateway_dataset_uploads_total", caller="billing-service", outcome="created") == 1
    gateway.state.access_log.flush()
    [line] = [e for e in logs.events() if e.get("path") == UPLOAD_PATH]
    assert (line["caller"], line["status"], line["method"]) == ("billing-service", 200, "POST")


async def test_the_upstream_gets_the_callers_body_and_content_type_byte_for_byte(
    upstream: Upstream, start: GatewayFactory
) -> None:
    received: list[bytes] = []

    async def keep_the_bytes(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"id": "dataset-bytes"})

    upstream.script(keep_the_bytes, "upload")
    gateway = await upload_gateway(start, upstream)
    content_type, body = multipart(boundary="----exact-bytes-7d3a")

    answer = await post_upload(gateway, body, content_type)

    assert answer.status == 200, answer.body
    [seen] = uploads_seen(upstream)
    assert (received, seen.headers["Content-Type"]) == ([body], content_type)


async def test_an_upload_larger_than_the_json_body_limit_still_goes_through(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await upload_gateway(start, upstream, server={"max_body_bytes": 4096})
    rows = ROWS * 40  # ~200 KB, fifty times server.max_body_bytes

    answer = await sdk_upload(gateway, rows)

    assert answer.data.id in upstream.datasets.datasets
    assert uploads_seen(upstream)[0].data_sha256 == hashlib.sha256(rows).hexdigest()


async def test_a_caller_not_allowed_to_upload_is_refused_before_its_body_is_read(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await upload_gateway(start, upstream)
    content_type, body = multipart()

    answer = await post_upload(gateway, body, content_type, key=REPORTING_KEY)

    assert_error(answer, 403, "operation_not_allowed")
    assert uploads_seen(upstream) == []


# --- Idempotency-Key ---------------------------------------------------------------------


async def test_an_upload_repeated_with_the_sdk_and_the_same_key_is_replayed_without_a_second_upload(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await upload_gateway(start, upstream)

    first = await sdk_upload(gateway, key=KEY)
    again = await sdk_upload(gateway, key=KEY)

    assert again.data.id == first.data.id
    assert "Idempotent-Replayed" not in first.response.headers
    assert again.response.headers["Idempotent-Replayed"] == "true"
    assert len(uploads_seen(upstream)) == 1
    replays = registry_value(gateway, "gateway_dataset_uploads_total", caller="billing-service", outcome="replayed")
    assert replays == 1


async def test_the_same_key_with_another_boundary_is_a_replay_and_with_another_file_is_refused(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await upload_gateway(start, upstream)
    first = await post_upload(gateway, *reversed(multipart(boundary="first")), idempotency_key=KEY)
    other_boundary = await post_upload(gateway, *reversed(multipart(boundary="second")), idempotency_key=KEY)

    other_file = await post_upload(gateway, *reversed(multipart(ROWS + b"\n", "third")), idempotency_key=KEY)

    assert first.status == 200, first.body
    assert (other_boundary.status, other_boundary.body) == (200, first.body)
    assert other_boundary.header("Idempotent-Replayed") == "true"
    assert_error(other_file, 422, "idempotency_key_reused")
    assert len(uploads_seen(upstream)) == 1


async def test_an_upload_and_a_batch_create_with_the_same_key_do_not_collide(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await upload_gateway(start, upstream)

    uploaded = await sdk_upload(gateway, key=KEY)
    created = await http(
        f"{gateway.url}/v2/batches",
        method="POST",
        headers={"Idempotency-Key": KEY, "Content-Type": "application/json"},
        data=json.dumps({"name": "n", "input_dataset_id": uploaded.data.id, "model": "m"}).encode(),
    )

    assert created.code != "idempotency_key_reused"
    assert created.header("Idempotent-Replayed") is None


async def test_after_an_ambiguous_upload_a_retry_with_the_key_finds_the_dataset_and_replays_it(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await upload_gateway(start, upstream, upstream={"timeout_s": 1})
    upstream.hang("upload")  # the upstream makes the dataset, then never answers

    lost = await post_upload(gateway, *reversed(multipart()), idempotency_key=KEY)
    retried = await post_upload(gateway, *reversed(multipart(boundary="retry")), idempotency_key=KEY)

    assert_error(lost, 504, "upstream_timeout")
    [made] = upstream.datasets.datasets
    assert (retried.status, retried.document, retried.header("Idempotent-Replayed")) == (200, {"id": made}, "true")
    assert len(uploads_seen(upstream)) == 1
    assert await gateway.state.records.owner_of(dataset_key(made)) == "billing-service"


async def test_after_an_ambiguous_upload_a_retry_with_another_file_is_refused(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await upload_gateway(start, upstream, upstream={"timeout_s": 1})
    upstream.hang("upload")

    lost = await post_upload(gateway, *reversed(multipart()), idempotency_key=KEY)
    other = await post_upload(gateway, *reversed(multipart(ROWS[:100])), idempotency_key=KEY)

    assert_error(lost, 504, "upstream_timeout")
    assert_error(other, 422, "idempotency_key_reused")
    assert len(upstream.datasets.datasets) == 1


async def test_after_an_ambiguous_upload_a_same_named_dataset_made_before_the_first_try_is_not_taken_for_it(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await upload_gateway(start, upstream, upstream={"timeout_s": 1})
    # Someone else's upload of the same name and type a minute ago, through no gateway (no owner recorded).
    earlier = upstream.seed_dataset([], name="nightly", dataset_type=EMBED)
    upstream.datasets.datasets[earlier].created -= 60
    upstream.hang("upload")  # the first try makes the dataset, then is never answered

    lost = await post_upload(gateway, *reversed(multipart()), idempotency_key=KEY)
    retried = await post_upload(gateway, *reversed(multipart()), idempotency_key=KEY)

    assert_error(lost, 504, "upstream_timeout")
    [made] = [d for d in upstream.datasets.datasets if d != earlier]
    # The retry finds the one dataset made since the first try began: replayed, not uploaded a second time.
    assert (retried.status, retried.document, retried.header("Idempotent-Replayed")) == (200, {"id": made}, "true")
    assert len(uploads_seen(upstream)) == 1
    assert await gateway.state.records.owner_of(dataset_key(earlier)) is None
