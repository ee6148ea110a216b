"""Fresh cache hits answered as soon as their request is parsed, below aiohttp's Application.

A fresh hit is a dict lookup, yet through the Application it paid for a
task, a Request, the middleware, the router, a Response and its writer:
three times the gateway's own work (``bench/run.py``, ``hit_vs_ceiling``).
``answer_fresh_hit`` makes the same answer from the parsed request head.

It answers only the plainest case: ``GET /v2/batches/<well-formed id>``
(or ``HEAD``: the same head, ``Content-Length`` included, and no body)
over HTTP/1.1 on a kept-alive connection, no body, no ``Expect``, one
valid caller key, a caller within its rate limit (with ``redis.url``, a
caller that has one goes to the app: its bucket is in Redis) and allowed to retrieve
the batch (``gateway.policy``, the rules the app applies too), no
``Prefer: wait`` (a wait is held by the app), and a fresh 200 in the
cache; it is a 304 when ``If-None-Match`` names its ETag, by the same rule
as the app's. For anything else it returns None and the request goes
through the Application unchanged, which gives the same answer, every error
included: a refusal, or an ``own`` caller whose ownership of the batch is
not in memory, is the app's to answer.
"""

from __future__ import annotations

import time

from aiohttp import HttpVersion11
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http_parser import RawRequestMessage

from gateway import errors
from gateway.api import rules
from gateway.api.answers import cache_headers
from gateway.api.app import BATCH_ROUTE, SERVER, record_request, request_id_for
from gateway.api.state import GatewayState
from gateway.cache.entry import CacheState
from gateway.upstream.cohere import BATCH_ID

BATCH_PATH_PREFIX = BATCH_ROUTE.removesuffix("{id}")
OK = "HTTP/1.1 200 OK\r\n"
NOT_MODIFIED = "HTTP/1.1 304 Not Modified\r\n"
JSON_BODY = "Content-Type: application/json\r\n"
CRLF = "\r\n"
# HEAD is GET without the body (RFC 9110 9.3.2): the rules and the head are the same.
METHODS = frozenset({"GET", "HEAD"})


def answer_fresh_hit(state: GatewayState, message: RawRequestMessage) -> bytes | None:
    """The whole HTTP response to ``message`` if it is a plain fresh hit, else None."""
    started = time.perf_counter()
    if (
        message.method not in METHODS
        or message.version != HttpVersion11
        or message.should_close
        or message.upgrade
        or not message.path.startswith(BATCH_PATH_PREFIX)
        or "Expect" in message.headers
    ):
        return None
    # The raw target: an id that is well formed as sent has no '%', '?', '#' or
    # '/', so the router would match it to the same id.
    batch_id = message.path[len(BATCH_PATH_PREFIX) :]
    if not BATCH_ID.fullmatch(batch_id):
        return None
    try:
        caller = state.snapshot.callers.authenticate(message.headers.getall("Authorization", []))
        rules.authorize(caller, "retrieve")
    except errors.GatewayError:
        return None
    if caller.rate_limit is not None and state.shared_caller_limits is not None:
        # With redis.url its limit is one bucket in Redis (DESIGN §7, §10), which this
        # synchronous path must never wait on: the app, which awaits Redis, answers it.
        # The hit then costs the app's work; callers without a rate_limit keep the inline path.
        return None
    if not rules.sees_every_batch(caller) and not rules.may_see(caller, state.records.known_owner(batch_id)):
        return None
    if "Prefer" in message.headers and rules.requested_wait(message.headers.getall("Prefer")) is not None:
        return None  # a wait is held by the app
    entry = state.cache.fresh(batch_id)
    if entry is None or entry.status != 200:
        return None
    request_id = request_id_for(message.headers)
    headers = cache_headers(entry, CacheState.HIT, state.clock())
    unchanged = "If-None-Match" in message.headers and rules.not_modified(
        message.headers.getall("If-None-Match"), entry.etag
    )
    head = (
        f"{NOT_MODIFIED if unchanged else OK}"
        f"X-Cache: {headers['X-Cache']}\r\n"
        f"Age: {headers['Age']}\r\n"
        f"Cache-Control: {headers['Cache-Control']}\r\n"
        f"ETag: {headers['ETag']}\r\n"
        f"{'' if unchanged else JSON_BODY}"
        f"X-Request-ID: {request_id}\r\n"
        f"{'' if unchanged else f'Content-Length: {len(entry.body)}{CRLF}'}"
        f"Date: {rfc822_formatted_time()}\r\n"
        f"Server: {SERVER}\r\n\r\n"
    )
    with_body = not unchanged and message.method == "GET"
    response = head.encode("latin-1") + (entry.body if with_body else b"")
    status = 304 if unchanged else 200
    # Only once nothing can fail before the answer is written: a request handed on
    # to the app must not have spent a token or been counted.
    # The app takes the caller's token before looking in the cache; taking it only
    # for a fresh hit gives the same outcome, as a refused token is not spent: the
    # app asks again and answers 429.
    if caller.rate_limit is not None and state.caller_bucket(caller.name, caller.rate_limit).try_take():
        return None
    record_request(
        state,
        request_id=request_id,
        caller=caller.name,
        route=BATCH_ROUTE,
        path=BATCH_ROUTE,
        batch_id=batch_id,
        status=status,
        cache=CacheState.HIT.value,
        trace=None,
        elapsed_s=time.perf_counter() - started,
        method=message.method,
    )
    return response
