"""The gateway's configuration: load ``config.yaml``, interpolate, validate.

The file is read once per start or reload into frozen objects. Validation
reports every problem at once, each prefixed with the dotted path of its key
(``callers.1.key_sha256: ...``), so an operator fixes the file in one pass.
Secrets (the upstream token, caller keys) are held as ``SecretStr`` so that a
stray ``repr`` or log line never shows them.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CALLER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# A caller key is a bearer secret: short ones can be guessed.
MIN_CALLER_KEY_LENGTH = 16

# The demo's callers (gateway/demo.py) use these keys. They are published in the
# README, so they are accepted only with --demo, never from a config file.
DEMO_BILLING_KEY = "demo-billing-key-0001"
DEMO_REPORTING_KEY = "demo-reporting-key-0002"
DEMO_KEYS = frozenset({DEMO_BILLING_KEY, DEMO_REPORTING_KEY})
# Keys anyone would try first, or that an example once published. A caller
# whose key (in clear or as key_sha256) is one of them is refused; the short
# ones are refused by length too, but a key_sha256 hides the length.
WEAK_KEYS = frozenset(
    {
        "",
        "test",
        "testing",
        "password",
        "passw0rd",
        "password1",
        "password123",
        "changeme",
        "change-me",
        "changeit",
        "replace-me",
        "secret",
        "admin",
        "root",
        "guest",
        "default",
        "example",
        "demo",
        "key",
        "apikey",
        "api-key",
        "token",
        "letmein",
        "qwerty",
        "hunter2",
        "123456",
        "1234567890",
        "12345678",
        "123456789",
        "1234567890123456",
        "0000000000000000",
        "some-key-of-16-chars-or-more",
    }
)
_WEAK_DIGESTS = frozenset(hashlib.sha256(key.encode()).hexdigest() for key in WEAK_KEYS)
_DEMO_DIGESTS = frozenset(hashlib.sha256(key.encode()).hexdigest() for key in DEMO_KEYS)
# ValidationInfo.context key: the config is the one --demo builds (its demo callers are allowed).
DEMO_CONTEXT = "demo"
NEW_KEY_HINT = "make a new one with: cohere-gateway new-caller NAME"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _problem(path: str, text: str) -> PydanticCustomError:
    # The message carries its own path: cross-field checks run on a parent
    # model but must still name the exact key that is wrong.
    return PydanticCustomError("config_problem", "{path}: {text}", {"path": path, "text": text})


@dataclass(frozen=True, slots=True)
class TokenFile:
    """A token read from a file (a mounted secret); re-read on every reload."""

    path: Path
    token: SecretStr


def _read_token_file(value: object) -> TokenFile:
    if isinstance(value, TokenFile):
        return value
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("must be a file path")
    path = Path(value)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ValueError(f"{path} is empty")
    return TokenFile(path=path, token=SecretStr(token))


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # Numbers stay lax (``${PORT}`` interpolates to a string), but YAML's
        # ``yes``/``true`` must not silently become 1.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError("must be a number, not true/false")
        return value


PositiveSeconds = Annotated[float, Field(gt=0)]


class RateLimit(_Section):
    """A token bucket: ``requests_per_s`` refill, ``burst`` capacity."""

    requests_per_s: PositiveSeconds
    burst: Annotated[int, Field(ge=1)]


class BreakerSettings(_Section):
    """After ``failures`` consecutive upstream failures, fail fast for ``cooldown_s``."""

    failures: Annotated[int, Field(ge=1)] = 5
    cooldown_s: PositiveSeconds = 30


class ServerSettings(_Section):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    shutdown_grace_s: PositiveSeconds = 10
    keepalive_timeout_s: PositiveSeconds = 75
    header_timeout_s: PositiveSeconds = 10
    max_line_size: Annotated[int, Field(ge=256)] = 8190
    max_field_size: Annotated[int, Field(ge=256)] = 8190
    max_headers: Annotated[int, Field(ge=8)] = 64
    # A create's JSON body (DESIGN §8); larger is 413 request_too_large.
    max_body_bytes: Annotated[int, Field(ge=0)] = 65536
    # Connections the kernel queues before the gateway accepts them; past it a
    # burst of connects is dropped and waits for the client's SYN retry (1 s, 3 s...).
    backlog: Annotated[int, Field(ge=1)] = 1024
    # Processes serving one port (SO_REUSEPORT) under one parent; above 1 needs redis.url (DESIGN §10).
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # A request body that sends no byte for this long is 408 request_timeout (DESIGN §7).
    body_timeout_s: PositiveSeconds = 30
    # /metrics on a listener of its own (same host), so the API port need not expose
    # every caller's name and traffic; 0: /metrics stays on the API port.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # A file the gateway writes its pid to at start and removes at exit (for kill -HUP); empty: none.
    pid_file: str = ""


class UpstreamSettings(_Section):
    base_url: str = "https://api.cohere.com"
    token: SecretStr | None = None
    token_file: Annotated[TokenFile, PlainValidator(_read_token_file)] | None = None
    timeout_s: PositiveSeconds = 15
    connect_timeout_s: PositiveSeconds = 5
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_backoff_s: PositiveSeconds = 0.1
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1048576
    max_connections: Annotated[int, Field(ge=1)] = 100
    rate_limit: RateLimit = RateLimit(requests_per_s=10, burst=20)
    budget_wait_s: Annotated[float, Field(ge=0)] = 0.5
    retry_after_default_s: PositiveSeconds = 5
    retry_after_max_s: PositiveSeconds = 300
    breaker: BreakerSettings = BreakerSettings()

    @field_validator("base_url")
    @classmethod
    def _http_url_without_query(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise ValueError("must be an http:// or https:// URL with no query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _exactly_one_token_source(self) -> UpstreamSettings:
        if self.token is not None and self.token_file is not None:
            raise _problem("upstream.token", "set token or token_file, not both")
        if self.token is None and self.token_file is None:
            raise _problem("upstream.token", "required (or upstream.token_file)")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise _problem("upstream.token", "is empty (is its environment variable set?)")
        return self

    @property
    def token_value(self) -> str:
        """The shared upstream token, whichever source it came from."""
        if self.token_file is not None:
            return self.token_file.token.get_secret_value()
        assert self.token is not None  # guaranteed by the validator above
        return self.token.get_secret_value().strip()


class TtlSettings(_Section):
    active: PositiveSeconds = 5
    terminal: PositiveSeconds = 86400
    not_found: PositiveSeconds = 10
    # A batch with waiters is refreshed this often while the budget allows (DESIGN §9)...
    active_min: PositiveSeconds = 1
    # ...and no active interval stretches past this when the budget is short.
    active_max: PositiveSeconds = 60

    @model_validator(mode="after")
    def _ordered(self) -> TtlSettings:
        if not self.active_min <= self.active <= self.active_max:
            raise _problem("cache.ttl_s", "needs active_min <= active <= active_max")
        return self


class CacheSettings(_Section):
    max_entries: Annotated[int, Field(ge=1)] = 100000
    ttl_s: TtlSettings = TtlSettings()
    stale_if_error_s: Annotated[float, Field(ge=0)] = 600
    # Active TTLs are spread by up to this fraction (0.1: 5 s becomes 4.5 to 5 s)
    # so that entries cached together do not all expire together.
    active_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Prefer: wait=N is capped here (under the 60 s idle timeouts of common proxies).
    max_wait_s: PositiveSeconds = 55
    # Requests held at once; past this, a new one is answered at once.
    max_waiters: Annotated[int, Field(ge=0)] = 10000
    # Requests one caller may hold at once, so that one caller cannot take every slot (DESIGN §7).
    max_waiters_per_caller: Annotated[int, Field(ge=0)] = 1000


class LoggingSettings(_Section):
    level: str = "INFO"
    access_log: bool = True

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level


# The batch API's operations (DESIGN §8), as named in ``callers[].allow``.
Operation = Literal["retrieve", "list", "create", "cancel"]
OPERATIONS: tuple[Operation, ...] = ("retrieve", "list", "create", "cancel")
# What a caller may do unless its ``allow`` says otherwise: what every caller could do before §8.
DEFAULT_ALLOW: frozenset[Operation] = frozenset({"retrieve", "list"})
# ``all``: every batch of the organisation; ``own``: only those the caller created through the gateway.
Scope = Literal["all", "own"]


def weak_key_problem(hexdigest: str, demo: bool = False) -> str | None:
    """Why a caller key with this sha256 (hex) must not be accepted, or None if it may."""
    if hexdigest in _WEAK_DIGESTS:
        return f"is a well-known weak key; {NEW_KEY_HINT}"
    if hexdigest in _DEMO_DIGESTS and not demo:
        return f"is a demo key (published with the gateway), accepted only with --demo; {NEW_KEY_HINT}"
    return None


def _in_demo(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(DEMO_CONTEXT))


def _usable_key(key: str, info: ValidationInfo) -> None:
    if len(key) < MIN_CALLER_KEY_LENGTH:
        raise ValueError(f"must be at least {MIN_CALLER_KEY_LENGTH} characters (is its environment variable set?)")
    problem = weak_key_problem(hashlib.sha256(key.encode()).hexdigest(), _in_demo(info))
    if problem:
        raise ValueError(problem)


class CallerSettings(_Section):
    name: str
    key: SecretStr | None = None
    key_sha256: str | None = None
    # A file holding the key in clear (a mounted secret), re-read on every reload like upstream.token_file.
    key_file: Annotated[TokenFile, PlainValidator(_read_token_file)] | None = None
    rate_limit: RateLimit | None = None
    allow: frozenset[Operation] = DEFAULT_ALLOW
    batches: Scope = "all"

    @field_validator("allow", mode="before")
    @classmethod
    def _list_of_operations(cls, value: Any) -> Any:
        # A YAML list, not a string (which pydantic would read letter by letter) or a mapping.
        if not isinstance(value, list | tuple | set | frozenset):
            raise ValueError(f"must be a list of operations: {', '.join(OPERATIONS)}")
        return value

    @field_validator("name")
    @classmethod
    def _header_safe_name(cls, value: str) -> str:
        if not _CALLER_NAME.match(value):
            raise ValueError("must be 1 to 64 letters, digits, '.', '_' or '-' (it is sent as a header)")
        return value

    @field_validator("key")
    @classmethod
    def _strong_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:
            _usable_key(value.get_secret_value(), info)
        return value

    @field_validator("key_file")
    @classmethod
    def _strong_key_file(cls, value: TokenFile | None, info: ValidationInfo) -> TokenFile | None:
        if value is not None:
            _usable_key(value.token.get_secret_value(), info)
        return value

    @field_validator("key_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            value = value.lower()
            if not _SHA256_HEX.match(value):
                raise ValueError("must be 64 hex digits (sha256 of the key)")
            problem = weak_key_problem(value, _in_demo(info))
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _exactly_one_key(self) -> CallerSettings:
        given = [self.key, self.key_sha256, self.key_file]
        if sum(source is not None for source in given) > 1:
            raise ValueError("set only one of key, key_sha256 and key_file")
        if all(source is None for source in given):
            raise ValueError("key (or key_sha256, or key_file) is required")
        return self

    @property
    def key_value(self) -> str | None:
        """The caller's key in clear, if the config has it (``key`` or ``key_file``)."""
        if self.key_file is not None:
            return self.key_file.token.get_secret_value()
        return None if self.key is None else self.key.get_secret_value()

    @property
    def key_digest(self) -> bytes:
        """The sha256 of the caller's key: the only form the gateway compares."""
        clear = self.key_value
        if clear is not None:
            return hashlib.sha256(clear.encode()).digest()
        assert self.key_sha256 is not None  # guaranteed by _exactly_one_key
        return bytes.fromhex(self.key_sha256)


class StoreSettings(_Section):
    """Where ownership and idempotency records live (DESIGN §8): a SQLite file."""

    path: Annotated[str, Field(min_length=1)] = "./cohere-gateway.db"


REDIS_SCHEMES = ("redis", "rediss", "unix")


class RedisSettings(_Section):
    """The Redis that replicas and workers share (DESIGN §10); no ``url``: everything stays in-process."""

    url: SecretStr | None = None  # may carry a password: held as a secret, redacted in logs
    key_prefix: str = "cohere-gateway:"
    # Every Redis call is bounded by this, with no retries of its own: a dead Redis costs one timeout.
    timeout_s: PositiveSeconds = 0.25
    # While Redis is lost, it is probed this often; calls meanwhile do not touch it.
    probe_interval_s: PositiveSeconds = 1.0

    @field_validator("url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # ``${REDIS_URL:-}`` interpolates to "" when unset: no Redis, not a bad URL.
        if (
            isinstance(value, str | SecretStr)
            and not str(value.get_secret_value() if isinstance(value, SecretStr) else value).strip()
        ):
            return None
        return value

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parsed = urlsplit(value.get_secret_value())
            if parsed.scheme not in REDIS_SCHEMES or not (parsed.hostname or parsed.path):
                raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @property
    def url_value(self) -> str | None:
        return None if self.url is None else self.url.get_secret_value()

    @property
    def passwords(self) -> list[str]:
        """Every form of the password in the URL (as written, decoded, or ``?password=``), for redaction."""
        if self.url is None:
            return []
        parts = urlsplit(self.url.get_secret_value())
        found = [parts.password or "", *parse_qs(parts.query).get("password", [])]
        return sorted({form for raw in found if raw for form in (raw, unquote(raw))})


class BatchesSettings(_Section):
    # How long an Idempotency-Key's outcome is kept and replayed.
    idempotency_ttl_s: PositiveSeconds = 86400


class GatewayConfig(_Section):
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings
    cache: CacheSettings = CacheSettings()
    logging: LoggingSettings = LoggingSettings()
    store: StoreSettings = StoreSettings()
    batches: BatchesSettings = BatchesSettings()
    redis: RedisSettings = RedisSettings()
    callers: Annotated[list[CallerSettings], Field(min_length=1)]

    @model_validator(mode="after")
    def _workers_share_through_redis(self) -> GatewayConfig:
        if self.server.workers > 1 and self.redis.url is None:
            # Workers without Redis would each spend the whole budget and keep their own records.
            raise _problem(
                "server.workers", f"{self.server.workers} workers need redis.url (DESIGN §10); set it or use 1"
            )
        return self

    @property
    def secrets(self) -> list[str]:
        """Every secret this config knows in clear, for log redaction."""
        found = [self.upstream.token_value]
        found += [key for c in self.callers if (key := c.key_value) is not None]
        found += self.redis.passwords
        return found


def interpolate(value: Any, env: Mapping[str, str], path: str = "") -> tuple[Any, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a YAML tree."""
    problems: list[str] = []
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path or 'config'}: environment variable {name} is not set")
            return ""

        return _ENV_REFERENCE.sub(substitute, value), problems
    if isinstance(value, dict):
        result: dict[Any, Any] = {}
        for key, item in value.items():
            result[key], found = interpolate(item, env, f"{path}.{key}" if path else str(key))
            problems += found
        return result, problems
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            interpolated, found = interpolate(item, env, f"{path}.{index}")
            items.append(interpolated)
            problems += found
        return items, problems
    return value, problems


def duplicate_callers(callers: Any) -> list[str]:
    """Callers sharing a name or a key, checked on the raw list.

    This runs beside model validation rather than inside it, so that a
    duplicate is reported even when another caller has a problem of its own.
    """
    if not isinstance(callers, list):
        return []
    problems: list[str] = []
    names: dict[str, int] = {}
    digests: dict[str, int] = {}
    for index, caller in enumerate(callers):
        if not isinstance(caller, dict):
            continue
        name, key, digest = caller.get("name"), caller.get("key"), caller.get("key_sha256")
        if isinstance(name, str):
            if name in names:
                problems.append(f"callers.{index}.name: duplicate of callers.{names[name]}.name")
            names.setdefault(name, index)
        field, hexdigest = (
            ("key", hashlib.sha256(key.encode()).hexdigest())
            if isinstance(key, str) and key
            else ("key_sha256", digest.lower() if isinstance(digest, str) else None)
        )
        if hexdigest:
            if hexdigest in digests:
                problems.append(f"callers.{index}.{field}: same key as callers.{digests[hexdigest]}")
            digests.setdefault(hexdigest, index)
    return problems


def _shared_key_files(callers: list[CallerSettings]) -> list[str]:
    """Callers whose ``key_file`` holds another caller's key (``duplicate_callers`` sees only the file's path)."""
    problems: list[str] = []
    first: dict[bytes, int] = {}
    for index, caller in enumerate(callers):
        earlier = first.setdefault(caller.key_digest, index)
        if earlier != index and (caller.key_file is not None or callers[earlier].key_file is not None):
            field = "key_file" if caller.key_file is not None else "key" if caller.key is not None else "key_sha256"
            problems.append(f"callers.{index}.{field}: same key as callers.{earlier}")
    return problems


def _format(error: Any) -> str:
    if error["type"] == "config_problem":
        return str(error["msg"])
    path = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"{path}: {unknown_key(tuple(error['loc']))}"
    message = str(error["msg"]).removeprefix("Value error, ")
    # Never echo the offending input: it may be a secret.
    return f"{path}: {message}"


def unknown_key(loc: tuple[str | int, ...]) -> str:
    """The problem text for an unknown key at ``loc``, suggesting the nearest valid key there."""
    *parents, name = loc
    section: type[BaseModel] | None = GatewayConfig
    for part in parents:
        if section is None:
            break
        if isinstance(part, str):
            field = section.model_fields.get(part)
            section = None if field is None else _section_of(field.annotation)
        # An int is a list index: the element's model is already the section.
    choices = list(section.model_fields) if section is not None else []
    close = difflib.get_close_matches(str(name), choices, n=1)
    if not close:
        return "unknown key"
    return f"unknown key (did you mean {'.'.join(str(part) for part in (*parents, close[0]))}?)"


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The config model inside an annotation (``X``, ``X | None``, ``list[X]``, ``Annotated[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list, Annotated):
        for inner in get_args(annotation):
            found = _section_of(inner)
            if found is not None:
                return found
    return None


def validate(raw: Any, env: Mapping[str, str], *, demo: bool = False) -> GatewayConfig:
    """Turn a parsed YAML document into a config, or raise ConfigError with every problem.

    ``demo``: the config ``--demo`` builds, whose callers hold the demo keys.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["config: the file must be a YAML mapping of sections"])
    data, unset = interpolate(raw, env)
    problems = duplicate_callers(data.get("callers"))
    try:
        config = GatewayConfig.model_validate(data, context={DEMO_CONTEXT: demo})
    except ValidationError as exc:
        problems += [_format(error) for error in exc.errors()]
    else:
        problems += _shared_key_files(config.callers)
        if not unset and not problems:
            return config
    # An unset variable leaves its key empty, which then fails its own check
    # too; the operator needs only the first reason for each key.
    unset_paths = {_path_of(problem) for problem in unset}
    raise ConfigError(unset + [p for p in problems if _path_of(p) not in unset_paths])


def _path_of(problem: str) -> str:
    return problem.partition(": ")[0]


def read_yaml(path: Path) -> Any:
    """Parse the config file, turning I/O and syntax errors into ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"config: cannot read {path}: {getattr(exc, 'strerror', None) or exc}"]) from None
    try:
        # libyaml's loader when PyYAML was built with it (its wheels are): five times
        # faster than the pure-Python one, which took 4 s for 10,000 callers.
        return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"config: {path} is not valid YAML{where}"]) from None


def load_config(
    path: Path, env: Mapping[str, str] | None = None, overrides: dict[str, Any] | None = None, *, demo: bool = False
) -> GatewayConfig:
    """Read, interpolate and validate ``path``; ``overrides`` replace whole sections' keys."""
    raw = read_yaml(path) if path.exists() or overrides is None else {}
    if overrides and isinstance(raw, dict):
        raw = deep_merge(raw, overrides)
    return validate(raw, os.environ if env is None else env, demo=demo)


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, mapping by mapping."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
