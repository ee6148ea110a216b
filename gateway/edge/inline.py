"""Fresh cache hits answered as soon as their request is parsed, below aiohttp's Application.

A fresh hit is a dict lookup, yet through the Application it paid for a
task, a Request, the middleware, the router, a Response and its writer:
three times the gateway's own work (``bench/run.py``, ``hit_vs_ceiling``).

The decision is not made here: ``gateway.api.decide.decide`` makes it, the
one the app's route makes too, in the same order. This module only routes
the parsed head to it and writes what it answers; whatever it does not
answer (a refusal, a miss, a wait, a caller whose limit or scope needs
Redis or the record store) goes to the app unchanged, which decides again
and gives the same answer.

It writes only what its writer can carry: ``GET`` or ``HEAD`` (the same
head, ``Content-Length`` included, and no body; RFC 9110 9.3.2) over
HTTP/1.1 on a kept-alive connection, with no body and no ``Expect`` (the
app answers those, a ``100 Continue`` included).
"""

from __future__ import annotations

import time

from aiohttp import HttpVersion11

from gateway._aiohttp import RawRequestMessage, rfc822_formatted_time
from gateway.api.app import BATCH_ROUTE, SERVER, record_request, request_id_for
from gateway.api.decide import Answer, Head, Rendered, decide, take_token, token_available
from gateway.api.state import GatewayState
from gateway.cache.entry import CacheState

BATCH_PATH_PREFIX = BATCH_ROUTE.removesuffix("{id}")
STATUS_LINES = {200: "HTTP/1.1 200 OK\r\n", 304: "HTTP/1.1 304 Not Modified\r\n"}
# HEAD is GET without the body (RFC 9110 9.3.2): the rules and the head are the same.
METHODS = frozenset({"GET", "HEAD"})


def routed_head(message: RawRequestMessage) -> Head | None:
    """The head of a request for one batch that the inline writer can answer, else None.

    The id is the decoded path segment, as the app's router gives it
    (a ``%2F`` decodes to a ``/`` and is the app's to refuse).
    """
    if (
        message.method not in METHODS
        or message.version != HttpVersion11
        or message.should_close
        or message.upgrade
        or "Expect" in message.headers
    ):
        return None
    path = message.url.path
    if not path.startswith(BATCH_PATH_PREFIX):
        return None
    batch_id = path[len(BATCH_PATH_PREFIX) :]
    if "/" in batch_id:
        return None
    return Head(message.method, batch_id, message.headers)


def answer_fresh_hit(state: GatewayState, message: RawRequestMessage) -> bytes | None:
    """The whole HTTP response to ``message`` if the decision is an answer from memory, else None."""
    started = time.perf_counter()
    head = routed_head(message)
    if head is None:
        return None
    decision = decide(state, state.snapshot, head, token_available)
    if not isinstance(decision, Answer):
        return None
    caller = decision.caller
    # The limit step's token, taken now that the answer is sure (see decide.token_available).
    if caller.rate_limit is not None and take_token(state, caller) != 0:
        return None
    request_id = request_id_for(message.headers)
    rendered = decision.rendered
    response = serialize(rendered, request_id, with_body=message.method == "GET")
    record_request(
        state,
        request_id=request_id,
        caller=caller.name,
        route=BATCH_ROUTE,
        path=BATCH_ROUTE,
        batch_id=decision.batch_id,
        status=rendered.status,
        cache=CacheState.HIT.value,
        trace=None,
        elapsed_s=time.perf_counter() - started,
        method=message.method,
    )
    return response


def serialize(rendered: Rendered, request_id: str, *, with_body: bool) -> bytes:
    """``rendered`` as the bytes of an HTTP/1.1 answer: the head the app's writer sends for it, and the body."""
    lines = [STATUS_LINES[rendered.status]]
    lines += [f"{name}: {value}\r\n" for name, value in rendered.headers.items()]
    lines.append(f"X-Request-ID: {request_id}\r\n")
    if rendered.status != 304:
        lines.append(f"Content-Length: {len(rendered.body)}\r\n")
    lines.append(f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER}\r\n\r\n")
    head = "".join(lines).encode("latin-1")
    return head + rendered.body if with_body else head
