"""Hostile writes (docs/design.md §8): paths that try to pass for a cancel, and create bodies built to hurt.

Every case goes over a raw socket (a client library would normalise most of
them) to a real gateway whose callers may create and cancel, in front of the
fake batch API holding batches that a mistaken forward would change. Each
asserts a clean answer (a 4xx in the contract's JSON shape, the exact code
where the contract makes it certain, never a 500), that nothing reached the
upstream, and that no secret is in the answer (``raw_request`` checks each
answer, the ``logs`` fixture every log line).
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from gateway.edge.server import RunningGateway
from tests.conftest import GatewayFactory
from tests.support import Answer, LogCapture, make_config, raw_request, request_bytes
from tests.upstream import ACTIVE, Upstream, assert_error, assert_json_error_shape, create_body, write_callers

RAW_TIMEOUT_S = 10.0
Headers = list[tuple[str | bytes, str | bytes] | bytes]


async def writer_gateway(start: GatewayFactory, fake: Upstream, **sections: Any) -> RunningGateway:
    fake.seed("a", status=ACTIVE)
    fake.seed("batch-1", status=ACTIVE)
    return await start(make_config(fake.url, callers=write_callers(), **sections))


def assert_clean_refusal(answer: Answer, status: int | None = None, code: str | None = None) -> None:
    """A 4xx (``status`` exactly, if given) in the JSON shape; never a 5xx."""
    if status is not None:
        assert_error(answer, status, code)
    else:
        assert 400 <= answer.status < 500, answer.raw[:300]
        assert_json_error_shape(answer)


def assert_nothing_changed(upstream: Upstream) -> None:
    assert upstream.count() == 0, [(s.method, s.path) for s in upstream.calls()]
    assert {b["status"] for b in upstream.batches.values()} == {ACTIVE}


# ---------------------------------------------------------------------------
# Paths that try to pass for a cancel
# ---------------------------------------------------------------------------

CANCEL_TRICKS: list[tuple[str, str, Headers]] = [
    # (method, request target, more headers); none of them is a cancel of a valid id
    ("POST", "/v2/batches/a:cancel:cancel", []),
    ("POST", "/v2/batches/a%3Acancel:cancel", []),
    ("POST", "/v2/batches/:cancel", []),
    ("POST", "/v2/batches/%3Acancel", []),
    ("POST", "/v2/batches/a%3Acancel", []),
    ("POST", "/v2/batches/a%3acancel", []),
    ("GET", "/v2/batches/a:cancel", []),
    ("GET", "/v2/batches/a:cancel", [("X-HTTP-Method-Override", "POST")]),
    ("PUT", "/v2/batches/a:cancel", []),
    ("DELETE", "/v2/batches/a:cancel", []),
    ("PATCH", "/v2/batches/a:cancel", []),
    ("POST", "/v2/batches/a/:cancel", []),
    ("POST", "/v2/batches/a:cancel/", []),
    ("POST", "/v2/batches/a/cancel", []),
    ("POST", "/v2/batches/a;cancel", []),
    ("POST", "/v2/batches/a:CANCEL", []),
    ("POST", "/v2/batches/a:Cancel", []),
    ("POST", "/v2/batches/a:cancelled", []),
    ("POST", "/v2/batches/a:retrieve", []),
    ("POST", "/v2/batches/a:cancel%00", []),
    ("POST", "/v2/batches/a%00:cancel", []),
    ("POST", "/v2/batches/a%20:cancel", []),
    ("POST", "/v2/batches/a :cancel", []),
    ("POST", "/v2/batches/./a:cancel", []),
    ("POST", "/v2/batches/../batches/a:cancel", []),
    ("POST", "/v2/batches/x/../a:cancel", []),
    ("POST", "/v2/batches/a/..:cancel", []),
    ("POST", "/v2/batches/..:cancel", []),
    ("POST", "/v2/batches/.:cancel", []),
    ("POST", "/v2/batches/%2e%2e:cancel", []),
    ("POST", "/v2/batches/a%2F..:cancel", []),
    ("POST", "/v2/batches/..%2Fbatches%2Fa:cancel", []),
    ("POST", "//v2/batches/a:cancel", []),
    ("POST", "/v2/batches//a:cancel", []),
    ("POST", "/V2/batches/a:cancel", []),
    ("POST", "/v2/batches/batch-1:cancel/../../a:cancel", []),
]


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    CANCEL_TRICKS,
    ids=[f"{m} {t} {h}" if h else f"{m} {t}" for m, t, h in CANCEL_TRICKS],
)
async def test_a_path_that_tries_to_pass_for_a_cancel_gets_a_json_4xx_and_cancels_nothing(
    method: str, target: str, headers: Headers, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    data = request_bytes(target, [*headers, ("Content-Length", "0")], method=method)
    answer = await raw_request(gateway.url, data, timeout_s=RAW_TIMEOUT_S)
    assert_clean_refusal(answer)
    assert_nothing_changed(upstream)


async def test_the_plain_cancel_path_is_the_only_one_that_cancels(upstream: Upstream, start: GatewayFactory) -> None:
    gateway = await writer_gateway(start, upstream)
    data = request_bytes("/v2/batches/a:cancel", [("Content-Length", "0")], method="POST")
    answer = await raw_request(gateway.url, data, timeout_s=RAW_TIMEOUT_S)
    assert answer.status == 200, answer.raw[:300]
    assert [(s.method, s.path) for s in upstream.calls()] == [("POST", "/v2/batches/a:cancel")]
    assert upstream.batches["batch-1"]["status"] == ACTIVE


# ---------------------------------------------------------------------------
# Create bodies built to hurt
# ---------------------------------------------------------------------------


def post(body: bytes, content_type: str | None = "application/json", *more: tuple[str, str]) -> bytes:
    headers: Headers = [("Content-Length", str(len(body)))]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    headers += list(more)
    return request_bytes("/v2/batches", headers, method="POST", body=body)


def post_chunked(chunks: list[bytes], content_type: str = "application/json") -> bytes:
    body = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
    headers: Headers = [("Transfer-Encoding", "chunked"), ("Content-Type", content_type)]
    return request_bytes("/v2/batches", headers, method="POST", body=body)


def nested(depth: int, opening: bytes = b"[", closing: bytes = b"]") -> bytes:
    """A valid create body carrying a value nested ``depth`` levels deep."""
    return create_body()[:-1] + b', "deep": ' + opening * depth + b"1" + closing * depth + b"}"


def gzip_bomb() -> bytes:
    """About 10 MB of JSON once expanded, a few KB as sent."""
    return gzip.compress(create_body()[:-1] + b', "pad": "' + b" " * 10_000_000 + b'"}', compresslevel=9)


VALID = create_body()
FORM = b"name=nightly&input_dataset_id=dataset-1&model=command-r"
MULTIPART = (
    b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\nnightly\r\n'
    b'--x\r\nContent-Disposition: form-data; name="input_dataset_id"\r\n\r\ndataset-1\r\n'
    b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\ncommand-r\r\n--x--\r\n'
)

HOSTILE_BODIES: list[tuple[str, bytes, int | None, str | None]] = [
    # (name, raw request, exact status, exact code); None: any 4xx in the JSON shape
    ("Content-Length one past the limit", post(VALID + b" " * (65537 - len(VALID))), 413, "request_too_large"),
    ("Content-Length far past the limit", post(VALID + b" " * 200_000), 413, "request_too_large"),
    (
        "chunked past the limit",
        post_chunked([VALID[:-1], b", " + b'"pad": "' + b"x" * 70_000 + b'"', b"}"]),
        413,
        "request_too_large",
    ),
    ("many small chunks past the limit", post_chunked([b" "] * 70_000 + [VALID]), 413, "request_too_large"),
    ("unterminated object", post(b'{"name": "n", "input_dataset_id": "d", "model": "m"'), 400, "invalid_request"),
    ("trailing comma", post(b'{"name": "n", "input_dataset_id": "d", "model": "m",}'), 400, "invalid_request"),
    ("single quotes", post(b"{'name': 'n', 'input_dataset_id': 'd', 'model': 'm'}"), 400, "invalid_request"),
    ("two documents", post(VALID + VALID), 400, "invalid_request"),
    ("garbage after the document", post(VALID + b" garbage"), 400, "invalid_request"),
    ("a NUL after the document", post(VALID + b"\x00"), 400, "invalid_request"),
    ("deeply nested arrays", post(nested(30_000)), None, None),
    ("deeply nested objects", post(nested(10_000, b'{"a":', b"}")), None, None),
    ("latin-1 bytes", post(create_body(name="caf\u00e9").replace(b"\\u00e9", b"\xe9")), None, None),
    ("a lone 0xff byte", post(create_body(name="x").replace(b'"x"', b'"\xff"')), None, None),
    ("an overlong UTF-8 slash", post(create_body(name="x").replace(b'"x"', b'"\xc0\xaf"')), None, None),
    ("UTF-16 with a BOM", post(VALID.decode().encode("utf-16")), None, None),
    ("UTF-32", post(VALID.decode().encode("utf-32")), None, None),
    ("JSON sent as text/plain", post(VALID, "text/plain"), 400, "invalid_request"),
    ("JSON sent as text/json", post(VALID, "text/json"), 400, "invalid_request"),
    ("JSON sent as application/jsonx", post(VALID, "application/jsonx"), 400, "invalid_request"),
    ("JSON sent as a JSON patch", post(VALID, "application/json-patch+json"), 400, "invalid_request"),
    ("JSON sent with no Content-Type", post(VALID, None), 400, "invalid_request"),
    ("form data declared as JSON", post(FORM), 400, "invalid_request"),
    ("form data declared as form data", post(FORM, "application/x-www-form-urlencoded"), 400, "invalid_request"),
    ("multipart declared as JSON", post(MULTIPART), 400, "invalid_request"),
    ("multipart declared as multipart", post(MULTIPART, "multipart/form-data; boundary=x"), 400, "invalid_request"),
    (
        "two Content-Types",
        request_bytes(
            "/v2/batches",
            [("Content-Length", str(len(VALID))), ("Content-Type", "application/json"), ("Content-Type", "text/plain")],
            method="POST",
            body=VALID,
        ),
        None,
        None,
    ),
    ("a gzip bomb", post(gzip_bomb(), "application/json", ("Content-Encoding", "gzip")), None, None),
    (
        "an Idempotency-Key of 5000 characters",
        post(VALID, "application/json", ("Idempotency-Key", "k" * 5000)),
        400,
        "invalid_request",
    ),
]


@pytest.mark.parametrize(("name", "data", "status", "code"), HOSTILE_BODIES, ids=[c[0] for c in HOSTILE_BODIES])
async def test_a_hostile_create_body_gets_a_json_4xx_and_never_reaches_the_upstream(
    name: str, data: bytes, status: int | None, code: str | None, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    answer = await raw_request(gateway.url, data, timeout_s=RAW_TIMEOUT_S)
    assert_clean_refusal(answer, status, code)
    assert_nothing_changed(upstream)


async def test_a_hostile_body_on_one_connection_does_not_disturb_the_next_request_on_another(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    for _, data, _, _ in HOSTILE_BODIES[:4]:
        await raw_request(gateway.url, data, timeout_s=RAW_TIMEOUT_S)
    answer = await raw_request(gateway.url, post(VALID), timeout_s=RAW_TIMEOUT_S)
    assert answer.status == 200, answer.raw[:300]
    assert [s.body for s in upstream.calls("create")] == [VALID]


async def test_a_number_with_thousands_of_digits_in_a_keyed_create_is_never_a_500(
    upstream: Upstream, start: GatewayFactory
) -> None:
    """Canonicalising the body for the key's fingerprint must survive what Python's int() refuses."""
    gateway = await writer_gateway(start, upstream)
    body = create_body()[:-1] + b', "big": ' + b"7" * 5000 + b"}"
    answer = await raw_request(
        gateway.url, post(body, "application/json", ("Idempotency-Key", "big-number")), timeout_s=RAW_TIMEOUT_S
    )
    assert answer.status < 500, answer.raw[:300]
    if answer.status != 200:
        assert_json_error_shape(answer)
    else:
        assert upstream.calls("create")[0].body == body


@pytest.mark.parametrize(
    ("name", "body", "content_type"),
    [
        ("a body past the limit", b"{}" + b" " * 70_000, "application/json"),
        ("a JSON object with a field", json.dumps({"id": "batch-1"}).encode(), "application/json"),
        ("form data", b"id=batch-1", "application/x-www-form-urlencoded"),
        ("deeply nested arrays", b"[" * 30_000 + b"]" * 30_000, "application/json"),
    ],
)
async def test_a_hostile_cancel_body_gets_a_json_4xx_and_cancels_nothing(
    name: str, body: bytes, content_type: str, upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    headers: Headers = [("Content-Length", str(len(body))), ("Content-Type", content_type)]
    data = request_bytes("/v2/batches/a:cancel", headers, method="POST", body=body)
    answer = await raw_request(gateway.url, data, timeout_s=RAW_TIMEOUT_S)
    assert_clean_refusal(answer)
    assert_nothing_changed(upstream)


LONE_SURROGATES = [
    # (name, body, the field the answer must name)
    ("in name", b'{"name": "night\\ud800ly", "input_dataset_id": "dataset-1", "model": "command-r"}', "name"),
    ("a low one in model", create_body(model="x").replace(b'"x"', b'"\\udfff"'), "model"),
    ("in another field", create_body()[:-1] + b', "description": "\\udc80"}', "description"),
    ("nested in a list", create_body()[:-1] + b', "meta": {"tags": ["ok", "\\ud83d"]}}', "meta.tags[1]"),
    ("in a key", create_body()[:-1] + b', "\\ud800": 1}', "\\ud800"),
    ("a low before a high", create_body()[:-1] + b', "note": "\\udc00\\ud800"}', "note"),
]


@pytest.mark.parametrize("idempotency_key", [None, "surrogate-1"], ids=["plain", "keyed"])
@pytest.mark.parametrize(("name", "body", "field"), LONE_SURROGATES, ids=[c[0] for c in LONE_SURROGATES])
async def test_a_lone_surrogate_anywhere_in_a_create_body_is_a_400_naming_the_field(
    name: str,
    body: bytes,
    field: str,
    idempotency_key: str | None,
    upstream: Upstream,
    start: GatewayFactory,
    logs: LogCapture,
) -> None:
    gateway = await writer_gateway(start, upstream)
    more = [("Idempotency-Key", idempotency_key)] if idempotency_key else []
    answer = await raw_request(gateway.url, post(body, "application/json", *more), timeout_s=RAW_TIMEOUT_S)
    assert_clean_refusal(answer, 400, "invalid_request")
    assert field in answer.document["message"], answer.document["message"]
    assert_nothing_changed(upstream)
    assert not [e for e in logs.events() if e["level"] == "error"]


async def test_a_valid_surrogate_pair_in_a_create_body_is_forwarded_as_sent(
    upstream: Upstream, start: GatewayFactory
) -> None:
    gateway = await writer_gateway(start, upstream)
    body = create_body()[:-1] + b', "note": "\\ud83d\\ude00"}'
    answer = await raw_request(gateway.url, post(body, "application/json", ("Idempotency-Key", "pair-1")))
    assert answer.status == 200, answer.raw[:300]
    assert upstream.calls("create")[0].body == body
