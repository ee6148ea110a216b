"""Ownership and idempotency records on the shared Redis (docs/design.md §8 "Store", §10).

``RedisRecords`` is the ``Records`` of ``gateway.records.base`` for replicas and
workers: the same states and answers as ``SqliteRecords``, kept where every
process sees them. Keys, under ``redis.key_prefix``:

- ``owner:{batch_id}``: a string, the creator's name. Set once (``SET NX``)
  and never expired: ownership is forever, as in SQLite.
- ``idempotency:{len(caller)}:{caller}:{key}``: a hash (fingerprint, state,
  first attempt, lease, was_ambiguous, status, body) that Redis expires
  ``idempotency_ttl_s`` after the first attempt. The caller's name is
  length-prefixed, so no (caller, key) pair can spell another's key name,
  whatever characters either holds.

Nothing here survives what Redis itself forgets: records need a Redis that
never evicts these keys (``maxmemory-policy noeviction``) and, for owners
to outlive a restart of Redis, one that persists (AOF).

Each change of a key's state is one Lua script, atomic on Redis, and times
come from Redis's clock (``TIME``), never a process's: replicas whose
clocks disagree still agree on leases and expiry.

Failure policy (§10): fail closed. When Redis is lost, or a call fails or
times out, every method raises ``StoreUnavailable`` (503
``store_unavailable``) within one ``redis.timeout_s``; ``known_owner`` and
the owners already cached still answer, as ownership never changes. Writes
are not retried: the first failure marks Redis lost (``RedisLink.call``),
after which a retry would fail at once until the probe regains it, which
takes ``redis.probe_interval_s``, longer than a write may wait.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis

from gateway.errors import RedisDown, StoreUnavailable
from gateway.records.base import Claim, Claimed, InUse, KnownOwners, Records, Replay, Reused
from gateway.replicas.link import RedisLink

__all__ = ["RedisRecords"]

T = TypeVar("T")

# Redis's clock in whole milliseconds: the unit of PEXPIREAT.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] the record; ARGV fingerprint, lease_ms, ttl_ms. The same decision as SqliteRecords._claim.
_CLAIM = (
    _NOW_MS
    + """
local record = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'first', 'lease', 'status', 'body')
local lease_until = now + tonumber(ARGV[2])
if not record[1] then
    redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'state', 'running', 'first', now,
               'lease', lease_until, 'was_ambiguous', 0)
    redis.call('PEXPIREAT', KEYS[1], now + tonumber(ARGV[3]))
    return {'claimed'}
end
if record[1] ~= ARGV[1] then
    return {'reused'}
end
if record[2] == 'settled' then
    return {'replay', record[5], record[6]}
end
if record[2] == 'running' and tonumber(record[4]) > now then
    return {'in_use', tonumber(record[4]) - now}
end
-- Ambiguous, or running past its lease: the holder died or hung after
-- possibly sending, so the batch may exist. Take it over and say since when.
redis.call('HSET', KEYS[1], 'state', 'running', 'was_ambiguous', 1, 'lease', lease_until)
return {'claimed', record[3]}
"""
)

# Whatever the state: a definite outcome is the best thing to replay. HSET
# keeps the key's expiry; a record already expired is not brought back.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HSET', KEYS[1], 'state', 'settled', 'status', ARGV[1], 'body', ARGV[2])
end
return 0
"""

# Only a running record: a settled outcome is never downgraded.
_MARK_AMBIGUOUS = """
if redis.call('HGET', KEYS[1], 'state') == 'running' then
    redis.call('HSET', KEYS[1], 'state', 'ambiguous', 'was_ambiguous', 1)
end
return 0
"""

# A key whose earlier attempt was ambiguous stays ambiguous: this attempt
# created nothing, but that one still may have.
_RELEASE = """
local record = redis.call('HMGET', KEYS[1], 'state', 'was_ambiguous')
if record[1] == 'running' then
    if record[2] == '1' then
        redis.call('HSET', KEYS[1], 'state', 'ambiguous')
    else
        redis.call('DEL', KEYS[1])
    end
end
return 0
"""


class RedisRecords:
    """``Records`` on the Redis of a ``RedisLink`` (see the module's docstring)."""

    def __init__(
        self, link: RedisLink, idempotency_ttl_s: float, lease_s: float, *, owner_cache_size: int = 100_000
    ) -> None:
        self.link = link
        self.idempotency_ttl_s = idempotency_ttl_s
        self.lease_s = lease_s
        self._owners = KnownOwners(owner_cache_size)
        self._open = False
        client = link.client
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)
        self._mark_ambiguous = client.register_script(_MARK_AMBIGUOUS)
        self._release = client.register_script(_RELEASE)

    # --- life -----------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to open: the link connects (and reconnects) by itself, so a Redis down now is no error."""
        self._open = True

    async def close(self) -> None:
        """Refuse further calls; the link is shared, and closed by the app."""
        self._open = False

    async def _call(self, operation: str, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """One bounded call through the link; any failure of Redis is StoreUnavailable, never a guess."""
        if not self._open:
            raise StoreUnavailable("the record store is not open")
        try:
            return await self.link.call(operation, command)
        except RedisDown as exc:
            # Logged once per outage by the link, and counted per operation in its metrics.
            raise StoreUnavailable() from exc

    def _record_key(self, caller: str, key: str) -> str:
        return self.link.key("idempotency", f"{len(caller)}:{caller}", key)

    # --- owners -----------------------------------------------------------------

    def known_owner(self, batch_id: str) -> str | None:
        return self._owners.get(batch_id)

    async def owner_of(self, batch_id: str) -> str | None:
        async def read() -> str | None:
            stored = await self._call("owner_of", lambda r: r.get(self.link.key("owner", batch_id)))
            return None if stored is None else _text(stored)

        return await self._owners.look_up(batch_id, read)

    async def record_owner(self, batch_id: str, caller: str) -> None:
        name = self.link.key("owner", batch_id)

        async def set_then_get(r: aioredis.Redis) -> list[Any]:
            # One round trip, atomic: the first writer stays, and the cache
            # learns what is stored, whatever was asked (INSERT OR IGNORE, then SELECT).
            async with r.pipeline(transaction=True) as pipe:
                pipe.set(name, caller, nx=True)
                pipe.get(name)
                return await pipe.execute()

        _, stored = await self._call("record_owner", set_then_get)
        self._owners.remember(batch_id, _text(stored))

    # --- idempotency keys -------------------------------------------------------

    async def claim_key(self, caller: str, key: str, fingerprint: str) -> Claim:
        keys = [self._record_key(caller, key)]
        args: list[str | int] = [fingerprint, _ms(self.lease_s), _ms(self.idempotency_ttl_s)]
        answer = await self._call("claim_key", lambda r: self._claim(keys=keys, args=args, client=r))
        kind = _text(answer[0])
        if kind == "claimed":
            return Claimed(ambiguous_since=int(answer[1]) / 1000 if len(answer) > 1 else None)
        if kind == "replay":
            return Replay(status=int(answer[1]), body=bytes(answer[2]))
        if kind == "in_use":
            return InUse(retry_after_s=max(1.0, int(answer[1]) / 1000))
        return Reused()

    async def settle_key(self, caller: str, key: str, status: int, body: bytes) -> None:
        keys = [self._record_key(caller, key)]
        args: list[int | bytes] = [status, body]
        await self._call("settle_key", lambda r: self._settle(keys=keys, args=args, client=r))

    async def mark_ambiguous(self, caller: str, key: str) -> None:
        # If this fails, the lease runs out and the next claim treats the record as ambiguous anyway.
        keys = [self._record_key(caller, key)]
        await self._call("mark_ambiguous", lambda r: self._mark_ambiguous(keys=keys, client=r))

    async def release_key(self, caller: str, key: str) -> None:
        keys = [self._record_key(caller, key)]
        await self._call("release_key", lambda r: self._release(keys=keys, client=r))


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


if TYPE_CHECKING:
    # mypy checks here that RedisRecords has every method of Records, with the same signatures.
    def _conforms(records: RedisRecords) -> Records:
        return records
