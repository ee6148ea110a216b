"""The event log in the SQLite file at ``store.path`` (docs/design.md §12, "Events").

Tables of its own beside the records' (``gateway.records.sqlite``), on a
connection of its own, in the file's WAL mode (the records set it):
readers of this process read the newest events from memory (``Tail``), so
few reads reach the file:

- ``event_log``: this log's id (cursors name it) and the last ``seq`` given,
  so a seq is never reused even when retention has removed every event;
- ``events``: one row per event, its JSON rendered once at append;
- ``followed``: every subject seen, with its last status and ``updated_at``.
  ``final = 0`` rows are the followed set; ``final = 1`` rows are kept for
  ``events.retention_s`` so that a late, older answer showing the subject
  active makes no event.

Every ``record`` is one ``BEGIN IMMEDIATE`` transaction: the check of the
subject's last status and the append are atomic, even against another
process on the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from gateway.config.features import EventsSettings
from gateway.errors import StoreUnavailable
from gateway.events.base import Event, EventLog, Kind, Sighting, Tail, event_type, render_event
from gateway.ops.logs import log_event
from gateway.ops.tasks import cancel_and_wait

log = logging.getLogger("gateway.events")
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS event_log (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    subject TEXT NOT NULL,
    owner TEXT,
    created_at REAL NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS followed (
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    status TEXT NOT NULL,
    final INTEGER NOT NULL,
    updated_at REAL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (kind, subject)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS followed_by_check ON followed (kind, final, seen_at);
CREATE INDEX IF NOT EXISTS followed_by_age ON followed (final, seen_at);
"""

# Retention removes at most this many rows per pass, so that no append ever waits long behind it.
PRUNE_BATCH = 2000
# How often retention runs when nothing is appended (and the followed count is read again).
SWEEP_S = 10.0


class SqliteEventLog:
    """``EventLog`` on SQLite, reached through one worker thread (as ``SqliteRecords`` is)."""

    def __init__(
        self,
        path: str,
        settings: Callable[[], EventsSettings],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 2.0,
    ) -> None:
        self.path = path
        self._settings = settings
        self._clock = clock
        self.busy_timeout_s = busy_timeout_s
        self._log_id = ""
        self._oldest = 1
        self.tail = Tail()
        self.followed_count: dict[Kind, int] = {"batch": 0, "dataset": 0}
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._pending: list[tuple[Sighting, float, asyncio.Future[Event | None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    @property
    def log_id(self) -> str:
        return self._log_id

    # --- life -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")
        try:
            self._log_id, oldest, newest = await self._run("open", self._open)
        except StoreUnavailable:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._oldest = oldest
        self.tail.heard(newest)
        await self._count_followed()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def _open(self) -> tuple[str, int, int]:
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            # The file is in WAL mode (gateway.records.sqlite sets it): the records' reads never wait for these
            # commits. FULL: an appended event is on disk before anyone is told of it.
            connection.execute("PRAGMA synchronous = FULL")
            # Appends and cursor reads touch the newest pages: a small page cache serves them, and the
            # gateway's memory does not grow with the log (SQLite's default is 2 MiB per connection).
            connection.execute("PRAGMA cache_size = -256")
            connection.executescript(_SCHEMA)
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "INSERT OR IGNORE INTO event_log (name, value) VALUES ('log_id', ?)", (secrets.token_hex(6),)
            )
            connection.execute("INSERT OR IGNORE INTO event_log (name, value) VALUES ('last_seq', '0')")
            connection.execute("COMMIT")
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        oldest, newest = self._read_bounds()
        return self._meta("log_id"), oldest, newest

    async def close(self) -> None:
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
        executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _run(self, name: str, operation: Callable[[], T]) -> T:
        """``operation`` on the worker thread; any SQLite error is StoreUnavailable (503 on the feed)."""
        if self._executor is None:
            raise StoreUnavailable("the event log is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._rolled_back_on_error, operation
            )
        except sqlite3.Error as exc:
            log_event(log, logging.WARNING, "event log failed", operation=name, reason=str(exc))
            raise StoreUnavailable() from exc

    def _rolled_back_on_error(self, operation: Callable[[], T]) -> T:
        # Worker thread, the connection's own (sqlite3 refuses it from any other): a failed operation's open
        # transaction is ended here, or every later BEGIN would fail.
        try:
            return operation()
        except sqlite3.Error:
            if self._connection is not None and self._connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._connection.execute("ROLLBACK")
            raise

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise sqlite3.ProgrammingError("the event log is not open")
        return self._connection

    def _meta(self, name: str) -> str:
        return str(self._db().execute("SELECT value FROM event_log WHERE name = ?", (name,)).fetchone()[0])

    def _read_bounds(self) -> tuple[int, int]:
        newest = int(self._meta("last_seq"))
        row = self._db().execute("SELECT MIN(seq) FROM events").fetchone()
        return (newest + 1 if row[0] is None else int(row[0])), newest

    # --- sightings --------------------------------------------------------------------------------------------

    async def record(self, sighting: Sighting) -> Event | None:
        """Joins the sightings recorded at the same moment: one transaction (one sync to disk) for them all."""
        future: asyncio.Future[Event | None] = asyncio.get_running_loop().create_future()
        self._pending.append((sighting, self._clock(), future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._record_batch(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _record_batch(self, batch: list[tuple[Sighting, float, asyncio.Future[Event | None]]]) -> None:
        try:
            events = await self._run("record", lambda: self._record_all([(s, now) for s, now, _ in batch]))
        except StoreUnavailable as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(str(exc)))
            return
        self.tail.add([event for event in events if event is not None])
        for (_, _, future), event in zip(batch, events, strict=True):
            if not future.done():
                future.set_result(event)

    def _record_all(self, batch: list[tuple[Sighting, float]]) -> list[Event | None]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            events = [self._decide(db, sighting, now) for sighting, now in batch]
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return events

    def _decide(self, db: sqlite3.Connection, s: Sighting, now: float) -> Event | None:
        """The rules of ``gateway.events.base``, inside the transaction."""
        row = db.execute(
            "SELECT status, final, updated_at FROM followed WHERE kind = ? AND subject = ?", (s.kind, s.subject)
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO followed (kind, subject, status, final, updated_at, seen_at) VALUES (?, ?, ?, ?, ?, ?)",
                (s.kind, s.subject, s.status, int(s.final), s.updated_at, now),
            )
            if s.final:
                return None  # first seen final: remembered, never an event
            self.followed_count[s.kind] += 1
            return self._append(db, s, now)
        status, final, updated_at = row
        if final or (s.updated_at is not None and updated_at is not None and s.updated_at < updated_at):
            return None  # nothing changes after the end; an older answer never makes an event
        db.execute(
            "UPDATE followed SET status = ?, final = ?, updated_at = COALESCE(?, updated_at), seen_at = ?"
            " WHERE kind = ? AND subject = ?",
            (s.status, int(s.final), s.updated_at, now, s.kind, s.subject),
        )
        if status == s.status:
            return None
        if s.final:
            self.followed_count[s.kind] -= 1
        return self._append(db, s, now)

    def _append(self, db: sqlite3.Connection, s: Sighting, now: float) -> Event:
        seq = int(self._meta("last_seq")) + 1
        db.execute("UPDATE event_log SET value = ? WHERE name = 'last_seq'", (str(seq),))
        payload = render_event(self._log_id, seq, s, now)
        kind_type = event_type(s.kind, s.status)
        db.execute(
            "INSERT INTO events (seq, type, subject, owner, created_at, payload) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, kind_type, s.subject, s.owner, now, payload),
        )
        self._prune(db, now)
        return Event(seq, kind_type, s.subject, s.owner, now, payload)

    def _prune(self, db: sqlite3.Connection, now: float) -> None:
        """Retention by count and age (a bounded step each time; the sweep catches up when idle)."""
        settings = self._settings()
        newest = int(self._meta("last_seq"))
        db.execute("DELETE FROM events WHERE seq <= ?", (newest - settings.max_events,))
        db.execute(
            # Only the oldest rows are looked at: created_at grows with seq, so no scan of the whole table.
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?) AND created_at < ?",
            (PRUNE_BATCH, now - settings.retention_s),
        )
        db.execute(
            "DELETE FROM followed WHERE (kind, subject) IN"
            " (SELECT kind, subject FROM followed WHERE final = 1 AND seen_at < ? LIMIT ?)",
            (now - settings.retention_s, PRUNE_BATCH),
        )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            with contextlib.suppress(StoreUnavailable):
                await self.prune()
                await self._count_followed()

    async def prune(self) -> None:
        """Apply retention now (it also runs at each append and every ``SWEEP_S``)."""

        def prune() -> tuple[int, int]:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                self._prune(db, self._clock())
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            return self._read_bounds()

        self._oldest = (await self._run("prune", prune))[0]
        self.tail.drop_before(self._oldest)

    async def _count_followed(self) -> None:
        def count() -> dict[Kind, int]:
            rows = self._db().execute("SELECT kind, COUNT(*) FROM followed WHERE final = 0 GROUP BY kind").fetchall()
            found = {str(kind): int(n) for kind, n in rows}
            return {"batch": found.get("batch", 0), "dataset": found.get("dataset", 0)}

        self.followed_count = await self._run("count", count)

    # --- reading ----------------------------------------------------------------------------------------------

    async def followed(self, kind: Kind, limit: int) -> list[str]:
        rows = await self._run(
            "followed",
            lambda: (
                self._db()
                .execute(
                    "SELECT subject FROM followed WHERE kind = ? AND final = 0 ORDER BY seen_at LIMIT ?", (kind, limit)
                )
                .fetchall()
            ),
        )
        return [str(row[0]) for row in rows]

    async def checked(self, kind: Kind, subjects: list[str]) -> None:
        now = self._clock()
        await self._run(
            "checked",
            lambda: self._db().executemany(
                "UPDATE followed SET seen_at = ? WHERE kind = ? AND subject = ? AND final = 0",
                [(now, kind, subject) for subject in subjects],
            ),
        )

    async def unfollow(self, kind: Kind, subject: str) -> None:
        # Marked final: kept (and then dropped) as finished subjects are, so a late sighting makes no event.
        now = self._clock()
        dropped = await self._run(
            "unfollow",
            lambda: (
                self._db()
                .execute(
                    "UPDATE followed SET final = 1, seen_at = ? WHERE kind = ? AND subject = ? AND final = 0",
                    (now, kind, subject),
                )
                .rowcount
            ),
        )
        if dropped:
            self.followed_count[kind] -= 1

    async def bounds(self) -> tuple[int, int]:
        oldest, newest = await self._run("bounds", self._read_bounds)
        self._oldest = oldest
        self.tail.heard(newest)
        return oldest, newest

    async def read_after(self, seq: int, limit: int) -> list[Event]:
        kept = self.tail.after(max(seq, self._oldest - 1), limit)
        if kept is not None:
            return kept
        rows = await self._run(
            "read",
            lambda: (
                self._db()
                .execute(
                    "SELECT seq, type, subject, owner, created_at, payload FROM events"
                    " WHERE seq > ? ORDER BY seq LIMIT ?",
                    (seq, limit),
                )
                .fetchall()
            ),
        )
        events = [Event(int(r[0]), str(r[1]), str(r[2]), r[3], float(r[4]), bytes(r[5])) for r in rows]
        if events and events[-1].seq >= self.tail.newest:
            self.tail.add(events)
        return events

    async def wait_beyond(self, seq: int, timeout_s: float) -> bool:
        return await self.tail.wait_beyond(seq, timeout_s)


if TYPE_CHECKING:
    _conforms: EventLog = SqliteEventLog(":memory:", EventsSettings)
