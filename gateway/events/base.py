"""The event log's interface (docs/design.md §12, "Events"): what is seen, what is kept, how it is read.

Whatever answer passes through the gateway (a retrieve, a list, a create, a
refresh, the follower's own calls) reports what it saw of each batch or
dataset as a ``Sighting``. The ``EventLog`` turns sightings into events:

- a subject it has never seen: one event if it is active (and it is then
  *followed*), none if it is already final;
- a followed subject whose status changed: one event, whichever process or
  request saw it first (the check and the append are one atomic step in the
  store); a final status ends the following;
- anything else (same status, an older answer, a final subject seen active
  again by a late answer): nothing.

Events are kept in the store (SQLite, or Redis with ``redis.url``), in
``seq`` order, for ``events.retention_s`` and at most ``events.max_events``.
``seq`` only grows. A cursor names the log (so that a cursor from another
gateway is refused, not misread) and a ``seq``; it is opaque to callers.
Each event's JSON is rendered once, when it is appended, and every reader
(feed pages, streams, webhooks) sends those same bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import re
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from gateway import errors

Kind = Literal["batch", "dataset"]
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BATCH_PREFIX = "BATCH_STATUS_"


@dataclass(frozen=True, slots=True)
class Sighting:
    """What one answer showed of one batch or dataset."""

    kind: Kind
    subject: str  # the batch or dataset id
    status: str  # as the upstream wrote it: "BATCH_STATUS_COMPLETED", "validated"
    final: bool  # the status cannot change any more
    updated_at: float | None  # epoch seconds, when the object says (an older answer never makes an event)
    owner: str | None  # the caller that created it through the gateway, if any
    data: bytes  # the object's JSON as the gateway saw it (a dataset without its part URLs)


@dataclass(frozen=True, slots=True)
class Event:
    """One kept event: what readers filter on, and its JSON, rendered once."""

    seq: int  # its position in the log: strictly increasing, never reused
    type: str  # "batch.completed", "dataset.validated"
    subject: str
    owner: str | None
    created_at: float  # epoch seconds
    payload: bytes  # {"id": <cursor>, "type", "created_at", "owner", "data": {"batch"|"dataset": {...}}}

    @property
    def kind(self) -> Kind:
        return "dataset" if self.type.startswith("dataset.") else "batch"


class Viewer(Protocol):
    """Who reads events (a caller of the feed, or a caller's webhook), as configured."""

    @property
    def name(self) -> str: ...

    @property
    def allow(self) -> frozenset[str]: ...

    @property
    def batches(self) -> str: ...


def visible_to(viewer: Viewer, event: Event) -> bool:
    """The one rule of who sees an event, for the feed, the stream and webhooks (docs/design.md §12).

    It needs ``retrieve``, a dataset's event ``read_dataset`` too; an ``own`` viewer sees only what it created.
    """
    if "retrieve" not in viewer.allow:
        return False
    if event.kind == "dataset" and "read_dataset" not in viewer.allow:
        return False
    return viewer.batches == "all" or event.owner == viewer.name


def event_type(kind: Kind, status: str) -> str:
    """``batch.`` and the status without its prefix in lower case, or ``dataset.`` and the validation status."""
    if kind == "batch":
        return "batch." + status.removeprefix(_BATCH_PREFIX).lower()
    return "dataset." + status.lower()


def rfc3339(epoch_s: float) -> str:
    """``2026-12-06T10:00:00Z``: whole seconds, UTC."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_event(log_id: str, seq: int, sighting: Sighting, created_at: float) -> bytes:
    """The event's JSON, once, at append: the object's bytes are put in as the gateway saw them."""
    head = {
        "id": encode_cursor(log_id, seq),
        "type": event_type(sighting.kind, sighting.status),
        "created_at": rfc3339(created_at),
        "owner": sighting.owner,
    }
    opening = json.dumps(head, separators=(",", ":")).encode()[:-1]
    return opening + b',"data":{"' + sighting.kind.encode() + b'":' + sighting.data + b"}}"


def encode_cursor(log_id: str, seq: int) -> str:
    """The opaque cursor of ``seq`` in the log ``log_id``: base64url, no padding."""
    return base64.urlsafe_b64encode(f"{log_id}.{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, log_id: str) -> int:
    """The ``seq`` of a cursor this log issued; 400 ``invalid_request`` for any other string."""
    bad = errors.InvalidRequest("after: not a cursor this gateway issued.")
    if not _CURSOR.fullmatch(cursor):
        raise bad
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    name, _, number = text.rpartition(".")
    if name != log_id or not number.isdigit() or len(number) > 18:
        raise bad
    return int(number)


class EventLog(Protocol):
    """Sightings in, events out: one interface, any backend (``gateway.events`` stores)."""

    @property
    def log_id(self) -> str:
        """This log's identity, kept in the store (so it survives restarts): cursors name it."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def record(self, sighting: Sighting) -> Event | None:
        """Turn one sighting into at most one event (see the module's rules); the event if one was appended."""
        ...

    async def followed(self, kind: Kind, limit: int) -> list[str]:
        """Ids of ``kind`` still followed (active when last seen), at most ``limit``, least recently checked first."""
        ...

    async def checked(self, kind: Kind, subjects: list[str]) -> None:
        """The follower checked ``subjects`` just now: they go to the back of ``followed``'s order."""
        ...

    async def unfollow(self, kind: Kind, subject: str) -> None:
        """``subject`` answered 404 (gone upstream): no longer followed, and nothing more is recorded for it."""
        ...

    async def bounds(self) -> tuple[int, int]:
        """``(oldest kept seq, newest seq)``: ``(newest + 1, newest)`` when none is kept, ``(1, 0)`` when new."""
        ...

    async def read_after(self, seq: int, limit: int) -> list[Event]:
        """Up to ``limit`` events with a seq above ``seq``, in order (readers filter by caller afterwards)."""
        ...

    async def wait_beyond(self, seq: int, timeout_s: float) -> bool:
        """Return True as soon as an event above ``seq`` exists (appended by any process), False after ``timeout_s``."""
        ...


class Tail:
    """The newest events of a log, in memory, for every reader of this process.

    Streams and long-polls that keep up read from here: one copy of each
    event however many readers there are, and no store call per reader.
    """

    def __init__(self, size: int = 1024) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self.newest = 0  # the newest seq this process knows of (appended here or read from the store)
        self._grew = asyncio.Event()

    def add(self, events: list[Event]) -> None:
        """Events read or appended in order; only those right after the newest kept one are kept."""
        for event in events:
            if self._events and event.seq <= self._events[-1].seq:
                continue
            if self._events and event.seq != self._events[-1].seq + 1:
                self._events.clear()  # a gap (events read past): start again from here
            self._events.append(event)
        if events:
            self.heard(events[-1].seq)

    def heard(self, seq: int) -> None:
        """An event up to ``seq`` exists (appended here, or by another process): wake every waiter."""
        if seq > self.newest:
            self.newest = seq
            grew, self._grew = self._grew, asyncio.Event()
            grew.set()

    def after(self, seq: int, limit: int) -> list[Event] | None:
        """Up to ``limit`` events above ``seq`` from memory; None when memory does not hold them all."""
        if seq >= self.newest:
            return []
        if not self._events or self._events[0].seq > seq + 1 or self._events[-1].seq < self.newest:
            return None
        start = seq + 1 - self._events[0].seq
        return list(itertools.islice(self._events, start, start + limit))

    def reset(self) -> None:
        """The store lost its events (a Redis without persistence, restarted): forget them here too."""
        self._events.clear()
        self.newest = 0

    def drop_before(self, seq: int) -> None:
        """Retention removed the events below ``seq``: memory forgets them too."""
        while self._events and self._events[0].seq < seq:
            self._events.popleft()

    async def wait_beyond(self, seq: int, timeout_s: float) -> bool:
        """True once an event above ``seq`` is known here, False after ``timeout_s`` (no polling)."""
        if self.newest > seq:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                while self.newest <= seq:
                    await self._grew.wait()
        except TimeoutError:
            return False
        return True
