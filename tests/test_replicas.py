"""Three replicas that act as one gateway on one Redis (docs/design.md §10), seen from outside.

Each test starts three ``python -m gateway`` processes ("replicas": A, B and
C) with the same ``redis.url`` and ``redis.key_prefix``, a real
``redis-server`` of its own (``tests/redis_server.py``) and the fake batch
upstream of ``tests/upstream.py`` in the test process, which counts
every call it gets. Callers use the cohere SDK (its raw responses show the
headers); Redis is watched with its own ``MONITOR`` and ``INFO``, and killed,
stopped (SIGSTOP) and restarted for real. Nothing is mocked.

What a user of three replicas must notice: they make the upstream calls of
one gateway (one call for many concurrent misses, one cache, one budget, one
429 pause), a cancel or a create through one is seen through the others, and
Redis going away (killed, stalled, or a leader dying with its lock) fails no
poll and slows none past a Redis timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cohere
import httpx
import pytest
from cohere.batches import Batch
from cohere.core.api_error import ApiError
from multidict import CIMultiDict

from gateway.config import deep_merge
from tests.conftest import ProcessFactory
from tests.redis_server import RedisServer
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    Answer,
    GatewayProcess,
    assert_no_secrets,
    raw_config,
    sample_value,
    scrape_metrics,
    write_config,
)
from tests.upstream import ACTIVE, CANCELING, Upstream, write_callers

# Every test here runs three child processes, which use uvloop whatever loop the test runs on.
pytestmark = pytest.mark.one_loop

REPLICAS = 3
BOUND_S = 30.0  # bound on each test's exchanges (three processes on 2 shared cores)
PROBE_S = 0.2  # redis.probe_interval_s: a restarted Redis is found again quickly
REDIS_TIMEOUT_S = 0.25  # redis.timeout_s (the default): the most one Redis call may cost
COMPLETED = "BATCH_STATUS_COMPLETED"
FLIGHT_SIZE = 60


# ---------------------------------------------------------------------------
# Three replicas, and what a test reads from them
# ---------------------------------------------------------------------------


@dataclass
class Replica:
    """One ``python -m gateway`` process, with an SDK client per caller key."""

    process: GatewayProcess
    clients: dict[str, cohere.AsyncClientV2] = field(default_factory=dict)
    _http: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.process.url

    def sdk(self, key: str = BILLING_KEY) -> cohere.AsyncClientV2:
        """The cohere SDK pointed at this replica as the caller with ``key`` (SDK retries off)."""
        if key not in self.clients:
            transport = httpx.AsyncClient(timeout=BOUND_S, limits=httpx.Limits(max_connections=FLIGHT_SIZE))
            self._http.append(transport)
            self.clients[key] = cohere.AsyncClientV2(
                api_key=key, base_url=self.url, httpx_client=transport, max_retries=0
            )
        return self.clients[key]

    async def retrieve(self, batch_id: str, key: str = BILLING_KEY) -> Answer:
        """``co.batches.retrieve`` with its raw response: status, headers and body, error or not."""
        try:
            raw = await self.sdk(key).batches.with_raw_response.retrieve(batch_id)
        except ApiError as exc:
            body = exc.body if isinstance(exc.body, bytes) else json.dumps(exc.body).encode()
            answer = Answer(exc.status_code or 0, CIMultiDict(exc.headers or {}), body)
        else:
            answer = Answer(raw.status_code, CIMultiDict(raw.headers), raw.response.content)
        assert_no_secrets(answer.body)
        return answer

    async def metric(self, name: str, **labels: str) -> float:
        _text, samples = await scrape_metrics(self.url)
        return sample_value(samples, name, **labels)

    def logged(self, event: str) -> int:
        """How many of this process's log lines have an event starting with ``event``."""
        return sum(1 for line in self.process.events if line["event"].startswith(event))

    async def close(self) -> None:
        for transport in self._http:
            await transport.aclose()


StartReplicas = Callable[..., Awaitable[list[Replica]]]


async def start_replicas(
    start: ProcessFactory, tmp_path: Path, upstream_url: str, redis: RedisServer, **sections: Any
) -> list[Replica]:
    """Three processes on one Redis and one fresh key prefix; ``sections`` deep-merge over each config.

    Each config keeps a store file of its own (``raw_config``): with
    ``redis.url`` the records must come from Redis, never from a shared file.
    """
    shared = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5},
        "logging": {"access_log": False},
        "redis": {"url": redis.url, "key_prefix": f"replicas-{secrets.token_hex(4)}:", "probe_interval_s": PROBE_S},
    }
    paths = [
        write_config(tmp_path / f"replica-{n}.yaml", raw_config(upstream_url, **deep_merge(shared, sections)))
        for n in range(REPLICAS)
    ]
    processes = await asyncio.gather(*(start(path) for path in paths))
    return [Replica(process) for process in processes]


@pytest.fixture
async def replicas(
    gateway_process: ProcessFactory, redis_server: RedisServer, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[StartReplicas]:
    """Start three replicas in front of ``upstream`` on ``redis_server``; their clients closed at the end."""
    started: list[Replica] = []

    async def _start(**sections: Any) -> list[Replica]:
        group = await start_replicas(gateway_process, tmp_path, upstream.url, redis_server, **sections)
        started.extend(group)
        return group

    yield _start
    for replica in started:
        await replica.close()


def retrieves(upstream: Upstream, batch_id: str) -> int:
    """Upstream retrieves of ``batch_id`` so far."""
    return sum(1 for seen in upstream.calls("retrieve") if seen.path == f"/v2/batches/{batch_id}")


def batch_of(answer: Answer) -> dict[str, Any]:
    assert answer.status == 200, (answer.status, answer.body[:300])
    batch: dict[str, Any] = answer.document["batch"]
    return batch


async def total(group: list[Replica], name: str, **labels: str) -> float:
    return sum(await asyncio.gather(*(replica.metric(name, **labels) for replica in group)))


async def waiting_on_flights(group: list[Replica]) -> float:
    """Requests that joined a flight rather than lead one: their own process's, or another's."""
    coalesced = await total(group, "gateway_singleflight_coalesced_total")
    return coalesced + await total(group, "gateway_shared_flights_total", role="followed")


async def sixty_at_once(group: list[Replica], upstream: Upstream, batch_id: str) -> list[Answer]:
    """60 concurrent retrieves of an uncached id, spread over the replicas, all waiting before any answer.

    The upstream holds its answers until every request has joined a flight
    (``gateway_singleflight_coalesced_total`` and ``..._followed``: all but
    at most one leader per process), so the 60 really are concurrent.
    """
    before = upstream.count("retrieve")
    gate = upstream.hold("retrieve", times=None)
    requests = [asyncio.ensure_future(group[n % REPLICAS].retrieve(batch_id)) for n in range(FLIGHT_SIZE)]
    try:
        await upstream.arrival("retrieve", before + 1)

        async def all_joined() -> bool:
            return await waiting_on_flights(group) >= FLIGHT_SIZE - REPLICAS

        joined = await poll_until(all_joined, 10)
    finally:
        upstream.heal("retrieve")
        gate.set()
        answers = await asyncio.gather(*requests, return_exceptions=True)
    assert joined, "the 60 requests never all waited on a flight"
    assert all(isinstance(answer, Answer) for answer in answers), answers
    return [answer for answer in answers if isinstance(answer, Answer)]


async def poll_until(condition: Callable[[], Awaitable[bool]], within_s: float) -> bool:
    """Ask until ``condition`` holds or ``within_s`` passes (a state of another process: no event to await)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within_s
    while not await condition():
        if loop.time() > give_up:
            return False
        await asyncio.sleep(0.02)
    return True


# ---------------------------------------------------------------------------
# 1-3: one flight, one cache, one budget
# ---------------------------------------------------------------------------


async def test_sixty_concurrent_misses_across_three_replicas_make_one_upstream_call(
    replicas: StartReplicas, upstream: Upstream
) -> None:
    group = await replicas()
    upstream.seed("batch-flight")

    async with asyncio.timeout(BOUND_S):
        before = await total(group, "gateway_shared_flights_total", role="led")
        answers = await sixty_at_once(group, upstream, "batch-flight")
        led = await total(group, "gateway_shared_flights_total", role="led") - before

    assert retrieves(upstream, "batch-flight") == 1, "each replica fetched the id itself"
    assert {answer.status for answer in answers} == {200}
    assert len({answer.body for answer in answers}) == 1
    assert batch_of(answers[0])["id"] == "batch-flight"
    assert led == 1  # /metrics says so too: one process led, the others followed


async def test_an_answer_fetched_through_one_replica_is_a_hit_on_the_others(
    replicas: StartReplicas, upstream: Upstream
) -> None:
    group = await replicas()
    upstream.seed("batch-shared")

    async with asyncio.timeout(BOUND_S):
        first = await group[0].retrieve("batch-shared")
        others = [await replica.retrieve("batch-shared") for replica in group[1:]]

    assert first.header("X-Cache") == "MISS"
    assert [(answer.status, answer.header("X-Cache")) for answer in others] == [(200, "HIT")] * 2
    assert {answer.body for answer in others} == {first.body}
    assert retrieves(upstream, "batch-shared") == 1


RATE, BURST = 1.0, 4


async def test_three_replicas_spend_one_budget_not_three(replicas: StartReplicas, upstream: Upstream) -> None:
    # budget_wait_s 0: a request finding the bucket empty is refused at once, so the window stays short.
    group = await replicas(upstream={"rate_limit": {"requests_per_s": RATE, "burst": BURST}, "budget_wait_s": 0})
    ids = [f"batch-budget-{n}" for n in range(5 * REPLICAS)]
    for batch_id in ids:
        upstream.seed(batch_id)

    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(BOUND_S):
        answers = await asyncio.gather(*(group[n % REPLICAS].retrieve(batch_id) for n, batch_id in enumerate(ids)))
    elapsed = loop.time() - began

    served = [answer for answer in answers if answer.status == 200]
    refused = [answer for answer in answers if answer.status != 200]
    calls = upstream.count("retrieve")
    # One bucket: its burst, plus what it refilled while the requests ran; three buckets would allow 3 * BURST.
    allowed = BURST + 1 + int(elapsed * RATE)
    assert calls <= allowed, f"{calls} upstream calls in {elapsed:.2f} s: each replica spent a budget of its own"
    assert calls >= 2
    assert len(served) == calls
    assert {(answer.status, answer.code) for answer in refused} == {(429, "rate_limited")}
    assert all(answer.retry_after for answer in refused)


async def test_with_redis_lost_each_replica_spends_its_share_of_the_budget_never_the_whole(
    replicas: StartReplicas, upstream: Upstream, redis_server: RedisServer
) -> None:
    group = await replicas(upstream={"rate_limit": {"requests_per_s": 0.01, "burst": 6}, "budget_wait_s": 0})
    ids = [f"batch-share-{n}" for n in range(6 * REPLICAS)]
    for batch_id in ids:
        upstream.seed(batch_id)

    async def all_seen() -> bool:
        return all(count == REPLICAS for count in [await r.metric("gateway_processes_alive") for r in group])

    async with asyncio.timeout(BOUND_S):
        assert await poll_until(all_seen, 10), "the replicas never saw each other's heartbeats"
        redis_server.kill()
        answers = await asyncio.gather(*(group[n % REPLICAS].retrieve(batch_id) for n, batch_id in enumerate(ids)))

    # Each of the three last seen alive takes a third of the burst: 2 calls each, 6 in all, as with Redis.
    calls = upstream.count("retrieve")
    assert calls == 6, f"{calls} upstream calls: the replicas spent more than one budget between them"
    assert sum(answer.status == 200 for answer in answers) == 6
    assert {(answer.status, answer.code) for answer in answers if answer.status != 200} == {(429, "rate_limited")}
    assert all(replica.logged("redis lost") == 1 for replica in group)


# ---------------------------------------------------------------------------
# 4-6: the 429 pause, eviction on cancel, ownership
# ---------------------------------------------------------------------------


async def test_an_upstream_429_seen_by_one_replica_pauses_all_three(
    replicas: StartReplicas, upstream: Upstream
) -> None:
    group = await replicas()
    for n in range(REPLICAS):
        upstream.seed(f"batch-pause-{n}")
    upstream.fail("retrieve", 429, headers={"Retry-After": "5"}, times=1)

    async with asyncio.timeout(BOUND_S):
        first = await group[0].retrieve("batch-pause-0")
        others = [await replica.retrieve(f"batch-pause-{n}") for n, replica in enumerate(group) if n > 0]
        paused = [await replica.metric("gateway_upstream_rejected_total", reason="paused") for replica in group[1:]]

    assert (first.status, first.code, first.retry_after) == (429, "upstream_rate_limited", "5")
    assert upstream.count("retrieve") == 1, "another replica called the upstream during the pause"
    assert [(answer.status, answer.code) for answer in others] == [(429, "upstream_rate_limited")] * 2
    for answer in others:
        assert answer.retry_after is not None
        assert 1 <= int(answer.retry_after) <= 5  # what remains of the one pause
    assert all(count >= 1 for count in paused)


EVICTED_WITHIN_S = 1.0  # far below the active TTL below: only the eviction can explain the new state


async def test_a_cancel_through_one_replica_evicts_the_batch_on_every_replica(
    replicas: StartReplicas, upstream: Upstream
) -> None:
    group = await replicas(callers=write_callers(), cache={"ttl_s": {"active": 30}})
    upstream.seed("batch-cancel", status=ACTIVE)

    async def cancelling(replica: Replica) -> bool:
        return batch_of(await replica.retrieve("batch-cancel"))["status"] == CANCELING

    async with asyncio.timeout(BOUND_S):
        warm = [batch_of(await replica.retrieve("batch-cancel"))["status"] for replica in group]
        await group[0].sdk().batches.cancel("batch-cancel")
        fetched_before = retrieves(upstream, "batch-cancel")
        # Each other replica may serve its memory until the eviction reaches it, but not for long.
        evicted = [await poll_until(lambda r=replica: cancelling(r), EVICTED_WITHIN_S) for replica in group[1:]]
        again = [batch_of(await replica.retrieve("batch-cancel"))["status"] for replica in group]

    assert warm == [ACTIVE] * 3
    assert evicted == [True, True], "a replica kept serving the pre-cancel body"
    assert again == [CANCELING] * 3
    # B fetched the cancelled state once (or found it shared); C found it through Redis.
    assert retrieves(upstream, "batch-cancel") - fetched_before <= 1


async def test_a_request_waiting_on_one_replica_wakes_when_a_cancel_through_another_changes_its_batch(
    replicas: StartReplicas, upstream: Upstream
) -> None:
    # No refresh of its own for 30 s: only word from the other replica can wake the waiter in time.
    group = await replicas(callers=write_callers(), cache={"ttl_s": {"active_min": 30, "active": 30, "active_max": 60}})
    upstream.seed("batch-waited", status=ACTIVE)
    waiter, canceller = group[1], group[0]
    async with asyncio.timeout(BOUND_S):
        held = await waiter.retrieve("batch-waited")
        async with httpx.AsyncClient(timeout=BOUND_S) as client:
            waiting = asyncio.ensure_future(
                client.get(
                    f"{waiter.url}/v2/batches/batch-waited",
                    headers={
                        "Authorization": f"Bearer {BILLING_KEY}",
                        "If-None-Match": held.headers["ETag"],
                        "Prefer": "wait=25",
                    },
                )
            )
            assert await poll_until(lambda: _held(waiter), 10), "the request was never held"
            loop = asyncio.get_running_loop()
            cancelled_at = loop.time()
            await canceller.sdk().batches.cancel("batch-waited")
            answer = await waiting
            woke_after = loop.time() - cancelled_at

    assert answer.status_code == 200
    assert answer.json()["batch"]["status"] == CANCELING
    assert answer.headers["Preference-Applied"] == "wait=25"
    assert woke_after < 5, f"the waiter slept through the other replica's change ({woke_after:.1f} s)"


async def _held(replica: Replica) -> bool:
    return await replica.metric("gateway_waiters") == 1


async def test_a_batch_created_through_one_replica_is_its_creators_on_every_replica(
    replicas: StartReplicas, upstream: Upstream
) -> None:
    group = await replicas(callers=write_callers(billing="own", reporting="own"))

    async with asyncio.timeout(BOUND_S):
        created = (
            await group[0]
            .sdk()
            .batches.create(request=Batch(name="nightly", input_dataset_id="dataset-1", model="command-r"))
        )
        batch_id = created.batch.id
        assert batch_id is not None
        by_creator = [await replica.retrieve(batch_id) for replica in group[1:]]
        fetched = upstream.count("retrieve")
        by_other = [await replica.retrieve(batch_id, key=REPORTING_KEY) for replica in group[1:]]

    assert [answer.status for answer in by_creator] == [200, 200], "a replica did not know who created the batch"
    assert {batch_of(answer)["id"] for answer in by_creator} == {batch_id}
    assert [(answer.status, answer.code) for answer in by_other] == [(404, "not_found")] * 2
    assert upstream.count("retrieve") == fetched  # refused without asking the upstream


# ---------------------------------------------------------------------------
# 7: fresh hits stay in each process's memory
# ---------------------------------------------------------------------------


@dataclass
class RedisWatch:
    """Every command Redis runs, in order, as ``MONITOR`` reports it (on connections of the test's own).

    ``mark(name)`` puts an ``ECHO name`` into that stream, so that a test can
    tell which commands ran between two moments of its own, whichever
    process sent them. (INFO commandstats cannot tell the cache's EVALSHA
    from a heartbeat's; MONITOR shows each command with its keys.)
    """

    redis: RedisServer
    seen: list[dict[str, Any]] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _task: asyncio.Task[None] | None = None
    _marker: Any = None

    async def start(self) -> RedisWatch:
        client = self.redis.client()
        listening = asyncio.Event()

        async def watch() -> None:
            try:
                async with client.monitor() as monitor:
                    listening.set()
                    async for command in monitor.listen():
                        async with self._changed:
                            self.seen.append(command)
                            self._changed.notify_all()
            finally:
                await client.aclose()

        self._task = asyncio.ensure_future(watch())
        await asyncio.wait_for(listening.wait(), 5)
        self._marker = self.redis.client()
        await self._marker.ping()  # connected now: its handshake is not inside any window
        return self

    async def mark(self, name: str) -> int:
        """Send ``ECHO name`` and wait until MONITOR shows it: the index of the mark in ``seen``."""
        await self._marker.echo(name)
        return await self.until(lambda command: command["command"] == f"ECHO {name}")

    async def until(self, found: Callable[[dict[str, Any]], bool], after: int = 0, timeout_s: float = 10) -> int:
        """Wait until a command from the ``after``-th on satisfies ``found``; its index."""

        def index() -> int | None:
            return next((n for n in range(after, len(self.seen)) if found(self.seen[n])), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: index() is not None), timeout_s)
        where = index()
        assert where is not None
        return where

    async def until_recorded(self, subject: str, count: int, after: int = 0) -> None:
        """Wait until the event log has recorded ``subject`` ``count`` times from the ``after``-th command on.

        A process's first call of the log's script after Redis started fails with NOSCRIPT and is sent
        again once the script is loaded: each ``SCRIPT LOAD`` of it stands for one attempt that did nothing.
        """

        def recorded() -> bool:
            window = [command["command"] for command in self.seen[after:]]
            calls = sum(1 for text in window if text.startswith("EVALSHA") and subject in text)
            lost = sum(1 for text in window if text.startswith("SCRIPT LOAD") and "local previous = redis.call" in text)
            return calls - lost >= count

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(recorded), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._marker is not None:
            await self._marker.aclose()


HITS = 200
HANDSHAKE = ("HELLO", "CLIENT ", "AUTH", "SELECT")


async def test_fresh_hits_on_every_replica_send_no_command_to_redis(
    replicas: StartReplicas, upstream: Upstream, redis_server: RedisServer
) -> None:
    group = await replicas()
    upstream.seed("batch-warm", status=COMPLETED)  # terminal: fresh for a day, never refreshed
    watch = await RedisWatch(redis_server).start()
    try:
        async with asyncio.timeout(BOUND_S):
            begin_warm = await watch.mark("warm-up")
            warm = [await replica.retrieve("batch-warm") for replica in group]
            # Each replica records what its cache took in (docs/design.md §12) off the request path, a moment
            # later: those writes belong to the warm-up, so the hits are counted only once all three are seen.
            await watch.until_recorded("batch:batch-warm", REPLICAS, after=begin_warm)
            start = await watch.mark("hits")
            hits = await asyncio.gather(*(group[n % REPLICAS].retrieve("batch-warm") for n in range(HITS)))
            end = await watch.mark("hits-done")
            # Then one heartbeat of each process, so that a command a hit sends late is seen too.
            beats: set[str] = set()

            def all_beat(command: dict[str, Any]) -> bool:
                if command["client_type"] != "lua" and is_heartbeat(command["command"]):
                    beats.add(command["command"].split()[4])
                return len(beats) >= REPLICAS

            settled = await watch.until(all_beat, after=end)
    finally:
        await watch.stop()

    assert [answer.header("X-Cache") for answer in warm] == ["MISS", "HIT", "HIT"], "the cache is not shared"
    assert retrieves(upstream, "batch-warm") == 1
    warm_up = [c["command"] for c in watch.seen[begin_warm:start] if "batch-warm" in c["command"]]
    assert warm_up, "the warm-up through Redis was not seen: the watch would see nothing either"
    assert {(answer.status, answer.header("X-Cache")) for answer in hits} == {(200, "HIT")}
    touched = [
        command["command"]
        for command in watch.seen[start + 1 : settled]
        if command["client_type"] != "lua"  # a script's own commands: its EVALSHA is counted
        and not command["command"].startswith("ECHO ")  # the test's marks
        and not command["command"].startswith(HANDSHAKE)  # a connection opened, not a cache access
        and not is_heartbeat(command["command"])
    ]
    assert touched == [], f"{HITS} fresh hits sent {len(touched)} commands to Redis: {touched[:10]}"


def is_heartbeat(command: str) -> bool:
    """A process's heartbeat: ``RedisLink``'s EVALSHA on the ``alive`` key (KEYS[1]), with its process id."""
    words = command.split()
    return len(words) > 4 and words[0] == "EVALSHA" and words[2] == "1" and words[3].endswith("alive")


# ---------------------------------------------------------------------------
# 8-10: Redis killed, Redis stalled, a leader killed
# ---------------------------------------------------------------------------

KILL_AFTER_POLLS = 15  # every id cached, through Redis, before it goes
OUTAGE_POLLS_S = 2.5  # polling on for this long with Redis dead: each 1 s entry expires twice
POLL_IDS = [f"batch-poll-{n}" for n in range(6)]


async def test_killing_redis_under_load_fails_no_poll_and_sharing_resumes_after_a_restart(
    replicas: StartReplicas, upstream: Upstream, redis_server: RedisServer
) -> None:
    # A 1 s active TTL: entries expire during the outage, so polls need the upstream while Redis is gone.
    group = await replicas(cache={"ttl_s": {"active": 1}})
    for batch_id in POLL_IDS:
        upstream.seed(batch_id)
    outcomes: list[tuple[int, str, bool]] = []  # (status, code or the client's error, after the kill)
    loop = asyncio.get_running_loop()
    killed = asyncio.Event()
    stop_at = loop.time() + BOUND_S
    calls_at_kill = 0

    def kill_redis() -> None:
        nonlocal stop_at, calls_at_kill
        redis_server.kill()
        killed.set()
        stop_at = loop.time() + OUTAGE_POLLS_S
        calls_at_kill = upstream.count("retrieve")

    async def poller(replica: Replica, offset: int) -> None:
        n = offset
        while loop.time() < stop_at:
            try:
                answer = await replica.retrieve(POLL_IDS[n % len(POLL_IDS)])
                outcomes.append((answer.status, answer.code or "", killed.is_set()))
            except httpx.HTTPError as exc:
                outcomes.append((0, repr(exc), killed.is_set()))
            if len(outcomes) >= KILL_AFTER_POLLS and not killed.is_set():
                kill_redis()
            n += 1
            await asyncio.sleep(0.01)  # a steady poll rate, not a flood on 2 shared cores

    async with asyncio.timeout(BOUND_S):
        await asyncio.gather(*(poller(replica, n) for n, replica in enumerate(group)))
        fetched_during_outage = upstream.count("retrieve") - calls_at_kill
        for replica in group:
            await replica.process.wait_for_event("redis lost")
        await redis_server.restart()
        for replica in group:
            await replica.process.wait_for_event("redis regained")
        up = [await replica.metric("gateway_redis_up") for replica in group]
        upstream.seed("batch-after-outage")
        answers = await sixty_at_once(group, upstream, "batch-after-outage")

    failed = [outcome for outcome in outcomes if outcome[0] != 200]
    assert failed == [], f"{len(failed)} of {len(outcomes)} polls failed: {failed[:5]}"
    assert sum(1 for outcome in outcomes if outcome[2]) >= len(POLL_IDS), "too few polls while Redis was down"
    assert fetched_during_outage >= len(POLL_IDS)  # the outage's polls needed the upstream, and got it
    transitions = [(replica.logged("redis lost"), replica.logged("redis regained")) for replica in group]
    assert transitions == [(1, 1)] * 3, "lost and regained are each logged once per outage"
    assert up == [1.0] * 3
    assert {answer.status for answer in answers} == {200}
    assert retrieves(upstream, "batch-after-outage") == 1, "single-flight was not shared again after the restart"


CACHED_WITHIN_S = REDIS_TIMEOUT_S  # a memory hit never waits for Redis
FETCHED_WITHIN_S = 1.0  # a miss waits for at most one Redis timeout, then goes on without it


async def test_a_stalled_redis_slows_no_request_past_a_redis_timeout(
    replicas: StartReplicas, upstream: Upstream, redis_server: RedisServer
) -> None:
    group = await replicas()
    upstream.seed("batch-cached", status=COMPLETED)
    for n in range(2 * REPLICAS):
        upstream.seed(f"batch-stalled-{n}")
    loop = asyncio.get_running_loop()

    async def timed(replica: Replica, batch_id: str) -> tuple[int, float]:
        began = loop.time()
        answer = await replica.retrieve(batch_id)
        return answer.status, loop.time() - began

    async with asyncio.timeout(BOUND_S):
        for replica in group:
            assert (await replica.retrieve("batch-cached")).status == 200
        redis_server.pause()
        try:
            # One at a time, so that each time is the replica's alone.
            cached = [await timed(replica, "batch-cached") for replica in group]
            fresh = [await timed(replica, f"batch-stalled-{n}") for n, replica in enumerate(group)]
            for replica in group:
                await replica.process.wait_for_event("redis lost")
            later = [await timed(replica, f"batch-stalled-{n + REPLICAS}") for n, replica in enumerate(group)]
            down = [await replica.metric("gateway_redis_up") for replica in group]
        finally:
            redis_server.resume()
        for replica in group:
            await replica.process.wait_for_event("redis regained")

    assert [status for status, _ in cached + fresh + later] == [200] * 9
    assert max(elapsed for _, elapsed in cached) < CACHED_WITHIN_S, cached
    assert max(elapsed for _, elapsed in fresh + later) < FETCHED_WITHIN_S, (fresh, later)
    assert down == [0.0] * 3  # /metrics says Redis is lost, on every replica


TIMEOUT_S = 2.0  # upstream.timeout_s
LOCK_TTL_S = TIMEOUT_S + 0.5  # docs/design.md §10: the lock outlives one upstream call
LOCK_TAKEN_BEFORE_S = 0.5  # the lock is taken a little before its holder's call reaches the upstream
TAKEOVER_SLACK_S = 2.5  # the second upstream call and the answer, on 2 shared cores


async def test_a_leader_killed_holding_the_lock_is_taken_over_once_the_lock_expires(
    replicas: StartReplicas, upstream: Upstream
) -> None:
    group = await replicas(upstream={"timeout_s": TIMEOUT_S})
    leader, follower, third = group
    upstream.seed("batch-orphan")
    gate = upstream.hold("retrieve", times=1)  # only the dead leader's call is held
    loop = asyncio.get_running_loop()
    led = asyncio.ensure_future(leader.retrieve("batch-orphan"))
    followed: asyncio.Future[Answer] | None = None
    try:
        async with asyncio.timeout(BOUND_S):
            await upstream.arrival("retrieve", 1)
            locked_at = loop.time()
            followed = pending = asyncio.ensure_future(follower.retrieve("batch-orphan"))

            async def in_flight() -> bool:  # the follower's request is in, settling its miss (or answered)
                return pending.done() or await follower.metric("gateway_singleflight_inflight") >= 1

            arrived = await poll_until(in_flight, 5)
            leader.process.proc.kill()
            await leader.process.proc.wait()
            calls_at_kill = upstream.count("retrieve")
            answer = await followed
            answered_after = loop.time() - locked_at
            later = await third.retrieve("batch-orphan")
            lost = (await asyncio.gather(led, return_exceptions=True))[0]
    finally:
        gate.set()
        for task in (led, followed):
            if task is not None and not task.done():
                task.cancel()

    assert arrived, "the second replica's request never reached it"
    assert batch_of(answer)["id"] == "batch-orphan"
    # It waited for the dead leader's lock (no call of its own meanwhile), then took over; not for ever.
    assert answered_after >= LOCK_TTL_S - LOCK_TAKEN_BEFORE_S, (
        f"answered {answered_after:.2f} s after the leader took the lock: it did not wait for the lock"
    )
    assert answered_after < LOCK_TTL_S + TAKEOVER_SLACK_S, f"answered {answered_after:.2f} s after the lock was taken"
    assert calls_at_kill == 1
    assert upstream.count("retrieve") == 2  # the dead leader's call, and one more
    assert (later.status, later.body) == (200, answer.body)  # the lock is not stuck: a hit, no third call
    assert isinstance(lost, httpx.HTTPError)  # the leader's own caller saw its process die
