"""Admission to the batch API: who the caller is, its own limit, its permission and its ``own`` scope.

List, cancel (``gateway.api.batches``) and create (``gateway.api.create``)
start with ``admit``: the caller key, the caller's own rate limit, then the
operation's permission (``gateway.api.rules``), in that order, before their
input is checked and anything reaches the upstream; retrieve takes the same
steps in the same order in the one decision (``gateway.api.decide``). A
route that reads a body reads it with ``receive_body``: each byte must
come within ``server.body_timeout_s``, and once the body is whole the
caller is admitted again under the config in force then (docs/design.md §7).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.api import rules
from gateway.api.auth import Caller
from gateway.api.keys import CALLER, REQUEST_ID, STATE, TRACE
from gateway.api.state import GatewayState, Snapshot
from gateway.config import Operation
from gateway.ops.logs import log_event
from gateway.upstream.client import FORWARDED_CALLER_HEADERS, UpstreamRequest

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
    await check_caller_limit(state, caller)
    rules.authorize(caller, operation)
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
    rules.authorize(caller, operation)
    return Admitted(admitted.state, snapshot, caller)


async def receive_body(request: web.Request, admitted: Admitted, operation: Operation) -> tuple[Admitted, bytes]:
    """The whole body, each read bounded by ``server.body_timeout_s``; then the caller admitted again.

    A body with no byte for that long is 408 ``request_timeout`` (the
    connection is closed; see ``gateway.edge.connection``). A client that hangs up
    mid-body ends the request as ``ClientDisconnected``: logged at INFO,
    never a server error.
    """
    server = admitted.snapshot.config.server
    limit = rules.body_limit(admitted.snapshot.config, request.method, request.path)
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
        if size > limit:
            raise errors.BodyTooLarge()
        chunks.append(chunk)


async def check_caller_limit(state: GatewayState, caller: Caller) -> None:
    """Take a token of the caller's ``rate_limit``, or raise 429 ``caller_rate_limited``."""
    if caller.rate_limit is None:
        return
    # Awaited: with redis.url the caller's bucket is in Redis, one for every process.
    wait = await state.take_caller_token(caller.name, caller.rate_limit)
    if wait:
        count_limit_refusal(state, caller)
        raise errors.CallerRateLimited(retry_after_s=wait)


def count_limit_refusal(state: GatewayState, caller: Caller) -> None:
    """The metric of a request refused for its caller's own rate limit."""
    state.metrics.caller_rejections.labels(caller.name).inc()


async def check_scope(state: GatewayState, caller: Caller, batch_id: str) -> None:
    """404 ``not_found`` for a batch an ``own`` caller did not create; the store answers (503 if it cannot)."""
    if not rules.sees_every_batch(caller):
        rules.check_visible(caller, await state.records.owner_of(batch_id))


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
