"""Every private aiohttp name the gateway touches, and only here.

aiohttp has no public hook for what the edge does below its Application (a
fresh hit answered as soon as its head is parsed, JSON for requests it cannot
parse, a deadline for each request head, pipelined requests its parser would
lose) nor for turning off the client's silent resend. Those parts of aiohttp
change in patch releases, so:

- the rest of ``gateway/`` reaches them only through the names below, each
  with a line saying which aiohttp code it mirrors and why it is needed;
- ``pyproject.toml`` pins aiohttp to the one version this was written
  against (``VERSION``);
- ``tests/test_aiohttp_canary.py`` checks every entry of ``MIRRORED`` exists
  and is still of its kind, so an upgrade fails CI with the name, not
  production with an ``AttributeError`` on a rare path;
- ``tests/test_aiohttp_canary.py`` also checks no other module names one.

When upgrading aiohttp: read the diff of ``web_protocol.py``,
``base_protocol.py``, ``web_server.py``, ``web_runner.py``,
``http_parser.py`` and ``client.py`` against each mirror below.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import ClientSession, web

# Plain re-exports from aiohttp's internal modules: their homes move between releases.
from aiohttp.helpers import rfc822_formatted_time  # the cached Date header value aiohttp's writer uses
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong  # what the parser raises
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage  # the pure-Python parser; a parsed head
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader  # a request with no body carries this very object
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

__all__ = [
    "EMPTY_PAYLOAD",
    "MIRRORED",
    "VERSION",
    "Connection",
    "Handler",
    "HttpProcessingError",
    "HttpRequestParserPy",
    "LineTooLong",
    "Parsed",
    "RawRequestMessage",
    "RequestHandler",
    "RequestPayloadError",
    "ServingRunner",
    "StreamReader",
    "build_connection",
    "handler_options",
    "is_parse_error",
    "parse_error",
    "rfc822_formatted_time",
    "turn_off_silent_resend",
]

# The one aiohttp version every mirror below was checked against (pyproject.toml pins it).
VERSION = "3.14.5"

Kind = Literal["class", "function", "method", "coroutine method", "attribute", "object"]


@dataclass(frozen=True, slots=True)
class Mirror:
    """One private aiohttp name: where it lives, what kind it is, and why the gateway needs it."""

    owner: str  # "module" or "module.Class"
    name: str
    kind: Kind
    why: str


MIRRORED: tuple[Mirror, ...] = (
    # --- module-level names ---------------------------------------------------------------------------------------
    Mirror("aiohttp.web_protocol", "RequestHandler", "class", "the connection class the edge subclasses"),
    Mirror("aiohttp.web_protocol", "_ErrInfo", "class", "what data_received queues for a parse error: a 400 item"),
    Mirror("aiohttp.web_protocol", "RequestPayloadError", "class", "the payload error a parser is built with"),
    Mirror("aiohttp.http_parser", "HttpRequestParserPy", "class", "llhttp drops bytes after an Upgrade; it does not"),
    Mirror("aiohttp.http_parser", "RawRequestMessage", "class", "the parsed head the inline path reads"),
    Mirror("aiohttp.streams", "EMPTY_PAYLOAD", "object", "the parser's marker for a request with no body"),
    Mirror("aiohttp.helpers", "rfc822_formatted_time", "function", "the Date header aiohttp's writer sends"),
    Mirror("aiohttp.http_exceptions", "LineTooLong", "class", "a head past max_line_size: 431, not 400"),
    # --- RequestHandler (web_protocol.py) and BaseProtocol (base_protocol.py) fields --------------------------------
    Mirror("aiohttp.web_protocol.RequestHandler", "_parser", "attribute", "replaced by the pipelining wrapper"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_messages", "attribute", "the queue of requests for the app"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_request_count", "attribute", "requests parsed: head deadline"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_read_bufsize", "attribute", "a re-reading parser's buffer"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_max_msg_queue_size", "attribute", "when start() resumes"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_manager", "attribute", "the server's request count"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_keepalive_timeout", "attribute", "keep-alive after a hit"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_keepalive_handle", "attribute", "keep-alive after a hit"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_next_keepalive_close_time", "attribute", "keep-alive after a hit"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_waiter", "attribute", "set while start() waits: idle"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_request_in_progress", "attribute", "a request is handled"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_close", "attribute", "closing after the current answer"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_force_close", "attribute", "closing now"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_buffer_paused", "attribute", "reading held for a full queue"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_process_keepalive", "method", "the keep-alive timer's callback"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_pause_reading_for_buffer", "method", "hold reading"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_resume_reading_for_buffer", "method", "release that hold"),
    Mirror("aiohttp.web_protocol.RequestHandler", "_handle_request", "coroutine method", "one request's answer"),
    # --- the server, the runner, the client -------------------------------------------------------------------------
    Mirror("aiohttp.web_server.Server", "_loop", "attribute", "what Server.__call__ builds a handler with"),
    Mirror("aiohttp.web_server.Server", "_kwargs", "attribute", "what Server.__call__ builds a handler with"),
    Mirror("aiohttp.web_runner.AppRunner", "_make_server", "coroutine method", "where the server class is swapped"),
    Mirror("aiohttp.client.ClientSession", "_retry_connection", "attribute", "the silent resend on a dropped call"),
)

# A parsed item aiohttp queues for start(): a request, or the parse error that ends the connection.
Parsed = tuple[RawRequestMessage | _ErrInfo, StreamReader]


def parse_error(exc: HttpProcessingError) -> Parsed:
    """The item ``RequestHandler.data_received`` queues when its parser raises: start() answers it with a 400."""
    return _ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD


def is_parse_error(message: object) -> bool:
    """Whether a queued item is a parse error rather than a request."""
    return isinstance(message, _ErrInfo)


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Connection(RequestHandler):
    """``RequestHandler`` with its private fields behind names that say what they are.

    Subclasses (``gateway.edge.connection``) use these, never aiohttp's own names.
    """

    # --- handling one request ---------------------------------------------------------------------------------------

    async def _handle_request(
        self, request: web.BaseRequest, start_time: float | None, request_handler: Handler
    ) -> tuple[web.StreamResponse, bool]:
        # Mirrors RequestHandler._handle_request, which start() calls for each queued request:
        # the one place a request's answer (and whether the connection is reset) is known.
        return await self.handle(request, start_time, request_handler)

    async def handle(
        self, request: web.BaseRequest, start_time: float | None, request_handler: Handler
    ) -> tuple[web.StreamResponse, bool]:
        """Answer one request as aiohttp does; override to act around it."""
        return await RequestHandler._handle_request(self, request, start_time, request_handler)

    # --- the parser and the queue -----------------------------------------------------------------------------------

    @property
    def request_parser(self) -> Any:
        # BaseProtocol._parser: the HTTP parser data_received feeds (None once the connection is lost).
        return self._parser

    @request_parser.setter
    def request_parser(self, parser: Any) -> None:
        self._parser = parser

    @property
    def read_bufsize(self) -> int:
        # RequestHandler._read_bufsize: what aiohttp builds its parser with, for a parser that re-reads.
        return self._read_bufsize

    @property
    def requests_parsed(self) -> int:
        # RequestHandler._request_count: data_received adds one per parsed request; the head deadline counts on it.
        return self._request_count

    @property
    def queued(self) -> int:
        # RequestHandler._messages: what start() has still to take; a hit answered inline must not overtake them.
        return len(self._messages)

    @property
    def queue_limit(self) -> int:
        # RequestHandler._max_msg_queue_size: past it data_received pauses reading and start() resumes it.
        return self._max_msg_queue_size

    # --- state of the connection ------------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        # RequestHandler._close / _force_close: set by close() and force_close().
        return bool(self._close or self._force_close)

    @property
    def idle(self) -> bool:
        # RequestHandler._waiter: start() awaits it while it has no request; also how _process_keepalive tells idle.
        return self._waiter is not None and not self._waiter.done()

    @property
    def handling_request(self) -> bool:
        # RequestHandler._request_in_progress: set by _handle_request around the app's handler.
        return bool(self._request_in_progress)

    # --- flow control -----------------------------------------------------------------------------------------------

    @property
    def reading_held(self) -> bool:
        # BaseProtocol._buffer_paused: reading held for a buffer (the full queue); start() releases it.
        return bool(self._buffer_paused)

    def hold_reading(self) -> None:
        # BaseProtocol._pause_reading_for_buffer: what data_received does at a full queue.
        self._pause_reading_for_buffer()

    def release_reading(self) -> None:
        # BaseProtocol._resume_reading_for_buffer: what start() does as the queue drains.
        self._resume_reading_for_buffer()

    # --- a request answered below start() ---------------------------------------------------------------------------

    def count_answered(self) -> None:
        """What start() does for each request it handles, as far as one answered inline needs it.

        Mirrors RequestHandler.data_received (``_request_count``), start()
        (``manager.requests_count``) and its keep-alive re-arming
        (``_next_keepalive_close_time``, ``_keepalive_handle``, ``_process_keepalive``).
        """
        self._request_count += 1
        if self._manager is not None:
            self._manager.requests_count += 1
        if self._keepalive_timeout > 0:
            loop = self._loop  # the connection's loop (asyncio.get_running_loop() costs a getpid() a call)
            self._next_keepalive_close_time = loop.time() + self._keepalive_timeout
            if self._keepalive_handle is None:
                self._keepalive_handle = loop.call_at(self._next_keepalive_close_time, self._process_keepalive)


def build_connection(server: web.Server, cls: type[Connection]) -> Connection:
    """A connection of class ``cls`` built as ``Server.__call__`` builds a ``RequestHandler``.

    Mirrors web_server.Server.__call__ (``_loop``, ``_kwargs``): the
    handler's options (keep-alive, parser sizes) are the runner's.
    """
    return cls(server, loop=server._loop, **server._kwargs)


def handler_options(server: web.Server) -> dict[str, Any]:
    """The options ``server`` builds each connection with (``Server._kwargs``): the parser sizes among them."""
    return dict(server._kwargs)


class ServingRunner(web.AppRunner):
    """``AppRunner`` whose server is of class ``server_class``.

    Overrides AppRunner._make_server: aiohttp has no hook for the class of
    its server (and so of its connections); swapping the class of the one it
    makes keeps the rest of AppRunner's set-up (the app's startup, its
    request factory) intact.
    """

    server_class: type[web.Server] = web.Server

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = self.server_class
        self.server_made(server)
        return server

    def server_made(self, server: web.Server) -> None:
        """Called with the server once made: set what its connections need."""


def turn_off_silent_resend(session: ClientSession) -> None:
    """Stop ``session`` resending an idempotent request once when its connection drops.

    ClientSession._retry_connection (client.py, ``_request``): aiohttp
    silently sends the call again; that second call would bypass the
    upstream budget and the retry count, so retries stay the gateway's. No
    public switch exists; the canary test fails if the field goes away.
    """
    session._retry_connection = False
