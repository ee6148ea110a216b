"""The simulated upstream's datasets (docs/design.md §11), for ``--demo``, the tests and the benchmark.

``SimulatedDatasets`` serves Cohere's dataset routes:

- ``POST /v1/datasets?name=&type=``: a ``multipart/form-data`` body with a
  file part ``data`` (and optionally ``eval_data``), read as it streams to a
  file on disk (never whole in memory); answers ``{"id": ...}`` at once.
  Validation runs afterwards: ``queued``, ``processing``, then
  ``validated`` or ``failed`` within ``validation_s``. The two batch input
  types are JSONL, one ``{"custom_id": ..., "body": {...}}`` a line; a bad
  line fails the dataset with a ``validation_error`` naming it. Other
  types Cohere knows end ``skipped`` (the demo does not parse them).
- ``GET /v1/datasets/{id}``: ``{"dataset": {...}}`` with every field of
  Cohere's Dataset schema; its parts are Avro files at signed URLs of the
  simulator's own storage route (``gateway.demo.storage``).
- ``GET /v1/datasets`` (``datasetType``, ``before``, ``after``, ``limit``,
  ``offset``, ``validationStatus``), ``DELETE /v1/datasets/{id}`` (``{}``)
  and ``GET /v1/datasets/usage`` (``{"organization_usage": bytes}``).

A batch that completes on an input dataset of one of the batch types gets
an output dataset (``output_for``) with one row per input row, written when
first asked for. ``route_of`` names the route of a path, for a server (the
tests' fake upstream) that dispatches on its own.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.demo import rows
from gateway.demo.pages import read_dataset_list_query
from gateway.demo.rows import INPUT_TYPES, OUTPUT_TYPE, Parsed
from gateway.demo.storage import SignedUrls, serve_file
from gateway.demo.uploads import MAX_UPLOAD_BYTES, Upload, read_upload_query, receive
from gateway.upstream.guards import Clock

WAIT_FOR_VALIDATION_S = 5.0  # how long a GET waits for a validation whose time is up before answering processing
MAX_RECORDED_UPLOADS = 1000
UPLOAD_KEY = web.RequestKey("demo_upload", Upload)  # an upload's record, left on its request for the fake upstream
ROUTES = (
    ("POST", "/v1/datasets", "upload"),
    ("GET", "/v1/datasets", "datasets"),
    ("GET", "/v1/datasets/usage", "dataset_usage"),
    ("GET", "/v1/datasets/{id}", "dataset"),
    ("DELETE", "/v1/datasets/{id}", "delete_dataset"),
    ("GET", "/storage/{id}/{file}", "part"),
)
_MATCHERS = tuple(
    (method, re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)), name) for method, pattern, name in ROUTES
)


def route_of(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """The dataset route of a request (its name and path parameters), or None; HEAD counts as GET."""
    method = "GET" if method == "HEAD" else method
    for route_method, matcher, name in _MATCHERS:
        found = matcher.fullmatch(path)
        if found and route_method == method:
            return name, found.groupdict()
    return None


@dataclass(slots=True)
class StoredDataset:
    """A dataset the simulator holds; its status follows from these and the clock."""

    id: str
    name: str
    dataset_type: str
    created: float  # clock time
    size_bytes: int
    query: dict[str, list[str]] = field(default_factory=dict)
    original: Path | None = None  # the uploaded file, while it is kept
    parsed: Parsed | None = None  # None while validation runs
    task: asyncio.Task[None] | None = None
    source: str | None = None  # an output dataset's input dataset
    deleted: bool = False

    def part_id(self, index: int) -> str:
        return f"{self.id}-part-{index}"

    def files(self) -> dict[str, Path]:
        """The storage route's files of this dataset, by name."""
        named = {f"{self.part_id(part.index)}.avro": part.path for part in (self.parsed.parts if self.parsed else ())}
        if self.original is not None:
            named["original"] = self.original
        return named


def rfc3339(epoch_s: float) -> str:
    """``2026-12-01T22:40:03.123456Z``: UTC with microseconds, as upstream writes its timestamps."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "dataset"


class SimulatedDatasets:
    """The simulated dataset API; ``add_routes`` serves it. Files live in a temp dir removed with the object."""

    def __init__(
        self,
        authorized: Callable[[web.Request], bool] | None = None,
        clock: Clock = time.monotonic,
        validation_s: float = 2.0,
        url_ttl_s: float = 3600.0,
        rows_per_part: int = 10_000,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        on_request: Callable[[web.Request], None] | None = None,
    ) -> None:
        self._authorized = authorized or (lambda request: True)
        self._on_request = on_request or (lambda request: None)
        self._clock = clock
        self._epoch_offset = time.time() - clock()
        self.validation_s = validation_s
        self.rows_per_part = rows_per_part
        self.max_upload_bytes = max_upload_bytes
        self.urls = SignedUrls(secrets.token_bytes(32), url_ttl_s, lambda: self._clock() + self._epoch_offset)
        self.prefix = ""  # set by add_routes: the storage URLs' path starts with it
        self.origin = ""  # the storage URLs' origin; empty: the origin the dataset's GET was sent to
        self.datasets: dict[str, StoredDataset] = {}
        self.uploads: deque[Upload] = deque(maxlen=MAX_RECORDED_UPLOADS)
        # Storage requests refused for carrying an Authorization header: what no client should ever send.
        self.authorized_storage_requests = 0
        self._directory: Path | None = None

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="cohere-gateway-demo-datasets-"))
            weakref.finalize(self, shutil.rmtree, self._directory, True)
        return self._directory

    # --- state ---------------------------------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def _new_id(self, name: str) -> str:
        return f"{_slug(name)}-{secrets.token_hex(4)}"

    def status(self, known: StoredDataset) -> tuple[str, float]:
        """The dataset's validation status now, and the clock time it took that status."""
        queued_until = known.created + (0.0 if known.source else 0.25 * self.validation_s)
        if self._clock() < queued_until:
            return "queued", known.created
        due = known.created + (0.0 if known.source else self.validation_s)
        if known.parsed is None or self._clock() < due:
            return "processing", queued_until
        if known.dataset_type not in rows.SCHEMAS:
            return "skipped", due
        return ("failed" if known.parsed.error else "validated"), due

    def rows_of(self, dataset_id: str) -> int | None:
        """How many rows a validated dataset holds (None: unknown or not validated)."""
        known = self.datasets.get(dataset_id)
        if known is None or known.parsed is None or known.parsed.error or known.dataset_type not in INPUT_TYPES:
            return None
        return sum(part.num_rows for part in known.parsed.parts)

    async def unusable_input(self, dataset_id: str) -> str | None:
        """Why a batch may not read this dataset (None: it may, or the simulator has never heard of it)."""
        known = self.datasets.get(dataset_id)
        if known is None:
            return None
        await self._settled(known)
        if known.dataset_type not in INPUT_TYPES:
            return f"dataset {dataset_id} is of type {known.dataset_type}, not a batch input type"
        if self.status(known)[0] != "validated":
            return f"dataset {dataset_id} is not validated"
        return None

    def batch_output(self, batch_id: str, input_dataset_id: str, completed: float | None) -> str | None:
        """A batch's ``output_dataset_id``, given the clock time it completed (None: not completed).

        On an input dataset of this simulator: its output dataset (one row per
        input row, written when first asked for) once completed, None before.
        On a dataset it has never heard of: ``{batch_id}-output`` all along.
        """
        output_id = f"{batch_id}-output"
        source = self.datasets.get(input_dataset_id)
        if output_id not in self.datasets and (source is None or source.dataset_type not in INPUT_TYPES):
            return output_id
        if completed is None:
            return None
        if source is not None and output_id not in self.datasets:
            output_type = OUTPUT_TYPE[source.dataset_type]
            self.datasets[output_id] = StoredDataset(
                output_id, f"{source.name}-output", output_type, completed, 0, source=source.id
            )
        return output_id

    def _start(self, known: StoredDataset) -> None:
        if known.task is None and known.parsed is None:
            known.task = asyncio.get_running_loop().create_task(self._validate(known))

    async def _validate(self, known: StoredDataset) -> None:
        if known.source is not None:
            source = self.datasets.get(known.source)
            inputs = source.parsed.parts if source is not None and source.parsed is not None else ()
            input_type = next(kind for kind, output in OUTPUT_TYPE.items() if output == known.dataset_type)
            work = rows.write_output
            parsed = await asyncio.to_thread(work, inputs, input_type, self.directory, known.id, self.rows_per_part)
            known.size_bytes = sum(part.size_bytes for part in parsed.parts)
        elif known.original is not None and known.dataset_type in INPUT_TYPES:
            skip = known.query.get("skip_malformed_input") == ["true"]
            args = (known.original, self.directory, known.id, known.dataset_type, self.rows_per_part, skip)
            parsed = await asyncio.to_thread(rows.validate_jsonl, *args)
        else:
            parsed = Parsed()
        if known.original is not None and known.query.get("keep_original_file") != ["true"]:
            known.original.unlink(missing_ok=True)
            known.original = None
        known.parsed = parsed
        if known.deleted:  # deleted while it was being validated: nothing of it stays on disk
            _remove_files(known)

    async def _settled(self, known: StoredDataset) -> None:
        """Start the dataset's validation if it waits for one; if its time is up, give it a moment to end."""
        self._start(known)
        due = known.created + (0.0 if known.source else self.validation_s)
        if known.task is not None and not known.task.done() and self._clock() >= due:
            await asyncio.wait({known.task}, timeout=WAIT_FOR_VALIDATION_S)

    # --- rendering -----------------------------------------------------------------------------------------------

    def _stamp(self, clock_time: float) -> str:
        return rfc3339(clock_time + self._epoch_offset)

    def render(self, known: StoredDataset, origin: str) -> dict[str, Any]:
        """The dataset as Cohere's Dataset schema has it: every field, no other."""
        status, changed = self.status(known)
        parsed = known.parsed if status in ("validated", "failed") else None
        query = known.query
        return {
            "id": known.id,
            "name": known.name,
            "created_at": self._stamp(known.created),
            "updated_at": self._stamp(changed),
            "dataset_type": known.dataset_type,
            "validation_status": status,
            "validation_error": parsed.error if parsed else None,
            "schema": rows.schema_text(known.dataset_type),
            "required_fields": list(rows.REQUIRED_FIELDS) if known.dataset_type in INPUT_TYPES else [],
            "preserve_fields": query.get("keep_fields", []) + query.get("optional_fields", []),
            "dataset_parts": [self._render_part(known, part, origin) for part in (parsed.parts if parsed else ())],
            "validation_warnings": list(parsed.warnings) if parsed else [],
            "parse_info": {"separator": _one(query, "text_separator"), "delimiter": _one(query, "csv_delimiter")},
            "metrics": None,
        }

    def _render_part(self, known: StoredDataset, part: rows.Part, origin: str) -> dict[str, Any]:
        base = self.origin or origin
        path = f"{self.prefix}/storage/{known.id}"
        original = self.urls.sign(base, f"{path}/original") if known.original and part.index == 0 else None
        return {
            "id": known.part_id(part.index),
            "name": f"part-{part.index}.avro",
            "url": self.urls.sign(base, f"{path}/{known.part_id(part.index)}.avro"),
            "index": part.index,
            "size_bytes": part.size_bytes,
            "num_rows": part.num_rows,
            "original_url": original,
            "samples": list(part.samples),
        }

    # --- HTTP ----------------------------------------------------------------------------------------------------

    async def answer(self, route: str, request: web.Request, args: dict[str, str]) -> web.StreamResponse:
        """Serve one dataset route (a name from ``ROUTES``) with its path parameters."""
        self._on_request(request)
        if route == "part":
            return await self._part(request, args["id"], args["file"])
        if not self._authorized(request):
            return _error(401, "invalid api token")
        if route == "upload":
            return await self._upload(request)
        if route == "datasets":
            return await self._list(request)
        if route == "dataset_usage":
            return web.json_response({"organization_usage": sum(k.size_bytes for k in self.datasets.values())})
        known = self.datasets.get(args["id"])
        if known is None:
            return _error(404, f"dataset {args['id']} not found")
        if route == "delete_dataset":
            del self.datasets[known.id]
            known.deleted = True
            _remove_files(known)
            return web.json_response({})
        await self._settled(known)
        return web.json_response({"dataset": self.render(known, str(request.url.origin()))})

    async def _part(self, request: web.Request, dataset_id: str, name: str) -> web.StreamResponse:
        if "Authorization" in request.headers:
            self.authorized_storage_requests += 1
        known = self.datasets.get(dataset_id)
        return serve_file(request, self.urls, None if known is None else known.files().get(name))

    async def _upload(self, request: web.Request) -> web.Response:
        query = read_upload_query(request.query)
        if isinstance(query, str):
            return _error(400, query)
        if request.content_type != "multipart/form-data":
            return _error(400, "the body must be multipart/form-data")
        name, dataset_type = query["name"][-1], query["type"][-1]
        known = StoredDataset(self._new_id(name), name, dataset_type, self._clock(), 0, query)
        target = self.directory / f"{known.id}.upload"
        try:
            parts = await receive(request, target, self.max_upload_bytes)
        except ConnectionError:  # the client left mid-body: nothing is kept, and nobody hears the answer
            parts = "the connection was lost mid-upload"
        except BaseException:  # the handler was cancelled (the fake upstream's server does so): keep nothing
            target.unlink(missing_ok=True)
            raise
        received = request.content.total_bytes
        if isinstance(parts, str):
            target.unlink(missing_ok=True)
            self._note_upload(request, Upload(None, received, ()))
            return _error(413 if "larger" in parts else 400, parts)
        known.original, known.size_bytes = target, next(p.size for p in parts if p.name == "data")
        self.datasets[known.id] = known
        self._start(known)
        self._note_upload(request, Upload(known.id, received, parts))
        return web.json_response({"id": known.id})

    def _note_upload(self, request: web.Request, upload: Upload) -> None:
        self.uploads.append(upload)
        request[UPLOAD_KEY] = upload

    async def _list(self, request: web.Request) -> web.Response:
        wanted = read_dataset_list_query(request.query)
        if isinstance(wanted, str):
            return _error(400, wanted)
        kind, status, before, after, offset, limit = wanted
        origin = str(request.url.origin())
        found = []
        for known in sorted(self.datasets.values(), key=lambda k: k.created, reverse=True):
            await self._settled(known)
            created = datetime.fromisoformat(self._stamp(known.created))
            if (kind and known.dataset_type != kind) or (status and self.status(known)[0] != status):
                continue
            if (before and created >= before) or (after and created <= after):
                continue
            found.append(self.render(known, origin))
        return web.json_response({"datasets": found[offset : None if limit is None else offset + limit]})

    def add_routes(self, router: web.UrlDispatcher, prefix: str = "") -> None:
        """The dataset routes and the storage route, under ``prefix`` (``usage`` before ``{id}`` can claim it)."""
        self.prefix = prefix
        for method, pattern, route in ROUTES:

            async def handler(request: web.Request, route: str = route) -> web.StreamResponse:
                return await self.answer(route, request, dict(request.match_info))

            if method == "GET":  # and HEAD, as a storage host answers it
                router.add_get(prefix + pattern, handler)
            else:
                router.add_route(method, prefix + pattern, handler)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _remove_files(known: StoredDataset) -> None:
    for path in known.files().values():
        path.unlink(missing_ok=True)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)
