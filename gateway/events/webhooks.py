"""Webhook deliveries (docs/design.md §12, "Webhooks"): each caller's events, in order, one at a time.

Each caller with ``callers[].webhook`` has a ``CallerDeliveries``: a task
that walks the event log from the caller's durable position
(``gateway.events.positions``). An event the caller may not see is passed
over; one it may see is POSTed (``gateway.events.webhook_send``) and tried
again after each wait of ``events.webhook_retry_s`` until a 2xx, or until
it is ``events.webhook_max_age_s`` old (then dropped, logged and counted).
The position moves after the 2xx, before the next event is sent: a crash
resends at most the event in flight. A 410 turns the webhook off until the
next reload, which resumes it where it stopped.

One caller's failing or slow receiver holds only that caller's task; every
task shares the limit of ``events.webhook_max_in_flight`` tries at once.
With replicas, a caller's task delivers only while its process holds the
lease ``webhook:{caller}`` (``gateway.replicas.lease``); when the holder
dies, the lease lapses and another process goes on from the stored position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial

import aiohttp

from gateway.config import CallerSettings, GatewayConfig
from gateway.config.features import WebhookSettings
from gateway.errors import StoreUnavailable
from gateway.events.base import Event, EventLog, encode_cursor, visible_to
from gateway.events.positions import Positions
from gateway.events.webhook_send import new_session, post, retry_wait, signed_headers
from gateway.ops.logs import log_event
from gateway.ops.tasks import cancel_and_wait
from gateway.ops.webhook_metrics import DELIVERED, DROPPED, GONE, WebhookMetrics
from gateway.replicas.lease import Lease
from gateway.replicas.link import RedisLink

log = logging.getLogger("gateway.webhooks")

# Events read from the log at once (each is still sent alone, in order).
READ_BATCH = 100
# The start waits at most this long for every webhook's position (a slow store must not hold the start up).
START_WAIT_S = 5.0
# After the store or Redis fails, a caller's task waits this long before it reads its position again.
PAUSE_S = 1.0


def lease_ttl_s(config: GatewayConfig) -> float:
    """Long enough that a try in flight (up to ``webhook_timeout_s``) never outlives the lease that allowed it."""
    return 3 * config.events.webhook_timeout_s + 1


class Shared:
    """What every caller's task uses: the log, the positions, the session, the limit on tries in flight."""

    def __init__(
        self,
        config: GatewayConfig,
        events: EventLog,
        positions: Positions,
        metrics: WebhookMetrics,
        link: RedisLink | None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.events = events
        self.positions = positions
        self.metrics = metrics
        self.link = link
        self.wall = wall
        self.slots, self.failing_slots = slots(config.events.webhook_max_in_flight)
        self.session: aiohttp.ClientSession | None = None


def slots(limit: int) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
    """Every try takes one of ``limit`` slots; a try to a receiver whose last try failed first takes one of half.

    A receiver that hangs holds its slot for ``webhook_timeout_s`` on every
    try, and is retried until the event's max age: however many such
    receivers there are, they hold at most half the slots, and callers whose
    receivers answer always find one.
    """
    return asyncio.Semaphore(limit), asyncio.Semaphore(max(1, limit // 2))


class CallerDeliveries:
    """One caller's webhook: its task, its position, whether it is off (a 410)."""

    def __init__(self, shared: Shared, caller: CallerSettings) -> None:
        assert caller.webhook is not None
        self.shared = shared
        self.caller = caller
        self.name = caller.name
        self.webhook: WebhookSettings = caller.webhook
        self.position: int | None = None  # None: read it from the store before going on
        self.off = False
        self.failing = False  # its last try failed: its next ones take a failing slot too
        self.stopping = False
        self.oldest_undelivered: float | None = None  # created_at of the event being tried, if any
        self.ttl_s = lease_ttl_s(shared.config)
        self.lease = Lease(shared.link, f"webhook:{self.name}", self.ttl_s)
        self._held_at = float("-inf")
        self._wake = asyncio.Event()
        # Set once this process knows where it stands: a position read, or another process holds the lease.
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._gauges()

    def _gauges(self) -> None:
        self.shared.metrics.lag.labels(self.name).set_function(self.lag_s)
        self.shared.metrics.off.labels(self.name).set(1 if self.off else 0)

    def lag_s(self) -> float:
        oldest = self.oldest_undelivered
        return 0.0 if oldest is None else max(0.0, self.shared.wall() - oldest)

    def start(self, after: asyncio.Task[None] | None = None) -> None:
        """Start delivering; ``after``: the stop of this caller's previous webhook (removed, then added again)."""
        self.task = asyncio.get_running_loop().create_task(self._run(after), name=f"webhook:{self.name}")

    def update(self, caller: CallerSettings) -> None:
        """A reload: the new settings apply from the next try; a webhook off after a 410 is on again.

        A retry wait is cut short only if the webhook's URL or secrets changed (or it was off): a reload
        that leaves it as it was (another caller's change) must not send every failing webhook's retry at once.
        """
        assert caller.webhook is not None
        changed = caller.webhook != self.webhook
        self.caller, self.webhook = caller, caller.webhook
        # A longer webhook_timeout_s needs a longer lease, so that a try never outlives the lease that allowed it:
        # renewed with the new TTL at the next check.
        ttl_s = lease_ttl_s(self.shared.config)
        if ttl_s != self.ttl_s:
            self.ttl_s = self.lease.ttl_s = ttl_s
            self._held_at = min(self._held_at, time.monotonic() - ttl_s / 3)
        if self.off:
            log_event(log, logging.INFO, "webhook on again after a reload", caller=self.name)
            changed = True
        self.off = False
        self.shared.metrics.off.labels(self.name).set(0)
        if changed:
            self._wake.set()  # a long retry wait is cut short: the new settings are tried now

    async def stop(self, forget: bool) -> None:
        self.stopping = True
        await cancel_and_wait(self.task)  # until it has ended: a cancellation can be lost in a Redis call
        with contextlib.suppress(Exception):
            await self.lease.release()
            if forget:  # removed from the config: a webhook added later starts at the newest event
                await self.shared.positions.forget(self.name)
        for gauge in (self.shared.metrics.lag, self.shared.metrics.off):
            with contextlib.suppress(KeyError):
                gauge.remove(self.name)

    # --- the task -------------------------------------------------------------------------------------------------

    async def _run(self, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await after  # its stop forgets the stored position and the gauges: not this webhook's
            self._gauges()
        while not self.stopping:
            try:
                await self._round()
            except StoreUnavailable:
                self.position = None  # read again once the store answers
                self.ready.set()  # the start does not wait for a store that fails
                await self._sleep(PAUSE_S)
            except Exception:
                log.exception("webhook deliveries failed; trying again", extra={"fields": {"caller": self.name}})
                self.position = None
                await self._sleep(PAUSE_S)

    async def _holding(self) -> bool:
        """Whether this process may deliver for the caller now (renewing the lease when it is a third gone).

        A lease not renewed for its whole TTL (a long wait for a slot) may have lapsed, and another process
        may have delivered meanwhile: held again, it goes on from the stored position, not from its own.
        """
        if self.stopping:
            return False
        now = time.monotonic()
        since = now - self._held_at
        if since < self.ttl_s / 3:
            return True
        if await self.lease.hold():
            self._held_at = now
            if since >= self.ttl_s and self.position is not None:
                return await self._not_overtaken(self.position)
            return True
        self._held_at = float("-inf")
        self.position = None  # another process delivers: its position, not ours, when the lease comes back
        self.oldest_undelivered = None
        return False

    async def _not_overtaken(self, position: int) -> bool:
        """False (the position to be read again) if another process moved the stored position past ``position``."""
        stored = await self.shared.positions.get(self.name, self.shared.events.log_id)
        if stored is None or stored <= position:
            return True
        log_event(log, logging.INFO, "webhook lease taken back; going on from the stored position", caller=self.name)
        self.position = None
        self.oldest_undelivered = None
        return False

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, cut short by a reload (since the last sleep): True if it was."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        woken = self._wake.is_set()
        self._wake.clear()
        return woken

    async def _round(self) -> None:
        if not await self._holding() or self.off:
            self.ready.set()
            await self._sleep(self.ttl_s / 3)
            return
        if self.position is None:
            self.position = await self._load_position()
            self.ready.set()
        events = await self.shared.events.read_after(self.position, READ_BATCH)
        if not events:
            self.oldest_undelivered = None
            await self.shared.events.wait_beyond(self.position, self.ttl_s / 3)
            return
        if events[0].seq > self.position + 1:
            self._pruned(self.position, events[0].seq)
        passed = None
        for event in events:
            if not await self._holding():
                return
            if not visible_to(self.caller, event):
                passed = self.position = event.seq
                continue
            if not await self._deliver(event):
                return
            passed = None
        if passed is not None:  # saves reading past them again after a restart
            await self.shared.positions.put(self.name, self.shared.events.log_id, passed)

    def _pruned(self, position: int, first: int) -> None:
        """Events after ``position`` were removed from the log (retention, max_events) before they were delivered."""
        log_id = self.shared.events.log_id
        gap = first - position - 1
        # Counted as dropped; some of them may have been events this caller may not see: "up to".
        self.shared.metrics.deliveries.labels(self.name, DROPPED).inc(gap)
        log_event(
            log, logging.WARNING, "webhook events removed from the log before they were delivered",
            caller=self.name, after=encode_cursor(log_id, position), up_to=gap, next=encode_cursor(log_id, first),
        )  # fmt: skip

    async def _load_position(self) -> int:
        log_id = self.shared.events.log_id
        position = await self.shared.positions.get(self.name, log_id)
        if position is None:
            position = (await self.shared.events.bounds())[1]  # a new webhook starts after the newest event
            await self.shared.positions.put(self.name, log_id, position)
        log_event(log, logging.INFO, "webhook delivering", caller=self.name, after=encode_cursor(log_id, position))
        return position

    async def _deliver(self, event: Event) -> bool:
        """Try ``event`` until a 2xx or its max age; False if the caller's task must stop for now (off, lease lost)."""
        shared, events = self.shared, self.shared.config.events
        self.oldest_undelivered = event.created_at
        event_id = encode_cursor(shared.events.log_id, event.seq)
        failures = 0
        while True:
            tried = await self._try(event, event_id)
            if tried is None:
                return False  # the lease passed to another process while this one waited for a slot
            outcome, status = tried
            self.failing = outcome not in (DELIVERED, GONE)
            shared.metrics.deliveries.labels(self.name, outcome).inc()
            if outcome == DELIVERED:
                break
            if outcome == GONE:
                self.off = True
                shared.metrics.off.labels(self.name).set(1)
                log_event(log, logging.WARNING, "webhook off: its receiver answered 410", caller=self.name, id=event_id)
                return False
            failures += 1
            wait = retry_wait(events.webhook_retry_s, failures)
            if shared.wall() + wait >= event.created_at + events.webhook_max_age_s:
                shared.metrics.deliveries.labels(self.name, DROPPED).inc()
                log_event(log, logging.WARNING, "webhook event dropped", caller=self.name, id=event_id, tries=failures)
                break
            log_event(
                log, logging.INFO, "webhook delivery failed; will retry", caller=self.name, id=event_id,
                outcome=outcome, status=status, retry_in_s=round(wait, 1),
            )  # fmt: skip
            if not await self._wait_holding(wait):
                return False
        await shared.positions.put(self.name, shared.events.log_id, event.seq)
        self.position = event.seq
        self.oldest_undelivered = None
        return True

    async def _try(self, event: Event, event_id: str) -> tuple[str, int | None] | None:
        """One POST of ``event``; None if this process no longer holds the caller's lease when its turn comes."""
        shared, webhook = self.shared, self.webhook
        session = shared.session
        assert session is not None
        async with contextlib.AsyncExitStack() as held:
            if self.failing:
                await held.enter_async_context(shared.failing_slots)
            await held.enter_async_context(shared.slots)
            # The wait for a slot may outlast the lease: another process may be delivering this caller's
            # events by now, and a late send from here would go out twice and out of order.
            if not await self._holding():
                return None
            headers = signed_headers(event_id, int(shared.wall()), event.payload, webhook.secret_values)
            return await post(session, webhook.url, event.payload, headers, shared.config.events.webhook_timeout_s)

    async def _wait_holding(self, seconds: float) -> bool:
        """Wait ``seconds`` (less after a reload), keeping the lease; False if it was lost meanwhile."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            woken = await self._sleep(min(left, self.ttl_s / 3))
            if not await self._holding():
                return False
            if woken:
                break
        return True


class Webhooks:
    """Every caller's deliveries: started with the app, changed by reloads, stopped with the app."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.callers: dict[str, CallerDeliveries] = {}
        # Removed webhooks being stopped, by caller (held: not collected; a caller added again waits for its stop).
        self._stopping: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Start every webhook; return once each knows its position, so that what the gateway relays from its
        first request on is delivered (a new webhook starts after the newest event *before* it serves)."""
        await self.shared.positions.start()
        self.shared.session = new_session(self.shared.config.events.webhook_max_in_flight)
        self.reconfigure(self.shared.config)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT_S):
                await asyncio.gather(*(deliveries.ready.wait() for deliveries in self.callers.values()))

    async def close(self) -> None:
        callers, self.callers = self.callers, {}
        stopping = list(self._stopping.values())
        await asyncio.gather(*(deliveries.stop(forget=False) for deliveries in callers.values()), *stopping)
        session, self.shared.session = self.shared.session, None
        if session is not None:
            await session.close()
        await self.shared.positions.close()

    def reconfigure(self, config: GatewayConfig) -> None:
        """Add, change and remove callers' webhooks; an unchanged one keeps its task and its position."""
        shared = self.shared
        if config.events.webhook_max_in_flight != shared.config.events.webhook_max_in_flight:
            # Tries in flight finish on the old limit; the next ones take the new.
            shared.slots, shared.failing_slots = slots(config.events.webhook_max_in_flight)
        shared.config = config
        if shared.session is None:
            return  # not started yet (or stopped): start() reads the config it is given by then
        wanted = {c.name: c for c in config.callers if c.webhook is not None}
        for name in [n for n in self.callers if n not in wanted]:
            deliveries = self.callers.pop(name)
            log_event(log, logging.INFO, "webhook removed", caller=name)
            task = self._stopping[name] = asyncio.get_running_loop().create_task(deliveries.stop(forget=True))
            task.add_done_callback(partial(self._stopped, name))
        for name, caller in wanted.items():
            known = self.callers.get(name)
            if known is not None:
                known.update(caller)
                continue
            added = self.callers[name] = CallerDeliveries(shared, caller)
            added.start(after=self._stopping.get(name))

    def _stopped(self, name: str, task: asyncio.Task[None]) -> None:
        if self._stopping.get(name) is task:
            del self._stopping[name]
