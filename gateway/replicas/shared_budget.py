"""One upstream budget and one 429 pause for every process, and each caller's own
``rate_limit``, on Redis (docs/design.md §10).

A Lua script refills and takes on Redis's clock (``TIME``), so that the
processes' own clocks never matter; it also refuses while the shared
pause runs. ``SharedCallerLimits`` runs the same script on each caller's keys,
for ``callers[].rate_limit`` (docs/design.md §7).

Every method may raise ``RedisDown``; the budget (``gateway.upstream.budget``)
then falls back to ``rate / processes alive``, and a caller's limit to its
share in a bucket of this process's (``gateway.api.state``).
"""

from __future__ import annotations

from gateway.replicas.link import PAUSED, RedisLink
from gateway.upstream.guards import Clock

# One token bucket on Redis's clock. KEYS: bucket, pause, writes waiting (a sorted set by expiry).
# ARGV: rate, burst, reserve, take (1/0), write (1/0), the write's token.
# Returns {kind, seconds, tokens}: kind 0 a token is taken (or would be), 1 wait for budget, 2 paused.
# Writes come first (docs/design.md §8) in every process: a write that must wait is noted until a little
# past its wait, and meanwhile no read takes a token. Numbers travel as strings: Redis turns a
# Lua number reply into an integer.
_TAKE = """
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return {2, tostring(paused / 1000), '0'} end
local rate, burst, reserve = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local write = ARGV[5] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or burst
local at = tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now * 1000)
local kind, wait = 0, 0
if not write and redis.call('ZCARD', KEYS[3]) > 0 then
  kind, wait = 1, 1 / rate
elseif tokens >= reserve + 1 then
  if ARGV[4] == '1' then tokens = tokens - 1 end
  if write then redis.call('ZREM', KEYS[3], ARGV[6]) end
else
  kind, wait = 1, (reserve + 1 - tokens) / rate
  if write then
    redis.call('ZADD', KEYS[3], (now + wait + 1) * 1000, ARGV[6])
    redis.call('PEXPIRE', KEYS[3], math.ceil((wait + 1) * 1000))
  end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 60000)
return {kind, tostring(wait), tostring(tokens)}
"""
# The shared pause only ever grows: a shorter Retry-After does not cut a longer one short.
_PAUSE = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return redis.call('PTTL', KEYS[1])
"""


class SharedBudget:
    """One upstream budget and one pause for every process (see the module's docstring)."""

    def __init__(self, link: RedisLink, clock: Clock) -> None:
        self.link = link
        self._clock = clock
        self._take = link.client.register_script(_TAKE)
        self._pause = link.client.register_script(_PAUSE)
        # The bucket as last seen, for the gauge and for estimates that must not wait on Redis.
        self.tokens = 0.0
        self._seen_at = float("-inf")

    async def take(self, rate: float, burst: int, reserve: int, writer: str = "") -> tuple[int, float]:
        """(0, 0) with a token taken; (1, seconds) until one is due; (2, seconds) left of the pause.

        ``writer`` names a write (a create or cancel): it comes first, in every process.
        """
        keys = [self.link.key("budget"), self.link.key("pause"), self.link.key("writes")]
        args: list[str | int] = [repr(rate), burst, reserve, 1, 1 if writer else 0, writer]
        kind, wait, tokens = await self.link.call("budget", lambda r: self._take(keys=keys, args=args, client=r))
        self.tokens, self._seen_at = float(tokens), self._clock()
        return int(kind), float(wait)

    def estimated_wait(self, rate: float, burst: int, reserve: int) -> float:
        """Seconds until the shared bucket may have a token past ``reserve``, from what was last seen."""
        tokens = min(float(burst), self.tokens + max(0.0, self._clock() - self._seen_at) * rate)
        return 0.0 if tokens >= reserve + 1 else (reserve + 1 - tokens) / rate

    async def pause(self, seconds: float) -> None:
        """Pause every process's upstream calls for ``seconds`` (never shortening a longer pause)."""
        ms = max(1, int(seconds * 1000))
        left_ms = await self.link.call(
            "pause", lambda r: self._pause(keys=[self.link.key("pause")], args=[ms], client=r)
        )
        await self.link.publish(PAUSED, "-", str(int(left_ms) / 1000).encode())


class SharedCallerLimits:
    """Each caller's own ``rate_limit`` as one bucket for every process (docs/design.md §7, §10).

    The budget's script (``_TAKE``) on keys of the caller's own: its pause and
    writes keys are never set, so neither ever holds a caller up, and the
    refill runs on Redis's clock as the budget's does.
    """

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self._take = link.client.register_script(_TAKE)

    async def take(self, caller: str, rate: float, burst: int) -> float:
        """0 with a token of ``caller``'s taken, else the seconds until one is due."""
        keys = [
            self.link.key("caller", caller),
            self.link.key("caller-pause", caller),
            self.link.key("caller-writes", caller),
        ]
        args: list[str | int] = [repr(rate), burst, 0, 1, 0, ""]
        _kind, wait, _tokens = await self.link.call(
            "caller_limit", lambda r: self._take(keys=keys, args=args, client=r)
        )
        return float(wait)
