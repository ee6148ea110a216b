"""What a fresh hit's cheaper bookkeeping must not change, as a client and an operator see it.

A hit's answer bytes are kept per cache entry for a second
(``gateway/edge/inline.py``), a known caller's key digest per
``Authorization`` value (``gateway/api/auth.py``), and a loop turn's request
counts and timings are added to the collectors at the turn's end
(``gateway/ops/metrics.py``). Answers, refusals and ``/metrics`` stay the
ones the gateway gave when it made each anew.
"""

from __future__ import annotations

import asyncio
import math
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from gateway import errors
from gateway.api.auth import CallerDirectory
from gateway.demo.simulator import Simulator
from gateway.ops.metrics import LATENCY_BUCKETS, Metrics, observe_all
from tests.conftest import GatewayFactory
from tests.support import BILLING_KEY, FakeClock, http, make_config, pipelined, read_answer, request_bytes, sdk

PER_ANSWER = {"Date", "X-Request-ID", "Connection"}
ROUTE = "/v2/batches/{id}"


def kept_alive(target: str = "/v2/batches/batch-1", **kwargs: object) -> bytes:
    return request_bytes(target, close=False, **kwargs)  # type: ignore[arg-type]


async def test_a_hit_a_few_seconds_later_carries_the_age_and_max_age_the_app_gives_then(
    simulator: Simulator, start: GatewayFactory
) -> None:
    clock = FakeClock()
    gateway = await start(make_config(simulator.url), clock=clock)
    await sdk(gateway.url).batches.retrieve("batch-1")
    [first] = await pipelined(gateway.url, kept_alive(), 1)

    clock.advance(2)
    [inline] = await pipelined(gateway.url, kept_alive(), 1)
    [through_app] = await pipelined(gateway.url, request_bytes("/v2/batches/batch-1", close=True), 1)

    assert (first.header("X-Cache"), first.header("Age")) == ("HIT", "0")
    assert (inline.header("X-Cache"), inline.header("Age")) == ("HIT", "2")
    for name in set(through_app.headers) - PER_ANSWER:
        assert inline.headers.getall(name) == through_app.headers.getall(name), name
    assert inline.header("Cache-Control") != first.header("Cache-Control")  # max-age counts down


async def test_a_get_a_304_and_a_head_of_one_entry_in_one_pipeline_each_get_their_own_answer(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    await sdk(gateway.url).batches.retrieve("batch-1")
    [plain] = await pipelined(gateway.url, kept_alive(), 1)
    etag = plain.header("ETag")
    assert etag is not None
    parts = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            kept_alive(headers=[("If-None-Match", etag)]) + kept_alive() + kept_alive(method="HEAD") + kept_alive()
        )
        not_modified, again = await read_answer(reader), await read_answer(reader)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # a HEAD's answer has no body
        last = await read_answer(reader)
    finally:
        writer.close()

    assert (not_modified.status, not_modified.body, not_modified.header("Content-Length")) == (304, b"", None)
    assert (again.status, again.body) == (200, plain.body)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {len(plain.body)}\r\n".encode() in head
    assert (last.status, last.body, last.header("ETag")) == (200, plain.body, etag)


async def test_a_scrape_right_behind_hits_counts_and_times_every_one_of_them(
    simulator: Simulator, start: GatewayFactory
) -> None:
    gateway = await start(make_config(simulator.url))
    await sdk(gateway.url).batches.retrieve("batch-1")  # one request through the app: a miss

    # The hits and the scrape in one write: the scrape is handled in the turn after the hits.
    answers = await pipelined(gateway.url, kept_alive() * 40 + kept_alive("/metrics"), 41)

    assert [a.header("X-Cache") for a in answers[:40]] == ["HIT"] * 40
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answers[40].body.decode())
        for s in family.samples
    }
    hits = (("cache", "HIT"), ("caller", "billing-service"), ("route", ROUTE), ("status", "200"))
    assert samples[("gateway_requests_total", hits)] == 40
    timed = samples[("gateway_request_duration_seconds_count", (("route", ROUTE),))]
    assert timed == 41
    assert samples[("gateway_request_duration_seconds_bucket", (("le", "+Inf"), ("route", ROUTE)))] == timed
    assert samples[("gateway_request_duration_seconds_sum", (("route", ROUTE),))] > 0
    # And the scrape after it counts the first scrape too.
    later = (await http(f"{gateway.url}/metrics")).body.decode()
    assert 'gateway_requests_total{cache="-",caller="-",route="/metrics",status="200"} 1.0' in later


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 0.001, 0.0010001, 0.0025, 5e-06, 30.0, 31.0, 1e9],
        [-1.0, math.nan, 0.5, 0.5, 0.5],
        [],
    ],
)
def test_observations_added_at_once_read_as_the_same_histogram_as_one_by_one(values: list[float]) -> None:
    one_by_one = Histogram("a", "a", ["route"], buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    at_once = Histogram("b", "b", ["route"], buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    child = one_by_one.labels("r")
    for value in values:
        child.observe(value)
    observe_all(at_once.labels("r"), values)

    def read(histogram: Histogram) -> list[tuple[str, dict[str, str], float]]:
        [family] = histogram.collect()
        return [(s.name[1:], s.labels, s.value) for s in family.samples if not s.name.endswith("_created")]

    expected, found = read(one_by_one), read(at_once)
    assert [(name, labels) for name, labels, _ in found] == [(name, labels) for name, labels, _ in expected]
    for (name, _, want), (_, _, got) in zip(expected, found, strict=True):
        assert got == want or (math.isnan(got) and math.isnan(want)) or math.isclose(got, want), name


def test_a_key_accepted_before_is_checked_again_against_the_callers_in_force() -> None:
    config = make_config("http://127.0.0.1:1")
    callers = CallerDirectory(config.callers)
    without_billing = CallerDirectory([c for c in config.callers if c.name != "billing-service"])
    presented = [f"Bearer {BILLING_KEY}"]

    assert callers.authenticate(presented).name == "billing-service"
    assert callers.authenticate(presented).name == "billing-service"
    assert callers.authenticate([f"bearer \t{BILLING_KEY} "]).name == "billing-service"
    with pytest.raises(errors.Unauthorized):
        without_billing.authenticate(presented)  # a reload's directory: what the last one kept is not in it
    for _ in range(2):
        with pytest.raises(errors.Unauthorized):
            callers.authenticate([f"Bearer {BILLING_KEY}x"])
        with pytest.raises(errors.Unauthorized):
            callers.authenticate([f"Basic {BILLING_KEY}"])
        with pytest.raises(errors.Unauthorized):
            callers.authenticate([*presented, *presented])


async def test_a_scrape_in_the_loop_turn_of_the_requests_before_it_counts_them() -> None:
    metrics = Metrics()
    requests = metrics.requests.labels("billing-service", ROUTE, "200", "HIT")
    metrics.tally.add(requests, metrics.request_seconds.labels(ROUTE), 0.002)
    metrics.tally.add(requests, None, None)  # counted, not timed (a request that could not be parsed)

    text = metrics.render().decode()  # no await since: the same turn

    counted = 'gateway_requests_total{cache="HIT",caller="billing-service",route="/v2/batches/{id}",status="200"} 2.0'
    assert counted in text
    assert 'gateway_request_duration_seconds_bucket{le="0.001",route="/v2/batches/{id}"} 0.0' in text
    assert 'gateway_request_duration_seconds_bucket{le="0.0025",route="/v2/batches/{id}"} 1.0' in text
    assert 'gateway_request_duration_seconds_count{route="/v2/batches/{id}"} 1.0' in text
