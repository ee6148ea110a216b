"""``MemoryStore``: at most ``cache.max_entries`` entries, least recently used
evicted first, expiry per entry (cachetools' ``TLRUCache``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from cachetools import TLRUCache

if TYPE_CHECKING:
    pass
from gateway.cache.entry import CacheEntry, Clock


class BatchStore(Protocol):
    """Where entries live. A shared store (Redis, ...) would implement this."""

    def get(self, batch_id: str) -> CacheEntry | None: ...

    def put(self, batch_id: str, entry: CacheEntry) -> None: ...

    def evict(self, batch_id: str) -> None: ...

    def __len__(self) -> int: ...


class _CountingTLRU(TLRUCache[str, CacheEntry]):
    """TLRUCache that reports evictions (for room) and expiries."""

    def __init__(self, maxsize: int, clock: Clock, on_remove: Callable[[str, int], None]) -> None:
        super().__init__(maxsize, ttu=_keep_until, timer=clock)
        self._on_remove = on_remove

    def popitem(self) -> tuple[str, CacheEntry]:
        item = super().popitem()
        self._on_remove("evicted", 1)
        return item

    def get(self, key: str, default: CacheEntry | None = None) -> CacheEntry | None:  # type: ignore[override]
        # One __getitem__ (it reads the timer once and checks the expiry) in place of TLRUCache.get's
        # timer context, __contains__ and __getitem__: a fresh hit's lookup in a third of the time (a miss,
        # rare and followed by an upstream call, takes a fifth longer).
        try:
            return self[key]
        except KeyError:
            return default

    def expire(self, time: float | None = None) -> Any:
        expired = super().expire(time)
        if expired:
            self._on_remove("expired", len(expired))
        return expired


def _keep_until(_key: str, entry: CacheEntry, _now: float) -> float:
    return entry.keep_until


class MemoryStore:
    """The in-process store: bounded by ``max_entries``, LRU past that."""

    def __init__(
        self, max_entries: int, clock: Clock = time.monotonic, on_remove: Callable[[str, int], None] | None = None
    ) -> None:
        self._entries = _CountingTLRU(max_entries, clock, on_remove or (lambda _reason, _count: None))

    def get(self, batch_id: str) -> CacheEntry | None:
        return self._entries.get(batch_id)

    def put(self, batch_id: str, entry: CacheEntry) -> None:
        self._entries[batch_id] = entry

    def evict(self, batch_id: str) -> None:
        self._entries.pop(batch_id, None)

    def __len__(self) -> int:
        return len(self._entries)
