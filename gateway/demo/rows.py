"""What the simulated upstream's datasets hold: JSONL rows of the batch types, checked line by line, as Avro parts.

Everything here is blocking file work on bounded memory (one line, one row
at a time); ``gateway.demo.datasets`` runs it in a worker thread. Parts are
Avro files, as Cohere's are, so the SDK's ``save_dataset`` reads them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastavro import parse_schema, reader
from fastavro.write import Writer

# A longer line fails the dataset (and is never held whole).
MAX_LINE_BYTES = 1 << 20
MAX_WARNINGS = 20  # skipped lines named in validation_warnings (the rest are counted)
SAMPLES_PER_PART = 3
MAX_SAMPLE_CHARS = 1000
EMBEDDING_DIMENSIONS = 8

INPUT_TYPES = ("batch-embed-v2-input", "batch-chat-v2-input")
OUTPUT_TYPE = {"batch-embed-v2-input": "batch-embed-v2-output", "batch-chat-v2-input": "batch-chat-v2-output"}
REQUIRED_FIELDS = ("custom_id", "body")


def _record(name: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "cohere.datasets", "fields": fields}


_CUSTOM_ID = {"name": "custom_id", "type": "string"}
# The request body stays the JSON text it came as: its shape is the batch endpoint's, not the dataset's.
_INPUT = _record("BatchInput", [_CUSTOM_ID, {"name": "body", "type": "string"}])
SCHEMAS: dict[str, dict[str, Any]] = {
    "batch-embed-v2-input": _INPUT,
    "batch-chat-v2-input": _INPUT,
    "batch-embed-v2-output": _record(
        "BatchEmbedOutput", [_CUSTOM_ID, {"name": "embedding", "type": {"type": "array", "items": "float"}}]
    ),
    "batch-chat-v2-output": _record("BatchChatOutput", [_CUSTOM_ID, {"name": "response", "type": "string"}]),
}


def schema_text(dataset_type: str) -> str | None:
    """The Avro schema of a dataset type, as the ``schema`` field carries it (None: a type the demo does not parse)."""
    schema = SCHEMAS.get(dataset_type)
    return None if schema is None else json.dumps(schema)


@dataclass(frozen=True, slots=True)
class Part:
    """One Avro file of a dataset, on disk."""

    path: Path
    index: int
    num_rows: int
    size_bytes: int
    samples: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Parsed:
    """A validation's outcome: the parts written, or why the dataset failed (then no parts are kept)."""

    parts: tuple[Part, ...] = ()
    error: str | None = None
    warnings: tuple[str, ...] = ()  # the lines skipped, with ``skip_malformed_input``


class PartWriter:
    """Writes rows to Avro files ``{stem}-{index}.avro`` of at most ``rows_per_part`` rows each."""

    def __init__(self, directory: Path, stem: str, dataset_type: str, rows_per_part: int) -> None:
        self._directory = directory
        self._stem = stem
        self._schema = parse_schema(SCHEMAS[dataset_type])
        self._rows_per_part = rows_per_part
        self._parts: list[Part] = []
        self._file: BinaryIO | None = None
        self._writer: Writer | None = None
        self._rows = 0
        self._samples: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            path = self._directory / f"{self._stem}-{len(self._parts)}.avro"
            self._file = path.open("wb")
            self._writer = Writer(self._file, self._schema)
        self._writer.write(row)
        self._rows += 1
        if len(self._samples) < SAMPLES_PER_PART:
            self._samples.append(json.dumps(row)[:MAX_SAMPLE_CHARS])
        if self._rows >= self._rows_per_part:
            self._finish_part()

    def _finish_part(self) -> None:
        if self._writer is None or self._file is None:
            return
        self._writer.flush()
        self._file.close()
        path = Path(self._file.name)
        part = Part(path, len(self._parts), self._rows, path.stat().st_size, tuple(self._samples))
        self._parts.append(part)
        self._file, self._writer, self._rows, self._samples = None, None, 0, []

    def close(self) -> tuple[Part, ...]:
        self._finish_part()
        return tuple(self._parts)

    def discard(self) -> None:
        """Drop every part written so far (a failed validation keeps none)."""
        if self._file is not None:
            self._file.close()
        for path in [part.path for part in self._parts] + ([Path(self._file.name)] if self._file else []):
            path.unlink(missing_ok=True)
        self._parts, self._file, self._writer = [], None, None


def check_row(line: bytes, number: int) -> dict[str, Any] | str:
    """One JSONL line of a batch input type as its Avro row, or what is wrong with it (naming the line)."""
    try:
        document = json.loads(line)
    except ValueError:
        return f"line {number}: not valid JSON"
    if not isinstance(document, dict):
        return f"line {number}: expected a JSON object"
    custom_id = document.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return f"line {number}: custom_id must be a non-empty string"
    if not isinstance(document.get("body"), dict):
        return f"line {number}: body must be a JSON object"
    return {"custom_id": custom_id, "body": json.dumps(document["body"])}


def _lines(source: BinaryIO) -> Iterator[bytes | None]:
    """The file's lines, each read with a bound; None for a line past ``MAX_LINE_BYTES`` (read to its end)."""
    while line := source.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = source.readline(MAX_LINE_BYTES)
        yield None


def validate_jsonl(
    source: Path, directory: Path, stem: str, dataset_type: str, rows_per_part: int, skip_malformed: bool = False
) -> Parsed:
    """Check every line of an uploaded batch input file and write its rows as Avro parts.

    The first bad line fails the dataset; with ``skip_malformed`` (Cohere's
    ``skip_malformed_input``) bad lines are skipped and named in warnings.
    """
    parts = PartWriter(directory, stem, dataset_type, rows_per_part)
    error, warnings, skipped = None, [], 0
    with source.open("rb") as lines:
        for number, line in enumerate(_lines(lines), 1):
            if line is not None and not line.strip():
                continue  # blank lines (a trailing newline, say) hold no row
            row = f"line {number}: longer than {MAX_LINE_BYTES} bytes" if line is None else check_row(line, number)
            if isinstance(row, str) and not skip_malformed:
                error = row
                break
            if isinstance(row, str):
                skipped += 1
                warnings += [row] if skipped <= MAX_WARNINGS else []
                continue
            parts.add(row)
    written = parts.close()
    if error is None and not written:
        error = "the file holds no rows"
    if error is not None:
        parts.discard()
        return Parsed(error=error)
    if skipped > MAX_WARNINGS:
        warnings.append(f"{skipped - MAX_WARNINGS} more malformed lines skipped")
    return Parsed(written, warnings=tuple(warnings))


def read_rows(parts: Iterable[Part]) -> Iterator[dict[str, Any]]:
    """The rows of Avro parts, in order, one at a time."""
    for part in parts:
        with part.path.open("rb") as avro:
            for row in reader(avro):
                assert isinstance(row, dict)
                yield row


def output_row(input_type: str, row: dict[str, Any]) -> dict[str, Any]:
    """The simulated result of one input row: an embedding made from its body, or a short reply."""
    digest = hashlib.sha256(f"{row['custom_id']}\n{row['body']}".encode()).digest()
    if input_type == "batch-embed-v2-input":
        values = struct.unpack(f">{EMBEDDING_DIMENSIONS}h", digest[: 2 * EMBEDDING_DIMENSIONS])
        return {"custom_id": row["custom_id"], "embedding": [value / 32768 for value in values]}
    return {"custom_id": row["custom_id"], "response": f"Simulated reply {digest.hex()[:8]} to {row['custom_id']}."}


def write_output(inputs: tuple[Part, ...], input_type: str, directory: Path, stem: str, rows_per_part: int) -> Parsed:
    """A batch's output dataset: one row per input row, in the input's order."""
    gone = Parsed(error="the input dataset's parts are gone (deleted?)")
    if not inputs:
        return gone
    parts = PartWriter(directory, stem, OUTPUT_TYPE[input_type], rows_per_part)
    try:
        for row in read_rows(inputs):
            parts.add(output_row(input_type, row))
    except OSError:
        parts.discard()
        return gone
    return Parsed(parts.close())
