"""Config validation names every problem by its key path; the CLI never shows a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load_config, validate
from gateway.demo.mode import DEMO_CALLERS
from gateway.demo.simulator import Simulator
from tests.conftest import ProcessFactory
from tests.support import (
    BILLING_KEY,
    REPORTING_KEY,
    UPSTREAM_TOKEN,
    free_port,
    http,
    process_config,
    raw_config,
    sha256_hex,
)

BASE = "https://api.cohere.com"
# Secret-looking values used in broken configs: no message may echo them.
SHORT_KEY = "short-secret-15"
TOKEN_IN_WRONG_PLACE = "misplaced-upstream-token-91c2"
SECRETS = (UPSTREAM_TOKEN, BILLING_KEY, REPORTING_KEY, SHORT_KEY, TOKEN_IN_WRONG_PLACE)

Case = Callable[[Path], tuple[Any, dict[str, str]]]


def with_token_file(contents: bytes | None, **upstream: Any) -> Case:
    def build(tmp_path: Path) -> tuple[Any, dict[str, str]]:
        path = tmp_path / "token"
        if contents is not None:
            path.write_bytes(contents)
        raw = raw_config(BASE, upstream={"token_file": str(path), **upstream})
        if "token" not in upstream:
            del raw["upstream"]["token"]
        return raw, {}

    return build


def doc(raw: Any, env: dict[str, str] | None = None) -> Case:
    return lambda _tmp: (raw, env or {})


def without(section: str, key: str) -> dict[str, Any]:
    raw = raw_config(BASE)
    del raw[section][key]
    return raw


def callers(*entries: dict[str, Any]) -> dict[str, Any]:
    return raw_config(BASE, callers=list(entries))


BILLING = {"name": "billing-service", "key": BILLING_KEY}

PROBLEMS: list[tuple[str, Case, list[str]]] = [
    ("missing token", doc(without("upstream", "token")), ["upstream.token: required"]),
    ("empty token", doc(raw_config(BASE, upstream={"token": "   "})), ["upstream.token: is empty"]),
    (
        "token and token_file together",
        with_token_file(b"file-token-0123456789", token=UPSTREAM_TOKEN),
        ["upstream.token: set token or token_file, not both"],
    ),
    ("unreadable token file", with_token_file(None), ["upstream.token_file: cannot read"]),
    ("empty token file", with_token_file(b" \n"), ["upstream.token_file:", "is empty"]),
    ("token file not UTF-8", with_token_file(b"\xff\xfe\xfd"), ["upstream.token_file: cannot read"]),
    ("missing upstream", doc({"callers": [BILLING]}), ["upstream: Field required"]),
    ("missing callers", doc({"upstream": {"token": UPSTREAM_TOKEN}}), ["callers: Field required"]),
    ("no callers", doc(callers()), ["callers: List should have at least 1 item"]),
    ("negative active TTL", doc(raw_config(BASE, cache={"ttl_s": {"active": -1}})), ["cache.ttl_s.active:"]),
    ("zero terminal TTL", doc(raw_config(BASE, cache={"ttl_s": {"terminal": 0}})), ["cache.ttl_s.terminal:"]),
    ("zero not_found TTL", doc(raw_config(BASE, cache={"ttl_s": {"not_found": 0}})), ["cache.ttl_s.not_found:"]),
    ("negative timeout", doc(raw_config(BASE, upstream={"timeout_s": -0.5})), ["upstream.timeout_s:"]),
    ("zero burst", doc(raw_config(BASE, upstream={"rate_limit": {"burst": 0}})), ["upstream.rate_limit.burst:"]),
    ("port out of range", doc(raw_config(BASE, server={"port": 70000})), ["server.port:"]),
    (
        "a part origin with no host",
        doc(raw_config(BASE, datasets={"part_origins": ["https://:443"]})),
        ["datasets.part_origins:"],
    ),
    (
        "duplicate caller name",
        doc(callers(BILLING, {"name": "billing-service", "key": REPORTING_KEY})),
        ["callers.1.name: duplicate of callers.0.name"],
    ),
    (
        "duplicate key",
        doc(callers(BILLING, {"name": "other", "key": BILLING_KEY})),
        ["callers.1.key: same key as callers.0"],
    ),
    (
        "duplicate key given once as key and once as its sha256",
        doc(callers(BILLING, {"name": "other", "key_sha256": sha256_hex(BILLING_KEY)})),
        ["callers.1.key_sha256: same key as callers.0"],
    ),
    (
        "duplicate key, sha256 in capitals",
        doc(callers({"name": "a", "key_sha256": sha256_hex(BILLING_KEY).upper()}, {**BILLING, "name": "b"})),
        ["callers.1.key: same key as callers.0"],
    ),
    ("unknown top-level key", doc(raw_config(BASE, cahce={})), ["cahce: unknown key (did you mean cache?)"]),
    (
        "unknown nested key",
        doc(raw_config(BASE, upstream={"tokn": TOKEN_IN_WRONG_PLACE})),
        ["upstream.tokn: unknown key (did you mean upstream.token?)"],
    ),
    (
        "unknown caller key",
        doc(callers({**BILLING, "secret": TOKEN_IN_WRONG_PLACE})),
        ["callers.0.secret: unknown key"],
    ),
    ("wrong type: text for a number", doc(raw_config(BASE, upstream={"timeout_s": "soon"})), ["upstream.timeout_s:"]),
    ("wrong type: true for a number", doc(raw_config(BASE, upstream={"retries": True})), ["upstream.retries:"]),
    ("wrong type: list for a section", doc(raw_config(BASE, cache=[1, 2])), ["cache:"]),
    ("wrong type: number for a token", doc(raw_config(BASE, upstream={"token": 12345})), ["upstream.token:"]),
    ("wrong type: callers as a mapping", doc(raw_config(BASE, callers={"a": BILLING})), ["callers:"]),
    ("wrong type: a caller as text", doc(callers("billing-service")), ["callers.0:"]),
    ("wrong type: not a mapping at all", doc(["upstream", "callers"]), ["config: the file must be a YAML mapping"]),
    ("bad base_url scheme", doc(raw_config("ftp://api.cohere.com")), ["upstream.base_url:"]),
    ("base_url with a query", doc(raw_config("https://api.cohere.com/?x=1")), ["upstream.base_url:"]),
    ("base_url with no host", doc(raw_config("https://")), ["upstream.base_url:"]),
    ("base_url not a URL", doc(raw_config("api.cohere.com")), ["upstream.base_url:"]),
    ("bad caller name: space", doc(callers({**BILLING, "name": "billing service"})), ["callers.0.name:"]),
    ("bad caller name: newline", doc(callers({**BILLING, "name": "billing\r\nX-Evil: 1"})), ["callers.0.name:"]),
    ("bad caller name: empty", doc(callers({**BILLING, "name": ""})), ["callers.0.name:"]),
    ("bad caller name: too long", doc(callers({**BILLING, "name": "n" * 65})), ["callers.0.name:"]),
    ("short key", doc(callers({**BILLING, "key": SHORT_KEY})), ["callers.0.key: must be at least 16 characters"]),
    ("bad key_sha256", doc(callers({"name": "a", "key_sha256": "abc"})), ["callers.0.key_sha256: must be 64 hex"]),
    ("caller with no key", doc(callers({"name": "a"})), ["callers.0: key (or key_sha256, or key_file) is required"]),
    (
        "caller with key and key_sha256",
        doc(callers({**BILLING, "key_sha256": sha256_hex(BILLING_KEY)})),
        ["callers.0: set only one of key, key_sha256 and key_file"],
    ),
    ("unknown log level", doc(raw_config(BASE, logging={"level": "LOUD"})), ["logging.level:"]),
    ("unknown operation", doc(callers({**BILLING, "allow": ["retrieve", "delete"]})), ["callers.0.allow.1:"]),
    ("allow as text", doc(callers({**BILLING, "allow": "retrieve"})), ["callers.0.allow: must be a list"]),
    ("unknown scope", doc(callers({**BILLING, "batches": "mine"})), ["callers.0.batches:"]),
    ("empty store path", doc(raw_config(BASE, store={"path": ""})), ["store.path:"]),
    ("zero idempotency TTL", doc(raw_config(BASE, batches={"idempotency_ttl_s": 0})), ["batches.idempotency_ttl_s:"]),
    ("zero max wait", doc(raw_config(BASE, cache={"max_wait_s": 0})), ["cache.max_wait_s:"]),
    ("negative max waiters", doc(raw_config(BASE, cache={"max_waiters": -1})), ["cache.max_waiters:"]),
    (
        "active TTL below active_min",
        doc(raw_config(BASE, cache={"ttl_s": {"active": 0.5, "active_min": 1}})),
        ["cache.ttl_s: needs active_min <= active <= active_max"],
    ),
    (
        "unset ${VAR} in the token",
        doc(raw_config(BASE, upstream={"token": "${COHERE_API_KEY}"})),
        ["upstream.token: environment variable COHERE_API_KEY is not set"],
    ),
    (
        "unset ${VAR} in a caller key",
        doc(callers({**BILLING, "key": "${BILLING_GATEWAY_KEY}"})),
        ["callers.0.key: environment variable BILLING_GATEWAY_KEY is not set"],
    ),
    (
        "unset ${VAR} in a number",
        doc(raw_config(BASE, server={"port": "${PORT}"})),
        ["server.port: environment variable PORT is not set"],
    ),
    (
        "set ${VAR} that is not a number",
        doc(raw_config(BASE, server={"port": "${PORT}"}), {"PORT": "eighty"}),
        ["server.port:"],
    ),
]


@pytest.mark.parametrize(("case", "expected"), [pytest.param(c, e, id=name) for name, c, e in PROBLEMS])
def test_each_problem_is_reported_once_by_its_key_path(case: Case, expected: list[str], tmp_path: Path) -> None:
    raw, env = case(tmp_path)
    with pytest.raises(ConfigError) as raised:
        validate(raw, env)
    problems = raised.value.problems
    assert len(problems) == 1, problems
    for fragment in expected:
        assert fragment in problems[0]
    assert problems[0].startswith(expected[0].split(":")[0] + ":")
    for secret in SECRETS:
        assert secret not in str(raised.value), "a secret leaked into a config problem"


def test_every_problem_in_a_file_is_reported_at_once() -> None:
    raw = raw_config(
        BASE,
        server={"port": -1},
        upstream={"token": "${COHERE_API_KEY}", "timeout_s": 0},
        cache={"ttl_s": {"active": -5}},
        callers=[
            {"name": "billing-service", "key": BILLING_KEY},
            {"name": "billing-service", "key": SHORT_KEY},
            {"name": "x y", "key": BILLING_KEY},
        ],
        extra_section={},
    )
    with pytest.raises(ConfigError) as raised:
        validate(raw, {})
    paths = sorted(problem.partition(": ")[0] for problem in raised.value.problems)
    assert paths == sorted(
        [
            "server.port",
            "upstream.token",
            "upstream.timeout_s",
            "cache.ttl_s.active",
            "callers.1.name",
            "callers.1.key",
            "callers.2.key",
            "callers.2.name",
            "extra_section",
        ]
    )
    for secret in SECRETS:
        assert secret not in str(raised.value), "a secret leaked into a config problem"


@pytest.mark.parametrize(
    ("value", "env", "token"),
    [
        ("${COHERE_API_KEY}", {"COHERE_API_KEY": UPSTREAM_TOKEN}, UPSTREAM_TOKEN),
        ("${COHERE_API_KEY:-fallback-token-123}", {}, "fallback-token-123"),
        ("${COHERE_API_KEY:-fallback-token-123}", {"COHERE_API_KEY": UPSTREAM_TOKEN}, UPSTREAM_TOKEN),
        ("prefix-${PART_A}-${PART_B}", {"PART_A": "one", "PART_B": "two"}, "prefix-one-two"),
        ("${EMPTY:-}${COHERE_API_KEY}", {"COHERE_API_KEY": UPSTREAM_TOKEN}, UPSTREAM_TOKEN),
        ("$COHERE_API_KEY-literal", {"COHERE_API_KEY": "ignored"}, "$COHERE_API_KEY-literal"),
    ],
)
def test_environment_variables_are_interpolated_in_strings(value: str, env: dict[str, str], token: str) -> None:
    config = validate(raw_config(BASE, upstream={"token": value}), env)
    assert config.upstream.token_value == token


def test_an_interpolated_number_is_read_as_a_number() -> None:
    config = validate(raw_config(BASE, server={"port": "${PORT:-9090}"}, upstream={"timeout_s": "${T}"}), {"T": "2.5"})
    assert (config.server.port, config.upstream.timeout_s) == (9090, 2.5)


def test_defaults_fill_every_key_but_the_token_and_callers() -> None:
    config = validate({"upstream": {"token": UPSTREAM_TOKEN}, "callers": [BILLING]}, {})
    assert config.upstream.base_url == "https://api.cohere.com"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8080)
    assert (config.upstream.timeout_s, config.upstream.retries, config.upstream.max_body_bytes) == (15, 2, 1048576)
    assert (config.upstream.rate_limit.requests_per_s, config.upstream.rate_limit.burst) == (10, 20)
    assert config.cache.max_entries == 100000
    assert (config.cache.ttl_s.active, config.cache.ttl_s.terminal, config.cache.ttl_s.not_found) == (5, 86400, 10)
    assert config.cache.stale_if_error_s == 600
    assert config.callers[0].rate_limit is None


def test_a_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"{UPSTREAM_TOKEN}\n")
    raw = raw_config(BASE, upstream={"token_file": str(tmp_path / "token")})
    del raw["upstream"]["token"]
    assert validate(raw, {}).upstream.token_value == UPSTREAM_TOKEN


def test_base_url_keeps_its_path_prefix_without_a_trailing_slash() -> None:
    config = validate(raw_config("https://proxy.internal/cohere/"), {})
    assert config.upstream.base_url == "https://proxy.internal/cohere"


def test_secrets_do_not_appear_in_the_config_repr() -> None:
    text = repr(validate(raw_config(BASE), {}))
    for secret in SECRETS:
        assert secret not in text, "a secret leaked into the config's repr"


def write_config(tmp_path: Path, raw: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_load_config_reads_a_file_and_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, raw_config(BASE, upstream={"token": "${COHERE_API_KEY}"}))
    assert load_config(path, {"COHERE_API_KEY": UPSTREAM_TOKEN}).upstream.token_value == UPSTREAM_TOKEN


@pytest.mark.parametrize(
    ("contents", "problem"),
    [
        (None, "config: cannot read"),
        (b"upstream: [unclosed\n", "is not valid YAML at line"),
        (b"\xff\xfe not utf-8", "config: cannot read"),
        (b"", "upstream: Field required"),
        (b"- a\n- b\n", "config: the file must be a YAML mapping"),
    ],
)
def test_load_config_reports_unreadable_or_unparseable_files(
    contents: bytes | None, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    if contents is not None:
        path.write_bytes(contents)
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert problem in raised.value.problems[0]


# --- unknown keys: the nearest valid one ------------------------------------------------------

UNKNOWN_KEYS: list[tuple[dict[str, Any], str]] = [
    ({"server": {"prot": 8080}}, "server.prot: unknown key (did you mean server.port?)"),
    ({"servr": {}}, "servr: unknown key (did you mean server?)"),
    ({"cache": {"ttl_s": {"activ": 5}}}, "cache.ttl_s.activ: unknown key (did you mean cache.ttl_s.active?)"),
    (
        {"upstream": {"rate_limit": {"requests_per_sec": 5, "requests_per_s": 5}}},
        "upstream.rate_limit.requests_per_sec: unknown key (did you mean upstream.rate_limit.requests_per_s?)",
    ),
    (
        {"upstream": {"breaker": {"cooldown": 5}}},
        "upstream.breaker.cooldown: unknown key (did you mean upstream.breaker.cooldown_s?)",
    ),
    ({"redis": {"key_prefx": "x:"}}, "redis.key_prefx: unknown key (did you mean redis.key_prefix?)"),
    (
        {"callers": [{"name": "billing-service", "key": BILLING_KEY, "alow": ["list"]}]},
        "callers.0.alow: unknown key (did you mean callers.0.allow?)",
    ),
    (
        {"callers": [{"name": "a", "key": BILLING_KEY, "rate_limit": {"requests_per_s": 1, "brust": 1, "burst": 1}}]},
        "callers.0.rate_limit.brust: unknown key (did you mean callers.0.rate_limit.burst?)",
    ),
    ({"logging": {"colour": True}}, "logging.colour: unknown key"),
    ({"telemetry": {}}, "telemetry: unknown key"),
]


@pytest.mark.parametrize(("sections", "problem"), UNKNOWN_KEYS)
def test_an_unknown_key_is_named_with_the_nearest_valid_key_if_one_is_close(
    sections: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        validate(raw_config(BASE, **sections), {})
    assert raised.value.problems == [problem]


# --- weak and published caller keys ----------------------------------------------------------

DEMO_KEYS = [caller["key"] for caller in DEMO_CALLERS]
WEAK = ["test", "password", "changeme", "secret", "admin", "123456", ""]


@pytest.mark.parametrize("key", WEAK + DEMO_KEYS)
def test_a_key_sha256_of_a_weak_or_demo_key_is_refused_by_its_path(key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate(callers(BILLING, {"name": "reporting", "key_sha256": sha256_hex(key)}), {})
    [problem] = raised.value.problems
    assert problem.startswith("callers.1.key_sha256: is a ")
    assert "cohere-gateway new-caller" in problem


@pytest.mark.parametrize("key", DEMO_KEYS)
def test_a_demo_key_in_clear_is_refused_outside_demo_mode(key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate(callers(BILLING, {"name": "reporting", "key": key}), {})
    [problem] = raised.value.problems
    assert problem.startswith("callers.1.key: is a demo key")
    assert key not in problem


def test_the_demo_callers_are_accepted_in_demo_mode_only() -> None:
    config = validate(raw_config(BASE, callers=[dict(c) for c in DEMO_CALLERS]), {}, demo=True)
    assert [c.name for c in config.callers] == [c["name"] for c in DEMO_CALLERS]


def test_a_weak_key_of_16_characters_or_more_is_refused_in_clear_too() -> None:
    with pytest.raises(ConfigError) as raised:
        validate(callers({"name": "a", "key": "1234567890123456"}), {})
    assert raised.value.problems == [
        "callers.0.key: is a well-known weak key; make a new one with: cohere-gateway new-caller NAME"
    ]


def test_check_config_refuses_the_sha256_of_test_naming_the_callers_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, callers(BILLING, {"name": "reporting", "key_sha256": sha256_hex("test")}))
    result = run_cli("--check-config", "--config", str(path))
    assert result.returncode == 2
    assert "callers.1.key_sha256: is a well-known weak key" in result.stderr
    assert "OK" not in result.stdout


# --- callers[].key_file -----------------------------------------------------------------------


def with_key_file(tmp_path: Path, contents: str | None) -> dict[str, Any]:
    path = tmp_path / "reporting-key"
    if contents is not None:
        path.write_text(contents, encoding="utf-8")
    return callers(BILLING, {"name": "reporting", "key_file": str(path)})


def test_a_key_file_is_read_stripped_and_its_key_is_a_secret(tmp_path: Path) -> None:
    config = validate(with_key_file(tmp_path, f"{REPORTING_KEY}\n"), {})
    assert config.callers[1].key_value == REPORTING_KEY
    assert config.callers[1].key_digest.hex() == sha256_hex(REPORTING_KEY)
    assert REPORTING_KEY in config.secrets
    assert REPORTING_KEY not in repr(config)


@pytest.mark.parametrize(
    ("contents", "problem"),
    [
        (None, "callers.1.key_file: cannot read"),
        (" \n", "callers.1.key_file: "),
        (SHORT_KEY, "callers.1.key_file: must be at least 16 characters"),
        ("1234567890123456", "callers.1.key_file: is a well-known weak key"),
        (DEMO_KEYS[0], "callers.1.key_file: is a demo key"),
    ],
)
def test_a_key_file_that_is_missing_empty_short_or_weak_is_refused_by_its_path(
    tmp_path: Path, contents: str | None, problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        validate(with_key_file(tmp_path, contents), {})
    [found] = raised.value.problems
    assert found.startswith(problem)
    assert SHORT_KEY not in found


def test_a_key_file_holding_another_callers_key_is_a_duplicate(tmp_path: Path) -> None:
    raw = with_key_file(tmp_path, BILLING_KEY)
    with pytest.raises(ConfigError) as raised:
        validate(raw, {})
    assert raised.value.problems == ["callers.1.key_file: same key as callers.0"]


@pytest.mark.one_loop
async def test_a_rotated_key_file_is_read_again_on_sighup(
    tmp_path: Path, simulator: Simulator, gateway_process: ProcessFactory
) -> None:
    old_key, new_key = "reporting-key-before-rotation-1", "reporting-key-after-rotation-22"
    raw = process_config(simulator.url, callers=with_key_file(tmp_path, old_key)["callers"])
    gateway = await gateway_process(write_config(tmp_path, raw))
    assert (await http(f"{gateway.url}/v2/batches/b1", key=old_key)).status == 200

    (tmp_path / "reporting-key").write_text(new_key + "\n", encoding="utf-8")
    mark = gateway.signal(signal.SIGHUP)
    await gateway.wait_for_event("config reloaded", after=mark)
    assert (await http(f"{gateway.url}/v2/batches/b1", key=old_key)).status == 401
    assert (await http(f"{gateway.url}/v2/batches/b1", key=new_key)).status == 200
    gateway.proc.terminate()
    assert await gateway.exit_code(15) == 0
    assert old_key not in gateway.text
    assert new_key not in gateway.text


# --- the CLI ------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"COHERE_API_KEY", "BILLING_GATEWAY_KEY"}}
    return subprocess.run(  # noqa: S603 (our own interpreter and module)
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        check=False,
    )


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, raw_config(BASE))
    result = run_cli("--check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


EXAMPLE = Path(__file__).parent.parent / "config.yaml"
# The variables the README tells a newcomer to export.
EXAMPLE_ENV = {"COHERE_API_KEY": UPSTREAM_TOKEN, "BILLING_GATEWAY_KEY": BILLING_KEY}


def test_check_config_accepts_the_shipped_example_once_its_variables_are_set() -> None:
    result = run_cli(
        "--check-config",
        "--config",
        str(EXAMPLE),
        env={**EXAMPLE_ENV, "REPORTING_KEY_SHA256": sha256_hex(REPORTING_KEY)},
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_the_shipped_example_holds_no_usable_key_so_it_does_not_start_on_the_readmes_variables_alone() -> None:
    # Before, callers.1 was key_sha256 of "test": with these two set, Bearer test was accepted.
    result = run_cli("--check-config", "--config", str(EXAMPLE), env=EXAMPLE_ENV)
    assert result.returncode == 2
    assert "callers.1.key_sha256: environment variable REPORTING_KEY_SHA256 is not set" in result.stderr


BAD_FILE = raw_config(
    BASE,
    upstream={"token": "${COHERE_API_KEY}", "timeout_s": -1},
    cache={"ttl_s": {"terminal": 0}},
    callers=[{"name": "billing-service", "key": BILLING_KEY}, {"name": "billing-service", "key": SHORT_KEY}],
)
BAD_FILE_PATHS = ("upstream.token", "upstream.timeout_s", "cache.ttl_s.terminal", "callers.1.name", "callers.1.key")


def assert_reported_without_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0
    for path in BAD_FILE_PATHS:
        assert f"{path}:" in result.stderr
    assert "COHERE_API_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for secret in SECRETS:
        assert secret not in result.stderr + result.stdout, "a secret leaked into the CLI's output"


def test_check_config_names_every_bad_key_and_exits_non_zero(tmp_path: Path) -> None:
    result = run_cli("--check-config", "--config", str(write_config(tmp_path, BAD_FILE)))
    assert_reported_without_traceback(result)
    assert "OK" not in result.stdout


def test_check_config_on_a_missing_file_names_it_without_a_traceback(tmp_path: Path) -> None:
    result = run_cli("--check-config", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0
    assert "nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_starting_with_a_bad_config_exits_non_zero_and_never_listens(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, {**BAD_FILE, "server": {"host": "127.0.0.1", "port": port}})
    result = run_cli("--config", str(path))
    assert_reported_without_traceback(result)
    assert '"serving"' not in result.stderr
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("redis://:pa%40ss-word-91@127.0.0.1:6379/0", "pa@ss-word-91"),
        ("rediss://gateway:tls-pass-7731@redis.internal:6380/0", "tls-pass-7731"),
        ("unix:///run/redis.sock?password=sock-pass-4410", "sock-pass-4410"),
    ],
)
def test_the_redis_password_is_a_secret_the_logs_never_show(url: str, password: str) -> None:
    config = validate(raw_config("http://127.0.0.1:1", redis={"url": url}), {})
    assert password in config.secrets
    assert password not in repr(config)


@pytest.mark.parametrize("url", ["http://redis:6379", "redis://", "localhost:6379"])
def test_a_redis_url_that_is_not_one_is_refused_by_its_key(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate(raw_config("http://127.0.0.1:1", redis={"url": url}), {})
    assert any(problem.startswith("redis.url:") for problem in raised.value.problems), raised.value.problems


def test_an_unset_redis_url_means_no_redis() -> None:
    config = validate(raw_config("http://127.0.0.1:1", redis={"url": "${REDIS_URL:-}"}), {})
    assert config.redis.url is None
