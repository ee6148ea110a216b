"""``GET /gateway/v1/events``: the event feed as pages, long-polls and a stream (docs/design.md §12, "The feed").

Every reader reads the log's own bytes: a page is the kept events' JSON
joined, and a stream writes each event's frame, made once per event for
every stream of this process (``Frames``). A caller sees the events of what
it may see (``visible``); a page that holds none of them still moves its
cursor, so a caller never reads the same events twice.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable

from aiohttp import web
from multidict import MultiMapping

from gateway import errors
from gateway.api import rules
from gateway.api.admission import Admitted, admit, readmit
from gateway.api.auth import Caller
from gateway.api.keys import REQUEST_ID, client_gone
from gateway.api.state import GatewayState
from gateway.events.base import Event, EventLog, decode_cursor, encode_cursor, visible_to
from gateway.ops.tasks import cancel_and_wait

EVENTS_ROUTE = "/gateway/v1/events"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
# Events looked at for one page at most: a caller that may see few of them still gets an answer soon.
SCAN_MAX = 10_000
# Events read from the log at a time by a page, at least (a page of more reads its limit at a time).
PAGE_READ = 256
# Events read from the log at a time by a stream.
STREAM_READ = 256
# How long a client waits before reconnecting to a stream that ended (the SSE ``retry`` field).
RECONNECT_MS = 1000


class Feed:
    """The held requests and open streams of one app: counted, bounded, and all let go on SIGTERM."""

    def __init__(self) -> None:
        self.held = 0
        self.held_by: dict[str, int] = {}
        self.streams = 0
        self.streams_by: dict[str, int] = {}
        self._stopping: asyncio.Future[None] | None = None
        self.frames = Frames()

    @property
    def stopping(self) -> asyncio.Future[None]:
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
        return self._stopping

    def stop(self) -> None:
        """The app is stopping: every held request answers and every stream ends, now."""
        if not self.stopping.done():
            self.stopping.set_result(None)

    async def hold(self, wait: Awaitable[bool], request: web.Request) -> bool | None:
        """``wait``'s answer, or None if the client went away or the app is stopping first."""
        task = asyncio.ensure_future(wait)
        ends: set[asyncio.Future[object]] = {task, self.stopping}  # type: ignore[arg-type]
        gone = client_gone(request)
        if gone is not None:
            ends.add(gone)  # type: ignore[arg-type]
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(task)
        return task.result() if task.done() and not task.cancelled() else None


class Frames:
    """Each event's SSE frame, made once and shared by every stream (bounded: the newest are kept)."""

    def __init__(self, size: int = 4096) -> None:
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = size

    def of(self, log_id: str, event: Event) -> bytes:
        key = (log_id, event.seq)
        frame = self._frames.get(key)
        if frame is None:
            cursor = encode_cursor(log_id, event.seq).encode()
            frame = b"id: " + cursor + b"\nevent: " + event.type.encode() + b"\ndata: " + event.payload + b"\n\n"
            self._frames[key] = frame
            if len(self._frames) > self._size:
                self._frames.popitem(last=False)
        return frame


FEED: web.AppKey[Feed] = web.AppKey("event_feed", Feed)


def parse_limit(query: MultiMapping[str]) -> int:
    values = query.getall("limit", [])
    if not values:
        return DEFAULT_LIMIT
    text = values[0]
    if len(values) > 1 or not (text.isascii() and text.isdigit()) or len(text) > 4 or not 1 <= int(text) <= MAX_LIMIT:
        raise errors.InvalidRequest(f"limit: a whole number from 1 to {MAX_LIMIT}.")
    return int(text)


def wants_stream(accept: list[str]) -> bool:
    """Whether ``Accept`` names ``text/event-stream``."""
    return any(
        kind.partition(";")[0].strip().lower() == "text/event-stream" for value in accept for kind in value.split(",")
    )


def start_of(cursor: str | None, log_id: str, bounds: tuple[int, int], name: str = "after") -> int:
    """The seq after which to read: 400 for a malformed cursor or one past the newest, 410 for one too old."""
    oldest, newest = bounds
    if cursor is None:
        return oldest - 1
    if cursor == "latest":
        return newest
    try:
        seq = decode_cursor(cursor, log_id)
    except errors.InvalidRequest:
        raise errors.InvalidRequest(f"{name}: not a cursor this gateway issued.") from None
    if seq > newest:
        raise errors.InvalidRequest(f"{name}: past the newest event; not a cursor this gateway issued.")
    if seq < oldest - 1:
        raise errors.CursorExpired(
            "The events after this cursor are no longer kept: list what you need, then resume from after=latest."
        )
    return seq


def the_log(state: GatewayState) -> EventLog:
    if state.events is None:
        raise errors.RouteNotFound("The event feed is off (events.enabled: false).")
    return state.events


async def get_events(request: web.Request) -> web.StreamResponse:
    """A page of events after a cursor (held by ``Prefer: wait``), or with ``Accept: text/event-stream`` a stream."""
    admitted = await admit(request, "retrieve")
    state, caller = admitted.state, admitted.caller
    log = the_log(state)
    streaming = wants_stream(request.headers.getall("Accept", []))
    limit = parse_limit(request.query)
    after = request.query.getall("after", [])
    if len(after) > 1:
        raise errors.InvalidRequest("after: give it once.")
    cursor, name = (after[0] if after else None), "after"
    last_event_id = request.headers.getall("Last-Event-ID", [])
    if streaming and last_event_id:
        cursor, name = last_event_id[0].strip(), "Last-Event-ID"
    bounds = await log.bounds()  # first: it learns the log's id anew if Redis lost the log
    log_id = log.log_id  # the page's cursor names this log, even if Redis loses it meanwhile
    start = start_of(cursor, log_id, bounds, name)
    if streaming and _room(state, request.app[FEED], caller):
        return await stream(request, admitted, log, start)
    # A page, or past the limits on what is held a stream's first page at once (as a held request is).
    events, position = await read_page(log, caller, start, limit)
    wants_wait = rules.requested_wait(request.headers.getall("Prefer", []))
    applied: int | None = None
    if not events and wants_wait and not streaming:
        applied = _wait_allowed(state, request.app[FEED], caller, wants_wait)
        if applied is not None:
            events, position = await _held(request, admitted, log, position, limit, applied)
    response = page_response(events, encode_cursor(log_id, position))
    if applied is not None:
        response.headers["Preference-Applied"] = f"wait={applied}"
    return response


async def read_page(log: EventLog, caller: Caller, seq: int, limit: int) -> tuple[list[Event], int]:
    """Up to ``limit`` events ``caller`` may see after ``seq``, and the seq the page ends at."""
    found: list[Event] = []
    scanned = 0
    while len(found) < limit and scanned < SCAN_MAX:
        # Read in chunks of at least PAGE_READ: an own caller asking limit=1 must not cost one read per event.
        chunk = await log.read_after(seq, min(max(limit, PAGE_READ), SCAN_MAX - scanned))
        if not chunk:
            break
        for event in chunk:
            seq = event.seq
            scanned += 1
            if visible_to(caller, event):
                found.append(event)
                if len(found) == limit:
                    break
    return found, seq


def page_response(events: list[Event], next_after: str) -> web.Response:
    body = b'{"events":[' + b",".join(e.payload for e in events) + b'],"next_after":' + json.dumps(next_after).encode()
    return web.Response(body=body + b"}", content_type="application/json", headers={"Cache-Control": "no-store"})


def _room(state: GatewayState, feed: Feed, caller: Caller) -> bool:
    """Whether one more request may be held or stream: held requests and open streams count alike."""
    settings = state.snapshot.config.cache
    if state.waiters.total + feed.held + feed.streams >= settings.max_waiters:
        return False
    mine = state.waiters.held_by(caller.name) + feed.held_by.get(caller.name, 0) + feed.streams_by.get(caller.name, 0)
    return mine < settings.max_waiters_per_caller


def _wait_allowed(state: GatewayState, feed: Feed, caller: Caller, wants_s: int) -> int | None:
    """The seconds a page may be held (capped as §9 caps waits), or None past the limits on held requests."""
    if not _room(state, feed, caller):
        return None
    return min(wants_s, int(state.snapshot.config.cache.max_wait_s))


async def _held(
    request: web.Request, admitted: Admitted, log: EventLog, seq: int, limit: int, applied_s: int
) -> tuple[list[Event], int]:
    """Hold an empty page until the caller has an event after ``seq``, or the wait (jittered by N/16) ends.

    Each wake reads under the config in force then: a caller a reload removed
    or took ``retrieve`` from gets the contract's 401 or 403 (its page is
    still empty), and one made ``own`` sees only its own events from then on.
    """
    feed = request.app[FEED]
    state, caller, log_id = admitted.state, admitted.caller, log.log_id
    loop = asyncio.get_running_loop()
    end = loop.time() + applied_s * (1 - state.cache.jitter() / 16)
    feed.held += 1
    feed.held_by[caller.name] = feed.held_by.get(caller.name, 0) + 1
    state.metrics.events.feed_waits.inc()
    try:
        while (left := end - loop.time()) > 0:
            if not await feed.hold(log.wait_beyond(seq, left), request):
                break  # the wait ended, the client left, or the gateway is stopping
            if log.log_id != log_id:
                break  # Redis lost the log: this page's cursor is refused next, and the client lists afresh
            admitted = readmit(request, admitted, "retrieve")
            events, seq = await read_page(log, admitted.caller, seq, limit)
            if events:
                return events, seq
        return [], seq
    finally:
        feed.held -= 1
        if (left_held := feed.held_by.pop(caller.name) - 1) > 0:
            feed.held_by[caller.name] = left_held
        state.metrics.events.feed_waits.dec()


async def stream(request: web.Request, admitted: Admitted, log: EventLog, seq: int) -> web.StreamResponse:
    """``text/event-stream``: the events after ``seq`` as they come, until ``events.max_stream_s`` or SIGTERM."""
    feed = request.app[FEED]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # a proxy in front must pass each event on at once
            "X-Request-ID": request[REQUEST_ID],
        }
    )
    state, name = admitted.state, admitted.caller.name
    # Counted before the first await, so that streams opened together cannot all pass ``_room``.
    feed.streams += 1
    feed.streams_by[name] = feed.streams_by.get(name, 0) + 1
    state.metrics.events.streams.inc()
    try:
        await response.prepare(request)
        await response.write(b"retry: %d\n\n" % RECONNECT_MS)
        await _pump(request, response, admitted, log, seq)
    except (ConnectionError, errors.StoreUnavailable):
        pass  # the client left, or the store did: the client resumes from the last id it has
    finally:
        feed.streams -= 1
        if (left_open := feed.streams_by.pop(name) - 1) > 0:
            feed.streams_by[name] = left_open
        state.metrics.events.streams.dec()
    return response


async def _pump(
    request: web.Request, response: web.StreamResponse, admitted: Admitted, log: EventLog, seq: int
) -> None:
    feed = request.app[FEED]
    state = admitted.state
    settings = state.snapshot.config.events
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.max_stream_s
    written_at = loop.time()
    log_id = log.log_id
    while not feed.stopping.done():
        events = await log.read_after(seq, STREAM_READ)
        if log.log_id != log_id:
            return  # Redis lost the log: the client's Last-Event-ID is refused, and it starts afresh
        # A reload since the last read reaches this stream: its caller is looked up
        # again, and one removed or without ``retrieve`` now has its stream ended.
        try:
            admitted = readmit(request, admitted, "retrieve")
        except errors.CallerError:
            return
        for event in events:
            seq = event.seq
            if visible_to(admitted.caller, event):
                await response.write(feed.frames.of(log.log_id, event))
                written_at = loop.time()
        if events:
            continue
        now = loop.time()
        if now >= deadline:
            return
        if now - written_at >= settings.keepalive_s:
            await response.write(b": keep-alive\n\n")  # idle proxies must not close a quiet stream
            written_at = now
        woke = await feed.hold(log.wait_beyond(seq, min(deadline, written_at + settings.keepalive_s) - now), request)
        if woke is None:
            return


def end_streams(app: web.Application) -> None:
    """On SIGTERM: held pages answer and streams end at once; clients resume from their cursor."""
    app[FEED].stop()
