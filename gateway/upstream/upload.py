"""A dataset upload streamed to the upstream as it arrives (docs/design.md §11).

The other half of ``UpstreamClient`` for the one call whose body is not in
memory: the same session, ``base_url``, token, ``X-Client-Name`` and no
redirects, the same guards (the pause, the breaker, one token of the budget
as a write) and the same mapping of the answer to the contract's errors.
What differs is time and retries: the body takes as long as the caller
keeps sending (its idle timeout is the caller side's, in the body it
hands over) and the upstream keeps reading (each chunk must leave within
``datasets.upload_idle_timeout_s``), the answer is awaited for ``upstream.timeout_s`` from the last
byte, and a failed connect is the only failure tried again, since nothing
of the body has left then.

The body is an async iterator of the caller's chunks. When it raises a
``GatewayError`` (the caller was idle, hung up, sent too much or sent
something that is not multipart), aiohttp stops writing and closes the
upstream connection mid-body, so the upstream never has a whole request,
and that error is what this call raises.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import aiohttp

from gateway import errors
from gateway.config import UpstreamSettings
from gateway.upstream.client import Accept, CallTally, UpstreamClient, UpstreamRequest, call_headers

R = TypeVar("R")


class _Body:
    """The caller's chunks on their way upstream: whether any has left, whether all have, what failed."""

    def __init__(
        self, source: AsyncIterator[bytes], deadline: asyncio.Timeout, timeout_s: float, idle_s: float
    ) -> None:
        self._source = source
        self._deadline = deadline
        self._timeout_s = timeout_s
        self._idle_s = idle_s
        self.started = False
        self.finished = False
        self.failure: errors.GatewayError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        loop = asyncio.get_running_loop()
        try:
            async for chunk in self._source:
                # The upstream must take each chunk within the idle bound: one that stops reading ends the upload
                # (504), rather than holding it and the caller for ever. Once taken, it is the caller's turn, which
                # the caller's own idle bound covers (the source raises 408).
                self._deadline.reschedule(loop.time() + self._idle_s)
                yield chunk
                self._deadline.reschedule(None)
        except errors.GatewayError as failure:
            self.failure = failure
            raise
        self.finished = True
        # The whole body has left: the upstream's answer is awaited this long, no longer.
        self._deadline.reschedule(asyncio.get_running_loop().time() + self._timeout_s)


async def send_upload(
    client: UpstreamClient,
    request: UpstreamRequest,
    headers: dict[str, str],
    source: AsyncIterator[bytes],
    accept: Accept[R],
    idle_s: float,
) -> R:
    """POST ``source`` to ``request.path`` with ``headers`` added; ``accept`` reads the answer.

    The upstream must take each chunk of the body within ``idle_s``
    (``datasets.upload_idle_timeout_s``), else the upload ends with 504.
    """
    settings = client.settings
    admission = client.admit()
    tally = CallTally(deadline=asyncio.get_running_loop().time() + settings.timeout_s)
    try:
        return await _attempts(client, request, headers, source, accept, tally, idle_s)
    finally:
        client.judge(admission, tally)


class _ConnectFailed(Exception):
    """No connection was made, so nothing of the body has left: another try may be made."""

    def __init__(self, error: errors.GatewayError) -> None:
        self.error = error


async def _attempts(
    client: UpstreamClient,
    request: UpstreamRequest,
    headers: dict[str, str],
    source: AsyncIterator[bytes],
    accept: Accept[R],
    tally: CallTally,
    idle_s: float,
) -> R:
    """Tries while the connect fails (nothing of the body has left), within the retries and the budget."""
    attempt = 0
    while True:
        settings = client.settings  # read again for each try: a reload applies to the next one
        await client.budget.spend(settings, True, True, tally.deadline)
        client.budget.check_paused()
        if attempt:
            client.metrics.upstream_retries.inc()
        tally.calls += 1
        try:
            status, body, retry_after = await _send(client, request, headers, source, settings, idle_s)
        except _ConnectFailed as failed:
            tally.healthy = False
            attempt += 1
            backoff = client.backoff_s(client.settings, attempt)
            if attempt > client.settings.retries or asyncio.get_running_loop().time() + backoff >= tally.deadline:
                raise failed.error from None
            await asyncio.sleep(backoff)
            continue
        except errors.UpstreamFailure:
            tally.healthy = False
            raise
        # A caller's failure (idle, gone, too much) leaves ``healthy`` unknown: the breaker learns nothing.
        tally.healthy = True
        try:
            return client.interpret(request, status, body, retry_after, settings, accept)
        except errors.UpstreamFailure as error:
            # A 429 is a healthy upstream saying "slow down"; any other failure is not.
            tally.healthy = error.upstream_status == 429
            raise


async def _send(
    client: UpstreamClient,
    request: UpstreamRequest,
    headers: dict[str, str],
    source: AsyncIterator[bytes],
    settings: UpstreamSettings,
    idle_s: float,
) -> tuple[int, bytes, str | None]:
    """The HTTP call (counted, timed and traced): status, capped body, ``Retry-After``; or an error."""
    started = time.perf_counter()
    outcome = "unknown"
    trace = request.trace
    body: _Body | None = None
    try:
        async with asyncio.timeout(None) as deadline:
            body = _Body(source, deadline, settings.timeout_s, idle_s)
            try:
                status, answer, retry_after = await _exchange(client, request, headers, body, settings)
            except aiohttp.ClientError:
                if body.failure is not None:
                    raise body.failure from None
                raise
        outcome = str(status)
        trace.outcome_unknown = False
        return status, answer, retry_after
    except errors.GatewayError as error:
        outcome = error.code  # the caller's failure (the body never left whole), or an answer too large
        trace.outcome_unknown = False
        raise
    except TimeoutError:
        outcome = "upstream_timeout"
        # Until the whole body has left, the upstream cannot have made the dataset.
        trace.outcome_unknown = body is not None and body.finished
        late = f"did not answer within {settings.timeout_s:g} s" if trace.outcome_unknown else "stopped reading"
        raise errors.UpstreamTimeout(f"The upstream {late}.") from None
    except aiohttp.ClientConnectorError as exc:
        outcome = "upstream_unreachable"
        trace.outcome_unknown = False
        raise _ConnectFailed(
            errors.UpstreamUnreachable(f"The upstream could not be reached ({type(exc).__name__}).")
        ) from None
    except aiohttp.ClientConnectionError as exc:
        outcome = "upstream_unreachable"
        # Until the whole body has left, the upstream cannot have made the dataset.
        trace.outcome_unknown = body is not None and body.finished
        raise errors.UpstreamUnreachable(f"The upstream connection was lost ({type(exc).__name__}).") from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
        outcome = "upstream_invalid_response"
        trace.outcome_unknown = body is not None and body.finished
        raise errors.UpstreamInvalidResponse(f"The upstream's answer was malformed ({type(exc).__name__}).") from None
    except aiohttp.ClientError as exc:
        outcome = "upstream_error"
        trace.outcome_unknown = body is not None and body.finished
        raise errors.UpstreamError(f"The upstream call failed ({type(exc).__name__}).") from None
    except asyncio.CancelledError:
        outcome = "cancelled"
        trace.outcome_unknown = body is not None and body.finished
        raise
    finally:
        _account(client, request, outcome, time.perf_counter() - started)


def _account(client: UpstreamClient, request: UpstreamRequest, outcome: str, elapsed: float) -> None:
    """The call counted, timed and traced, as ``UpstreamClient`` does every call."""
    client.metrics.upstream_calls.labels(outcome).inc()
    client.metrics.upstream_seconds.observe(elapsed)
    request.trace.upstream_ms = round(elapsed * 1000, 2)
    request.trace.upstream_status = int(outcome) if outcome.isdigit() else None


async def _exchange(
    client: UpstreamClient, request: UpstreamRequest, headers: dict[str, str], body: _Body, settings: UpstreamSettings
) -> tuple[int, bytes, str | None]:
    async with client.session.request(
        "POST",
        f"{settings.base_url}{request.path}",
        params=request.query or None,
        data=body.chunks(),
        headers={**call_headers(request, settings), **headers},
        allow_redirects=False,
    ) as response:
        answer = await client.read_capped(response, settings.max_body_bytes)
        return response.status, answer, response.headers.get("Retry-After")
