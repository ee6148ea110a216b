"""The fake Cohere upstream of the test suite (one class, one fixture), and helpers for the tests of it.

``Upstream`` listens on 127.0.0.1 and, left alone, serves the batch API the
way Cohere does (docs/design.md §8): ``POST /v2/batches`` creates a batch with a
fresh id, ``GET /v2/batches`` lists them a page at a time,
``GET /v2/batches/{id}`` retrieves one and ``POST /v2/batches/{id}:cancel``
sets it CANCELING. A test changes what it answers:

- ``script(handler, route)``: an aiohttp handler answers that route
  (``"*"``, the default: every request) instead of the batch API;
- ``fail(route, status, ...)``: answer this status, body and headers
  instead (the next ``times`` calls, or every call);
- ``hold(route)``: hold the answers until the returned event is set (the
  batch API makes its answer when the request arrives: a held retrieve
  answers with the state the batch had then; a scripted handler runs once
  released);
- ``hang(route)``: do the work (a create creates its batch) and then never
  answer, so the gateway gives up after ``upstream.timeout_s``;
- ``drop(route)``: do the work, then close the connection unanswered;
- ``raw(respond)``: answer at the byte level, for the HTTP that aiohttp
  cannot produce (broken framing, interim answers, resets): ``respond``
  gets each request head with the connection's reader and writer;
- ``seed(...)``: a batch that exists upstream and that no caller created
  through the gateway; ``seed_dataset(rows)`` a validated dataset.

The dataset routes (docs/design.md §11) are the simulator's own
(``gateway.demo.datasets``, in ``upstream.datasets``, validating at once):
``upload`` (``POST /v1/datasets``), ``dataset``, ``datasets``,
``delete_dataset``, ``dataset_usage``, and ``part``, the storage route the
part URLs point at (no caller key: signed URLs). The faults above work on
them by these names. An upload's body is never kept: its ``Seen`` has
``body_size`` and ``upload`` (each part's name, size and SHA-256) instead.
The storage route answers 400 to a request with an Authorization header,
and the fixture fails the test if one ever reached it (a test that sends one
on purpose sets ``upstream.datasets.authorized_storage_requests = 0``).

Every request is recorded (``requests``: ``Seen``, with method, path, query,
headers, body and the answer given); ``count(route)`` and ``calls(route)``
read them, ``arrival(route, n)`` waits (no polling) until the n-th has come.
``another()`` starts a second upstream (a redirect's target, a reload's new
upstream), stopped with the first. The ``upstream`` fixture is a started
one, stopped at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from gateway.demo import rows
from gateway.demo.datasets import UPLOAD_KEY, SimulatedDatasets, StoredDataset, route_of
from gateway.demo.rows import Parsed
from gateway.demo.uploads import Upload
from tests.support import (
    BILLING_KEY,
    EXCHANGE_TIMEOUT_S,
    REPORTING_KEY,
    Answer,
    assert_no_secrets,
    http,
    sha256_hex,
)

Endpoint = Literal[
    "create", "list", "retrieve", "cancel", "upload", "dataset", "datasets", "delete_dataset", "dataset_usage", "part"
]
Route = Literal[  # "*": every request, known route or not
    "create",
    "list",
    "retrieve",
    "cancel",
    "upload",
    "dataset",
    "datasets",
    "delete_dataset",
    "dataset_usage",
    "part",
    "*",
]
ENDPOINTS: tuple[Endpoint, ...] = ("create", "list", "retrieve", "cancel")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Respond = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]

ACTIVE = "BATCH_STATUS_IN_PROGRESS"
CANCELING = "BATCH_STATUS_CANCELING"
QUEUED = "BATCH_STATUS_QUEUED"

WAIT_S = 10.0  # bound on every wait for the fake upstream


@dataclass
class Seen:
    """One request the upstream received, and what it answered (``None``: nothing, yet or ever).

    A request answered by ``raw`` has its head only: ``body`` is empty (the
    responder reads the body itself, if it wants it).
    """

    endpoint: Endpoint | None
    method: str
    path: str
    query: MultiDict[str]
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    raw_path: str = ""  # the request target as it came, %-escapes and query included
    answer_status: int | None = None
    answer_body: bytes | None = None
    body_size: int | None = None  # an upload's: the bytes of its body (which ``body`` does not keep)
    upload: Upload | None = None  # an upload's parts (name, filename, size, SHA-256), once it has been read

    @property
    def data_sha256(self) -> str | None:
        """The SHA-256 of an upload's ``data`` part."""
        parts = self.upload.parts if self.upload is not None else ()
        return next((part.sha256 for part in parts if part.name == "data"), None)


@dataclass
class Fault:
    """What a route does instead of its normal answer."""

    kind: Literal["fail", "hold", "hang", "drop"]
    status: int = 500
    body: bytes = b'{"message": "upstream says no"}'
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None  # None: every call
    work: bool = True  # hang or drop: whether the work (a create's batch) is done first
    release: asyncio.Event = field(default_factory=asyncio.Event)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def endpoint_of(method: str, path: str) -> tuple[Endpoint | None, str | None]:
    """The endpoint a request is for, and the batch or dataset id in its path (None: not the upstream's API)."""
    dataset_route = route_of(method, path)
    if dataset_route is not None:
        return dataset_route[0], dataset_route[1].get("id")  # type: ignore[return-value]
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


def seen_from_head(head: bytes) -> Seen:
    """A raw request head as ``Seen`` (what could be parsed of it: the head may be broken on purpose)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    method, target = (parts[0], parts[1]) if len(parts) > 1 else (lines[0], "")
    path, _, query_string = target.partition("?")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    query: MultiDict[str] = MultiDict()
    for pair in filter(None, query_string.split("&")):
        name, _, value = pair.partition("=")
        query.add(name, value)
    return Seen(endpoint_of(method, path)[0], method, path, query, query_string, headers, b"", target)


class Upstream:
    """The fake Cohere upstream on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self.batches: dict[str, dict[str, Any]] = {}
        self.requests: list[Seen] = []
        self.faults: dict[Route, Fault] = {}
        self.handlers: dict[Route, Handler] = {}
        self.respond: Respond | None = None
        # Set at every request (a test may clear it to wait for the next one).
        self.arrived = asyncio.Event()
        # Set when the upstream stops: what a stalled answer waits for.
        self.stopping = asyncio.Event()
        # Connections answered by ``raw``: in all, open now, and the most open at once.
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.url = ""
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._raw_tasks: set[asyncio.Task[None]] = set()
        self._others: list[Upstream] = []
        self.datasets = SimulatedDatasets(validation_s=0.0, rows_per_part=100)

    # --- what tests read -------------------------------------------------------------

    @property
    def headers(self) -> list[CIMultiDict[str]]:
        """The headers of every request, in order."""
        return [seen.headers for seen in self.requests]

    def calls(self, route: Route | None = "*") -> list[Seen]:
        """Every request for ``route`` ("*": every request; None: those outside the batch API), in order."""
        return [seen for seen in self.requests if route == "*" or seen.endpoint == route]

    def count(self, route: Route | None = "*") -> int:
        return len(self.calls(route))

    async def arrival(self, route: Route | None = "*", count: int = 1, timeout_s: float = WAIT_S) -> Seen:
        """Wait until ``count`` requests for ``route`` have arrived; the ``count``-th."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.count(route) >= count), timeout_s)
        return self.calls(route)[count - 1]

    # --- what tests set up -----------------------------------------------------------

    def script(self, handler: Handler, route: Route = "*") -> Upstream:
        """``handler`` answers ``route`` from now on (faults still come first)."""
        self.handlers[route] = handler
        return self

    def raw(self, respond: Respond) -> Upstream:
        """Answer every connection opened from now on at the byte level with ``respond``."""
        self.respond = respond
        return self

    async def another(self) -> Upstream:
        """A second upstream on a port of its own, stopped when this one is."""
        other = await Upstream().start()
        self._others.append(other)
        return other

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

    def seed_dataset(
        self,
        rows_of: list[dict[str, Any]],
        *,
        dataset_id: str | None = None,
        name: str = "seeded",
        dataset_type: str = "batch-embed-v2-input",
    ) -> str:
        """A validated dataset that exists upstream (rows as its Avro schema has them); its id."""
        known = StoredDataset(dataset_id or f"{name}-{next(self._ids):04d}", name, dataset_type, 0.0, 0)
        writer = rows.PartWriter(self.datasets.directory, known.id, dataset_type, self.datasets.rows_per_part)
        for row in rows_of:
            writer.add(row)
        known.parsed = Parsed(writer.close())
        known.size_bytes = sum(part.size_bytes for part in known.parsed.parts)
        known.created = self.datasets.now()
        self.datasets.datasets[known.id] = known
        return known.id

    def set_status(self, batch_id: str, status: str) -> None:
        self.batches[batch_id]["status"] = status
        self.batches[batch_id]["updated_at"] = iso(datetime.now(UTC))

    def fail(
        self,
        route: Route,
        status: int,
        *,
        body: bytes | Mapping[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        times: int | None = None,
    ) -> None:
        """Answer ``status`` (with ``body`` and ``headers``) for the next ``times`` calls (None: all)."""
        payload = json.dumps(body).encode() if isinstance(body, Mapping) else body
        self.faults[route] = Fault(
            "fail",
            status,
            payload if payload is not None else json.dumps({"message": f"upstream says {status}"}).encode(),
            headers or {},
            times,
        )

    def hold(self, route: Route = "*", times: int | None = 1) -> asyncio.Event:
        """Hold the next ``times`` answers (None: all) until the returned event is set."""
        fault = Fault("hold", times=times)
        self.faults[route] = fault
        return fault.release

    def hang(self, route: Route, times: int | None = 1, *, work: bool = True) -> None:
        """Do the work (``work``: a create creates its batch), then never answer."""
        self.faults[route] = Fault("hang", times=times, work=work)

    def drop(self, route: Route, times: int | None = 1) -> None:
        """Do the work, then close the connection without answering."""
        self.faults[route] = Fault("drop", times=times)

    def heal(self, route: Route) -> None:
        self.faults.pop(route, None)

    # --- serving ---------------------------------------------------------------------

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # Handlers whose client left are cancelled, as a real server's work would stop.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        # One listening socket for both ways of answering: each connection goes to
        # aiohttp, or to ``respond`` once ``raw`` has been called.
        self._server = await asyncio.get_running_loop().create_server(self._protocol, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        self.stopping.set()
        for fault in self.faults.values():
            fault.release.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._raw_tasks):
            task.cancel()
        if self._raw_tasks:
            await asyncio.wait(self._raw_tasks, timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
        for other in self._others:
            await other.stop()

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.respond is None:
            assert self._runner is not None
            assert self._runner.server is not None
            return self._runner.server()
        respond = self.respond
        return asyncio.StreamReaderProtocol(
            asyncio.StreamReader(), lambda reader, writer: self._serve_raw(respond, reader, writer)
        )

    async def _record(self, seen: Seen) -> None:
        async with self._changed:
            self.requests.append(seen)
            self.arrived.set()
            self._changed.notify_all()

    def _take_fault(self, endpoint: Endpoint | None) -> Fault | None:
        route: Route | None = endpoint if endpoint in self.faults else "*" if "*" in self.faults else None
        if route is None:
            return None
        fault = self.faults[route]
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[route]
        return fault

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        endpoint, batch_id = endpoint_of(request.method, request.path)
        # An upload streams to disk as the simulator reads it: never held here.
        body = b"" if endpoint == "upload" else await request.read()
        seen = Seen(
            endpoint,
            request.method,
            request.path,
            MultiDict(request.query),
            request.query_string,
            CIMultiDict(request.headers),
            body,
            request.raw_path,
        )
        await self._record(seen)
        fault = self._take_fault(endpoint)
        handler = self.handlers.get(endpoint) if endpoint in self.handlers else self.handlers.get("*")
        if fault is not None and fault.kind == "fail":
            return self._answered(
                seen,
                web.Response(
                    status=fault.status, body=fault.body, headers=fault.headers, content_type="application/json"
                ),
            )
        if fault is not None and fault.kind in ("hang", "drop"):
            if handler is not None and fault.work:
                await handler(request)
            elif handler is None:
                made = await self._api(endpoint, batch_id, seen, request)
                if not fault.work:
                    self._undo_create(made)
            if fault.kind == "drop":
                assert request.transport is not None
                request.transport.abort()
            # Cancelled when the gateway gives up on the connection; released at the latest by stop().
            await self.stopping.wait()
            return web.Response(status=599)
        if handler is not None:
            if fault is not None:
                await fault.release.wait()
            return self._answered(seen, await handler(request))
        answer = await self._api(endpoint, batch_id, seen, request)
        if fault is not None:
            await fault.release.wait()
        return self._answered(seen, answer, request)

    @staticmethod
    def _answered(seen: Seen, answer: web.StreamResponse, request: web.Request | None = None) -> web.StreamResponse:
        upload = request.get(UPLOAD_KEY) if request is not None else None
        if upload is not None:
            seen.upload, seen.body_size = upload, upload.body_size
        seen.answer_status = answer.status
        if isinstance(answer, web.Response) and isinstance(answer.body, bytes):
            seen.answer_body = answer.body
        return answer

    async def _serve_raw(self, respond: Respond, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._raw_tasks.add(task)
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                await self._record(seen_from_head(head))
                await respond(reader, writer, head)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_now -= 1
            self._raw_tasks.discard(task)
            writer.close()

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

    def _undo_create(self, made: web.StreamResponse) -> None:
        if not isinstance(made, web.Response) or not isinstance(made.body, bytes):
            return
        try:
            created = json.loads(made.body)["batch"]["id"]
        except (ValueError, KeyError, TypeError):
            return
        self.batches.pop(created, None)

    async def _api(
        self, endpoint: Endpoint | None, batch_id: str | None, seen: Seen, request: web.Request
    ) -> web.StreamResponse:
        dataset_route = route_of(request.method, request.path)
        if dataset_route is not None:
            return await self.datasets.answer(dataset_route[0], request, dataset_route[1])
        status, payload = self._answer(endpoint, batch_id, seen)
        return web.Response(status=status, body=payload, content_type="application/json")

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


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A started ``Upstream`` (the batch API until the test scripts it), stopped at the end."""
    started = await Upstream().start()
    yield started
    await started.stop()
    assert started.datasets.authorized_storage_requests == 0, "an Authorization header reached the storage route"


# ---------------------------------------------------------------------------
# Answers to script an upstream with
# ---------------------------------------------------------------------------


def batch_body(batch_id: str = "batch-1", status: str = "BATCH_STATUS_IN_PROGRESS", **fields: Any) -> bytes:
    return json.dumps({"batch": {"id": batch_id, "status": status, "num_records": 10, **fields}}).encode()


def json_handler(status: int = 200, body: bytes | None = None, headers: dict[str, str] | None = None) -> Handler:
    """A handler that always gives the same answer (by default, the batch its path names)."""

    async def handler(request: web.Request) -> web.Response:
        payload = body if body is not None else batch_body(request.match_info.get("tail", "x").rsplit("/", 1)[-1])
        return web.Response(status=status, body=payload, headers=headers, content_type="application/json")

    return handler


def http_answer(status: int, body: bytes, headers: dict[str, str] | None = None, reason: str = "X") -> bytes:
    """An upstream's HTTP/1.1 answer as bytes (for ``raw``), with Content-Length and a JSON content type."""
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


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
