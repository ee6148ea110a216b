"""Clock-driven guards on upstream traffic: a token bucket and a circuit breaker.

Both are plain objects with an injectable clock and no I/O, so their rules
are tested as pure logic; ``gateway.upstream.client`` (the breaker) and
``gateway.upstream.budget`` (the bucket) use them, and ``gateway.api.state``
(a bucket per caller, for its own ``rate_limit``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

Clock = Callable[[], float]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second.

    Over any window of ``t`` seconds at most ``burst + rate * t`` tokens are
    taken: the bound that keeps the gateway inside the upstream's limit.
    """

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
        # max(): a clock that steps back must not take tokens away.
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._updated) * self.rate)
        self._updated = max(now, self._updated)

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def wait_s(self, reserve: int = 0) -> float:
        """0 if a token is there now beyond ``reserve`` kept ones, else the seconds until one is; nothing is taken."""
        self._refill()
        needed = reserve + 1
        return 0.0 if self._tokens >= needed else (needed - self._tokens) / self.rate

    def try_take(self) -> float:
        """Take a token and return 0, or return the seconds until one is due."""
        wait = self.wait_s()
        if not wait:
            self._tokens -= 1
        return wait


class BreakerState(Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class Admission:
    """The breaker's answer to one call: go (``wait_s == 0``) or retry later.

    ``probe`` marks the single call let through after a cooldown; only its
    holder may give the probe slot back with ``abandon``.
    """

    wait_s: float
    probe: bool = False

    @property
    def admitted(self) -> bool:
        return self.wait_s == 0


# While the probe is out, callers are asked to come back after this long.
PROBE_RETRY_AFTER_S = 1.0


class CircuitBreaker:
    """Fail fast after ``threshold`` consecutive failures, for ``cooldown_s``.

    After the cooldown a single probe is let through: its success closes the
    breaker, its failure opens it for another cooldown. While the probe is
    out, everyone else still fails fast. A probe that never reaches the
    upstream (no budget, cancelled) is handed back with ``abandon`` so that
    the next call probes instead.
    """

    def __init__(self, threshold: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._state = BreakerState.CLOSED

    def reconfigure(self, threshold: int, cooldown_s: float) -> None:
        self.threshold, self.cooldown_s = threshold, cooldown_s

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker whose cooldown has passed is half-open."""
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._probing = False
        return self._state

    def admit(self) -> Admission:
        """Whether a call may go out now; if not, the seconds until it is worth asking again."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Admission(0.0)
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return Admission(0.0, probe=True)
        if state is BreakerState.OPEN:
            return Admission(self._opened_at + self.cooldown_s - self._clock())
        return Admission(PROBE_RETRY_AFTER_S)

    def abandon(self, admission: Admission) -> None:
        """The admitted call never got an answer from the upstream: free its probe slot."""
        if admission.probe and self._state is BreakerState.HALF_OPEN:
            self._probing = False

    def record_success(self) -> None:
        """The upstream answered sanely: it is healthy."""
        self._failures = 0
        self._probing = False
        self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        """The upstream failed (5xx, unreachable, timeout, nonsense)."""
        self._failures += 1
        state = self.state
        if state is BreakerState.OPEN:
            return  # a call sent before the breaker opened: the cooldown stands
        if state is BreakerState.HALF_OPEN or self._failures >= self.threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probing = False
