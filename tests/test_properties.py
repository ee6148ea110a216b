"""Property tests: any input gets a clean error or the right answer, never a 500 or a stray upstream call.

- Id validation and config parsing are pure: these properties run once, on no
  event loop (loop-independent).
- Header handling runs against a real gateway and simulator served on their
  own thread, on each loop of ``tests.conftest.LOOPS`` in turn; hypothesis
  drives it from the test thread through a blocking socket, so that any byte
  string can be sent as a header value.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import socket
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import errors
from gateway.config import ConfigError, GatewayConfig, validate
from gateway.demo.simulator import Simulator, start_simulator
from gateway.edge.server import start_gateway
from gateway.ops.logs import JsonFormatter, Redactor
from gateway.runtime import build_state
from gateway.upstream.cohere import parse_batch_id
from tests.conftest import LOOP_FACTORIES, LOOPS
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    Answer,
    LogCapture,
    assert_no_secrets,
    make_config,
    parse_response,
    raw_config,
)

# docs/design.md §5, read as "the whole string" (Python's ``$`` would also let a trailing newline through).
CONTRACT_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
T = TypeVar("T")

# ---------------------------------------------------------------------------
# Batch ids (pure)
# ---------------------------------------------------------------------------

ID_ALPHABET = "aZ09_-.:/%\\ \t\n\r\x00\u00e9\u0660\uff21\u212a"  # with look-alikes: Arabic digit, fullwidth A, Kelvin K
ids = st.one_of(
    st.text(max_size=140),
    st.text(alphabet=ID_ALPHABET, max_size=140),
    st.from_regex(CONTRACT_ID, fullmatch=True),
    st.from_regex(CONTRACT_ID, fullmatch=True).map(lambda s: s + "\n"),
    st.integers(0, 200).map(lambda n: "a" * n),
)


@settings(max_examples=1000, deadline=None)
@given(ids)
def test_parse_batch_id_accepts_exactly_the_contract_regex(batch_id: str) -> None:
    if CONTRACT_ID.match(batch_id):
        assert parse_batch_id(batch_id) == batch_id
    else:
        with pytest.raises(errors.InvalidBatchId):
            parse_batch_id(batch_id)


# ---------------------------------------------------------------------------
# Config parsing (pure)
# ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["${COHERE_API_KEY}", "${UNSET}", "${X:-5}", "${X:-}", "$", "${", "${1}", "0", "1e3", "-1", ""]),
)
yamlish = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=12), st.integers(0, 3)), children, max_size=4),
    ),
    max_leaves=12,
)

SECTION_KEYS = {
    "server": [
        "host",
        "port",
        "shutdown_grace_s",
        "header_timeout_s",
        "max_line_size",
        "max_field_size",
        "max_headers",
        "max_body_bytes",
    ],
    "upstream": [
        "base_url",
        "token",
        "timeout_s",
        "retries",
        "max_body_bytes",
        "max_connections",
        "rate_limit",
        "budget_wait_s",
        "retry_after_max_s",
        "breaker",
    ],
    "cache": ["max_entries", "ttl_s", "stale_if_error_s", "active_jitter"],
    "logging": ["level", "access_log"],
}


@st.composite
def near_valid_configs(draw: st.DrawFn) -> Any:
    """A valid config with some keys replaced by arbitrary YAML values."""
    raw = raw_config("http://127.0.0.1:9")
    for section in draw(st.lists(st.sampled_from(sorted(SECTION_KEYS)), max_size=3)):
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            continue
        for key in draw(st.lists(st.sampled_from(SECTION_KEYS[section]), max_size=3)):
            target[key] = draw(yamlish)
    if draw(st.booleans()):
        raw["callers"] = draw(
            st.one_of(
                yamlish,
                st.lists(
                    st.fixed_dictionaries(
                        {"name": yamlish},
                        optional={"key": yamlish, "key_sha256": yamlish, "rate_limit": yamlish},
                    ),
                    max_size=3,
                ),
            )
        )
    if draw(st.booleans()):
        raw[draw(st.text(max_size=8))] = draw(yamlish)
    return raw


environments = st.dictionaries(
    st.sampled_from(["COHERE_API_KEY", "X", "UNSET_NOT", "PORT"]), st.text(max_size=20), max_size=3
)


def _secrets_in(raw: Any) -> list[str]:
    """String values under a token or key field: a problem message must never echo them."""
    found: list[str] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key in ("token", "key") and isinstance(value, str) and len(value) >= 8 and "$" not in value:
                found.append(value)
            found += _secrets_in(value)
    elif isinstance(raw, list):
        for item in raw:
            found += _secrets_in(item)
    return found


def _key_names(raw: Any) -> set[str]:
    """Every mapping key in the document, as text."""
    if isinstance(raw, dict):
        return {str(key) for key in raw} | {name for value in raw.values() for name in _key_names(value)}
    if isinstance(raw, list):
        return {name for item in raw for name in _key_names(item)}
    return set()


def outcome(raw: Any, env: dict[str, str]) -> GatewayConfig | ConfigError:
    """What validate() gives: a config or a ConfigError (any other exception escapes and fails the test)."""
    try:
        return validate(raw, env)
    except ConfigError as error:
        return error


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(yamlish, near_valid_configs()), environments)
def test_any_yaml_document_is_a_config_or_a_config_error_naming_keys(raw: Any, env: dict[str, str]) -> None:
    result = outcome(raw, env)
    if isinstance(result, GatewayConfig):
        assert result.callers
        assert result.upstream.token_value
        return
    assert result.problems
    for problem in result.problems:
        path, sep, message = problem.partition(": ")
        assert sep, problem
        assert path, problem
        assert message, problem
        for secret in _secrets_in(raw):
            # The message never echoes a secret; the path may hold one only where the
            # document itself used that text as a key name (a path names keys).
            assert secret not in message, "a config problem echoed a secret"
            assert secret not in path or secret in _key_names(raw), "a config problem echoed a secret"


@pytest.mark.parametrize("token_file", ["", ".", "/", "/nonexistent/token", "\x00", "empty", "binary", "good"])
def test_any_token_file_is_a_config_or_a_config_error(token_file: str, tmp_path: Path) -> None:
    files = {"empty": b"", "binary": b"\xff\xfe\x00", "good": b"file-token-0123456789\n"}
    if token_file in files:
        path = tmp_path / token_file
        path.write_bytes(files[token_file])
        token_file = str(path)
    raw = raw_config("http://127.0.0.1:9")
    raw["upstream"]["token"] = None
    raw["upstream"]["token_file"] = token_file
    result = outcome(raw, {})
    if isinstance(result, GatewayConfig):
        assert result.upstream.token_value == "file-token-0123456789"
    else:
        assert all(problem.startswith("upstream.token") for problem in result.problems), result.problems


# ---------------------------------------------------------------------------
# Header handling, through a real gateway on each loop
# ---------------------------------------------------------------------------


@dataclass
class ThreadedGateway:
    """A simulator and a gateway serving on their own thread and event loop."""

    loop: asyncio.AbstractEventLoop
    simulator: Simulator
    host: str
    port: int

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def send(self, data: bytes) -> bytes:
        with socket.create_connection((self.host, self.port), timeout=10) as sock:
            sock.sendall(data)
            received = bytearray()
            while chunk := sock.recv(65536):
                received += chunk
        return bytes(received)


def _serve_on_thread(loop_name: str, redactor: Redactor) -> Iterator[ThreadedGateway]:
    loop = LOOP_FACTORIES[loop_name]()
    thread = threading.Thread(target=loop.run_forever, name=f"gateway-{loop_name}", daemon=True)
    thread.start()

    async def up() -> Any:
        simulator = Simulator(token=UPSTREAM_TOKEN, lifetime_s=60)
        sim_runner, _ = await start_simulator(simulator)
        # No follower: these examples count the upstream's calls, and its list call (once a round) would count too.
        config = make_config(
            simulator.url,
            upstream={"rate_limit": {"requests_per_s": 10_000, "burst": 10_000}},
            events={"enabled": False},
        )
        gateway = await start_gateway(build_state(config, redactor), "127.0.0.1", 0)
        return simulator, sim_runner, gateway

    simulator, sim_runner, gateway = asyncio.run_coroutine_threadsafe(up(), loop).result(timeout=30)
    try:
        yield ThreadedGateway(loop, simulator, gateway.host, gateway.port)
    finally:

        async def down() -> None:
            await gateway.stop()
            await sim_runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(params=LOOPS)
def threaded_gateway(request: pytest.FixtureRequest, logs: LogCapture, redactor: Redactor) -> Iterator[ThreadedGateway]:
    yield from _serve_on_thread(request.param, redactor)


KEYS = {BILLING_KEY: "billing-service", REPORTING_KEY: "reporting"}
VALID = re.compile(rb"[ \t]*(?i:bearer) +(" + b"|".join(re.escape(k.encode()) for k in KEYS) + rb")[ \t]*", re.DOTALL)
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
header_values = st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b)
key_like = st.builds(
    lambda scheme, key, tail: (scheme + key + tail).encode("utf-8", "surrogatepass"),
    st.sampled_from(["Bearer ", "bearer ", "BEARER  ", " Bearer ", "Bearer\t", "Basic ", "", "Bearer", "Token "]),
    st.sampled_from(
        [BILLING_KEY, REPORTING_KEY, BILLING_KEY[:-1], BILLING_KEY + "x", BILLING_KEY.upper(), UPSTREAM_TOKEN, ""]
    ),
    st.sampled_from(["", " ", "\t", "x", ",", " junk", "\x00", "\x0b", "\x7f", "\u00a0", "\u2028"]),
)
authorizations = st.one_of(key_like, header_values, st.text(max_size=40).map(str.encode))
request_ids = st.one_of(
    st.none(),
    st.from_regex(SANE_REQUEST_ID, fullmatch=True).map(str.encode),
    header_values,
    st.integers(120, 300).map(lambda n: b"r" * n),
)
unique = itertools.count()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(authorization=authorizations, request_id=request_ids)
# HTTP trims only SP and HTAB around a field value (RFC 9110 5.5); a key followed by
# any other space-like character is not the key.
@example(authorization=b"Bearer " + BILLING_KEY.encode() + b"\xc2\xa0", request_id=None)
@example(authorization=b"Bearer " + BILLING_KEY.encode() + b"\xe2\x80\xa8", request_id=None)
@example(authorization=b"Bearer " + BILLING_KEY.encode() + b"\x0b", request_id=None)
@example(authorization=b"Bearer " + BILLING_KEY.encode(), request_id=b"given-id.1:2")
def test_any_authorization_and_request_id_get_a_clean_answer_and_only_a_valid_key_reaches_upstream(
    threaded_gateway: ThreadedGateway, authorization: bytes, request_id: bytes | None
) -> None:
    gateway = threaded_gateway
    batch_id = f"prop-{next(unique)}"  # a fresh id: a valid key always means one upstream call
    lines = [f"GET /v2/batches/{batch_id} HTTP/1.1".encode(), b"Host: x", b"Authorization: " + authorization]
    if request_id is not None:
        lines.append(b"X-Request-ID: " + request_id)
    lines.append(b"Connection: close")
    calls = gateway.simulator.calls
    raw = gateway.send(b"\r\n".join(lines) + b"\r\n\r\n")

    assert raw, "no answer"
    assert_no_secrets(raw)
    response = parse_response(raw)
    made_call = gateway.simulator.calls - calls
    assert response.status in (200, 400, 401, 431), raw[:200]
    valid_key = VALID.fullmatch(authorization)
    if response.status == 200:
        assert valid_key, authorization
        assert made_call == 1
        seen = gateway.simulator.seen[-1]
        assert seen.path == f"/v2/batches/{batch_id}"
        assert seen.headers.getall("X-Client-Name") == [KEYS[valid_key.group(1).decode()]]
        assert seen.headers.getall("X-Request-ID") == [response.header("X-Request-ID")]
    else:
        assert made_call == 0
        assert response.code in ("unauthorized", "malformed_request", "request_too_large")
    clean_request_id = request_id is None or re.fullmatch(rb"[\x21-\x7e]*", request_id)
    if valid_key and clean_request_id:
        assert response.status == 200, raw[:200]
    if response.status in (200, 401) and request_id is not None:
        given_id = request_id.decode("latin-1")
        echoed = response.header("X-Request-ID")
        assert echoed == (given_id if SANE_REQUEST_ID.fullmatch(given_id) else echoed)
        assert echoed is not None
        assert SANE_REQUEST_ID.fullmatch(echoed)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(path_id=st.one_of(ids, st.binary(max_size=40).map(lambda b: "".join(f"%{x:02X}" for x in b))))
def test_any_percent_encoded_id_is_a_400_or_exactly_one_call_for_the_decoded_id(
    threaded_gateway: ThreadedGateway, path_id: str
) -> None:
    gateway = threaded_gateway
    target = "/v2/batches/" + (path_id if path_id.startswith("%") else quote(path_id, safe=""))
    decoded = unquote(target.removeprefix("/v2/batches/"), errors="replace")
    before = gateway.simulator.calls_by_id.get(decoded, 0)
    calls = gateway.simulator.calls
    data = (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BILLING_KEY}\r\nConnection: close\r\n\r\n"
    ).encode()
    raw = gateway.send(data)
    assert_no_secrets(raw)
    response = parse_response(raw)
    assert response.status in (200, 400, 404, 431), raw[:200]
    if response.status == 200:
        assert CONTRACT_ID.match(decoded)
        assert gateway.simulator.calls - calls <= 1
        assert gateway.simulator.calls_by_id.get(decoded, 0) - before == gateway.simulator.calls - calls
        assert response.json["batch"]["id"] == decoded
    elif response.status == 404 and CONTRACT_ID.match(decoded) and decoded.startswith("missing"):
        # The simulator's own 404: asked for once (then cached), like any valid id.
        assert gateway.simulator.calls - calls <= 1
        assert gateway.simulator.calls_by_id.get(decoded, 0) - before == gateway.simulator.calls - calls
    else:
        assert gateway.simulator.calls == calls
        if CONTRACT_ID.match(decoded):
            pytest.fail(f"a valid id was refused: {response.status}")


# ---------------------------------------------------------------------------
# Pipelines: answers in order, one per valid request, then the close (#11)
# ---------------------------------------------------------------------------

# What each kind of valid request is answered with (the simulator answers 404 for
# ids starting with "missing"; "-bad" is not a well-formed id).
PIPELINE_ANSWERS = {"hit": 200, "miss": 200, "not_found": 404, "bad_key": 401, "bad_id": 400}
# What may end a pipeline: nothing (a last request closes it), bad bytes, or a
# request that closes the connection with more sent after it.
BAD_TAILS = {
    "none": b"",
    "garbage": b"NOT HTTP AT ALL\r\n\r\n",
    "no host": b"GET /v2/batches/batch-1 HTTP/1.1\r\nAuthorization: Bearer " + BILLING_KEY.encode() + b"\r\n\r\n",
    "bad version": b"GET /v2/batches/batch-1 HTTX/1.1\r\nHost: x\r\n\r\n",
}


def pipelined_request(kind: str, request_id: str, *, close: bool = False, batch_id: str | None = None) -> bytes:
    if batch_id is None:
        ids = {"hit": "batch-1", "miss": f"pipe-{next(unique)}", "not_found": f"missing-{next(unique)}"}
        batch_id = ids.get(kind, "-bad")
    key = REPORTING_KEY + "x" if kind == "bad_key" else BILLING_KEY
    connection = "close" if close else "keep-alive"
    return (
        f"GET /v2/batches/{batch_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"X-Request-ID: {request_id}\r\nConnection: {connection}\r\n\r\n"
    ).encode()


def split_answers(raw: bytes) -> list[Answer]:
    """Every whole answer in ``raw``, in order (each has a Content-Length)."""
    answers = []
    while raw:  # each turn takes one answer off the front
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"a partial answer: {raw[:200]!r}"
        answer = parse_response(head + sep)
        length = int(answer.header("Content-Length") or 0)
        answer.body, raw = rest[:length], rest[length:]
        answers.append(answer)
    return answers


def send_in_pieces(gateway: ThreadedGateway, data: bytes, cuts: list[int]) -> bytes:
    """Send ``data`` cut at ``cuts`` (one write each); read until the gateway closes.

    Once the gateway has closed (after ``Connection: close`` or bad bytes), what
    is still sent is refused by the kernel, with a reset: the answers sent
    before it are still read.
    """
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = 0
        try:
            for cut in [*sorted({c % len(data) for c in cuts} - {0}), len(data)]:
                sock.sendall(data[start:cut])
                start = cut
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = bytearray()
        try:
            while chunk := sock.recv(65536):  # bounded by the socket's timeout and the gateway's close
                received += chunk
        except ConnectionResetError:
            pass
    return bytes(received)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kinds=st.lists(st.sampled_from(sorted(PIPELINE_ANSWERS)), min_size=1, max_size=12),
    tail=st.sampled_from([*sorted(BAD_TAILS), "close, then more"]),
    cuts=st.lists(st.integers(min_value=1, max_value=10_000), max_size=4),
)
def test_a_pipeline_split_anywhere_is_answered_in_order_one_answer_per_valid_request_then_closed(
    threaded_gateway: ThreadedGateway, kinds: list[str], tail: str, cuts: list[int]
) -> None:
    gateway = threaded_gateway
    gateway.send(pipelined_request("hit", "prime", close=True))  # batch-1 is cached from here on
    data = b"".join(pipelined_request(kind, f"r{i}") for i, kind in enumerate(kinds))
    expected = [(f"r{i}", PIPELINE_ANSWERS[kind]) for i, kind in enumerate(kinds)]
    if tail == "close, then more":
        never = f"never-{next(unique)}"
        data += pipelined_request("hit", "closer", close=True) + pipelined_request("miss", "never", batch_id=never)
        expected.append(("closer", 200))
    elif tail == "none":
        data += pipelined_request("hit", "last", close=True)
        expected.append(("last", 200))
    else:
        data += BAD_TAILS[tail]
    calls = gateway.simulator.calls

    raw = send_in_pieces(gateway, data, cuts)

    assert_no_secrets(raw)
    answers = split_answers(raw)
    assert [(a.header("X-Request-ID"), a.status) for a in answers[: len(expected)]] == expected
    if tail in ("none", "close, then more"):
        assert len(answers) == len(expected)
    else:
        assert len(answers) == len(expected) + 1
        assert (answers[-1].status, answers[-1].code) == (400, "malformed_request")
    upstream_calls = kinds.count("miss") + kinds.count("not_found")
    # (a hit may have become a miss: batch-1's entry lives ttl_s.active, 5 s)
    assert upstream_calls <= gateway.simulator.calls - calls <= upstream_calls + 1
    if tail == "close, then more":
        assert gateway.simulator.calls_by_id.get(never, 0) == 0


# ---------------------------------------------------------------------------
# Log lines: any text around a secret, in any field
# ---------------------------------------------------------------------------

# Secrets of every shape a config allows (quotes, backslashes, controls, DEL,
# non-ASCII), at least the redactor's 6 characters. Without '[' and ']': a
# secret that overlaps the "[REDACTED]" marker could be re-formed by it from
# the text that follows, which reveals only that text.
log_secrets = st.text(st.characters(blacklist_characters="[]", blacklist_categories=("Cs",)), min_size=6, max_size=24)
log_texts = st.text(max_size=30).filter(lambda t: "bearer" not in t.lower())


@settings(max_examples=500, deadline=None)
@given(secret=log_secrets, before=log_texts, after=log_texts, nested=st.booleans())
# DEL is left raw by orjson and escaped by json: a line of either kind must lose it.
@example(secret="key\x7fwith-del", before="", after="", nested=False)
@example(secret="key\x7fwith-del", before="caf\u00e9 ", after="", nested=True)
# A value spelling out a secret's JSON escape: redacting the rendered line would break its JSON.
@example(secret="\u00e9-secret", before="\\u00e9-secret and ", after="", nested=False)
def test_a_secret_inside_any_log_field_never_reaches_the_line(
    secret: str, before: str, after: str, nested: bool
) -> None:
    redactor = Redactor()
    redactor.update([secret])
    value: Any = before + secret + after
    record = logging.LogRecord("gateway", logging.INFO, "", 0, "event", None, None)
    record.fields = {"field": {"inner": [value]} if nested else value, "status": 200}

    line = JsonFormatter(redactor).format(record)

    assert line.isascii()
    assert not any(secret in text for text in strings_in(json.loads(line)))  # a valid line, no secret in it


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a decoded JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
