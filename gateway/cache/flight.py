"""Single-flight: one call per key however many ask at once; a caller that leaves never cancels it for the others."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Generic, TypeVar

from gateway import errors

if TYPE_CHECKING:
    pass


T = TypeVar("T")


class SingleFlight(Generic[T]):
    """At most one call per key in flight; every caller for the key shares it.

    The call runs in its own task, and each caller awaits it through
    ``asyncio.shield``: a caller that goes away (the one that started it
    included) never cancels it for the others. Each caller waits at most
    ``wait_s`` from the moment it asked. The task leaves the table when it
    ends, success or error, so a failed call leaves nothing behind; every
    caller that joins a call already out is reported to ``on_join``.
    """

    def __init__(self, on_join: Callable[[], None] | None = None) -> None:
        self._calls: dict[str, asyncio.Task[T]] = {}
        self._on_join = on_join or (lambda: None)

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, key: str, start: Callable[[], Awaitable[T]], wait_s: float) -> T:
        """Return the result of the call for ``key``, starting one if none is out."""
        task = self._calls.get(key)
        # A task that has ended but whose done callback has not run yet is not
        # joined: a failure would otherwise reach a caller that came after it.
        if task is None or task.done():
            task = asyncio.ensure_future(start())
            self._calls[key] = task
            task.add_done_callback(partial(self._finished, key))
        else:
            self._on_join()
        try:
            async with asyncio.timeout(wait_s):
                return await asyncio.shield(task)
        except TimeoutError:
            raise errors.UpstreamTimeout("Gave up waiting for the upstream's answer.") from None

    def current(self, key: str) -> asyncio.Task[T] | None:
        """The call out for ``key``, if any."""
        return self._calls.get(key)

    def forget(self, key: str) -> None:
        """The call out for ``key`` (if any) answers those already waiting; later callers start another."""
        self._calls.pop(key, None)

    def _finished(self, key: str, task: asyncio.Task[T]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so asyncio never warns about it
