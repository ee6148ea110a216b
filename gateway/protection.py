"""Clock-driven guards on upstream traffic: a token bucket and a circuit breaker.

Both are plain objects with an injectable clock and no I/O, so their rules
are tested as pure logic; ``upstream.py`` and ``handlers.py`` use them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

Clock = Callable[[], float]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = clock()

    def reconfigure(self, rate: float, burst: int) -> None:
        """Take a reloaded limit without handing out a fresh burst."""
        self._refill()
        self.rate, self.burst = rate, burst
        self._tokens = min(self._tokens, float(burst))

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def try_take(self) -> float:
        """Take a token and return 0, or return the seconds until one is due."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class BreakerState(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Fail fast after ``threshold`` consecutive failures, for ``cooldown_s``.

    After the cooldown a single probe is let through: its success closes the
    breaker, its failure opens it for another cooldown. While the probe is
    out, everyone else still fails fast.
    """

    def __init__(self, threshold: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state = BreakerState.CLOSED

    def reconfigure(self, threshold: int, cooldown_s: float) -> None:
        self.threshold, self.cooldown_s = threshold, cooldown_s

    def admit(self) -> float:
        """Return 0 if a call may go out now, else the seconds until the next probe."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        remaining = self._opened_at + self.cooldown_s - self._clock()
        if self.state is BreakerState.OPEN and remaining <= 0:
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self.state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return 0.0
        # While the probe is out, ask callers to come back shortly.
        return max(remaining, 1.0)

    def abandon(self) -> None:
        """The admitted call never reached the upstream: free the probe slot."""
        self._probing = False

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        self.state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
            self.state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probing = False

    def record_neutral(self) -> None:
        """An answer that says nothing of the upstream's health (a 404, a 429)."""
        if self.state is BreakerState.HALF_OPEN:
            self.record_success()
        else:
            self._failures = 0
