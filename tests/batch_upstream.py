"""A fake Cohere upstream for the whole batch API (DESIGN §8), and helpers for the tests of it.

``BatchUpstream`` serves the four batch endpoints on 127.0.0.1 the way
Cohere does: ``POST /v2/batches`` creates a batch with a fresh id,
``GET /v2/batches`` lists them a page at a time, ``GET /v2/batches/{id}``
retrieves one and ``POST /v2/batches/{id}:cancel`` sets it CANCELING. Every
request is recorded (``Seen``: method, path, query, headers, body, and the
answer given). Each endpoint can be told to misbehave:

- ``fail(endpoint, status, ...)``: answer this status, body and headers
  instead (the next ``times`` calls, or every call);
- ``hold(endpoint)``: hold the answer until the returned event is set (the
  answer is made when the request arrives: a held retrieve answers with the
  state the batch had then);
- ``hang(endpoint)``: do the work (a create creates its batch) and then never
  answer, so the gateway gives up after ``upstream.timeout_s``;
- ``drop(endpoint)``: do the work, then close the connection unanswered;
- ``seed(...)``: a batch that exists upstream and that no caller created
  through the gateway.

``arrival(endpoint, count)`` waits (no polling) until that many requests
for the endpoint have arrived.

Helpers for the tests live here as well (nothing in ``tests/support.py`` is
changed): ``create_body``, ``post_json``, ``assert_error`` and
``write_callers``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from tests.support import (
    BILLING_KEY,
    EXCHANGE_TIMEOUT_S,
    REPORTING_KEY,
    Answer,
    assert_no_secrets,
    http,
    serve_on_loopback,
    sha256_hex,
)

Endpoint = Literal["create", "list", "retrieve", "cancel"]
ENDPOINTS: tuple[Endpoint, ...] = ("create", "list", "retrieve", "cancel")

ACTIVE = "BATCH_STATUS_IN_PROGRESS"
CANCELING = "BATCH_STATUS_CANCELING"
QUEUED = "BATCH_STATUS_QUEUED"

WAIT_S = 10.0  # bound on every wait for the fake upstream


@dataclass
class Seen:
    """One request the upstream received, and what it answered (``None``: nothing, yet or ever)."""

    endpoint: Endpoint | None
    method: str
    path: str
    query: MultiDict[str]
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    answer_status: int | None = None
    answer_body: bytes | None = None


@dataclass
class Fault:
    """What an endpoint does instead of its normal answer."""

    kind: Literal["fail", "hold", "hang", "drop"]
    status: int = 500
    body: bytes = b'{"message": "upstream says no"}'
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None  # None: every call
    work: bool = True  # hang or drop: whether the work (a create's batch) is done first
    release: asyncio.Event = field(default_factory=asyncio.Event)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class BatchUpstream:
    """The fake Cohere batch API on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self.batches: dict[str, dict[str, Any]] = {}
        self.requests: list[Seen] = []
        self.faults: dict[Endpoint, Fault] = {}
        self.url = ""
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # --- what tests read -------------------------------------------------------------

    def calls(self, endpoint: str | None = None) -> list[Seen]:
        """Every request for ``endpoint`` (None: every request at all), in order."""
        return [seen for seen in self.requests if endpoint is None or seen.endpoint == endpoint]

    def count(self, endpoint: str | None = None) -> int:
        return len(self.calls(endpoint))

    async def arrival(self, endpoint: str | None, count: int = 1, timeout_s: float = WAIT_S) -> Seen:
        """Wait until ``count`` requests for ``endpoint`` have arrived; the ``count``-th."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.count(endpoint) >= count), timeout_s)
        return self.calls(endpoint)[count - 1]

    # --- what tests set up -----------------------------------------------------------

    def seed(
        self,
        batch_id: str | None = None,
        *,
        name: str = "seeded",
        input_dataset_id: str = "dataset-seeded",
        status: str = ACTIVE,
        age_s: float = 3600.0,
        **fields: Any,
    ) -> dict[str, Any]:
        """A batch that exists upstream, created ``age_s`` ago by no caller of the gateway."""
        created = datetime.now(UTC) - timedelta(seconds=age_s)
        batch = self._new_batch(batch_id, name, input_dataset_id, fields.pop("model", "command-r"), created)
        batch.update(status=status, **fields)
        return batch

    def set_status(self, batch_id: str, status: str) -> None:
        self.batches[batch_id]["status"] = status
        self.batches[batch_id]["updated_at"] = iso(datetime.now(UTC))

    def fail(
        self,
        endpoint: Endpoint,
        status: int,
        *,
        body: bytes | Mapping[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        times: int | None = None,
    ) -> None:
        """Answer ``status`` (with ``body`` and ``headers``) for the next ``times`` calls (None: all)."""
        payload = json.dumps(body).encode() if isinstance(body, Mapping) else body
        self.faults[endpoint] = Fault(
            "fail",
            status,
            payload if payload is not None else json.dumps({"message": f"upstream says {status}"}).encode(),
            headers or {},
            times,
        )

    def hold(self, endpoint: Endpoint, times: int | None = 1) -> asyncio.Event:
        """Hold the next ``times`` answers (made at arrival) until the returned event is set."""
        fault = Fault("hold", times=times)
        self.faults[endpoint] = fault
        return fault.release

    def hang(self, endpoint: Endpoint, times: int | None = 1, *, work: bool = True) -> None:
        """Do the work (``work``: a create creates its batch), then never answer."""
        self.faults[endpoint] = Fault("hang", times=times, work=work)

    def drop(self, endpoint: Endpoint, times: int | None = 1) -> None:
        """Do the work, then close the connection without answering."""
        self.faults[endpoint] = Fault("drop", times=times)

    def heal(self, endpoint: Endpoint) -> None:
        self.faults.pop(endpoint, None)

    # --- serving ---------------------------------------------------------------------

    async def start(self) -> BatchUpstream:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner, self.url = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        self._stopping.set()
        for fault in self.faults.values():
            fault.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _endpoint(method: str, path: str) -> tuple[Endpoint | None, str | None]:
        if path == "/v2/batches":
            return {"POST": "create", "GET": "list"}.get(method), None  # type: ignore[return-value]
        prefix = "/v2/batches/"
        if not path.startswith(prefix) or "/" in path[len(prefix) :]:
            return None, None
        rest = path[len(prefix) :]
        if method == "POST" and rest.endswith(":cancel"):
            return "cancel", rest[: -len(":cancel")]
        if method == "GET":
            return "retrieve", rest
        return None, None

    def _take_fault(self, endpoint: Endpoint | None) -> Fault | None:
        if endpoint is None:
            return None
        fault = self.faults.get(endpoint)
        if fault is None:
            return None
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[endpoint]
        return fault

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        endpoint, batch_id = self._endpoint(request.method, request.path)
        seen = Seen(
            endpoint,
            request.method,
            request.path,
            MultiDict(request.query),
            request.query_string,
            CIMultiDict(request.headers),
            body,
        )
        async with self._changed:
            self.requests.append(seen)
            self._changed.notify_all()
        fault = self._take_fault(endpoint)
        if fault is not None and fault.kind == "fail":
            status, payload, headers = fault.status, fault.body, fault.headers
        else:
            (status, payload), headers = self._answer(endpoint, batch_id, seen), {}
        if fault is not None and fault.kind in ("hang", "drop"):
            if not fault.work:
                self._undo_create(payload)
            if fault.kind == "drop":
                assert request.transport is not None
                request.transport.abort()
            # Cancelled when the gateway gives up on the connection; released at the latest by stop().
            await self._stopping.wait()
            return web.Response(status=599)
        if fault is not None and fault.kind == "hold":
            await fault.release.wait()
        seen.answer_status, seen.answer_body = status, payload
        return web.Response(status=status, body=payload, headers=headers, content_type="application/json")

    # --- the batch API itself --------------------------------------------------------

    def _new_batch(
        self, batch_id: str | None, name: str, input_dataset_id: str, model: str, created: datetime
    ) -> dict[str, Any]:
        batch_id = batch_id or f"batch-{next(self._ids):04d}"
        batch: dict[str, Any] = {
            "id": batch_id,
            "name": name,
            "creator_id": "user-1",
            "org_id": "org-1",
            "status": QUEUED,
            "created_at": iso(created),
            "updated_at": iso(created),
            "input_dataset_id": input_dataset_id,
            "model": model,
            "num_records": 10,
            "num_successful_records": 0,
            "num_failed_records": 0,
        }
        self.batches[batch_id] = batch
        return batch

    def _undo_create(self, payload: bytes) -> None:
        try:
            created = json.loads(payload)["batch"]["id"]
        except (ValueError, KeyError, TypeError):
            return
        self.batches.pop(created, None)

    def _answer(self, endpoint: Endpoint | None, batch_id: str | None, seen: Seen) -> tuple[int, bytes]:
        if endpoint == "create":
            return self._create(seen.body)
        if endpoint == "list":
            return self._list(seen.query)
        if endpoint is None or batch_id is None or batch_id not in self.batches:
            return 404, json.dumps({"message": f"batch {batch_id!r} not found"}).encode()
        if endpoint == "cancel":
            self.set_status(batch_id, CANCELING)
            return 200, b"{}"
        return 200, json.dumps({"batch": self.batches[batch_id]}).encode()

    def _create(self, body: bytes) -> tuple[int, bytes]:
        try:
            document = json.loads(body)
            name, dataset, model = document["name"], document["input_dataset_id"], document["model"]
        except (ValueError, KeyError, TypeError):
            return 400, b'{"message": "invalid batch"}'
        batch = self._new_batch(None, name, dataset, model, datetime.now(UTC))
        return 200, json.dumps({"batch": batch}).encode()

    def _list(self, query: MultiDict[str]) -> tuple[int, bytes]:
        order = query.get("order_by", "created_at")
        ordered = sorted(self.batches.values(), key=lambda b: b.get(order, ""), reverse=True)
        size_text = query.get("page_size", "50")
        size = int(size_text) if size_text.isdigit() and int(size_text) > 0 else 50
        token = query.get("page_token", "page.0").removeprefix("page.")
        offset = int(token) if token.isdigit() else 0  # a token the fake never gave: the first page
        page: dict[str, Any] = {"batches": ordered[offset : offset + size]}
        if offset + size < len(ordered):
            page["next_page_token"] = f"page.{offset + size}"
        return 200, json.dumps(page).encode()


@pytest.fixture(name="upstream")
async def upstream_fixture() -> AsyncIterator[BatchUpstream]:
    """A started ``BatchUpstream``, stopped at the end (import this into a test module to use it)."""
    upstream = await BatchUpstream().start()
    yield upstream
    await upstream.stop()


# ---------------------------------------------------------------------------
# Helpers for the tests of the batch API
# ---------------------------------------------------------------------------

ALL_OPERATIONS = ["retrieve", "list", "create", "cancel"]


def caller(name: str, key: str, allow: list[str] | None = None, batches: str = "all", **extra: Any) -> dict[str, Any]:
    """One ``callers[]`` entry; the reporting caller is configured by digest, as in ``make_config``."""
    entry: dict[str, Any] = {"name": name, "batches": batches, **extra}
    if key == REPORTING_KEY:
        entry["key_sha256"] = sha256_hex(key)
    else:
        entry["key"] = key
    if allow is not None:
        entry["allow"] = allow
    return entry


def write_callers(billing: str = "all", reporting: str = "all", **extra: Any) -> list[dict[str, Any]]:
    """Both callers allowed every operation, with the given scopes."""
    return [
        caller("billing-service", BILLING_KEY, ALL_OPERATIONS, billing, **extra),
        caller("reporting", REPORTING_KEY, ALL_OPERATIONS, reporting),
    ]


def create_body(
    name: str = "nightly", input_dataset_id: str = "dataset-1", model: str = "command-r", **extra: Any
) -> bytes:
    return json.dumps({"name": name, "input_dataset_id": input_dataset_id, "model": model, **extra}).encode()


async def post_json(
    url: str,
    body: bytes,
    *,
    key: str | None = BILLING_KEY,
    idempotency_key: str | None = None,
    content_type: str | None = "application/json",
    headers: Mapping[str, str] | None = None,
    timeout_s: float = EXCHANGE_TIMEOUT_S,
) -> Answer:
    """A POST with aiohttp; the answer is checked for secrets."""
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    if idempotency_key is not None:
        sent["Idempotency-Key"] = idempotency_key
    answer = await http(url, method="POST", key=key, headers=sent, data=body, timeout_s=timeout_s)
    assert_no_secrets(answer.body)
    return answer


def assert_error(answer: Answer, status: int, code: str | None = None) -> None:
    """The contract's error: the status, the JSON shape, the code, and the request id in both places."""
    assert answer.status == status, (answer.status, answer.body[:300])
    assert_json_error_shape(answer)
    if code is not None:
        assert answer.code == code, answer.body[:300]


def assert_json_error_shape(answer: Answer) -> None:
    """Any error answer: JSON with message, code and request_id, the id also in ``X-Request-ID``."""
    assert (answer.header("Content-Type") or "").split(";")[0] == "application/json", answer.raw[:300]
    document = answer.document
    assert isinstance(document.get("message"), str)
    assert document["message"]
    assert isinstance(document.get("code"), str)
    assert document["code"]
    assert document.get("request_id") == answer.header("X-Request-ID")
    assert_no_secrets(answer.body)
