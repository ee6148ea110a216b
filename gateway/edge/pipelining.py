"""Every pipelined request answered in order, or the connection closed after the last one answered.

``HitAnsweringParser`` wraps a connection's request parser: it offers each
parsed request to the connection to answer inline (a fresh hit), hands on
the rest to aiohttp's queue, and makes up for what aiohttp's parser loses
in a pipeline (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway._aiohttp import (
    EMPTY_PAYLOAD,
    HttpProcessingError,
    HttpRequestParserPy,
    Parsed,
    RawRequestMessage,
    StreamReader,
    is_parse_error,
    parse_error,
)


class InlineAnswering(Protocol):
    """What the parser asks of its connection (``gateway.edge.connection.GatewayConnection``)."""

    @property
    def queued(self) -> int: ...
    @property
    def queue_limit(self) -> int: ...
    def answer_inline(self, message: RawRequestMessage, payload: StreamReader) -> bool: ...
    def stop_answering_inline(self) -> None: ...
    def close_when_answered(self) -> None: ...
    def resume_parsing_soon(self) -> None: ...
    def hold_reading_until_drained(self) -> None: ...


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


class HitAnsweringParser:
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

    def __init__(self, parser: Any, connection: InlineAnswering, new_parser: Callable[[], Any]) -> None:
        self.wrapped = parser
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
        self._bodies_seen = False

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
            if is_parse_error(message) or not connection.answer_inline(message, payload):  # type: ignore[arg-type]
                break
            # Frees the parser's slot as start() does for the requests it takes.
            self.wrapped.message_consumed()
            answered += 1
        rest = messages[answered:] if answered else messages
        if messages and not upgraded and not self._failed:
            # Ask the parser whether it holds requests back: it stops, with the rest
            # buffered until someone feeds it again, once the requests it handed out
            # and nobody took (those queued, and these before any was answered) reach
            # its queue limit. Below that it holds none, and asking costs a feed.
            # A request with a body may have cost the parser a slot for good (see the
            # class docstring): from the first one on, it is always asked.
            self._note_bodies(rest)
            may_hold = self._bodies_seen or connection.queued + len(messages) >= connection.queue_limit
            held = self._parse(b"")[0] if may_hold else ()
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
                self._note_bodies(held)
                connection.hold_reading_until_drained()
            elif self._last_payload is EMPTY_PAYLOAD and self._unsettled.endswith(b"\r\n\r\n"):
                # At rest: nothing fed so far needs re-reading.
                self._unsettled.clear()
                self._unsettled_known = True
                self._handed_out = 0
        return rest, upgraded, tail

    def _note_bodies(self, handed_on: Sequence[Parsed]) -> None:
        """Whether any request handed on to the app so far came with a body (never one answered inline)."""
        if handed_on and not self._bodies_seen:
            self._bodies_seen = any(payload is not EMPTY_PAYLOAD for _, payload in handed_on)

    def _parse(self, data: bytes) -> tuple[Sequence[Parsed], bool, bytes]:
        """Feed the parser; what it hands out, with what it lost put back."""
        if data and self._unsettled_known:
            self._unsettled += data
            if len(self._unsettled) > _COMPACT_UNSETTLED:
                self._compact()
        try:
            parsed, upgraded, tail = self.wrapped.feed_data(data)
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
                parsed, upgraded, tail = self.wrapped.feed_data(after)
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
        return [*recovered, parse_error(exc)]

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
        return getattr(self.wrapped, name)
