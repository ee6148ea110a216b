"""Serve the app: the runner, JSON errors for unparseable requests, reload, stop.

aiohttp answers requests it cannot parse (a request line or header past the
configured sizes, broken framing) before any middleware runs, in text/plain.
``_JsonErrorHandler`` renders those in the contract's JSON shape too, and
closes connections that have not sent a whole request head within
``server.header_timeout_s`` (slow, trickling clients). It also answers
plain fresh cache hits as soon as they are parsed (``gateway.fastpath``).

aiohttp has no public hook for either, so this module leans on
``RequestHandler`` internals: ``_messages``, ``_handle_request``,
``_parser`` and its queue limit, the keep-alive and flow-control fields.
``pyproject.toml`` pins aiohttp to the minor version this was written
against; ``tests/test_inline_hits.py`` and ``tests/test_hostile.py`` fail
loudly if any of it changes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

from gateway import errors
from gateway.app import build_app, error_response, new_request_id, record_request
from gateway.config import ConfigError, GatewayConfig
from gateway.fastpath import answer_fresh_hit
from gateway.keys import STATE
from gateway.logs import log_event
from gateway.state import GatewayState

log = logging.getLogger("gateway")
# The route label of requests aiohttp could not parse (they never reach the router).
UNPARSED_ROUTE = "unparsed"


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
    request), and it is met once the parser has a whole head.
    """

    header_timeout_s: float = 10.0
    state: GatewayState | None = None
    _head_timer: asyncio.TimerHandle | None = None
    _heads_at_arming = 0
    _read_ends_mid_request = False
    # Requests queued for the app and not yet answered: while any is, a hit
    # answered inline would overtake it.
    _app_requests = 0
    # Off for good once the connection is closing, was upgraded, or its parser failed.
    _inline_ok = True
    # The parser held back requests after a batch answered inline: resumed here.
    _resume_handle: asyncio.Handle | None = None
    # The parser held back requests behind ones for the app: start() resumes it.
    _held_for_app = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.state is not None and self._parser is not None:
            self._parser = _HitAnsweringParser(self._parser, self)  # type: ignore[assignment]
        self._arm_head_timer()

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
        try:
            response, reset = await super()._handle_request(request, start_time, request_handler)
        finally:
            self._app_requests -= 1
        if reset or not response.keep_alive:
            self.stop_answering_inline()  # start() closes the connection after this answer
        return response, reset

    def stop_answering_inline(self) -> None:
        """From now on every request on this connection goes through the app."""
        self._inline_ok = False

    @property
    def max_queued_requests(self) -> int:
        """How many parsed requests the parser hands over before it waits for them to be taken."""
        return self._max_msg_queue_size

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
        self._heads_at_arming = self._request_count
        self._head_timer = asyncio.get_running_loop().call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # Only an idle connection (waiting for a head) is closed: bytes that
        # armed the timer may have been a request body, with its handler busy.
        idle = self._waiter is not None and not self._waiter.done()
        if self._request_count == self._heads_at_arming and idle and self.transport is not None:
            log_event(log, logging.INFO, "closed a connection that sent no whole request head in time")
            self.force_close()

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


class _HitAnsweringParser:
    """A connection's request parser that hands on only what its connection did not answer.

    aiohttp's ``data_received`` queues every parsed request for the app; the
    requests answered inline never reach that queue. The first request that
    is not answered inline stops it, so later ones queue behind it.
    """

    def __init__(self, parser: Any, connection: _JsonErrorHandler) -> None:
        self._parser = parser
        self._connection = connection

    def feed_data(self, data: bytes) -> tuple[Sequence[tuple[RawRequestMessage, StreamReader]], bool, bytes]:
        connection = self._connection
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except Exception:
            connection.stop_answering_inline()
            raise
        if upgraded:
            # What follows an upgrade request is queued by aiohttp itself, uncounted.
            connection.stop_answering_inline()
        answered = 0
        for message, payload in messages:
            if not connection.answer_inline(message, payload):
                break
            # Frees the parser's slot as start() does for the requests it takes.
            self._parser.message_consumed()
            answered += 1
        # The parser stops at its queue limit, with the rest buffered, until start() takes some.
        parser_held = len(messages) >= connection.max_queued_requests
        if answered == len(messages) and parser_held:
            # All were answered here, so nothing reached start() to resume the parser.
            # Resume it at the loop's next turn, as start() would: one long pipeline
            # does not hold the loop from other connections.
            connection.resume_parsing_soon()
        elif answered and parser_held:
            # start() resumes the parser only after a full queue paused reading,
            # and the requests answered here kept the queue from filling.
            connection.hold_reading_until_drained()
        return (messages[answered:] if answered else messages), upgraded, tail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class _GatewayServer(web.Server):
    header_timeout_s = 10.0
    state: GatewayState | None = None

    def __call__(self) -> RequestHandler:
        handler = _JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout_s = self.header_timeout_s
        handler.state = self.state
        return handler


class GatewayRunner(web.AppRunner):
    """AppRunner whose connections render protocol errors as JSON."""

    def __init__(self, app: web.Application, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no hook for its protocol-level error page; swapping the
        # server's class keeps everything else of AppRunner's set-up intact.
        server.__class__ = _GatewayServer
        server.header_timeout_s = self._header_timeout_s  # type: ignore[attr-defined]
        server.state = self.app[STATE]  # type: ignore[attr-defined]
        return server


@dataclass
class RunningGateway:
    runner: GatewayRunner
    state: GatewayState
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within the grace period, close."""
        await self.runner.cleanup()
        self.state.access_log.flush()


async def start_gateway(
    config: GatewayConfig, host: str | None = None, port: int | None = None, state: GatewayState | None = None
) -> RunningGateway:
    """Start serving ``config`` (``host``/``port`` override it; port 0 picks one)."""
    state = state or GatewayState.create(config)
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
    site = web.TCPSite(runner, host or server.host, server.port if port is None else port, backlog=server.backlog)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    return RunningGateway(runner, state, bound_host, bound_port)


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


async def serve_until_signalled(running: RunningGateway, load: Callable[[], GatewayConfig]) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the config."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_config, running.state, load)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    log_event(log, logging.INFO, "serving", url=running.url)
    await stopping.wait()
    log_event(
        log,
        logging.INFO,
        "stopping: finishing requests in flight",
        grace_s=running.state.snapshot.config.server.shutdown_grace_s,
    )
    await running.stop()
    log_event(log, logging.INFO, "stopped")
