"""How the simulated upstream reads a dataset upload: its query, and its multipart body as it streams to disk.

The body is read a chunk at a time with aiohttp's ``MultipartReader`` and
written to a file; only each part's size and SHA-256 are remembered
(``UploadedPart``), so an upload of any size costs no memory.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import BodyPartReader, MultipartReader, web
from multidict import MultiMapping

from gateway.demo.rows import INPUT_TYPES

# Cohere's dataset types (the SDK's DatasetType); the demo parses the two batch input types.
DATASET_TYPES = (
    *("embed-input", "embed-result", "cluster-result", "cluster-outliers", "reranker-finetune-input"),
    *("single-label-classification-finetune-input", "chat-finetune-input"),
    *("multi-label-classification-finetune-input", "batch-chat-input", "batch-openai-chat-input", *INPUT_TYPES),
)
UPLOAD_QUERY = frozenset(
    {"name", "type", "keep_original_file", "skip_malformed_input", "keep_fields", "optional_fields"}
    | {"text_separator", "csv_delimiter"}
)
FILE_PARTS = ("data", "eval_data")
MAX_UPLOAD_BYTES = 1610612736  # 1.5 GiB, Cohere's limit on a dataset
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class UploadedPart:
    """One file part of an upload as it arrived: never its bytes, only their size and digest."""

    name: str
    filename: str | None
    content_type: str | None
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Upload:
    """One upload: the dataset it made (None: refused), the bytes of the body received, and its parts."""

    dataset_id: str | None
    body_size: int
    parts: tuple[UploadedPart, ...]


def read_upload_query(query: MultiMapping[str]) -> dict[str, list[str]] | str:
    """The upload's query parameters (each a list: some repeat), or why Cohere would answer it 400."""
    params = {name: query.getall(name) for name in query}
    unknown = sorted(set(params) - UPLOAD_QUERY)
    if unknown:
        return f"unknown parameter(s): {', '.join(unknown)}"
    if not params.get("name", [""])[-1]:
        return "name is required"
    if params.get("type", [""])[-1] not in DATASET_TYPES:
        return f"type must be one of {', '.join(DATASET_TYPES)}"
    return params


async def receive(request: web.Request, target: Path, max_bytes: int) -> tuple[UploadedPart, ...] | str:
    """Stream the body's file parts (``data`` to ``target``, ``eval_data`` nowhere); or what is wrong with it."""
    try:
        reader = MultipartReader(request.headers, request.content)
        parts: list[UploadedPart] = []
        total = 0
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name not in FILE_PARTS:
                return f"unexpected part {getattr(part, 'name', None)!r}: only data and eval_data"
            if part.name in {seen.name for seen in parts}:
                return f"more than one {part.name} part"
            digest, size = hashlib.sha256(), 0
            with (target if part.name == "data" else Path("/dev/null")).open("wb") as file:
                while chunk := await part.read_chunk(CHUNK_BYTES):
                    size, total = size + len(chunk), total + len(chunk)
                    if total > max_bytes:
                        return f"the dataset is larger than {max_bytes} bytes"
                    digest.update(chunk)
                    file.write(chunk)
            content_type = part.headers.get("Content-Type")
            parts.append(UploadedPart(part.name, part.filename, content_type, size, digest.hexdigest()))
    except (ValueError, AssertionError, asyncio.IncompleteReadError) as broken:
        return f"malformed multipart body: {broken}"
    if "data" not in {part.name for part in parts}:
        return "a data part is required"
    return tuple(parts)
