"""Typed keys for what the app and each request carry, and what the app asks of a connection."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from aiohttp import web

if TYPE_CHECKING:
    from gateway.api.state import GatewayState
    from gateway.upstream.client import RequestTrace

STATE: web.AppKey[GatewayState] = web.AppKey("state")

# Per-request values, set by the middleware and the handler.
REQUEST_ID = web.RequestKey("request_id", str)
CALLER = web.RequestKey("caller", str)
CACHE_STATE = web.RequestKey("cache_state", str)
TRACE: web.RequestKey[RequestTrace] = web.RequestKey("trace")


@runtime_checkable
class NoticesHangUps(Protocol):
    """A connection that says when its client went away (``gateway.edge.connection`` keeps one per connection).

    aiohttp tells a handler nothing when its client leaves; a held wait
    (``Prefer: wait``) must end at once all the same.
    """

    closed: asyncio.Future[None]


def client_gone(request: web.Request) -> asyncio.Future[None] | None:
    """Done when ``request``'s client has gone away; None where the connection cannot tell."""
    protocol = request.protocol
    return protocol.closed if isinstance(protocol, NoticesHangUps) else None
