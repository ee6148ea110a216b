"""Ownership and idempotency records: what only Redis has (docs/design.md §8 "Store", §10), on a real redis-server.

The ``Records`` contract both backends keep is in tests/test_records_contract.py;
here: replicas sharing records, expiry on Redis's clock, key names that cannot
collide, and failing closed when Redis is killed or stalled, then recovering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from gateway.config import RedisSettings
from gateway.errors import StoreUnavailable
from gateway.ops.metrics import Metrics
from gateway.records.base import Claimed, InUse, Replay, Reused, body_fingerprint
from gateway.records.redis import RedisRecords
from gateway.replicas.link import RedisLink
from tests.conftest import OpenLink
from tests.records_kit import FP, OTHER_FP, PATIENT_TIMEOUT_S, TTL_S, WITHIN_S, OpenRedisRecords
from tests.redis_server import RedisServer

# The tests of failures run with the configured redis.timeout_s (0.25 s), and assert that a call to a dead
# or stalled Redis fails within FAIL_FAST_S, which leaves room for a busy machine.
TIMEOUT_S = RedisSettings().timeout_s
FAIL_FAST_S = 1.5


@pytest.fixture
async def records(open_redis_records: OpenRedisRecords) -> RedisRecords:
    return await open_redis_records()


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


# --- Redis: expiry, on Redis's clock ---------------------------------------------------


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
