"""Typed keys for what the app and each request carry."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
