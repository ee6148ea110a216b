"""The upstream budget's shared tier, as the client sees it: what a take
answers, and the protocol a shared budget keeps.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

# What the budget script says: a token (is) taken, wait for one, or every process is paused.
TOKEN, WAIT, PAUSED_BY_ANOTHER = 0, 1, 2


class LinkView(Protocol):
    """What the client reads of the shared tier's link (``gateway.replicas.link.RedisLink``)."""

    @property
    def usable(self) -> bool:
        """Calls may go to the shared tier now."""
        ...

    @property
    def up(self) -> bool: ...

    @property
    def alive(self) -> int:
        """The processes last seen alive: this process's share is the budget divided by them."""
        ...

    def in_background(self, work: Awaitable[None]) -> None: ...


class SharedBudget(Protocol):
    """One budget and one 429 pause for every process (``gateway.replicas.shared_budget`` keeps it).

    Every call may raise ``errors.RedisDown``; the client then takes its share locally.
    """

    @property
    def link(self) -> LinkView: ...

    @property
    def tokens(self) -> float:
        """The shared bucket's tokens as last seen."""
        ...

    async def take(self, rate: float, burst: int, reserve: int, writer: str = "") -> tuple[int, float]: ...

    def estimated_wait(self, rate: float, burst: int, reserve: int) -> float: ...

    async def pause(self, seconds: float) -> None: ...
