"""Hostile inputs: paths, request lines, headers and caller identities that must not get through.

Every case is sent over a raw socket (a client library would normalise most
of them) to a real gateway in front of the simulator, and asserts three
things: the exact answer (status and JSON ``code``), what reached the
upstream (usually nothing), and that no secret is in the answer. The
``logs`` fixture (pulled in by ``start``) checks every log line for secrets.
"""

from __future__ import annotations

import base64
from urllib.parse import urlsplit

import pytest

from gateway.demo.simulator import Simulator
from gateway.edge.server import RunningGateway
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    Answer,
    assert_no_secrets,
    http,
    make_config,
    parse_response,
    pipelined,
    raw_request,
    request_bytes,
    send_raw,
    sha256_hex,
)

RAW_TIMEOUT_S = 10.0  # bound on each read from the gateway


def assert_upstream_saw_only(simulator: Simulator, batch_id: str | None, caller: str = "billing-service") -> None:
    """The upstream got exactly one clean request for ``batch_id``, or none at all."""
    if batch_id is None:
        assert simulator.calls == 0, [seen.path for seen in simulator.seen]
        return
    assert simulator.calls == 1
    seen = simulator.seen[-1]
    assert seen.method == "GET"
    assert seen.path == f"/v2/batches/{batch_id}"
    assert seen.query == ""
    assert seen.headers.getall("Authorization") == [f"Bearer {UPSTREAM_TOKEN}"]
    assert seen.headers.getall("X-Client-Name") == [caller]
    for name in ("Cookie", "Proxy-Authorization", "X-Api-Key", "X-Forwarded-For", "Forwarded", "X-Evil"):
        assert name not in seen.headers, name
    assert "evil" not in seen.headers.get("Host", "")


def assert_sane_request_id(request_id: str | None) -> None:
    """A request id a caller's header could not have bent: present, one line, bounded."""
    assert request_id is not None
    assert "\r" not in request_id
    assert len(request_id) <= 128


# ---------------------------------------------------------------------------
# Paths and ids
# ---------------------------------------------------------------------------

PATHS = [
    # (request target, status, code, id the upstream is asked for)
    ("/v2/batches/batch-1", 200, None, "batch-1"),
    ("/v2/batches/%62atch-1", 200, None, "batch-1"),
    ("/v2/batches/batch%2D1", 200, None, "batch-1"),
    ("/v2/batches/batch%2d1", 200, None, "batch-1"),
    ("/v2/batches/%62%61%74%63%68%2d%31", 200, None, "batch-1"),
    ("/v2/batches/batch%252D1", 400, "invalid_batch_id", None),
    ("/v2/batches/batch%25252D1", 400, "invalid_batch_id", None),
    # Dot segments are not resolved: they stay part of the path, and never match as an id.
    ("/v2/batches/./batch-1", 404, "route_not_found", None),
    ("/v2/batches/../batches/batch-1", 404, "route_not_found", None),
    ("/v2/batches/..", 400, "invalid_batch_id", None),
    ("/v2/batches/.", 400, "invalid_batch_id", None),
    ("/v2/batches/%2e%2e", 400, "invalid_batch_id", None),
    ("/v2/batches/%2E", 400, "invalid_batch_id", None),
    ("/v2/batches/batch-1/../../../etc/passwd", 404, "route_not_found", None),
    ("/v2/batches/..%2f..%2fadmin", 400, "invalid_batch_id", None),
    ("/v2/batches/a%2Fb", 400, "invalid_batch_id", None),
    ("/v2/batches/a%2fb", 400, "invalid_batch_id", None),
    ("/v2/batches/a%252Fb", 400, "invalid_batch_id", None),
    ("/v2/batches/a%5Cb", 400, "invalid_batch_id", None),
    ("/v2/batches/a\\b", 400, "invalid_batch_id", None),
    ("/v2/batches/batch-1%00", 400, "invalid_batch_id", None),
    ("/v2/batches/%00", 400, "invalid_batch_id", None),
    ("/v2/batches/batch-1%0d%0aX-Evil:%20yes", 400, "invalid_batch_id", None),
    ("/v2/batches/batch-1%20", 400, "invalid_batch_id", None),
    ("/v2/batches/%20batch-1", 400, "invalid_batch_id", None),
    ("/v2/batches/" + "a" * 128, 200, None, "a" * 128),
    ("/v2/batches/" + "a" * 129, 400, "invalid_batch_id", None),
    ("/v2/batches/" + "a" * 8000, 400, "invalid_batch_id", None),
    ("/v2/batches/" + "a" * 9000, 431, "request_too_large", None),
    ("/v2/batches/b%C3%A4tch", 400, "invalid_batch_id", None),
    ("/v2/batches/%EF%BC%A1", 400, "invalid_batch_id", None),
    ("/v2/batches/%FF%FE", 400, "invalid_batch_id", None),
    # Raw (unencoded) non-ASCII bytes in the request target are not valid HTTP.
    ("/v2/batches/b\u00e4tch".encode(), 400, "malformed_request", None),
    ("/v2/batches/batch-1/", 404, "route_not_found", None),
    ("/v2/batches/batch-1//", 404, "route_not_found", None),
    ("/v2/batches//batch-1", 404, "route_not_found", None),
    ("/v2//batches/batch-1", 404, "route_not_found", None),
    ("//v2/batches/batch-1", 404, "route_not_found", None),
    ("/V2/batches/batch-1", 404, "route_not_found", None),
    ("/v2/Batches/batch-1", 404, "route_not_found", None),
    ("/V2/BATCHES/batch-1", 404, "route_not_found", None),
    ("/v2/batches/batch-1.css", 400, "invalid_batch_id", None),
    ("/v2/batches/batch-1.json", 400, "invalid_batch_id", None),
    # The path of the cancel resource: POST alone is allowed there (docs/design.md §8).
    ("/v2/batches/batch-1:cancel", 405, "method_not_allowed", None),
    ("/v2/batches/batch-1%3Acancel", 400, "invalid_batch_id", None),
    ("/v2/batches/batch-1;cancel", 400, "invalid_batch_id", None),
    ("/v2/batches/batch-1/cancel", 404, "route_not_found", None),
    ("/v2/batches/-batch", 400, "invalid_batch_id", None),
    ("/v2/batches/_batch", 400, "invalid_batch_id", None),
    ("/v2/batches/", 404, "route_not_found", None),
    # The list route takes three known parameters; anything else is refused before the upstream.
    ("/v2/batches?id=batch-1", 400, "invalid_request", None),
    ("/v1/batches/batch-1", 404, "route_not_found", None),
    ("/v2/datasets/batch-1", 404, "route_not_found", None),
    ("/v2/batches/batch-1?x=1", 200, None, "batch-1"),
    ("/v2/batches/batch-1?id=../../admin&api_key=x&path=/v2/datasets", 200, None, "batch-1"),
    ("/v2/batches/batch-1?%00=%00", 200, None, "batch-1"),
    ("/v2/batches/batch-1#fragment", 200, None, "batch-1"),
]


@pytest.mark.parametrize(("target", "status", "code", "upstream_id"), PATHS)
async def test_paths_and_ids_reach_the_upstream_only_as_a_valid_batch_id(
    simulator: Simulator,
    start: GatewayFactory,
    target: str | bytes,
    status: int,
    code: str | None,
    upstream_id: str | None,
) -> None:
    gateway = await start(make_config(simulator.url))
    response = await raw_request(gateway.url, request_bytes(target), timeout_s=RAW_TIMEOUT_S)
    assert response.status == status, response.raw[:300]
    if code is None:
        assert response.json["batch"]["id"] == upstream_id
        assert response.header("Content-Type") == "application/json"
    else:
        assert response.code == code
    assert_upstream_saw_only(simulator, upstream_id)


# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------

METHODS = [
    # (method, target, status, code)
    ("POST", "/v2/batches/batch-1", 405, "method_not_allowed"),
    ("PUT", "/v2/batches/batch-1", 405, "method_not_allowed"),
    ("PATCH", "/v2/batches/batch-1", 405, "method_not_allowed"),
    ("DELETE", "/v2/batches/batch-1", 405, "method_not_allowed"),
    ("OPTIONS", "/v2/batches/batch-1", 405, "method_not_allowed"),
    ("TRACE", "/v2/batches/batch-1", 405, "method_not_allowed"),
    ("PROPFIND", "/v2/batches/batch-1", 405, "method_not_allowed"),
    ("get", "/v2/batches/batch-1", 400, "malformed_request"),
    # Create and cancel exist, but this caller has the default permissions (retrieve, list).
    ("POST", "/v2/batches/batch-1:cancel", 403, "operation_not_allowed"),
    ("POST", "/v2/batches", 403, "operation_not_allowed"),
    ("DELETE", "/v2/batches", 405, "method_not_allowed"),
    ("PUT", "/v2/batches/batch-1:cancel", 405, "method_not_allowed"),
    ("POST", "/healthz", 405, "method_not_allowed"),
]
# The Allow header of each route's 405.
ALLOWED = {"/v2/batches": "GET, HEAD, POST", "/v2/batches/batch-1:cancel": "POST"}


@pytest.mark.parametrize(("method", "target", "status", "code"), METHODS)
async def test_methods_the_route_does_not_serve_are_refused_without_an_upstream_call(
    simulator: Simulator, start: GatewayFactory, method: str, target: str, status: int, code: str
) -> None:
    gateway = await start(make_config(simulator.url))
    body = b'{"input_dataset_id": "x"}'
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    response = await raw_request(
        gateway.url, request_bytes(target, headers, method=method, body=body), timeout_s=RAW_TIMEOUT_S
    )
    assert response.status == status, response.raw[:300]
    assert response.code == code
    if status == 405:
        assert response.header("Allow") == ALLOWED.get(target, "GET, HEAD")
    assert_upstream_saw_only(simulator, None)


async def test_head_without_a_key_on_the_batch_route_is_refused_without_an_upstream_call(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    raw = await send_raw(gateway.url, request_bytes(method="HEAD", key=None), read_all=False, timeout_s=RAW_TIMEOUT_S)
    response = parse_response(raw)
    assert response.status == 401
    assert_no_secrets(raw)
    assert_upstream_saw_only(simulator, None)


# ---------------------------------------------------------------------------
# Request lines, Host and framing
# ---------------------------------------------------------------------------


def _framing_cases(simulator_host: str) -> list[tuple[str, bytes, int, str | None, str | None]]:
    ok = "batch-1"
    key = b"Authorization: Bearer " + BILLING_KEY.encode() + b"\r\n"
    return [
        # (name, raw request, status, code, id the upstream is asked for)
        ("host header is ignored", request_bytes(host="evil.example"), 200, None, ok),
        ("host with userinfo", request_bytes(host="user:pw@evil.example"), 200, None, ok),
        ("host naming the upstream", request_bytes(host=simulator_host), 200, None, ok),
        # RFC 9112 3.2: an HTTP/1.1 request without Host gets a 400.
        ("no host in HTTP/1.1", request_bytes(host=None), 400, "malformed_request", None),
        ("HTTP/1.0 without host", request_bytes(host=None, version="HTTP/1.0"), 200, None, ok),
        (
            "two host headers",
            request_bytes(headers=[("Host", "evil.example")]),
            400,
            "malformed_request",
            None,
        ),
        (
            "absolute-form target",
            request_bytes("http://evil.example/v2/batches/batch-1"),
            200,
            None,
            ok,
        ),
        (
            "absolute-form with userinfo",
            request_bytes("http://user:pw@evil.example/v2/batches/batch-1"),
            200,
            None,
            ok,
        ),
        (
            "absolute-form naming the upstream with another path",
            request_bytes(f"http://{simulator_host}/v2/datasets/batch-1"),
            404,
            "route_not_found",
            None,
        ),
        ("asterisk-form", request_bytes("*", method="OPTIONS"), 404, "route_not_found", None),
        (
            "authority-form CONNECT",
            request_bytes(simulator_host, method="CONNECT"),
            404,
            "route_not_found",
            None,
        ),
        # A request line without a version (HTTP/0.9) is not HTTP/1.x: the parser must not
        # go on to read headers from it (a front proxy would not), so it gets a 400.
        ("HTTP/0.9 request line", b"GET /v2/batches/batch-1\r\n\r\n", 400, "malformed_request", None),
        (
            "request line without a version, then headers",
            b"GET /v2/batches/batch-1\r\nHost: x\r\n" + key + b"\r\n",
            400,
            "malformed_request",
            None,
        ),
        ("unknown HTTP version", request_bytes(version="HTTP/3.7"), 400, "malformed_request", None),
        ("garbage version", request_bytes(version="HTTX/1.1"), 400, "malformed_request", None),
        ("no target", b"GET  HTTP/1.1\r\nHost: x\r\n" + key + b"\r\n", 400, "malformed_request", None),
        ("LF only line endings", request_bytes().replace(b"\r\n", b"\n"), 400, "malformed_request", None),
        (
            "Content-Length and Transfer-Encoding together",
            request_bytes(headers=[("Content-Length", "5"), ("Transfer-Encoding", "chunked")], body=b"0\r\n\r\n"),
            400,
            "malformed_request",
            None,
        ),
        (
            "two different Content-Length headers",
            request_bytes(headers=[("Content-Length", "0"), ("Content-Length", "5")], body=b"hello"),
            400,
            "malformed_request",
            None,
        ),
        (
            "negative Content-Length",
            request_bytes(headers=[("Content-Length", "-1")]),
            400,
            "malformed_request",
            None,
        ),
        (
            "non-numeric Content-Length",
            request_bytes(headers=[("Content-Length", "5x")]),
            400,
            "malformed_request",
            None,
        ),
        (
            "Transfer-Encoding the gateway does not speak",
            request_bytes(headers=[("Transfer-Encoding", "gzip, chunked, identity")]),
            400,
            "malformed_request",
            None,
        ),
        (
            "obfuscated Transfer-Encoding",
            request_bytes(headers=[("Transfer-Encoding", "xchunked")]),
            400,
            "malformed_request",
            None,
        ),
        (
            "body larger than server.max_body_bytes",
            request_bytes(headers=[("Content-Length", "100000")], body=b"x" * 100000),
            413,
            "request_too_large",
            None,
        ),
        (
            "small body on a GET is ignored",
            request_bytes(headers=[("Content-Length", "5")], body=b"hello"),
            200,
            None,
            ok,
        ),
    ]


FRAMING_NAMES = [case[0] for case in _framing_cases("127.0.0.1:1")]


@pytest.mark.parametrize("name", FRAMING_NAMES)
async def test_request_lines_hosts_and_framing_cannot_redirect_or_smuggle(
    simulator: Simulator, start: GatewayFactory, name: str
) -> None:
    gateway = await start(make_config(simulator.url))
    simulator_host = urlsplit(simulator.url).netloc
    _, data, status, code, upstream_id = next(c for c in _framing_cases(simulator_host) if c[0] == name)
    response = await raw_request(gateway.url, data, timeout_s=RAW_TIMEOUT_S)
    assert response.status == status, response.raw[:300]
    if code is not None:
        assert response.code == code
    assert_upstream_saw_only(simulator, upstream_id)
    if upstream_id is not None:
        assert simulator.seen[-1].headers["Host"] == simulator_host


async def test_a_request_smuggled_behind_a_chunked_body_is_parsed_as_its_own_unauthenticated_request(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    smuggled = b"GET /v2/batches/smuggled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    first = request_bytes(headers=[("Transfer-Encoding", "chunked")], close=False, body=b"0\r\n\r\n")
    raw = await send_raw(gateway.url, first + smuggled, timeout_s=RAW_TIMEOUT_S)
    assert_no_secrets(raw)
    assert raw.count(b"HTTP/1.1 ") == 2
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 401 " in raw
    assert "smuggled" not in simulator.calls_by_id
    assert simulator.calls == 1


# ---------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------

HEADERS = [
    # (name, headers beside a valid key, status, code, upstream asked for batch-1)
    ("oversized header", [("X-Big", "a" * 9000)], 431, "request_too_large", False),
    ("oversized header name", [("X-" + "a" * 9000, "1")], 431, "request_too_large", False),
    ("too many headers", [(f"X-H-{i}", "1") for i in range(100)], 431, "request_too_large", False),
    ("header without a colon", [b"NoColonHere"], 400, "malformed_request", False),
    (
        "Authorization without a colon",
        [b"Authorization Bearer " + BILLING_KEY.encode()],
        400,
        "malformed_request",
        False,
    ),
    ("space in a header name", [("Bad Name", "x")], 400, "malformed_request", False),
    ("space before the colon", [(b"X-Client-Name ", b"reporting")], 400, "malformed_request", False),
    ("obsolete line folding", [(b"X-Note", b"a\r\n folded")], 400, "malformed_request", False),
    ("NUL in a header value", [(b"X-Note", b"a\x00b")], 400, "malformed_request", False),
    ("CR in a header value", [(b"X-Note", b"a\rb")], 400, "malformed_request", False),
    ("control character in a header name", [(b"X-\x01Note", b"x")], 400, "malformed_request", False),
    ("UTF-8 header value", [("X-Note", "h\u00e9llo \u2603")], 200, None, True),
    ("latin-1 header value", [(b"X-Note", b"caf\xe9")], 200, None, True),
    ("empty header value", [("X-Note", "")], 200, None, True),
    ("spoofed X-Client-Name", [("X-Client-Name", "reporting")], 200, None, True),
    ("two X-Client-Name", [("X-Client-Name", "reporting"), ("X-Client-Name", "admin")], 200, None, True),
    (
        "caller credentials and proxies",
        [
            ("Cookie", f"session={REPORTING_KEY}"),
            ("Proxy-Authorization", f"Bearer {REPORTING_KEY}"),
            ("X-Api-Key", REPORTING_KEY),
            ("X-Forwarded-For", "10.0.0.1"),
            ("Forwarded", "for=10.0.0.1;host=evil.example"),
            ("X-Evil", "1"),
        ],
        200,
        None,
        True,
    ),
    ("X-Request-ID with CRLF-like text", [("X-Request-ID", "abc%0d%0aX-Evil: 1")], 200, None, True),
    ("oversized X-Request-ID", [("X-Request-ID", "r" * 5000)], 200, None, True),
    ("two X-Request-ID", [("X-Request-ID", "one"), ("X-Request-ID", "two")], 200, None, True),
]


@pytest.mark.parametrize(
    ("name", "headers", "status", "code", "reaches_upstream"), HEADERS, ids=[h[0] for h in HEADERS]
)
async def test_duplicated_oversized_and_malformed_headers_get_a_clean_answer(
    simulator: Simulator,
    start: GatewayFactory,
    name: str,
    headers: list[tuple[str | bytes, str | bytes] | bytes],
    status: int,
    code: str | None,
    reaches_upstream: bool,
) -> None:
    gateway = await start(make_config(simulator.url))
    response = await raw_request(gateway.url, request_bytes(headers=headers), timeout_s=RAW_TIMEOUT_S)
    assert response.status == status, response.raw[:300]
    if code is not None:
        assert response.code == code
        assert response.header("Content-Type") == "application/json"
    assert_upstream_saw_only(simulator, "batch-1" if reaches_upstream else None)
    request_id = response.header("X-Request-ID")
    assert request_id is not None
    if reaches_upstream:
        assert simulator.seen[-1].headers.getall("X-Request-ID") == [request_id]
        assert_sane_request_id(request_id)


# ---------------------------------------------------------------------------
# Caller identity
# ---------------------------------------------------------------------------


def _basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


IDENTITIES: list[tuple[str, list[tuple[str | bytes, str | bytes]], str, int, str | None]] = [
    # (name, headers, query, status, caller the upstream sees)
    ("billing key", [("Authorization", f"Bearer {BILLING_KEY}")], "", 200, "billing-service"),
    ("reporting key (stored as sha256)", [("Authorization", f"Bearer {REPORTING_KEY}")], "", 200, "reporting"),
    # RFC 7235: the auth scheme is case-insensitive; the key itself is not.
    ("lowercase scheme", [("Authorization", f"bearer {BILLING_KEY}")], "", 200, "billing-service"),
    ("uppercase scheme", [("Authorization", f"BEARER {BILLING_KEY}")], "", 200, "billing-service"),
    ("extra spaces around the key", [("Authorization", f"Bearer   {BILLING_KEY}  ")], "", 200, "billing-service"),
    ("no Authorization", [], "", 401, None),
    ("key in the query string", [], f"?api_key={BILLING_KEY}", 401, None),
    ("access_token in the query string", [], f"?access_token={BILLING_KEY}", 401, None),
    ("key without a scheme", [("Authorization", BILLING_KEY)], "", 401, None),
    ("Basic with the key as user", [("Authorization", _basic(BILLING_KEY))], "", 401, None),
    ("Basic with the key as password", [("Authorization", _basic("billing-service", BILLING_KEY))], "", 401, None),
    ("Basic with the raw key", [("Authorization", f"Basic {BILLING_KEY}")], "", 401, None),
    ("Token scheme", [("Authorization", f"Token {BILLING_KEY}")], "", 401, None),
    ("Bearer with a tab", [("Authorization", f"Bearer\t{BILLING_KEY}")], "", 401, None),
    ("Bearer glued to the key", [("Authorization", f"Bearer{BILLING_KEY}")], "", 401, None),
    ("empty bearer", [("Authorization", "Bearer ")], "", 401, None),
    ("bare scheme", [("Authorization", "Bearer")], "", 401, None),
    ("empty Authorization", [("Authorization", "")], "", 401, None),
    ("key with trailing junk", [("Authorization", f"Bearer {BILLING_KEY}x")], "", 401, None),
    ("key and a second word", [("Authorization", f"Bearer {BILLING_KEY} extra")], "", 401, None),
    ("key and a comma", [("Authorization", f"Bearer {BILLING_KEY},")], "", 401, None),
    (
        "two credentials in one header",
        [("Authorization", f"Bearer {BILLING_KEY}, Bearer {REPORTING_KEY}")],
        "",
        401,
        None,
    ),
    ("truncated key", [("Authorization", f"Bearer {BILLING_KEY[:-1]}")], "", 401, None),
    ("key prefix", [("Authorization", f"Bearer {BILLING_KEY[:8]}")], "", 401, None),
    ("key in another case", [("Authorization", f"Bearer {BILLING_KEY.upper()}")], "", 401, None),
    ("quoted key", [("Authorization", f'Bearer "{BILLING_KEY}"')], "", 401, None),
    ("percent-encoded key", [("Authorization", "Bearer " + BILLING_KEY.replace("-", "%2D"))], "", 401, None),
    (
        "base64 of the key",
        [("Authorization", "Bearer " + base64.b64encode(BILLING_KEY.encode()).decode())],
        "",
        401,
        None,
    ),
    ("the upstream token", [("Authorization", f"Bearer {UPSTREAM_TOKEN}")], "", 401, None),
    ("the configured sha256 as key", [("Authorization", f"Bearer {sha256_hex(REPORTING_KEY)}")], "", 401, None),
    ("sha256 of a clear key", [("Authorization", f"Bearer {sha256_hex(BILLING_KEY)}")], "", 401, None),
    ("the caller name as key", [("Authorization", "Bearer billing-service")], "", 401, None),
    (
        "two Authorization headers, both valid",
        [("Authorization", f"Bearer {BILLING_KEY}"), ("Authorization", f"Bearer {BILLING_KEY}")],
        "",
        401,
        None,
    ),
    (
        "two Authorization headers, two callers",
        [("Authorization", f"Bearer {BILLING_KEY}"), ("Authorization", f"Bearer {REPORTING_KEY}")],
        "",
        401,
        None,
    ),
    (
        "a bad then a valid Authorization",
        [("Authorization", "Bearer nope"), ("authorization", f"Bearer {BILLING_KEY}")],
        "",
        401,
        None,
    ),
    ("non-ASCII key", [("Authorization", "Bearer b\u00efllingcallerkey7a1e5b")], "", 401, None),
    ("non-UTF-8 key", [(b"Authorization", b"Bearer " + BILLING_KEY.encode() + b"\xff")], "", 401, None),
    # HTTP trims only SP and HTAB around a value (RFC 9110 5.5): other space-like characters are part of it.
    ("key and a no-break space", [(b"Authorization", b"Bearer " + BILLING_KEY.encode() + b"\xc2\xa0")], "", 401, None),
    (
        "key and a line separator",
        [(b"Authorization", b"Bearer " + BILLING_KEY.encode() + b"\xe2\x80\xa8")],
        "",
        401,
        None,
    ),
    ("no-break space as separator", [(b"Authorization", b"Bearer\xc2\xa0" + BILLING_KEY.encode())], "", 401, None),
    ("key in X-Api-Key", [("X-Api-Key", BILLING_KEY)], "", 401, None),
    ("key in a cookie", [("Cookie", f"api_key={BILLING_KEY}")], "", 401, None),
    ("key in Proxy-Authorization", [("Proxy-Authorization", f"Bearer {BILLING_KEY}")], "", 401, None),
    ("X-Client-Name alone", [("X-Client-Name", "billing-service")], "", 401, None),
    ("X-Forwarded-User alone", [("X-Forwarded-User", "billing-service")], "", 401, None),
    (
        "X-Client-Name with a bad key",
        [("Authorization", "Bearer wrong-key-but-long-enough"), ("X-Client-Name", "billing-service")],
        "",
        401,
        None,
    ),
    (
        "reporting key claiming billing's name",
        [("Authorization", f"Bearer {REPORTING_KEY}"), ("X-Client-Name", "billing-service")],
        "",
        200,
        "reporting",
    ),
]


@pytest.mark.parametrize(("name", "headers", "query", "status", "caller"), IDENTITIES, ids=[i[0] for i in IDENTITIES])
async def test_only_a_valid_key_reaches_the_upstream_and_only_under_its_own_name(
    simulator: Simulator,
    start: GatewayFactory,
    name: str,
    headers: list[tuple[str | bytes, str | bytes]],
    query: str,
    status: int,
    caller: str | None,
) -> None:
    gateway = await start(make_config(simulator.url))
    response = await raw_request(
        gateway.url, request_bytes("/v2/batches/batch-1" + query, headers, key=None), timeout_s=RAW_TIMEOUT_S
    )
    assert response.status == status, response.raw[:300]
    if status == 401:
        assert response.code == "unauthorized"
        assert_upstream_saw_only(simulator, None)
    else:
        assert caller is not None
        assert_upstream_saw_only(simulator, "batch-1", caller)


async def test_an_unknown_key_is_refused_before_the_id_is_even_looked_at(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    for target in ("/v2/batches/batch-1", "/v2/batches/..%2fadmin", "/v2/batches/missing-1"):
        response = await raw_request(
            gateway.url, request_bytes(target, key="not-a-key-at-all-123"), timeout_s=RAW_TIMEOUT_S
        )
        assert (response.status, response.code) == (401, "unauthorized")
    assert_upstream_saw_only(simulator, None)


async def test_error_answers_never_echo_what_the_caller_sent_as_a_key(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    probe = "probe-key-that-must-not-echo-0123456789"
    for headers in (
        [("Authorization", f"Bearer {probe}")],
        [("Authorization", f"Basic {probe}")],
        [("Authorization", f"Bearer {probe}"), ("Authorization", f"Bearer {probe}")],
        [("Authorization", f"Bearer {probe}"), ("X-Big", "a" * 9000)],
    ):
        response = await raw_request(gateway.url, request_bytes(headers=headers, key=None), timeout_s=RAW_TIMEOUT_S)
        assert response.status in (401, 431)
        assert probe.encode() not in response.raw


# ---------------------------------------------------------------------------
# The same cases with batch-1 fresh in the cache
#
# A plain fresh hit is answered as soon as its request is parsed, before
# aiohttp's Application (gateway/edge/inline.py). Each case is sent again on a
# kept-alive connection (where that can happen) after batch-1 was fetched
# once: it must get the answer it gets uncached, and cause no other call.
# ---------------------------------------------------------------------------


async def cached_gateway(simulator: Simulator, start: GatewayFactory) -> RunningGateway:
    """A gateway in front of the simulator that holds a fresh batch-1."""
    gateway = await start(make_config(simulator.url))
    warm = await http(f"{gateway.url}/v2/batches/batch-1")
    assert (warm.status, warm.header("X-Cache"), simulator.calls) == (200, "MISS", 1)
    return gateway


async def kept_alive_request(gateway: RunningGateway, data: bytes) -> Answer:
    [answer] = await pipelined(gateway.url, data, 1, timeout_s=RAW_TIMEOUT_S)
    return answer


@pytest.mark.parametrize(("target", "status", "code", "upstream_id"), PATHS)
async def test_paths_and_ids_get_the_same_answer_when_batch_1_is_cached(
    simulator: Simulator,
    start: GatewayFactory,
    target: str | bytes,
    status: int,
    code: str | None,
    upstream_id: str | None,
) -> None:
    gateway = await cached_gateway(simulator, start)
    response = await kept_alive_request(gateway, request_bytes(target, close=False))
    assert response.status == status, response.raw[:300]
    if code is None:
        assert response.json["batch"]["id"] == upstream_id
        assert response.header("X-Cache") == ("HIT" if upstream_id == "batch-1" else "MISS")
    else:
        assert response.code == code
    assert simulator.calls == (1 if upstream_id in (None, "batch-1") else 2)


@pytest.mark.parametrize(
    ("name", "headers", "status", "code", "reaches_upstream"), HEADERS, ids=[h[0] for h in HEADERS]
)
async def test_headers_get_the_same_answer_when_batch_1_is_cached(
    simulator: Simulator,
    start: GatewayFactory,
    name: str,
    headers: list[tuple[str | bytes, str | bytes] | bytes],
    status: int,
    code: str | None,
    reaches_upstream: bool,
) -> None:
    gateway = await cached_gateway(simulator, start)
    response = await kept_alive_request(gateway, request_bytes(headers=headers, close=False))
    assert response.status == status, response.raw[:300]
    if code is not None:
        assert response.code == code
    else:
        assert response.header("X-Cache") == "HIT"
    assert_sane_request_id(response.header("X-Request-ID"))
    assert simulator.calls == 1


@pytest.mark.parametrize(("name", "headers", "query", "status", "caller"), IDENTITIES, ids=[i[0] for i in IDENTITIES])
async def test_only_a_valid_key_gets_a_cached_batch(
    simulator: Simulator,
    start: GatewayFactory,
    name: str,
    headers: list[tuple[str | bytes, str | bytes]],
    query: str,
    status: int,
    caller: str | None,
) -> None:
    gateway = await cached_gateway(simulator, start)
    response = await kept_alive_request(
        gateway, request_bytes("/v2/batches/batch-1" + query, headers, key=None, close=False)
    )
    assert response.status == status, response.raw[:300]
    if status == 401:
        assert response.code == "unauthorized"
    else:
        assert (response.header("X-Cache"), response.json["batch"]["id"]) == ("HIT", "batch-1")
    assert simulator.calls == 1
