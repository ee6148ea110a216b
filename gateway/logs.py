"""JSON logs, with one redaction step that every log line passes through.

Every record, the gateway's own and aiohttp's (whose parser errors can echo
raw header bytes), is rendered by ``JsonFormatter``, which removes every
known secret (the upstream token, caller keys in clear) and anything shaped
like a bearer credential before the line is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

ACCESS_LOGGER = "gateway.access"
REDACTED = "[REDACTED]"
_BEARER = re.compile(r"(?i)(bearer)(\s+|%20|\+)[^\s\"',;]+")
_REDACTOR_LENGTH_FLOOR = 6  # shorter "secrets" would shred ordinary words
# One encoder for every line: json.dumps builds a new one per call when given options.
_ENCODER = json.JSONEncoder(ensure_ascii=True, default=str)


class Redactor:
    """Knows the secrets in force; config reloads update it."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def update(self, secrets: list[str]) -> None:
        # Longest first, so that a secret containing another is removed whole.
        kept = {s for s in secrets if len(s) >= _REDACTOR_LENGTH_FLOOR} | set(self._secrets)
        self._secrets = tuple(sorted(kept, key=len, reverse=True))

    def known(self, text: str) -> str:
        """``text`` without the secrets in force (safe on rendered JSON)."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def __call__(self, text: str) -> str:
        """``text`` without the known secrets and without any bearer credential."""
        text = self.known(text)
        # The substring test is far cheaper than the regex, and nearly always false.
        if "bearer" in text.lower():
            text = _BEARER.sub(rf"\1 {REDACTED}", text)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and any ``fields``.

    Every string is redacted, nested ones included, and then the whole line
    once more (values rendered by ``str()`` never went through the first
    pass). Non-ASCII is escaped, so a line never fails to encode: a header
    decoded with surrogate escapes would otherwise break the handler, whose
    fallback prints the raw record to stderr.
    """

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, dict):
            return {str(k): self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(v) for v in value]
        return value

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": self._redact(record.getMessage()),
        }
        for key, value in getattr(record, "fields", {}).items():
            payload[key] = self._clean(value)
        if record.exc_info:
            payload["exception"] = self._redact(self.formatException(record.exc_info))
        # The bearer pattern is not applied to the rendered line: it could eat an escaping backslash.
        return self._redact.known(_ENCODER.encode(payload))


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes lines in batches, and whose failure report holds no part of the record.

    Inside a running event loop, formatted lines are collected and written
    (one ``write``, one flush) at the loop's next turn, so that a busy
    gateway makes one write per loop turn rather than one per request.
    Outside a loop, each line is written at once. ``logging.shutdown``
    (at exit) flushes whatever is pending.

    ``logging.Handler.handleError`` prints the record's message and arguments
    to stderr unformatted, that is, unredacted: it is replaced.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._flush_scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_scheduled = False
            if self._pending:
                lines, self._pending = self._pending, []
                try:
                    self.stream.write(self.terminator.join(lines) + self.terminator)
                    self.stream.flush()
                except Exception:
                    self.handleError(None)
        finally:
            self.release()

    def handleError(self, record: logging.LogRecord | None) -> None:
        notice = {"level": "error", "logger": "gateway.logs", "event": "a log line could not be written"}
        with contextlib.suppress(Exception):  # nothing is left to report it to
            self.stream.write(json.dumps(notice) + self.terminator)


def configure_logging(level: str, redact: Redactor, stream: Any = None) -> None:
    """Route every logger (ours and aiohttp's) through one redacting JSON handler."""
    handler = _JsonHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # No log line reports its source file, thread or process: skip the work of
    # finding them (a stack walk per record), as the logging HOWTO's
    # "Optimization" section suggests for hot loggers.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def set_level(level: str) -> None:
    """Apply ``logging.level`` (at start-up and on reload)."""
    logging.getLogger().setLevel(level)


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (rendered as JSON keys)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})
