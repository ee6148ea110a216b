"""Serve the app: the runner, JSON errors for unparseable requests, the metrics listener, reload, stop.

aiohttp answers requests it cannot parse (a request line or header past the
configured sizes, broken framing) before any middleware runs, in text/plain.
``_JsonErrorHandler`` renders those in the contract's JSON shape too, and
closes connections that have not sent a whole request head within
``server.header_timeout_s`` (slow, trickling clients). It also answers
plain fresh cache hits as soon as they are parsed (``gateway.fastpath``).

It makes every pipelined request answered in order, or the connection
closed after the last answer, where aiohttp's parser would lose or stall
requests (``_HitAnsweringParser``), and answers ``Expect`` in the contract's
shape (``_ExpectCheck``).

aiohttp has no public hook for any of it, so this module leans on
``RequestHandler`` internals: ``_messages``, ``_handle_request``,
``_parser`` and its queue, ``_ErrInfo``, the keep-alive and flow-control
fields.
``pyproject.toml`` pins aiohttp to the minor version this was written
against; ``tests/test_inline_hits.py`` and ``tests/test_hostile.py`` fail
loudly if any of it changes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from gateway import errors
from gateway.api.app import build_app, build_metrics_app, error_response, record_request, request_id_for
from gateway.api.keys import STATE
from gateway.api.state import GatewayState
from gateway.config import ConfigError, GatewayConfig
from gateway.edge.inline import answer_fresh_hit
from gateway.ops.logs import log_event
from gateway.ops.workers import pid_file
from gateway.upstream.cohere import new_request_id

log = logging.getLogger("gateway")
# The route label of requests aiohttp could not parse (they never reach the router).
UNPARSED_ROUTE = "unparsed"
# The route label of requests refused for their Expect header (before the router).
EXPECT_ROUTE = "expect"
# A parsed item handed to aiohttp: a request, or the parse error that ends the connection.
Parsed = tuple[RawRequestMessage | _ErrInfo, StreamReader]


def protocol_error(status: int, exc: BaseException | None) -> errors.GatewayError:
    """The contract's error for a request aiohttp could not parse."""
    text = str(getattr(exc, "message", "") or "")
    if isinstance(exc, LineTooLong) or "too many headers" in text.lower():
        return errors.RequestTooLarge()
    if status == 413:
        return errors.BodyTooLarge()
    if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
        return errors.MalformedRequest()
    return errors.InternalError()


class _JsonErrorHandler(RequestHandler):
    """A connection: JSON for unparseable requests, a deadline for each request head, inline hits.

    The head deadline covers every request on the connection, not only the
    first: it starts with the connection and again with the first bytes of
    each later request (also when they come in the same read as a whole
    request), and it is met once the parser has a whole head. When it passes
    while a request is being handled, the connection is closed after that
    request's answer if the head is still not whole.

    Pipelined requests are answered in order, every one, or the connection
    is closed after the last one answered; see ``_HitAnsweringParser`` for
    what it does where aiohttp's parser would lose requests.
    """

    header_timeout_s: float = 10.0
    state: GatewayState | None = None
    parser_options: dict[str, Any] = {}  # noqa: RUF012 (set per connection by _GatewayServer)
    _head_timer: asyncio.TimerHandle | None = None
    _heads_at_arming = 0
    _read_ends_mid_request = False
    # The head deadline passed while a request was being handled.
    _head_overdue = False
    # Requests queued for the app and not yet answered: while any is, a hit
    # answered inline would overtake it.
    _app_requests = 0
    # Off for good once the connection is closing, was upgraded, or its parser failed.
    _inline_ok = True
    # The parser held back requests after a batch answered inline: resumed here.
    _resume_handle: asyncio.Handle | None = None
    # The parser held back requests behind ones for the app: start() resumes it.
    _held_for_app = False
    # The parser lost what followed a request: close once the requests queued are answered.
    _close_when_answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Done when the client goes away: a request held by Prefer: wait is then dropped at once.
        self.closed: asyncio.Future[None] = self._loop.create_future()
        if self.state is not None and self._parser is not None:
            self._parser = _HitAnsweringParser(self._parser, self, self._new_parser)  # type: ignore[assignment]
        self._arm_head_timer()

    def _new_parser(self) -> Any:
        """A parser like this connection's own, with no queue limit: for reading bytes again."""
        return type(self._parser._parser)(  # type: ignore[union-attr]
            self,
            self._loop,
            self._read_bufsize,
            payload_exception=RequestPayloadError,
            **self.parser_options,
        )

    def data_received(self, data: bytes) -> None:
        heads_before = self._request_count
        queued_before = len(self._messages)
        if data:  # empty when the parser is resumed on what it holds from the last read
            self._read_ends_mid_request = not data.endswith(b"\r\n\r\n")
        super().data_received(data)
        self._app_requests += len(self._messages) - queued_before
        if self._request_count > heads_before:
            self._disarm_head_timer()
            if self._read_ends_mid_request:
                # Part of the next request came with this one: its head has a deadline too.
                self._arm_head_timer()
        elif data and self._head_timer is None:
            # The first bytes of a later request on a kept-alive connection.
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._disarm_head_timer()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        super().connection_lost(exc)

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        if self.state is not None and hdrs.EXPECT in request.headers:
            request_handler = _ExpectCheck(self.state, request_handler)
        try:
            response, reset = await super()._handle_request(request, start_time, request_handler)
        finally:
            self._app_requests -= 1
        if reset or not response.keep_alive:
            self.stop_answering_inline()  # start() closes the connection after this answer
        elif self._close_when_answered and not self._messages:
            self.stop_answering_inline()
            self.close()  # start() closes the connection after this answer
        elif self._head_overdue:
            self._after_overdue_head(request)
        if response.status == errors.RequestTimeout.status and not request.content.is_eof():
            # The body stopped arriving (DESIGN §7): close now, where aiohttp would linger for it once more.
            self.force_close()
        return response, reset

    def _after_overdue_head(self, request: web.BaseRequest) -> None:
        """The head deadline passed while ``request`` was handled: close now if a head is still partial."""
        self._head_overdue = False
        if self._request_count != self._heads_at_arming:
            return  # the head came whole meanwhile
        if not self._messages and request.content.is_eof():
            # No body of this request is still to come, so the bytes that armed the
            # deadline began a request head, and it is late.
            log_event(log, logging.INFO, "closed a connection that sent no whole request head in time")
            self.stop_answering_inline()
            self.close()  # start() closes the connection after this answer
        else:
            # The bytes may still be this request's body, or queued requests are in front:
            # the head gets a new deadline.
            self._arm_head_timer()

    def stop_answering_inline(self) -> None:
        """From now on every request on this connection goes through the app."""
        self._inline_ok = False

    def close_when_answered(self) -> None:
        """Close the connection once the requests already queued are answered."""
        self._close_when_answered = True
        self.stop_answering_inline()

    def resume_parsing_soon(self) -> None:
        """Stop reading; feed the parser what it holds at the loop's next turn, then read again.

        Reading stops as it does for a full request queue, so what the parser
        holds is never more than one read, however fast a client pipelines.
        """
        if not self._buffer_paused:
            self._pause_reading_for_buffer()
        if self._resume_handle is None:
            self._resume_handle = self._loop.call_soon(self._resume_parsing)

    def _resume_parsing(self) -> None:
        self._resume_handle = None
        if self._force_close or self._close or self.transport is None:
            return
        self._held_for_app = False
        self.data_received(b"")
        # Read again unless the parser is still held: by hits (a resume is pending
        # again), by requests for the app (start() resumes as it drains them), or by
        # a full queue.
        if (
            self._resume_handle is None
            and not self._held_for_app
            and self._buffer_paused
            and len(self._messages) < self._max_msg_queue_size
        ):
            self._resume_reading_for_buffer()

    def hold_reading_until_drained(self) -> None:
        """Pause reading as a full request queue does: start() resumes it (and the parser) as it drains."""
        self._held_for_app = True
        if not self._buffer_paused:
            self._pause_reading_for_buffer()

    def answer_inline(self, message: RawRequestMessage, payload: StreamReader) -> bool:
        """Answer ``message`` here if it is a plain fresh hit and no request is before it.

        Not while the client is not reading what it was sent (writing paused):
        from then on requests queue for the app, whose writer waits for the client.
        """
        if (
            not self._inline_ok
            or self._app_requests
            or message.upgrade
            or payload is not EMPTY_PAYLOAD
            or self._paused  # the client is not reading: the app's writer waits for it
            or self._close
            or self._force_close
            or self.transport is None
            or self.state is None
        ):
            return False
        try:
            response = answer_fresh_hit(self.state, message)
        except Exception:
            # A bug here would otherwise abort the connection with no answer at all;
            # the app answers this request (with a JSON 500 if the bug is shared).
            log.exception("could not answer a cache hit inline; the app answers it")
            self.stop_answering_inline()
            return False
        if response is None:
            return False
        self.transport.write(response)
        # What start() does for each request it handles, as far as a hit needs it.
        self._request_count += 1
        if self._manager is not None:
            self._manager.requests_count += 1
        if self._keepalive_timeout > 0:
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time, self._process_keepalive)
        return True

    def _arm_head_timer(self) -> None:
        self._head_overdue = False
        self._heads_at_arming = self._request_count
        self._head_timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        self._head_overdue = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._request_count != self._heads_at_arming or self.transport is None:
            return
        idle = self._waiter is not None and not self._waiter.done()
        if idle:
            log_event(log, logging.INFO, "closed a connection that sent no whole request head in time")
            self.force_close()
        elif self._request_in_progress:
            # Bytes that armed the timer may be the body of the request being
            # handled: decided once its answer is written (_after_overdue_head).
            self._head_overdue = True
        else:
            # Between requests (e.g. reading a body the handler did not read): a new deadline.
            self._arm_head_timer()

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        error = protocol_error(status, exc)
        level = logging.ERROR if isinstance(error, errors.InternalError) else logging.INFO
        # Never the exception's text: parser errors quote the raw bytes, credentials included.
        log_event(log, level, "could not handle request", code=error.code, reason=type(exc).__name__ if exc else None)
        # The head could not be parsed, so no caller-sent request id can be trusted.
        request_id = new_request_id()
        response = error_response(error, request_id)
        response.force_close()
        if self.state is not None:
            _account_unparsed(self.state, request_id, error.status)
        return response


def _account_unparsed(state: GatewayState, request_id: str, status: int) -> None:
    """Metrics and the access log line for a request that never reached the app."""
    record_request(
        state,
        request_id=request_id,
        caller="-",
        route=UNPARSED_ROUTE,
        path=None,
        batch_id=None,
        status=status,
        cache="-",
        trace=None,
        elapsed_s=None,
        method=None,
    )


class _ExpectCheck:
    """A request handler that first answers an ``Expect`` the gateway will not meet.

    aiohttp answers an unknown ``Expect`` in text/plain, and sends
    ``100 Continue`` before anyone looks at ``Content-Length``; the contract
    wants 417 ``expectation_failed``, and 413 at once for a body too large
    (RFC 9110 10.1.1), both in its JSON shape.
    """

    def __init__(
        self, state: GatewayState, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
    ) -> None:
        self._state = state
        self._handler = handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        error = expect_error(
            request.headers.getall(hdrs.EXPECT),
            request.content_length,
            self._state.snapshot.config.server.max_body_bytes,
        )
        if error is None:
            return await self._handler(request)
        request_id = request_id_for(request.headers)
        response = error_response(error, request_id)
        if request.content_length or request.headers.get(hdrs.TRANSFER_ENCODING):
            response.force_close()  # the body was never asked for: it is not read
        record_request(
            self._state,
            request_id=request_id,
            caller="-",
            route=EXPECT_ROUTE,
            path=None,
            batch_id=None,
            status=error.status,
            cache="-",
            trace=None,
            elapsed_s=None,
            method=request.method,
        )
        return response


def expect_error(expect: list[str], content_length: int | None, max_body_bytes: int) -> errors.GatewayError | None:
    """The contract's error for a request's ``Expect`` headers, or None to answer it as usual."""
    # An empty Expect asks for nothing (aiohttp ignores it too).
    if any(value.strip() and value.strip().lower() != "100-continue" for value in expect):
        return errors.ExpectationFailed()
    if content_length is not None and content_length > max_body_bytes:
        return errors.BodyTooLarge()
    return None


# What a parser still holds unsettled is compacted past this size, and forgotten past
# the second (from then until it settles, bad bytes end the connection with a 400
# only, as aiohttp does): the re-reading below needs them, and they are bounded.
_COMPACT_UNSETTLED = 64 * 1024
_MAX_UNSETTLED = 1024 * 1024


@dataclass
class _Reread:
    """What a fresh parser made of some bytes fed one request head at a time."""

    requests: list[Parsed]
    # (offset just after a request with no body, requests up to it): where a parser is at rest.
    rest_points: list[tuple[int, int]]
    error: HttpProcessingError | None


def reread(new_parser: Callable[[], Any], buffer: bytes, stop_after: int | None = None) -> _Reread:
    """Feed ``buffer`` to a fresh parser, cut after each ``CRLFCRLF``, and keep what it gives.

    aiohttp's parser throws away the requests it parsed in a read when a
    later one in that read is bad; fed one head at a time, it hands each
    request over before it sees the next one's bytes.
    """
    parser = new_parser()
    requests: list[Parsed] = []
    rest_points: list[tuple[int, int]] = []
    start = 0
    while start < len(buffer) and (stop_after is None or len(requests) < stop_after):  # start only grows
        end = buffer.find(b"\r\n\r\n", start)
        end = len(buffer) if end < 0 else end + 4
        try:
            parsed, upgraded, _tail = parser.feed_data(buffer[start:end])
        except HttpProcessingError as exc:
            return _Reread(requests, rest_points, exc)
        requests += parsed
        if parsed and parsed[-1][1] is EMPTY_PAYLOAD:
            rest_points.append((end, len(requests)))
        if upgraded:
            break
        start = end
    return _Reread(requests, rest_points, None)


class _HitAnsweringParser:
    """A connection's request parser that hands on only what its connection did not answer.

    aiohttp's ``data_received`` queues every parsed request for the app; the
    requests answered inline never reach that queue. The first request that
    is not answered inline stops it, so later ones queue behind it.

    It also makes up for what aiohttp's parser (the C one, llhttp) loses in a
    pipeline, so that every request is answered in order, or the connection
    closed after the last one answered:

    - bad bytes after good requests in one read: the requests before them
      (re-read from what it keeps of the stream), then the 400;
    - bytes after ``Connection: close`` (or HTTP/1.0): not an error, only
      never processed (RFC 9112 9.6);
    - bytes after a request with an ``Upgrade`` the gateway does not perform:
      the parser drops the rest of the read; they are re-read and parsed on;
    - requests held back: the parser is asked, by feeding it nothing, rather
      than trusting its queue limit (a request taken before its body was
      whole costs it a slot for good).
    """

    def __init__(self, parser: Any, connection: _JsonErrorHandler, new_parser: Callable[[], Any]) -> None:
        self._parser = parser
        self._connection = connection
        self._new_parser = new_parser
        # llhttp drops what follows a request with an Upgrade it does not perform;
        # aiohttp's pure-Python parser parses on.
        self._drops_after_upgrade = not isinstance(parser, HttpRequestParserPy)
        # Bytes fed since the parser was last at rest, and the requests it has handed
        # out since: what a re-read starts from, and how many of its requests to skip.
        self._unsettled = bytearray()
        self._unsettled_known = True
        self._handed_out = 0
        self._last_payload: StreamReader = EMPTY_PAYLOAD
        # Requests the parser gave when asked whether it held any: the next feed's.
        self._stash: list[Parsed] = []
        self._failed = False

    def feed_data(self, data: bytes) -> tuple[Sequence[Parsed], bool, bytes]:
        if self._failed:
            return (), False, b""
        connection = self._connection
        messages, upgraded, tail = self._parse(data)
        if self._stash:
            messages, self._stash = [*self._stash, *messages], []
        if upgraded:
            # What follows an upgrade request is queued by aiohttp itself, uncounted.
            connection.stop_answering_inline()
        answered = 0
        for message, payload in messages:
            if isinstance(message, _ErrInfo) or not connection.answer_inline(message, payload):
                break
            # Frees the parser's slot as start() does for the requests it takes.
            self._parser.message_consumed()
            answered += 1
        rest = messages[answered:] if answered else messages
        if messages and not upgraded and not self._failed:
            # Ask the parser whether it holds requests back (it stops at its queue
            # limit, with the rest buffered, until someone feeds it again).
            held = self._parse(b"")[0]
            if held and not rest and not self._failed:
                # All were answered here, so nothing reached start() to resume the parser.
                # Answer the rest at the loop's next turn, as start() would: one long
                # pipeline does not hold the loop from other connections.
                self._stash = list(held)
                connection.resume_parsing_soon()
            elif held:
                # They queue behind requests for the app; start() resumes the parser
                # as it takes them, once reading is paused as for a full queue.
                rest = [*rest, *held]
                connection.hold_reading_until_drained()
            elif self._last_payload is EMPTY_PAYLOAD and self._unsettled.endswith(b"\r\n\r\n"):
                # At rest: nothing fed so far needs re-reading.
                self._unsettled.clear()
                self._unsettled_known = True
                self._handed_out = 0
        return rest, upgraded, tail

    def _parse(self, data: bytes) -> tuple[Sequence[Parsed], bool, bytes]:
        """Feed the parser; what it hands out, with what it lost put back."""
        if data and self._unsettled_known:
            self._unsettled += data
            if len(self._unsettled) > _COMPACT_UNSETTLED:
                self._compact()
        try:
            parsed, upgraded, tail = self._parser.feed_data(data)
        except HttpProcessingError as exc:
            return self._fail(exc), False, b""
        if not parsed:
            return parsed, upgraded, tail
        self._handed_out += len(parsed)
        last, self._last_payload = parsed[-1]
        if upgraded or not (self._drops_after_upgrade and last.upgrade):
            return parsed, upgraded, tail
        return self._parse_on_after_upgrade(list(parsed))

    def _parse_on_after_upgrade(self, messages: list[Parsed]) -> tuple[list[Parsed], bool, bytes]:
        """Put back what llhttp dropped after a request with an ``Upgrade`` it does not perform."""
        while True:  # each turn hands out requests after the last one: bounded by the bytes kept
            after = self._bytes_after_upgrade()
            if after is None:
                # The rest could not be found again: answer what came, then close.
                self._connection.close_when_answered()
                self._failed = True
                return messages, False, b""
            if not after:
                return messages, False, b""
            try:
                parsed, upgraded, tail = self._parser.feed_data(after)
            except HttpProcessingError as exc:
                return messages + self._fail(exc), False, b""
            if not parsed:
                return messages, upgraded, tail
            messages += parsed
            self._handed_out += len(parsed)
            last, self._last_payload = parsed[-1]
            if upgraded or not last.upgrade:
                return messages, upgraded, tail

    def _bytes_after_upgrade(self) -> bytes | None:
        """What llhttp dropped after the last request it handed out, found by re-reading."""
        if not self._unsettled_known:
            return None
        buffer = bytes(self._unsettled)
        found = reread(self._new_parser, buffer, stop_after=self._handed_out)
        for offset, count in found.rest_points:
            if count == self._handed_out:
                return buffer[offset:]
        return None

    def _fail(self, exc: HttpProcessingError) -> list[Parsed]:
        """The requests the parser took from the stream before ``exc``, then the 400 that ends it.

        If one of them closes the connection, what follows it is never processed, so no 400.
        """
        self._failed = True
        self._connection.stop_answering_inline()
        recovered: list[Parsed] = []
        if self._unsettled_known:
            found = reread(self._new_parser, bytes(self._unsettled))
            if found.error is not None:  # else the two parsers disagree: trust neither's requests
                recovered = found.requests[self._handed_out :]
        for position, (message, _payload) in enumerate(recovered):
            if isinstance(message, RawRequestMessage) and message.should_close:
                return recovered[: position + 1]
        return [*recovered, (_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)]

    def _compact(self) -> None:
        """Forget the bytes of requests already handed out, up to the last point at rest."""
        found = reread(self._new_parser, bytes(self._unsettled), stop_after=self._handed_out)
        points = [(offset, count) for offset, count in found.rest_points if count <= self._handed_out]
        if points:
            offset, count = points[-1]
            del self._unsettled[:offset]
            self._handed_out -= count
        if len(self._unsettled) > _MAX_UNSETTLED:
            self._unsettled.clear()
            self._unsettled_known = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


# The connection's options that its parser was made with, for the parser that re-reads.
_PARSER_OPTIONS = ("max_line_size", "max_field_size", "max_headers", "auto_decompress")


class _GatewayServer(web.Server):
    header_timeout_s = 10.0
    state: GatewayState | None = None
    inline_hits = True

    def __call__(self) -> RequestHandler:
        handler = _JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout_s = self.header_timeout_s
        handler.parser_options = {k: self._kwargs[k] for k in _PARSER_OPTIONS if k in self._kwargs}
        handler.state = self.state
        if not self.inline_hits:
            handler.stop_answering_inline()
        return handler


class GatewayRunner(web.AppRunner):
    """AppRunner whose connections render protocol errors as JSON.

    ``inline_hits``: answer fresh hits below the app; off for the metrics
    listener, whose app has no batch route.
    """

    def __init__(
        self, app: web.Application, header_timeout_s: float, *, inline_hits: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._inline_hits = inline_hits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no hook for its protocol-level error page; swapping the
        # server's class keeps everything else of AppRunner's set-up intact.
        server.__class__ = _GatewayServer
        server.header_timeout_s = self._header_timeout_s  # type: ignore[attr-defined]
        server.state = self.app[STATE]  # type: ignore[attr-defined]
        server.inline_hits = self._inline_hits  # type: ignore[attr-defined]
        return server


@dataclass
class RunningGateway:
    runner: GatewayRunner
    state: GatewayState
    host: str
    port: int
    # The listener of /metrics alone (server.metrics_port), if it has one.
    metrics_runner: GatewayRunner | None = None
    metrics_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Where ``/metrics`` is served: its own listener, else the API's."""
        return self.url if self.metrics_port is None else f"http://{self.host}:{self.metrics_port}"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within the grace period, close.

        The metrics listener closes last: a stop is still scraped while it drains.
        """
        await self.runner.cleanup()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        self.state.access_log.flush()


async def start_gateway(
    state: GatewayState,
    host: str | None = None,
    port: int | None = None,
    *,
    reuse_port: bool = False,
) -> RunningGateway:
    """Start serving ``state`` (built by ``gateway.runtime.build_state``); ``host``/``port`` override
    its config (port 0 picks one).

    ``reuse_port``: listen with SO_REUSEPORT, beside the other workers on the port (gateway/workers.py).
    """
    config = state.snapshot.config
    server = config.server
    runner = GatewayRunner(
        build_app(state),
        header_timeout_s=server.header_timeout_s,
        access_log=None,  # the middleware writes the access log, as JSON
        shutdown_timeout=server.shutdown_grace_s,
        keepalive_timeout=server.keepalive_timeout_s,
        max_line_size=server.max_line_size,
        max_field_size=server.max_field_size,
        max_headers=server.max_headers,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        host or server.host,
        server.port if port is None else port,
        backlog=server.backlog,
        reuse_port=reuse_port,
    )
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    running = RunningGateway(runner, state, bound_host, bound_port)
    if server.metrics_port:
        try:
            await _start_metrics_listener(running, host or server.host, reuse_port=reuse_port)
        except BaseException:
            await runner.cleanup()
            raise
    return running


# A scrape is one quick answer: the metrics listener does not hold a stop for long.
METRICS_SHUTDOWN_S = 1.0


async def _start_metrics_listener(running: RunningGateway, host: str, *, reuse_port: bool) -> None:
    """``/metrics`` on ``server.metrics_port``; with workers each one listens there (SO_REUSEPORT)."""
    server = running.state.snapshot.config.server
    if server.metrics_port == running.port:
        # With SO_REUSEPORT (workers) both would bind, and the kernel would split the connections between them.
        raise OSError(errno.EADDRINUSE, f"server.metrics_port {server.metrics_port} is the API port")
    runner = GatewayRunner(
        build_metrics_app(running.state),
        header_timeout_s=server.header_timeout_s,
        inline_hits=False,
        access_log=None,
        shutdown_timeout=METRICS_SHUTDOWN_S,
        keepalive_timeout=server.keepalive_timeout_s,
        max_line_size=server.max_line_size,
        max_field_size=server.max_field_size,
        max_headers=server.max_headers,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, server.metrics_port, backlog=server.backlog, reuse_port=reuse_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    running.metrics_runner = runner
    running.metrics_port = runner.addresses[0][1]


def reload_config(state: GatewayState, load: Callable[[], GatewayConfig]) -> bool:
    """Re-read the config (and token file); swap it in if valid, else keep the old one."""
    try:
        config = load()
    except ConfigError as exc:
        return _refuse_reload(state, exc.problems)
    except Exception as exc:  # a reload must never take the serving gateway down
        log.exception("config reload failed")
        return _refuse_reload(state, [f"config: {type(exc).__name__}"])
    state.apply(config)
    state.metrics.reloads.labels("ok").inc()
    state.metrics.last_reload_ok.set(1)
    log_event(log, logging.INFO, "config reloaded", callers=[c.name for c in config.callers])
    return True


def _refuse_reload(state: GatewayState, problems: list[str]) -> bool:
    state.metrics.reloads.labels("error").inc()
    state.metrics.last_reload_ok.set(0)
    log_event(log, logging.ERROR, "config reload refused; the old config keeps serving", problems=problems)
    return False


async def serve_until_signalled(
    running: RunningGateway, load: Callable[[], GatewayConfig], *, pid_file_path: str = ""
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the config.

    ``pid_file_path``: where to write this process's pid while it serves (a worker passes "").
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_config, running.state, load)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    serving: dict[str, Any] = {"url": running.url}
    if running.metrics_port is not None:
        serving["metrics_url"] = running.metrics_url
    log_event(log, logging.INFO, "serving", **serving)
    with pid_file(pid_file_path):
        await stopping.wait()
        await _stop(running)


async def _stop(running: RunningGateway) -> None:
    log_event(
        log,
        logging.INFO,
        "stopping: finishing requests in flight",
        grace_s=running.state.snapshot.config.server.shutdown_grace_s,
    )
    await running.stop()
    log_event(log, logging.INFO, "stopped")
