"""Where each caller's webhook deliveries stand (docs/design.md §12, "Webhooks"): durable, forward only.

A position is the seq of the last event a caller's webhook is done with
(delivered with a 2xx, dropped, or not the caller's to see) and the id of
the event log it counts in: a position in another log (a store started
afresh) is no position, and the webhook starts at the newest event again.
It is written after each 2xx, before the next event is sent, so a crash
resends at most the event that was in flight.

Two stores, as for the records: a table of its own in the SQLite file at
``store.path`` (its own connection, on a thread of its own), or one hash per
caller in Redis (``webhook:{caller}``) with ``redis.url``. Any failure is
``StoreUnavailable``: deliveries pause and try again.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from gateway.errors import RedisDown, StoreUnavailable
from gateway.replicas.link import RedisLink

T = TypeVar("T")


class Positions(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, caller: str, log_id: str) -> int | None:
        """The caller's position in the log ``log_id``, or None if it has none there."""
        ...

    async def put(self, caller: str, log_id: str, seq: int) -> None:
        """Move the caller's position to ``seq`` (never back, unless the log changed)."""
        ...

    async def forget(self, caller: str) -> None:
        """The caller has no webhook any more: a new one will start at the newest event."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_positions (
    caller TEXT PRIMARY KEY,
    log_id TEXT NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
"""
_PUT = """
INSERT INTO webhook_positions (caller, log_id, seq) VALUES (?, ?, ?)
ON CONFLICT (caller) DO UPDATE SET log_id = excluded.log_id, seq = excluded.seq
WHERE webhook_positions.log_id != excluded.log_id OR webhook_positions.seq < excluded.seq
"""


class SqlitePositions:
    """Positions in ``store.path``: one connection on one thread; each write committed before it returns."""

    def __init__(self, path: str, busy_timeout_s: float = 2.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook-positions")
            await self._run(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            # The file is in WAL mode (gateway.records.sqlite sets it). NORMAL: a commit survives this process's
            # crash (it is in the WAL, in the OS's cache) without an fsync per delivery; a power cut may take the
            # last positions back, which resends events (duplicates, never losses).
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(executor, db.close)
        executor.shutdown(wait=True)

    async def _run(self, operation: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreUnavailable("the webhook positions are not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, operation)
        except sqlite3.Error as exc:
            raise StoreUnavailable() from exc

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("closed")
        return self._db

    async def get(self, caller: str, log_id: str) -> int | None:
        def select() -> int | None:
            row = (
                self._connection()
                .execute("SELECT log_id, seq FROM webhook_positions WHERE caller = ?", (caller,))
                .fetchone()
            )
            return int(row[1]) if row is not None and row[0] == log_id else None

        return await self._run(select)

    async def put(self, caller: str, log_id: str, seq: int) -> None:
        await self._run(lambda: self._connection().execute(_PUT, (caller, log_id, seq)).close())

    async def forget(self, caller: str) -> None:
        await self._run(lambda: self._connection().execute("DELETE FROM webhook_positions WHERE caller = ?", (caller,)))


# KEYS[1] the caller's hash; ARGV log id, seq. Forward only within one log (a stale holder of the lease
# that finishes late cannot move a position back).
_REDIS_PUT = """
local held = redis.call('HMGET', KEYS[1], 'log', 'seq')
if held[1] == ARGV[1] and tonumber(held[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'log', ARGV[1], 'seq', ARGV[2])
return 1
"""


class RedisPositions:
    """Positions on the shared Redis, one hash per caller: every replica sees where each webhook stands."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _key(self, caller: str) -> str:
        return self._link.key("webhook", caller)

    async def get(self, caller: str, log_id: str) -> int | None:
        try:
            held = await self._link.call("webhook_position", lambda r: r.hmget(self._key(caller), ["log", "seq"]))
        except RedisDown as exc:
            raise StoreUnavailable() from exc
        log, seq = (v.decode() if isinstance(v, bytes) else v for v in held)
        return int(seq) if log == log_id and seq is not None else None

    async def put(self, caller: str, log_id: str, seq: int) -> None:
        try:
            await self._link.call("webhook_position", lambda r: r.eval(_REDIS_PUT, 1, self._key(caller), log_id, seq))
        except RedisDown as exc:
            raise StoreUnavailable() from exc

    async def forget(self, caller: str) -> None:
        try:
            await self._link.call("webhook_position", lambda r: r.delete(self._key(caller)))
        except RedisDown as exc:
            raise StoreUnavailable() from exc
