"""Dataset routes on the fake upstream, for the tests of the gateway's dataset read routes (docs/design.md §11).

``FakeDatasets(upstream)`` scripts ``tests/upstream.py``'s upstream: it
answers ``GET /v1/datasets/usage``, ``GET /v1/datasets``, ``GET`` and
``DELETE /v1/datasets/{id}`` with Cohere's shapes from datasets a test
sets up and changes at will (a validation that ends when the test says, an
answer older than the last); every other route stays the fake's own. ``CountingLinks`` stands in for the
gateway's signed links: every answer gets part URLs of its own, so that a
test can tell that each answer was rewritten for its caller.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from itertools import count
from typing import Any
from urllib.parse import quote

from aiohttp import web

from tests.upstream import Seen, Upstream, iso

STORAGE = "https://storage.googleapis.com/cohere-datasets"


def dataset(dataset_id: str, status: str = "processing", **fields: Any) -> dict[str, Any]:
    """A dataset object as Cohere answers it (``GET /v1/datasets/{id}``'s ``dataset``)."""
    now = iso(datetime.now(UTC))
    return {
        "id": dataset_id,
        "name": f"name-of-{dataset_id}",
        "created_at": now,
        "updated_at": now,
        "dataset_type": "batch-embed-v2-input",
        "validation_status": status,
        "schema": '{"type": "record", "name": "row", "fields": []}',
        "required_fields": [],
        "preserve_fields": [],
        "dataset_parts": [
            {
                "id": f"{dataset_id}-part-0",
                "name": "part-0.avro",
                "url": f"{STORAGE}/{dataset_id}/part-0.avro?X-Goog-Signature=abc",
                "original_url": f"{STORAGE}/{dataset_id}/original.jsonl?X-Goog-Signature=abc",
                "index": 0,
                "size_bytes": 100,
                "num_rows": 3,
            }
        ],
        **fields,
    }


class FakeDatasets:
    """The upstream's dataset routes, beside its batch API (see the module docstring)."""

    def __init__(self, upstream: Upstream, usage: int = 12345) -> None:
        self.upstream = upstream
        self.datasets: dict[str, dict[str, Any]] = {}
        self.usage = usage
        for route in ("dataset", "datasets", "delete_dataset", "dataset_usage"):
            upstream.script(self._handle, route)

    def add(self, dataset_id: str, status: str = "processing", **fields: Any) -> dict[str, Any]:
        self.datasets[dataset_id] = dataset(dataset_id, status, **fields)
        return self.datasets[dataset_id]

    def set_status(self, dataset_id: str, status: str) -> None:
        self.datasets[dataset_id].update(validation_status=status, updated_at=iso(datetime.now(UTC)))

    def calls(self, path_prefix: str = "/v1/datasets") -> list[Seen]:
        return [seen for seen in self.upstream.requests if seen.path.startswith(path_prefix)]

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        if path == "/v1/datasets/usage" and request.method == "GET":
            return _json(200, {"organization_usage": self.usage})
        if path == "/v1/datasets" and request.method == "GET":
            return _json(200, {"datasets": list(self.datasets.values())})
        if path.startswith("/v1/datasets/"):
            dataset_id = path.removeprefix("/v1/datasets/")
            if dataset_id not in self.datasets:
                return _json(404, {"message": f"dataset {dataset_id} not found"})
            if request.method == "DELETE":
                del self.datasets[dataset_id]
                return _json(200, {})
            return _json(200, {"dataset": self.datasets[dataset_id]})
        return _json(404, {"message": "not a dataset route"})


def _json(status: int, document: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(document).encode(), content_type="application/json")


class CountingLinks:
    """Part URLs of the gateway's own, new for every answer (as signed, expiring URLs are)."""

    def __init__(self) -> None:
        self.made = count(1)

    def rewrite(self, dataset: dict[str, Any], *, caller: str, base_url: str) -> dict[str, Any]:
        parts = []
        for part in dataset.get("dataset_parts") or []:
            n = next(self.made)
            link = f"{base_url}/v1/datasets/{quote(dataset['id'])}/parts/{quote(part['id'])}?caller={caller}&n={n}"
            parts.append({**part, "url": link, "original_url": link.replace("?", "/original?")})
        return {**dataset, "dataset_parts": parts}
