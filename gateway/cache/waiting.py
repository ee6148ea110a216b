"""Requests held until their batch changes (``Prefer: wait``, docs/design.md §9), counted in all and per caller."""

from __future__ import annotations

import asyncio
from enum import Enum


class WaitEnd(Enum):
    """Why a wait ended (the label of ``gateway_waits_ended_total``)."""

    CHANGED = "changed"
    TIMEOUT = "timeout"
    GONE = "gone"
    SHUTDOWN = "shutdown"
    # Answered at once, never held: past cache.max_waiters, or past the caller's max_waiters_per_caller.
    LIMIT = "limit"
    CALLER_LIMIT = "caller_limit"


def _settle(waiter: asyncio.Future[WaitEnd], end: WaitEnd) -> None:
    if not waiter.done():
        waiter.set_result(end)


class Waiters:
    """The requests held until their batch changes, counted in all and per caller."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[WaitEnd]]] = {}
        self._by_caller: dict[str, int] = {}
        self.total = 0
        self.stopping = False

    def held_for(self, batch_id: str) -> int:
        return len(self._waiting.get(batch_id, ()))

    def held_by(self, caller: str) -> int:
        """Requests ``caller`` has held now (``cache.max_waiters_per_caller`` bounds it)."""
        return self._by_caller.get(caller, 0)

    async def wait(self, batch_id: str, caller: str, timeout_s: float, gone: asyncio.Future[None] | None) -> WaitEnd:
        """Hold until ``batch_id`` changes, ``timeout_s`` passes, ``gone`` is done, or the gateway stops."""
        if self.stopping:
            return WaitEnd.SHUTDOWN
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[WaitEnd] = loop.create_future()
        group = self._waiting.setdefault(batch_id, set())
        group.add(waiter)
        self.total += 1
        self._by_caller[caller] = self._by_caller.get(caller, 0) + 1
        timer = loop.call_later(timeout_s, _settle, waiter, WaitEnd.TIMEOUT)

        def client_gone(_: asyncio.Future[None]) -> None:
            _settle(waiter, WaitEnd.GONE)

        if gone is not None:
            gone.add_done_callback(client_gone)
        try:
            return await waiter
        finally:
            timer.cancel()
            if gone is not None:
                gone.remove_done_callback(client_gone)
            group.discard(waiter)
            self.total -= 1
            if (left := self._by_caller.pop(caller) - 1) > 0:
                self._by_caller[caller] = left
            if not group and self._waiting.get(batch_id) is group:
                del self._waiting[batch_id]

    def changed(self, batch_id: str) -> None:
        """``batch_id``'s answer changed (or was dropped): every request waiting on it is answered."""
        for waiter in self._waiting.get(batch_id, ()):
            _settle(waiter, WaitEnd.CHANGED)

    def release_all(self) -> None:
        """The gateway is stopping: every waiter is answered at once, and no new one waits."""
        self.stopping = True
        for group in self._waiting.values():
            for waiter in group:
                _settle(waiter, WaitEnd.SHUTDOWN)
