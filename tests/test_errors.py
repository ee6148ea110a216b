"""Every row of docs/design.md §5's error table, through the real gateway.

The SDK is the client wherever it can send the input (it is what callers
see); aiohttp or a raw socket where it cannot (no key, wrong method, paths a
client would normalise, oversized heads). Every answer must be the one JSON
shape with ``Content-Type: application/json``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from cohere.core.api_error import ApiError
from cohere.errors import BadRequestError, NotFoundError, ServiceUnavailableError, UnauthorizedError
from multidict import CIMultiDict

from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    Answer,
    FakeClock,
    assert_no_secrets,
    free_port,
    http,
    make_config,
    raw_request,
    request_bytes,
    sdk,
)
from tests.upstream import Upstream, batch_body, json_handler

BOUND_S = 30  # no single exchange in this file may take longer


def assert_contract_error(
    answer: Answer, status: int, code: str, *, upstream_status: int | None = None, retry_after: bool = False
) -> dict[str, Any]:
    """The one error shape: status, JSON content type, keys in order, request id, Retry-After where due."""
    assert answer.status == status
    assert answer.headers.get("Content-Type", "").split(";")[0] == "application/json"
    document = answer.document
    expected_keys = ["message", "code", "request_id"] + (["upstream_status"] if upstream_status is not None else [])
    assert list(document) == expected_keys
    assert document["code"] == code
    assert isinstance(document["message"], str)
    assert document["message"]
    assert document["request_id"] == answer.headers["X-Request-ID"]
    if upstream_status is not None:
        assert document["upstream_status"] == upstream_status
    if retry_after:
        assert int(answer.headers["Retry-After"]) >= 1
    else:
        assert "Retry-After" not in answer.headers
    assert_no_secrets(answer.body)
    return document


async def sdk_error(url: str, batch_id: str, key: str = BILLING_KEY) -> tuple[ApiError, Answer]:
    """Retrieve through the SDK, which must raise; the exception and what it received."""
    with pytest.raises(ApiError) as raised:
        await asyncio.wait_for(sdk(url, key).batches.retrieve(batch_id), BOUND_S)
    exc = raised.value
    assert exc.status_code is not None
    body = exc.body if isinstance(exc.body, bytes | str) else json.dumps(exc.body)
    answer = Answer(exc.status_code, CIMultiDict(exc.headers or {}), body.encode() if isinstance(body, str) else body)
    return exc, answer


def get_head(target: bytes, *extra: bytes, key: str = BILLING_KEY) -> bytes:
    return request_bytes(target, list(extra), host="gateway", key=key)


@pytest.fixture
async def upstream(upstream: Upstream) -> Upstream:
    return upstream.script(json_handler())


# --- caused by the caller ---------------------------------------------------------------


async def test_an_unknown_caller_key_is_401_unauthorized(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await start(make_config(upstream.url))
    exc, answer = await sdk_error(gateway.url, "batch-1", key="not-a-configured-key-123")
    assert type(exc) is UnauthorizedError
    assert_contract_error(answer, 401, "unauthorized")
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param(b"Token abc", id="other scheme"),
        pytest.param(b"", id="empty"),
        pytest.param(b"Bearer", id="scheme only"),
        pytest.param(b"Bearer ", id="scheme and space"),
        pytest.param(b"Basic " + BILLING_KEY.encode(), id="basic scheme"),
        pytest.param(BILLING_KEY.encode(), id="no scheme"),
        pytest.param(b"Bearer " + BILLING_KEY.encode() + b"x", id="one character more"),
        pytest.param("Bearer ключ-которого-нет".encode(), id="non-ASCII UTF-8"),
        pytest.param(b"Bearer \xff\xfe\xfd\x80", id="bytes that are not UTF-8"),
        pytest.param(b"Bearer " + BILLING_KEY.encode() + b"\xe9", id="known key plus a latin-1 byte"),
    ],
)
async def test_a_missing_or_malformed_authorization_is_401_never_500(
    authorization: bytes | None, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    extra = [] if authorization is None else [b"Authorization: " + authorization]
    answer = await raw_request(gateway.url, request_bytes(b"/v2/batches/batch-1", extra, host="gateway", key=None))
    document = assert_contract_error(answer, 401, "unauthorized")
    assert "REDACTED" not in document["message"]  # our own hints reach the caller intact
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "second",
    [BILLING_KEY, REPORTING_KEY, "not-a-configured-key-123"],
    ids=["same key twice", "two known keys", "known then unknown"],
)
async def test_a_doubled_authorization_is_401_never_500(second: str, upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await start(make_config(upstream.url))
    answer = await raw_request(
        gateway.url, get_head(b"/v2/batches/batch-1", b"Authorization: Bearer " + second.encode())
    )
    assert_contract_error(answer, 401, "unauthorized")
    assert upstream.count() == 0


# "a:cancel" is not here: the SDK sends it as is, and '/v2/batches/a:cancel' is the cancel resource (405, §8).
@pytest.mark.parametrize("batch_id", ["bad id", "-leading-dash", "a" * 129, "batch!", "b\u00e4tch", "a:b"])
async def test_a_malformed_batch_id_is_400_invalid_batch_id(
    batch_id: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    exc, answer = await sdk_error(gateway.url, batch_id)
    assert type(exc) is BadRequestError
    assert_contract_error(answer, 400, "invalid_batch_id")
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "target",
    [
        b"/v2/batches/..",
        b"/v2/batches/.",
        b"/v2/batches/%2e%2e",
        b"/v2/batches/%2E%2E",
        b"/v2/batches/..%2Fjobs",
        b"/v2/batches/..%2fjobs",
        b"/v2/batches/a%2Fb",
        b"/v2/batches/a%2F..%2F..%2Fjobs",
        b"/v2/batches/..%5Cjobs",
        b"/v2/batches/a%00",
        b"/v2/batches/%00",
        b"/v2/batches/a%0D%0AX-Injected:%201",
        b"/v2/batches/a%0A",
        b"/v2/batches/a%09b",
        b"/v2/batches/a%20",
        b"/v2/batches/" + b"a" * 129,
        b"/v2/batches/" + b"a" * 5000,
        b"/v2/batches/b%C3%A4tch",
        "/v2/batches/bätch".encode(),
        b"/v2/batches/b%E4tch",
        b"/v2/batches/a%3Fx%3D1",
        b"/v2/batches/a%23frag",
        b"/v2/batches/a%3Acancel",
        b"/v2/batches/a/b",
        b"/v2/batches/a/../../jobs",
        b"/v2/batches//a",
        b"/v2/batches/",
        b"/v2/batches/%",
        b"/v2/batches/%zz",
        b"/v2/./batches/..",
        b"/v2/batches/a\rb",
        b"/v2/batches/a\x00b",
        b"http://evil.example/v2/batches/..%2Fjobs",
    ],
)
async def test_ids_that_try_to_escape_are_refused_and_never_reach_the_upstream(
    target: bytes, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    answer = await raw_request(gateway.url, get_head(target))
    assert answer.status in (400, 404)
    code = answer.document["code"]
    assert code in {"invalid_batch_id", "route_not_found", "malformed_request"}
    assert_contract_error(answer, answer.status, code)
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "path", ["/", "/v1/batches/batch-1", "/v2/batches/", "/v2/batches/batch-1/cancel", "/v2/chat", "/V2/batches/b"]
)
async def test_an_unknown_path_is_404_route_not_found(path: str, upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await start(make_config(upstream.url))
    answer = await http(gateway.url + path)
    assert_contract_error(answer, 404, "route_not_found")
    assert upstream.count() == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_a_wrong_method_on_a_known_path_is_405_with_allow(
    method: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await start(make_config(upstream.url))
    answer = await http(gateway.url + "/v2/batches/batch-1", method=method)
    assert_contract_error(answer, 405, "method_not_allowed")
    assert answer.headers["Allow"] == "GET, HEAD"
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(get_head(b"/v2/batches/" + b"a" * 9000), id="request line"),
        pytest.param(get_head(b"/v2/batches/batch-1", b"X-Big: " + b"v" * 9000), id="one header"),
        pytest.param(get_head(b"/v2/batches/batch-1", b"X-" + b"n" * 9000 + b": v"), id="header name"),
        pytest.param(
            get_head(b"/v2/batches/batch-1", *(b"X-Many-%d: v" % i for i in range(200))), id="too many headers"
        ),
    ],
)
async def test_an_oversized_request_head_is_431_json(head: bytes, upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await start(make_config(upstream.url))
    answer = await raw_request(gateway.url, head)
    assert_contract_error(answer, 431, "request_too_large")
    assert upstream.count() == 0


async def test_an_oversized_body_is_413_request_too_large(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await start(make_config(upstream.url, server={"max_body_bytes": 1024}))
    answer = await http(gateway.url + "/v2/batches/batch-1", data=b"x" * 4096)
    assert_contract_error(answer, 413, "request_too_large")
    assert upstream.count() == 0


async def test_a_caller_over_its_rate_limit_is_429_caller_rate_limited(
    upstream: Upstream, start: GatewayFactory
) -> None:
    limited = {"name": "billing-service", "key": BILLING_KEY, "rate_limit": {"requests_per_s": 0.1, "burst": 1}}
    gateway = await start(make_config(upstream.url, callers=[limited]), clock=FakeClock())
    client = sdk(gateway.url)
    await asyncio.wait_for(client.batches.retrieve("batch-1"), BOUND_S)
    exc, answer = await sdk_error(gateway.url, "batch-1")
    assert type(exc) is ApiError  # the SDK has no class of its own for 429 on this endpoint
    assert_contract_error(answer, 429, "caller_rate_limited", retry_after=True)
    assert answer.headers["Retry-After"] == "10"
    assert upstream.count() == 1


async def test_the_gateways_own_budget_spent_is_429_rate_limited(upstream: Upstream, start: GatewayFactory) -> None:
    budget = {"rate_limit": {"requests_per_s": 0.5, "burst": 1}, "budget_wait_s": 0}
    gateway = await start(make_config(upstream.url, upstream=budget), clock=FakeClock())
    await asyncio.wait_for(sdk(gateway.url).batches.retrieve("batch-1"), BOUND_S)
    exc, answer = await sdk_error(gateway.url, "batch-2")
    assert type(exc) is ApiError
    assert_contract_error(answer, 429, "rate_limited", retry_after=True)
    assert answer.headers["Retry-After"] == "2"
    assert upstream.count() == 1


# --- answered by, or failed at, the upstream ----------------------------------------------------------


@dataclass(frozen=True)
class UpstreamRow:
    """One upstream answer and the row of the table it must become."""

    answer_status: int
    answer_body: bytes
    status: int
    code: str
    sdk_class: type[ApiError]
    upstream_status: int | None
    answer_headers: tuple[tuple[str, str], ...] = ()
    retry_after: str | None = None
    max_body_bytes: int = 1024


MESSAGE = b'{"message": "upstream says no"}'
UPSTREAM_ROWS = {
    "upstream 400": UpstreamRow(
        400, b'{"message": "invalid batch id format"}', 400, "bad_request", BadRequestError, 400
    ),
    "upstream 404": UpstreamRow(404, b'{"message": "batch not found"}', 404, "not_found", NotFoundError, 404),
    "upstream 401": UpstreamRow(401, MESSAGE, 502, "upstream_auth_failed", ApiError, 401),
    "upstream 403": UpstreamRow(403, MESSAGE, 502, "upstream_auth_failed", ApiError, 403),
    "upstream 429 with Retry-After": UpstreamRow(
        429, MESSAGE, 429, "upstream_rate_limited", ApiError, 429, (("Retry-After", "7"),), "7"
    ),
    "upstream 429 without Retry-After": UpstreamRow(429, MESSAGE, 429, "upstream_rate_limited", ApiError, 429, (), "5"),
    "upstream 503 with Retry-After": UpstreamRow(
        503, MESSAGE, 503, "upstream_unavailable", ServiceUnavailableError, 503, (("Retry-After", "3"),), "3"
    ),
    "upstream 503 without Retry-After": UpstreamRow(
        503, MESSAGE, 503, "upstream_unavailable", ServiceUnavailableError, 503, (), "5"
    ),
    "upstream 500": UpstreamRow(500, MESSAGE, 502, "upstream_error", ApiError, 500),
    "upstream 502": UpstreamRow(502, b"<html>bad gateway</html>", 502, "upstream_error", ApiError, 502),
    "upstream 504": UpstreamRow(504, b"", 502, "upstream_error", ApiError, 504),
    "upstream 599": UpstreamRow(599, MESSAGE, 502, "upstream_error", ApiError, 599),
    "upstream 418": UpstreamRow(418, MESSAGE, 502, "upstream_error", ApiError, 418),
    "upstream 304": UpstreamRow(304, b"", 502, "upstream_error", ApiError, 304),
    "upstream 200 not JSON": UpstreamRow(200, b"<html>ok</html>", 502, "upstream_invalid_response", ApiError, 200),
    "upstream 200 JSON list": UpstreamRow(200, b"[1, 2]", 502, "upstream_invalid_response", ApiError, 200),
    "upstream 200 JSON string": UpstreamRow(200, b'"batch"', 502, "upstream_invalid_response", ApiError, 200),
    "upstream 200 without batch": UpstreamRow(
        200, b'{"id": "batch-1"}', 502, "upstream_invalid_response", ApiError, 200
    ),
    "upstream 200 batch not an object": UpstreamRow(
        200, b'{"batch": "batch-1"}', 502, "upstream_invalid_response", ApiError, 200
    ),
    "upstream 200 deeply nested": UpstreamRow(
        200, b"[" * 100_000, 502, "upstream_invalid_response", ApiError, 200, max_body_bytes=200_000
    ),
    "upstream 201": UpstreamRow(201, batch_body(), 502, "upstream_invalid_response", ApiError, 201),
    "upstream 200 too large": UpstreamRow(
        200, batch_body(name="n" * 4096), 502, "upstream_invalid_response", ApiError, 200
    ),
}


def row_handler(row: UpstreamRow) -> Any:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(
            status=row.answer_status,
            body=row.answer_body if row.answer_status != 304 else None,
            headers=dict(row.answer_headers),
            content_type="application/json",
        )

    return handler


@pytest.mark.parametrize("row", UPSTREAM_ROWS.values(), ids=UPSTREAM_ROWS.keys())
async def test_each_upstream_answer_becomes_its_row_of_the_error_table(
    row: UpstreamRow, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(row_handler(row))
    # A fresh gateway per row: an upstream 429 or 503 pauses every upstream call (§6).
    gateway = await start(make_config(upstream.url, upstream={"max_body_bytes": row.max_body_bytes}))
    exc, answer = await sdk_error(gateway.url, "batch-1")
    assert type(exc) is row.sdk_class
    document = assert_contract_error(
        answer, row.status, row.code, upstream_status=row.upstream_status, retry_after=row.retry_after is not None
    )
    if row.retry_after is not None:
        assert answer.headers["Retry-After"] == row.retry_after
    if row.answer_status in (400, 404):
        assert document["message"] == json.loads(row.answer_body)["message"]
    assert upstream.count() >= 1


async def test_the_upstream_message_of_a_401_is_not_shown_to_the_caller(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler(401, b'{"message": "invalid api token"}'))
    gateway = await start(make_config(upstream.url))
    _exc, answer = await sdk_error(gateway.url, "batch-1")
    assert "invalid api token" not in answer.document["message"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_an_upstream_redirect_is_502_and_never_followed(
    status: int, upstream: Upstream, start: GatewayFactory
) -> None:
    target = (await upstream.another()).script(json_handler())

    async def redirect(_request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"{target.url}/v2/batches/batch-1"})

    upstream.script(redirect)
    gateway = await start(make_config(upstream.url))
    exc, answer = await sdk_error(gateway.url, "batch-1")
    assert type(exc) is ApiError
    assert_contract_error(answer, 502, "upstream_error", upstream_status=status)
    assert "Location" not in answer.headers
    assert upstream.count() == 1
    assert target.count() == 0


async def test_an_upstream_that_does_not_answer_in_time_is_504_upstream_timeout(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    upstream.hold(times=None)  # held until teardown
    gateway = await start(make_config(upstream.url, upstream={"timeout_s": 0.5}))
    exc, answer = await sdk_error(gateway.url, "batch-1")
    assert type(exc) is ApiError
    assert_contract_error(answer, 504, "upstream_timeout")
    assert upstream.count() >= 1


async def test_an_unreachable_upstream_is_502_upstream_unreachable(start: GatewayFactory) -> None:
    gateway = await start(make_config(f"http://127.0.0.1:{free_port()}"))
    exc, answer = await sdk_error(gateway.url, "batch-1")
    assert type(exc) is ApiError
    assert_contract_error(answer, 502, "upstream_unreachable")


async def test_an_upstream_that_drops_the_connection_is_502_not_500(upstream: Upstream, start: GatewayFactory) -> None:
    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    upstream.script(hang_up)
    gateway = await start(make_config(upstream.url))
    exc, answer = await sdk_error(gateway.url, "batch-1")
    assert type(exc) is ApiError
    assert_contract_error(answer, 502, answer.document["code"])
    assert answer.document["code"] in {"upstream_unreachable", "upstream_error", "upstream_invalid_response"}


@pytest.mark.parametrize("status", [400, 404])
async def test_an_upstream_message_that_echoes_the_token_is_kept_without_it(
    status: int, upstream: Upstream, start: GatewayFactory
) -> None:
    message = f"id rejected; you sent {UPSTREAM_TOKEN} as 'Bearer {UPSTREAM_TOKEN}'"
    upstream.script(json_handler(status, json.dumps({"message": message}).encode()))
    gateway = await start(make_config(upstream.url))
    for _ in range(2):  # the second 404 comes from the cache
        _exc, answer = await sdk_error(gateway.url, "batch-1")
        document = assert_contract_error(answer, status, answer.document["code"], upstream_status=status)
        assert document["message"].startswith("id rejected; you sent ")
