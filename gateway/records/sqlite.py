"""The embedded record store: ``Records`` on a SQLite file at ``store.path`` (docs/design.md §8)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import StoreUnavailable
from gateway.ops.logs import log_event
from gateway.records.base import Claim, Claimed, InUse, KnownOwners, Records, Replay, Reused, T

log = logging.getLogger("gateway.records")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    batch_id TEXT PRIMARY KEY,
    caller TEXT NOT NULL,
    recorded_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency_keys (
    caller TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'ambiguous', 'settled')),
    first_attempt_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    lease_until REAL NOT NULL,
    was_ambiguous INTEGER NOT NULL DEFAULT 0,
    status INTEGER,
    body BLOB,
    PRIMARY KEY (caller, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_at);
"""

# Expired idempotency rows are purged by claims, at most this many per claim:
# each claim adds at most one row, so the purge keeps up, and no claim ever
# does unbounded work or needs a timer of its own.
_PURGE_BATCH = 64
# Failing writes are tried this many times in all, sleeping between tries.
_WRITE_ATTEMPTS = 3
_WRITE_BACKOFF_S = 0.05


# The store holds who created which batch: readable by the gateway's own user only (docs/design.md §7).
PRIVATE_FILE_MODE = 0o600


def _make_private(path: str) -> None:
    """Create the store file with PRIVATE_FILE_MODE before SQLite opens it, or tighten an existing one.

    SQLite creates the -wal and -shm files with the database file's own
    mode, so they follow it. Runs before any record is written.
    """
    if path == ":memory:":
        return
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise sqlite3.OperationalError(f"cannot create it: {exc.strerror or exc}") from exc
    try:
        os.fchmod(descriptor, PRIVATE_FILE_MODE)
    except PermissionError:
        pass  # another user's file that this one may write: SQLite's open decides, as before
    finally:
        os.close(descriptor)


class SqliteRecords:
    """``Records`` in a SQLite file, reached through one dedicated worker thread.

    The standard library's sqlite3 on one thread (rather than aiosqlite, which
    would be a new dependency doing the same thing) owns the connection, so
    the event loop never blocks on the disk and every operation is serialised
    in this process; ``BEGIN IMMEDIATE`` serialises it against other processes
    on the same file. The file is in WAL mode (set here, for every module on
    the file: the event log, usage, webhook positions): a read never waits
    for a writer, so the event log's frequent commits never hold up an owner
    lookup, and a reader elsewhere (a backup) never holds up a commit.
    ``synchronous=FULL``: a commit is on disk before the call returns.

    Each operation may take at most ``busy_timeout_s`` from the moment it is
    asked for, queueing behind others included: when another connection
    holds the write lock, or the worker is stuck on a disk that stopped
    answering, operations fail in bounded time rather than piling up behind
    one another's waits.
    """

    def __init__(
        self,
        path: str,
        idempotency_ttl_s: float,
        lease_s: float,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 1.0,
        owner_cache_size: int = 100_000,
    ) -> None:
        self.path = path
        self.idempotency_ttl_s = idempotency_ttl_s
        self.lease_s = lease_s
        self.busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._owners = KnownOwners(owner_cache_size)
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None

    # --- life -----------------------------------------------------------------

    async def start(self) -> None:
        if self._executor is not None:
            return
        directory = Path(self.path).parent
        if not directory.is_dir():
            # A missing directory usually means a missing volume: refuse to
            # start rather than quietly keeping records somewhere they vanish.
            raise StoreUnavailable(f"store.path: the directory {directory} does not exist")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records")
        try:
            await self._run("open", self._open, self.busy_timeout_s + 5.0)
        except StoreUnavailable as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise StoreUnavailable(f"store.path: cannot open {self.path}: {exc.__cause__ or exc}") from exc

    def _open(self) -> None:
        _make_private(self.path)
        # isolation_level=None: no implicit transactions; each method says BEGIN itself.
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            _to_wal(connection)
            connection.execute("PRAGMA synchronous = FULL")
            connection.executescript(_SCHEMA)
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
        executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # --- running one operation on the worker thread ---------------------------

    async def _run(self, name: str, operation: Callable[[], T], budget_s: float | None = None) -> T:
        """Run ``operation`` on the worker thread within ``budget_s``; any sqlite3 error is StoreUnavailable.

        A cancelled caller does not cancel an operation already handed to the
        thread: a write in progress still commits (or rolls back) whole.
        """
        if self._executor is None:
            raise StoreUnavailable("the record store is not open")
        deadline = time.monotonic() + (self.busy_timeout_s if budget_s is None else budget_s)
        work = self._executor.submit(self._within, deadline, operation)
        done = asyncio.wrap_future(work)
        done.add_done_callback(_seen)  # one whose caller was cancelled ends unseen: never unraisable
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(done), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                # Still queued behind a worker that is stuck: cancelled, so that it never runs (a Future cancels
                # only before it starts). Once started it runs whole (a write commits or rolls back) and its
                # outcome is the answer.
                if work.cancel():
                    raise sqlite3.OperationalError("the record store did not answer in time") from None
                return await done
        except sqlite3.Error as exc:
            # Only SQLite's own words (locked, I/O error, not a database): the
            # callers see the contract's generic message, ops see the reason.
            log_event(log, logging.WARNING, "record store failed", operation=name, reason=str(exc))
            raise StoreUnavailable() from exc

    def _within(self, deadline: float, operation: Callable[[], T]) -> T:
        # Worker thread. The time spent queued counts against the operation's
        # budget: what is left becomes SQLite's busy timeout for this call.
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise sqlite3.OperationalError("the record store did not answer in time")
        connection = self._connection
        if connection is not None:
            # A transaction left open by a failed rollback would make every
            # later BEGIN fail: end it first, so the store heals by itself.
            _roll_back(connection)
            connection.execute(f"PRAGMA busy_timeout = {left_ms}")
        return operation()

    async def _write(self, name: str, operation: Callable[[], T]) -> T:
        """A write, retried with a short backoff; StoreUnavailable once every attempt failed."""
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                return await self._run(name, operation)
            except StoreUnavailable:
                if attempt == _WRITE_ATTEMPTS or self._executor is None:
                    raise
                await asyncio.sleep(_WRITE_BACKOFF_S * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise sqlite3.ProgrammingError("the record store is not open")
        return self._connection

    def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """``body`` in one BEGIN IMMEDIATE transaction: committed before returning, rolled back on error."""
        connection = self._db()
        # IMMEDIATE takes the write lock up front, so a read-then-write
        # (claim) cannot interleave with another process's.
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = body(connection)
            connection.execute("COMMIT")  # it can fail too (a full disk): then nothing of it is kept
        except BaseException:
            _roll_back(connection)
            raise
        return result

    # --- owners -----------------------------------------------------------------

    def known_owner(self, batch_id: str) -> str | None:
        return self._owners.get(batch_id)

    async def owner_of(self, batch_id: str) -> str | None:
        return await self._owners.look_up(batch_id, lambda: self._run("owner_of", lambda: self._select_owner(batch_id)))

    def _select_owner(self, batch_id: str) -> str | None:
        row = self._db().execute("SELECT caller FROM owners WHERE batch_id = ?", (batch_id,)).fetchone()
        return None if row is None else str(row[0])

    async def record_owner(self, batch_id: str, caller: str) -> None:
        now = self._clock()

        def insert(db: sqlite3.Connection) -> str:
            # Upstream ids are unique, so a row already there is this very
            # record written by an earlier attempt: the first one stays, and
            # the cache learns what is stored, whatever was asked.
            db.execute(
                "INSERT OR IGNORE INTO owners (batch_id, caller, recorded_at) VALUES (?, ?, ?)",
                (batch_id, caller, now),
            )
            return str(db.execute("SELECT caller FROM owners WHERE batch_id = ?", (batch_id,)).fetchone()[0])

        self._owners.remember(batch_id, await self._write("record_owner", lambda: self._transaction(insert)))

    # --- idempotency keys -------------------------------------------------------

    async def claim_key(self, caller: str, key: str, fingerprint: str) -> Claim:
        now = self._clock()
        return await self._run(
            "claim_key", lambda: self._transaction(lambda db: self._claim(db, caller, key, fingerprint, now))
        )

    def _claim(self, db: sqlite3.Connection, caller: str, key: str, fingerprint: str, now: float) -> Claim:
        db.execute(
            "DELETE FROM idempotency_keys WHERE (caller, key) IN"
            " (SELECT caller, key FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)",
            (now, _PURGE_BATCH),
        )
        row = db.execute(
            "SELECT fingerprint, state, first_attempt_at, expires_at, lease_until, status, body"
            " FROM idempotency_keys WHERE caller = ? AND key = ?",
            (caller, key),
        ).fetchone()
        lease_until = now + self.lease_s
        if row is None or row[3] <= now:
            db.execute(
                "INSERT OR REPLACE INTO idempotency_keys"
                " (caller, key, fingerprint, state, first_attempt_at, expires_at, lease_until)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (caller, key, fingerprint, now, now + self.idempotency_ttl_s, lease_until),
            )
            return Claimed(ambiguous_since=None)
        stored_fingerprint, state, first_attempt_at, _expires_at, held_until, status, body = row
        if stored_fingerprint != fingerprint:
            return Reused()
        if state == "settled":
            return Replay(status=int(status), body=bytes(body))
        if state == "running" and held_until > now:
            return InUse(retry_after_s=max(1.0, held_until - now))
        # Ambiguous, or running past its lease: the holder died or hung after
        # possibly sending, so the batch may exist. Take it over and say since when.
        db.execute(
            "UPDATE idempotency_keys SET state = 'running', was_ambiguous = 1, lease_until = ?"
            " WHERE caller = ? AND key = ?",
            (lease_until, caller, key),
        )
        return Claimed(ambiguous_since=float(first_attempt_at))

    async def settle_key(self, caller: str, key: str, status: int, body: bytes) -> None:
        def settle(db: sqlite3.Connection) -> None:
            # Whatever the state: a definite outcome is the best thing to
            # replay, even if a lease-expired takeover is running meanwhile.
            db.execute(
                "UPDATE idempotency_keys SET state = 'settled', status = ?, body = ? WHERE caller = ? AND key = ?",
                (status, body, caller, key),
            )

        await self._write("settle_key", lambda: self._transaction(settle))

    async def mark_ambiguous(self, caller: str, key: str) -> None:
        def mark(db: sqlite3.Connection) -> None:
            # Only a running record: a settled outcome is never downgraded.
            db.execute(
                "UPDATE idempotency_keys SET state = 'ambiguous', was_ambiguous = 1"
                " WHERE caller = ? AND key = ? AND state = 'running'",
                (caller, key),
            )

        # If this fails for good, the lease runs out and the next claim treats the record as ambiguous anyway.
        await self._write("mark_ambiguous", lambda: self._transaction(mark))

    async def release_key(self, caller: str, key: str) -> None:
        def release(db: sqlite3.Connection) -> None:
            # A key whose earlier attempt was ambiguous stays ambiguous: this
            # attempt created nothing, but that one still may have.
            db.execute(
                "DELETE FROM idempotency_keys WHERE caller = ? AND key = ? AND state = 'running' AND was_ambiguous = 0",
                (caller, key),
            )
            db.execute(
                "UPDATE idempotency_keys SET state = 'ambiguous' WHERE caller = ? AND key = ? AND state = 'running'",
                (caller, key),
            )

        await self._write("release_key", lambda: self._transaction(release))


def _to_wal(connection: sqlite3.Connection) -> None:
    """Put the file in WAL mode (kept in the file: every later connection to it, each module's, is WAL too).

    The switch needs the file to itself for a moment: while another process
    reads a rollback-journal file (a 0.5.1 store being backed up, say), the
    store opens as it is, works more slowly, and says so; the next start
    tries again.
    """
    try:
        (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
    except sqlite3.OperationalError:
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    if mode != "wal":
        log_event(log, logging.WARNING, "store not in WAL mode: reads wait for writes", mode=mode)


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _roll_back(connection: sqlite3.Connection) -> None:
    """End the connection's open transaction, if any, keeping nothing of it."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # it is retried before the next operation
            connection.execute("ROLLBACK")


if TYPE_CHECKING:
    # mypy checks here that SqliteRecords has every method of Records, with the same signatures.
    _conforms: Records = SqliteRecords(":memory:", 1.0, 1.0)
