"""Ownership and idempotency records on a real redis-server (DESIGN §8 "Store", §10).

The first half holds the ``Records`` contract: each test runs against both
``SqliteRecords`` and ``RedisRecords``, so the two backends answer alike
(tests/test_records.py holds SQLite's own tests, on a fake clock). The second
half is Redis's own: replicas sharing records, leases and expiry on Redis's
clock, key names that cannot collide, and failing closed when Redis is
killed or stalled, then recovering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import RedisSettings
from gateway.errors import StoreUnavailable
from gateway.ops.metrics import Metrics
from gateway.records.base import Claim, Claimed, InUse, Replay, Reused, body_fingerprint
from gateway.records.redis import RedisRecords
from gateway.records.sqlite import SqliteRecords
from gateway.replicas.link import RedisLink
from tests.conftest import OpenLink
from tests.redis_server import RedisServer

TTL_S = 3600.0
LEASE_S = 20.0
FP = body_fingerprint({"name": "nightly", "input_dataset_id": "ds-1", "model": "m"})
OTHER_FP = body_fingerprint({"name": "nightly", "input_dataset_id": "ds-2", "model": "m"})
# Every wait on Redis (its clock, its probe) is bounded by this.
WITHIN_S = 5.0
# The tests of failures run with the configured redis.timeout_s (0.25 s), and assert that a call to a dead
# or stalled Redis fails within FAIL_FAST_S, which leaves room for a busy machine.
TIMEOUT_S = RedisSettings().timeout_s
FAIL_FAST_S = 1.5
# The other tests are about what Redis answers, not how fast: a loaded test machine may take longer
# than 0.25 s to open 20 connections at once, which would mark Redis lost.
PATIENT_TIMEOUT_S = 2.0

Store = SqliteRecords | RedisRecords
OpenRedisRecords = Callable[..., Awaitable[RedisRecords]]
OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
async def open_redis_records(open_link: OpenLink) -> AsyncIterator[OpenRedisRecords]:
    """Open RedisRecords, started, each on a link of its own (a replica) unless given one; closed at the end."""
    opened: list[RedisRecords] = []

    async def _open(
        link: RedisLink | None = None, ttl_s: float = TTL_S, lease_s: float = LEASE_S, **kwargs: Any
    ) -> RedisRecords:
        records = RedisRecords(link or await open_link(timeout_s=PATIENT_TIMEOUT_S), ttl_s, lease_s, **kwargs)
        await records.start()
        opened.append(records)
        return records

    yield _open
    for records in opened:
        await records.close()


@pytest.fixture
async def open_sqlite_records(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Open SqliteRecords on one file, started (on the real clock); all closed at the end."""
    opened: list[SqliteRecords] = []

    async def _open(**kwargs: Any) -> SqliteRecords:
        records = SqliteRecords(str(tmp_path / "records.db"), TTL_S, LEASE_S, busy_timeout_s=5.0, **kwargs)
        await records.start()
        opened.append(records)
        return records

    yield _open
    for records in opened:
        await records.close()


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest) -> OpenStore:
    """Open stores of one backend that share their records, as processes (or replicas) would."""
    opener: OpenStore = request.getfixturevalue(f"open_{request.param}_records")
    return opener


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()


@pytest.fixture
async def records(open_redis_records: OpenRedisRecords) -> RedisRecords:
    return await open_redis_records()


async def claim_once_free(records: Store, caller: str, key: str, fingerprint: str) -> Claim:
    """Claim ``key`` as soon as it is no longer in use. Its lease runs on Redis's clock, which sends
    no event when it passes: this polls, within WITHIN_S."""
    async with asyncio.timeout(WITHIN_S):
        while isinstance(claim := await records.claim_key(caller, key, fingerprint), InUse):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return claim


# --- the contract, on both backends: owners ----------------------------------------


async def test_an_owner_recorded_is_answered_and_unknown_ids_have_none(store: Store) -> None:
    await store.record_owner("batch-1", "billing-service")
    assert await store.owner_of("batch-1") == "billing-service"
    assert store.known_owner("batch-1") == "billing-service"
    assert await store.owner_of("batch-2") is None
    assert store.known_owner("batch-2") is None


async def test_an_owner_recorded_by_another_process_is_seen_although_a_miss_came_first(
    open_store: OpenStore,
) -> None:
    reader, writer = await open_store(), await open_store()
    assert await reader.owner_of("batch-1") is None  # not cached: a negative answer may change
    await writer.record_owner("batch-1", "reporting")
    assert await reader.owner_of("batch-1") == "reporting"


async def test_recording_an_owner_twice_keeps_the_first(open_store: OpenStore) -> None:
    first, second = await open_store(), await open_store()
    await first.record_owner("batch-1", "billing-service")
    await second.record_owner("batch-1", "reporting")  # cannot happen with unique upstream ids; the first stays
    assert second.known_owner("batch-1") == "billing-service"  # the cache learns what is stored
    fresh = await open_store()
    assert await fresh.owner_of("batch-1") == "billing-service"


async def test_the_owner_cache_stays_within_its_bound(open_store: OpenStore) -> None:
    store = await open_store(owner_cache_size=2)
    for number in range(5):
        await store.record_owner(f"batch-{number}", "billing-service")
    assert len(store._owners) == 2
    assert store.known_owner("batch-0") is None
    assert await store.owner_of("batch-0") == "billing-service"  # evicted from memory, still stored


# --- the contract, on both backends: idempotency keys -------------------------------


async def test_a_settled_key_is_replayed_with_its_status_and_its_exact_bytes(store: Store) -> None:
    body = b'{"batch": {"id": "b1"}}\x00\xff\r\n'  # bytes, whatever they are
    assert await store.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=None)
    await store.settle_key("billing-service", "k1", 200, body)
    assert await store.claim_key("billing-service", "k1", FP) == Replay(200, body)


@pytest.mark.parametrize("state", ["running", "ambiguous", "settled"])
async def test_a_key_used_with_another_body_is_reused_whatever_its_state(store: Store, state: str) -> None:
    await store.claim_key("billing-service", "k1", FP)
    if state == "ambiguous":
        await store.mark_ambiguous("billing-service", "k1")
    elif state == "settled":
        await store.settle_key("billing-service", "k1", 200, b"{}")
    assert await store.claim_key("billing-service", "k1", OTHER_FP) == Reused()


async def test_a_running_key_is_in_use_for_what_is_left_of_its_lease(store: Store) -> None:
    await store.claim_key("billing-service", "k1", FP)
    claim = await store.claim_key("billing-service", "k1", FP)
    assert isinstance(claim, InUse)
    assert LEASE_S - 2 < claim.retry_after_s <= LEASE_S


async def test_an_ambiguous_key_is_claimed_again_with_the_first_attempts_time(store: Store) -> None:
    before = time.time()
    await store.claim_key("billing-service", "k1", FP)
    after = time.time()
    await store.mark_ambiguous("billing-service", "k1")
    claim = await store.claim_key("billing-service", "k1", FP)
    assert isinstance(claim, Claimed)
    assert claim.ambiguous_since is not None
    assert before - 0.01 <= claim.ambiguous_since <= after + 0.01  # Redis's clock, in whole ms, on this host
    # A second ambiguous ending still points at the first attempt.
    await store.mark_ambiguous("billing-service", "k1")
    assert await store.claim_key("billing-service", "k1", FP) == claim
    # The takeover holds a fresh lease.
    assert isinstance(await store.claim_key("billing-service", "k1", FP), InUse)


async def test_a_released_key_is_free_again(store: Store) -> None:
    await store.claim_key("billing-service", "k1", FP)
    await store.release_key("billing-service", "k1")
    assert await store.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=None)
    # Free means free: another body may now use the key.
    await store.release_key("billing-service", "k1")
    assert await store.claim_key("billing-service", "k1", OTHER_FP) == Claimed(ambiguous_since=None)


async def test_releasing_a_retry_of_an_ambiguous_attempt_keeps_it_ambiguous(store: Store) -> None:
    await store.claim_key("billing-service", "k1", FP)
    await store.mark_ambiguous("billing-service", "k1")
    claim = await store.claim_key("billing-service", "k1", FP)
    assert isinstance(claim, Claimed)
    assert claim.ambiguous_since is not None
    await store.release_key("billing-service", "k1")  # the retry got a 429: it created nothing, the first may have
    assert await store.claim_key("billing-service", "k1", FP) == claim


async def test_a_settled_outcome_is_never_downgraded(store: Store) -> None:
    await store.claim_key("billing-service", "k1", FP)
    await store.settle_key("billing-service", "k1", 200, b"{}")
    await store.mark_ambiguous("billing-service", "k1")
    await store.release_key("billing-service", "k1")
    assert await store.claim_key("billing-service", "k1", FP) == Replay(200, b"{}")


async def test_updating_a_key_never_claimed_creates_nothing(store: Store) -> None:
    await store.settle_key("billing-service", "k1", 200, b"{}")
    await store.mark_ambiguous("billing-service", "k2")
    await store.release_key("billing-service", "k3")
    for key in ("k1", "k2", "k3"):
        assert await store.claim_key("billing-service", key, FP) == Claimed(ambiguous_since=None)


async def test_the_same_key_for_two_callers_is_two_records(store: Store) -> None:
    assert await store.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=None)
    assert await store.claim_key("reporting", "k1", OTHER_FP) == Claimed(ambiguous_since=None)
    await store.settle_key("billing-service", "k1", 200, b"billing")
    assert isinstance(await store.claim_key("reporting", "k1", OTHER_FP), InUse)
    await store.settle_key("reporting", "k1", 200, b"reporting")
    assert await store.claim_key("billing-service", "k1", FP) == Replay(200, b"billing")
    assert await store.claim_key("reporting", "k1", OTHER_FP) == Replay(200, b"reporting")


async def test_concurrent_claims_of_one_key_from_three_processes_give_exactly_one_claim(
    open_store: OpenStore,
) -> None:
    stores = [await open_store() for _ in range(3)]
    claims = await asyncio.gather(*(stores[number % 3].claim_key("billing-service", "k1", FP) for number in range(60)))
    assert sum(isinstance(claim, Claimed) for claim in claims) == 1
    assert sum(isinstance(claim, InUse) for claim in claims) == 59


async def test_a_closed_store_refuses_to_answer(open_store: OpenStore) -> None:
    store = await open_store()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.owner_of("batch-1")
    with pytest.raises(StoreUnavailable):
        await store.record_owner("batch-1", "billing-service")
    with pytest.raises(StoreUnavailable):
        await store.claim_key("billing-service", "k1", FP)


# --- Redis: replicas ----------------------------------------------------------------


async def test_two_replicas_see_each_others_owners_and_keys(open_redis_records: OpenRedisRecords) -> None:
    first, second = await open_redis_records(), await open_redis_records()
    assert first.link is not second.link
    await first.record_owner("batch-1", "billing-service")
    assert await second.owner_of("batch-1") == "billing-service"
    assert await first.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=None)
    assert isinstance(await second.claim_key("billing-service", "k1", FP), InUse)
    assert await second.claim_key("billing-service", "k1", OTHER_FP) == Reused()
    await first.settle_key("billing-service", "k1", 201, b'{"batch": {"id": "b1"}}')
    assert await second.claim_key("billing-service", "k1", FP) == Replay(201, b'{"batch": {"id": "b1"}}')


async def test_concurrent_claims_of_one_key_from_two_replicas_give_exactly_one_claim(
    open_redis_records: OpenRedisRecords,
) -> None:
    replicas = [await open_redis_records(), await open_redis_records()]
    claims = await asyncio.gather(
        *(replicas[number % 2].claim_key("billing-service", "k1", FP) for number in range(40))
    )
    assert sum(isinstance(claim, Claimed) for claim in claims) == 1
    assert sum(isinstance(claim, InUse) for claim in claims) == 39


# --- Redis: leases and expiry, on Redis's clock ---------------------------------------


async def test_a_running_key_past_its_lease_is_taken_over_as_ambiguous_since_the_first_attempt(
    open_redis_records: OpenRedisRecords, redis_server: RedisServer
) -> None:
    holder = await open_redis_records(lease_s=0.2)
    other = await open_redis_records(lease_s=0.2)
    before = time.time()
    assert await holder.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=None)
    after = time.time()
    # Nearly done or not, a lease in use says at least 1 s.
    assert await other.claim_key("billing-service", "k1", FP) == InUse(retry_after_s=1.0)
    # The holder never settles (it died): once its lease passes, another replica takes over.
    claim = await claim_once_free(other, "billing-service", "k1", FP)
    assert isinstance(claim, Claimed)
    assert claim.ambiguous_since is not None
    assert before - 0.01 <= claim.ambiguous_since <= after + 0.01
    assert time.time() - before >= 0.2 - 0.01
    # The takeover holds a fresh lease; its release keeps the key ambiguous for the next try.
    assert isinstance(await holder.claim_key("billing-service", "k1", FP), InUse)
    await other.release_key("billing-service", "k1")
    assert await holder.claim_key("billing-service", "k1", FP) == claim


@pytest.mark.parametrize("state", ["running", "ambiguous", "settled"])
async def test_a_key_is_gone_idempotency_ttl_after_its_first_attempt(
    open_redis_records: OpenRedisRecords, state: str
) -> None:
    records = await open_redis_records(ttl_s=0.4, lease_s=LEASE_S)
    started = time.monotonic()
    await records.claim_key("billing-service", "k1", FP)
    if state == "ambiguous":
        await records.mark_ambiguous("billing-service", "k1")
    elif state == "settled":
        await records.settle_key("billing-service", "k1", 200, b"{}")
    assert not isinstance(await records.claim_key("billing-service", "k1", OTHER_FP), Claimed)
    # Redis expires the record by itself (no event says so): a claim with another body then finds the key free.
    async with asyncio.timeout(WITHIN_S):
        while await records.claim_key("billing-service", "k1", OTHER_FP) != Claimed(None):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert time.monotonic() - started >= 0.4 - 0.02


async def test_the_expiry_counts_from_the_first_attempt_through_takeovers_and_settling(
    records: RedisRecords, redis_server: RedisServer
) -> None:
    await records.claim_key("billing-service", "k1", FP)
    await records.mark_ambiguous("billing-service", "k1")
    claim = await records.claim_key("billing-service", "k1", FP)
    assert isinstance(claim, Claimed)
    assert claim.ambiguous_since is not None
    await records.settle_key("billing-service", "k1", 200, b"{}")
    client = redis_server.client()
    try:
        expires_at_ms = await client.execute_command("PEXPIRETIME", records._record_key("billing-service", "k1"))
    finally:
        await client.aclose()
    assert expires_at_ms == round(claim.ambiguous_since * 1000) + round(TTL_S * 1000)


async def test_owners_never_expire(records: RedisRecords, redis_server: RedisServer) -> None:
    await records.record_owner("batch-1", "billing-service")
    client = redis_server.client()
    try:
        assert await client.pttl(records.link.key("owner", "batch-1")) == -1  # no expiry: ownership is forever
    finally:
        await client.aclose()


# --- Redis: key names ------------------------------------------------------------------

ODD_PAIRS = [
    ("a", "b:c"),
    ("a:b", "c"),
    ("a:b:c", ""),
    ("1:a", "b"),
    ("3:a", "b"),
    ("a", "1:b"),
    ("café", "k"),
    ("cafe\u0301", "k"),  # the same text, decomposed: another name
    ("ключ", "🔑:x"),
    ("ключ:🔑", "x"),
    ("billing-service", "idempotency:7:billing:k1"),
]


async def test_callers_and_keys_with_odd_characters_never_share_a_record(records: RedisRecords) -> None:
    assert len({records._record_key(caller, key) for caller, key in ODD_PAIRS}) == len(ODD_PAIRS)
    for number, (caller, key) in enumerate(ODD_PAIRS):
        assert await records.claim_key(caller, key, body_fingerprint({"n": number})) == Claimed(None), (caller, key)
        await records.settle_key(caller, key, 200, f"body {number}".encode())
    for number, (caller, key) in enumerate(ODD_PAIRS):
        replay = Replay(200, f"body {number}".encode())
        assert await records.claim_key(caller, key, body_fingerprint({"n": number})) == replay, (caller, key)


async def test_two_gateways_with_their_own_key_prefixes_share_no_records(
    redis_server: RedisServer, open_redis_records: OpenRedisRecords
) -> None:
    links = [
        RedisLink(RedisSettings(url=redis_server.url, key_prefix=prefix, timeout_s=PATIENT_TIMEOUT_S), Metrics())
        for prefix in ("one:", "two:")
    ]
    try:
        one, two = [await open_redis_records(link) for link in links]
        await one.record_owner("batch-1", "billing-service")
        await one.claim_key("billing-service", "k1", FP)
        assert await two.owner_of("batch-1") is None
        assert await two.claim_key("billing-service", "k1", OTHER_FP) == Claimed(None)
    finally:
        for link in links:
            await link.close()


# --- Redis: failing closed, and recovering -----------------------------------------------


def every_operation(records: RedisRecords) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    return [
        ("owner_of", lambda: records.owner_of("batch-unknown")),
        ("claim_key", lambda: records.claim_key("billing-service", "k2", FP)),
        ("record_owner", lambda: records.record_owner("batch-2", "billing-service")),
        ("settle_key", lambda: records.settle_key("billing-service", "k1", 200, b"{}")),
        ("mark_ambiguous", lambda: records.mark_ambiguous("billing-service", "k1")),
        ("release_key", lambda: records.release_key("billing-service", "k1")),
    ]


async def assert_fails_closed_at_once(records: RedisRecords, first: str = "owner_of") -> None:
    """Every operation fails as 503 store_unavailable: ``first`` (which meets the failure) within about one
    timeout, as no write is retried, and the others at once, without touching Redis."""
    operations = sorted(every_operation(records), key=lambda named: named[0] != first)
    for name, operation in operations:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as raised:
            await operation()
        assert time.monotonic() - started < FAIL_FAST_S, name
        assert raised.value.status == 503
        assert raised.value.code == "store_unavailable"
    # What this process knows of owners still answers: it never changes.
    assert records.known_owner("batch-1") == "billing-service"
    assert await records.owner_of("batch-1") == "billing-service"


async def assert_works(records: RedisRecords) -> None:
    await records.record_owner("batch-3", "reporting")
    assert await records.owner_of("batch-3") == "reporting"
    assert await records.claim_key("reporting", "k3", FP) == Claimed(None)
    await records.settle_key("reporting", "k3", 200, b"{}")
    assert await records.claim_key("reporting", "k3", FP) == Replay(200, b"{}")


async def test_with_redis_killed_every_operation_fails_closed_at_once_until_it_is_back(
    open_link: OpenLink, open_redis_records: OpenRedisRecords, redis_server: RedisServer
) -> None:
    link = await open_link(timeout_s=TIMEOUT_S)
    records = await open_redis_records(link)
    await records.record_owner("batch-1", "billing-service")
    await records.claim_key("billing-service", "k1", FP)
    redis_server.kill()
    await assert_fails_closed_at_once(records)
    await redis_server.start()  # a new, empty server on the same port
    await asyncio.wait_for(link.until_up(), WITHIN_S)
    await assert_works(records)


@pytest.mark.parametrize("first", ["owner_of", "claim_key", "record_owner"])
async def test_with_redis_stalled_every_operation_fails_closed_within_one_timeout_until_it_answers(
    open_link: OpenLink, open_redis_records: OpenRedisRecords, redis_server: RedisServer, first: str
) -> None:
    link = await open_link(timeout_s=TIMEOUT_S)
    records = await open_redis_records(link)
    await records.record_owner("batch-1", "billing-service")
    await records.claim_key("billing-service", "k1", FP)
    redis_server.pause()
    try:
        await assert_fails_closed_at_once(records, first)
    finally:
        redis_server.resume()
    await asyncio.wait_for(link.until_up(), WITHIN_S)
    await assert_works(records)
    # Nothing was lost: the key claimed before the stall is still in use.
    assert isinstance(await records.claim_key("billing-service", "k1", FP), InUse)


async def test_records_start_while_redis_is_down_and_serve_once_it_is_up(
    open_link: OpenLink, open_redis_records: OpenRedisRecords, redis_server: RedisServer
) -> None:
    redis_server.kill()
    link = await open_link(timeout_s=TIMEOUT_S)
    records = await open_redis_records(link)  # starting is no error: the gateway starts and degrades
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await records.claim_key("billing-service", "k1", FP)
    assert time.monotonic() - started < FAIL_FAST_S
    await redis_server.start()
    await asyncio.wait_for(link.until_up(), WITHIN_S)
    await assert_works(records)
