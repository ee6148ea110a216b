"""The one upstream client: build the request, spend budget, retry, map the answer.

Order of guards for every fetch: the upstream's own pause (after a 429, or a
503 with ``Retry-After``), the circuit breaker, then the budget (a token per
HTTP call, retries included). The whole fetch, retries and budget waits
included, runs inside ``upstream.timeout_s``.

Every call of the batch API goes through ``fetch``: retrieve, list, create
and cancel. Each says what answer it accepts (``Accept``); everything else
becomes the contract's error in one place. Writes (create, cancel) come
first for the budget: they may wait for it up to the deadline, and while
one waits, reads take no token. A create is never retried once a byte of
it may have reached the upstream (docs/design.md §8); only a failed connect is.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp

from gateway import __version__, errors
from gateway._aiohttp import turn_off_silent_resend
from gateway.config import UpstreamSettings
from gateway.ops.metrics import Metrics
from gateway.upstream.budget import SharedBudget, UpstreamBudget
from gateway.upstream.cohere import error_for_status, now_utc, parse_retry_after
from gateway.upstream.guards import Admission, CircuitBreaker, Clock

USER_AGENT = f"cohere-gateway/{__version__}"
# Caller headers that describe the calling SDK and are safe to pass on.
# Everything else the caller sent (cookies, credentials, X-Client-Name,
# hop-by-hop headers) stays at the gateway.
FORWARDED_CALLER_HEADERS = ("X-Fern-Language", "X-Fern-SDK-Name", "X-Fern-SDK-Version")
RETRYABLE_STATUSES = frozenset({502, 503, 504})
READ_CHUNK = 65536
BATCHES_PATH = "/v2/batches"
# A request waiting on another's fetch gives up a little after that fetch's own deadline would have fired.
FLIGHT_MARGIN_S = 1.0

R = TypeVar("R")
# What a call accepts as its answer: the value for a status and body it
# understands, else None (the answer then becomes the contract's error).
# It may raise UpstreamInvalidResponse for a 2xx it cannot use.
Accept = Callable[[int, bytes], R | None]


@dataclass(slots=True)
class RequestTrace:
    """What the access log reports of the upstream call a request led.

    ``outcome_unknown`` is set while an HTTP call may have reached the
    upstream without its answer being read: a timeout or a connection lost
    after connecting. A create that ends so may have made a batch.
    """

    upstream_status: int | None = None
    upstream_ms: float | None = None
    outcome_unknown: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One call of the batch API, built from the config and validated parts only."""

    path: str
    caller_name: str
    request_id: str
    caller_headers: tuple[tuple[str, str], ...] = ()
    trace: RequestTrace = field(default_factory=RequestTrace)
    method: str = "GET"
    query: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    # False for a create: a second try could make a second batch.
    retry_after_sending: bool = True
    # Creates and cancels: first in line for the budget.
    write: bool = False


def batch_path(batch_id: str) -> str:
    """The upstream path of one batch; ``batch_id`` is already validated."""
    return f"{BATCHES_PATH}/{batch_id}"


@dataclass(slots=True)
class CallTally:
    """What one fetch has done so far: its deadline (loop time), HTTP calls made, and
    whether the last answer showed a healthy upstream (``None``: no answer yet)."""

    deadline: float
    calls: int = 0
    healthy: bool | None = None


class _Retryable(Exception):
    """An attempt failed in a way that another attempt may fix."""

    def __init__(self, error: errors.GatewayError) -> None:
        self.error = error


def call_headers(request: UpstreamRequest, settings: UpstreamSettings) -> dict[str, str]:
    """The upstream call's headers: the token in force, who asks, and the SDK headers passed on."""
    headers = {
        "Authorization": f"Bearer {settings.token_value}",
        "X-Client-Name": request.caller_name,
        "X-Request-ID": request.request_id,
        **dict(request.caller_headers),
    }
    if request.body is not None:
        headers["Content-Type"] = "application/json"
    return headers


class UpstreamClient:
    """Owns the ``ClientSession`` and the guards that keep upstream calls in check."""

    def __init__(
        self,
        settings: UpstreamSettings,
        metrics: Metrics,
        clock: Clock = time.monotonic,
        jitter: Callable[[float, float], float] = random.uniform,
        shared: SharedBudget | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        # Draws a backoff in [low, high]; tests pin it to make retries deterministic.
        self.jitter = jitter
        # The budget and the pause; with ``shared``, one for every process, on Redis (docs/design.md §10).
        self.budget = UpstreamBudget(settings.rate_limit, metrics, clock, shared)
        self.breaker = CircuitBreaker(settings.breaker.failures, settings.breaker.cooldown_s, clock)
        self._session: aiohttp.ClientSession | None = None
        metrics.breaker_state.set_function(lambda: self.breaker.state.value)

    async def start(self) -> None:
        s = self.settings
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=s.max_connections),
            timeout=aiohttp.ClientTimeout(total=None, connect=s.connect_timeout_s),
            trust_env=False,  # never route the token through an environment proxy
            cookie_jar=aiohttp.DummyCookieJar(),  # upstream cookies must not leak between callers
            auto_decompress=True,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )
        # aiohttp silently resends an idempotent request once when the connection
        # drops: retries stay ours alone (gateway/_aiohttp.py says how).
        turn_off_silent_resend(self._session)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The one ``ClientSession``, for the streamed upload (``gateway.upstream.upload``)."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        return self._session

    @property
    def started(self) -> bool:
        return self._session is not None and not self._session.closed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def reconfigure(self, settings: UpstreamSettings) -> None:
        """Take a reloaded config; connection limits keep their start-up values."""
        self.settings = settings
        self.budget.reconfigure(settings.rate_limit)
        self.breaker.reconfigure(settings.breaker.failures, settings.breaker.cooldown_s)

    def flight_wait_s(self) -> float:
        """How long a request may wait on a fetch that another request leads, under the config in force."""
        return self.settings.timeout_s + FLIGHT_MARGIN_S

    async def fetch(self, request: UpstreamRequest, may_wait: bool, accept: Accept[R]) -> R:
        """One logical call, with the guards, retries and deadline; ``accept`` reads its answer.

        ``may_wait`` says whether to wait (briefly) for budget: a caller that
        has a stale entry to fall back on is better served by it at once.
        Every HTTP call reads the upstream settings in force when it is made
        (``self.settings``, which a reload replaces), never a copy the caller
        took earlier: a reload that rotates the token or moves ``base_url``
        reaches refreshes and retries too (docs/design.md §7). The deadline is the
        one in force when the fetch began.
        """
        settings = self.settings
        admission = self.admit()
        tally = CallTally(deadline=asyncio.get_running_loop().time() + settings.timeout_s)
        try:
            async with asyncio.timeout_at(tally.deadline):
                reply = await self._attempts(request, may_wait, accept, tally)
        except TimeoutError:
            self.judge(admission, tally, timed_out=True)
            raise errors.UpstreamTimeout(f"The upstream did not answer within {settings.timeout_s:g} s.") from None
        except BaseException:
            self.judge(admission, tally)
            raise
        self.judge(admission, tally)
        return reply

    def admit(self) -> Admission:
        """Before any call: refused during the 429 pause, or while the breaker is open (failing fast)."""
        self.budget.check_paused()
        admission = self.breaker.admit()
        if not admission.admitted:
            self.metrics.upstream_rejected.labels("breaker_open").inc()
            raise errors.UpstreamUnavailable(
                "The upstream is failing; the gateway is failing fast.", retry_after_s=admission.wait_s
            )
        return admission

    def judge(self, admission: Admission, tally: CallTally, timed_out: bool = False) -> None:
        """Tell the breaker what this fetch learnt of the upstream's health.

        The last HTTP answer decides. A fetch that learnt nothing (refused for
        budget or a pause before any call, or cancelled) gives its probe slot
        back; a deadline that cut a call short counts as a failure.
        """
        healthy = False if timed_out and tally.calls else tally.healthy
        if healthy is None:
            self.breaker.abandon(admission)
        elif healthy:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()

    def backoff_s(self, settings: UpstreamSettings, retry: int) -> float:
        """Full jitter: a random wait up to an exponential cap (``retry`` counts from 1)."""
        return self.jitter(0.0, settings.retry_backoff_s * 2 ** (retry - 1))

    async def _attempts(self, request: UpstreamRequest, may_wait: bool, accept: Accept[R], tally: CallTally) -> R:
        loop = asyncio.get_running_loop()
        last: errors.GatewayError | None = None
        for attempt in itertools.count():
            if last is not None:
                if attempt > self.settings.retries:  # the retries allowed now: a reload may have changed them
                    raise last
                backoff = self.backoff_s(self.settings, attempt)
                if loop.time() + backoff >= tally.deadline:
                    raise last  # no time left for another try: report the real failure
                await asyncio.sleep(backoff)
            # Read again for each try: a reload during the last one (or its backoff) applies to this one.
            settings = self.settings
            try:
                self.budget.check_paused()  # another request may have been told to pause meanwhile
                await self.budget.spend(settings, may_wait or last is not None, request.write, tally.deadline)
                self.budget.check_paused()
            except (errors.RateLimited, errors.UpstreamRateLimited):
                if last is not None:
                    raise last from None  # a retry refused: report the real failure
                raise
            if last is not None:
                self.metrics.upstream_retries.inc()
            tally.calls += 1
            try:
                reply = await self._attempt(request, settings, accept, tally.deadline)
            except _Retryable as retryable:
                tally.healthy = False
                last = retryable.error
                continue
            except errors.UpstreamFailure as error:
                # A 429 is a healthy upstream saying "slow down"; any other failure is not.
                tally.healthy = error.upstream_status == 429
                raise
            except errors.GatewayError:
                tally.healthy = True  # an answer about the batch itself (400)
                raise
            tally.healthy = True
            return reply
        raise AssertionError("unreachable: itertools.count() never ends")

    async def _attempt(
        self, request: UpstreamRequest, settings: UpstreamSettings, accept: Accept[R], deadline: float
    ) -> R:
        """One HTTP call and what its answer means; ``_Retryable`` if another call may fix a failure."""
        status, body, retry_after = await self._send(request, settings, deadline)
        return self.interpret(request, status, body, retry_after, settings, accept)

    async def _send(
        self, request: UpstreamRequest, settings: UpstreamSettings, deadline: float
    ) -> tuple[int, bytes, str | None]:
        """The HTTP call (counted, timed and traced): status, capped body, ``Retry-After``; or an error."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        started = time.perf_counter()
        outcome = "unknown"
        trace = request.trace
        trace.outcome_unknown = True  # until an answer is read, or the connect is known to have failed
        try:
            async with self._session.request(
                request.method,
                f"{settings.base_url}{request.path}",
                params=request.query or None,
                data=request.body,
                headers=call_headers(request, settings),
                allow_redirects=False,
            ) as response:
                outcome = str(response.status)
                body = await self.read_capped(response, settings.max_body_bytes)
                retry_after = response.headers.get("Retry-After")
            trace.outcome_unknown = False
        except errors.GatewayError as error:
            outcome = error.code
            trace.outcome_unknown = False  # an answer came, too large to read
            raise
        except asyncio.CancelledError:
            # Cut short: by the fetch's deadline, or by the gateway shutting down.
            outcome = "upstream_timeout" if asyncio.get_running_loop().time() >= deadline else "cancelled"
            raise
        except aiohttp.ClientConnectorError as exc:
            # No connection: nothing was sent, so every call may be tried again.
            outcome = "upstream_unreachable"
            trace.outcome_unknown = False
            raise _Retryable(
                errors.UpstreamUnreachable(f"The upstream could not be reached ({type(exc).__name__}).")
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            outcome = "upstream_unreachable"
            lost = errors.UpstreamUnreachable(f"The upstream could not be reached ({type(exc).__name__}).")
            if not request.retry_after_sending:
                raise lost from None  # the request may have arrived: a create is not sent twice
            raise _Retryable(lost) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            outcome = "upstream_invalid_response"
            raise errors.UpstreamInvalidResponse(
                f"The upstream's answer was malformed ({type(exc).__name__})."
            ) from None
        except aiohttp.ClientError as exc:
            outcome = "upstream_error"
            raise errors.UpstreamError(f"The upstream call failed ({type(exc).__name__}).") from None
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.upstream_calls.labels(outcome).inc()
            self.metrics.upstream_seconds.observe(elapsed)
            trace.upstream_ms = round(elapsed * 1000, 2)
            trace.upstream_status = int(outcome) if outcome.isdigit() else None
        return response.status, body, retry_after

    def interpret(
        self,
        request: UpstreamRequest,
        status: int,
        body: bytes,
        retry_after: str | None,
        settings: UpstreamSettings,
        accept: Accept[R],
    ) -> R:
        accepted = accept(status, body)
        if accepted is not None:
            return accepted
        wait = None
        # The upstream said when to come back: every id waits that long, and
        # this call is not retried before then.
        told_when = status == 429 or (status == 503 and retry_after is not None)
        if told_when:
            asked = parse_retry_after(
                retry_after, now=now_utc(), default_s=settings.retry_after_default_s, max_s=settings.retry_after_max_s
            )
            wait = self.budget.pause(asked)
        elif status == 503:
            wait = settings.retry_after_default_s
        error = error_for_status(status, body, wait)
        if status in RETRYABLE_STATUSES and not told_when and request.retry_after_sending:
            raise _Retryable(error)
        raise error

    @staticmethod
    async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
        """Read the (decompressed) body, refusing it once it passes ``limit``."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise errors.UpstreamInvalidResponse(
                    f"The upstream's answer is larger than {limit} bytes.", upstream_status=response.status
                )
            chunks.append(chunk)
        return b"".join(chunks)
