"""Responses the routes share: a JSON answer, and the cache's headers on a
batch answer (for both ways a hit is served).
"""

from __future__ import annotations

from aiohttp import web

from gateway.cache.entry import CacheEntry, CacheState


def json_answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


def cache_headers(entry: CacheEntry, state: CacheState, now: float) -> dict[str, str]:
    """The cache's headers on a batch answer (docs/design.md §5, §9), for both ways a hit is served."""
    fresh_s = 0 if state is CacheState.STALE else entry.fresh_s(now)
    return {
        "X-Cache": state.value,
        "Age": str(entry.age_s(now)),
        "Cache-Control": f"private, max-age={fresh_s}",
        "ETag": entry.etag,
    }
