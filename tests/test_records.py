"""Ownership and idempotency records: what only SQLite has (docs/design.md §8 "Store" and "Idempotency-Key").

The ``Records`` contract both backends keep is in tests/test_records_contract.py;
here: records that outlive a restart of the file's process, leases and expiry
to the exact second on a fake clock, the purge, the file's mode, and locks.
Failures are real, not mocked: ``store_locked`` holds the database file's
write lock from another connection, as another process would, so that the
store's writes fail after their busy timeout; ``store_stalled`` holds the
store's worker, as a disk that stopped answering would, so that reads fail
too (in WAL mode no lock stops a read).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StoreUnavailable
from gateway.records.base import Claimed, InUse, Replay, body_fingerprint
from gateway.records.sqlite import SqliteRecords
from tests.records_kit import FP, LEASE_S, OTHER_FP, TTL_S
from tests.support import BUSY_S, FakeClock, LogCapture, store_locked, store_stalled

OpenRecords = Callable[..., Awaitable[SqliteRecords]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(now=1_700_000_000.0)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "records.db")


@pytest.fixture
async def open_records(db_path: str, clock: FakeClock) -> AsyncIterator[OpenRecords]:
    """Open stores (on ``db_path`` unless told otherwise), started; all closed at the end."""
    opened: list[SqliteRecords] = []

    async def _open(path: str | None = None, **kwargs: Any) -> SqliteRecords:
        settings: dict[str, Any] = {"clock": clock, "busy_timeout_s": BUSY_S, **kwargs}
        records = SqliteRecords(path or db_path, TTL_S, LEASE_S, **settings)
        await records.start()
        opened.append(records)
        return records

    yield _open
    for records in opened:
        await records.close()


@pytest.fixture
async def records(open_records: OpenRecords) -> SqliteRecords:
    return await open_records()


# --- owners -------------------------------------------------------------------


async def test_ownership_survives_a_restart(open_records: OpenRecords, db_path: str) -> None:
    first = await open_records()
    await first.record_owner("batch-1", "billing-service")
    await first.close()
    again = await open_records()
    assert await again.owner_of("batch-1") == "billing-service"


# --- idempotency keys -----------------------------------------------------------


async def test_a_settled_key_is_replayed_after_a_restart(open_records: OpenRecords) -> None:
    first = await open_records()
    await first.claim_key("billing-service", "k1", FP)
    await first.settle_key("billing-service", "k1", 400, b'{"message": "bad model"}')
    await first.close()
    again = await open_records()
    assert await again.claim_key("billing-service", "k1", FP) == Replay(400, b'{"message": "bad model"}')


async def test_on_a_fake_clock_a_running_key_is_in_use_for_exactly_what_is_left_of_its_lease(
    records: SqliteRecords, clock: FakeClock
) -> None:
    await records.claim_key("billing-service", "k1", FP)
    clock.advance(5)
    assert await records.claim_key("billing-service", "k1", FP) == InUse(retry_after_s=LEASE_S - 5)
    clock.advance(LEASE_S - 5.5)
    assert await records.claim_key("billing-service", "k1", FP) == InUse(retry_after_s=1.0)  # at least 1 s


async def test_on_a_fake_clock_a_key_just_past_its_lease_is_claimed_as_ambiguous_since_exactly_the_first_attempt(
    records: SqliteRecords, clock: FakeClock
) -> None:
    first_attempt = clock.now
    await records.claim_key("billing-service", "k1", FP)
    clock.advance(LEASE_S + 1)
    assert await records.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=first_attempt)
    # The takeover holds a fresh lease.
    assert isinstance(await records.claim_key("billing-service", "k1", FP), InUse)


async def test_on_a_fake_clock_an_ambiguous_key_claimed_again_later_keeps_exactly_the_first_attempts_time(
    records: SqliteRecords, clock: FakeClock
) -> None:
    first_attempt = clock.now
    await records.claim_key("billing-service", "k1", FP)
    clock.advance(30)
    await records.mark_ambiguous("billing-service", "k1")
    clock.advance(2)
    assert await records.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=first_attempt)
    # A second ambiguous ending still points at the first attempt.
    await records.mark_ambiguous("billing-service", "k1")
    clock.advance(2)
    assert await records.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=first_attempt)


@pytest.mark.parametrize("state", ["running", "ambiguous", "settled"])
async def test_on_a_fake_clock_a_key_expires_exactly_idempotency_ttl_after_its_first_attempt(
    records: SqliteRecords, clock: FakeClock, state: str
) -> None:
    await records.claim_key("billing-service", "k1", FP)
    if state == "ambiguous":
        await records.mark_ambiguous("billing-service", "k1")
    elif state == "settled":
        await records.settle_key("billing-service", "k1", 200, b"{}")
    clock.advance(TTL_S - 1)
    assert not isinstance(await records.claim_key("billing-service", "k1", OTHER_FP), Claimed)
    clock.advance(1)
    assert await records.claim_key("billing-service", "k1", OTHER_FP) == Claimed(ambiguous_since=None)


async def test_expired_keys_are_purged_a_bounded_batch_at_a_time(
    records: SqliteRecords, clock: FakeClock, db_path: str
) -> None:
    for number in range(100):
        await records.claim_key("billing-service", f"old-{number}", FP)
    clock.advance(TTL_S)
    await records.claim_key("billing-service", "new-1", FP)
    await records.claim_key("billing-service", "new-2", FP)
    with sqlite3.connect(db_path) as check:
        (rows,) = check.execute("SELECT count(*) FROM idempotency_keys").fetchone()
    assert rows == 2  # 100 expired: 64 purged by the first claim, 36 by the second


# --- the fingerprint --------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ('{"name": "a", "model": "m"}', '{"model":"m","name":"a"}', True),
        ('{"name": "a", "meta": {"x": 1, "y": [1, 2]}}', '{"meta":{"y":[1,2],"x":1},"name":"a"}', True),
        ('{"name": "caf\\u00e9"}', '{"name": "café"}', True),
        ('{"name": "a"}', '{"name": "b"}', False),
        ('{"name": "a", "list": [1, 2]}', '{"name": "a", "list": [2, 1]}', False),
        ('{"name": "a"}', '{"name": "a", "model": null}', False),
        ('{"n": 1}', '{"n": "1"}', False),
    ],
)
def test_the_fingerprint_ignores_key_order_and_whitespace_but_not_values(first: str, second: str, same: bool) -> None:
    import json

    assert (body_fingerprint(json.loads(first)) == body_fingerprint(json.loads(second))) is same


def test_the_fingerprint_is_sha256_hex() -> None:
    fingerprint = body_fingerprint({"name": "a"})
    assert len(fingerprint) == 64
    assert int(fingerprint, 16) >= 0


# --- failures ------------------------------------------------------------------------


async def test_reads_fail_as_store_unavailable_while_the_store_is_stalled(records: SqliteRecords) -> None:
    await records.record_owner("batch-1", "billing-service")
    with store_stalled(records):
        with pytest.raises(StoreUnavailable):
            await records.owner_of("batch-2")
        with pytest.raises(StoreUnavailable):
            await records.claim_key("billing-service", "k1", FP)
        # Ownership never changes, so the cache still answers what it knows.
        assert await records.owner_of("batch-1") == "billing-service"
    assert await records.owner_of("batch-2") is None  # and the store recovers by itself


async def test_a_failure_is_logged_with_the_operation_and_sqlites_reason(
    records: SqliteRecords, db_path: str, logs: LogCapture
) -> None:
    with store_locked(db_path), pytest.raises(StoreUnavailable):
        await records.record_owner("batch-1", "billing-service")
    failures = [e for e in logs.events("gateway.records") if e["event"] == "record store failed"]
    assert failures  # one line per attempt
    assert all(e["operation"] == "record_owner" and "locked" in e["reason"] for e in failures)


async def test_an_owner_lookup_never_waits_for_another_connections_write(
    open_records: OpenRecords, db_path: str
) -> None:
    await (await open_records()).record_owner("batch-1", "billing-service")
    records_again = await open_records()  # nothing in its memory cache
    writer = sqlite3.connect(db_path, isolation_level=None)
    try:
        # Another connection (the event log's, another process's) in the middle of a write, holding every lock a
        # writer can: the lookup still answers, with what is committed.
        writer.execute("BEGIN EXCLUSIVE")
        writer.execute("INSERT INTO owners VALUES ('batch-2', 'reporting', 0)")
        assert await records_again.owner_of("batch-1") == "billing-service"
        assert await records_again.owner_of("batch-2") is None
        writer.execute("COMMIT")
    finally:
        writer.close()


# Another process: takes an exclusive lock on the file, says so, holds it until its stdin closes.
_LOCK_HOLDER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
"""


async def test_a_lock_held_by_another_process_fails_writes_until_it_ends_while_reads_go_on(
    records: SqliteRecords, db_path: str
) -> None:
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LOCK_HOLDER, db_path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"
        assert await records.owner_of("batch-1") is None
        with pytest.raises(StoreUnavailable):
            await records.record_owner("batch-1", "billing-service")
    finally:
        holder.stdin.close()
        await asyncio.wait_for(holder.wait(), 30)
    await records.record_owner("batch-1", "billing-service")
    assert await records.owner_of("batch-1") == "billing-service"


async def test_a_known_owner_is_answered_from_cache_by_a_store_that_never_read_it(
    open_records: OpenRecords, db_path: str
) -> None:
    other = await open_records()
    await other.record_owner("batch-1", "billing-service")
    records = await open_records()
    assert await records.owner_of("batch-1") == "billing-service"  # read once, then cached
    with store_stalled(records):
        assert await records.owner_of("batch-1") == "billing-service"


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda r: r.record_owner("batch-1", "billing-service"), id="record_owner"),
        pytest.param(lambda r: r.settle_key("billing-service", "k1", 200, b"{}"), id="settle_key"),
        pytest.param(lambda r: r.mark_ambiguous("billing-service", "k1"), id="mark_ambiguous"),
        pytest.param(lambda r: r.release_key("billing-service", "k1"), id="release_key"),
    ],
)
async def test_writes_fail_as_store_unavailable_after_their_retries(
    records: SqliteRecords, db_path: str, write: Callable[[SqliteRecords], Awaitable[None]]
) -> None:
    await records.claim_key("billing-service", "k1", FP)
    with store_locked(db_path):
        assert await records.owner_of("batch-2") is None  # reads still work under a write lock
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await write(records)
        # Three attempts, each waiting out its busy timeout, with backoff between them.
        assert time.monotonic() - started >= 3 * BUSY_S
    await write(records)  # the same write succeeds once the lock is gone


async def test_a_reader_in_another_process_never_holds_up_a_write(records: SqliteRecords, db_path: str) -> None:
    # Another process in the middle of a read (a backup, an operator's sqlite3 shell): the write commits at once,
    # and the reader goes on seeing the file as it was when its read began.
    reader = sqlite3.connect(db_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM owners").fetchone() == (0,)
        await records.record_owner("batch-1", "billing-service")
        assert reader.execute("SELECT count(*) FROM owners").fetchone() == (0,)
        reader.execute("ROLLBACK")
    finally:
        reader.close()
    assert await records.owner_of("batch-1") == "billing-service"


async def test_a_write_that_fails_once_is_retried_and_succeeds(records: SqliteRecords, db_path: str) -> None:
    lock = sqlite3.connect(db_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    loop.call_later(BUSY_S * 1.5, lambda: (lock.execute("ROLLBACK"), lock.close()))
    await records.record_owner("batch-1", "billing-service")
    assert await records.owner_of("batch-1") == "billing-service"


async def test_operations_queued_behind_a_stalled_store_fail_in_bounded_time(records: SqliteRecords) -> None:
    with store_stalled(records):
        started = time.monotonic()
        results = await asyncio.gather(
            *(records.owner_of(f"batch-{number}") for number in range(50)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
    assert all(isinstance(result, StoreUnavailable) for result in results)
    assert elapsed < 10 * BUSY_S  # not 50 busy timeouts in a row


async def test_a_store_whose_directory_is_missing_does_not_start(tmp_path: Path) -> None:
    records = SqliteRecords(str(tmp_path / "missing" / "records.db"), TTL_S, LEASE_S)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        await records.start()


async def test_a_store_file_that_is_not_a_database_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    path.write_bytes(b"this is not a database\n" * 200)
    records = SqliteRecords(str(path), TTL_S, LEASE_S)
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await records.start()


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The usual umask (group and others may read new files), whatever the test runner's."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def create_readable_by_others(path: Path) -> None:
    path.touch()
    path.chmod(0o644)


@pytest.mark.usefixtures("permissive_umask")
async def test_a_new_store_file_and_its_wal_files_are_readable_by_their_own_user_only(
    open_records: OpenRecords, db_path: str
) -> None:
    records = await open_records()
    await records.record_owner("batch-1", "billing-service")
    # The write-ahead log and its index beside the file hold records too: as private.
    for path in (db_path, db_path + "-wal", db_path + "-shm"):
        assert mode(Path(path)) == 0o600, path


@pytest.mark.usefixtures("permissive_umask")
async def test_an_existing_store_file_readable_by_others_is_made_private(
    open_records: OpenRecords, db_path: str
) -> None:
    create_readable_by_others(Path(db_path))
    await open_records()
    assert mode(Path(db_path)) == 0o600


async def test_a_store_that_cannot_turn_to_wal_mode_still_opens_and_says_so(
    open_records: OpenRecords, db_path: str, logs: LogCapture
) -> None:
    first = await open_records()
    await first.record_owner("batch-1", "billing-service")
    await first.close()
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        # A store file of 0.5.1 (a rollback journal), which another process is reading as the gateway starts.
        assert other.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM owners").fetchone()
        records = await open_records()
        assert await records.owner_of("batch-1") == "billing-service"
    finally:
        other.close()
    (line,) = [e for e in logs.events("gateway.records") if e["event"].startswith("store not in WAL mode")]
    assert line["mode"] == "delete"
