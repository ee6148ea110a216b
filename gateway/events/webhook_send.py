"""One webhook try (docs/design.md §12, "Webhooks"): who may see an event, how it is signed, sent and judged.

Signing is the Standard Webhooks library's own (``standardwebhooks``): the
``webhook-signature`` header holds one ``v1,<base64 HMAC-SHA256>`` of
``id.timestamp.body`` per secret, separated by spaces, so that during a
rotation a receiver holding either secret verifies it.

A try is one POST on the webhook session (no upstream token, no cookies,
no proxy from the environment), redirects never followed, bounded by
``events.webhook_timeout_s`` from connecting to the answer's status, and
its connection by ``CONNECT_TIMEOUT_S`` of its own (a receiver whose host
drops connections costs seconds, not the whole timeout). A 2xx status in
time is a delivery. The receiver's answer body is never kept: a few bytes
are read and thrown away (so that a short answer leaves the connection
reusable), then released; a body that stalls or breaks changes nothing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import UTC, datetime

import aiohttp
from standardwebhooks.webhooks import Webhook

from gateway.ops.webhook_metrics import DELIVERED, GONE, REFUSED, TIMEOUT, UNREACHABLE

# Read from an answer at most this much, and drop it: a longer body only costs its connection.
DISCARD_BYTES = 4096
# Each wait of the retry schedule is jittered by this much either way, so retries of many webhooks spread out.
JITTER = 0.2
# A new connection to a receiver (TCP, and TLS for https) is given up after this, or the whole timeout if shorter.
CONNECT_TIMEOUT_S = 5.0
USER_AGENT = "cohere-gateway-webhooks"


def signature(event_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> str:
    """The ``webhook-signature`` header: one ``v1,...`` per secret, space-separated (the specification's form)."""
    at = datetime.fromtimestamp(timestamp, UTC)
    return " ".join(Webhook(secret).sign(event_id, at, body) for secret in secrets)


def signed_headers(event_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(event_id, timestamp, body, secrets),
    }


def retry_wait(schedule: Sequence[float], failures: int, rng: random.Random | None = None) -> float:
    """The wait after the ``failures``-th failed try of one event: the schedule's, the last repeating, jittered."""
    base = schedule[min(failures, len(schedule)) - 1]
    return base * (rng or random).uniform(1 - JITTER, 1 + JITTER)


def new_session(max_in_flight: int) -> aiohttp.ClientSession:
    """The webhooks' own session: no default headers, no cookies kept, no proxy or .netrc from the environment."""
    connector = aiohttp.TCPConnector(limit=max(100, max_in_flight))
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=False
    )


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], timeout_s: float
) -> tuple[str, int | None]:
    """POST once; the outcome (``gateway.ops.webhook_metrics``) and the answer's status if there was one."""
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, CONNECT_TIMEOUT_S))
    status: int | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, data=body, headers=headers, allow_redirects=False, timeout=timeout) as answer:
                status = answer.status
                if 200 <= status < 300:
                    # Read a little of it (never kept) so that a short answer frees its connection for reuse.
                    await answer.content.read(DISCARD_BYTES)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        if status is not None and 200 <= status < 300:
            return DELIVERED, status  # the 2xx came in time: what its body does after is no failure
        if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError):
            return TIMEOUT, None
        # No connection (refused, or not made within CONNECT_TIMEOUT_S), or it broke; ValueError: aiohttp's
        # own for what it cannot send to (a URL it cannot parse).
        return UNREACHABLE, None
    if 200 <= status < 300:
        return DELIVERED, status
    return (GONE if status == 410 else REFUSED), status
