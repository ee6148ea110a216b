"""The one upstream client: build the request, spend budget, retry, map the answer.

Order of guards for every fetch: the upstream's own pause (after a 429, or a
503 with ``Retry-After``), the circuit breaker, then the budget (a token per
HTTP call, retries included). The whole fetch, retries and budget waits
included, runs inside ``upstream.timeout_s``.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp

from gateway import errors
from gateway.cache import UpstreamReply
from gateway.config import UpstreamSettings
from gateway.metrics import Metrics
from gateway.protection import CircuitBreaker, Clock, TokenBucket
from gateway.protocol import Lifetime, error_for_status, now_utc, parse_batch_body, parse_retry_after

USER_AGENT = "cohere-gateway/0.1"
# Caller headers that describe the calling SDK and are safe to pass on.
# Everything else the caller sent (cookies, credentials, X-Client-Name,
# hop-by-hop headers) stays at the gateway.
FORWARDED_CALLER_HEADERS = ("X-Fern-Language", "X-Fern-SDK-Name", "X-Fern-SDK-Version")
RETRYABLE_STATUSES = frozenset({502, 503, 504})
READ_CHUNK = 65536


@dataclass(slots=True)
class RequestTrace:
    """What the access log reports of the upstream call a request led."""

    upstream_status: int | None = None
    upstream_ms: float | None = None


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """Who is asking for which batch; the id is already validated."""

    batch_id: str
    caller_name: str
    request_id: str
    caller_headers: tuple[tuple[str, str], ...] = ()
    trace: RequestTrace = field(default_factory=RequestTrace)


class _Retryable(Exception):
    """An attempt failed in a way that another attempt may fix."""

    def __init__(self, error: errors.GatewayError) -> None:
        self.error = error


class UpstreamClient:
    """Owns the ``ClientSession`` and the guards that keep upstream calls in check."""

    def __init__(self, settings: UpstreamSettings, metrics: Metrics, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.metrics = metrics
        self._clock = clock
        self.budget = TokenBucket(settings.rate_limit.requests_per_s, settings.rate_limit.burst, clock)
        self.breaker = CircuitBreaker(settings.breaker.failures, settings.breaker.cooldown_s, clock)
        self.paused_until = 0.0
        self._session: aiohttp.ClientSession | None = None
        metrics.budget_tokens.set_function(lambda: self.budget.tokens)
        metrics.breaker_state.set_function(lambda: self.breaker.state.value)
        metrics.paused_seconds.set_function(lambda: max(0.0, self.paused_until - self._clock()))

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

    @property
    def started(self) -> bool:
        return self._session is not None and not self._session.closed

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def reconfigure(self, settings: UpstreamSettings) -> None:
        """Take a reloaded config; connection limits keep their start-up values."""
        self.settings = settings
        self.budget.reconfigure(settings.rate_limit.requests_per_s, settings.rate_limit.burst)
        self.breaker.reconfigure(settings.breaker.failures, settings.breaker.cooldown_s)

    async def fetch(self, request: UpstreamRequest, settings: UpstreamSettings, may_wait: bool) -> UpstreamReply:
        """One logical fetch of a batch, with the guards, retries and deadline.

        ``may_wait`` says whether to wait (briefly) for budget: a caller that
        has a stale entry to fall back on is better served by it at once.
        """
        self._check_paused()
        wait = self.breaker.admit()
        if wait:
            self.metrics.upstream_rejected.labels("breaker_open").inc()
            raise errors.UpstreamUnavailable(
                "The upstream is failing; the gateway is failing fast.", retry_after_s=wait
            )
        try:
            async with asyncio.timeout(settings.timeout_s):
                reply = await self._attempts(request, settings, may_wait)
        except TimeoutError:
            self.breaker.record_failure()
            self.metrics.upstream_calls.labels("upstream_timeout").inc()
            raise errors.UpstreamTimeout(f"The upstream did not answer within {settings.timeout_s:g} s.") from None
        except (errors.RateLimited, errors.UpstreamRateLimited):
            self.breaker.record_neutral()
            raise
        except errors.GatewayError as error:
            if isinstance(error, errors.UpstreamFailure) and error.upstream_status != 429:
                self.breaker.record_failure()
            else:
                self.breaker.record_neutral()
            raise
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.record_success()
        return reply

    def _check_paused(self) -> None:
        remaining = self.paused_until - self._clock()
        if remaining > 0:
            self.metrics.upstream_rejected.labels("paused").inc()
            raise errors.UpstreamRateLimited(retry_after_s=remaining)

    def _pause(self, seconds: float) -> None:
        self.metrics.upstream_pauses.inc()
        self.paused_until = max(self.paused_until, self._clock() + seconds)

    async def _spend_budget(self, settings: UpstreamSettings, may_wait: bool) -> None:
        """Take a budget token, waiting at most ``budget_wait_s`` if allowed."""
        give_up_at = self._clock() + (settings.budget_wait_s if may_wait else 0.0)
        while (wait := self.budget.try_take()) > 0:
            if self._clock() + wait > give_up_at:
                self.metrics.upstream_rejected.labels("budget").inc()
                raise errors.RateLimited(retry_after_s=wait)
            await asyncio.sleep(wait)

    async def _attempts(self, request: UpstreamRequest, settings: UpstreamSettings, may_wait: bool) -> UpstreamReply:
        last: errors.GatewayError | None = None
        for attempt in range(settings.retries + 1):
            if last is not None:
                self.metrics.upstream_retries.inc()
                # Full jitter: a random wait up to an exponential cap.
                await asyncio.sleep(random.uniform(0, settings.retry_backoff_s * 2 ** (attempt - 1)))
                self._check_paused()
            try:
                await self._spend_budget(settings, may_wait or last is not None)
            except errors.RateLimited:
                if last is not None:
                    raise last from None  # out of budget for a retry: report the real failure
                raise
            try:
                return await self._attempt(request, settings)
            except _Retryable as retryable:
                last = retryable.error
        assert last is not None
        raise last

    async def _attempt(self, request: UpstreamRequest, settings: UpstreamSettings) -> UpstreamReply:
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        headers = {
            "Authorization": f"Bearer {settings.token_value}",
            "X-Client-Name": request.caller_name,
            "X-Request-ID": request.request_id,
            **dict(request.caller_headers),
        }
        url = f"{settings.base_url}/v2/batches/{request.batch_id}"
        started = time.perf_counter()
        outcome = "unknown"
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as response:
                outcome = str(response.status)
                body = await self._read_capped(response, settings.max_body_bytes)
                retry_after = response.headers.get("Retry-After")
        except errors.GatewayError as error:
            outcome = error.code
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            outcome = "upstream_unreachable"
            raise _Retryable(
                errors.UpstreamUnreachable(f"The upstream could not be reached ({type(exc).__name__}).")
            ) from None
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
            request.trace.upstream_ms = round(elapsed * 1000, 2)
            request.trace.upstream_status = int(outcome) if outcome.isdigit() else None
        return self._interpret(response.status, body, retry_after, settings)

    def _interpret(
        self, status: int, body: bytes, retry_after: str | None, settings: UpstreamSettings
    ) -> UpstreamReply:
        if status == 200:
            return UpstreamReply(200, body, parse_batch_body(body))
        if status == 404:
            return UpstreamReply(404, body, Lifetime.NOT_FOUND)
        wait = None
        if status == 429 or (status == 503 and retry_after is not None):
            wait = parse_retry_after(
                retry_after, now=now_utc(), default_s=settings.retry_after_default_s, max_s=settings.retry_after_max_s
            )
            self._pause(wait)
        elif status == 503:
            wait = settings.retry_after_default_s
        error = error_for_status(status, body, wait)
        if status in RETRYABLE_STATUSES and not self.paused_until > self._clock():
            raise _Retryable(error)
        raise error

    @staticmethod
    async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
        """Read the (decompressed) body, refusing it once it passes ``limit``."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise errors.UpstreamInvalidResponse(f"The upstream's answer is larger than {limit} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)
