"""Usage totals in the SQLite file at ``store.path`` (docs/design.md §12, "Usage"), on a connection of their own.

Two tables: ``usage_batches`` (one row per batch counted: what makes a
count happen once) and ``usage_days`` (the totals per day, caller and
model). A tally is one ``BEGIN IMMEDIATE`` transaction: the batch's row is
inserted unless present, and only then the day's totals grow. Writes are
rare (one per finished batch), so one worker thread is plenty. The file's
journal mode is left as the record store sets it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gateway.errors import StoreUnavailable
from gateway.events.usage import COUNTS, Tally, sum_rows

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_batches (
    batch_id TEXT PRIMARY KEY,
    day TEXT NOT NULL,
    caller TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_days (
    day TEXT NOT NULL,
    caller TEXT NOT NULL,
    model TEXT NOT NULL,
    batches_completed INTEGER NOT NULL DEFAULT 0,
    batches_failed INTEGER NOT NULL DEFAULT 0,
    batches_canceled INTEGER NOT NULL DEFAULT 0,
    records INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, caller, model)
) WITHOUT ROWID;
"""
_ADD_DAY = """
INSERT INTO usage_days (day, caller, model, batches_completed, batches_failed, batches_canceled, records,
                        input_tokens, output_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, caller, model) DO UPDATE SET
    batches_completed = batches_completed + excluded.batches_completed,
    batches_failed = batches_failed + excluded.batches_failed,
    batches_canceled = batches_canceled + excluded.batches_canceled,
    records = records + excluded.records,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens
"""
_READ = """
SELECT caller, model, batches_completed, batches_failed, batches_canceled, records, input_tokens, output_tokens
FROM usage_days WHERE day >= ? AND day <= ?
"""
BUSY_TIMEOUT_S = 2.0


def add_tally(connection: sqlite3.Connection, tally: Tally) -> bool:
    """The tally in one transaction; False if its batch was counted before."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        inserted = connection.execute(
            "INSERT OR IGNORE INTO usage_batches VALUES (?, ?, ?, ?, ?)",
            (tally.batch_id, tally.day, tally.caller, tally.model, tally.status),
        ).rowcount
        if inserted:
            counts = tally.counts()
            connection.execute(_ADD_DAY, (tally.day, tally.caller, tally.model, *(counts.get(c, 0) for c in COUNTS)))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return bool(inserted)


def read_totals(connection: sqlite3.Connection, since: str | None, until: str | None) -> list[dict[str, Any]]:
    """The rows of the report (``gateway.events.usage.COLUMNS``) for the days from ``since`` to ``until``."""
    rows = connection.execute(_READ, (since or "0000-00-00", until or "9999-99-99")).fetchall()
    return sum_rows([(row[0], row[1], dict(zip(COUNTS, row[2:], strict=True))) for row in rows])


def connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    connection.executescript(_SCHEMA)
    return connection


class SqliteUsage:
    """``UsageStore`` in ``store.path``, through one worker thread of its own."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage")
        self._connection = await self._run(lambda: connect(self.path))

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            await asyncio.get_running_loop().run_in_executor(executor, connection.close)
        executor.shutdown(wait=True)

    async def _run(self, operation: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreUnavailable("the usage store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, operation)
        except sqlite3.Error as exc:
            raise StoreUnavailable() from exc

    def _connected(self) -> sqlite3.Connection:
        if self._connection is None:
            raise StoreUnavailable("the usage store is not open")
        return self._connection

    async def add(self, tally: Tally) -> bool:
        connection = self._connected()
        return await self._run(lambda: add_tally(connection, tally))

    async def totals(self, since: str | None, until: str | None) -> list[dict[str, Any]]:
        connection = self._connected()
        return await self._run(lambda: read_totals(connection, since, until))
