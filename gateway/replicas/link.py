"""One process's link to the shared Redis (docs/design.md §10): bounded calls, a breaker, heartbeats, events.

Every Redis call goes through ``RedisLink.call``: it is bounded by
``redis.timeout_s`` and never retried (the client is built with no retries
of its own). The first call that fails marks Redis *lost*: from then on,
calls raise ``RedisDown`` at once, without touching the network, and each
shared function falls back to its local policy. A probe pings Redis every
``redis.probe_interval_s``; the first answer marks it *regained*. Lost and
regained are each logged once and counted in ``/metrics``. So a dead Redis
costs a request at most one timeout, and a stalled one (SIGSTOP) the same.

While Redis answers, the link also:

- **beats**: every ``HEARTBEAT_S`` each process notes itself alive in one
  sorted set (scored by Redis's clock), and learns how many processes were
  seen within ``ALIVE_HORIZON_S``. While Redis is lost, that last count
  divides the budget (``gateway.upstream.budget``).
- **carries events**: one pub/sub channel per key prefix, on which each
  process says what others must know at once (an answer stored, an id
  evicted, a pause). Messages name their sender, which ignores its own.
  Events missed while Redis was lost are not replayed: each process's
  entries then live out their own TTL (docs/operations.md, "Replicas").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import RedisSettings
from gateway.errors import RedisDown
from gateway.ops.logs import log_event
from gateway.ops.metrics import Metrics, RedisMetrics
from gateway.ops.tasks import cancel_and_wait

T = TypeVar("T")
log = logging.getLogger("gateway.redis")

HEARTBEAT_S = 1.0
# A refusal by Redis (out of memory, an ACL) is logged at most this often per operation.
REFUSAL_LOG_EVERY_S = 60.0
# Connections to Redis per process: each call holds one for well under a millisecond.
MAX_CONNECTIONS = 32
# A process not heard from for this long no longer counts as alive.
ALIVE_HORIZON_S = 3 * HEARTBEAT_S
# Errors that mean "Redis did not answer" (anything else from redis-py is a RedisError too).
_LINK_ERRORS = (RedisError, OSError, TimeoutError)

# Note this process alive, drop those not heard from, count the rest: one round trip, on Redis's clock.
_BEAT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"""

EventHandler = Callable[[str, str, bytes], None]
# The events on the channel (``gateway.replicas.shared_cache`` and ``shared_budget`` send them): an answer
# stored (payload: its ETag), an id evicted, a leader's failure (payload: the error), a leader gone with nothing
# stored, a 429 pause (payload: its seconds).
STORED, EVICTED, FAILED, RELEASED, PAUSED = "stored", "evicted", "failed", "released", "paused"


def new_process_id() -> str:
    """This process's name on the shared Redis: unique even across hosts and restarts."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


class RedisLink:
    """The Redis client of one process, behind a breaker (see the module's docstring)."""

    def __init__(
        self, settings: RedisSettings, metrics: Metrics, process_id: str | None = None, processes: int = 1
    ) -> None:
        url = settings.url_value
        assert url is not None, "RedisLink needs redis.url"
        self.settings = settings
        self.prefix = settings.key_prefix
        self.process_id = process_id or new_process_id()
        # A bounded pool: a burst of calls queues for a connection (within the call's
        # timeout) rather than opening hundreds at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=None,  # each call is bounded by redis.timeout_s instead
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s,
            retry=Retry(NoBackoff(), 0),  # no retries of its own: one timeout at most per call
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self.metrics: RedisMetrics = metrics.track_redis()
        self.up = True
        # Processes last seen alive, this one included. Until a heartbeat says, at least
        # those this one knows of (its fellow workers): a start while Redis is down
        # must not take the whole budget in each of them.
        self.alive = processes
        self._refusals_logged: dict[str, float] = {}
        self.on_lost: list[Callable[[], None]] = []
        self.on_regained: list[Callable[[], None]] = []
        self._handlers: list[EventHandler] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None
        self._verifying: asyncio.Task[None] | None = None
        self._epoch = 0  # regains so far
        self._regained = asyncio.Event()
        self._closing = False
        self.metrics.up.set(1)
        self.metrics.processes.set_function(lambda: self.alive)
        self._beat = self.client.register_script(_BEAT)

    @property
    def usable(self) -> bool:
        """Whether a call would be tried now (not lost, and no failed call being checked)."""
        return self.up and self._verifying is None

    def key(self, *parts: str) -> str:
        """A key under ``redis.key_prefix``: several gateways may share one Redis."""
        return self.prefix + ":".join(parts)

    @property
    def channel(self) -> str:
        return self.key("events")

    # --- life -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, and start beating and listening; a Redis that is down now is probed, never fatal."""
        with contextlib.suppress(RedisDown):
            await self.call("ping", lambda r: r.ping())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeats()), loop.create_task(self._listen())]

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._tasks, *(t for t in (self._probe, self._verifying) if t is not None)]
        # A cancel can be lost inside redis-py on Python 3.11: its asyncio.wait_for returns a result that
        # raced the cancel and never raises it, and later timeouts read as Redis's. So the loops also end
        # on _closing, within HEARTBEAT_S; without that, a stop could wait on them for ever.
        for task in tasks:
            task.cancel()
        for task in tasks:
            await cancel_and_wait(task)
        with contextlib.suppress(*_LINK_ERRORS):
            # Leave the alive set now rather than in ALIVE_HORIZON_S: the others' shares grow at once.
            async with asyncio.timeout(self.settings.timeout_s):
                await self.client.zrem(self.key("alive"), self.process_id)
        await self.client.aclose()

    # --- calls ----------------------------------------------------------------

    async def call(self, operation: str, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one Redis call within ``redis.timeout_s``; RedisDown if Redis is lost or this call fails.

        ``operation`` names the call in metrics and logs (a small fixed set).
        """
        if not self.usable:
            # Lost, or a call just timed out and a ping is checking: a request that met
            # one timeout must not meet another before the ping says Redis is there.
            self.metrics.skipped.labels(operation).inc()
            raise RedisDown(operation)
        epoch = self._epoch
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await command(self.client)
        except ResponseError as exc:
            # Redis answered, with an error (out of memory, a script's error): it is
            # there, so only this call fails; the operation falls back as for an outage.
            self.metrics.errors.labels(operation).inc()
            self._log_refusal(operation, exc)
            raise RedisDown(operation) from exc
        except _LINK_ERRORS as exc:
            self.metrics.errors.labels(operation).inc()
            if epoch == self._epoch:  # a call from before Redis was regained says nothing of it now
                self._suspect(operation, exc)
            raise RedisDown(operation) from exc

    def _log_refusal(self, operation: str, exc: ResponseError) -> None:
        # Out of memory refuses every write: once a minute per operation is enough to see it.
        now = time.monotonic()
        if now - self._refusals_logged.get(operation, float("-inf")) >= REFUSAL_LOG_EVERY_S:
            self._refusals_logged[operation] = now
            log_event(log, logging.WARNING, "redis refused a call", operation=operation, reason=str(exc)[:200])

    def _suspect(self, operation: str, exc: BaseException) -> None:
        """One call failed: Redis is lost unless a ping on a fresh connection answers at once.

        A burst of calls that each open a connection can outlast the timeout
        on a busy process while Redis itself is fine; that must not cost the
        replicas their sharing until the next probe.
        """
        if self._verifying is not None or not self.up:
            return
        if not isinstance(exc, TimeoutError | RedisTimeoutError):
            self.lost(operation, exc)  # refused or reset: no need to ask again
            return

        async def verify() -> None:
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    await self.client.ping()
            except _LINK_ERRORS:
                self.lost(operation, exc)
            finally:
                self._verifying = None

        self._verifying = asyncio.get_running_loop().create_task(verify())

    def lost(self, operation: str, exc: BaseException | None = None) -> None:
        """Mark Redis lost (logged once per outage) and start probing for it."""
        if not self.up or self._closing:
            return
        self.up = False
        self._regained.clear()
        self.metrics.up.set(0)
        self.metrics.transitions.labels("lost").inc()
        reason = type(exc).__name__ if exc is not None else "unknown"
        log_event(
            log,
            logging.WARNING,
            "redis lost: serving from each process's memory and budget share",
            operation=operation,
            reason=reason,
            processes=self.alive,
        )
        for listener in self.on_lost:
            listener()
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_regained())

    async def _probe_until_regained(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.probe_interval_s)
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    # Connections opened before the outage are dead (a restarted Redis) or
                    # out of step (one that stalled mid-answer): start afresh, or each would
                    # fail once more and mark Redis lost again.
                    await self.client.connection_pool.disconnect(inuse_connections=False)
                    await self.client.ping()
            except _LINK_ERRORS:
                continue
            self.up = True
            self._epoch += 1
            self.metrics.up.set(1)
            self.metrics.transitions.labels("regained").inc()
            log_event(log, logging.INFO, "redis regained: sharing cache, budget and records again")
            self._regained.set()
            for listener in self.on_regained:
                listener()
            return

    async def until_up(self) -> None:
        """Until a call would be tried: Redis regained, and no failed call being checked."""
        verifying = self._verifying
        if verifying is not None:
            await asyncio.wait({verifying})
        if not self.up:
            await self._regained.wait()

    def in_background(self, work: Awaitable[None]) -> None:
        """Run ``work`` without holding up a request; Redis being lost only loses it."""

        async def quietly() -> None:
            with contextlib.suppress(RedisDown):
                await work

        task = asyncio.ensure_future(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- heartbeats -------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while not self._closing:
            with contextlib.suppress(RedisDown):
                count = await self.call(
                    "heartbeat",
                    lambda r: self._beat(
                        keys=[self.key("alive")], args=[self.process_id, int(ALIVE_HORIZON_S * 1000)], client=r
                    ),
                )
                self.alive = max(1, int(count))
            await asyncio.sleep(HEARTBEAT_S)

    # --- events -----------------------------------------------------------------

    def subscribe(self, handler: EventHandler) -> None:
        """Call ``handler(kind, batch_id, payload)`` for every event another process publishes."""
        self._handlers.append(handler)

    async def publish(self, kind: str, batch_id: str, payload: bytes = b"") -> None:
        """Tell every other process (best effort: lost with Redis, and then not replayed)."""
        message = b" ".join((kind.encode(), self.process_id.encode(), batch_id.encode())) + b"\n" + payload
        with contextlib.suppress(RedisDown):
            await self.call("publish", lambda r: r.publish(self.channel, message))

    async def _listen(self) -> None:
        """Read the events channel on a connection of its own; re-subscribe after each outage."""
        while not self._closing:
            await self.until_up()
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    await pubsub.subscribe(self.channel)
                while self.up and not self._closing:
                    message = await pubsub.get_message(timeout=HEARTBEAT_S)
                    if message is not None:
                        self._dispatch(message.get("data"))
            except ResponseError as exc:
                # Redis is there but will not let this process subscribe (an ACL): events
                # are not shared until it does; that is no outage of everything else.
                self.metrics.errors.labels("subscribe").inc()
                self._log_refusal("subscribe", exc)
                await asyncio.sleep(REFUSAL_LOG_EVERY_S)
            except _LINK_ERRORS as exc:
                self.metrics.errors.labels("subscribe").inc()
                self.lost("subscribe", exc)
            finally:
                with contextlib.suppress(*_LINK_ERRORS):
                    async with asyncio.timeout(self.settings.timeout_s):
                        await _closer(pubsub)()

    def _dispatch(self, data: Any) -> None:
        if not isinstance(data, bytes):
            return
        head, _, payload = data.partition(b"\n")
        parts = head.decode("utf-8", "replace").split(" ")
        if len(parts) != 3 or parts[1] == self.process_id:
            return
        kind, _sender, batch_id = parts
        for handler in self._handlers:
            try:
                handler(kind, batch_id, payload)
            except Exception:  # one bad handler must not stop the listener
                log.exception("redis event handler failed")


def _closer(pubsub: aioredis.client.PubSub) -> Callable[[], Awaitable[None]]:
    """``pubsub.aclose``, typed here whether or not the installed redis-py annotates it
    (8.2 does, earlier releases did not), so that mypy passes on both."""
    close: Callable[[], Awaitable[None]] = pubsub.aclose
    return close
