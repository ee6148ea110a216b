"""``GET /v2/batches/{id}``: answer from the cache, and hold the request until
its batch changes when asked (docs/design.md §6, §9).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.api import rules
from gateway.api.admission import Admitted, admit, check_scope, upstream_request
from gateway.api.answers import cache_headers
from gateway.api.auth import Caller
from gateway.api.keys import CACHE_STATE
from gateway.api.state import GatewayState
from gateway.cache.entry import CacheResult, CacheState
from gateway.cache.waiting import WaitEnd
from gateway.config import CacheSettings
from gateway.upstream.answers import UpstreamReply, accept_batch, accept_json_object
from gateway.upstream.client import BATCHES_PATH, UpstreamRequest, batch_path
from gateway.upstream.cohere import new_request_id, parse_batch_id, upstream_message


async def get_batch(request: web.Request) -> web.Response:
    """``GET /v2/batches/{id}``: authenticate, validate, answer from the cache; wait for a change if asked."""
    admitted = await admit(request, "retrieve")
    state, caller = admitted.state, admitted.caller
    batch_id = parse_batch_id(request.match_info["id"])
    await check_scope(state, caller, batch_id)
    config = admitted.snapshot.config
    wait_s = state.upstream.flight_wait_s()

    def fetch(may_wait: bool) -> Awaitable[UpstreamReply]:
        # Built only on a miss: a hit never needs it.
        call = upstream_request(request, caller, batch_path(batch_id))
        return state.upstream.fetch(call, may_wait, accept_batch)

    if_none_match = request.headers.getall("If-None-Match", [])
    wants_wait = rules.requested_wait(request.headers.getall("Prefer", []))
    # Without If-None-Match, a wait is for a change from what the cache held on arrival.
    held_on_arrival = state.cache.store.get(batch_id) if wants_wait and not if_none_match else None
    # Until the cache says otherwise, this request is a miss: an upstream failure
    # answered without a stale entry still reports X-Cache: MISS.
    request[CACHE_STATE] = CacheState.MISS.value
    result = await state.cache.get(batch_id, fetch, wait_s)
    applied: int | None = None
    if wants_wait and rules.must_wait(result.entry, if_none_match, held_on_arrival):
        refused = _waiter_limit(state, caller, config.cache)
        if refused is not None:
            state.metrics.waits_ended.labels(refused.value).inc()  # answered at once, without Preference-Applied
        else:
            applied = min(wants_wait, int(config.cache.max_wait_s))
            result = await _wait_for_change(request, admitted, batch_id, applied, fetch, wait_s)
    request[CACHE_STATE] = result.state.value
    response = _render(result, state.clock(), if_none_match)
    if applied is not None:
        response.headers["Preference-Applied"] = f"wait={applied}"
    return response


def _waiter_limit(state: GatewayState, caller: Caller, settings: CacheSettings) -> WaitEnd | None:
    """Why a new wait may not be held (all the slots taken, or all of this caller's), or None if it may."""
    if state.waiters.total >= settings.max_waiters:
        return WaitEnd.LIMIT
    # One caller must not take every slot: the others can still wait (DESIGN §7).
    if state.waiters.held_by(caller.name) >= settings.max_waiters_per_caller:
        return WaitEnd.CALLER_LIMIT
    return None


async def _wait_for_change(
    request: web.Request,
    admitted: Admitted,
    batch_id: str,
    applied_s: int,
    fetch: Callable[[bool], Awaitable[UpstreamReply]],
    wait_s: float,
) -> CacheResult:
    """Hold the request until its batch changes or its wait ends; then the cache's answer as it is."""
    state, caller = admitted.state, admitted.caller

    # The refresher keeps these for as long as the batch has waiters, across reloads:
    # they hold no upstream settings, as each call reads those in force when it is made.
    def refresh_fetch() -> Callable[[bool], Awaitable[UpstreamReply]]:
        # Each refresh is a call of its own, with a request id of its own.
        call = UpstreamRequest(batch_path(batch_id), caller.name, new_request_id())
        return partial(state.upstream.fetch, call, accept=accept_batch)

    async def list_page(page_size: int) -> dict[str, Any]:
        query = (("order_by", "updated_at"), ("page_size", str(page_size)))
        call = UpstreamRequest(BATCHES_PATH, caller.name, new_request_id(), query=query)
        # may_wait False: a look for changes is a refresh, and leaves the budget's reserve alone.
        return (await state.upstream.fetch(call, False, accept_json_object)).document

    state.refresher.follow(batch_id, refresh_fetch, list_page)
    # The end of a wait is spread by up to N/16, so that waiters do not all return together.
    held_s = applied_s * (1 - state.cache.jitter() / 16)
    end = await state.waiters.wait(batch_id, caller.name, held_s, getattr(request.protocol, "closed", None))
    state.metrics.waits_ended.labels(end.value).inc()
    return await state.cache.get(batch_id, fetch, wait_s)


def _render(result: CacheResult, now: float, if_none_match: list[str]) -> web.Response:
    entry = result.entry
    headers = cache_headers(entry, result.state, now)
    if entry.status == 200:
        if rules.not_modified(if_none_match, entry.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=entry.body, headers=headers, content_type="application/json")
    # A cached 404: rendered as the contract's error, with the cache headers kept.
    raise errors.NotFound(upstream_message(entry.body), upstream_status=404, headers=headers)
