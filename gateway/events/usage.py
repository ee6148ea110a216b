"""Usage per caller (docs/design.md §12, "Usage"): tokens and records of every finished batch, once each.

Every ``batch.completed``, ``batch.failed`` and ``batch.canceled`` event
that this process appends is handed to ``Usage.count``: the batch's
``num_records``, ``input_tokens`` and ``output_tokens`` (Cohere writes the
token counts as strings) are added for its owner (``-`` for a batch no
caller created through the gateway) and model, to the day (UTC) of the
event, in the store (``UsageStore``: ``gateway.events.usage_sqlite`` or
``gateway.events.usage_redis``), and to the metrics
(``gateway.ops.usage_metrics``).

Once per batch: the store keys each tally by the batch id, in the same
atomic step as the totals, so a second event for the same batch (another
replica, a restart, a store replayed) adds nothing, and only the process
whose tally was new counts it in its metrics. The per-day totals are kept
apart from the events, so they outlive the events' retention.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway import errors
from gateway.events.base import Event, EventLog, Kind, Sighting
from gateway.ops.logs import log_event
from gateway.ops.usage_metrics import UsageMetrics

log = logging.getLogger("gateway")

# The finishing event types, and the status each is counted under.
FINISHED = {"batch.completed": "completed", "batch.failed": "failed", "batch.canceled": "canceled"}
STATUSES = ("completed", "failed", "canceled")
NO_OWNER = "-"
NO_MODEL = "-"
# A model name longer than this is cut (a label, and a key in the store).
MAX_MODEL = 128
# The columns of a usage row, in the order the report prints them.
COLUMNS = (
    "caller",
    "model",
    "batches_completed",
    "batches_failed",
    "batches_canceled",
    "records",
    "input_tokens",
    "output_tokens",
)
COUNTS = COLUMNS[2:]


@dataclass(frozen=True, slots=True)
class Tally:
    """What one finished batch adds to its owner's and model's day."""

    batch_id: str
    day: str  # YYYY-MM-DD, UTC
    caller: str
    model: str
    status: str  # completed, failed or canceled
    records: int
    input_tokens: int
    output_tokens: int

    def counts(self) -> dict[str, int]:
        """The amounts this tally adds, by column."""
        return {
            f"batches_{self.status}": 1,
            "records": self.records,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


def count_of(value: object) -> int:
    """A count the upstream wrote as a number or a string of digits; 0 when absent or unreadable."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, str) and value.isdigit() and len(value) <= 18:
        return int(value)
    return 0


def tally_of(event: Event) -> Tally | None:
    """The tally a finishing event makes; None for any other event."""
    status = FINISHED.get(event.type)
    if status is None:
        return None
    try:
        batch: Any = json.loads(event.payload)["data"]["batch"]
    except (ValueError, KeyError, TypeError):
        batch = None
    if not isinstance(batch, dict):
        batch = {}
    model = batch.get("model")
    return Tally(
        batch_id=event.subject,
        day=datetime.fromtimestamp(event.created_at, UTC).strftime("%Y-%m-%d"),
        caller=event.owner or NO_OWNER,
        model=model[:MAX_MODEL] if isinstance(model, str) and model else NO_MODEL,
        status=status,
        records=count_of(batch.get("num_records")),
        input_tokens=count_of(batch.get("input_tokens")),
        output_tokens=count_of(batch.get("output_tokens")),
    )


class UsageStore(Protocol):
    """Per-day totals by caller and model, and the batches already counted."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, tally: Tally) -> bool:
        """Add ``tally`` unless its batch was counted before (one atomic step); True if it was added now."""
        ...

    async def totals(self, since: str | None, until: str | None) -> list[dict[str, Any]]:
        """One row (``COLUMNS``) per caller and model, summed over the days from ``since`` to ``until`` inclusive."""
        ...


def sum_rows(days: list[tuple[str, str, dict[str, int]]]) -> list[dict[str, Any]]:
    """Rows per caller and model from per-day ``(caller, model, counts)``, sorted by caller then model."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for caller, model, counts in days:
        row = rows.setdefault((caller, model), {"caller": caller, "model": model, **dict.fromkeys(COUNTS, 0)})
        for column in COUNTS:
            row[column] += counts.get(column, 0)
    return [rows[key] for key in sorted(rows)]


class Usage:
    """Counts each finishing event once: in the store, then (if new there) in the metrics."""

    def __init__(self, store: UsageStore, metrics: UsageMetrics) -> None:
        self.store = store
        self._metrics = metrics

    async def count(self, event: Event) -> None:
        tally = tally_of(event)
        if tally is None:
            return
        try:
            added = await self.store.add(tally)
        except (errors.StoreUnavailable, errors.RedisDown):
            # The event itself is kept; only its usage is not counted. Said, so that ops know the gap.
            log_event(log, logging.WARNING, "usage not counted: the store failed", batch_id=tally.batch_id)
            return
        if added:
            self._metrics.finished(tally.caller, tally.model, tally.status, tally.input_tokens, tally.output_tokens)


class CountingLog:
    """The event log as the sightings see it: every event appended through it is counted by ``usage`` too.

    ``record`` is where events are appended (it returns the event it appended),
    so usage needs no change to any log: the log is wrapped where it is handed to
    what records sightings (``gateway.runtime``). Everything else is the log's own.
    """

    def __init__(self, log: EventLog, usage: Usage) -> None:
        self._log = log
        self._usage = usage

    @property
    def log_id(self) -> str:
        return self._log.log_id

    async def start(self) -> None:
        await self._log.start()

    async def close(self) -> None:
        await self._log.close()

    async def record(self, sighting: Sighting) -> Event | None:
        event = await self._log.record(sighting)
        if event is not None:
            await self._usage.count(event)
        return event

    async def followed(self, kind: Kind, limit: int) -> list[str]:
        return await self._log.followed(kind, limit)

    async def checked(self, kind: Kind, subjects: list[str]) -> None:
        await self._log.checked(kind, subjects)

    async def unfollow(self, kind: Kind, subject: str) -> None:
        await self._log.unfollow(kind, subject)

    async def bounds(self) -> tuple[int, int]:
        return await self._log.bounds()

    async def read_after(self, seq: int, limit: int) -> list[Event]:
        return await self._log.read_after(seq, limit)

    async def wait_beyond(self, seq: int, timeout_s: float) -> bool:
        return await self._log.wait_beyond(seq, timeout_s)
