"""Log lines as JSON: any value with ``render_json``, and access lines from pieces made once (``AccessLines``).

Rendering only: what a line may hold (redaction) is ``gateway.ops.logs``'s.
"""

from __future__ import annotations

import functools
import json
import math
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

import orjson

# For what orjson will not render (see render_json). One encoder for every line:
# json.dumps builds a new one per call when given options.
FALLBACK_ENCODER = json.JSONEncoder(ensure_ascii=True, default=str, separators=(",", ":"))


_ORJSON_AS_JSON = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
_ORJSON_LINE = _ORJSON_AS_JSON | orjson.OPT_APPEND_NEWLINE


def render_json(value: Any) -> str:
    """``value`` as compact JSON, with non-ASCII escaped.

    orjson renders it: ten times faster than the json module, which counts
    on a cache hit, whose access line was the largest cost left (bench/).
    json takes over for what orjson refuses (lone surrogates from header
    bytes that are not UTF-8, non-string keys, integers past 64 bits) and
    for anything non-ASCII, which orjson leaves unescaped.
    """
    try:
        # Dataclasses and datetimes go to default=str, as with json, not field by field.
        rendered = orjson.dumps(value, default=str, option=_ORJSON_AS_JSON)
    except TypeError:
        return FALLBACK_ENCODER.encode(value)
    return rendered.decode("ascii") if rendered.isascii() else FALLBACK_ENCODER.encode(value)


def render_lines(payloads: list[dict[str, Any]]) -> str:
    """Each of ``payloads`` as ``render_json`` renders it, one a line: one decode and one ASCII test for all."""
    try:
        rendered = b"".join([orjson.dumps(p, default=str, option=_ORJSON_LINE) for p in payloads])
    except TypeError:
        rendered = b"\xff"  # not ASCII: rendered line by line below
    if rendered.isascii():
        return rendered[:-1].decode("ascii")
    return "\n".join(map(render_json, payloads))


@functools.lru_cache(maxsize=4)
def utc_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


# Every ending a timestamp can have, made once: formatting it cost as much as rendering the rest of an access line.
MILLISECONDS = tuple(f".{ms:03d}+00:00" for ms in range(1000))


def timestamp(created: float) -> str:
    """``created`` as ISO 8601 UTC with milliseconds; the part up to the second is made once a second."""
    second = int(created)
    return utc_second(second) + MILLISECONDS[int((created - second) * 1000)]


# One access line's values, in the order they are rendered (docs/observability.md, "Logs"); its time goes first.
ACCESS_FIELDS = (
    "request_id",
    "caller",
    "method",
    "path",
    "batch_id",
    "status",
    "cache",
    "upstream_status",
    "upstream_ms",
    "total_ms",
)
# (time added, then the values of ACCESS_FIELDS in order)
AccessEntry = tuple[
    float, str, str, str | None, str | None, str | None, int, str, int | None, float | None, float | None
]


class AccessLines:
    """Renders a batch of access entries as JSON lines, from pieces made once.

    The keys, and the values that repeat from line to line (caller, method,
    route; status, cache state, upstream status), are rendered once into a
    piece of a line; only the time, the ids and the timings are rendered per
    line, by the json module's C string encoder (non-ASCII escaped, as
    ``render_json`` escapes it). The pieces are remembered by value, a bounded
    number of them: a 404's path is the client's, and could be new on every
    line. Not orjson per value: its output buffers, four a line held until
    the batch is joined, made it slower than one ``render_json`` a line.
    """

    _KEEP = 1024  # pieces of each kind; past that they are all made again

    def __init__(self) -> None:
        self._middles: dict[tuple[str, str | None, str | None], str] = {}
        self._tails: dict[tuple[int, str, int | None], str] = {}

    def render(self, level: str, logger: str, event: str, entries: list[AccessEntry]) -> str:
        quote, milliseconds = _quote, MILLISECONDS
        middles, tails = self._middles, self._tails
        head = (
            f'","level":{render_json(level)},"logger":{render_json(logger)},"event":{render_json(event)},"request_id":'
        )
        parts: list[str] = []
        second, start = -1, ""
        for e in entries:
            created = e[0]
            if int(created) != second:
                second = int(created)
                start = '\n{"time":"' + utc_second(second)
            middle = middles.get(key := (e[2], e[3], e[4]))
            if middle is None:
                middle = ',"caller":{},"method":{},"path":{},"batch_id":'.format(*map(render_json, key))
                _keep(middles, key, middle)
            tail = tails.get(end := (e[6], e[7], e[8]))
            if tail is None:
                tail = ',"status":{},"cache":{},"upstream_status":{},"upstream_ms":'.format(*map(render_json, end))
                _keep(tails, end, tail)
            parts += (
                start,
                milliseconds[int((created - second) * 1000)],
                head,
                quote(e[1]),
                middle,
                "null" if e[5] is None else quote(e[5]),
                tail,
                _number(e[9]),
                ',"total_ms":',
                _number(e[10]),
                "}",
            )
        return "".join(parts)[1:]


def _keep(pieces: dict[Any, str], key: Any, piece: str) -> None:
    if len(pieces) >= AccessLines._KEEP:
        pieces.clear()
    pieces[key] = piece


def _number(value: float | None) -> str:
    """A timing as JSON: null when there is none (or it is not finite, which JSON cannot hold)."""
    return repr(value) if value is not None and math.isfinite(value) else "null"
