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

import asyncio
import time

from aiohttp import HttpVersion11

from gateway._aiohttp import RawRequestMessage, rfc822_formatted_time
from gateway.api.app import BATCH_ROUTE, SERVER, record_request, request_id_for
from gateway.api.decide import Answer, Head, Rendered, decide, take_token, token_available
from gateway.api.state import GatewayState
from gateway.cache.entry import CacheEntry, CacheState
from gateway.ops.batching import FlushSoon

BATCH_PATH_PREFIX = BATCH_ROUTE.removesuffix("{id}")
STATUS_LINES = {200: "HTTP/1.1 200 OK\r\n", 304: "HTTP/1.1 304 Not Modified\r\n"}
# HEAD is GET without the body (RFC 9110 9.3.2): the rules and the head are the same.
METHODS = frozenset({"GET", "HEAD"})
HIT = CacheState.HIT.value  # an Enum's .value is a property: read once, not per hit


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
    response = _heads.response(decision, request_id, with_body=message.method == "GET")
    record_request(
        state,
        request_id=request_id,
        caller=caller.name,
        route=BATCH_ROUTE,
        path=BATCH_ROUTE,
        batch_id=decision.batch_id,
        status=decision.status,
        cache=HIT,
        trace=None,
        elapsed_s=time.perf_counter() - started,
        method=message.method,
    )
    return response


def _split_at_request_id(rendered: Rendered, date: str, *, with_body: bool) -> tuple[bytes, bytes]:
    """The bytes of ``rendered``'s answer before its request id, and after it."""
    lines = [STATUS_LINES[rendered.status]]
    lines += [f"{name}: {value}\r\n" for name, value in rendered.headers.items()]
    lines.append("X-Request-ID: ")
    before = "".join(lines).encode("latin-1")
    after = "\r\n"
    if rendered.status != 304:
        after += f"Content-Length: {len(rendered.body)}\r\n"
    after += f"Date: {date}\r\nServer: {SERVER}\r\n\r\n"
    return before, after.encode("latin-1") + rendered.body if with_body else after.encode("latin-1")


class _Heads:
    """A fresh hit's answer bytes, made once a second per cache entry, not once a request.

    Of a hit's answer only the request id changes from one request to the
    next: Age, max-age and Date change once a second, the rest with the
    entry. So the bytes around the request id are kept for the last second
    of each entry seen, made from ``Answer.rendered`` (the app's rendering
    too) whenever any of them would differ. A bounded number of entries are
    kept; past that all are forgotten at once. An entry is held by the
    value, so its ``id`` cannot be reused while it is kept.
    """

    _KEEP = 4096

    def __init__(self) -> None:
        # (id(entry), 304?, body?) -> (entry, (age, max-age, Date), bytes before the request id, bytes after it)
        self._kept: dict[tuple[int, bool, bool], tuple[CacheEntry, tuple[int, int, str], bytes, bytes]] = {}

    def response(self, answer: Answer, request_id: str, *, with_body: bool) -> bytes:
        entry, now = answer.entry, answer.now
        key = (id(entry), answer.not_modified, with_body)
        # CacheEntry.age_s and fresh_s (a hit is fresh, so max-age is fresh_s), without two calls.
        age, fresh_s = int(now - entry.fetched_at), int(entry.fresh_until - now)
        varies = (age if age > 0 else 0, fresh_s if fresh_s > 0 else 0, rfc822_formatted_time())
        kept = self._kept.get(key)
        if kept is None or kept[0] is not entry or kept[1] != varies:
            before, after = _split_at_request_id(answer.rendered, varies[2], with_body=with_body)
            if len(self._kept) >= self._KEEP:
                self._kept.clear()
            kept = self._kept[key] = (entry, varies, before, after)
        return b"".join((kept[2], request_id.encode("latin-1"), kept[3]))


_heads = _Heads()


class TurnWrites:
    """The answers given inline during one turn of the event loop, written at its end, each connection's in one write.

    Written at once, each answer woke the client (wrk, a busy service) for
    that one answer while the loop went on reading the next connection: the
    two processes took turns a request at a time, and waking them was a sixth
    of the gateway's CPU (perf: 18%, the ceiling's 11%; hit_vs_ceiling in
    ``bench/run.py --quick`` 0.59 to 0.67 before, 0.92 to 1.02 after). The
    app's answers (aiohttp's writer, in the connection's task) are written
    after this turn's end, so a connection's answers stay in order: an answer
    is given inline only when no request before it went to the app.
    """

    def __init__(self) -> None:
        self._pending: dict[asyncio.Transport, list[bytes]] = {}
        self._flush_soon = FlushSoon(self.flush)

    def add(self, transport: asyncio.Transport, answer: bytes) -> None:
        queued = self._pending.get(transport)
        if queued is None:
            self._pending[transport] = [answer]
            self._flush_soon.request()
        else:
            queued.append(answer)

    def flush(self) -> None:
        self._flush_soon.done()
        pending, self._pending = self._pending, {}
        for transport, answers in pending.items():
            if not transport.is_closing():  # the client went away meanwhile: nobody is left to read them
                transport.write(answers[0] if len(answers) == 1 else b"".join(answers))
