"""Build the aiohttp Application: routes, the middleware, the upstream's life.

The middleware is the one place where errors become responses: every
``GatewayError`` raised below it, aiohttp's own 404/405/413, and any bug,
leave as the contract's JSON error. It also assigns the request id and
writes the access log line and request metrics.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import HttpVersion10, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDictProxy

from gateway import errors
from gateway.api import batches, create, datasets, downloads, events, retrieve, rules, service, upload
from gateway.api.keys import CACHE_STATE, CALLER, REQUEST_ID, STATE, TRACE
from gateway.api.state import GatewayState
from gateway.upstream.client import RequestTrace
from gateway.upstream.cohere import new_request_id

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
BATCH_ROUTE = "/v2/batches/{id}"
BATCHES_ROUTE = "/v2/batches"
CANCEL_ROUTE = "/v2/batches/{id}:cancel"
# The router's patterns: a path is one resource, so a 405's Allow lists that resource's methods
# alone (docs/design.md §8): '{id}:cancel' is not a batch, 'usage' is not a dataset.
_BATCH_PATTERN = "/v2/batches/{id:(?![^/]*:cancel$)[^{}/]+}"
DATASETS_ROUTE = "/v1/datasets"
DATASET_USAGE_ROUTE = "/v1/datasets/usage"
DATASET_ROUTE = "/v1/datasets/{id}"
_DATASET_PATTERN = "/v1/datasets/{id:(?!usage$)[^{}/]+}"
METRICS_ROUTE = "/metrics"
# The Server header of every answer: the product, never its version (that is in
# --version and gateway_build_info), so a scan learns nothing to match against.
SERVER = "cohere-gateway"

log = logging.getLogger("gateway")


def request_id_for(headers: CIMultiDictProxy[str]) -> str:
    """The caller's ``X-Request-ID`` if it is sane, else a fresh one."""
    given = headers.getall("X-Request-ID", [])
    if len(given) == 1 and _SANE_REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return new_request_id()


def error_response(
    error: errors.GatewayError, request_id: str, redact: Callable[[str], str] | None = None
) -> web.Response:
    """Render one row of the error table: the single JSON shape, its message redacted."""
    response = web.Response(
        status=error.status,
        body=error.body(request_id, redact),
        content_type="application/json",
        headers=error.headers(),
    )
    response.headers["X-Request-ID"] = request_id
    response.headers["Server"] = SERVER
    return response


def _from_http_exception(exc: web.HTTPException) -> errors.GatewayError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return errors.MethodNotAllowed(
            f"Method {exc.method} is not allowed here; use {allowed}.", headers={"Allow": allowed}
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return errors.BodyTooLarge()
    if isinstance(exc, web.HTTPNotFound):
        return errors.RouteNotFound()
    return errors.MalformedRequest(exc.reason)


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    request_id = request[REQUEST_ID] = request_id_for(request.headers)
    request[TRACE] = RequestTrace()
    state = request.app[STATE]
    try:
        if request.version < HttpVersion10:
            # llhttp reads "GET /path" with no version as HTTP/0.9 and still parses
            # headers after it; a proxy in front would not. Refuse it.
            raise errors.MalformedRequest("The request line has no HTTP version.")
        if (request.content_length or 0) > rules.body_limit(state.snapshot.config, request.method, request.path):
            raise errors.BodyTooLarge()
        response = await handler(request)
    except errors.GatewayError as error:
        response = error_response(error, request_id, state.redact.known)
        if isinstance(error, errors.BodyTooLarge) and not request.content.is_eof():
            # What is left of a body too large is not read (an upload's may be gigabytes): close.
            response.force_close()
        if CACHE_STATE in request and "X-Cache" not in response.headers:
            # An upstream failure on the batch route: still a batch answer (docs/design.md §5),
            # but nothing was cached, so nothing may be reused.
            response.headers["X-Cache"] = request[CACHE_STATE]
            response.headers["Cache-Control"] = "no-store"
    except web.HTTPException as exc:
        response = error_response(_from_http_exception(exc), request_id)
    except Exception:
        log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
        response = error_response(errors.InternalError(), request_id)
    response.headers["X-Request-ID"] = request_id
    _account(request, response, state, time.perf_counter() - started)
    return response


def _account(request: web.Request, response: web.StreamResponse, state: GatewayState, elapsed: float) -> None:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    record_request(
        state,
        request_id=request[REQUEST_ID],
        caller=request.get(CALLER, "-"),
        route=route,
        path=request.path if route == "unmatched" else route,
        batch_id=request.match_info.get("id"),
        status=response.status,
        cache=request.get(CACHE_STATE, response.headers.get("X-Cache", "-")),
        trace=request[TRACE],
        elapsed_s=elapsed,
        method=request.method,
    )


def record_request(
    state: GatewayState,
    *,
    request_id: str,
    caller: str,
    route: str,
    path: str | None,
    batch_id: str | None,
    status: int,
    cache: str,
    trace: RequestTrace | None,
    elapsed_s: float | None,
    method: str | None = "GET",
) -> None:
    """Request metrics and the access log line (docs/observability.md, "Logs") of one answered request.

    ``elapsed_s`` is None for a request aiohttp could not parse: it is
    counted, but not timed.
    """
    # labels() validates and locks on every call; the children are looked up once per label set.
    children = state.metric_children
    labels = (caller, route, status, cache)
    counter = children.get(labels)
    if counter is None:
        counter = children[labels] = state.metrics.requests.labels(caller, route, str(status), cache)
    histogram = None
    if elapsed_s is not None:
        histogram = children.get(route)
        if histogram is None:
            histogram = children[route] = state.metrics.request_seconds.labels(route)
    # Counted and timed at the loop turn's end, with the turn's other requests (Metrics.tally).
    state.metrics.tally.add(counter, histogram, elapsed_s)
    if not state.snapshot.config.logging.access_log:
        return
    state.access_log.add(
        request_id=request_id,
        caller=caller,
        method=method,
        path=path,
        batch_id=batch_id,
        status=status,
        cache=cache,
        upstream_status=trace.upstream_status if trace else None,
        upstream_ms=trace.upstream_ms if trace else None,
        total_ms=round(elapsed_s * 1000, 2) if elapsed_s is not None else None,
    )


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    """The one upstream ``ClientSession`` lives as long as the app."""
    upstream = app[STATE].upstream
    await upstream.start()
    yield
    await upstream.close()


async def _answer_waiters(app: web.Application) -> None:
    """On SIGTERM every held request is answered at once, before in-flight requests are drained."""
    app[STATE].waiters.release_all()


async def _end_event_streams(app: web.Application) -> None:
    """On SIGTERM held feed requests answer and event streams end at once (docs/design.md §12)."""
    events.end_streams(app)


async def _refresher(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[STATE].refresher.close()


async def _redis_link(app: web.Application) -> AsyncIterator[None]:
    """The link to the shared Redis (docs/design.md §10), when one is configured; a Redis that is down is not fatal."""
    link = app[STATE].redis
    if link is not None:
        await link.start()
    yield
    if link is not None:
        await link.close()


async def _record_store(app: web.Application) -> AsyncIterator[None]:
    """The ownership and idempotency store is open as long as the app."""
    records = app[STATE].records
    await records.start()
    yield
    await records.close()


async def _event_log(app: web.Application) -> AsyncIterator[None]:
    """The event log and the usage store (docs/design.md §12), when events.enabled: open as long as the app."""
    state = app[STATE]
    if state.events is None:
        yield
        return
    await state.events.start()
    # Usage is counted as the sightings append events: its store opens before them and closes after the last
    # queued sighting is recorded, so that a batch seen finishing while the gateway stops is still counted.
    if state.usage is not None:
        await state.usage.store.start()
    if state.sightings is not None:
        state.sightings.start()
    yield
    if state.sightings is not None:
        await state.sightings.close()
    if state.usage is not None:
        await state.usage.store.close()
    await state.events.close()


async def _following(app: web.Application) -> AsyncIterator[None]:
    """The follower (docs/design.md §12), when events.enabled; the lease is given up at the end."""
    state = app[STATE]
    if state.follower is not None:
        state.follower.start()
    yield
    if state.follower is not None:
        await state.follower.close()


async def _webhooks(app: web.Application) -> AsyncIterator[None]:
    """Webhook deliveries run as long as the app, after the store and the event log are open (docs/design.md §12)."""
    webhooks = app[STATE].webhooks
    if webhooks is not None:
        await webhooks.start()
    yield
    if webhooks is not None:
        await webhooks.close()


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """Every answer the app makes, streamed ones included, names the server without its version."""
    response.headers["Server"] = SERVER


def build_app(state: GatewayState) -> web.Application:
    """The API: the batch routes and the service endpoints (``/metrics`` only without ``server.metrics_port``).

    Every GET route answers HEAD too (aiohttp's ``allow_head``): the same
    handler, so the same key, permission, scope, cache and ETag rules, and
    aiohttp leaves out the body (RFC 9110 9.3.2).
    """
    # client_max_size bounds aiohttp's request.read() and post(), which no route calls: bodies are
    # read by receive_body and the upload, both bounded by rules.body_limit. It stays the JSON limit.
    app = web.Application(middlewares=[gateway_middleware], client_max_size=state.snapshot.config.server.max_body_bytes)
    app[STATE] = state
    app.on_response_prepare.append(_server_header)
    app[datasets.USAGE] = datasets.UsageCache()
    app.router.add_get(_BATCH_PATTERN, retrieve.get_batch)
    app.router.add_get(BATCHES_ROUTE, batches.list_batches)
    app.router.add_post(BATCHES_ROUTE, create.create_batch)
    app.router.add_post(CANCEL_ROUTE, batches.cancel_batch)
    app[events.FEED] = events.Feed()
    app.router.add_get(events.EVENTS_ROUTE, events.get_events)
    app.router.add_get(downloads.PART_ROUTE, downloads.download_part)
    app.router.add_get(downloads.ORIGINAL_ROUTE, downloads.download_original)
    app.router.add_route("*", CANCEL_ROUTE, batches.not_a_cancel)
    app.router.add_get(DATASETS_ROUTE, datasets.list_datasets)
    app.router.add_get(DATASET_USAGE_ROUTE, datasets.dataset_usage)  # before {id}: a literal, not a dataset
    app.router.add_get(_DATASET_PATTERN, datasets.get_dataset)
    app.router.add_delete(_DATASET_PATTERN, datasets.delete_dataset)
    app.router.add_post(rules.UPLOAD_PATH, upload.upload_dataset)
    app.router.add_get("/healthz", service.healthz)
    app.router.add_get("/readyz", service.readyz)
    if not state.snapshot.config.server.metrics_port:
        app.router.add_get(METRICS_ROUTE, service.metrics)
    app.cleanup_ctx.append(_redis_link)
    app.cleanup_ctx.append(_record_store)
    app.cleanup_ctx.append(_event_log)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_refresher)
    app.cleanup_ctx.append(_following)
    app[downloads.DOWNLOADS] = downloads.Downloads(state)
    app.cleanup_ctx.append(app[downloads.DOWNLOADS].lifecycle)
    app.cleanup_ctx.append(_webhooks)
    app.on_shutdown.append(_answer_waiters)
    app.on_shutdown.append(_end_event_streams)
    return app


def build_metrics_app(state: GatewayState) -> web.Application:
    """``/metrics`` alone, for its own listener (``server.metrics_port``): the same middleware, errors and log."""
    app = web.Application(middlewares=[gateway_middleware], client_max_size=state.snapshot.config.server.max_body_bytes)
    app[STATE] = state
    app.on_response_prepare.append(_server_header)
    app.router.add_get(METRICS_ROUTE, service.metrics)
    return app
