"""A cached answer and what the cache says about it: ``CacheEntry``, its ETag, and hit/miss/stale."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One upstream answer: a 200 batch body, or a 404 error body.

    ``etag`` is a strong validator derived from the body (docs/design.md §9);
    ``updated_at`` (epoch seconds) and ``terminal`` are read from a batch's
    body, to refuse answers older than this one.
    """

    status: int
    body: bytes
    fetched_at: float
    fresh_until: float
    keep_until: float
    etag: str = ""
    updated_at: float | None = None
    terminal: bool = False

    def age_s(self, now: float) -> int:
        return max(0, int(now - self.fetched_at))

    def fresh_s(self, now: float) -> int:
        return max(0, int(self.fresh_until - now))


def etag_of(body: bytes) -> str:
    """A strong ETag for ``body``: equal bodies, equal tags."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def is_older(new: CacheEntry, held: CacheEntry) -> bool:
    """Whether ``new`` describes the batch as it was before ``held`` did (docs/design.md §9)."""
    if new.status != 200 or held.status != 200:
        return False
    if held.terminal and not new.terminal:
        return True
    return new.updated_at is not None and held.updated_at is not None and new.updated_at < held.updated_at


class Role(Enum):
    """How a miss was settled through Redis (the label of ``gateway_shared_flights_total``)."""

    LED = "led"  # this process called the upstream
    FOLLOWED = "followed"  # another process did, and this one waited for its answer
    ADOPTED = "adopted"  # Redis already held an answer that would do


class CacheState(Enum):
    HIT = "HIT"
    MISS = "MISS"
    STALE = "STALE"


@dataclass(frozen=True, slots=True)
class CacheResult:
    entry: CacheEntry
    state: CacheState
