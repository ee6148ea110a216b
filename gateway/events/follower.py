"""The follower (docs/design.md §12, "Following"): every followed batch checked each interval, at a flat cost.

Every ``events.interval_s``, the process that holds the ``follower`` lease
(``gateway.replicas.lease``; without Redis, the one process) takes the ids
the event log still follows and makes ONE list call,
``GET /v2/batches?order_by=updated_at&page_size=1000``, as the change
detector. Each followed batch on the page is compared with the answer the
cache holds (``updated_at`` and ``status``, as the §9 refresher does):

- changed (or not held): the list entry is the batch's whole new state
  (Cohere's list answers hold complete batch objects), so it is stored as
  the batch's answer (``BatchCache.put``): the cache's hooks see it, and its
  event is recorded, with no retrieve. An entry that lacks what a retrieve
  holds is retrieved instead, through the cache's single-flight;
- unchanged: its cached answer is renewed (``BatchCache.renew``), so that a
  poller's next retrieve is a hit: following saves calls.

More pages are asked for only while a followed batch not yet shown may have
changed since its held answer (the page ends on entries newer than that
answer). A followed batch that the pages read show no trace of, and whose
held answer is older than every listed entry, is unchanged: renewed too.
What is left (a batch older than ``MAX_PAGES`` pages of newer ones, or
never held) is retrieved on its own, at most ``MAX_RETRIEVES`` a round.

The budget: every call goes through the upstream client as a refresh would
(it never waits for a token and leaves the reserve to new ids and writes).
The §9 refresher shares it: a page the refresher listed within the interval
stands in for the follower's own call when it shows every followed batch,
and the follower's page stands in for the refresher's next list
(``Refresher.listed_elsewhere``). ``calls_per_s`` is what following costs,
subtracted from the budget the refresher stretches intervals to fit.

Datasets being validated are followed too (no list call shows them): each
round retrieves the followed datasets (``GET /v1/datasets/{id}``) through
the cache, least recently checked first (each check is noted in the log,
``EventLog.checked``), at most ``MAX_RETRIEVES`` a round; one whose cached
answer is still fresh costs nothing. The answer stored makes its event, as
a caller's would. A dataset or batch that answers 404 (deleted, gone
upstream) is no longer followed (``EventLog.unfollow``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from gateway import errors
from gateway.cache.batch_cache import BatchCache
from gateway.cache.refresher import Refresher, status_of
from gateway.config.features import EventsSettings
from gateway.datasets.facts import accept_dataset, batch_naming_an_output, dataset_path
from gateway.events.base import EventLog
from gateway.ops.logs import log_event
from gateway.ops.tasks import cancel_and_wait
from gateway.ops.usage_metrics import UsageMetrics
from gateway.records.base import dataset_key
from gateway.replicas.lease import Lease
from gateway.upstream.answers import UpstreamReply, accept_batch, accept_json_object
from gateway.upstream.client import BATCHES_PATH, UpstreamClient, UpstreamRequest, batch_path
from gateway.upstream.cohere import batches_of, lifetime_of_status, new_request_id, parse_timestamp

log = logging.getLogger("gateway")

PAGE_SIZE = 1000
MAX_PAGES = 10
MAX_FOLLOWED = PAGE_SIZE * MAX_PAGES
MAX_RETRIEVES = 20
# Named upstream as the caller of the follower's own calls (X-Client-Name).
CLIENT_NAME = "cohere-gateway-follower"
# What a list entry holds when it is a batch's whole state, as a retrieve answers it (Cohere's Batch).
COMPLETE = ("id", "status", "updated_at", "name", "input_dataset_id", "model")
# Pages stop once past the last round's newest entry, less this (a late write shows up with an earlier stamp).
HORIZON_MARGIN_S = 60.0
# The lease lapses after this many intervals without a round: another process takes over.
LEASE_INTERVALS = 3.0
MIN_LEASE_S = 1.0

CheckDatasets = Callable[[list[str]], Awaitable[None]]
# What the gateway must note of batch objects before their answer is stored (gateway.api.dataset_scope's
# record_outputs: a finished batch's output dataset is its owner's, before any caller can read it from the cache).
BeforeStore = Callable[[list[Any]], Awaitable[None]]


async def _nothing_to_note(_batches: list[Any]) -> None:
    return None


def next_beat(last: float, interval_s: float, now: float) -> float:
    """When the round after the one due at ``last`` starts: the first beat of ``interval_s`` not yet past."""
    beat = last + interval_s
    if beat < now:  # the round overran: the beats it missed are skipped
        beat += math.ceil((now - beat) / interval_s) * interval_s
    return beat


class Follower:
    """One round per interval while this process holds the lease (see the module's docstring)."""

    def __init__(
        self,
        events: EventLog,
        cache: BatchCache,
        upstream: UpstreamClient,
        refresher: Refresher,
        lease: Callable[[float], Lease],
        settings: Callable[[], EventsSettings],
        metrics: UsageMetrics,
        clock: Callable[[], float] = time.monotonic,
        before_store: BeforeStore = _nothing_to_note,
    ) -> None:
        self._events = events
        self._before_store = before_store
        self._metrics = metrics
        self._cache = cache
        self._upstream = upstream
        self._refresher = refresher
        self._settings = settings
        self._clock = clock
        self._make_lease = lease
        self._lease: Lease | None = None
        self.check_datasets: CheckDatasets = self._check_datasets
        self._task: asyncio.Task[None] | None = None
        self.calls_last_round = 0
        self._calls = 0
        self.rounds = 0  # rounds made by this process, for tests and metrics
        # The last round's newest updated_at, less HORIZON_MARGIN_S (None: no round yet, as after a start).
        self._horizon: float | None = None
        self.leading = False

    @property
    def calls_per_s(self) -> float:
        """The upstream calls following takes per second (the last round's, over the interval)."""
        interval_s: float = self._settings().interval_s
        return self.calls_last_round / interval_s

    def start(self) -> None:
        # Its time to live is set at start: a reload's new interval_s does not move it.
        self._lease = self._make_lease(max(MIN_LEASE_S, LEASE_INTERVALS * self._settings().interval_s))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop following and give the lease up, so that another process takes over at once."""
        await cancel_and_wait(self._task)
        if self.leading and self._lease is not None:
            await self._lease.release()
            self.leading = False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:  # until the app stops (close); each round is bounded (pages, retrieves, timeouts)
            # Rounds start every interval_s, however long each takes: were the next one to wait a whole interval
            # after this one ends, each round would list later than the last, past the active TTL of the answers
            # the last one stored, and pollers would retrieve those first. A round on Redis takes longest (each
            # answer it stores is a Redis save), so replicas paid most. One that overran waits for the next beat:
            # started at once, rounds would follow each other without a pause (100,000 followed batches, ten
            # pages a round, kept the upstream and the gateway listing all the time).
            now = loop.time()
            next_at = next_beat(next_at, self._settings().interval_s, now)
            await asyncio.sleep(next_at - now)
            settings = self._settings()
            if not settings.enabled:
                continue
            assert self._lease is not None  # set by start()
            self.leading = await self._lease.hold()
            if not self.leading:
                continue  # another process follows, or Redis is lost: paused until it is back
            try:
                await self.round()
            except (errors.GatewayError, errors.RedisDown) as exc:
                # The store or the upstream failed this round: the next one tries again.
                code = exc.code if isinstance(exc, errors.GatewayError) else "redis_down"
                log_event(log, logging.INFO, "following paused for a round", code=code)
            except Exception:  # a bug must not end following for the life of the process
                log.exception("follower round failed")

    async def round(self) -> None:
        """Check every followed batch once (and hand the followed datasets on)."""
        self.rounds += 1
        self._calls = 0
        try:
            ids = await self._events.followed("batch", MAX_FOLLOWED)
            if ids:
                await self._check(set(ids))
            datasets = await self._events.followed("dataset", MAX_RETRIEVES)
            if datasets:
                await self.check_datasets(datasets)
                # Checked, changed or not: the next round takes the next least recently checked ones.
                await self._events.checked("dataset", datasets)
        finally:
            self.calls_last_round = self._calls

    async def _check(self, pending: set[str]) -> None:
        """Settle each of ``pending`` from list pages, then retrieve what they left."""
        heard = self._refresher.latest_page
        if heard is not None and self._clock() - heard[0] < self._settings().interval_s:
            # The refresher listed just now: its page may show all that this round needs.
            left = set(pending)
            oldest = await self._read(heard[1], heard[0], left)
            if not self._must_look_further(left, oldest):
                await self._leftovers(left, oldest)
                return
        token: str | None = None
        oldest = newest = None
        for _ in range(MAX_PAGES):
            listed_at = self._clock()
            document = await self._list(token)
            batches = [b for b in batches_of(document) if isinstance(b, dict) and isinstance(b.get("id"), str)]
            oldest = await self._read(batches, listed_at, pending)
            if token is None:
                # After this page's changes are stored: the refresher then finds its waited batches current.
                self._refresher.listed_elsewhere(document, listed_at)
                newest = max(
                    (t for b in batches if (t := parse_timestamp(b.get("updated_at"))) is not None), default=None
                )
            token = document.get("next_page_token") or None
            if not isinstance(token, str) or not batches or not self._must_look_further(pending, oldest):
                break
        await self._leftovers(pending, oldest)
        if newest is not None:
            self._horizon = newest - HORIZON_MARGIN_S

    async def _list(self, token: str | None) -> dict[str, Any]:
        query = [("order_by", "updated_at"), ("page_size", str(PAGE_SIZE))]
        if token is not None:
            query.append(("page_token", token))
        call = UpstreamRequest(BATCHES_PATH, CLIENT_NAME, new_request_id(), query=tuple(query))
        self._calls += 1
        self._metrics.follow_calls.labels("list").inc()
        # may_wait False: following is a refresh, and leaves the budget's reserve alone.
        return (await self._upstream.fetch(call, False, accept_json_object)).document

    async def _read(self, batches: list[dict[str, Any]], listed_at: float, pending: set[str]) -> float | None:
        """Settle the followed batches a page shows; the page's oldest ``updated_at`` (None: unknown)."""
        oldest: float | None = None
        for batch in batches:
            stamp = parse_timestamp(batch.get("updated_at"))
            if stamp is not None:
                oldest = stamp if oldest is None else min(oldest, stamp)
            batch_id = batch["id"]
            if batch_id not in pending:
                continue
            pending.discard(batch_id)
            if self._unchanged(batch_id, batch, stamp):
                await self._renew(batch_id, listed_at)
            elif all(batch.get(key) is not None for key in COMPLETE):
                await self._store(batch_id, batch, stamp)
            else:
                await self._retrieve(batch_id)
        return oldest

    def _unchanged(self, batch_id: str, listed: dict[str, Any], stamp: float | None) -> bool:
        held = self._cache.store.get(batch_id)
        if held is None or held.status != 200 or held.updated_at is None or stamp is None:
            return False
        return stamp <= held.updated_at and listed.get("status") == status_of(held.body)

    def _past_horizon(self, oldest: float | None) -> bool:
        """The pages reach back past the last round's newest entry: what changed since then is on them."""
        return self._horizon is not None and oldest is not None and oldest < self._horizon

    def _may_have_changed(self, batch_id: str, oldest: float | None) -> bool:
        """A followed batch the pages did not show: could it have changed unseen, past their oldest entry?"""
        held = self._cache.store.get(batch_id)
        if held is None or held.status != 200 or held.updated_at is None or oldest is None:
            return True
        # A change since the last round, or since its held answer, would put it on the pages read.
        return held.updated_at < oldest and not self._past_horizon(oldest)

    def _must_look_further(self, pending: set[str], oldest: float | None) -> bool:
        """Whether a next page may show a followed batch not yet seen. One held as a 404 (gone
        upstream) never does: it is left to the retrieves of ``_leftovers``, which are bounded."""

        def worth_a_page(batch_id: str) -> bool:
            held = self._cache.store.get(batch_id)
            return (held is None or held.status == 200) and self._may_have_changed(batch_id, oldest)

        return any(worth_a_page(batch_id) for batch_id in pending)

    async def _leftovers(self, pending: set[str], oldest: float | None) -> None:
        """Renew what the pages prove unchanged; retrieve (a few a round) what they cannot vouch for."""
        listed_at, retrieves = self._clock(), 0
        for batch_id in sorted(pending):
            if not self._may_have_changed(batch_id, oldest):
                await self._renew(batch_id, listed_at)
            elif retrieves < MAX_RETRIEVES:
                retrieves += 1
                await self._retrieve(batch_id)

    async def _renew(self, batch_id: str, listed_at: float) -> None:
        if await self._cache.renew(batch_id, listed_at):
            self._metrics.renewals.inc()

    async def _store(self, batch_id: str, batch: dict[str, Any], stamp: float | None) -> None:
        """The list entry is the new state: stored as the batch's answer, as a retrieve's would be."""
        body = json.dumps({"batch": batch}, separators=(",", ":")).encode()
        await self._before_store([batch])
        await self._cache.put(batch_id, UpstreamReply(200, body, lifetime_of_status(batch.get("status")), stamp))

    async def _check_datasets(self, dataset_ids: list[str]) -> None:
        """Each dataset being validated, through the cache: a fresh answer is a hit, else one retrieve."""
        for dataset_id in dataset_ids:
            call = UpstreamRequest(dataset_path(dataset_id), CLIENT_NAME, new_request_id())
            key = dataset_key(dataset_id)
            if self._cache.fresh(key) is None:
                self._calls += 1
                self._metrics.follow_calls.labels("retrieve").inc()
            try:
                found = await self._cache.get(key, partial(self._fetch_dataset, call), self._upstream.flight_wait_s())
            except errors.GatewayError as exc:
                log_event(log, logging.DEBUG, "follower dataset retrieve failed", dataset_id=dataset_id, code=exc.code)
                continue
            if found.entry.status == 404:
                await self._events.unfollow("dataset", dataset_id)  # deleted: it will never be validated

    async def _fetch_batch(self, call: UpstreamRequest, may_wait: bool) -> UpstreamReply:
        reply = await self._upstream.fetch(call, may_wait, accept_batch)
        if reply.status == 200 and (batch := batch_naming_an_output(reply.body)) is not None:
            await self._before_store([batch])
        return reply

    async def _fetch_dataset(self, call: UpstreamRequest, _may_wait: bool) -> UpstreamReply:
        # Never waits for a budget token, as every call of the follower.
        return await self._upstream.fetch(call, False, accept_dataset)

    async def _retrieve(self, batch_id: str) -> None:
        call = UpstreamRequest(batch_path(batch_id), CLIENT_NAME, new_request_id())
        self._calls += 1
        self._metrics.follow_calls.labels("retrieve").inc()
        try:
            entry = await self._cache.refresh(
                batch_id, partial(self._fetch_batch, call), self._upstream.flight_wait_s()
            )
        except errors.GatewayError as exc:
            # Refused for budget, or the upstream failed: tried again next round.
            log_event(log, logging.DEBUG, "follower retrieve failed", batch_id=batch_id, code=exc.code)
            return
        if entry.status == 404:
            await self._events.unfollow("batch", batch_id)  # gone upstream: retrieving it each round is waste
