"""Stopping a background task for sure: cancelled again until it has ended.

On Python 3.11, ``asyncio.wait_for`` (which redis-py sends each command
through when a socket timeout is set) swallows a cancellation that arrives
as the send completes: the task then carries on. A loop that calls Redis
(the follower, the refresher, a webhook's deliveries, a sweeper) would then
never end, nor would the ``close()`` that waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# How long a stop waits for a cancelled task before cancelling it again.
CANCEL_AGAIN_S = 0.05


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and return once it has ended, cancelling it again while it runs on."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_S)
    with contextlib.suppress(asyncio.CancelledError):
        await task
