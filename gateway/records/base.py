"""Ownership and idempotency records (docs/design.md §8 "Store" and "Idempotency-Key").

``Records`` is the interface the routes use without knowing the backend:
``SqliteRecords`` (``gateway.records.sqlite``, the embedded default, at
``store.path``), and ``RedisRecords`` (``gateway.records.redis``) for
replicas (§10). Two kinds of record:

- **owners**: which caller (by configured ``name``) created which batch id,
  and which uploaded (or owns as a batch's output) which dataset, under
  ``dataset_key(id)``. Written once, never changed, read by every
  ``own``-scoped check.
- **idempotency keys**: per (caller, key), the body's fingerprint and the
  state of the create that claimed it::

      (none) ──claim──▶ running ──settle──▶ settled      (replayed until expiry)
                           │  ──release─▶ (none), or ambiguous if an earlier try was
                           │  ──mark_ambiguous / lease passes──▶ ambiguous
      ambiguous ──claim──▶ running again, Claimed(ambiguous_since=first try)

  Every record expires ``idempotency_ttl_s`` after its first attempt.

Failure policy: a read that fails raises ``StoreUnavailable`` (never a guess);
a write is retried a few times with a short backoff, then raises it too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from cachetools import LRUCache

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Claimed:
    """The key is now ours: go ahead and create.

    ``ambiguous_since`` is the wall-clock time (epoch seconds) of the first
    attempt when an earlier attempt ended ambiguously (a timeout, a connection
    lost after sending, a holder that died): the batch may exist, so the caller
    must first look for one created since then.
    """

    ambiguous_since: float | None


@dataclass(frozen=True, slots=True)
class Replay:
    """A definite outcome is recorded: answer it again, with no upstream call."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class InUse:
    """The first request with this key is still running (409 with ``Retry-After``)."""

    retry_after_s: float


@dataclass(frozen=True, slots=True)
class Reused:
    """The key was used with another body fingerprint (422)."""


Claim = Claimed | Replay | InUse | Reused


class Records(Protocol):
    """Who created which batch, and the Idempotency-Key records: one interface, any backend."""

    async def start(self) -> None:
        """Open the store (and create its schema); raise StoreUnavailable if it cannot be opened."""

    async def close(self) -> None:
        """Release the store; calls after this raise StoreUnavailable."""

    def known_owner(self, batch_id: str) -> str | None:
        """The owner if this process knows it without waiting (the inline path), else None."""

    async def owner_of(self, batch_id: str) -> str | None:
        """The name of the caller that created ``batch_id``, or None if none did through the gateway."""

    async def record_owner(self, batch_id: str, caller: str) -> None:
        """Record ``caller`` as the creator of ``batch_id``; durable before it returns."""

    async def claim_key(self, caller: str, key: str, fingerprint: str) -> Claim:
        """Atomically take ``key`` for a create, or say why not (replay, in use, reused)."""

    async def settle_key(self, caller: str, key: str, status: int, body: bytes) -> None:
        """Record a definite outcome: replayable until the record expires."""

    async def mark_ambiguous(self, caller: str, key: str) -> None:
        """The attempt ended without a definite outcome: the batch may exist."""

    async def release_key(self, caller: str, key: str) -> None:
        """The attempt certainly created nothing (429, 5xx, failed before sending): free the key."""


class KnownOwners:
    """The owners this process has read or written, for every ``Records`` backend.

    Ownership never changes once recorded, so a positive answer is kept for
    good (bounded by LRU); a negative one is not: another process (or
    replica) may record the id a moment later. Only touched on the event
    loop's thread.
    """

    def __init__(self, size: int) -> None:
        self._owners: LRUCache[str, str] = LRUCache(maxsize=size)

    def __len__(self) -> int:
        return len(self._owners)

    def get(self, batch_id: str) -> str | None:
        return self._owners.get(batch_id)

    def remember(self, batch_id: str, owner: str) -> None:
        self._owners[batch_id] = owner

    async def look_up(self, batch_id: str, read: Callable[[], Awaitable[str | None]]) -> str | None:
        """The owner from memory, else from ``read()`` (the store), kept if found."""
        owner = self._owners.get(batch_id)
        if owner is None:
            owner = await read()
            if owner is not None:
                self._owners[batch_id] = owner
        return owner


def dataset_key(dataset_id: str) -> str:
    """The owners record of a dataset (docs/design.md §11): ids never hold ':', so no batch id is ever this."""
    return f"dataset:{dataset_id}"


def body_fingerprint(document: object) -> str:
    """The sha256 hex of ``document``'s canonical JSON: key order and whitespace do not count, values do."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
