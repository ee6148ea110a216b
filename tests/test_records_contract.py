"""The ``Records`` contract (docs/design.md §8 "Store" and "Idempotency-Key", §10), once, on each backend.

Every test runs on ``SqliteRecords`` (one file, opened as processes would) and
on ``RedisRecords`` (the test's own redis-server, opened as replicas would),
on the real clock: owners, claiming, settling, releasing and marking keys
ambiguous, replays, leases and expiry. What only one backend has lives with
it: tests/test_records.py (SQLite: its file, its locks, exact times on a fake
clock), tests/test_redis_records.py (Redis: replicas, key names, expiry on
Redis's clock, failing closed when Redis is killed or stalled).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import StoreUnavailable
from gateway.records.base import Claimed, InUse, Replay, Reused
from tests.records_kit import FP, LEASE_S, OTHER_FP, WITHIN_S, OpenStore, Store, claim_once_free


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest) -> OpenStore:
    """Open stores of one backend that share their records, as processes (or replicas) would."""
    opener: OpenStore = request.getfixturevalue(f"open_{request.param}_records")
    return opener


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()


# --- owners -------------------------------------------------------------------------


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
    await first.record_owner("batch-1", "billing-service")
    assert await first.owner_of("batch-1") == "billing-service"
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


# --- idempotency keys -----------------------------------------------------------------


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


# --- leases and expiry, on the backend's own clock ---------------------------------------


async def test_a_running_key_past_its_lease_is_taken_over_as_ambiguous_since_the_first_attempt(
    open_store: OpenStore,
) -> None:
    holder = await open_store(lease_s=0.2)
    other = await open_store(lease_s=0.2)
    before = time.time()
    assert await holder.claim_key("billing-service", "k1", FP) == Claimed(ambiguous_since=None)
    after = time.time()
    # Nearly done or not, a lease in use says at least 1 s.
    assert await other.claim_key("billing-service", "k1", FP) == InUse(retry_after_s=1.0)
    # The holder never settles (it died): once its lease passes, another process takes over.
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
async def test_a_key_is_gone_idempotency_ttl_after_its_first_attempt(open_store: OpenStore, state: str) -> None:
    records = await open_store(ttl_s=0.4, lease_s=LEASE_S)
    started = time.monotonic()
    await records.claim_key("billing-service", "k1", FP)
    if state == "ambiguous":
        await records.mark_ambiguous("billing-service", "k1")
    elif state == "settled":
        await records.settle_key("billing-service", "k1", 200, b"{}")
    assert not isinstance(await records.claim_key("billing-service", "k1", OTHER_FP), Claimed)
    # The record expires by itself (no event says so): a claim with another body then finds the key free.
    async with asyncio.timeout(WITHIN_S):
        while await records.claim_key("billing-service", "k1", OTHER_FP) != Claimed(None):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert time.monotonic() - started >= 0.4 - 0.02
