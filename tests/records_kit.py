"""What the tests of ``Records`` share: the two backends opened as processes would, and the values they use.

``open_sqlite_records`` opens ``SqliteRecords`` on one file, ``open_redis_records``
``RedisRecords`` on the test's own redis-server, each one a link of its own (a
replica). Both are fixtures of every test module (tests/conftest.py imports
them); tests/test_records_contract.py runs the contract on each.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from gateway.records.base import Claim, InUse, body_fingerprint
from gateway.records.redis import RedisRecords
from gateway.records.sqlite import SqliteRecords
from gateway.replicas.link import RedisLink

if TYPE_CHECKING:  # conftest imports this module's fixtures
    from tests.conftest import OpenLink

TTL_S = 3600.0
LEASE_S = 20.0
FP = body_fingerprint({"name": "nightly", "input_dataset_id": "ds-1", "model": "m"})
OTHER_FP = body_fingerprint({"name": "nightly", "input_dataset_id": "ds-2", "model": "m"})
# Every wait on a backend's own clock (a lease, an expiry, Redis's probe) is bounded by this.
WITHIN_S = 5.0
# The tests are about what the backend answers, not how fast: a loaded test machine may take longer
# than redis.timeout_s (0.25 s) to open 20 connections at once, which would mark Redis lost.
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
    """Open SqliteRecords on one file, started (on the real clock), as processes would; all closed at the end."""
    opened: list[SqliteRecords] = []

    async def _open(ttl_s: float = TTL_S, lease_s: float = LEASE_S, **kwargs: Any) -> SqliteRecords:
        records = SqliteRecords(str(tmp_path / "records.db"), ttl_s, lease_s, busy_timeout_s=5.0, **kwargs)
        await records.start()
        opened.append(records)
        return records

    yield _open
    for records in opened:
        await records.close()


async def claim_once_free(records: Store, caller: str, key: str, fingerprint: str) -> Claim:
    """Claim ``key`` as soon as it is no longer in use. Its lease runs on the backend's clock, which sends
    no event when it passes: this polls, within WITHIN_S."""
    async with asyncio.timeout(WITHIN_S):
        while isinstance(claim := await records.claim_key(caller, key, fingerprint), InUse):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return claim
