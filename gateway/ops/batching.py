"""Work handed on in batches (``FlushSoon``): at the end of the event loop's turn, or within a moment; with
``flush_pending`` for a stop or a test that reads what was handed on.

Used by the log handler and the access log (``gateway.ops.logs``), the request counts
(``gateway.ops.metrics``) and the answers given inline (``gateway.edge.inline``).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable

# Access lines and request counts are handed on at most this long after the first of a batch (access lines
# sooner once gateway.ops.logs.ACCESS_BATCH wait): a busy gateway that keeps up answers about one request per
# loop turn, so handing them on at each turn's end cost a log record, a write and a metrics flush per request
# (docs/benchmark.md, "Cache hits").
BATCH_WITHIN_S = 0.05
# Every FlushSoon with a flush pending, for flush_pending.
_PENDING: weakref.WeakSet[FlushSoon] = weakref.WeakSet()


class FlushSoon:
    """Calls ``flush`` once, however often asked: at the end of the running loop's turn, or ``within_s`` after
    the first request since the last flush; at once outside a loop.

    The loop a flush is scheduled on is remembered, not a flag: a loop
    closed before running it does not keep later flushes from being
    scheduled. ``flush`` calls ``done`` first, whoever called it (early: a
    scrape, a full batch, a stop).
    """

    def __init__(self, flush: Callable[[], None], within_s: float = 0.0) -> None:
        self._flush = flush
        self._within_s = within_s
        self._handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0  # the thread running that loop

    def request(self) -> None:
        # Asked again on the loop that runs the flush: nothing to do. Known without
        # asyncio.get_running_loop(), which costs a getpid() a call (once per request).
        loop = self._loop
        if (
            self._handle is not None
            and loop is not None
            and self._thread == threading.get_ident()
            and loop.is_running()
        ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush()
            return
        self._loop, self._thread = loop, threading.get_ident()
        if self._within_s:
            self._handle = loop.call_later(self._within_s, self._flush)
        else:
            self._handle = loop.call_soon(self._flush)
        _PENDING.add(self)

    def done(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        _PENDING.discard(self)


def flush_pending() -> None:
    """Hand on every batch still waiting for its time (a stop; a test reading what was logged)."""
    for waiting in list(_PENDING):
        waiting._flush()
