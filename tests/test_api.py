"""The batch route as a service sees it (the cohere SDK) and as the upstream sees it.

The caller's side: the SDK round trip, the body byte for byte, the cache and
request id headers. The upstream's side: exactly the shared token, the
configured caller name, none of the caller's credentials, and a URL built
from ``base_url`` and the validated id alone.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import cohere
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway import __version__
from gateway.demo.simulator import Simulator
from tests.conftest import GatewayFactory
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    FakeClock,
    assert_no_secrets,
    http,
    make_config,
    raw_request,
    request_bytes,
    sdk,
)
from tests.upstream import Upstream, json_handler

BOUND_S = 30
CALLERS = [("billing-service", BILLING_KEY), ("reporting", REPORTING_KEY)]
# Every header the upstream may receive; anything else is a leak of the caller's request.
UPSTREAM_HEADER_ALLOWLIST = {
    "host",
    "authorization",
    "x-client-name",
    "x-request-id",
    "user-agent",
    "accept",
    "accept-encoding",
    "x-fern-language",
    "x-fern-sdk-name",
    "x-fern-sdk-version",
}
CACHE_CONTROL = re.compile(r"private, max-age=\d+")


# --- the caller's side ------------------------------------------------------------------


async def test_the_sdk_retrieves_a_batch_as_the_simulator_reports_it(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    client = sdk(gateway.url)
    raw = await asyncio.wait_for(client.batches.with_raw_response.retrieve("batch-round-trip"), BOUND_S)
    batch = raw.data.batch
    assert (batch.id, batch.name, batch.status) == ("batch-round-trip", "demo-batch-round-trip", "BATCH_STATUS_QUEUED")
    assert batch.num_records == simulator.batch("batch-round-trip")["num_records"]
    assert raw.response.headers["Content-Type"].split(";")[0] == "application/json"
    assert raw.response.headers["X-Cache"] == "MISS"
    assert raw.response.headers["Age"] == "0"
    assert CACHE_CONTROL.fullmatch(raw.response.headers["Cache-Control"])
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", raw.response.headers["X-Request-ID"])
    assert simulator.calls == 1
    assert_no_secrets(raw.response.content)


ODD_BODY = (
    b'{ "batch" :{"status":"BATCH_STATUS_COMPLETED" ,"id":"batch-1",\n'
    b'"name":"caf\\u00e9 \xe2\x98\x95","num_records":1.50e1, "extra": [null, {}]} , "later": true}  '
)


async def test_a_200_body_is_passed_byte_for_byte(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler(body=ODD_BODY))
    gateway = await start(make_config(upstream.url), clock=FakeClock())
    client = sdk(gateway.url)
    first = await asyncio.wait_for(client.batches.with_raw_response.retrieve("batch-1"), BOUND_S)
    second = await asyncio.wait_for(client.batches.with_raw_response.retrieve("batch-1"), BOUND_S)
    assert first.response.content == ODD_BODY
    assert second.response.content == ODD_BODY
    assert first.data.batch.name == "caf\u00e9 \u2615"
    assert [r.response.headers["X-Cache"] for r in (first, second)] == ["MISS", "HIT"]
    assert upstream.count() == 1


async def test_cache_headers_tell_the_age_and_the_freshness_left(upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler())
    clock = FakeClock()
    config = make_config(upstream.url, cache={"ttl_s": {"active": 30}, "active_jitter": 0})
    gateway = await start(config, clock=clock)
    first = await http(f"{gateway.url}/v2/batches/batch-1")
    clock.advance(12)
    second = await http(f"{gateway.url}/v2/batches/batch-1")
    miss, hit = first.headers, second.headers
    assert first.status == 200
    assert (miss["X-Cache"], miss["Age"], miss["Cache-Control"]) == ("MISS", "0", "private, max-age=30")
    assert (hit["X-Cache"], hit["Age"], hit["Cache-Control"]) == ("HIT", "12", "private, max-age=18")


# --- what the upstream sees ------------------------------------------------------------


def assert_upstream_saw_only_the_gateways_identity(headers: Mapping[str, str], caller_name: str) -> None:
    seen = CIMultiDict(headers)
    assert seen.getall("Authorization") == [f"Bearer {UPSTREAM_TOKEN}"], "the upstream did not get the shared token"
    assert seen.getall("X-Client-Name") == [caller_name]
    # The gateway names itself with the release that is running (one place: gateway.__version__).
    assert seen.getall("User-Agent") == [f"cohere-gateway/{__version__}"]
    unexpected = {name.lower() for name in seen} - UPSTREAM_HEADER_ALLOWLIST
    assert not unexpected, f"caller headers reached the upstream: {sorted(unexpected)}"


@pytest.mark.parametrize(("caller_name", "key"), CALLERS)
async def test_the_upstream_sees_the_shared_token_and_the_configured_caller_name(
    caller_name: str, key: str, simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    await asyncio.wait_for(sdk(gateway.url, key, client_name="i-am-someone-else").batches.retrieve("b1"), BOUND_S)
    [seen] = simulator.seen
    assert_upstream_saw_only_the_gateways_identity(seen.headers, caller_name)
    assert key not in str(dict(seen.headers)), "the caller's key reached the upstream"


CALLER_EXTRAS = {
    "Cookie": "session=caller-session-cookie",
    "X-Client-Name": "impostor",
    "X-Api-Key": "another-credential",
    "Api-Key": "another-credential",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "X-Forwarded-For": "10.0.0.1",
    "X-Forwarded-Host": "evil.example",
    "Forwarded": "for=10.0.0.1;host=evil.example",
    "X-Original-URL": "/v2/batches/other",
    "X-Rewrite-URL": "/v2/batches/other",
    "X-HTTP-Method-Override": "DELETE",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Upgrade": "h2c",
    "Via": "1.1 somewhere",
    "Origin": "https://evil.example",
    "Referer": "https://evil.example/page",
    "Cohere-Version": "2022-12-06",
}


async def test_no_cookie_credential_or_hop_by_hop_header_of_the_caller_reaches_the_upstream(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    answer = await http(f"{gateway.url}/v2/batches/b1", headers=CALLER_EXTRAS)
    assert answer.status == 200
    [seen] = simulator.seen
    assert_upstream_saw_only_the_gateways_identity(seen.headers, "billing-service")
    flattened = str(dict(seen.headers))
    for value in CALLER_EXTRAS.values():
        assert value not in flattened


async def test_doubled_caller_identity_headers_are_replaced_not_appended(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    doubled = [
        b"X-Client-Name: impostor-one",
        b"X-Client-Name: impostor-two",
        b"Cookie: a=1",
        b"Cookie: b=2",
        b"Connection: close, X-Client-Name",
    ]
    answer = await raw_request(gateway.url, request_bytes("/v2/batches/b1", doubled, host="gateway", close=False))
    assert answer.status == 200
    [seen] = simulator.seen
    assert_upstream_saw_only_the_gateways_identity(seen.headers, "billing-service")


# --- X-Request-ID in, out and upstream --------------------------------------------------


@pytest.mark.parametrize("request_id", ["req-123", "a", "A.b_c:d-9", "x" * 128, "0f8fad5b-d9cb-469f-a165-70867728950e"])
async def test_a_sane_request_id_is_echoed_and_sent_upstream(
    request_id: str, simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    answer = await http(f"{gateway.url}/v2/batches/b1", headers={"X-Request-ID": request_id})
    assert answer.headers["X-Request-ID"] == request_id
    [seen] = simulator.seen
    assert seen.headers.getall("X-Request-ID") == [request_id]


@pytest.mark.parametrize(
    "request_id",
    [
        b"",
        b"has spaces",
        b"x" * 129,
        b"semi;colon",
        b'quote"d',
        b"caf\xc3\xa9",
        b"\xff\xfe",
        b"a,b",
        BILLING_KEY.encode() + b"!",
    ],
)
async def test_an_insane_request_id_is_replaced_by_a_fresh_one_everywhere(
    request_id: bytes, simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    head = request_bytes("/v2/batches/b1", [b"X-Request-ID: " + request_id], host="gateway")
    answer = await raw_request(gateway.url, head)
    assert answer.status == 200
    echoed = re.search(rb"(?im)^X-Request-ID: *([^\r\n]*)\r$", answer.raw)
    assert echoed is not None
    fresh = echoed.group(1).decode()
    assert fresh.encode() != request_id
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)
    [seen] = simulator.seen
    assert seen.headers.getall("X-Request-ID") == [fresh]


async def test_two_request_ids_from_the_caller_are_replaced(simulator: Simulator, start: GatewayFactory) -> None:
    gateway = await start(make_config(simulator.url))
    head = request_bytes("/v2/batches/b1", [b"X-Request-ID: first", b"X-Request-ID: second"], host="gateway")
    answer = await raw_request(gateway.url, head)
    assert answer.status == 200
    [seen] = simulator.seen
    sent = seen.headers.getall("X-Request-ID")
    assert len(sent) == 1
    assert sent[0] not in {"first", "second"}
    assert b"X-Request-ID: " + sent[0].encode() in answer.raw


async def test_a_request_id_is_generated_when_none_is_sent(simulator: Simulator, start: GatewayFactory) -> None:
    gateway = await start(make_config(simulator.url))
    first = (await http(f"{gateway.url}/v2/batches/b1")).headers
    second = (await http(f"{gateway.url}/v2/batches/b2")).headers
    assert first["X-Request-ID"] != second["X-Request-ID"]
    assert [s.headers["X-Request-ID"] for s in simulator.seen] == [first["X-Request-ID"], second["X-Request-ID"]]


# --- the upstream URL --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"/v2/batches/b1?x=1", b"gateway"),
        (b"/v2/batches/b1?id=other&path=../jobs&url=http://evil.example/", b"gateway"),
        (b"/v2/batches/b1?", b"gateway"),
        (b"/v2/batches/b1#frag", b"gateway"),
        (b"/v2/batches/b1", b"evil.example"),
        (b"/v2/batches/b1", b"evil.example:443"),
        (b"http://evil.example/v2/batches/b1", b"gateway"),
        (b"http://evil.example:8080/v2/batches/b1?x=1", b"evil.example"),
        (b"/v2/batches/%62%31", b"gateway"),
    ],
)
async def test_the_upstream_url_is_built_from_base_url_and_the_id_alone(
    target: bytes, host: bytes, upstream: Upstream, start: GatewayFactory
) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url))
    answer = await raw_request(gateway.url, request_bytes(target, host=host))
    assert answer.status == 200
    [request] = upstream.requests
    assert request.raw_path == "/v2/batches/b1"
    assert request.query_string == ""
    assert request.headers["Host"] == upstream.url.removeprefix("http://")


@pytest.mark.parametrize("prefix", ["/cohere", "/cohere/", "/a/b/c"])
async def test_a_base_url_with_a_path_prefix_is_kept(prefix: str, upstream: Upstream, start: GatewayFactory) -> None:
    upstream.script(json_handler())
    gateway = await start(make_config(upstream.url + prefix))
    response = await asyncio.wait_for(sdk(gateway.url).batches.retrieve("b1"), BOUND_S)
    assert response.batch.id == "b1"
    [request] = upstream.requests
    assert request.raw_path == prefix.rstrip("/") + "/v2/batches/b1"


async def test_the_upstream_is_asked_with_get_and_no_body(upstream: Upstream, start: GatewayFactory) -> None:
    bodies: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return await json_handler()(request)

    upstream.script(record)
    gateway = await start(make_config(upstream.url))
    answer = await http(f"{gateway.url}/v2/batches/b1", data=b"caller-body")
    assert answer.status == 200
    assert [r.method for r in upstream.requests] == ["GET"]
    assert bodies == [b""]


# --- a newcomer's first run ---------------------------------------------------------------


REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
DEMO_LAUNCHES = {
    "python -m gateway --demo": [sys.executable, "-m", "gateway", "--demo", "--config", "/nonexistent/config.yaml"],
    # The README's quick start, in this test run's environment (-o: install nothing).
    "make run": ["make", "--no-print-directory", "run", f"VENV={VENV}", "-o", f"{VENV}/.installed-run"],
}


async def the_readme_workflow(co: cohere.AsyncClientV2) -> None:
    batch = (
        await co.batches.create(
            request=cohere.Batch(name="nightly-embed", input_dataset_id="my-dataset", model="embed-v4.0"),
            request_options={"additional_headers": {"Idempotency-Key": "nightly-embed-2026-12-01"}},
        )
    ).batch
    assert batch.id is not None
    assert (await co.batches.retrieve(batch.id)).batch.status == "BATCH_STATUS_QUEUED"
    page = await co.batches.list(page_size=10)
    assert [b.id for b in page.batches or []] == [batch.id], "demo-billing sees only its own batches"
    await co.batches.cancel(batch.id)
    assert (await co.batches.retrieve(batch.id)).batch.status in {"BATCH_STATUS_CANCELING", "BATCH_STATUS_CANCELED"}


@pytest.mark.one_loop
@pytest.mark.parametrize("launch", DEMO_LAUNCHES)
async def test_the_sdk_runs_the_readme_workflow_through_demo_mode(launch: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"COHERE_API_KEY", "GATEWAY_CONFIG"}}
    argv = DEMO_LAUNCHES[launch]
    listen = ["--host", "127.0.0.1", "--port", "0"]
    argv = [*argv, "ARGS=" + " ".join(listen)] if launch == "make run" else [*argv, *listen]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True
    )
    try:
        assert process.stdout is not None
        banner = b""
        while b"Try:" not in banner:
            line = await asyncio.wait_for(process.stdout.readline(), BOUND_S)
            assert line, "the demo exited before printing its banner"
            banner += line
        url = re.search(rb"serving (http://\S+) ", banner)
        writer = re.search(rb"demo-billing: (\S+)", banner)
        reader = re.search(rb"demo-reporting: (\S+)", banner)
        assert url is not None
        assert writer is not None
        assert reader is not None
        gateway_url = url.group(1).decode()
        response = await asyncio.wait_for(
            sdk(gateway_url, reader.group(1).decode()).batches.retrieve("my-first-batch"), BOUND_S
        )
        assert response.batch.id == "my-first-batch"
        assert response.batch.status == "BATCH_STATUS_QUEUED"
        # The README's workflow: demo-billing creates, polls, lists and cancels its own batch.
        await asyncio.wait_for(the_readme_workflow(sdk(gateway_url, writer.group(1).decode())), BOUND_S)
        # Ctrl-C in a terminal signals the whole process group: make and the gateway.
        os.killpg(process.pid, signal.SIGINT)
        exit_code = await asyncio.wait_for(process.wait(), BOUND_S)
        # The gateway is gone too: its output ends only once nothing holds it open.
        await asyncio.wait_for(process.stdout.read(), BOUND_S)
        if launch != "make run":  # make reports the interrupt itself, whatever the gateway did
            assert exit_code == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
