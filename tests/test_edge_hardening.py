"""What every answer says about the server, HEAD on every GET route, and /metrics on a port of its own.

Checked on the three kinds of answer the gateway makes: by the app (through
its middleware), by the inline path for fresh hits (gateway/edge/inline.py), and
by the connection itself for requests that never parse (gateway/edge/rejections.py).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

import gateway
from gateway.demo.simulator import Simulator
from gateway.edge.server import start_gateway
from gateway.runtime import build_state
from tests.conftest import GatewayFactory
from tests.support import (
    EXCHANGE_TIMEOUT_S,
    Answer,
    LogCapture,
    free_port,
    http,
    make_config,
    parse_response,
    pipelined,
    raw_request,
    read_answer,
    request_bytes,
    scrape_metrics,
    sdk,
    send_raw,
)

# Headers that differ between any two answers, whichever way they were made.
PER_ANSWER = {"Date", "X-Request-ID", "Connection", "Age"}
NOT_MODIFIED = b"HTTP/1.1 304 Not Modified"


def kept_alive(target: str = "/v2/batches/batch-1", **kwargs: object) -> bytes:
    return request_bytes(target, close=False, **kwargs)  # type: ignore[arg-type]


async def read_head(reader: asyncio.StreamReader) -> Answer:
    """The next answer to a HEAD: its head only, whatever its Content-Length says."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EXCHANGE_TIMEOUT_S)
    return parse_response(head)


async def head_then_get(url: str, target: str, **kwargs: object) -> tuple[Answer, Answer]:
    """A HEAD and then the same GET, pipelined on one kept-alive connection.

    The GET's answer must start right after the HEAD's head: a HEAD answered
    with a body would put that body where the GET's status line should be.
    """
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(kept_alive(target, method="HEAD", **kwargs) + kept_alive(target, **kwargs))
        return await read_head(reader), await read_answer(reader)
    finally:
        writer.close()


# --- Server ------------------------------------------------------------------------------------


def assert_names_only_the_product(answer: Answer) -> None:
    assert answer.all("Server") == ["cohere-gateway"], answer.raw[:300]
    assert gateway.__version__ not in answer.header("Server")  # type: ignore[operator]


@pytest.mark.heavy
async def test_every_kind_of_answer_names_the_server_as_cohere_gateway_without_a_version(
    simulator: Simulator, start: GatewayFactory, inline_answers: list[bytes]
) -> None:
    gateway_ = await start(make_config(simulator.url, server={"max_field_size": 1024}))
    await sdk(gateway_.url).batches.retrieve("batch-1")

    answers = {
        "app 200": await http(f"{gateway_.url}/healthz"),
        "app 401": await http(f"{gateway_.url}/v2/batches/batch-1", key=None),
        "app 404": await http(f"{gateway_.url}/nowhere"),
        "inline hit": (await pipelined(gateway_.url, kept_alive(), 1))[0],
        "unparsed 400": await raw_request(gateway_.url, b"NOT HTTP AT ALL\r\n\r\n"),
        "unparsed 431": await raw_request(gateway_.url, request_bytes(headers=[("X-Big", "a" * 4096)])),
        "expect 417": await raw_request(gateway_.url, request_bytes(headers=[("Expect", "coffee")])),
        "body 413": await raw_request(
            gateway_.url, request_bytes("/v2/batches", [("Content-Length", "999999999")], method="POST")
        ),
    }

    assert {name: a.status for name, a in answers.items()} == {
        "app 200": 200,
        "app 401": 401,
        "app 404": 404,
        "inline hit": 200,
        "unparsed 400": 400,
        "unparsed 431": 431,
        "expect 417": 417,
        "body 413": 413,
    }
    assert len(inline_answers) == 1  # the hit came from the inline path
    for answer in answers.values():
        assert_names_only_the_product(answer)


# --- HEAD --------------------------------------------------------------------------------------


async def test_head_of_a_cached_batch_is_the_gets_head_without_its_body(
    simulator: Simulator, start: GatewayFactory, inline_answers: list[bytes], logs: LogCapture
) -> None:
    gateway_ = await start(make_config(simulator.url))
    await sdk(gateway_.url).batches.retrieve("batch-1")

    head, get = await head_then_get(gateway_.url, "/v2/batches/batch-1")

    assert len(inline_answers) == 2  # both answered inline
    assert (head.status, head.header("X-Cache"), get.status) == (200, "HIT", 200)
    assert head.header("Content-Length") == str(len(get.body))
    assert set(head.headers) - PER_ANSWER == set(get.headers) - PER_ANSWER
    for name in set(head.headers) - PER_ANSWER:
        assert head.headers.getall(name) == get.headers.getall(name), name
    await http(f"{gateway_.url}/healthz")  # a later request: the hits' lines are written by then
    hits = [(line["method"], line["cache"]) for line in logs.events("gateway.access") if line["cache"] == "HIT"]
    assert hits == [("HEAD", "HIT"), ("GET", "HIT")]


async def test_head_of_a_batch_the_cache_lacks_fetches_it_once_and_answers_without_a_body(
    simulator: Simulator, start: GatewayFactory, inline_answers: list[bytes]
) -> None:
    gateway_ = await start(make_config(simulator.url))

    head, get = await head_then_get(gateway_.url, "/v2/batches/batch-2")

    assert inline_answers == []  # a miss goes through the app; the GET behind it waits its turn
    assert (head.status, head.header("X-Cache")) == (200, "MISS")
    assert (get.status, get.header("X-Cache"), get.json["batch"]["id"]) == (200, "HIT", "batch-2")
    assert head.header("Content-Length") == str(len(get.body))
    assert head.header("ETag") == get.header("ETag")
    assert simulator.calls == 1


async def test_head_with_the_etag_it_holds_is_a_304_inline_and_through_the_app(
    simulator: Simulator, start: GatewayFactory, inline_answers: list[bytes]
) -> None:
    gateway_ = await start(make_config(simulator.url))
    await sdk(gateway_.url).batches.retrieve("batch-1")
    etag = (await http(f"{gateway_.url}/v2/batches/batch-1")).header("ETag")
    assert etag

    inline, _ = await head_then_get(gateway_.url, "/v2/batches/batch-1", headers=[("If-None-Match", etag)])
    # Connection: close always goes through the app.
    through_app = parse_response(
        await send_raw(gateway_.url, request_bytes(method="HEAD", headers=[("If-None-Match", etag)]))
    )

    # The GET for the ETag, then the HEAD and the GET behind it.
    assert [a.split(b"\r\n", 1)[0] for a in inline_answers] == [b"HTTP/1.1 200 OK", NOT_MODIFIED, NOT_MODIFIED]
    assert (inline.status, through_app.status) == (304, 304)
    assert inline.header("ETag") == through_app.header("ETag") == etag


@pytest.mark.parametrize("connection", ["kept-alive", "close"])
async def test_head_without_a_key_is_a_401_with_no_body(
    simulator: Simulator, start: GatewayFactory, connection: str
) -> None:
    gateway_ = await start(make_config(simulator.url))
    await sdk(gateway_.url).batches.retrieve("batch-1")

    if connection == "close":
        raw = await send_raw(gateway_.url, request_bytes(method="HEAD", key=None))
        refused = parse_response(raw)
        assert raw.endswith(b"\r\n\r\n")  # nothing after the head
    else:
        refused, after = await head_then_get(gateway_.url, "/v2/batches/batch-1", key=None)
        assert (after.status, after.code) == (401, "unauthorized")  # the next answer follows the head at once
        assert refused.header("Content-Length") == str(len(after.body))

    assert refused.status == 401
    assert refused.header("Content-Type") == "application/json"
    assert refused.header("X-Request-ID")
    assert simulator.calls == 1


@pytest.mark.parametrize(
    ("target", "status"), [("/healthz", 200), ("/readyz", 200), ("/metrics", 200), ("/v2/batches", 200)]
)
async def test_head_of_every_other_get_route_answers_as_its_get_without_a_body(
    simulator: Simulator, start: GatewayFactory, target: str, status: int
) -> None:
    gateway_ = await start(make_config(simulator.url))

    head, get = await head_then_get(gateway_.url, target)

    assert (head.status, get.status) == (status, status)
    assert head.header("Content-Type") == get.header("Content-Type")
    assert head.header("Server") == "cohere-gateway"


@pytest.mark.parametrize(
    ("method", "target", "allowed"),
    [
        ("DELETE", "/v2/batches/batch-1", "GET, HEAD"),
        ("PUT", "/v2/batches", "GET, HEAD, POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        # '{id}:cancel' is the cancel resource alone (docs/design.md §8): POST, and no GET to add HEAD to.
        ("PUT", "/v2/batches/batch-1:cancel", "POST"),
    ],
)
async def test_a_405_lists_head_wherever_get_is_allowed(
    simulator: Simulator, start: GatewayFactory, method: str, target: str, allowed: str
) -> None:
    gateway_ = await start(make_config(simulator.url))

    answer = await http(f"{gateway_.url}{target}", method=method)

    assert (answer.status, answer.code, answer.header("Allow")) == (405, "method_not_allowed", allowed)


async def test_head_with_prefer_wait_is_held_as_the_get_would_be(
    simulator: Simulator, start: GatewayFactory, inline_answers: list[bytes]
) -> None:
    gateway_ = await start(make_config(simulator.url))
    await sdk(gateway_.url).batches.retrieve("batch-1")
    etag = (await http(f"{gateway_.url}/v2/batches/batch-1")).header("ETag")
    assert etag
    loop = asyncio.get_running_loop()

    began = loop.time()
    head, _ = await head_then_get(
        gateway_.url, "/v2/batches/batch-1", headers=[("If-None-Match", etag), ("Prefer", "wait=1")]
    )

    assert loop.time() - began >= 0.9  # held for its wait (less up to 1/16 of jitter), not answered inline
    assert (head.status, head.header("Preference-Applied")) == (304, "wait=1")
    # Inline: only the GET for the ETag; the HEAD (and the GET behind it) asked to wait.
    assert [a.split(b"\r\n", 1)[0] for a in inline_answers] == [b"HTTP/1.1 200 OK"]


# --- server.metrics_port -----------------------------------------------------------------------


async def test_with_a_metrics_port_metrics_are_scraped_there_and_the_api_port_says_route_not_found(
    simulator: Simulator, start: GatewayFactory, inline_answers: list[bytes]
) -> None:
    port = free_port()
    gateway_ = await start(make_config(simulator.url, server={"metrics_port": port}))
    await sdk(gateway_.url).batches.retrieve("batch-1")
    metrics_url = f"http://127.0.0.1:{port}"

    text, _ = await scrape_metrics(metrics_url)
    on_api_port = await http(f"{gateway_.url}/metrics", key=None)
    # The metrics listener serves nothing else, not even a hit the API port would answer inline.
    batch_on_metrics_port, _ = await head_then_get(metrics_url, "/v2/batches/batch-1")

    assert 'gateway_requests_total{cache="MISS",caller="billing-service"' in text
    assert (on_api_port.status, on_api_port.code) == (404, "route_not_found")
    assert (batch_on_metrics_port.status, batch_on_metrics_port.header("Server")) == (404, "cohere-gateway")
    assert inline_answers == []


async def test_a_metrics_port_already_taken_stops_the_start(simulator: Simulator, start: GatewayFactory) -> None:
    taken = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        with pytest.raises(OSError, match="address already in use"):
            await start(make_config(simulator.url, server={"metrics_port": port}))
    finally:
        taken.close()
        await taken.wait_closed()


async def test_a_metrics_port_that_is_the_api_port_stops_the_start_even_beside_workers(simulator: Simulator) -> None:
    port = free_port()
    config = make_config(simulator.url, server={"metrics_port": port})

    with pytest.raises(OSError, match=r"server.metrics_port \d+ is the API port"):
        # reuse_port as a worker listens: both sockets would bind the one port.
        await start_gateway(build_state(config), "127.0.0.1", port, reuse_port=True)
