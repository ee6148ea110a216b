"""A reload reaches every upstream call made after it (docs/design.md §7).

A reload that rotates the upstream token or moves ``base_url`` must apply to
the calls the gateway makes on its own, long after the request that started
them: the refreshes of a batch that callers wait on (``Prefer: wait``), and a
retry of a request whose first try was already out. Each test serves two fake
upstreams, the old host and the new one, and counts what each receives.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.runtime import reload_config
from tests.conftest import GatewayFactory
from tests.support import NEW_TOKEN, PROCESS_WAIT_S, UPSTREAM_TOKEN, eventually, http, make_config
from tests.upstream import Upstream, batch_body, json_handler

# The refresher's cadence: a waited batch is refreshed every 0.2 s.
QUICK_TTL = {"active": 1, "active_min": 0.2, "active_max": 10}
REACHED_WITHIN_S = 10.0  # bound on the new upstream hearing from the gateway (2 shared cores)


def moved(base_url: str) -> GatewayConfig:
    """The config after an operator's edit: the upstream at another address, with a new token."""
    return make_config(base_url, upstream={"token": NEW_TOKEN}, cache={"ttl_s": QUICK_TTL})


async def test_refreshes_for_waiters_after_a_reload_reach_the_new_upstream_with_the_new_token(
    upstream: Upstream, start: GatewayFactory
) -> None:
    old = upstream.script(json_handler())
    new = (await upstream.another()).script(json_handler())
    gateway = await start(make_config(old.url, cache={"ttl_s": QUICK_TTL}))
    url = f"{gateway.url}/v2/batches/batch-1"
    etag = (await http(url)).header("ETag")
    assert etag is not None

    # Two callers' waits overlap: the batch stays followed across the reload.
    waits = [asyncio.ensure_future(http(url, headers={"Prefer": "wait=8", "If-None-Match": etag})) for _ in range(2)]
    try:
        # Reload just as a refresh reaches the old host: no other refresh is out then.
        old.arrived.clear()
        await asyncio.wait_for(old.arrived.wait(), PROCESS_WAIT_S)
        calls_before_reload = old.count()
        assert await reload_config(gateway.state, lambda: moved(new.url))

        reached = await eventually(lambda: new.count() >= 3, REACHED_WITHIN_S)
        old_calls_after_reload = old.count() - calls_before_reload
        # The batch moves on at the new host: the waiters hear of it from there.
        new.script(json_handler(body=batch_body("batch-1", num_successful_records=5)))
        answers = await asyncio.wait_for(asyncio.gather(*waits), PROCESS_WAIT_S)
    finally:
        for wait in waits:
            wait.cancel()

    assert reached, "no refresh after the reload reached the new upstream"
    assert old_calls_after_reload == 0, "refreshes after the reload still went to the old upstream"
    assert {h["Authorization"] for h in new.headers} == {f"Bearer {NEW_TOKEN}"}
    assert {h["Authorization"] for h in old.headers} == {f"Bearer {UPSTREAM_TOKEN}"}
    assert [(a.status, a.document["batch"]["num_successful_records"]) for a in answers] == [(200, 5)] * 2


async def test_a_retry_made_after_a_reload_goes_to_the_new_upstream_with_the_new_token(
    upstream: Upstream, start: GatewayFactory
) -> None:
    first_try_seen, fail_first_try = asyncio.Event(), asyncio.Event()

    async def fails_when_released(_request: web.Request) -> web.Response:
        first_try_seen.set()
        await fail_first_try.wait()
        return web.Response(status=502)

    old = upstream.script(fails_when_released)
    new = (await upstream.another()).script(json_handler())
    gateway = await start(make_config(old.url, upstream={"retries": 2}))
    answer = asyncio.ensure_future(http(f"{gateway.url}/v2/batches/batch-1"))
    await asyncio.wait_for(first_try_seen.wait(), PROCESS_WAIT_S)

    assert await reload_config(gateway.state, lambda: moved(new.url))
    fail_first_try.set()
    got = await asyncio.wait_for(answer, PROCESS_WAIT_S)

    assert old.count() == 1, "the retry went to the old upstream"
    assert (got.status, got.document["batch"]["id"]) == (200, "batch-1"), "the retry went to the old upstream"
    assert [h["Authorization"] for h in new.headers] == [f"Bearer {NEW_TOKEN}"]
    assert new.headers[0]["X-Client-Name"] == "billing-service"
