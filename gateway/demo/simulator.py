"""A simulated Cohere batch API, for ``--demo``, the tests and the benchmark.

It serves the four batch endpoints as upstream does (docs/design.md §2):

- ``GET /v2/batches/{id}``: any id starts QUEUED when first asked for, moves
  to IN_PROGRESS with growing record counters, and ends COMPLETED within
  about ``lifetime_s`` (each id gets its own pace). Ids containing ``fail``
  end FAILED; ids starting with ``missing`` answer 404.
- ``POST /v2/batches``: creates a batch (fresh id, QUEUED) from a JSON body
  with non-empty string ``name``, ``input_dataset_id`` and ``model``; it then
  moves on as a retrieved one does.
- ``GET /v2/batches``: the batches it knows (created or first seen by
  retrieve), newest first by ``created_at`` or ``updated_at``, in pages
  (``gateway.demo.pages`` reads the query and the page tokens).
- ``POST /v2/batches/{id}:cancel``: an active batch goes CANCELING, with its
  counters frozen, and CANCELED ``cancel_s`` later; a terminal one stays.

``updated_at`` is the moment the status or a counter last changed, so it
moves exactly when the answer does. A wrong token gets 401, and an invalid
request 400 ``{"message": ...}``, as upstream does.

Two controls for the tests and the benchmark (docs/design.md §9):

- **A lagging read replica.** With ``lag_s`` and ``lag_every`` both set,
  every ``lag_every``-th GET of a given batch describes it as it was
  ``lag_s`` seconds earlier (status, counters and ``updated_at`` of that
  moment). ``lag_next(id, seconds, count)`` makes the next ``count`` GETs of
  one id lag by ``seconds``, whatever the options say.
- **A scheduled completion.** ``schedule(id, complete_at)`` makes a batch
  IN_PROGRESS from its start, with steady counters, until the clock time
  ``complete_at``, and COMPLETED (FAILED for ids with ``fail``) from then on,
  with ``updated_at`` at exactly that moment; ``changed_at(id)`` reads it back.

It serves the dataset routes too (``gateway.demo.datasets``): a batch on a
dataset uploaded here counts its rows and, once COMPLETED, names its output
dataset (a batch on an unknown dataset names ``{id}-output`` all along).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from cachetools import LRUCache
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.demo.datasets import SimulatedDatasets, rfc3339
from gateway.demo.pages import page_token, read_page_query
from gateway.upstream.guards import Clock

# Bounds for what the simulator remembers, so long benchmark runs stay flat.
MAX_TRACKED_IDS = 200_000
MAX_RECORDED_REQUESTS = 10_000
CREATE_FIELDS = ("name", "input_dataset_id", "model")

ACTIVE_STATUSES = frozenset({"BATCH_STATUS_QUEUED", "BATCH_STATUS_IN_PROGRESS", "BATCH_STATUS_CANCELING"})
# Upstream's ids for who made the batches; fixed, as for one organisation.
CREATOR_ID = "b5e1ffb9-49a1-4653-9927-94083316309d"
ORG_ID = "62603116-1750-4c04-b1b6-9d5046764bc4"


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request as the simulated upstream received it."""

    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class SimulatedBatch:
    """What the simulator remembers of one batch; its state follows from these and the clock."""

    id: str
    started: float  # clock time it was created or first asked for
    name: str
    input_dataset_id: str
    model: str
    canceled_at: float | None = None  # clock time a cancel arrived while it was active
    complete_at: float | None = None  # clock time a scheduled batch ends (see ``Simulator.schedule``)


@dataclass(frozen=True, slots=True)
class _Progress:
    status: str
    done: int
    changed: float  # seconds after ``started`` when status or counters last changed


def _fraction(batch_id: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{batch_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


class Simulator:
    """The simulated upstream's state; ``app()`` serves it."""

    def __init__(
        self,
        token: str | None = None,
        lifetime_s: float = 60.0,
        clock: Clock = time.monotonic,
        cancel_s: float = 1.0,
        lag_s: float = 0.0,
        lag_every: int = 0,
        validation_s: float = 2.0,
    ) -> None:
        if lag_s < 0 or lag_every < 0:
            raise ValueError("lag_s and lag_every must not be negative")
        self.token = token or f"demo-upstream-{secrets.token_hex(8)}"
        self.url = ""  # set by start_simulator
        self.lifetime_s = lifetime_s
        self.cancel_s = cancel_s
        self.lag_s = lag_s
        self.lag_every = lag_every
        # Per id: GETs answered so far (for ``lag_every``), and forced lags still to serve (``lag_next``).
        self._gets_by_id: LRUCache[str, int] = LRUCache(MAX_TRACKED_IDS)
        self._forced_lags: dict[str, deque[float]] = {}
        self._clock = clock
        # Wall time = clock time + this, so timestamps follow an injected clock.
        self._epoch_offset = time.time() - clock()
        self._batches: LRUCache[str, SimulatedBatch] = LRUCache(MAX_TRACKED_IDS)
        self.calls = 0
        self.calls_by_id: LRUCache[str, int] = LRUCache(MAX_TRACKED_IDS)
        self.seen: deque[SeenRequest] = deque(maxlen=MAX_RECORDED_REQUESTS)
        self.datasets = SimulatedDatasets(self._authorized, clock, validation_s, on_request=self._note)

    # --- state ---------------------------------------------------------------------------------------------------

    def span_s(self, batch_id: str) -> float:
        """How long the batch stays active: between 50% and 100% of ``lifetime_s``, fixed per id."""
        return self.lifetime_s * (0.5 + 0.5 * _fraction(batch_id, "pace"))

    def first_seen(self) -> dict[str, float]:
        """Each known id and the clock time it was created or first asked for."""
        return {batch_id: known.started for batch_id, known in self._batches.items()}

    def now(self) -> float:
        return self._clock()

    def _known(self, batch_id: str) -> SimulatedBatch:
        known = self._batches.get(batch_id)
        if known is None:
            known = SimulatedBatch(batch_id, self._clock(), f"demo-{batch_id}", f"{batch_id}-requests", "batch-command")
            self._batches[batch_id] = known
        return known

    def batch(self, batch_id: str, lag_s: float = 0.0) -> dict[str, Any]:
        """The batch's state now (or ``lag_s`` seconds ago), advancing from the first time it was asked for."""
        return self._render(self._known(batch_id), lag_s)

    # --- controls for tests and the benchmark --------------------------------------------------------------------

    def schedule(self, batch_id: str, complete_at: float) -> None:
        """Keep the batch IN_PROGRESS (steady counters) until clock time ``complete_at``, then COMPLETED.

        Ids containing ``fail`` end FAILED instead. Scheduling replaces the
        batch's own pace, from its start: schedule it before it is first asked
        for, or its earlier answers will not match its history.
        """
        self._batches[batch_id] = replace(self._known(batch_id), complete_at=complete_at)

    def changed_at(self, batch_id: str) -> float | None:
        """The clock time a scheduled batch changes (changed) to its terminal state; None if not scheduled."""
        known = self._batches.get(batch_id)
        return None if known is None else known.complete_at

    def lag_next(self, batch_id: str, seconds: float, count: int = 1) -> None:
        """The next ``count`` GETs of ``batch_id`` describe it as it was ``seconds`` earlier."""
        if seconds < 0 or count < 1:
            raise ValueError("lag_next needs seconds >= 0 and count >= 1")
        self._forced_lags.setdefault(batch_id, deque()).extend([seconds] * count)

    def _lag_for_get(self, batch_id: str) -> float:
        """How far back this GET of ``batch_id`` looks: a forced lag first, then every ``lag_every``-th GET."""
        count = self._gets_by_id.get(batch_id, 0) + 1
        self._gets_by_id[batch_id] = count
        forced = self._forced_lags.get(batch_id)
        if forced:
            lag = forced.popleft()
            if not forced:
                del self._forced_lags[batch_id]
            return lag
        if self.lag_s > 0 and self.lag_every > 0 and count % self.lag_every == 0:
            return self.lag_s
        return 0.0

    # --- rendering -----------------------------------------------------------------------------------------------

    def _progress(self, known: SimulatedBatch, records: int, now: float) -> _Progress:
        # A cancel counts only from the moment it arrived (a lagging answer may predate it).
        canceled_at = known.canceled_at if known.canceled_at is not None and known.canceled_at <= now else None
        if known.complete_at is not None:
            progress = self._scheduled(known, records, now, canceled_at)
        else:
            progress = self._paced(known, records, now, canceled_at)
        if canceled_at is not None:
            canceled = canceled_at - known.started
            if now - canceled_at >= self.cancel_s:
                status, changed = "BATCH_STATUS_CANCELED", canceled + self.cancel_s
            else:
                status, changed = "BATCH_STATUS_CANCELING", canceled
            return _Progress(status, progress.done, changed)
        return progress

    def _paced(self, known: SimulatedBatch, records: int, now: float, canceled_at: float | None) -> _Progress:
        """The batch's own pace: QUEUED, IN_PROGRESS with growing counters, terminal after ``span_s``."""
        span = self.span_s(known.id)
        # A cancel freezes the counters where they were when it arrived.
        elapsed = (min(now, canceled_at) if canceled_at is not None else now) - known.started
        progress = min(1.0, max(0.0, elapsed) / span)
        done = int(records * max(0.0, (progress - 0.1) / 0.9))
        if progress < 0.1:
            return _Progress("BATCH_STATUS_QUEUED", done, 0.0)
        if progress < 1.0:
            # The moment ``done`` reached its current value (or the start of IN_PROGRESS).
            return _Progress("BATCH_STATUS_IN_PROGRESS", done, span * (0.1 + 0.9 * done / records))
        return _Progress(_terminal(known.id), records, span)

    @staticmethod
    def _scheduled(known: SimulatedBatch, records: int, now: float, canceled_at: float | None) -> _Progress:
        """A scheduled batch: IN_PROGRESS at half its records from its start, terminal from ``complete_at``."""
        assert known.complete_at is not None
        if now < known.complete_at or (canceled_at is not None and canceled_at < known.complete_at):
            return _Progress("BATCH_STATUS_IN_PROGRESS", records // 2, 0.0)
        return _Progress(_terminal(known.id), records, known.complete_at - known.started)

    def _render(self, known: SimulatedBatch, lag_s: float = 0.0) -> dict[str, Any]:
        batch_id = known.id
        records = self.datasets.rows_of(known.input_dataset_id) or 1000 + int(9000 * _fraction(batch_id, "size"))
        # A lagging answer never reaches back before the batch existed.
        progress = self._progress(known, records, max(known.started, self._clock() - lag_s))
        done = progress.done
        failed = done // 50 if "fail" in batch_id else 0
        created = known.started + self._epoch_offset
        completed = known.started + progress.changed if progress.status == "BATCH_STATUS_COMPLETED" else None
        output_id = self.datasets.batch_output(batch_id, known.input_dataset_id, completed)
        return {
            "id": batch_id,
            "name": known.name,
            "creator_id": CREATOR_ID,
            "org_id": ORG_ID,
            "status": progress.status,
            "created_at": rfc3339(created),
            "updated_at": rfc3339(created + progress.changed),
            "input_dataset_id": known.input_dataset_id,
            **({"output_dataset_id": output_id} if output_id is not None else {}),
            "input_tokens": str(done * 120),
            "output_tokens": str(done * 80),
            "model": known.model,
            "num_records": records,
            "num_successful_records": done - failed,
            "num_failed_records": failed,
            "status_reason": "some records failed" if failed else "",
        }

    def create(self, name: str, input_dataset_id: str, model: str) -> dict[str, Any]:
        """A new batch, QUEUED now."""
        known = SimulatedBatch(str(uuid.uuid4()), self._clock(), name, input_dataset_id, model)
        self._batches[known.id] = known
        return self._render(known)

    def cancel(self, batch_id: str) -> bool:
        """Cancel a known batch if it is still active; whether the id is known."""
        known = self._batches.get(batch_id)
        if known is None:
            return False
        if known.canceled_at is None and self._render(known)["status"] in ACTIVE_STATUSES:
            self._batches[batch_id] = replace(known, canceled_at=self._clock())
        return True

    def page(self, order_by: str, page_size: int, after: tuple[str, str] | None) -> tuple[list[dict[str, Any]], bool]:
        """One page, newest first by ``order_by``, after the (timestamp, id) ``after``; and whether more follow."""
        rendered = sorted(
            (self._render(known) for known in list(self._batches.values())),
            key=lambda batch: (batch[order_by], batch["id"]),
            reverse=True,
        )
        if after is not None:
            rendered = [batch for batch in rendered if (batch[order_by], batch["id"]) < after]
        return rendered[:page_size], len(rendered) > page_size

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {self.token}".encode())

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self._note(request, body)
        return body

    def _note(self, request: web.Request, body: bytes = b"") -> None:
        """Count and keep a request (a dataset route's body is never kept: it may be an upload)."""
        self.calls += 1
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        self.seen.append(SeenRequest(request.method, request.path, request.query_string, headers, body))
        batch_id = request.match_info.get("id")
        if batch_id is not None:
            self.calls_by_id[batch_id] = self.calls_by_id.get(batch_id, 0) + 1

    async def get_batch(self, request: web.Request) -> web.Response:
        await self._record(request)
        if not self._authorized(request):
            return _error(401, "invalid api token")
        batch_id = request.match_info["id"]
        if batch_id.startswith("missing"):
            return _error(404, f"batch {batch_id} not found")
        return web.json_response({"batch": self.batch(batch_id, self._lag_for_get(batch_id))})

    async def create_batch(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not self._authorized(request):
            return _error(401, "invalid api token")
        try:
            document = json.loads(body)
        except ValueError:
            return _error(400, "the body must be a JSON object")
        if not isinstance(document, dict):
            return _error(400, "the body must be a JSON object")
        bad = [name for name in CREATE_FIELDS if not (isinstance(document.get(name), str) and document[name])]
        if bad:
            return _error(400, f"invalid or missing field(s): {', '.join(bad)} (each must be a non-empty string)")
        unusable = await self.datasets.unusable_input(document["input_dataset_id"])
        if unusable is not None:
            return _error(400, unusable)
        return web.json_response({"batch": self.create(*(document[name] for name in CREATE_FIELDS))})

    async def list_batches(self, request: web.Request) -> web.Response:
        await self._record(request)
        if not self._authorized(request):
            return _error(401, "invalid api token")
        wanted = read_page_query(request.query)
        if isinstance(wanted, str):
            return _error(400, wanted)
        batches, more = self.page(wanted.order_by, wanted.page_size, wanted.after)
        answer: dict[str, Any] = {"batches": batches}
        if more:
            last = batches[-1]
            answer["next_page_token"] = page_token(wanted.order_by, last[wanted.order_by], last["id"])
        return web.json_response(answer)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        await self._record(request)
        if not self._authorized(request):
            return _error(401, "invalid api token")
        batch_id = request.match_info["id"]
        if not self.cancel(batch_id):
            return _error(404, f"batch {batch_id} not found")
        return web.json_response({})

    def add_routes(self, router: web.UrlDispatcher, prefix: str = "") -> None:
        """The batch API's routes, under ``prefix``. ``{id}:cancel`` matches before ``{id}`` can claim it."""
        router.add_post(prefix + "/v2/batches/{id}:cancel", self.cancel_batch)
        router.add_get(prefix + "/v2/batches/{id}", self.get_batch)
        router.add_get(prefix + "/v2/batches", self.list_batches)
        router.add_post(prefix + "/v2/batches", self.create_batch)
        self.datasets.add_routes(router, prefix)

    def app(self) -> web.Application:
        app = web.Application()
        self.add_routes(app.router)
        return app


def _terminal(batch_id: str) -> str:
    return "BATCH_STATUS_FAILED" if "fail" in batch_id else "BATCH_STATUS_COMPLETED"


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=json.dumps({"message": message}), content_type="application/json")


async def start_simulator(simulator: Simulator, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve the simulator; returns its runner and base URL."""
    runner = web.AppRunner(simulator.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    simulator.url = f"http://{bound_host}:{bound_port}"
    return runner, simulator.url
