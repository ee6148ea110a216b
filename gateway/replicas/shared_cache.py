"""The cache entries and single-flight that replicas and workers share through Redis (docs/design.md §10).

``SharedCache`` sits behind each process's in-memory cache. A miss in
memory looks in Redis; if Redis has no answer that will do, one process
takes the id's lock (``SET NX PX`` with an owner token and a TTL past
``upstream.timeout_s``) and calls the upstream, and the others wait for
its result (an event on the pub/sub channel, or the lock's expiry, after
which one of them takes over). The leader stores the answer in Redis and
says so; a failure is said too, so that the followers answer the same
error rather than each calling the upstream again.

The budget, the 429 pause and each caller's own ``rate_limit`` are shared
in ``gateway.replicas.shared_budget``.

Every method may raise ``RedisDown``; the cache (``gateway.cache.batch_cache``)
then falls back to its local policy: memory only, single-flight per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import errors
from gateway.cache.entry import CacheEntry, Role
from gateway.errors import RedisDown
from gateway.replicas.link import EVICTED, FAILED, RELEASED, STORED, RedisLink
from gateway.upstream.guards import Clock

# Past upstream.timeout_s, the lock's TTL leaves this for storing the answer (docs/design.md §10).
LOCK_MARGIN_S = 0.5
# A follower looks again at least this often, whatever it hears: a lost event costs this much at most.
FOLLOW_POLL_S = 1.0

# Take the lock, or say how long it is held; with the lock, also what Redis holds for the id (one round trip).
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('GET', KEYS[2]) or false}
end
return {0, redis.call('PTTL', KEYS[1])}
"""
# Release only our own lock: one that expired and was taken by another process is theirs.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Store an answer for every process, unless it is older than the one held (docs/design.md §9: answers only
# move forward), or the flight that got it no longer holds the id's lock (a cancel evicted the id,
# and the lock with it, while the answer was on its way). KEYS: entry, lock. ARGV: value, px, the
# flight's token ('' for none: a create's answer), status, updated_at ('' for none), terminal (1/0).
_SAVE = """
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
local held = redis.call('GET', KEYS[1])
if held and ARGV[4] == '200' then
  local nl = string.find(held, '\\n', 1, true)
  local ok, head = false, nil
  if nl then ok, head = pcall(cjson.decode, string.sub(held, 1, nl - 1)) end
  if ok and type(head) == 'table' and head[1] == 200 then
    if head[7] == true and ARGV[6] == '0' then return 0 end
    if ARGV[5] ~= '' and type(head[6]) == 'number' and tonumber(ARGV[5]) < head[6] then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


def encode_entry(entry: CacheEntry, clock: Clock, wall: Clock) -> bytes:
    """An entry for Redis: its times as wall-clock, since each process's own clock means nothing to another."""
    now = clock()
    head = [
        entry.status,
        wall() - (now - entry.fetched_at),
        entry.fresh_until - entry.fetched_at,
        entry.keep_until - entry.fetched_at,
        entry.etag,
        entry.updated_at,
        entry.terminal,
    ]
    return orjson.dumps(head) + b"\n" + entry.body


def decode_entry(value: bytes, clock: Clock, wall: Clock) -> CacheEntry | None:
    """The entry as this process's clock sees it; None for a value it cannot read (another version's)."""
    head, _, body = value.partition(b"\n")
    try:
        status, fetched_wall, fresh_s, keep_s, etag, updated_at, terminal = orjson.loads(head)
        fetched_at = clock() - max(0.0, wall() - float(fetched_wall))
        return CacheEntry(
            int(status),
            body,
            fetched_at,
            fetched_at + float(fresh_s),
            fetched_at + float(keep_s),
            str(etag),
            None if updated_at is None else float(updated_at),
            bool(terminal),
        )
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None


def encode_error(error: errors.GatewayError) -> bytes:
    return orjson.dumps(
        {
            "error": type(error).__name__,
            "message": error.message,
            "retry_after_s": error.retry_after_s,
            "upstream_status": error.upstream_status,
        }
    )


def decode_error(payload: bytes) -> errors.GatewayError:
    """The leader's error, as this process raises it; an unknown one is an upstream error."""
    try:
        fields = orjson.loads(payload)
        kind = getattr(errors, str(fields["error"]), None)
        if isinstance(kind, type) and issubclass(kind, errors.GatewayError):
            return kind(
                str(fields["message"]),
                retry_after_s=fields.get("retry_after_s"),
                upstream_status=fields.get("upstream_status"),
            )
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return errors.UpstreamError("Another gateway process's upstream call failed.")


@dataclass(frozen=True, slots=True)
class _Heard:
    """What a follower heard: the leader stored an answer (or the id was evicted), or failed; or Redis was lost."""

    error: errors.GatewayError | None = None
    redis_lost: bool = False


class SharedCache:
    """Cache entries and single-flight shared through Redis (see the module's docstring)."""

    def __init__(self, link: RedisLink, clock: Clock, lock_ttl_s: Callable[[], float], wall: Clock = time.time) -> None:
        self.link = link
        self._clock = clock
        self._wall = wall
        self._lock_ttl_s = lock_ttl_s
        self._following: dict[str, set[asyncio.Future[_Heard]]] = {}
        self._acquire = link.client.register_script(_ACQUIRE)
        self._release = link.client.register_script(_RELEASE)
        self._save = link.client.register_script(_SAVE)
        link.on_lost.append(self._wake_all)

    @property
    def usable(self) -> bool:
        """Calls may go to Redis now (``RedisLink.usable``)."""
        return self.link.usable

    def _entry_key(self, batch_id: str) -> str:
        return self.link.key("entry", batch_id)

    def _lock_key(self, batch_id: str) -> str:
        return self.link.key("lock", batch_id)

    # --- entries ----------------------------------------------------------------

    async def load(self, batch_id: str) -> CacheEntry | None:
        value = await self.link.call("cache_get", lambda r: r.get(self._entry_key(batch_id)))
        return decode_entry(value, self._clock, self._wall) if isinstance(value, bytes) else None

    async def save(self, batch_id: str, entry: CacheEntry, token: str = "") -> bool:
        """Store ``entry`` for every process and tell them; kept as long as it may serve (stale included).

        ``token`` is the lock of the flight that got it; False if it was not
        stored (older than Redis's, or the id was evicted meanwhile).
        """
        keep_ms = int((entry.keep_until - self._clock()) * 1000)
        if keep_ms <= 0:
            return False
        keys = [self._entry_key(batch_id), self._lock_key(batch_id)]
        args: list[str | int | bytes] = [
            encode_entry(entry, self._clock, self._wall),
            keep_ms,
            token,
            entry.status,
            "" if entry.updated_at is None else repr(entry.updated_at),
            1 if entry.terminal else 0,
        ]
        stored = await self.link.call("cache_set", lambda r: self._save(keys=keys, args=args, client=r))
        if stored:
            await self.link.publish(STORED, batch_id, entry.etag.encode())
        return bool(stored)

    async def drop(self, batch_id: str) -> None:
        """Evict the id everywhere (a cancel): from Redis, and from every process's memory.

        The id's lock goes too: a flight out for it stores nothing (``_SAVE``).
        """
        keys = [self._entry_key(batch_id), self._lock_key(batch_id)]
        await self.link.call("cache_del", lambda r: r.delete(*keys))
        await self.link.publish(EVICTED, batch_id)

    # --- single-flight across processes -------------------------------------------

    async def settle(
        self,
        batch_id: str,
        will_do: Callable[[CacheEntry], bool],
        produce: Callable[[], Awaitable[tuple[CacheEntry, bool]]],
    ) -> tuple[CacheEntry, Role]:
        """An answer for ``batch_id``: one Redis holds that ``will_do``, else one process's upstream call.

        ``produce`` makes this process's call and says whether its answer may
        be shared (not when the id was evicted meanwhile). RedisDown before
        ``produce`` runs leaves the caller to produce locally; after, it only
        costs the sharing.
        """
        held = await self.load(batch_id)
        if held is not None and will_do(held):
            return held, Role.ADOPTED
        role = Role.LED
        while True:
            heard = self._listen_for(batch_id)
            try:
                token = secrets.token_hex(8)
                try:
                    acquired, detail = await self._lock(batch_id, token)
                except RedisDown:
                    # Redis may have run the script and only its answer was lost: the lock
                    # may be ours, and nobody else would free it before its TTL.
                    self.link.in_background(self._release_orphan(batch_id, token))
                    raise
                if acquired:
                    return await self._lead(batch_id, token, detail, will_do, produce, role)
                role = Role.FOLLOWED
                outcome = await self._follow(heard, max(0.05, int(detail) / 1000))
            finally:
                self._stop_listening(batch_id, heard)
            if outcome is not None and outcome.error is not None:
                raise outcome.error
            held = await self.load(batch_id)
            if held is not None and will_do(held):
                return held, role

    async def _lock(self, batch_id: str, token: str) -> tuple[int, Any]:
        """Take the id's lock: (1, the entry Redis holds or None), or (0, milliseconds it stays held)."""
        keys = [self._lock_key(batch_id), self._entry_key(batch_id)]
        args: list[str | int] = [token, int(self._lock_ttl_s() * 1000)]
        acquired, detail = await self.link.call("lock", lambda r: self._acquire(keys=keys, args=args, client=r))
        return int(acquired), detail

    async def _lead(
        self,
        batch_id: str,
        token: str,
        found: bytes | None,
        will_do: Callable[[CacheEntry], bool],
        produce: Callable[[], Awaitable[tuple[CacheEntry, bool]]],
        role: Role,
    ) -> tuple[CacheEntry, Role]:
        told = False  # whether the followers heard the outcome (stored, or failed)
        try:
            # An answer stored between our look and the lock (the previous leader's) will do.
            held = None if not found else decode_entry(found, self._clock, self._wall)
            if held is not None and will_do(held):
                return held, Role.FOLLOWED if role is Role.FOLLOWED else Role.ADOPTED
            try:
                entry, shareable = await produce()
            except errors.GatewayError as error:
                told = True
                self.link.in_background(self.link.publish(FAILED, batch_id, encode_error(error)))
                raise
            if shareable:
                with contextlib.suppress(RedisDown):
                    told = await self.save(batch_id, entry, token)
            return entry, Role.LED
        finally:
            # Also when cancelled: a lock left behind would hold the others up until its TTL.
            self.link.in_background(self._unlock(batch_id, token, announce=not told))

    async def _unlock(self, batch_id: str, token: str, announce: bool = False) -> None:
        """Free our lock; with ``announce``, tell the followers to look again (nothing was stored)."""
        released = await self.link.call(
            "unlock", lambda r: self._release(keys=[self._lock_key(batch_id)], args=[token], client=r)
        )
        if released and announce:
            await self.link.publish(RELEASED, batch_id)

    async def _release_orphan(self, batch_id: str, token: str) -> None:
        """Free a lock whose taking went unanswered, as soon as Redis answers; it expires by itself anyway."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._lock_ttl_s()
        while loop.time() < give_up:
            try:
                await self._unlock(batch_id, token, announce=True)
                return
            except RedisDown:
                await asyncio.sleep(self.link.settings.probe_interval_s)

    def _listen_for(self, batch_id: str) -> asyncio.Future[_Heard]:
        heard: asyncio.Future[_Heard] = asyncio.get_running_loop().create_future()
        self._following.setdefault(batch_id, set()).add(heard)
        return heard

    def _stop_listening(self, batch_id: str, heard: asyncio.Future[_Heard]) -> None:
        group = self._following.get(batch_id)
        if group is not None:
            group.discard(heard)
            if not group:
                del self._following[batch_id]

    async def _follow(self, heard: asyncio.Future[_Heard], lock_left_s: float) -> _Heard | None:
        """Wait for the leader's word, or for its lock to expire (a leader that died); None if neither came."""
        try:
            async with asyncio.timeout(min(lock_left_s, FOLLOW_POLL_S)):
                outcome = await heard
        except TimeoutError:
            return None
        if outcome.redis_lost:
            raise RedisDown("follow")
        return outcome

    def heard(self, kind: str, batch_id: str, payload: bytes) -> None:
        """An event from another process about ``batch_id``: wake the followers of its flight."""
        outcome = _Heard(decode_error(payload)) if kind == FAILED else _Heard()
        for waiter in self._following.get(batch_id, ()):
            if not waiter.done():
                waiter.set_result(outcome)

    def _wake_all(self) -> None:
        # Redis lost: the followers produce locally rather than wait for word that cannot come.
        for group in self._following.values():
            for waiter in group:
                if not waiter.done():
                    waiter.set_result(_Heard(redis_lost=True))
