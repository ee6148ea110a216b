"""``GET /v2/batches/{id}``: answer from the cache, and hold the request until
its batch changes when asked (docs/design.md §6, §9). ``cached_answer`` is
the same path for any cached resource: ``GET /v1/datasets/{id}`` takes it
too (``gateway.api.datasets``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.api import rules
from gateway.api.admission import Admitted, check_caller_limit, check_scope, count_limit_refusal, upstream_request
from gateway.api.answers import cache_headers
from gateway.api.auth import Caller
from gateway.api.dataset_scope import record_outputs
from gateway.api.decide import (
    Answer,
    HandOn,
    Head,
    Refuse,
    Rendered,
    Stage,
    decide,
    render,
    take_token,
    token_taken,
)
from gateway.api.keys import CACHE_STATE, CALLER, STATE, client_gone
from gateway.api.state import GatewayState
from gateway.cache.entry import CacheResult, CacheState
from gateway.cache.waiting import WaitEnd
from gateway.config import CacheSettings
from gateway.datasets.facts import batch_naming_an_output
from gateway.upstream.answers import UpstreamReply, accept_batch, accept_json_object
from gateway.upstream.client import BATCHES_PATH, Accept, UpstreamRequest, batch_path
from gateway.upstream.cohere import new_request_id, upstream_message


async def get_batch(request: web.Request) -> web.Response:
    """``GET /v2/batches/{id}``: the one decision (``gateway.api.decide``), then what it handed on, if anything."""
    state = request.app[STATE]
    snapshot = state.snapshot
    head = Head(request.method, request.match_info["id"], request.headers)
    decision = decide(state, snapshot, head, take_token)
    if isinstance(decision, HandOn) and decision.stage is Stage.LIMIT:
        request[CALLER] = decision.caller.name
        await check_caller_limit(state, decision.caller)  # the caller's bucket is in Redis
        decision = decide(state, snapshot, head, token_taken)
    if isinstance(decision, Refuse):
        if decision.caller is not None:
            request[CALLER] = decision.caller.name
            if isinstance(decision.error, errors.CallerRateLimited):
                count_limit_refusal(state, decision.caller)
        raise decision.error
    request[CALLER] = decision.caller.name
    if isinstance(decision, Answer):
        request[CACHE_STATE] = CacheState.HIT.value
        return _response(decision.rendered)
    assert decision.batch_id is not None  # handed on past the id's step
    admitted = Admitted(state, snapshot, decision.caller)
    if decision.stage is Stage.SCOPE:
        await check_scope(state, decision.caller, decision.batch_id)
    return await _from_cache(request, admitted, decision.batch_id)


@dataclass(frozen=True, slots=True)
class Cached:
    """What the cache path needs of one resource: a batch, or a dataset (docs/design.md §11).

    ``key`` is its cache entry's key (a dataset's is ``dataset_key(id)``, never
    a batch id); ``seen`` runs on each upstream answer before it is cached.
    Only a batch is on the batch list, so only a batch's waits may be looked
    after by the list's change detection (``listed``).
    """

    key: str
    path: str
    accept: Accept[UpstreamReply]
    listed: bool = True
    seen: Callable[[UpstreamReply], Awaitable[None]] | None = None


@dataclass(frozen=True, slots=True)
class Held:
    """The cache's answer to a request, the wait applied (None: not held) and the caller's ``If-None-Match``."""

    result: CacheResult
    applied: int | None
    if_none_match: list[str]


async def _from_cache(request: web.Request, admitted: Admitted, batch_id: str) -> web.Response:
    """A batch from the cache or one shared upstream call; held for a change if asked."""
    state = admitted.state

    async def seen(reply: UpstreamReply) -> None:
        # A finished batch names its output dataset: it is its owner's (docs/design.md §11).
        if reply.status == 200 and (batch := batch_naming_an_output(reply.body)) is not None:
            await record_outputs(state, [batch])

    held = await cached_answer(request, admitted, Cached(batch_id, batch_path(batch_id), accept_batch, seen=seen))
    response = _render(held.result, state.clock(), held.if_none_match)
    if held.applied is not None:
        response.headers["Preference-Applied"] = f"wait={held.applied}"
    return response


async def cached_answer(request: web.Request, admitted: Admitted, resource: Cached) -> Held:
    """Answer from the cache or one shared upstream call; hold the request for a change if asked."""
    state, caller, config = admitted.state, admitted.caller, admitted.snapshot.config
    wait_s = state.upstream.flight_wait_s()

    def fetch(may_wait: bool) -> Awaitable[UpstreamReply]:
        # Built only on a miss: a hit never needs it.
        return _fetched(state, upstream_request(request, caller, resource.path), may_wait, resource)

    if_none_match = request.headers.getall("If-None-Match", [])
    wants_wait = rules.requested_wait(request.headers.getall("Prefer", []))
    # Without If-None-Match, a wait is for a change from what the cache held on arrival.
    held_on_arrival = state.cache.store.get(resource.key) if wants_wait and not if_none_match else None
    # Until the cache says otherwise, this request is a miss: an upstream failure
    # answered without a stale entry still reports X-Cache: MISS.
    request[CACHE_STATE] = CacheState.MISS.value
    result = await state.cache.get(resource.key, fetch, wait_s)
    applied: int | None = None
    if wants_wait and rules.must_wait(result.entry, if_none_match, held_on_arrival):
        refused = _waiter_limit(state, caller, config.cache)
        if refused is not None:
            state.metrics.waits_ended.labels(refused.value).inc()  # answered at once, without Preference-Applied
        else:
            applied = min(wants_wait, int(config.cache.max_wait_s))
            result = await _wait_for_change(request, admitted, resource, applied, fetch, wait_s)
    request[CACHE_STATE] = result.state.value
    return Held(result, applied, if_none_match)


async def _fetched(state: GatewayState, call: UpstreamRequest, may_wait: bool, resource: Cached) -> UpstreamReply:
    reply = await state.upstream.fetch(call, may_wait, resource.accept)
    if resource.seen is not None:
        await resource.seen(reply)
    return reply


def _waiter_limit(state: GatewayState, caller: Caller, settings: CacheSettings) -> WaitEnd | None:
    """Why a new wait may not be held (all the slots taken, or all of this caller's), or None if it may."""
    if state.waiters.total >= settings.max_waiters:
        return WaitEnd.LIMIT
    # One caller must not take every slot: the others can still wait (docs/design.md §7).
    if state.waiters.held_by(caller.name) >= settings.max_waiters_per_caller:
        return WaitEnd.CALLER_LIMIT
    return None


async def _wait_for_change(
    request: web.Request,
    admitted: Admitted,
    resource: Cached,
    applied_s: int,
    fetch: Callable[[bool], Awaitable[UpstreamReply]],
    wait_s: float,
) -> CacheResult:
    """Hold the request until its resource changes or its wait ends; then the cache's answer as it is."""
    state, caller = admitted.state, admitted.caller

    # The refresher keeps these for as long as the resource has waiters, across reloads:
    # they hold no upstream settings, as each call reads those in force when it is made.
    def refresh_fetch() -> Callable[[bool], Awaitable[UpstreamReply]]:
        # Each refresh is a call of its own, with a request id of its own.
        call = UpstreamRequest(resource.path, caller.name, new_request_id())
        return partial(_fetched, state, call, resource=resource)

    async def list_page(page_size: int) -> dict[str, Any]:
        query = (("order_by", "updated_at"), ("page_size", str(page_size)))
        call = UpstreamRequest(BATCHES_PATH, caller.name, new_request_id(), query=query)
        # may_wait False: a look for changes is a refresh, and leaves the budget's reserve alone.
        return (await state.upstream.fetch(call, False, accept_json_object)).document

    state.refresher.follow(resource.key, refresh_fetch, list_page if resource.listed else None)
    # The end of a wait is spread by up to N/16, so that waiters do not all return together.
    held_s = applied_s * (1 - state.cache.jitter() / 16)
    end = await state.waiters.wait(resource.key, caller.name, held_s, client_gone(request))
    state.metrics.waits_ended.labels(end.value).inc()
    return await state.cache.get(resource.key, fetch, wait_s)


def _render(result: CacheResult, now: float, if_none_match: list[str]) -> web.Response:
    entry = result.entry
    if entry.status == 200:
        return _response(render(entry, result.state, now, if_none_match))
    # A cached 404: rendered as the contract's error, with the cache headers kept.
    headers = cache_headers(entry, result.state, now)
    raise errors.NotFound(upstream_message(entry.body), upstream_status=404, headers=headers)


def _response(rendered: Rendered) -> web.Response:
    """The app's response for a rendered batch answer (aiohttp leaves the body out of a HEAD's)."""
    return web.Response(status=rendered.status, headers=rendered.headers, body=rendered.body or None)
