"""The batch API's routes (retrieve, list, cancel; create is in ``gateway.create``) and the service endpoints.

Each batch route starts with ``admit``: the caller key, the caller's own
rate limit, then the operation's permission (``gateway.policy``), in that
order, before its input is checked and anything reaches the upstream. A
route that reads a body reads it with ``receive_body``: each byte must
come within ``server.body_timeout_s``, and once the body is whole the
caller is admitted again under the config in force then (DESIGN §7).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from gateway import errors, policy
from gateway.auth import Caller
from gateway.cache import CacheEntry, CacheResult, CacheState, UpstreamReply
from gateway.config import CacheSettings, Operation
from gateway.keys import CACHE_STATE, CALLER, REQUEST_ID, STATE, TRACE
from gateway.logs import log_event
from gateway.protocol import UNPARSEABLE, new_request_id, parse_batch_id, upstream_message
from gateway.refresh import WaitEnd
from gateway.state import GatewayState, Snapshot
from gateway.upstream import (
    BATCHES_PATH,
    FORWARDED_CALLER_HEADERS,
    UpstreamRequest,
    accept_batch,
    batch_path,
)

log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request whose caller is known, within its limit and allowed the operation."""

    state: GatewayState
    snapshot: Snapshot  # this request's config, whatever a reload does meanwhile
    caller: Caller


async def admit(request: web.Request, operation: Operation) -> Admitted:
    """Authenticate, apply the caller's rate limit, then its permission for ``operation``."""
    state = request.app[STATE]
    snapshot = state.snapshot
    caller = snapshot.callers.authenticate(request.headers.getall("Authorization", []))
    request[CALLER] = caller.name
    await _check_caller_limit(state, caller)
    policy.authorize(caller, operation)
    return Admitted(state, snapshot, caller)


def readmit(request: web.Request, admitted: Admitted, operation: Operation) -> Admitted:
    """``admitted`` checked again under the config in force now: a reload may have come since the head.

    The same decisions as ``admit`` (key, then permission), against the new
    snapshot; the key must still name the same caller. The rate limit is
    not taken twice. The new ``Caller`` carries its scope as configured now,
    and the new snapshot's upstream settings serve the rest of the request.
    """
    snapshot = admitted.state.snapshot
    if snapshot is admitted.snapshot:
        return admitted
    caller = snapshot.callers.authenticate(request.headers.getall("Authorization", []))
    if caller.name != admitted.caller.name:
        raise errors.Unauthorized("Unknown caller key.")
    policy.authorize(caller, operation)
    return Admitted(admitted.state, snapshot, caller)


async def receive_body(request: web.Request, admitted: Admitted, operation: Operation) -> tuple[Admitted, bytes]:
    """The whole body, each read bounded by ``server.body_timeout_s``; then the caller admitted again.

    A body with no byte for that long is 408 ``request_timeout`` (the
    connection is closed; see ``gateway.server``). A client that hangs up
    mid-body ends the request as ``ClientDisconnected``: logged at INFO,
    never a server error.
    """
    server = admitted.snapshot.config.server
    chunks: list[bytes] = []
    size = 0
    while True:
        deadline = asyncio.timeout(server.body_timeout_s)
        try:
            async with deadline:
                chunk = await request.content.readany()
        except web.RequestPayloadError:
            raise errors.MalformedRequest("The request body's framing is broken.") from None
        # The connection's loss is whatever OSError the transport saw (TimeoutError
        # included): only the deadline's own is a 408.
        except OSError:
            if deadline.expired():
                log_event(log, logging.INFO, "a request body stopped arriving", caller=admitted.caller.name)
                raise errors.RequestTimeout() from None
            log_event(log, logging.INFO, "the client hung up mid-body", caller=admitted.caller.name)
            raise errors.ClientDisconnected() from None
        if not chunk:
            return readmit(request, admitted, operation), b"".join(chunks)
        size += len(chunk)
        if size > server.max_body_bytes:
            raise errors.BodyTooLarge()
        chunks.append(chunk)


async def _check_caller_limit(state: GatewayState, caller: Caller) -> None:
    if caller.rate_limit is None:
        return
    # Awaited: with redis.url the caller's bucket is in Redis, one for every process.
    wait = await state.take_caller_token(caller.name, caller.rate_limit)
    if wait:
        state.metrics.caller_rejections.labels(caller.name).inc()
        raise errors.CallerRateLimited(retry_after_s=wait)


async def check_scope(state: GatewayState, caller: Caller, batch_id: str) -> None:
    """404 ``not_found`` for a batch an ``own`` caller did not create; the store answers (503 if it cannot)."""
    if not policy.sees_every_batch(caller):
        policy.check_visible(caller, await state.records.owner_of(batch_id))


def upstream_request(request: web.Request, caller: Caller, path: str, **call: Any) -> UpstreamRequest:
    """The upstream call for ``request``: the caller's name and request id, the SDK's own headers."""
    return UpstreamRequest(
        path=path,
        caller_name=caller.name,
        request_id=request[REQUEST_ID],
        caller_headers=tuple((h, request.headers[h]) for h in FORWARDED_CALLER_HEADERS if h in request.headers),
        trace=request[TRACE],
        **call,
    )


def json_answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


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
    wants_wait = policy.requested_wait(request.headers.getall("Prefer", []))
    # Without If-None-Match, a wait is for a change from what the cache held on arrival.
    held_on_arrival = state.cache.store.get(batch_id) if wants_wait and not if_none_match else None
    # Until the cache says otherwise, this request is a miss: an upstream failure
    # answered without a stale entry still reports X-Cache: MISS.
    request[CACHE_STATE] = CacheState.MISS.value
    result = await state.cache.get(batch_id, fetch, wait_s)
    applied: int | None = None
    if wants_wait and policy.must_wait(result.entry, if_none_match, held_on_arrival):
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


def cache_headers(entry: CacheEntry, state: CacheState, now: float) -> dict[str, str]:
    """The cache's headers on a batch answer (DESIGN §5, §9), for both ways a hit is served."""
    fresh_s = 0 if state is CacheState.STALE else entry.fresh_s(now)
    return {
        "X-Cache": state.value,
        "Age": str(entry.age_s(now)),
        "Cache-Control": f"private, max-age={fresh_s}",
        "ETag": entry.etag,
    }


def _render(result: CacheResult, now: float, if_none_match: list[str]) -> web.Response:
    entry = result.entry
    headers = cache_headers(entry, result.state, now)
    if entry.status == 200:
        if policy.not_modified(if_none_match, entry.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=entry.body, headers=headers, content_type="application/json")
    # A cached 404: rendered as the contract's error, with the cache headers kept.
    raise errors.NotFound(upstream_message(entry.body), upstream_status=404, headers=headers)


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    """A 2xx upstream answer whose body is a JSON object."""

    status: int
    body: bytes
    document: dict[str, Any]


def accept_json_object(status: int, body: bytes) -> JsonAnswer | None:
    """List and cancel: any 2xx whose body is a JSON object."""
    if not 200 <= status < 300:
        return None
    try:
        document = json.loads(body)
    except UNPARSEABLE:
        document = None
    if not isinstance(document, dict):
        raise errors.UpstreamInvalidResponse("The upstream's answer was not a JSON object.", upstream_status=status)
    return JsonAnswer(status, body, document)


async def list_batches(request: web.Request) -> web.Response:
    """``GET /v2/batches``: the upstream's page; an ``own`` caller sees only its batches in it."""
    admitted = await admit(request, "list")
    state, caller = admitted.state, admitted.caller
    query = policy.list_query(request.query)
    call = upstream_request(request, caller, BATCHES_PATH, query=query)
    page = await state.upstream.fetch(call, True, accept_json_object)
    if policy.sees_every_batch(caller):
        return json_answer(page.status, page.body)
    batches = policy.batches_of(page.document)
    owners = {batch_id: await state.records.owner_of(batch_id) for batch_id in policy.ids_of(batches)}
    # A page may come back shorter or empty; next_page_token is kept, as the upstream allows.
    mine = [b for b in batches if isinstance(b, dict) and policy.may_see(caller, owners.get(b.get("id")))]  # type: ignore[arg-type]
    return json_answer(page.status, json.dumps({**page.document, "batches": mine}).encode())


async def cancel_batch(request: web.Request) -> web.Response:
    """``POST /v2/batches/{id}:cancel``: cancel upstream, then evict the id's cache entry."""
    admitted = await admit(request, "cancel")
    if not request.raw_path.partition("?")[0].endswith(":cancel"):
        # The router matched a decoded path: '/v2/batches/a%3Acancel' names a batch
        # whose id is 'a:cancel' (a percent-encoded ':' is not a delimiter), not a cancel.
        raise errors.InvalidBatchId()
    batch_id = parse_batch_id(request.match_info["id"])
    admitted, body = await receive_body(request, admitted, "cancel")
    policy.check_cancel_body(body)
    state, caller = admitted.state, admitted.caller
    await check_scope(state, caller, batch_id)
    # Cancelling twice is harmless, so a cancel may be retried like a read.
    call = upstream_request(request, caller, f"{batch_path(batch_id)}:cancel", method="POST", write=True)
    answer = await state.upstream.fetch(call, True, accept_json_object)
    await state.cache.evict(batch_id)
    return json_answer(answer.status, answer.body)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ready = bool(state.snapshot.config.upstream.token_value) and state.upstream.started
    return web.json_response({"status": "ready" if ready else "starting"}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
