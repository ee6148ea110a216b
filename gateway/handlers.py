"""The routes: the batch route, and the service endpoints."""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp import web

from gateway import errors
from gateway.auth import Caller
from gateway.cache import CacheEntry, CacheResult, CacheState, UpstreamReply
from gateway.keys import CACHE_STATE, CALLER, REQUEST_ID, STATE, TRACE
from gateway.protocol import parse_batch_id, upstream_message
from gateway.state import GatewayState
from gateway.upstream import FORWARDED_CALLER_HEADERS, UpstreamRequest

# A waiter gives up a little after the fetch's own deadline would have fired.
WAIT_MARGIN_S = 1.0


def _check_caller_limit(state: GatewayState, caller: Caller) -> None:
    if caller.rate_limit is None:
        return
    wait = state.caller_bucket(caller.name, caller.rate_limit).try_take()
    if wait:
        state.metrics.caller_rejections.labels(caller.name).inc()
        raise errors.CallerRateLimited(retry_after_s=wait)


async def get_batch(request: web.Request) -> web.Response:
    """``GET /v2/batches/{id}``: authenticate, validate, answer from the cache."""
    state = request.app[STATE]
    snapshot = state.snapshot  # this request's config, whatever a reload does meanwhile
    caller = snapshot.callers.authenticate(request.headers.getall("Authorization", []))
    request[CALLER] = caller.name
    _check_caller_limit(state, caller)
    batch_id = parse_batch_id(request.match_info["id"])
    settings = snapshot.config.upstream

    def fetch(may_wait: bool) -> Awaitable[UpstreamReply]:
        # Built only on a miss: a hit never needs it.
        upstream_request = UpstreamRequest(
            batch_id=batch_id,
            caller_name=caller.name,
            request_id=request[REQUEST_ID],
            caller_headers=tuple((h, request.headers[h]) for h in FORWARDED_CALLER_HEADERS if h in request.headers),
            trace=request[TRACE],
        )
        return state.upstream.fetch(upstream_request, settings, may_wait)

    # Until the cache says otherwise, this request is a miss: an upstream failure
    # answered without a stale entry still reports X-Cache: MISS.
    request[CACHE_STATE] = CacheState.MISS.value
    result = await state.cache.get(batch_id, fetch, settings.timeout_s + WAIT_MARGIN_S)
    request[CACHE_STATE] = result.state.value
    return _render(result, state.clock())


def cache_headers(entry: CacheEntry, state: CacheState, now: float) -> dict[str, str]:
    """The cache's headers on a batch answer (DESIGN §5), for both ways a hit is served."""
    fresh_s = 0 if state is CacheState.STALE else entry.fresh_s(now)
    return {
        "X-Cache": state.value,
        "Age": str(entry.age_s(now)),
        "Cache-Control": f"private, max-age={fresh_s}",
    }


def _render(result: CacheResult, now: float) -> web.Response:
    entry = result.entry
    headers = cache_headers(entry, result.state, now)
    if entry.status == 200:
        return web.Response(body=entry.body, headers=headers, content_type="application/json")
    # A cached 404: rendered as the contract's error, with the cache headers kept.
    raise errors.NotFound(upstream_message(entry.body), upstream_status=404, headers=headers)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ready = bool(state.snapshot.config.upstream.token_value) and state.upstream.started
    return web.json_response({"status": "ready" if ready else "starting"}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
