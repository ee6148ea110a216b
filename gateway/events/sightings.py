"""Sightings from every answer (docs/design.md §12, "Events"), recorded off the request path.

Two sources feed the event log: the cache, each time it stores an answer
that differs from the one it held (a retrieve's miss, a refresh, a create's
answer put in the cache, the follower's retrieves; ``CacheHooks.on_stored``),
and the list route, with each batch of a page. Both only put the answer
in a bounded queue: the JSON is read, the owner looked up and the store
written by one task of this process, so a request never waits for the
event log, and a store that fails loses a sighting (logged, counted), never
a request. A later answer showing the same status records it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from gateway.cache.entry import CacheEntry
from gateway.errors import StoreUnavailable
from gateway.events.base import Event, EventLog, Kind, Sighting
from gateway.ops.event_metrics import EventMetrics
from gateway.ops.logs import log_event
from gateway.ops.tasks import cancel_and_wait
from gateway.records.base import Records, dataset_key
from gateway.upstream.cohere import TERMINAL_STATUSES, UNPARSEABLE, parse_timestamp

log = logging.getLogger("gateway.events")

DATASET_PREFIX = dataset_key("")
# Validation statuses that end a dataset's following (Cohere's DatasetValidationStatus).
FINAL_VALIDATION = frozenset({"validated", "failed", "skipped"})
# Sightings waiting to be recorded; past this, new ones are dropped (and counted).
MAX_QUEUED = 10_000
# The last active status recorded per subject, to skip repeats without a store call; cleared when this full.
MAX_REMEMBERED = 100_000
# How long the first sighting of a batch waits for others (events are seconds apart; this is not noticed).
GATHER_S = 0.05
# Sightings recorded together at most (one store transaction on SQLite).
BATCH = 1000
# A failing store is logged at most this often.
LOG_EVERY_S = 60.0

_Item = tuple[str, bytes] | dict[str, Any]


def batch_sighting(batch: object, owner: str | None) -> Sighting | None:
    """What a batch object shows; None if it has no id or status."""
    if not isinstance(batch, dict):
        return None
    subject, status = batch.get("id"), batch.get("status")
    if not isinstance(subject, str) or not isinstance(status, str) or not subject or not status:
        return None
    data = json.dumps(batch, separators=(",", ":"), ensure_ascii=False).encode()
    return Sighting(
        "batch", subject, status, status in TERMINAL_STATUSES, parse_timestamp(batch.get("updated_at")), owner, data
    )


def dataset_sighting(dataset: object, owner: str | None) -> Sighting | None:
    """What a dataset object shows, without its part URLs (they are signed and expire); None if unusable."""
    if not isinstance(dataset, dict):
        return None
    subject, status = dataset.get("id"), dataset.get("validation_status")
    if not isinstance(subject, str) or not isinstance(status, str) or not subject or not status:
        return None
    shown = dict(dataset)
    parts = shown.get("dataset_parts")
    if isinstance(parts, list):
        shown["dataset_parts"] = [
            {k: v for k, v in part.items() if k not in ("url", "original_url")} if isinstance(part, dict) else part
            for part in parts
        ]
    data = json.dumps(shown, separators=(",", ":"), ensure_ascii=False).encode()
    updated_at = parse_timestamp(dataset.get("updated_at"))
    return Sighting("dataset", subject, status, status in FINAL_VALIDATION, updated_at, owner, data)


class Sightings:
    """The queue of answers to record, and the one task that records them."""

    def __init__(self, events: EventLog, records: Records, metrics: EventMetrics) -> None:
        self.events = events
        self.records = records
        self.metrics = metrics
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last: dict[tuple[Kind, str], str] = {}
        self._logged_at = float("-inf")

    # --- the sources (on the event loop, never waiting) -------------------------------------------------------

    def stored(self, key: str, entry: CacheEntry) -> None:
        """``CacheHooks.on_stored``: an answer the cache now holds."""
        if entry.status == 200:
            self._put((key, entry.body))

    def page(self, batches: list[Any]) -> None:
        """The batches of a list page, as the upstream listed them."""
        for batch in batches:
            if isinstance(batch, dict):
                self._put(batch)

    def _put(self, item: _Item) -> None:
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.sightings_lost.labels("full").inc()

    # --- life -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._queue = asyncio.Queue(MAX_QUEUED)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Record what is queued (briefly), then stop."""
        task, queue = self._task, self._queue
        self._queue = None
        if task is None or queue is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await queue.join()
        await cancel_and_wait(task)

    async def drained(self) -> None:
        """Until every sighting queued so far is recorded (tests and the benchmark)."""
        if self._queue is not None:
            await self._queue.join()

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            items = [await queue.get()]
            # Sightings come in bursts (a miss, its refreshes, a list page): recorded a moment later and together,
            # they cost one store transaction, and no request waits behind a transaction per answer.
            await asyncio.sleep(GATHER_S)
            while len(items) < BATCH and not queue.empty():
                items.append(queue.get_nowait())
            try:
                await self._record(items)
            except Exception:  # one bad answer must not stop the recording of the others
                log.exception("recording sightings failed")
            finally:
                for _ in items:
                    queue.task_done()

    async def _record(self, items: list[_Item]) -> None:
        """What is queued, recorded together (a list page: one store transaction, not one per batch).

        The sightings of one subject go in turn, in the order they were seen; different subjects at once.
        """
        rounds: list[list[Sighting]] = []
        turns: dict[tuple[Kind, str], int] = {}
        # Each subject's status as this batch will leave it (a cache and a list may show the same answer twice).
        pending: dict[tuple[Kind, str], str] = {}
        for item in items:
            try:
                sighting = await self._sighting(item)
            except StoreUnavailable:
                # The owner could not be read: an event with a guessed owner would be hidden from its own
                # caller for good, so nothing is recorded; the next answer tries again.
                self._lost()
                continue
            if sighting is None:
                continue
            subject = (sighting.kind, sighting.subject)
            if pending.get(subject, self._last.get(subject)) == sighting.status:
                continue  # recorded already, or about to be: the same status again makes no event
            pending[subject] = sighting.status
            turn = turns[subject] = turns.get(subject, -1) + 1
            if turn == len(rounds):
                rounds.append([])
            rounds[turn].append(sighting)
        for batch in rounds:
            results = await asyncio.gather(*(self.events.record(s) for s in batch), return_exceptions=True)
            for sighting, result in zip(batch, results, strict=True):
                self._recorded(sighting, result)

    def _recorded(self, sighting: Sighting, result: Event | BaseException | None) -> None:
        if isinstance(result, StoreUnavailable):
            self._lost()
            return
        if isinstance(result, BaseException):
            log.error("recording a sighting failed", exc_info=result)
            return
        subject = (sighting.kind, sighting.subject)
        if sighting.final:
            # A final status is remembered by the log itself (it makes no event again), and the cache stores
            # a final answer about once a day: keeping it here too would cost memory for every cached entry.
            self._last.pop(subject, None)
        else:
            if len(self._last) >= MAX_REMEMBERED:
                self._last.clear()
            self._last[subject] = sighting.status
        if result is not None:
            self.metrics.events.labels(result.type).inc()

    async def _sighting(self, item: _Item) -> Sighting | None:
        if isinstance(item, dict):
            return batch_sighting(item, await self._owner(str(item.get("id"))))
        key, body = item
        try:
            document = json.loads(body)
        except UNPARSEABLE:
            return None
        if not isinstance(document, dict):
            return None
        if key.startswith(DATASET_PREFIX):
            return dataset_sighting(document.get("dataset"), await self._owner(key))
        return batch_sighting(document.get("batch"), await self._owner(key))

    async def _owner(self, key: str) -> str | None:
        known = self.records.known_owner(key)
        return known if known is not None else await self.records.owner_of(key)

    def _lost(self) -> None:
        self.metrics.sightings_lost.labels("store").inc()
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log_event(log, logging.WARNING, "the event log failed: a sighting was not recorded")
