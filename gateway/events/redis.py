"""The event log on the shared Redis (docs/design.md §10, §12), for replicas and workers.

Keys, under ``redis.key_prefix``:

- ``events:log_id``: this log's id (set once; cursors name it; a Redis that lost it or ``events:seq``
  starts a new log under a new id, so that old cursors are refused rather than pointing at new events);
- ``events:seq``: the last seq given (``INCR``: never reused);
- ``events:log``: a sorted set, one member per event scored by its seq:
  ``seq \\n created_at \\n type \\n owner \\n subject \\n JSON`` (the owner
  ``=name``, or empty for none);
- ``events:followed``: a hash ``kind:subject`` → ``status \\t final \\t updated_at``;
- ``events:followed:batch`` and ``events:followed:dataset``: sorted sets of
  the subjects still followed, scored by when last seen;
- ``events:finals``: ``kind:subject`` seen final, scored by when, so that
  their records go after ``events.retention_s``.

A sighting is one Lua script (``_RECORD``): the check of the last status and
the append are atomic on Redis, so two replicas that see the same change
give one event. The event's JSON is completed there (its cursor needs the
seq) and never again. An append is announced on the link's channel
(``APPENDED``), which wakes the readers of every other process; this one
wakes its own at once.

While Redis is lost every call raises ``StoreUnavailable``: the feed answers
503 ``store_unavailable``, never a partial page, and sightings are lost
(counted) until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import redis.asyncio as aioredis

from gateway.config.features import EventsSettings
from gateway.errors import RedisDown, StoreUnavailable
from gateway.events.base import Event, EventLog, Kind, Sighting, Tail, event_type, rfc3339
from gateway.ops.tasks import cancel_and_wait
from gateway.replicas.link import RedisLink

T = TypeVar("T")
APPENDED = "appended"
SWEEP_S = 10.0

_B64URL = """
local ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
local function b64url(data)
    local out = {}
    for i = 1, #data, 3 do
        local a, b, c = string.byte(data, i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local chars = 4
        if not b then chars = 2 elseif not c then chars = 3 end
        for j = 1, chars do
            local index = math.floor(n / 2 ^ (6 * (4 - j))) % 64
            out[#out + 1] = string.sub(ALPHABET, index + 1, index + 1)
        end
    end
    return table.concat(out)
end
"""

# KEYS: log, finals, followed hash; ARGV: now, max_events, retention_s. Count first, then age, a bounded step.
_PRUNE = """
local function prune(log_key, finals_key, followed_key, now, max_events, retention_s)
    local newest = tonumber(redis.call('GET', KEYS[4]) or '0')
    redis.call('ZREMRANGEBYSCORE', log_key, '-inf', newest - max_events)
    local oldest = redis.call('ZRANGE', log_key, 0, 255)
    for _, member in ipairs(oldest) do
        local created = tonumber(string.match(member, '^[^\\n]*\\n([^\\n]*)\\n'))
        if created >= now - retention_s then break end
        redis.call('ZREM', log_key, member)
    end
    local gone = redis.call('ZRANGEBYSCORE', finals_key, '-inf', now - retention_s, 'LIMIT', 0, 256)
    for _, name in ipairs(gone) do
        redis.call('HDEL', followed_key, name)
        redis.call('ZREM', finals_key, name)
    end
end
"""

# KEYS: seq, log_id; a fresh id. A Redis that lost its seq or the log's id starts a new log, under a new
# id: the seq starts again at 1, so the old cursors must be refused (400), never point at new events.
_ENSURE_LOG = """
local function ensure_log(seq_key, id_key, fresh)
    local log_id = redis.call('GET', id_key)
    if log_id and redis.call('EXISTS', seq_key) == 1 then return log_id end
    redis.call('SET', id_key, fresh)
    redis.call('SET', seq_key, 0, 'NX')
    return fresh
end
"""

# KEYS: seq, log_id, log; ARGV: a fresh id. The log's id, newest seq and oldest kept seq (or '').
_BOUNDS = (
    _ENSURE_LOG
    + """
local log_id = ensure_log(KEYS[1], KEYS[2], ARGV[1])
local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
return {log_id, redis.call('GET', KEYS[1]), oldest[2] or ''}
"""
)

# KEYS: log, finals, followed hash, seq, log_id, followed set of the kind.
# ARGV: now, max_events, retention_s, kind:subject, subject, status, final (0/1), updated_at (or ''),
#       the member's head after seq and created_at (type \n owner \n subject), the JSON after its id,
#       and a fresh log id (used only by a Redis that lost its log: see _ENSURE_LOG).
_RECORD = (
    _B64URL
    + _PRUNE
    + _ENSURE_LOG
    + """
local now = tonumber(ARGV[1])
local name, subject, status, final, updated = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local previous = redis.call('HGET', KEYS[3], name)
if previous then
    local was, was_final, was_updated = string.match(previous, '^(.-)\\t(.-)\\t(.*)$')
    if was_final == '1' then return 0 end
    if updated ~= '' and was_updated ~= '' and tonumber(updated) < tonumber(was_updated) then return 0 end
    if updated == '' then updated = was_updated end
    previous = was
end
redis.call('HSET', KEYS[3], name, status .. '\\t' .. final .. '\\t' .. updated)
if final == '1' then
    redis.call('ZREM', KEYS[6], subject)
    redis.call('ZADD', KEYS[2], now, name)
else
    redis.call('ZADD', KEYS[6], now, subject)
end
if previous == status or (not previous and final == '1') then return 0 end
local log_id = ensure_log(KEYS[4], KEYS[5], ARGV[11])
local seq = redis.call('INCR', KEYS[4])
local cursor = b64url(log_id .. '.' .. seq)
local member = seq .. '\\n' .. ARGV[1] .. '\\n' .. ARGV[9] .. '\\n{"id":"' .. cursor .. '"' .. ARGV[10]
redis.call('ZADD', KEYS[1], seq, member)
prune(KEYS[1], KEYS[2], KEYS[3], now, tonumber(ARGV[2]), tonumber(ARGV[3]))
return {member, log_id}
"""
)

# KEYS: followed hash, finals, followed set of the kind; ARGV: now, kind:subject, subject. Marked final, as a
# finished subject is: kept until events.retention_s, and a late sighting of it makes no event.
_UNFOLLOW = """
local removed = redis.call('ZREM', KEYS[3], ARGV[3])
local previous = redis.call('HGET', KEYS[1], ARGV[2])
if previous then
    local was, _, was_updated = string.match(previous, '^(.-)\\t(.-)\\t(.*)$')
    redis.call('HSET', KEYS[1], ARGV[2], was .. '\\t1\\t' .. was_updated)
    redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
end
return removed
"""

_SWEEP = (
    _PRUNE
    + """
prune(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {redis.call('GET', KEYS[4]) or '0', oldest[2] or ''}
"""
)


def parse_member(member: bytes) -> Event:
    """An event from its member of ``events:log``."""
    seq, created_at, kind_type, owner, subject, payload = member.split(b"\n", 5)
    return Event(
        int(seq),
        kind_type.decode(),
        subject.decode(),
        owner[1:].decode() if owner.startswith(b"=") else None,
        float(created_at),
        payload,
    )


class RedisEventLog:
    """``EventLog`` on Redis through ``RedisLink.call`` (see the module's docstring)."""

    def __init__(
        self, link: RedisLink, settings: Callable[[], EventsSettings], clock: Callable[[], float] = time.time
    ) -> None:
        self.link = link
        self._settings = settings
        self._clock = clock
        self._log_id = ""
        self.tail = Tail()
        self.followed_count: dict[Kind, int] = {"batch": 0, "dataset": 0}
        self._reading = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        self._record = link.client.register_script(_RECORD)
        self._sweep_script = link.client.register_script(_SWEEP)
        self._bounds = link.client.register_script(_BOUNDS)
        self._unfollow = link.client.register_script(_UNFOLLOW)
        link.subscribe(self._heard)

    def _key(self, *parts: str) -> str:
        return self.link.key("events", *parts)

    @property
    def log_id(self) -> str:
        return self._log_id

    async def _call(self, operation: str, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        try:
            return await self.link.call(operation, command)
        except RedisDown as exc:
            raise StoreUnavailable() from exc

    async def _ensure_id(self) -> str:
        """The log's id, read (or set, by whichever process is first) once Redis answers."""
        if not self._log_id:
            await self.bounds()
        return self._log_id

    def _named(self, log_id: bytes | str) -> None:
        """The log's id as Redis has it now: a new one means Redis lost the log, and memory must not answer."""
        name = log_id.decode() if isinstance(log_id, bytes) else log_id
        if name != self._log_id:
            if self._log_id:
                self.tail.reset()
            self._log_id = name

    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._ensure_id()
            await self.bounds()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        await cancel_and_wait(self._sweeper)
        self._sweeper = None

    def _heard(self, kind: str, _subject: str, payload: bytes) -> None:
        if kind == APPENDED:
            with contextlib.suppress(ValueError):
                self.tail.heard(int(payload))

    # --- sightings --------------------------------------------------------------------------------------------

    def _keys(self, kind: Kind) -> list[str]:
        return [
            self._key("log"),
            self._key("finals"),
            self._key("followed"),
            self._key("seq"),
            self._key("log_id"),
            self._key("followed", kind),
        ]

    async def record(self, sighting: Sighting) -> Event | None:
        await self._ensure_id()
        s, now, settings = sighting, self._clock(), self._settings()
        kind_type = event_type(s.kind, s.status)
        owner = "" if s.owner is None else "=" + s.owner
        rest = {"type": kind_type, "created_at": rfc3339(now), "owner": s.owner}
        after_id = b"," + json.dumps(rest, separators=(",", ":")).encode()[1:-1]
        after_id += b',"data":{"' + s.kind.encode() + b'":' + s.data + b"}}"
        args: list[bytes | str | int] = [
            repr(now),
            settings.max_events,
            repr(float(settings.retention_s)),
            f"{s.kind}:{s.subject}",
            s.subject,
            s.status,
            int(s.final),
            "" if s.updated_at is None else repr(s.updated_at),
            f"{kind_type}\n{owner}\n{s.subject}",
            after_id,
            secrets.token_hex(6),
        ]
        made = await self._call("events_record", lambda r: self._record(keys=self._keys(s.kind), args=args, client=r))
        if not isinstance(made, list):
            return None
        member, log_id = made
        self._named(log_id)
        event = parse_member(member)
        self.tail.add([event])
        await self.link.publish(APPENDED, "-", str(event.seq).encode())
        return event

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            with contextlib.suppress(StoreUnavailable):
                await self.prune()

    async def prune(self) -> None:
        """Apply retention now (it also runs at each append and every ``SWEEP_S``), and count what is followed."""
        settings = self._settings()
        args: list[bytes | str | int] = [repr(self._clock()), settings.max_events, repr(float(settings.retention_s))]
        keys = self._keys("batch")[:4]
        found: list[Any] = await self._call(
            "events_prune", lambda r: self._sweep_script(keys=keys, args=args, client=r)
        )
        newest, oldest = found
        self.tail.heard(int(newest))
        if oldest:
            self.tail.drop_before(int(float(oldest)))
        batches, datasets = self._key("followed", "batch"), self._key("followed", "dataset")

        async def count(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                pipe.zcard(batches)
                pipe.zcard(datasets)
                counted: list[Any] = await pipe.execute()
                return counted

        counted = await self._call("events_count", count)
        self.followed_count = {"batch": int(counted[0]), "dataset": int(counted[1])}

    # --- reading ----------------------------------------------------------------------------------------------

    async def followed(self, kind: Kind, limit: int) -> list[str]:
        key = self._key("followed", kind)
        found = cast(list[bytes], await self._call("events_followed", lambda r: r.zrange(key, 0, limit - 1)))
        return [item.decode() for item in found]

    async def checked(self, kind: Kind, subjects: list[str]) -> None:
        if not subjects:
            return
        key, now = self._key("followed", kind), self._clock()
        # XX: only what is still followed (a subject finished meanwhile stays out).
        await self._call("events_checked", lambda r: r.zadd(key, dict.fromkeys(subjects, now), xx=True))

    async def unfollow(self, kind: Kind, subject: str) -> None:
        keys = [self._key("followed"), self._key("finals"), self._key("followed", kind)]
        args = [repr(self._clock()), f"{kind}:{subject}", subject]
        await self._call("events_unfollow", lambda r: self._unfollow(keys=keys, args=args, client=r))

    async def bounds(self) -> tuple[int, int]:
        keys = [self._key("seq"), self._key("log_id"), self._key("log")]
        fresh = secrets.token_hex(6)
        found: list[Any] = await self._call("events_bounds", lambda r: self._bounds(keys=keys, args=[fresh], client=r))
        log_id, newest_raw, oldest_raw = found
        self._named(log_id)
        newest = int(newest_raw or 0)
        if newest < self.tail.newest:
            self.tail.reset()  # Redis lost what it held: memory must not answer for it
        self.tail.heard(newest)
        oldest = int(float(oldest_raw)) if oldest_raw else newest + 1
        self.tail.drop_before(oldest)
        return oldest, newest

    async def read_after(self, seq: int, limit: int) -> list[Event]:
        kept = self.tail.after(seq, limit)
        if kept is not None:
            return kept
        # One read from Redis at a time: a thousand streams woken by one event make one read, not a thousand.
        async with self._reading:
            kept = self.tail.after(seq, limit)
            if kept is not None:
                return kept
            key = self._key("log")
            members = cast(
                list[bytes],
                await self._call("events_read", lambda r: r.zrangebyscore(key, f"({seq}", "+inf", start=0, num=limit)),
            )
            events = [parse_member(member) for member in members]
            if events and events[-1].seq >= self.tail.newest:
                self.tail.add(events)
            return events

    async def wait_beyond(self, seq: int, timeout_s: float) -> bool:
        return await self.tail.wait_beyond(seq, timeout_s)


if TYPE_CHECKING:
    _conforms: EventLog = RedisEventLog(RedisLink.__new__(RedisLink), EventsSettings)
