"""Shared test furniture: secrets, configs, clients, metrics, log capture, child processes.

Everything runs on 127.0.0.1: the simulator or the fake upstream
(``tests/upstream.py``), the gateway served for real by ``start_gateway`` or
as a child process (``GatewayProcess``), and the cohere SDK, aiohttp or a raw
socket as client.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import io
import itertools
import json
import logging
import shutil
import socket
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import cohere
import httpx
import yaml
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import GatewayConfig, deep_merge, validate
from gateway.ops.batching import flush_pending
from gateway.ops.logs import JsonFormatter, Redactor
from gateway.records.base import Records
from gateway.records.sqlite import SqliteRecords
from gateway.replicas.lease import Lease

if TYPE_CHECKING:
    from gateway.edge.server import RunningGateway

UPSTREAM_TOKEN = "upstream-secret-token-4f9d2c"
BILLING_KEY = "billing-caller-key-7a1e5b"
REPORTING_KEY = "reporting-caller-key-3c8d0f"
SECRETS = (UPSTREAM_TOKEN, BILLING_KEY, REPORTING_KEY)
# Secrets that only exist after a reload (tests/test_operations.py): they must stay out of logs as well.
NEW_TOKEN = "rotated-upstream-token-91b3e7"
ANALYTICS_KEY = "analytics-caller-key-5d2a9c"

EXCHANGE_TIMEOUT_S = 30.0  # default bound on one exchange with a gateway (2 shared cores)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# Every config gets a store file of its own (docs/design.md §8), so that no test sees
# another's ownership or idempotency records; a test that restarts a gateway
# on the same store passes ``store={"path": ...}`` itself.
_STORE_ROOT = Path(tempfile.mkdtemp(prefix="cohere-gateway-tests-"))
atexit.register(shutil.rmtree, _STORE_ROOT, ignore_errors=True)
_STORE_NUMBERS = itertools.count()


def fresh_store_path() -> str:
    """A store path no other config in this test run uses."""
    return str(_STORE_ROOT / f"store-{next(_STORE_NUMBERS)}.db")


def raw_config(base_url: str, **sections: Any) -> dict[str, Any]:
    """A valid config document for tests; ``sections`` deep-merge over it."""
    raw: dict[str, Any] = {
        "store": {"path": fresh_store_path()},
        "upstream": {
            "base_url": base_url,
            "token": UPSTREAM_TOKEN,
            "timeout_s": 5,
            "retry_backoff_s": 0.01,
            "rate_limit": {"requests_per_s": 1000, "burst": 1000},
        },
        "callers": [
            {"name": "billing-service", "key": BILLING_KEY},
            {"name": "reporting", "key_sha256": sha256_hex(REPORTING_KEY)},
        ],
    }
    return deep_merge(raw, sections)


def make_config(base_url: str, **sections: Any) -> GatewayConfig:
    return validate(raw_config(base_url, **sections), {})


def assert_no_secrets(text: str | bytes) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in text, "a secret leaked"


def sdk(url: str, key: str = BILLING_KEY, **kwargs: Any) -> cohere.AsyncClientV2:
    """The real client our users run, pointed at the gateway, with SDK retries off."""
    return cohere.AsyncClientV2(
        api_key=key, base_url=url, httpx_client=httpx.AsyncClient(timeout=30), max_retries=0, **kwargs
    )


@dataclass
class LogCapture:
    """Every log line the process writes during a test, as the gateway renders it."""

    stream: io.StringIO = field(default_factory=io.StringIO)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def events(self, logger: str | None = None) -> list[dict[str, Any]]:
        flush_pending()  # access lines wait up to gateway.ops.batching.BATCH_WITHIN_S to be written
        lines = [json.loads(line) for line in self.text.splitlines() if line.strip()]
        return [line for line in lines if logger is None or line["logger"] == logger]


def attach_log_capture(redact: Redactor) -> tuple[LogCapture, logging.Handler]:
    capture = LogCapture()
    handler = logging.StreamHandler(capture.stream)
    handler.setFormatter(JsonFormatter(redact))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return capture, handler


class FakeClock:
    """A monotonic clock the test moves by hand: TTLs, budgets and pauses follow it.

    Pass it as ``start(config, clock=clock)``. Only the gateway's decisions use
    it; asyncio's own timers (and ``upstream.timeout_s``) stay on real time.
    """

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (a gateway may bind it; a client is refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``condition`` until it holds, for states with no event to await; whether it came in time."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not condition():
        if loop.time() > give_up:
            return False
        await asyncio.sleep(0.02)
    return True


# ---------------------------------------------------------------------------
# Answers, and the clients that get them: aiohttp and a raw socket
# ---------------------------------------------------------------------------


@dataclass
class Answer:
    """One HTTP answer, whichever client received it; ``raw`` holds the bytes off a raw socket."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    raw: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def all(self, name: str) -> list[str]:
        return self.headers.getall(name, [])

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def document(self) -> dict[str, Any]:
        document: dict[str, Any] = self.json
        return document

    @property
    def code(self) -> str | None:
        """The JSON ``code`` of an error answer; None for an answer without one."""
        if not self.body:
            return None
        document = self.json
        return document.get("code") if isinstance(document, dict) else None

    @property
    def retry_after(self) -> str | None:
        return self.headers.get("Retry-After")


async def http(
    url: str,
    *,
    method: str = "GET",
    key: str | None = BILLING_KEY,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    timeout_s: float = EXCHANGE_TIMEOUT_S,
) -> Answer:
    """One request with aiohttp (which shows every header) as the caller with ``key`` (None: no Authorization)."""
    sent = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
        session.request(method, url, headers={**sent, **(headers or {})}, data=data, allow_redirects=False) as response,
    ):
        return Answer(response.status, CIMultiDict(response.headers), await response.read())


def request_bytes(
    target: str | bytes = "/v2/batches/batch-1",
    headers: list[tuple[str | bytes, str | bytes] | bytes] | None = None,
    *,
    method: str | bytes = "GET",
    version: str | bytes = "HTTP/1.1",
    host: str | bytes | None = "gateway.internal",
    key: str | None = BILLING_KEY,
    close: bool = True,
    body: bytes = b"",
) -> bytes:
    """A request head built byte for byte, so that nothing normalises it on the way."""

    def b(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode()

    lines = [b(method) + b" " + b(target) + b" " + b(version)]
    if host is not None:
        lines.append(b"Host: " + b(host))
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode())
    # A header given as bytes is a raw line, sent as is.
    lines += [h if isinstance(h, bytes) else b(h[0]) + b": " + b(h[1]) for h in headers or []]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def send_raw(url: str, data: bytes, *, read_all: bool = True, timeout_s: float = EXCHANGE_TIMEOUT_S) -> bytes:
    """Write ``data`` to the server at ``url`` and read until it closes (each read bounded by ``timeout_s``).

    With ``read_all=False``, stop once a whole answer head has arrived (for
    answers that have no body to end them, such as HEAD's).
    """
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), timeout_s)
    try:
        writer.write(data)
        await writer.drain()
        received = bytearray()
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout_s)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            if not read_all and b"\r\n\r\n" in received:
                break
        return bytes(received)
    finally:
        writer.close()


def parse_response(raw: bytes) -> Answer:
    """One HTTP/1.1 answer as it came off the socket; the body cut at Content-Length."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    length = headers.get("Content-Length")
    if length is not None:
        body = body[: int(length)]
    return Answer(status, headers, body, raw)


async def raw_request(url: str, data: bytes, *, timeout_s: float = EXCHANGE_TIMEOUT_S) -> Answer:
    """Send bytes as they are (no client normalises them); the answer, checked for secrets."""
    raw = await send_raw(url, data, timeout_s=timeout_s)
    assert raw, "the gateway closed the connection without answering"
    assert_no_secrets(raw)
    return parse_response(raw)


async def read_answer(reader: asyncio.StreamReader, timeout_s: float = EXCHANGE_TIMEOUT_S) -> Answer:
    """The next answer on a kept-alive connection: its head, then as many body bytes as it announces."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    answer = parse_response(head)
    length = int(answer.header("Content-Length") or 0)
    answer.body = await asyncio.wait_for(reader.readexactly(length), timeout_s)
    answer.raw = head + answer.body
    assert_no_secrets(answer.raw)
    return answer


async def pipelined(url: str, data: bytes, answers: int, *, timeout_s: float = EXCHANGE_TIMEOUT_S) -> list[Answer]:
    """Send ``data`` (one or more requests, in one write) on a kept-alive connection; read ``answers`` answers."""
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), timeout_s)
    try:
        writer.write(data)
        return [await read_answer(reader, timeout_s) for _ in range(answers)]
    finally:
        writer.close()


# ---------------------------------------------------------------------------
# Metrics, as a scrape of /metrics or from the in-process registry
# ---------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_metrics(url: str) -> tuple[str, Samples]:
    """``GET /metrics``: the text, and every sample parsed by prometheus-client's own parser."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def sample_value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def registry_value(gateway: RunningGateway, name: str, **labels: str) -> float:
    """A sample read from an in-process gateway's registry (0 when it was never recorded)."""
    gateway.state.metrics.tally.flush()  # request counts wait up to gateway.ops.batching.BATCH_WITHIN_S
    return gateway.state.metrics.registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------
# The gateway as a child process
# ---------------------------------------------------------------------------

PROCESS_WAIT_S = 15.0  # bound on every wait for the child process (2 shared cores)


def write_config(path: Path, raw: Any) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def process_config(base_url: str, **sections: Any) -> dict[str, Any]:
    """A config for ``python -m gateway``: port 0 on 127.0.0.1, a short shutdown grace."""
    return raw_config(base_url, server={"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5}, **sections)


def assert_no_reload_secrets(text: str) -> None:
    """No secret of the first config, nor of the rotated one, appears in ``text``."""
    assert_no_secrets(text)
    for secret in (NEW_TOKEN, ANALYTICS_KEY):
        assert secret not in text, "a secret leaked"


@dataclass
class GatewayProcess:
    """``python -m gateway`` in a child process; its JSON log lines are collected as they come."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    url: str = ""
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            async with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def _find(self, event: str, after: int) -> dict[str, Any] | None:
        return next((e for e in self.events[after:] if e["event"].startswith(event)), None)

    async def wait_for_event(self, event: str, after: int = 0) -> dict[str, Any]:
        """The first log line from the ``after``-th on whose event starts with ``event``."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: self._find(event, after) is not None or self._ended()), PROCESS_WAIT_S
            )
        found = self._find(event, after)
        assert found is not None, f"the gateway ended without logging {event!r}:\n{self.text}"
        return found

    async def wait_for_events(self, event: str, count: int, after: int = 0) -> list[dict[str, Any]]:
        """The first ``count`` log lines from the ``after``-th on whose event starts with ``event``."""

        def found() -> list[dict[str, Any]]:
            return [e for e in self.events[after:] if e["event"].startswith(event)][:count]

        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(found()) == count or self._ended()), PROCESS_WAIT_S
            )
        events = found()
        assert len(events) == count, f"the gateway ended with {len(events)} of {count} {event!r} lines:\n{self.text}"
        return events

    def _ended(self) -> bool:
        return self._reader is not None and self._reader.done()

    def signal(self, signum: int) -> int:
        """Send ``signum``; returns the number of log lines so far (for ``wait_for_event(after=...)``)."""
        mark = len(self.events)
        self.proc.send_signal(signum)
        return mark

    async def exit_code(self, within_s: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), within_s)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, PROCESS_WAIT_S)
        return code


async def serves_healthz(url: str) -> bool:
    """Whether ``url`` answers /healthz, polled (bounded) while the process starts."""
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"{url}/healthz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    return False


# ---------------------------------------------------------------------------
# The record store, made to fail for real
# ---------------------------------------------------------------------------

BUSY_S = 0.05  # a store's busy timeout in tests that make it fail: failures come quickly


@contextmanager
def store_locked(path: str | Path) -> Iterator[None]:
    """Make every write of the store at ``path`` fail, for real, while the ``with`` block runs.

    Another connection holds the file's write lock (``BEGIN EXCLUSIVE``), as
    another process would: every write raises ``StoreUnavailable`` after its
    retries. Reads still work: the file is in WAL mode, where a reader never
    waits for a writer (``store_stalled`` makes reads fail).

    The file must exist already (start the store, or the gateway, first). It
    works for a store in this process (the gateway started in-process with
    ``store.path`` from its config) and in a child process alike. Give the
    store a short busy timeout to keep the test fast.
    """
    connection = sqlite3.connect(str(path), isolation_level=None, timeout=5)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


@contextmanager
def store_stalled(records: Records) -> Iterator[None]:
    """Make every read and write of ``records`` (a ``SqliteRecords``) fail while the ``with`` block runs.

    Its one worker thread is held, as by a disk that stopped answering: every
    operation asked meanwhile raises ``StoreUnavailable`` once its busy timeout
    (``BUSY_S``) has passed ("did not answer in time"); the memory cache of
    known owners still answers. No lock can do this to a file in WAL mode.
    """
    assert isinstance(records, SqliteRecords)
    records.busy_timeout_s = BUSY_S
    worker = records._executor
    assert worker is not None
    released = threading.Event()
    worker.submit(released.wait, 60)  # bounded: the worker is back within a minute whatever the test does
    try:
        yield
    finally:
        released.set()


def lease_losing_one_cancellation(monkeypatch: Any, within_s: float) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the next ``Lease.hold`` swallow one cancellation, as redis-py's writes can on Python 3.11
    (``asyncio.wait_for`` returns the finished write and drops a cancellation that came at that moment).

    Returns ``(renewing, lost)``: set when that hold has begun (it then waits up to ``within_s``), and when it
    has swallowed the cancellation and returned as if held. Later holds are the real ones.
    """
    renewing, lost = asyncio.Event(), asyncio.Event()
    hold = Lease.hold

    async def hold_losing_one_cancellation(lease: Lease) -> bool:
        if lost.is_set():
            return await hold(lease)
        renewing.set()
        try:
            await asyncio.sleep(within_s)
        except asyncio.CancelledError:
            lost.set()
        return True

    monkeypatch.setattr(Lease, "hold", hold_losing_one_cancellation)
    return renewing, lost
