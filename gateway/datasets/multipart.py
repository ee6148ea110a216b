"""An upload's multipart body, read as it streams: checked, and fingerprinted by its parts (docs/design.md §11).

The SDK picks a new boundary for every call, so the raw bytes of two uploads
of the same file differ. ``PartsFingerprint`` is fed the same chunks that go
upstream; python-multipart's streaming parser splits them into parts, and
what is hashed is each part's name, filename, content type and bytes (each
part's bytes through a hash of their own, so that no two bodies of different
parts can hash alike), after the query. Nothing is kept but the hashes and
the current part's headers, which the parser bounds.

Without an ``Idempotency-Key`` no fingerprint is needed, and parsing every
byte would cost an upload a good share of its throughput: then the parser
reads the body only up to the first part's headers (so that a body that is
not multipart is refused before anything goes upstream), and at the end
only the closing delimiter is checked (so that a body cut short is refused
before its last bytes go). What lies between is the upstream's to judge.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from gateway import errors

MULTIPART = b"multipart/form-data"
# RFC 2046 §5.1.1: a boundary is 1 to 70 characters.
MAX_BOUNDARY = 70


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; 400 ``invalid_request`` for any other."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if kind.lower() != MULTIPART or not 0 < len(boundary) <= MAX_BOUNDARY:
        raise errors.InvalidRequest("Send the dataset as multipart/form-data with a boundary (as the SDK does).")
    return boundary


class PartsFingerprint:
    """A multipart body checked and hashed part by part as its chunks pass (see the module docstring)."""

    def __init__(self, content_type: str, query: Sequence[tuple[str, str]], *, whole: bool = True) -> None:
        # False (no Idempotency-Key): the opening and the closing delimiter are checked, nothing is hashed.
        self._whole = whole
        boundary = boundary_of(content_type)
        self._closing = b"\r\n--" + boundary + b"--"
        self._tail = b""
        self._digest = hashlib.sha256(json.dumps(sorted(query)).encode())
        self._part = hashlib.sha256()
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, bytes] = {}
        self.parts = 0
        # A part's headers are whole: from then on the body is known to be multipart.
        self.headers_seen = False
        self.complete = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._finished,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the body; 400 ``invalid_request`` once they cannot be multipart."""
        if self.complete:
            return  # an epilogue after the last boundary is allowed, and not part of the content
        if not self._whole and self.headers_seen:
            # The last bytes seen, enough to hold the closing delimiter and a line break after it.
            self._tail = (self._tail + chunk[-len(self._closing) - 2 :])[-len(self._closing) - 2 :]
            return
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise errors.InvalidRequest("The multipart body is malformed.") from None
        self._tail = chunk[-len(self._closing) - 2 :]

    def finish(self) -> str:
        """The fingerprint (sha256 hex) of a body that ended; 400 ``invalid_request`` if it ended early."""
        if not self._whole and self.headers_seen and not self.complete:
            self.complete = self._tail.removesuffix(b"\r\n").endswith(self._closing)
            self.parts = max(self.parts, 1)
        if not self.complete or not self.parts:
            raise errors.InvalidRequest("The multipart body ended before its closing boundary.")
        return self._digest.hexdigest()

    def _begin(self) -> None:
        self._headers = {}
        self._part = hashlib.sha256()

    def _header_end(self) -> None:
        self._headers[bytes(self._field).decode("latin-1").lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        self.headers_seen = True
        disposition, options = parse_options_header(self._headers.get("content-disposition", b""))
        if disposition.lower() != b"form-data" or b"name" not in options:
            raise MultipartParseError("a part without a form-data name")
        described = [
            options[b"name"].decode("latin-1"),
            options.get(b"filename", b"").decode("latin-1"),
            self._headers.get("content-type", b"").decode("latin-1"),
        ]
        self._digest.update(json.dumps(described).encode())

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._part.update(memoryview(data)[start:end])  # no copy of the part's bytes

    def _end(self) -> None:
        self.parts += 1
        self._digest.update(self._part.digest())

    def _finished(self) -> None:
        self.complete = True
