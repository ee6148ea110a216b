"""The upstream's facts about datasets (docs/design.md §11): ids, ``validation_status`` lifetimes, bodies.

Pure functions, as ``gateway.upstream.cohere`` is for batches: a dataset id
follows the batch id pattern; ``unknown``, ``queued`` and ``processing``
may still change (the active TTL), ``validated``, ``failed`` and
``skipped`` will not (the terminal TTL); a 200 is ``{"dataset": {...}}``
and a 404 is cached as ``not_found``, as for a batch.
"""

from __future__ import annotations

import json
from typing import Any

from gateway import errors
from gateway.upstream.answers import UpstreamReply
from gateway.upstream.cohere import BATCH_ID, UNPARSEABLE, Lifetime, parse_timestamp

DATASETS_PATH = "/v1/datasets"
USAGE_PATH = "/v1/datasets/usage"
VALIDATION_STATUSES = ("unknown", "queued", "processing", "validated", "failed", "skipped")
FINAL_VALIDATION = frozenset({"validated", "failed", "skipped"})


def parse_dataset_id(raw: str) -> str:
    """The id if it is well formed (after URL decoding), else 400 ``invalid_request``."""
    if not BATCH_ID.fullmatch(raw):
        raise errors.InvalidRequest(
            "A dataset id is 1 to 128 letters, digits, '_' or '-', starting with a letter or digit."
        )
    return raw


def dataset_path(dataset_id: str) -> str:
    """The upstream path of one dataset; ``dataset_id`` is already validated."""
    return f"{DATASETS_PATH}/{dataset_id}"


def lifetime_of_validation(status: object) -> Lifetime:
    """A final ``validation_status`` will not change; anything else, an unknown value included, may."""
    return Lifetime.TERMINAL if isinstance(status, str) and status in FINAL_VALIDATION else Lifetime.ACTIVE


def dataset_of(body: bytes) -> dict[str, Any]:
    """The dataset object of a 200 body ``{"dataset": {...}}``; 502 ``upstream_invalid_response`` otherwise."""
    try:
        document = json.loads(body)
    except UNPARSEABLE:
        raise errors.UpstreamInvalidResponse("The upstream's answer was not JSON.", upstream_status=200) from None
    if not isinstance(document, dict) or not isinstance(document.get("dataset"), dict):
        raise errors.UpstreamInvalidResponse(
            "The upstream's answer did not hold a dataset object.", upstream_status=200
        )
    dataset: dict[str, Any] = document["dataset"]
    return dataset


def accept_dataset(status: int, body: bytes) -> UpstreamReply | None:
    """``GET /v1/datasets/{id}``: a 200 dataset, or a 404 (both cached), as ``accept_batch`` for a batch."""
    if status == 200:
        dataset = dataset_of(body)
        return UpstreamReply(
            200,
            body,
            lifetime_of_validation(dataset.get("validation_status")),
            parse_timestamp(dataset.get("updated_at")),
        )
    if status == 404:
        return UpstreamReply(404, body, Lifetime.NOT_FOUND)
    return None


def datasets_of(page: dict[str, Any]) -> list[Any]:
    """The ``datasets`` of a list page (absent: none)."""
    datasets = page.get("datasets")
    return datasets if isinstance(datasets, list) else []


def batch_naming_an_output(body: bytes) -> object:
    """The batch object of a 200 batch answer's ``body`` if it may name an output dataset, else None.

    A substring test first: most answers (every active batch's) name none, and need no parsing.
    """
    if b'"output_dataset_id"' not in body:
        return None
    return json.loads(body).get("batch")


def output_dataset_id(batch: object) -> str | None:
    """The well-formed ``output_dataset_id`` of a batch object, if it names one."""
    if not isinstance(batch, dict):
        return None
    output = batch.get("output_dataset_id")
    return output if isinstance(output, str) and BATCH_ID.fullmatch(output) else None
