"""An upload's body as it arrives from the caller (docs/design.md §11): bounded, timed, checked, fingerprinted.

``CallerBody`` reads the caller's chunks one at a time, each within
``datasets.upload_idle_timeout_s``, counts them against the request's limit
(``rules.body_limit``: ``datasets.max_upload_bytes``) and feeds them to the
multipart parser (``gateway.datasets.multipart``). Nothing is kept but the
chunk in hand, and the chunks of the opening that are read before the
upstream call is made:

- **the opening**: the body is read until its first part's headers are
  whole (at most ``OPENING_MAX_BYTES``), so that a body that is not
  multipart is refused with no upstream call;
- **the stream**: from then on each chunk is handed upstream one chunk
  late, so that when the caller's body ends, the parser has checked the
  closing boundary (and the fingerprint is known) before the last chunk
  leaves: a body that is cut short or malformed never reaches the upstream
  whole, and so never becomes a dataset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway import errors
from gateway.datasets.multipart import PartsFingerprint
from gateway.ops.logs import log_event

log = logging.getLogger("gateway")

# The first part's headers must be whole within this many bytes of the body (python-multipart
# bounds a part's headers at about 4 KiB each, 8 of them).
OPENING_MAX_BYTES = 65536

Check = Callable[[str], Awaitable[None]]


class CallerBody:
    """The caller's upload body, read chunk by chunk (see the module docstring)."""

    def __init__(
        self,
        request: web.Request,
        parts: PartsFingerprint,
        limit: int,
        idle_s: float,
        counted: Callable[[int], None],
        caller: str,
    ) -> None:
        self._content = request.content
        self._parts = parts
        self._limit = limit
        self._idle_s = idle_s
        self._counted = counted
        self._caller = caller
        self.size = 0
        self.fingerprint: str | None = None

    async def read(self) -> bytes:
        """The next chunk (``b""`` at the end): 408 when idle, 413 past the limit, 400 once not multipart."""
        deadline = asyncio.timeout(self._idle_s)
        try:
            async with deadline:
                chunk = await self._content.readany()
        except web.RequestPayloadError:
            raise errors.MalformedRequest("The request body's framing is broken.") from None
        # The connection's loss is whatever OSError the transport saw: only the deadline's own is a 408.
        except OSError:
            if deadline.expired():
                log_event(log, logging.INFO, "an upload stopped arriving", caller=self._caller, bytes=self.size)
                raise errors.RequestTimeout() from None
            log_event(log, logging.INFO, "the client hung up mid-upload", caller=self._caller, bytes=self.size)
            raise errors.ClientDisconnected() from None
        if not chunk:
            return chunk
        self.size += len(chunk)
        self._counted(len(chunk))
        if self.size > self._limit:
            raise errors.BodyTooLarge()
        self._parts.feed(chunk)
        return chunk

    async def opening(self) -> list[bytes]:
        """The chunks up to the first part's headers (or the whole body, if it is shorter); 400 if not multipart."""
        held: list[bytes] = []
        size = 0
        while not self._parts.headers_seen:
            chunk = await self.read()
            if not chunk:
                self.fingerprint = self._parts.finish()  # a whole body: checked before anything goes upstream
                break
            held.append(chunk)
            size += len(chunk)
            if size > OPENING_MAX_BYTES and not self._parts.headers_seen:
                raise errors.InvalidRequest("The multipart body's first part has no headers within 64 KiB.")
        return held

    async def stream(self, held: list[bytes], before_last: Check | None = None) -> AsyncIterator[bytes]:
        """``held`` and the rest of the body, one chunk late; ``before_last`` sees the fingerprint first."""
        previous = b"".join(held)
        while chunk := await self.read():
            if previous:
                yield previous
            previous = chunk
        self.fingerprint = self._parts.finish()
        if before_last is not None:
            await before_last(self.fingerprint)
        if previous:
            yield previous

    async def drain(self) -> str:
        """Read the rest of the body (a replay compares it and sends nothing upstream); its fingerprint."""
        while await self.read():
            pass
        self.fingerprint = self._parts.finish()
        return self.fingerprint
