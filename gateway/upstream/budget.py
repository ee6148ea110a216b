"""The upstream budget: a token per HTTP call, one pause after a 429, shared by every process.

``UpstreamBudget`` is what the client spends; ``SharedBudget`` is the protocol
its shared tier keeps (``gateway.replicas.shared_budget`` implements it on
Redis), with what a take there answers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable
from typing import Protocol

from gateway import errors
from gateway.config import RateLimit, UpstreamSettings
from gateway.errors import RedisDown
from gateway.ops.metrics import Metrics
from gateway.upstream.guards import Clock, TokenBucket

# What the budget script says: a token (is) taken, wait for one, or every process is paused.
TOKEN, WAIT, PAUSED_BY_ANOTHER = 0, 1, 2
# The share of the budget's burst that refreshes of held answers leave to new ids and writes.
RESERVED_SHARE = 0.25


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


class UpstreamBudget:
    """The upstream budget as this process spends it: a token per HTTP call, and the upstream's pause.

    With a shared budget (Redis, docs/design.md §10) every process takes from one
    bucket and honours one pause. While Redis is lost this process takes its
    share (the budget divided by the processes last seen alive) from its own
    bucket, and takes the whole budget again once Redis answers. Writes come
    first (docs/design.md §8): while one waits for a token, reads take none. A refresh
    of an answer the gateway holds leaves a reserve (``RESERVED_SHARE``) to
    new ids and writes (docs/design.md §9).
    """

    def __init__(
        self, limit: RateLimit, metrics: Metrics, clock: Clock = time.monotonic, shared: SharedBudget | None = None
    ) -> None:
        self.limit = limit
        self.metrics = metrics
        self._clock = clock
        # This process's own bucket: the whole budget, or its share while Redis is lost.
        self.bucket = TokenBucket(limit.requests_per_s, limit.burst, clock)
        self.shared = shared
        self._shares = 1
        self.paused_until = 0.0
        # Writes waiting for a budget token: reads take none meanwhile.
        self._writes_waiting = 0
        metrics.budget_tokens.set_function(self._tokens_left)
        metrics.paused_seconds.set_function(lambda: max(0.0, self.paused_until - self._clock()))

    def reconfigure(self, limit: RateLimit) -> None:
        """Take a reloaded limit, keeping this process's share while Redis is lost."""
        self.limit = limit
        self._reshare(self._shares)

    # --- the upstream's pause (a 429, or a 503 with Retry-After) ---

    def check_paused(self) -> None:
        """Refuse a call while the upstream's pause lasts."""
        remaining = self.paused_until - self._clock()
        if remaining > 0:
            self.metrics.upstream_rejected.labels("paused").inc()
            raise errors.UpstreamRateLimited(retry_after_s=remaining)

    def pause(self, seconds: float) -> float:
        """Stop every upstream call, in every process, for ``seconds``; return the time the pause has left."""
        self.metrics.upstream_pauses.inc()
        if self.shared is not None:
            self.shared.link.in_background(self.shared.pause(seconds))
        return self.hold(seconds)

    def hold(self, seconds: float) -> float:
        """Hold this process's upstream calls for ``seconds`` (another process was told to pause)."""
        now = self._clock()
        if now + seconds >= self.paused_until:
            self.paused_until = now + seconds
            # Not (now + seconds) - now: in floating point that can exceed seconds by
            # an ulp, and a Retry-After of 7 would then be rounded up to 8.
            return seconds
        return self.paused_until - now

    # --- tokens ---

    async def spend(self, settings: UpstreamSettings, may_wait: bool, write: bool, deadline: float) -> None:
        """Take a budget token, waiting at most ``budget_wait_s`` (and never past the deadline) if allowed.

        A write may wait until the deadline, and reads take no token while
        one waits (docs/design.md §8: writes come first). The time waited is counted
        in sleeps rather than read from the clock, so a frozen test clock
        cannot make the wait endless.
        """
        if write:
            self._writes_waiting += 1
        try:
            await self._take_token(settings, may_wait, secrets.token_hex(6) if write else "", deadline)
        finally:
            if write:
                self._writes_waiting -= 1

    async def _take_token(self, settings: UpstreamSettings, may_wait: bool, writer: str, deadline: float) -> None:
        """``writer`` names a write (a create or cancel), "" for a read."""
        loop = asyncio.get_running_loop()
        allowed = settings.timeout_s if writer else settings.budget_wait_s if may_wait else 0.0
        # A refresh of an answer the gateway holds (it may not wait: the held answer
        # serves meanwhile) leaves a reserve for new ids and writes (docs/design.md §9).
        reserved = not (may_wait or writer)
        waited = 0.0
        while (wait := await self._next_token(writer, reserved)) > 0:
            # A sleep that would end at the deadline is pointless: the fetch would be cut off.
            if waited + wait > allowed or loop.time() + wait >= deadline:
                self.metrics.upstream_rejected.labels("budget").inc()
                raise errors.RateLimited(retry_after_s=wait)
            await asyncio.sleep(wait)
            waited += wait

    def refresh_wait_s(self) -> float:
        """Seconds until a refresh of a held answer could take a token (0: now)."""
        paused = self.paused_until - self._clock()
        if paused > 0:
            return paused
        limit = self.limit
        shared = self._shared_budget()
        if shared is not None:
            # From the shared bucket as last seen: a guess must not wait on Redis.
            return shared.estimated_wait(limit.requests_per_s, limit.burst, int(RESERVED_SHARE * limit.burst))
        return self._token_wait(False, int(RESERVED_SHARE * self.bucket.burst), take=False)

    async def _next_token(self, writer: str, reserved: bool) -> float:
        """0 with a token taken, or the seconds until one is due: from the shared budget while Redis answers,
        else from this process's share of it. ``reserved``: leave the reserve (RESERVED_SHARE) to others."""
        write = bool(writer)
        shared = self._shared_budget()
        if shared is not None and (write or not self._writes_waiting):
            limit = self.limit
            reserve = int(RESERVED_SHARE * limit.burst) if reserved else 0
            try:
                kind, wait = await shared.take(limit.requests_per_s, limit.burst, reserve, writer)
            except RedisDown:
                self._reshare(shared.link.alive)  # Redis lost (or refusing) just now: this process's share
            else:
                if kind == PAUSED_BY_ANOTHER:
                    self.metrics.upstream_rejected.labels("paused").inc()
                    raise errors.UpstreamRateLimited(retry_after_s=self.hold(wait))
                return wait
        return self._token_wait(write, int(RESERVED_SHARE * self.bucket.burst) if reserved else 0)

    def _token_wait(self, write: bool, reserve: int, take: bool = True) -> float:
        """0 with a token taken, or the seconds until one is due (for a read, while no write waits).

        A call with a ``reserve`` takes a token only while more than that many are left.
        """
        if not write and self._writes_waiting:
            return 1 / self.bucket.rate
        wait = self.bucket.wait_s(reserve)
        if wait or not take:
            return wait
        return self.bucket.try_take()

    # --- this process's share ---

    def _reshare(self, shares: int) -> None:
        """This process's own bucket: the whole budget, or its share while Redis is lost (docs/design.md §10)."""
        self._shares = shares
        self.bucket.reconfigure(self.limit.requests_per_s / shares, max(1, self.limit.burst // shares))

    def _shared_budget(self) -> SharedBudget | None:
        """The shared budget while Redis answers; else None, with this process's bucket cut to its share."""
        shared = self.shared
        if shared is None:
            return None
        if shared.link.usable:
            if self._shares != 1:
                self._reshare(1)  # back to sharing: the local bucket is the whole budget again
            return shared
        if shared.link.alive != self._shares:
            self._reshare(shared.link.alive)
        return None

    def _tokens_left(self) -> float:
        shared = self.shared
        return shared.tokens if shared is not None and shared.link.up else self.bucket.tokens
