"""The pure decisions: batch ids, TTL choice, upstream answers, Retry-After, caller keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway import errors
from gateway.api.auth import Caller, CallerDirectory
from gateway.config import CallerSettings, RateLimit
from gateway.upstream.cohere import (
    MAX_UPSTREAM_MESSAGE,
    Lifetime,
    error_for_status,
    lifetime_of_status,
    parse_batch_body,
    parse_batch_id,
    parse_retry_after,
    upstream_message,
)
from tests.support import BILLING_KEY, REPORTING_KEY, sha256_hex

# --- batch ids ---------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_id",
    [
        "a",
        "7",
        "batch-1",
        "batch_1",
        "A" * 128,
        "0-_-_",
        "8f2b6c1e-1c57-4a4b-9f0e-2d3f4a5b6c7d",
    ],
)
def test_well_formed_batch_ids_are_accepted_unchanged(batch_id: str) -> None:
    assert parse_batch_id(batch_id) == batch_id


@pytest.mark.parametrize(
    "batch_id",
    [
        "",
        "-batch",
        "_batch",
        "A" * 129,
        "..",
        ".",
        "a.b",
        "a/b",
        "../jobs",
        "%2e%2e",
        "a%2Fb",
        "a\x00b",
        "a\r\nX-Injected: 1",
        "a\n",
        "a ",
        " a",
        "batch?x=1",
        "batch#frag",
        "bätch",
        "batch\u0661",  # an Arabic-Indic digit: a digit to str.isdigit, not to the contract
        "\uff41bc",  # a fullwidth "a"
        "a:cancel",
    ],
)
def test_malformed_batch_ids_are_refused_with_invalid_batch_id(batch_id: str) -> None:
    with pytest.raises(errors.InvalidBatchId) as raised:
        parse_batch_id(batch_id)
    assert raised.value.status == 400
    assert raised.value.code == "invalid_batch_id"


# --- TTL choice from a status -------------------------------------------------


@pytest.mark.parametrize(
    ("status", "lifetime"),
    [
        ("BATCH_STATUS_COMPLETED", Lifetime.TERMINAL),
        ("BATCH_STATUS_FAILED", Lifetime.TERMINAL),
        ("BATCH_STATUS_CANCELED", Lifetime.TERMINAL),
        ("BATCH_STATUS_QUEUED", Lifetime.ACTIVE),
        ("BATCH_STATUS_IN_PROGRESS", Lifetime.ACTIVE),
        ("BATCH_STATUS_CANCELING", Lifetime.ACTIVE),
        ("BATCH_STATUS_UNSPECIFIED", Lifetime.ACTIVE),
        ("BATCH_STATUS_SOMETHING_NEW", Lifetime.ACTIVE),
        ("batch_status_completed", Lifetime.ACTIVE),
        ("", Lifetime.ACTIVE),
        (None, Lifetime.ACTIVE),
        (3, Lifetime.ACTIVE),
        (["BATCH_STATUS_COMPLETED"], Lifetime.ACTIVE),
    ],
)
def test_only_terminal_statuses_get_the_terminal_ttl(status: object, lifetime: Lifetime) -> None:
    assert lifetime_of_status(status) is lifetime


@pytest.mark.parametrize(
    ("body", "lifetime"),
    [
        (b'{"batch": {"id": "b", "status": "BATCH_STATUS_COMPLETED"}}', Lifetime.TERMINAL),
        (b'{"batch": {"id": "b", "status": "BATCH_STATUS_IN_PROGRESS"}}', Lifetime.ACTIVE),
        (b'{"batch": {"id": "b"}}', Lifetime.ACTIVE),
        (b'{"batch": {}, "extra": 1}', Lifetime.ACTIVE),
        (b'{"batch": {"status": ["BATCH_STATUS_COMPLETED"]}}', Lifetime.ACTIVE),
        (b'{"batch": {"status": {"BATCH_STATUS_COMPLETED": 1}}}', Lifetime.ACTIVE),
        ('{"batch": {"name": "caf\u00e9", "status": "BATCH_STATUS_FAILED"}}'.encode(), Lifetime.TERMINAL),
    ],
)
def test_a_batch_body_gets_its_lifetime_from_its_status(body: bytes, lifetime: Lifetime) -> None:
    assert parse_batch_body(body) is lifetime


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"<html>maintenance</html>",
        b"\xff\xfe\x00",
        b"[]",
        b'"batch"',
        b"null",
        b"42",
        b"{}",
        b'{"batch": null}',
        b'{"batch": "b"}',
        b'{"batch": ["b"]}',
        b'{"data": {"id": "b"}}',
        b'{"batch": {"id": "b"}',
        b"[" * 100_000,  # nesting deep enough to exhaust the parser's recursion
        b'{"batch": ' * 50_000,
    ],
)
def test_a_200_body_without_a_batch_object_is_an_invalid_response(body: bytes) -> None:
    with pytest.raises(errors.UpstreamInvalidResponse) as raised:
        parse_batch_body(body)
    assert (raised.value.status, raised.value.code, raised.value.upstream_status) == (
        502,
        "upstream_invalid_response",
        200,
    )


# --- the upstream's error message ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"message": "invalid batch id"}', "invalid batch id"),
        (b'{"message": "  padded  "}', "padded"),
        (b'{"message": ""}', None),
        (b'{"message": "   "}', None),
        (b'{"message": 400}', None),
        (b'{"error": "x"}', None),
        (b'["message"]', None),
        (b"plain text", None),
        (b"", None),
        (b"\xff", None),
        (b"[" * 100_000, None),
        (json.dumps({"message": "x" * 2000}).encode(), "x" * MAX_UPSTREAM_MESSAGE),
    ],
)
def test_the_upstream_message_is_kept_only_when_usable_and_bounded(body: bytes, message: str | None) -> None:
    assert upstream_message(body) == message


# --- Retry-After -----------------------------------------------------------------

NOW = datetime(2026, 1, 15, 9, 30, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 5.0),
        ("0", 0.0),
        ("7", 7.0),
        (" 7 ", 7.0),
        ("120", 120.0),
        ("300", 300.0),
        ("301", 300.0),
        ("999999999999", 300.0),
        ("Thu, 15 Jan 2026 09:30:30 GMT", 30.0),
        ("Thu, 15 Jan 2026 09:29:00 GMT", 0.0),
        ("Fri, 16 Jan 2026 09:30:00 GMT", 300.0),
        ("Thu, 15 Jan 2026 09:30:10 -0000", 10.0),
        ("", 5.0),
        ("soon", 5.0),
        ("-5", 5.0),
        ("1.5", 5.0),
        ("1e3", 5.0),
        ("\u0667", 5.0),  # an Arabic-Indic seven
        ("9" * 13, 5.0),
    ],
)
def test_retry_after_is_read_as_seconds_or_a_date_and_capped(value: str | None, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW, default_s=5.0, max_s=300.0) == seconds


def test_the_default_retry_after_is_capped_too() -> None:
    assert parse_retry_after(None, now=NOW, default_s=600.0, max_s=300.0) == 300.0


# --- mapping an upstream answer onto the error table -----------------------------


@pytest.mark.parametrize(
    ("status", "error_class", "http_status", "code"),
    [
        (400, errors.BadRequest, 400, "bad_request"),
        (404, errors.NotFound, 404, "not_found"),
        (401, errors.UpstreamAuthFailed, 502, "upstream_auth_failed"),
        (403, errors.UpstreamAuthFailed, 502, "upstream_auth_failed"),
        (429, errors.UpstreamRateLimited, 429, "upstream_rate_limited"),
        (503, errors.UpstreamUnavailable, 503, "upstream_unavailable"),
        (500, errors.UpstreamError, 502, "upstream_error"),
        (502, errors.UpstreamError, 502, "upstream_error"),
        (504, errors.UpstreamError, 502, "upstream_error"),
        (599, errors.UpstreamError, 502, "upstream_error"),
        (301, errors.UpstreamError, 502, "upstream_error"),
        (302, errors.UpstreamError, 502, "upstream_error"),
        (304, errors.UpstreamError, 502, "upstream_error"),
        (307, errors.UpstreamError, 502, "upstream_error"),
        (308, errors.UpstreamError, 502, "upstream_error"),
        (201, errors.UpstreamInvalidResponse, 502, "upstream_invalid_response"),
        (204, errors.UpstreamInvalidResponse, 502, "upstream_invalid_response"),
        (402, errors.UpstreamError, 502, "upstream_error"),
        (418, errors.UpstreamError, 502, "upstream_error"),
        (422, errors.UpstreamError, 502, "upstream_error"),
    ],
)
def test_each_upstream_status_maps_to_its_row_of_the_error_table(
    status: int, error_class: type[errors.GatewayError], http_status: int, code: str
) -> None:
    error = error_for_status(status, b'{"message": "upstream says"}', None)
    assert type(error) is error_class
    assert (error.status, error.code, error.upstream_status) == (http_status, code, status)
    body = json.loads(error.body("req-1"))
    assert body == {"message": error.message, "code": code, "request_id": "req-1", "upstream_status": status}


@pytest.mark.parametrize("status", [400, 404])
def test_the_upstream_message_is_kept_for_answers_about_the_batch(status: int) -> None:
    assert error_for_status(status, b'{"message": "bad id format"}', None).message == "bad id format"


@pytest.mark.parametrize("status", [401, 403, 500])
def test_the_upstream_message_is_not_passed_on_for_its_own_failures(status: int) -> None:
    # An auth failure upstream is about the shared token: its wording is not the caller's business.
    assert "token expired" not in error_for_status(status, b'{"message": "token expired"}', None).message


@pytest.mark.parametrize(
    ("status", "retry_after_s", "header"),
    [(429, 7.0, "7"), (429, 0.2, "1"), (429, 0.0, "1"), (503, 2.5, "3"), (503, 300.0, "300")],
)
def test_retry_after_is_whole_seconds_rounded_up_and_never_zero(status: int, retry_after_s: float, header: str) -> None:
    assert error_for_status(status, b"", retry_after_s).headers() == {"Retry-After": header}


@pytest.mark.parametrize("status", [400, 401, 404, 500])
def test_errors_without_a_wait_carry_no_retry_after(status: int) -> None:
    assert "Retry-After" not in error_for_status(status, b"", None).headers()


# --- the error tree matches the contract's table -------------------------------------

CONTRACT_TABLE = [
    (errors.Unauthorized, 401, "unauthorized"),
    (errors.InvalidBatchId, 400, "invalid_batch_id"),
    (errors.RouteNotFound, 404, "route_not_found"),
    (errors.MethodNotAllowed, 405, "method_not_allowed"),
    (errors.RequestTooLarge, 431, "request_too_large"),
    (errors.BodyTooLarge, 413, "request_too_large"),
    (errors.CallerRateLimited, 429, "caller_rate_limited"),
    (errors.BadRequest, 400, "bad_request"),
    (errors.NotFound, 404, "not_found"),
    (errors.UpstreamAuthFailed, 502, "upstream_auth_failed"),
    (errors.UpstreamRateLimited, 429, "upstream_rate_limited"),
    (errors.RateLimited, 429, "rate_limited"),
    (errors.UpstreamUnavailable, 503, "upstream_unavailable"),
    (errors.UpstreamError, 502, "upstream_error"),
    (errors.UpstreamTimeout, 504, "upstream_timeout"),
    (errors.UpstreamUnreachable, 502, "upstream_unreachable"),
    (errors.UpstreamInvalidResponse, 502, "upstream_invalid_response"),
]


@pytest.mark.parametrize(("error_class", "status", "code"), CONTRACT_TABLE)
def test_every_error_renders_the_one_json_shape(error_class: type[errors.GatewayError], status: int, code: str) -> None:
    error = error_class()
    assert (error.status, error.code) == (status, code)
    body = error.body("req-9")
    assert list(json.loads(body)) == ["message", "code", "request_id"]
    assert json.loads(body) == {"message": error.default_message, "code": code, "request_id": "req-9"}


# --- caller keys ------------------------------------------------------------------


def directory() -> CallerDirectory:
    return CallerDirectory(
        [
            CallerSettings(name="billing-service", key=BILLING_KEY),
            CallerSettings(
                name="reporting",
                key_sha256=sha256_hex(REPORTING_KEY).upper(),
                rate_limit=RateLimit(requests_per_s=1, burst=2),
            ),
        ]
    )


@pytest.mark.parametrize(
    ("authorization", "caller"),
    [
        ([f"Bearer {BILLING_KEY}"], Caller("billing-service", None)),
        ([f"bearer {BILLING_KEY}"], Caller("billing-service", None)),
        ([f"BEARER {BILLING_KEY}"], Caller("billing-service", None)),
        ([f"  Bearer   {BILLING_KEY}  "], Caller("billing-service", None)),
        ([f"Bearer {REPORTING_KEY}"], Caller("reporting", RateLimit(requests_per_s=1, burst=2))),
    ],
)
def test_a_known_key_resolves_to_its_caller(authorization: list[str], caller: Caller) -> None:
    assert directory().authenticate(authorization) == caller


@pytest.mark.parametrize(
    "authorization",
    [
        [],
        [""],
        ["Bearer"],
        ["Bearer "],
        [BILLING_KEY],
        [f"Basic {BILLING_KEY}"],
        [f"Token {BILLING_KEY}"],
        [f"Bearer\t{BILLING_KEY}"],
        [f"Bearer {BILLING_KEY}x"],
        [f"Bearer {BILLING_KEY[:-1]}"],
        [f"Bearer {BILLING_KEY.upper()}"],
        [f"Bearer {BILLING_KEY} {BILLING_KEY}"],
        [f"Bearer {sha256_hex(REPORTING_KEY)}"],  # the stored digest is not a key
        ["Bearer ключ-которого-нет"],
        ["Bearer \udcff\udcfe"],  # undecodable header bytes, as aiohttp hands them over
        ["Bearer a\x00b"],
        [f"Bearer {BILLING_KEY}", f"Bearer {BILLING_KEY}"],
        [f"Bearer {BILLING_KEY}", f"Bearer {REPORTING_KEY}"],
        ["Bearer nope", f"Bearer {BILLING_KEY}"],
    ],
)
def test_missing_malformed_doubled_or_unknown_keys_are_unauthorized(authorization: list[str]) -> None:
    with pytest.raises(errors.Unauthorized) as raised:
        directory().authenticate(authorization)
    assert (raised.value.status, raised.value.code) == (401, "unauthorized")
    assert BILLING_KEY not in raised.value.message
    assert REPORTING_KEY not in raised.value.message
