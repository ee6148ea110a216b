"""JSON logs, with one redaction step that every log line passes through.

Every record, the gateway's own and aiohttp's (whose parser errors can echo
raw header bytes), is rendered by ``JsonFormatter``, which removes every
known secret (the upstream token, caller keys in clear) and anything shaped
like a bearer credential before the line is written. Access lines travel
in batches (``AccessLog``) but are rendered and redacted the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import ahocorasick_rs

from gateway.ops.batching import BATCH_WITHIN_S, FlushSoon
from gateway.ops.lines import (
    ACCESS_FIELDS,
    FALLBACK_ENCODER,
    AccessEntry,
    AccessLines,
    render_json,
    render_lines,
    timestamp,
)

ACCESS_LOGGER = "gateway.access"
REDACTED = "[REDACTED]"
_BEARER = re.compile(r"(?i)(bearer)(\s+|%20|\+)[^\s\"',;]+")
_REDACTOR_LENGTH_FLOOR = 6  # shorter "secrets" would shred ordinary words


def _json_forms(secret: str) -> set[str]:
    """``secret`` as it reads inside a rendered JSON string, by either encoder (they escape DEL differently)."""
    return {render_json(secret)[1:-1], FALLBACK_ENCODER.encode(secret)[1:-1]}


# Up to this many secret forms, a substring test per form is fastest (memchr);
# past it, one pass of an Aho-Corasick automaton over the text: with 2,000
# caller keys in clear, the per-form test cost 150 µs an access line, the
# automaton 2 µs (bench: hit_rps_many_callers_ratio).
_SCAN_EACH_UP_TO = 16


def _utf8(text: str) -> bytes:
    # Header bytes that were not UTF-8 arrive as surrogates: kept, not refused.
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class RedactionForms:
    """The secrets to remove, in every form a log line can hold them, and a finder for them all."""

    # Longest first, so that a secret containing another is removed whole.
    secrets: tuple[str, ...] = ()
    # The same secrets as they read inside a JSON string (a quote or a
    # backslash escaped, non-ASCII as \uXXXX), to find them in rendered lines.
    in_json: tuple[str, ...] = ()
    # Finds any form of any secret in one pass, once there are many.
    finder: ahocorasick_rs.BytesAhoCorasick | None = None


class Redactor:
    """Knows the secrets in force; config reloads update it.

    ``prepare`` builds the forms of a new set of secrets without touching the
    ones in use (a reload builds them off the event loop: with 10,000 caller
    keys that takes tens of milliseconds), ``install`` swaps them in at once.
    """

    def __init__(self) -> None:
        self._forms = RedactionForms()

    def prepare(self, secrets: list[str]) -> RedactionForms:
        """The forms of ``secrets`` and of every secret known so far (a rotated-out one stays redacted)."""
        kept = {s for s in secrets if len(s) >= _REDACTOR_LENGTH_FLOOR} | set(self._forms.secrets)
        ordered = tuple(sorted(kept, key=len, reverse=True))
        in_json = tuple(set().union(*map(_json_forms, kept)))
        forms = set(ordered) | set(in_json)
        finder = (
            ahocorasick_rs.BytesAhoCorasick(
                [_utf8(form) for form in forms], implementation=ahocorasick_rs.Implementation.ContiguousNFA
            )
            if len(forms) > _SCAN_EACH_UP_TO
            else None
        )
        return RedactionForms(ordered, in_json, finder)

    def install(self, forms: RedactionForms) -> None:
        self._forms = forms

    def update(self, secrets: list[str]) -> None:
        self.install(self.prepare(secrets))

    @staticmethod
    def _holds_any(forms: RedactionForms, text: str, candidates: tuple[str, ...]) -> bool:
        # The finder knows every form at once; without one (few secrets), each is searched for.
        if forms.finder is None:
            return any(candidate in text for candidate in candidates)
        return bool(forms.finder.find_matches_as_indexes(_utf8(text)))

    def known(self, text: str) -> str:
        """``text`` without the secrets in force."""
        forms = self._forms
        if not self._holds_any(forms, text, forms.secrets):
            return text
        for secret in forms.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def found_in_json(self, text: str) -> bool:
        """Whether rendered JSON holds a secret in force, in whatever string it was escaped."""
        forms = self._forms
        return self._holds_any(forms, text, forms.in_json)

    def __call__(self, text: str) -> str:
        """``text`` without the known secrets and without any bearer credential."""
        text = self.known(text)
        # The substring test is far cheaper than the regex, and nearly always false.
        if "bearer" in text.lower():
            text = _BEARER.sub(rf"\1 {REDACTED}", text)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and any ``fields``.

    The line is rendered, then searched for the known secrets as JSON
    escapes them (escaping maps each character on its own, so a string
    holding a secret renders holding its escaped form) and for the word
    "bearer". Only a line holding either is rendered again, from values
    cleaned one by one: every string (keys and nested ones included)
    redacted, anything that is not plain JSON made a redacted string first.
    Neither replacement can run on the rendered line, where it could start
    inside an escape sequence and break the JSON.

    Non-ASCII is escaped, so a line never fails to encode: a header decoded
    with surrogate escapes would otherwise break the handler, whose fallback
    prints the raw record to stderr. A record carrying an ``AccessLog``
    batch renders as one line per entry, the same fields in the same order,
    made from pieces (``AccessLines``) and searched the same way.
    """

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact
        self._access_lines = AccessLines()

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, dict):
            return {self._redact(str(k)): self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self._redact(str(value))

    def format(self, record: logging.LogRecord) -> str:
        level, event = record.levelname.lower(), record.getMessage()
        access: list[AccessEntry] | None = getattr(record, "access", None)
        payloads = None
        text = None
        if access is not None and not record.exc_info:
            with contextlib.suppress(TypeError):  # a value of another type than AccessLog.add takes
                text = self._access_lines.render(level, record.name, event, access)
        if text is None:
            payloads = self._payloads(record, level, event, access)
            text = render_lines(payloads)
        # Every line is searched, whatever its values: two substring searches over the whole
        # batch are far cheaper than cleaning every value, and nearly always false.
        # Rendered lines hold no raw newline, so no secret spans two of them.
        if "bearer" in text.lower() or self._redact.found_in_json(text):
            payloads = payloads or self._payloads(record, level, event, access)
            text = "\n".join(render_json(self._clean(payload)) for payload in payloads)
        return text

    def _payloads(
        self, record: logging.LogRecord, level: str, event: str, access: list[AccessEntry] | None
    ) -> list[dict[str, Any]]:
        """The record's lines as dicts: one, or one per entry of an access batch."""
        head = {"level": level, "logger": record.name, "event": event}
        if access is not None:
            payloads = [
                {"time": timestamp(e[0]), **head, **dict(zip(ACCESS_FIELDS, e[1:], strict=True))} for e in access
            ]
        else:
            payloads = [{"time": timestamp(record.created), **head, **getattr(record, "fields", {})}]
        if record.exc_info:
            payloads[-1]["exception"] = self.formatException(record.exc_info)
        return payloads


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes lines in batches, and whose failure report holds no part of the record.

    Inside a running event loop, formatted lines are collected and written
    (one ``write``, one flush) at the loop's next turn, so that a busy
    gateway makes one write per loop turn rather than one per request; an
    ``AccessLog`` batch, logged at a turn's end, is written at once.
    Outside a loop, each line is written at once. ``logging.shutdown``
    (at exit) flushes whatever is pending.

    ``logging.Handler.handleError`` prints the record's message and arguments
    to stderr unformatted, that is, unredacted: it is replaced.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._flush_soon = FlushSoon(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if hasattr(record, "access"):
            # Access lines come batched at a turn's end already: written now, with what is
            # pending, rather than a callback and a loop turn later.
            self.flush()
        else:
            self._flush_soon.request()

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_soon.done()
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


# Access lines waiting past this many are logged at once: a flush stalls the loop for their rendering alone.
ACCESS_BATCH = 256


class AccessLog:
    """The access log (logger ``gateway.access``): one line per request, logged in batches.

    A LogRecord and the trip through the handlers cost more than answering
    a cache hit (bench/RESULTS.md), so lines are logged as one record
    ``BATCH_WITHIN_S`` after the first of a batch, or once ``ACCESS_BATCH``
    wait (nginx's ``access_log ... buffer= flush=`` does the same); the
    formatter renders each as its own line, each with the time it was
    added. Outside a running loop, a line is logged at once.
    """

    def __init__(self) -> None:
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._pending: list[AccessEntry] = []
        self._flush_soon = FlushSoon(self.flush, BATCH_WITHIN_S)

    def add(
        self,
        *,
        request_id: str,
        caller: str,
        method: str | None,
        path: str | None,
        batch_id: str | None,
        status: int,
        cache: str,
        upstream_status: int | None,
        upstream_ms: float | None,
        total_ms: float | None,
    ) -> None:
        """One line (the fields of ``ACCESS_FIELDS``): kept as a tuple, rendered and redacted at the turn's end."""
        if not self._logger.isEnabledFor(logging.INFO):
            return
        pending = self._pending
        pending.append(
            (
                time.time(),
                request_id,
                caller,
                method,
                path,
                batch_id,
                status,
                cache,
                upstream_status,
                upstream_ms,
                total_ms,
            )
        )
        if len(pending) < ACCESS_BATCH:
            self._flush_soon.request()
        else:
            self.flush()

    def flush(self) -> None:
        """Log the lines added so far."""
        self._flush_soon.done()
        if self._pending:
            batch, self._pending = self._pending, []
            self._logger.info("request", extra={"access": batch})


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
