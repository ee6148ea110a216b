"""One holder at a time among replicas (docs/design.md §12): the follower, and each caller's webhook deliveries.

A lease is a Redis key holding its holder's random token, with a TTL. The
holder renews it well before it lapses; if the holder dies, the key expires
and the next process to ask takes it. Without Redis (one process), the lease
is always held. While Redis is lost nobody holds it: the work it guards
pauses and resumes by itself when Redis comes back.
"""

from __future__ import annotations

import secrets

from gateway.errors import RedisDown
from gateway.replicas.link import RedisLink

# Take the lease if it is free, or renew it if it is ours; 1 if held after the call.
_HOLD = """
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """``hold()`` before each round of the guarded work; renew it at least every ``ttl_s / 3``."""

    def __init__(self, link: RedisLink | None, name: str, ttl_s: float) -> None:
        self._link = link
        self._key = link.key("lease", name) if link is not None else name
        self._token = secrets.token_hex(16)
        self.ttl_s = ttl_s  # may change (a reload): the next hold() renews with the new one

    async def hold(self) -> bool:
        """True if this process holds the lease now (taken or renewed); False if another does or Redis is lost."""
        link = self._link
        if link is None:
            return True
        if not link.usable:
            return False
        try:
            held = await link.call(
                "lease", lambda r: r.eval(_HOLD, 1, self._key, self._token, max(1, int(self.ttl_s * 1000)))
            )
        except RedisDown:
            return False
        return bool(held)

    async def release(self) -> None:
        """Give the lease up at once (a clean shutdown), so another process need not wait for it to lapse."""
        link = self._link
        if link is None or not link.usable:
            return
        try:
            await link.call("lease", lambda r: r.eval(_RELEASE, 1, self._key, self._token))
        except RedisDown:
            return
