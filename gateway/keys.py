"""Typed keys for what the app and each request carry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.state import GatewayState

STATE: web.AppKey[GatewayState] = web.AppKey("state")

# Per-request values, set by the middleware and the handler.
REQUEST_ID = "gateway.request_id"
CALLER = "gateway.caller"
CACHE_STATE = "gateway.cache_state"
TRACE = "gateway.trace"
