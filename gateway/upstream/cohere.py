"""Pure decisions about the upstream's protocol: no I/O, table-tested.

Batch id validation, TTL choice from a batch's status, the mapping from an
upstream answer to the contract's errors, and ``Retry-After`` parsing.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any

from gateway import errors

BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

TERMINAL_STATUSES = frozenset({"BATCH_STATUS_COMPLETED", "BATCH_STATUS_FAILED", "BATCH_STATUS_CANCELED"})

# The upstream's error message is shown to callers; bound what we pass on.
MAX_UPSTREAM_MESSAGE = 500
# What json.loads raises on bytes that are not JSON; RecursionError for deeply
# nested arrays, which fit easily within upstream.max_body_bytes.
UNPARSEABLE = (ValueError, UnicodeDecodeError, RecursionError)


class Lifetime(Enum):
    """Which TTL of ``cache.ttl_s`` an answer gets."""

    ACTIVE = "active"
    TERMINAL = "terminal"
    NOT_FOUND = "not_found"


def parse_batch_id(raw: str) -> str:
    """Return the id if it is well formed (after URL decoding), else raise InvalidBatchId."""
    if not BATCH_ID.fullmatch(raw):
        raise errors.InvalidBatchId()
    return raw


def lifetime_of_status(status: object) -> Lifetime:
    """Terminal statuses will not change; anything else, unknown included, may."""
    # The status comes from the upstream's JSON: it may be a list or an object.
    return Lifetime.TERMINAL if isinstance(status, str) and status in TERMINAL_STATUSES else Lifetime.ACTIVE


def parse_batch_body(body: bytes) -> Lifetime:
    """Check a 200 body is ``{"batch": {...}}`` and read its lifetime from ``status``."""
    return batch_facts(body)[0]


def batch_facts(body: bytes) -> tuple[Lifetime, float | None]:
    """Check a 200 body is ``{"batch": {...}}``; its lifetime (from ``status``) and ``updated_at``.

    ``updated_at`` is epoch seconds, or None when absent or unreadable. The
    error it raises is derived from the upstream's 200, so it says so.
    """
    try:
        document = json.loads(body)
    except UNPARSEABLE:
        raise errors.UpstreamInvalidResponse("The upstream's answer was not JSON.", upstream_status=200) from None
    if not isinstance(document, dict) or not isinstance(document.get("batch"), dict):
        raise errors.UpstreamInvalidResponse("The upstream's answer did not hold a batch object.", upstream_status=200)
    batch = document["batch"]
    return lifetime_of_status(batch.get("status")), parse_timestamp(batch.get("updated_at"))


def parse_timestamp(value: object) -> float | None:
    """An RFC 3339 timestamp as epoch seconds; None if it is not one (a timestamp without zone is UTC)."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def upstream_message(body: bytes) -> str | None:
    """The ``message`` of a Cohere error body, if there is a usable one."""
    try:
        document = json.loads(body)
    except UNPARSEABLE:
        return None
    message = document.get("message") if isinstance(document, dict) else None
    if not isinstance(message, str) or not message.strip():
        return None
    return message.strip()[:MAX_UPSTREAM_MESSAGE]


def parse_retry_after(value: str | None, *, now: datetime, default_s: float, max_s: float) -> float:
    """Seconds to wait from a ``Retry-After`` of delta-seconds or an HTTP date.

    A missing or garbage value gets ``default_s``; every value is capped at
    ``max_s`` so that one bad header cannot silence the gateway for a day.
    """
    if value is None:
        return min(default_s, max_s)
    value = value.strip()
    seconds: float
    if re.fullmatch(r"[0-9]{1,12}", value):
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return min(default_s, max_s)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), max_s)


def error_for_status(status: int, body: bytes, retry_after_s: float | None) -> errors.GatewayError:
    """The contract's error for a non-200 upstream answer (§5's tables)."""
    message = upstream_message(body)
    error: errors.GatewayError
    if status == 400:
        error = errors.BadRequest(message)
    elif status == 404:
        error = errors.NotFound(message)
    elif status in (401, 403):
        error = errors.UpstreamAuthFailed()
    elif status == 429:
        error = errors.UpstreamRateLimited(retry_after_s=retry_after_s)
    elif status == 503:
        error = errors.UpstreamUnavailable(retry_after_s=retry_after_s)
    elif 200 <= status < 300:
        error = errors.UpstreamInvalidResponse(f"The upstream answered {status} instead of 200.")
    elif 300 <= status < 400:
        error = errors.UpstreamError(f"The upstream answered with a redirect ({status}); redirects are not followed.")
    else:
        error = errors.UpstreamError(f"The upstream answered {status}.")
    error.upstream_status = status
    return error


def now_utc() -> datetime:
    return datetime.now(UTC)


def new_request_id() -> str:
    """A fresh request id: unique enough for tracing, with no syscall (uuid4 reads os.urandom)."""
    return random.getrandbits(128).to_bytes(16).hex()  # 32 hex digits, as f"{n:032x}", in a third of its time


def batches_of(page: dict[str, Any]) -> list[Any]:
    """The ``batches`` of a list page (absent: none)."""
    batches = page.get("batches")
    return batches if isinstance(batches, list) else []


def ids_of(batches: Iterable[Any]) -> list[str]:
    return [b["id"] for b in batches if isinstance(b, dict) and isinstance(b.get("id"), str)]
