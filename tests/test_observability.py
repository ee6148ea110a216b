"""What operators watch: the Prometheus metrics and the JSON logs.

Metrics are scraped from ``GET /metrics`` and parsed with prometheus-client's
own parser; logs are read as the gateway renders them (the ``logs`` capture
in-process, or the child process's stderr).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import cohere
import pytest
from aiohttp import web
from cohere.core.api_error import ApiError
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load_config, validate
from gateway.demo.simulator import Simulator
from gateway.ops.logs import ACCESS_LOGGER, AccessLog, JsonFormatter, Redactor
from gateway.runtime import reload_config
from tests.conftest import GatewayFactory, ProcessFactory
from tests.support import (
    BILLING_KEY,
    PROCESS_WAIT_S,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    FakeClock,
    LogCapture,
    Samples,
    assert_no_secrets,
    eventually,
    free_port,
    http,
    make_config,
    process_config,
    raw_config,
    raw_request,
    request_bytes,
    sample_value,
    scrape_metrics,
    sdk,
    sha256_hex,
    write_config,
)
from tests.upstream import Upstream, batch_body, json_handler

BATCH_ROUTE = "/v2/batches/{id}"
ACCESS_FIELDS = {
    "time",
    "request_id",
    "caller",
    "method",
    "batch_id",
    "status",
    "cache",
    "upstream_status",
    "upstream_ms",
    "total_ms",
}

# --- metrics ------------------------------------------------------------------------------------


async def test_metrics_count_requests_by_caller_route_status_and_cache(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    await sdk(gateway.url).batches.retrieve("batch-1")
    await sdk(gateway.url).batches.retrieve("batch-1")
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")
    with pytest.raises(cohere.UnauthorizedError):
        await sdk(gateway.url, "not-a-caller-key-at-all").batches.retrieve("batch-1")
    assert (await http(f"{gateway.url}/v2/batches/bad%20id")).status == 400
    assert (await http(f"{gateway.url}/v2/other")).status == 404

    _, samples = await scrape_metrics(gateway.url)

    def requests(caller: str, route: str, status: str, cache: str) -> float:
        return sample_value(samples, "gateway_requests_total", caller=caller, route=route, status=status, cache=cache)

    assert requests("billing-service", BATCH_ROUTE, "200", "MISS") == 1
    assert requests("billing-service", BATCH_ROUTE, "200", "HIT") == 1
    assert requests("reporting", BATCH_ROUTE, "200", "HIT") == 1
    assert requests("-", BATCH_ROUTE, "401", "-") == 1
    assert requests("billing-service", BATCH_ROUTE, "400", "-") == 1
    assert requests("-", "unmatched", "404", "-") == 1
    assert sample_value(samples, "gateway_request_duration_seconds_count", route=BATCH_ROUTE) == 5


async def test_metrics_count_upstream_calls_by_status_and_time_them(upstream: Upstream, start: GatewayFactory) -> None:
    async def fails_for_boom(request: web.Request) -> web.Response:
        if request.path.endswith("/boom"):
            return web.json_response({"message": "down"}, status=500)
        return web.Response(body=batch_body(), content_type="application/json")

    upstream.script(fails_for_boom)
    gateway = await start(make_config(upstream.url, upstream={"retries": 0}))
    await sdk(gateway.url).batches.retrieve("batch-1")
    await sdk(gateway.url).batches.retrieve("batch-2")
    with pytest.raises(ApiError):
        await sdk(gateway.url).batches.retrieve("boom")

    _, samples = await scrape_metrics(gateway.url)

    assert sample_value(samples, "gateway_upstream_calls_total", outcome="200") == 2
    assert sample_value(samples, "gateway_upstream_calls_total", outcome="500") == 1
    assert sample_value(samples, "gateway_upstream_duration_seconds_count") == upstream.count() == 3
    assert sample_value(samples, "gateway_upstream_duration_seconds_bucket", le="+Inf") == 3
    assert sample_value(samples, "gateway_upstream_duration_seconds_sum") > 0


async def test_metrics_report_cache_entries_evictions_and_expiries(simulator: Simulator, start: GatewayFactory) -> None:
    clock = FakeClock()
    gateway = await start(make_config(simulator.url, cache={"max_entries": 2}), clock=clock)
    for batch_id in ("batch-1", "batch-2", "batch-3"):
        await sdk(gateway.url).batches.retrieve(batch_id)

    _, samples = await scrape_metrics(gateway.url)
    assert sample_value(samples, "gateway_cache_entries") == 2
    assert sample_value(samples, "gateway_cache_removals_total", reason="evicted") == 1

    clock.advance(10_000)  # past every entry's ttl and stale_if_error_s
    await sdk(gateway.url).batches.retrieve("batch-4")
    _, samples = await scrape_metrics(gateway.url)
    assert sample_value(samples, "gateway_cache_removals_total", reason="expired") == 2
    assert sample_value(samples, "gateway_cache_entries") == 1


async def wait_for_metric(url: str, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until ``name`` reaches ``expected`` (polled: no event marks a waiter joining)."""
    for _ in range(200):
        _, samples = await scrape_metrics(url)
        if sample_value(samples, name, **labels) == expected:
            return samples
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never reached {expected}")


async def test_metrics_show_single_flight_fetches_in_flight_and_the_requests_that_waited_on_them(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    release = upstream.hold(times=None)
    gateway = await start(make_config(upstream.url))
    waiting = [asyncio.ensure_future(sdk(gateway.url).batches.retrieve("batch-1")) for _ in range(3)]
    await asyncio.wait_for(upstream.arrived.wait(), PROCESS_WAIT_S)

    during = await wait_for_metric(gateway.url, "gateway_singleflight_coalesced_total", 2)
    assert sample_value(during, "gateway_singleflight_inflight") == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(*waiting), PROCESS_WAIT_S)

    _, after = await scrape_metrics(gateway.url)
    assert sample_value(after, "gateway_singleflight_inflight") == 0
    assert sample_value(after, "gateway_upstream_calls_total", outcome="200") == upstream.count() == 1


async def test_metrics_show_the_budget_and_the_breaker(upstream: Upstream, start: GatewayFactory) -> None:
    async def fails_for_boom(request: web.Request) -> web.Response:
        if request.path.endswith("/boom"):
            return web.json_response({"message": "down"}, status=500)
        return web.Response(body=batch_body(), content_type="application/json")

    upstream.script(fails_for_boom)
    clock = FakeClock()  # frozen: the budget never refills during the test
    config = make_config(
        upstream.url,
        upstream={"retries": 0, "rate_limit": {"requests_per_s": 0.001, "burst": 3}, "breaker": {"failures": 1}},
    )
    gateway = await start(config, clock=clock)
    _, fresh = await scrape_metrics(gateway.url)
    assert sample_value(fresh, "gateway_upstream_budget_tokens") == 3
    assert sample_value(fresh, "gateway_breaker_state") == 0

    await sdk(gateway.url).batches.retrieve("batch-1")
    await sdk(gateway.url).batches.retrieve("batch-2")
    with pytest.raises(ApiError):
        await sdk(gateway.url).batches.retrieve("boom")  # the third token; the breaker opens
    with pytest.raises(ApiError):
        await sdk(gateway.url).batches.retrieve("batch-3")  # refused by the open breaker

    _, samples = await scrape_metrics(gateway.url)
    assert sample_value(samples, "gateway_breaker_state") == 1
    assert sample_value(samples, "gateway_upstream_budget_tokens") < 1
    assert sample_value(samples, "gateway_upstream_rejected_total", reason="breaker_open") == 1

    clock.advance(config.upstream.breaker.cooldown_s)  # half-open: one probe, but no budget left for it
    with pytest.raises(ApiError) as refused:
        await sdk(gateway.url).batches.retrieve("batch-4")
    assert refused.value.status_code == 429
    _, samples = await scrape_metrics(gateway.url)
    assert sample_value(samples, "gateway_upstream_rejected_total", reason="budget") == 1


async def test_metrics_count_callers_over_their_own_limit(simulator: Simulator, start: GatewayFactory) -> None:
    raw = raw_config(simulator.url)
    raw["callers"][1]["rate_limit"] = {"requests_per_s": 0.001, "burst": 1}
    gateway = await start(validate(raw, {}), clock=FakeClock())
    await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")
    with pytest.raises(ApiError) as refused:
        await sdk(gateway.url, REPORTING_KEY).batches.retrieve("batch-1")
    assert refused.value.status_code == 429

    _, samples = await scrape_metrics(gateway.url)
    assert sample_value(samples, "gateway_caller_rate_limited_total", caller="reporting") == 1
    assert sample_value(samples, "gateway_caller_rate_limited_total", caller="billing-service") == 0


async def test_metrics_count_reloads_and_whether_the_last_one_succeeded(
    simulator: Simulator, start: GatewayFactory, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "config.yaml", raw_config(simulator.url))
    gateway = await start(load_config(path))
    _, before = await scrape_metrics(gateway.url)
    assert sample_value(before, "gateway_config_last_reload_success") == 1

    path.write_text("callers: [", encoding="utf-8")
    await reload_config(gateway.state, lambda: load_config(path))
    _, failed = await scrape_metrics(gateway.url)
    write_config(path, raw_config(simulator.url))
    await reload_config(gateway.state, lambda: load_config(path))
    _, recovered = await scrape_metrics(gateway.url)

    assert sample_value(failed, "gateway_config_last_reload_success") == 0
    assert sample_value(failed, "gateway_config_reloads_total", result="error") == 1
    assert sample_value(recovered, "gateway_config_last_reload_success") == 1
    assert sample_value(recovered, "gateway_config_reloads_total", result="ok") == 1


EXPECTED_FAMILIES = {
    "gateway_requests",
    "gateway_request_duration_seconds",
    "gateway_upstream_calls",
    "gateway_upstream_duration_seconds",
    "gateway_upstream_retries",
    "gateway_upstream_rejected",
    "gateway_upstream_pauses",
    "gateway_upstream_budget_tokens",
    "gateway_breaker_state",
    "gateway_upstream_paused_seconds",
    "gateway_cache_entries",
    "gateway_cache_removals",
    "gateway_singleflight_inflight",
    "gateway_singleflight_coalesced",
    "gateway_caller_rate_limited",
    "gateway_config_reloads",
    "gateway_config_last_reload_success",
}


async def test_metrics_hold_every_documented_family_and_never_a_secret_or_a_batch_id(
    upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    ids = [f"secretive-batch-{n}" for n in range(5)]
    for batch_id in ids:
        await sdk(gateway.url).batches.retrieve(batch_id)
        await sdk(gateway.url, REPORTING_KEY).batches.retrieve(batch_id)
    await http(f"{gateway.url}/v2/batches/{ids[0]}", key="wrong-key-that-is-long-enough")
    await http(f"{gateway.url}/nowhere/{ids[1]}/{BILLING_KEY}")

    text, _ = await scrape_metrics(gateway.url)

    families = {family.name for family in text_string_to_metric_families(text)}
    assert families >= EXPECTED_FAMILIES
    assert_no_secrets(text)
    assert sha256_hex(REPORTING_KEY) not in text
    for batch_id in ids:
        assert batch_id not in text


# --- logs ---------------------------------------------------------------------------------------


async def test_the_access_log_has_one_line_per_request_with_every_field(
    upstream: Upstream, start: GatewayFactory, logs: LogCapture
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    miss = await http(f"{gateway.url}/v2/batches/batch-1")
    hit = await http(f"{gateway.url}/v2/batches/batch-1", key=REPORTING_KEY)
    denied = await http(f"{gateway.url}/v2/batches/batch-1", key=None)

    first, second, third = logs.events("gateway.access")

    for line in (first, second, third):
        assert line.keys() >= ACCESS_FIELDS
        assert isinstance(line["total_ms"], float)
    assert first["request_id"] == miss.headers["X-Request-ID"]
    assert (first["caller"], first["method"], first["batch_id"]) == ("billing-service", "GET", "batch-1")
    assert (first["status"], first["cache"], first["upstream_status"]) == (200, "MISS", 200)
    assert isinstance(first["upstream_ms"], float)
    assert second["request_id"] == hit.headers["X-Request-ID"]
    assert (second["caller"], second["status"], second["cache"]) == ("reporting", 200, "HIT")
    assert (second["upstream_status"], second["upstream_ms"]) == (None, None)
    assert third["request_id"] == denied.headers["X-Request-ID"]
    assert (third["caller"], third["status"]) == ("-", 401)


async def test_an_access_line_is_written_soon_after_its_answer_with_no_more_traffic_to_push_it(
    simulator: Simulator, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await start(make_config(simulator.url))
    await http(f"{gateway.url}/v2/batches/batch-1")  # a miss, through the app

    hit = await http(f"{gateway.url}/v2/batches/batch-1")  # a fresh hit, answered inline

    # Lines are written in batches (gateway.ops.batching.BATCH_WITHIN_S); the last one must not wait for another
    # request, nor for the gateway to stop. logs.text reads what was written, asking no flush.
    request_id = hit.header("X-Request-ID")
    assert request_id is not None
    assert await eventually(lambda: request_id in logs.text, PROCESS_WAIT_S)


async def test_a_request_aiohttp_cannot_parse_gets_an_access_log_line_and_is_counted(
    simulator: Simulator, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await start(make_config(simulator.url))

    answer = await raw_request(
        gateway.url, b"GET /healthz HTTP/1.1\r\nBad Header Name: x\r\n\r\n", timeout_s=PROCESS_WAIT_S
    )

    assert answer.status == 400
    [line] = logs.events("gateway.access")
    assert line.keys() >= ACCESS_FIELDS
    assert line["status"] == 400
    assert line["request_id"].encode() in answer.raw
    _, samples = await scrape_metrics(gateway.url)
    assert sample_value(samples, "gateway_requests_total", caller="-", route="unparsed", status="400", cache="-") == 1


# What a client controls in an access line: the path of an unmatched route, the batch id as
# sent, the method, an X-Request-ID. Any text, with or without a secret or a bearer credential in it.
CLIENT_FIELDS = ("request_id", "method", "path", "batch_id")
# The text every access line holds whatever the client sent: its keys and the gateway's own values. A
# "secret" inside one of them (a password "logger") is redacted there too, which says nothing of the
# client's values, so the property is tried with secrets that are not part of that text.
FIXED_TEXT = ("time", "level", "logger", "event", "info", "gateway.access", "request", "billing-service")
access_secrets = st.text(
    st.characters(blacklist_characters="[]", blacklist_categories=("Cs",)), min_size=6, max_size=24
).filter(lambda secret: not any(secret in fixed for fixed in (*FIXED_TEXT, *ACCESS_FIELDS_IN_ORDER)))
access_texts = st.text(max_size=30).filter(lambda t: "bearer" not in t.lower())


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(CLIENT_FIELDS),
    secret=access_secrets,
    before=access_texts,
    after=access_texts,
    leak=st.sampled_from(["secret", "bearer", "none"]),
)
# DEL is left raw by orjson and escaped by json; a quote and a backslash are escaped by both.
@example(field="path", secret='k"e\\y\x7fwith-del', before="/v2/", after="/x", leak="secret")
# Surrogates stand for header bytes that were not UTF-8.
@example(field="batch_id", secret="caf\u00e9-secret", before="\udcff", after="\u2603", leak="secret")
@example(field="request_id", secret="never-configured-77", before="", after="", leak="bearer")
def test_an_access_line_keeps_every_value_a_client_sent_but_never_a_secret(
    field: str, secret: str, before: str, after: str, leak: str
) -> None:
    redactor = Redactor()
    redactor.update([secret])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redactor))
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    inside = {"secret": secret, "bearer": f"Bearer {secret}", "none": ""}[leak]
    sent = before + inside + after
    fields: dict[str, Any] = {"request_id": "req-1", "method": "GET", "path": "unmatched", "batch_id": None}
    fields[field] = sent
    try:
        # Outside a running loop the line is logged at once, through the same formatter as a batch.
        AccessLog().add(
            **fields,
            caller="billing-service",
            status=404,
            cache="-",
            upstream_status=None,
            upstream_ms=None,
            total_ms=0.5,
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)

    [text] = stream.getvalue().splitlines()
    assert text.isascii()
    line = json.loads(text)
    assert list(line) == ["time", "level", "logger", "event", *ACCESS_FIELDS_IN_ORDER]
    assert {k: line[k] for k in ("caller", "status", "cache", "total_ms")} == {
        "caller": "billing-service",
        "status": 404,
        "cache": "-",
        "total_ms": 0.5,
    }
    if leak == "none" and secret not in sent:
        assert line[field] == sent  # nothing to remove: kept as the client sent it
    else:
        assert "[REDACTED]" in line[field]
        assert secret not in line[field]


ACCESS_FIELDS_IN_ORDER = [
    "request_id",
    "caller",
    "method",
    "path",
    "batch_id",
    "status",
    "cache",
    "upstream_status",
    "upstream_ms",
    "total_ms",
]


def echoing_upstream() -> Any:
    """An upstream that quotes the gateway's Authorization header back in its errors."""

    async def handler(request: web.Request) -> web.Response:
        credential = request.headers["Authorization"]
        if request.path.endswith("/invalid-body"):
            return web.Response(body=b"not json: " + credential.encode(), content_type="application/json")
        if "/echo-" not in request.path:
            return web.Response(body=batch_body(), content_type="application/json")
        status = int(request.path.rsplit("-", 1)[-1])
        body = {"message": f"token {credential.removeprefix('Bearer ')} was refused ({credential})"}
        return web.json_response(body, status=status, headers={"X-Debug": credential})

    return handler


# Requests a careless or hostile client sends: credentials in places a parser chokes on.
MALFORMED_REQUESTS = [
    # A header past max_field_size that holds the upstream token and a caller key.
    b"GET /v2/batches/b1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + BILLING_KEY.encode()
    + b"\r\nX-Debug: "
    + UPSTREAM_TOKEN.encode() * 400
    + b"\r\n\r\n",
    # An Authorization line longer than max_line_size.
    b"GET /v2/batches/b1 HTTP/1.1\r\nAuthorization: Bearer " + REPORTING_KEY.encode() * 400 + b"\r\n\r\n",
    # A non-UTF-8 Authorization header.
    b"GET /v2/batches/b1 HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer \xff\xfe"
    + REPORTING_KEY.encode()
    + b"\r\n\r\n",
    # A broken request line followed by a header with a key.
    b"GET /v2/batches/b1 HTTP/1.1 trailing\r\nAuthorization: Bearer " + REPORTING_KEY.encode() + b"\r\n\r\n",
    # A broken header line holding a key with no "Bearer" in front of it.
    b"GET /v2/batches/b1 HTTP/1.1\r\nX-Key\x01: " + REPORTING_KEY.encode() + b"\r\n\r\n",
    # A key where the request line should be.
    REPORTING_KEY.encode() + b" " + BILLING_KEY.encode() + b"\r\n\r\n",
    # A known secret in an unknown path, which the access log records.
    b"GET /v2/" + UPSTREAM_TOKEN.encode() + b"/x HTTP/1.1\r\nConnection: close\r\n\r\n",
]


async def run_varied_workload(url: str) -> list[bytes]:
    """Good requests, upstream errors that echo the token, and malformed requests; every answer."""
    answers: list[bytes] = []
    for key in (BILLING_KEY, REPORTING_KEY):
        await sdk(url, key).batches.retrieve("batch-ok")
    for status in (400, 401, 403, 404, 500, 503):
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {BILLING_KEY}"}) as session,
            session.get(f"{url}/v2/batches/echo-{status}") as response,
        ):
            answers.append(await response.read())
            answers.append(str(response.headers).encode())
    with pytest.raises(ApiError):
        await sdk(url).batches.retrieve("invalid-body")
    for raw in MALFORMED_REQUESTS:
        answer = await raw_request(url, raw, timeout_s=PROCESS_WAIT_S)
        assert 400 <= answer.status < 500
        answers.append(answer.raw)
    return answers


async def test_no_secret_reaches_a_log_under_a_varied_workload(
    upstream: Upstream, start: GatewayFactory, logs: LogCapture
) -> None:
    upstream.script(echoing_upstream())
    gateway = await start(make_config(upstream.url, upstream={"retries": 0}))

    await run_varied_workload(gateway.url)

    assert_no_secrets(logs.text)
    assert [line["logger"] for line in logs.events() if line["logger"].startswith("aiohttp")] == []
    assert len(logs.events("gateway.access")) == 2 + 6 + 1 + len(MALFORMED_REQUESTS)


async def test_no_secret_reaches_a_response_under_a_varied_workload(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(echoing_upstream())
    gateway = await start(make_config(upstream.url, upstream={"retries": 0}))

    answers = await run_varied_workload(gateway.url)

    for answer in answers:
        assert_no_secrets(answer)


async def test_a_key_that_json_escapes_is_kept_out_of_the_log_in_every_form(
    simulator: Simulator, start: GatewayFactory, logs: LogCapture
) -> None:
    odd_key = 'odd"key\\with-caf\u00e9-and-\u2603-0001'
    callers = [{"name": "billing-service", "key": BILLING_KEY}, {"name": "odd", "key": odd_key}]
    gateway = await start(make_config(simulator.url, callers=callers))

    # The key sent as a batch id: refused, and the access log records the id as sent.
    answer = await raw_request(gateway.url, request_bytes("/v2/batches/" + quote(odd_key, safe="")))

    assert (answer.status, answer.code) == (400, "invalid_batch_id")
    [line] = logs.events("gateway.access")
    assert line["batch_id"] == "[REDACTED]"
    for form in (odd_key, json.dumps(odd_key)[1:-1], json.dumps(odd_key, ensure_ascii=False)[1:-1]):
        assert form not in logs.text


async def test_a_bearer_credential_in_a_logged_path_is_removed(
    simulator: Simulator, start: GatewayFactory, logs: LogCapture
) -> None:
    gateway = await start(make_config(simulator.url))

    answer = await raw_request(gateway.url, request_bytes("/v2/Bearer%20never-configured-credential-77/x"))

    assert (answer.status, answer.code) == (404, "route_not_found")
    [line] = logs.events("gateway.access")
    assert line["path"] == "/v2/Bearer [REDACTED]"  # the pattern takes the rest of the path with it
    assert "never-configured-credential-77" not in logs.text


@pytest.mark.one_loop
async def test_the_process_writes_only_json_lines_and_no_secret_under_a_varied_workload(
    upstream: Upstream, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    upstream.script(echoing_upstream())
    gateway = await gateway_process(
        write_config(tmp_path / "c.yaml", process_config(upstream.url, upstream={"retries": 0}))
    )

    await run_varied_workload(gateway.url)
    gateway.signal(signal.SIGTERM)
    assert await gateway.exit_code(within_s=PROCESS_WAIT_S) == 0

    assert gateway.lines
    for line in gateway.lines:
        assert json.loads(line)["level"] in {"debug", "info", "warning", "error", "critical"}
    assert_no_secrets(gateway.text)


@pytest.mark.one_loop
async def test_logging_level_is_honoured_at_start_and_after_a_reload(
    simulator: Simulator, gateway_process: ProcessFactory, tmp_path: Path
) -> None:
    # At WARNING the gateway does not log that it serves: it is found on a port picked here.
    port = free_port()
    quiet = process_config(simulator.url, logging={"level": "WARNING"})
    quiet["server"]["port"] = port
    path = write_config(tmp_path / "config.yaml", quiet)
    gateway = await gateway_process(path, f"http://127.0.0.1:{port}")
    await sdk(gateway.url).batches.retrieve("batch-quiet")

    loud = process_config(simulator.url, logging={"level": "INFO"})
    loud["server"]["port"] = port
    write_config(path, loud)
    mark = gateway.signal(signal.SIGHUP)
    await gateway.wait_for_event("config reloaded", after=mark)
    await sdk(gateway.url).batches.retrieve("batch-loud")
    await gateway.wait_for_event("request", after=mark)

    access = [e for e in gateway.events if e["logger"] == "gateway.access"]
    assert [e["batch_id"] for e in access] == ["batch-loud"]
