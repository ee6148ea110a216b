"""Refreshes for waited batches, and freshness that follows the upstream budget (docs/design.md §9).

``Waiters`` (``gateway.cache.waiting``) holds the requests that asked
``Prefer: wait=N``: each waits on one future, settled when its batch's answer
changes (``changed``), when its time is up, when its client goes away, or
when the gateway stops (``release_all``). A thousand waiters on one batch
cost one future each, and the upstream nothing more.

``Refresher`` makes waiting cost no upstream calls of its own: while a
batch has waiters, it refreshes the batch itself every
``cache.ttl_s.active_min`` (stretched, below), through the cache's
single-flight and under the budget. A refresh whose body changed wakes
every waiter, through the cache's ``on_change``.

``Freshness`` spreads the budget evenly over the active batches being
followed. It knows which active batches were refreshed lately (polled or
waited on) and how many have waiters, and tells the cache how far every
active interval must stretch so that their refreshes fit in
``REFRESH_SHARE`` of the budget. Intervals stretch together, never past
``cache.ttl_s.active_max``; a terminal batch leaves the count at once, so
what it saved goes to the batches still running. The rest of the budget
is left to new ids and writes: refreshes of an answer the gateway already
holds never take the last tokens (``gateway.upstream.budget``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from gateway import errors
from gateway.cache.batch_cache import BatchCache, Fetch
from gateway.cache.entry import CacheEntry
from gateway.cache.waiting import Waiters
from gateway.config import TtlSettings
from gateway.ops.logs import log_event
from gateway.ops.tasks import cancel_and_wait
from gateway.upstream.cohere import batches_of, parse_timestamp
from gateway.upstream.guards import Clock

log = logging.getLogger("gateway")

# The share of the upstream budget that refreshes of known active batches may plan on.
REFRESH_SHARE = 0.75
# From this many waited batches on, one list call per interval looks for their changes.
DETECT_FROM = 3
MIN_LIST_PAGE, MAX_LIST_PAGE = 100, 1000


class Freshness:
    """Which active batches are being followed, and how far their refresh intervals must stretch."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        # Active batches by the time of their last upstream answer, oldest first.
        self._active: OrderedDict[str, float] = OrderedDict()

    def note_active(self, batch_id: str) -> None:
        self._active[batch_id] = self._clock()
        self._active.move_to_end(batch_id)

    def forget(self, batch_id: str) -> None:
        """A terminal batch costs nothing more."""
        self._active.pop(batch_id, None)

    def followed(self, ttl: TtlSettings) -> int:
        """Active batches answered within the longest interval: those still polled or waited on."""
        horizon = self._clock() - ttl.active_max
        while self._active:
            batch_id, seen = next(iter(self._active.items()))
            if seen >= horizon:
                break
            del self._active[batch_id]
        return len(self._active)

    def stretch(self, ttl: TtlSettings, rate_per_s: float, waited: int) -> float:
        """The factor (at least 1) by which every active interval must grow to fit the budget."""
        followed = self.followed(ttl)
        polled = max(0, followed - waited)
        wanted_per_s = polled / ttl.active + waited / ttl.active_min
        return max(1.0, wanted_per_s / (REFRESH_SHARE * rate_per_s))


# What a list call answers: the page's document (``{"batches": [...], ...}``).
ListPage = Callable[[int], Awaitable[dict[str, Any]]]


class Refresher:
    """While a batch has waiters, the gateway refreshes it itself (see the module's docstring).

    One scheduler for every waited batch: it always takes the one whose
    answer (or last try) is oldest, so no batch is refreshed again while
    another is overdue. When the budget has no token for a refresh
    (``budget_wait_s``), the scheduler waits for one with the oldest still
    first in line, rather than passing it by.

    With ``DETECT_FROM`` waited batches or more, one list call
    (``order_by=updated_at``) per interval stands in for a refresh of each:
    every waited batch on the page whose ``updated_at`` or status differs
    from the answer held is fetched at once; one that matches counts as
    looked at. No watermark is kept, so neither equal timestamps across
    batches nor late updates can hide a change: each batch is compared with
    its own answer. A batch the page does not show is refreshed on its own,
    as before; a change that leaves both ``updated_at`` and status as they
    were is caught by a refresh of each listed batch every
    ``ttl_s.active_max``. The upstream does not document the list's sort
    direction: a page that comes back oldest first shows the batches least
    likely to have changed, so the detector stops, and every batch is
    refreshed on its own again.
    """

    def __init__(
        self,
        cache: BatchCache,
        waiters: Waiters,
        clock: Clock,
        budget_wait_s: Callable[[], float],
        flight_wait_s: Callable[[], float],
    ) -> None:
        self._cache = cache
        self._waiters = waiters
        self._clock = clock
        self._budget_wait_s = budget_wait_s
        # Asked at each refresh, as the fetchers read the upstream settings in force then (docs/design.md §7).
        self._flight_wait_s = flight_wait_s
        self._fetchers: dict[str, Callable[[], Fetch]] = {}
        self._tried_at: dict[str, float] = {}
        # When each waited batch was last seen unchanged on a list page.
        self._listed_at: dict[str, float] = {}
        self._in_flight: set[str] = set()
        # The waited keys that are batches (the list's change detection can see them).
        self._listed_keys: set[str] = set()
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._list_page: ListPage | None = None
        self._last_list = float("-inf")
        # When the latest list page that came back was asked for.
        self._latest_page = float("-inf")
        self._listing = False
        self.detecting = True  # False once the list came back oldest first
        # The latest page listed and when: the follower reads it rather than list again (gateway.events.follower).
        self.latest_page: tuple[float, list[dict[str, Any]]] | None = None

    @property
    def batches(self) -> int:
        """Calls per refresh interval that the waited batches need: one list stands in for those it shows."""
        listed = sum(1 for b in self._fetchers if self._covered(b))
        return len(self._fetchers) - listed + (1 if self._detector_on() else 0)

    def follow(self, batch_id: str, fetch: Callable[[], Fetch], list_page: ListPage | None) -> None:
        """Refresh ``batch_id`` while it has waiters; ``fetch()`` makes each refresh's upstream call.

        Both are kept across reloads: they must read the upstream settings when they call, not hold them.
        ``list_page`` is None for a key that is not a batch (a dataset's): no batch list shows it.
        """
        self._fetchers.setdefault(batch_id, fetch)
        if list_page is not None:
            self._listed_keys.add(batch_id)
            self._list_page = list_page
        self._woken.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._schedule())

    def _interval(self) -> float:
        return self._cache.active_interval_s(self._cache.settings.ttl_s.active_min)

    def _detector_on(self) -> bool:
        return self.detecting and len(self._listed_keys) >= DETECT_FROM and self._list_page is not None

    def _covered(self, batch_id: str) -> bool:
        """Seen unchanged on the latest list page: the list looks after it."""
        return self._detector_on() and self._listed_at.get(batch_id) == self._latest_page

    def _next(self) -> tuple[str, float] | None:
        """The waited batch whose answer (or last try) is oldest, and the seconds until it is due."""
        for batch_id in [b for b in self._fetchers if not self._waiters.held_for(b)]:
            del self._fetchers[batch_id]
            self._tried_at.pop(batch_id, None)
            self._listed_at.pop(batch_id, None)
            self._listed_keys.discard(batch_id)
        candidates = [b for b in self._fetchers if b not in self._in_flight]
        if not candidates:
            return None
        now, interval = self._clock(), self._interval()
        safety = self._cache.settings.ttl_s.active_max

        def due_at(batch_id: str) -> float:
            held = self._cache.store.get(batch_id)
            answered = held.fetched_at if held is not None else now - interval
            last_look = max(answered, self._tried_at.get(batch_id, answered))
            return last_look + (safety if self._covered(batch_id) else interval)

        first = min(candidates, key=due_at)
        return first, due_at(first) - now

    async def _schedule(self) -> None:
        while self._fetchers and not self._waiters.stopping:
            self._woken.clear()
            if self._detector_on() and not self._listing:
                list_due = self._last_list + self._interval() - self._clock()
                if list_due <= 0 and not self._budget_wait_s():
                    self._start_list()
                    continue
            else:
                list_due = None
            chosen = self._next()
            wait = None if chosen is None else chosen[1]
            if wait is not None and wait <= 0:
                wait = self._budget_wait_s() or None
                if wait is None:
                    assert chosen is not None
                    self._start(chosen[0])
                    continue
            if list_due is not None:
                wait = list_due if wait is None else min(wait, list_due)
            # Until the next is due (or a token is), a new batch is followed, or a call ends.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), None if wait is None else max(wait, 0.01))

    def _start(self, batch_id: str) -> None:
        self._in_flight.add(batch_id)
        self._tried_at[batch_id] = self._clock()
        call = asyncio.ensure_future(self._cache.refresh(batch_id, self._fetchers[batch_id](), self._flight_wait_s()))
        call.add_done_callback(partial(self._refreshed, batch_id))

    def _refreshed(self, batch_id: str, call: asyncio.Future[CacheEntry]) -> None:
        self._in_flight.discard(batch_id)
        self._woken.set()
        if not call.cancelled() and (error := call.exception()) is not None:
            # Refused or failed: the waiters keep what they hold; tried again an interval later.
            code = error.code if isinstance(error, errors.GatewayError) else type(error).__name__
            log_event(log, logging.DEBUG, "refresh for waiters failed", batch_id=batch_id, code=code)

    def _start_list(self) -> None:
        assert self._list_page is not None
        self._listing = True
        self._last_list = self._clock()
        page_size = min(MAX_LIST_PAGE, max(MIN_LIST_PAGE, 4 * len(self._listed_keys)))
        call = asyncio.ensure_future(self._list_page(page_size))
        call.add_done_callback(partial(self._listed, self._last_list))

    def _listed(self, listed_at: float, call: asyncio.Future[dict[str, Any]]) -> None:
        self._listing = False
        self._woken.set()
        if call.cancelled():
            return
        if (error := call.exception()) is not None:
            code = error.code if isinstance(error, errors.GatewayError) else type(error).__name__
            log_event(log, logging.DEBUG, "change detection by list failed", code=code)
            return
        self._read_page(call.result(), listed_at)

    def listed_elsewhere(self, document: dict[str, Any], listed_at: float) -> None:
        """The follower listed (gateway.events.follower): its page stands in for this interval's own list."""
        self._last_list = max(self._last_list, listed_at)
        if self._detector_on() and not self._listing:
            self._read_page(document, listed_at)

    def _read_page(self, document: dict[str, Any], listed_at: float) -> None:
        self._latest_page = listed_at
        batches = [b for b in batches_of(document) if isinstance(b, dict) and isinstance(b.get("id"), str)]
        self.latest_page = (listed_at, batches)  # the follower's too, while it is recent
        stamps = [parse_timestamp(b.get("updated_at")) for b in batches]
        known = [t for t in stamps if t is not None]
        if len(known) >= 2 and known[0] < known[-1]:
            self.detecting = False
            log_event(log, logging.WARNING, "the upstream lists batches oldest first; each waited batch is refreshed")
            return
        for batch, stamp in zip(batches, stamps, strict=True):
            batch_id = batch["id"]
            if batch_id not in self._fetchers or batch_id in self._in_flight or stamp is None:
                continue
            if self._unchanged(batch_id, batch, stamp):
                self._listed_at[batch_id] = listed_at
            else:
                self._listed_at.pop(batch_id, None)
                self._start(batch_id)

    def _unchanged(self, batch_id: str, listed: dict[str, Any], stamp: float) -> bool:
        held = self._cache.store.get(batch_id)
        if held is None or held.status != 200 or held.updated_at is None:
            return False
        return stamp <= held.updated_at and listed.get("status") == status_of(held.body)

    async def close(self) -> None:
        await cancel_and_wait(self._task)


def status_of(body: bytes) -> object:
    """The ``status`` of a held batch answer."""
    try:
        return json.loads(body)["batch"].get("status")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
