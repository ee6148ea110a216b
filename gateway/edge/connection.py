"""One client connection: a deadline for each request head, fresh hits answered inline, JSON for what
aiohttp cannot parse.

Built on ``gateway._aiohttp.Connection`` (aiohttp's ``RequestHandler``, its
private fields behind names of their own): nothing here names a private
aiohttp field.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import hdrs, web

from gateway import errors
from gateway._aiohttp import (
    EMPTY_PAYLOAD,
    Connection,
    Handler,
    RawRequestMessage,
    RequestPayloadError,
    StreamReader,
    build_connection,
    handler_options,
)
from gateway.api.app import error_response
from gateway.api.state import GatewayState
from gateway.edge.inline import TurnWrites, answer_fresh_hit
from gateway.edge.pipelining import HitAnsweringParser
from gateway.edge.rejections import ExpectCheck, account_unparsed, protocol_error
from gateway.ops.logs import log_event
from gateway.upstream.cohere import new_request_id

log = logging.getLogger("gateway")

# The connection's options that its parser was made with, for the parser that re-reads.
_PARSER_OPTIONS = ("max_line_size", "max_field_size", "max_headers", "auto_decompress")


class GatewayConnection(Connection):
    """A connection: JSON for unparseable requests, a deadline for each request head, inline hits.

    The head deadline covers every request on the connection, not only the
    first: it starts with the connection and again with the first bytes of
    each later request (also when they come in the same read as a whole
    request), and it is met once the parser has a whole head. When it passes
    while a request is being handled, the connection is closed after that
    request's answer if the head is still not whole.

    Pipelined requests are answered in order, every one, or the connection
    is closed after the last one answered; see ``HitAnsweringParser`` for
    what it does where aiohttp's parser would lose requests.
    """

    header_timeout_s: float = 10.0
    state: GatewayState | None = None
    parser_options: dict[str, Any] = {}  # noqa: RUF012 (set per connection by GatewayServer)
    # Where answers given inline go, to be written at the loop turn's end (the server's, shared by its connections).
    writes: TurnWrites
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
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.state is not None and self.request_parser is not None:
            self.request_parser = HitAnsweringParser(self.request_parser, self, self._new_parser)
        self._arm_head_timer()

    def _new_parser(self) -> Any:
        """A parser like this connection's own, with no queue limit: for reading bytes again."""
        return type(self.request_parser.wrapped)(
            self,
            asyncio.get_running_loop(),
            self.read_bufsize,
            payload_exception=RequestPayloadError,
            **self.parser_options,
        )

    def data_received(self, data: bytes) -> None:
        heads_before = self.requests_parsed
        queued_before = self.queued
        if data:  # empty when the parser is resumed on what it holds from the last read
            self._read_ends_mid_request = not data.endswith(b"\r\n\r\n")
        super().data_received(data)
        self._app_requests += self.queued - queued_before
        if self.requests_parsed > heads_before:
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

    async def handle(
        self, request: web.BaseRequest, start_time: float | None, request_handler: Handler
    ) -> tuple[web.StreamResponse, bool]:
        if self.state is not None and hdrs.EXPECT in request.headers:
            request_handler = ExpectCheck(self.state, request_handler)
        try:
            response, reset = await super().handle(request, start_time, request_handler)
        finally:
            self._app_requests -= 1
        if reset or not response.keep_alive:
            self.stop_answering_inline()  # start() closes the connection after this answer
        elif self._close_when_answered and not self.queued:
            self.stop_answering_inline()
            self.close()  # start() closes the connection after this answer
        elif self._head_overdue:
            self._after_overdue_head(request)
        if response.status == errors.RequestTimeout.status and not request.content.is_eof():
            # The body stopped arriving (docs/design.md §7): close now, where aiohttp would linger for it once more.
            self.force_close()
        elif isinstance(request_handler, ExpectCheck) and request_handler.refused and not request.content.is_eof():
            # An Expect refused (413, 417) before any 100 Continue: the client sends its body only after one, so
            # none is coming. Close now, where aiohttp would linger 10 s for it (its lingering_time).
            self.force_close()
        return response, reset

    def _after_overdue_head(self, request: web.BaseRequest) -> None:
        """The head deadline passed while ``request`` was handled: close now if a head is still partial."""
        self._head_overdue = False
        if self.requests_parsed != self._heads_at_arming:
            return  # the head came whole meanwhile
        if not self.queued and request.content.is_eof():
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
        if not self.reading_held:
            self.hold_reading()
        if self._resume_handle is None:
            self._resume_handle = asyncio.get_running_loop().call_soon(self._resume_parsing)

    def _resume_parsing(self) -> None:
        self._resume_handle = None
        if self.closing or self.transport is None:
            return
        self._held_for_app = False
        self.data_received(b"")
        # Read again unless the parser is still held: by hits (a resume is pending
        # again), by requests for the app (start() resumes as it drains them), or by
        # a full queue.
        if (
            self._resume_handle is None
            and not self._held_for_app
            and self.reading_held
            and self.queued < self.queue_limit
        ):
            self.release_reading()

    def hold_reading_until_drained(self) -> None:
        """Pause reading as a full request queue does: start() resumes it (and the parser) as it drains."""
        self._held_for_app = True
        if not self.reading_held:
            self.hold_reading()

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
            or self.writing_paused  # the client is not reading: the app's writer waits for it
            or self.closing
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
        self.writes.add(self.transport, response)
        self.count_answered()
        return True

    def _arm_head_timer(self) -> None:
        self._head_overdue = False
        self._heads_at_arming = self.requests_parsed
        self._head_timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        self._head_overdue = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.requests_parsed != self._heads_at_arming or self.transport is None:
            return
        if self.idle:
            log_event(log, logging.INFO, "closed a connection that sent no whole request head in time")
            self.force_close()
        elif self.handling_request:
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
            account_unparsed(self.state, request_id, error.status)
        return response


class GatewayServer(web.Server):
    """aiohttp's low-level server, making ``GatewayConnection`` connections."""

    header_timeout_s = 10.0
    state: GatewayState | None = None
    inline_hits = True
    _writes: TurnWrites | None = None

    def __call__(self) -> GatewayConnection:
        connection = build_connection(self, GatewayConnection)
        assert isinstance(connection, GatewayConnection)
        options = handler_options(self)
        connection.header_timeout_s = self.header_timeout_s
        connection.parser_options = {k: options[k] for k in _PARSER_OPTIONS if k in options}
        connection.state = self.state
        if self._writes is None:  # made here: the runner swaps this class in after aiohttp's __init__ ran
            self._writes = TurnWrites()
        connection.writes = self._writes
        if not self.inline_hits:
            connection.stop_answering_inline()
        return connection
