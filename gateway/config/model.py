"""The configuration's model: frozen pydantic sections, one per block of ``config.yaml``.

Each section forbids unknown keys and checks its own values; a check that
spans keys raises a problem carrying the exact dotted path to name. Secrets
(the upstream token, caller keys) are held as ``SecretStr`` so that a stray
``repr`` or log line never shows them.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    Field,
    PlainValidator,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config.features import DatasetsSettings, EventsSettings, WebhookSettings
from gateway.config.keys import TokenFile, check_usable_key, read_token_file, weak_key_problem
from gateway.config.section import PositiveSeconds, RateLimit, Section, problem

_CALLER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# ValidationInfo.context key: the config is the one --demo builds (its demo callers are allowed).
DEMO_CONTEXT = "demo"


class BreakerSettings(Section):
    """After ``failures`` consecutive upstream failures, fail fast for ``cooldown_s``."""

    failures: Annotated[int, Field(ge=1)] = 5
    cooldown_s: PositiveSeconds = 30


class ServerSettings(Section):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    shutdown_grace_s: PositiveSeconds = 10
    keepalive_timeout_s: PositiveSeconds = 75
    header_timeout_s: PositiveSeconds = 10
    max_line_size: Annotated[int, Field(ge=256)] = 8190
    max_field_size: Annotated[int, Field(ge=256)] = 8190
    max_headers: Annotated[int, Field(ge=8)] = 64
    # A create's JSON body (docs/design.md §8); larger is 413 request_too_large.
    max_body_bytes: Annotated[int, Field(ge=0)] = 65536
    # Connections the kernel queues before the gateway accepts them; past it a
    # burst of connects is dropped and waits for the client's SYN retry (1 s, 3 s...).
    backlog: Annotated[int, Field(ge=1)] = 1024
    # Processes serving one port (SO_REUSEPORT) under one parent; above 1 needs redis.url (docs/design.md §10).
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # A request body that sends no byte for this long is 408 request_timeout (docs/design.md §7).
    body_timeout_s: PositiveSeconds = 30
    # /metrics on a listener of its own (same host), so the API port need not expose
    # every caller's name and traffic; 0: /metrics stays on the API port.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # A file the gateway writes its pid to at start and removes at exit (for kill -HUP); empty: none.
    pid_file: str = ""
    # How callers reach the gateway (for the download URLs of docs/design.md §11), e.g.
    # https://cohere-gateway.internal; empty: http://<the request's Host>.
    public_url: str = ""

    @field_validator("public_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^/?#\s@]+(/[^?#\s]*)?$", value):
            raise ValueError("must be empty or an http:// or https:// URL with no query or fragment")
        return value.rstrip("/")


class UpstreamSettings(Section):
    base_url: str = "https://api.cohere.com"
    token: SecretStr | None = None
    token_file: Annotated[TokenFile, PlainValidator(read_token_file)] | None = None
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
            raise problem("upstream.token", "set token or token_file, not both")
        if self.token is None and self.token_file is None:
            raise problem("upstream.token", "required (or upstream.token_file)")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise problem("upstream.token", "is empty (is its environment variable set?)")
        return self

    @property
    def token_value(self) -> str:
        """The shared upstream token, whichever source it came from."""
        if self.token_file is not None:
            return self.token_file.token.get_secret_value()
        assert self.token is not None  # guaranteed by the validator above
        return self.token.get_secret_value().strip()


class TtlSettings(Section):
    active: PositiveSeconds = 5
    terminal: PositiveSeconds = 86400
    not_found: PositiveSeconds = 10
    # A batch with waiters is refreshed this often while the budget allows (docs/design.md §9)...
    active_min: PositiveSeconds = 1
    # ...and no active interval stretches past this when the budget is short.
    active_max: PositiveSeconds = 60

    @model_validator(mode="after")
    def _ordered(self) -> TtlSettings:
        if not self.active_min <= self.active <= self.active_max:
            raise problem("cache.ttl_s", "needs active_min <= active <= active_max")
        return self


class CacheSettings(Section):
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
    # Requests one caller may hold at once, so that one caller cannot take every slot (docs/design.md §7).
    max_waiters_per_caller: Annotated[int, Field(ge=0)] = 1000


class LoggingSettings(Section):
    level: str = "INFO"
    access_log: bool = True

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level


# The operations (docs/design.md §8, §11), as named in ``callers[].allow``.
Operation = Literal[
    "retrieve", "list", "create", "cancel", "upload_dataset", "read_dataset", "delete_dataset", "dataset_usage"
]
OPERATIONS: tuple[Operation, ...] = (
    "retrieve",
    "list",
    "create",
    "cancel",
    "upload_dataset",
    "read_dataset",
    "delete_dataset",
    "dataset_usage",
)
# What a caller may do unless its ``allow`` says otherwise: what every caller could do before §8.
DEFAULT_ALLOW: frozenset[Operation] = frozenset({"retrieve", "list"})
# ``all``: every batch of the organisation; ``own``: only those the caller created through the gateway.
Scope = Literal["all", "own"]


def _in_demo(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(DEMO_CONTEXT))


class CallerSettings(Section):
    name: str
    key: SecretStr | None = None
    key_sha256: str | None = None
    # A file holding the key in clear (a mounted secret), re-read on every reload like upstream.token_file.
    key_file: Annotated[TokenFile, PlainValidator(read_token_file)] | None = None
    rate_limit: RateLimit | None = None
    allow: frozenset[Operation] = DEFAULT_ALLOW
    batches: Scope = "all"
    webhook: WebhookSettings | None = None

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
            check_usable_key(value.get_secret_value(), _in_demo(info))
        return value

    @field_validator("key_file")
    @classmethod
    def _strong_key_file(cls, value: TokenFile | None, info: ValidationInfo) -> TokenFile | None:
        if value is not None:
            check_usable_key(value.token.get_secret_value(), _in_demo(info))
        return value

    @field_validator("key_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            value = value.lower()
            if not _SHA256_HEX.match(value):
                raise ValueError("must be 64 hex digits (sha256 of the key)")
            weak = weak_key_problem(value, _in_demo(info))
            if weak:
                raise ValueError(weak)
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


class StoreSettings(Section):
    """Where ownership and idempotency records live (docs/design.md §8): a SQLite file."""

    path: Annotated[str, Field(min_length=1)] = "./cohere-gateway.db"


REDIS_SCHEMES = ("redis", "rediss", "unix")


class RedisSettings(Section):
    """The Redis that replicas and workers share (docs/design.md §10); no ``url``: everything stays in-process."""

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


class BatchesSettings(Section):
    # How long an Idempotency-Key's outcome is kept and replayed.
    idempotency_ttl_s: PositiveSeconds = 86400


class GatewayConfig(Section):
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings
    cache: CacheSettings = CacheSettings()
    logging: LoggingSettings = LoggingSettings()
    store: StoreSettings = StoreSettings()
    batches: BatchesSettings = BatchesSettings()
    redis: RedisSettings = RedisSettings()
    datasets: DatasetsSettings = DatasetsSettings()
    events: EventsSettings = EventsSettings()
    callers: Annotated[list[CallerSettings], Field(min_length=1)]

    @model_validator(mode="after")
    def _workers_share_through_redis(self) -> GatewayConfig:
        if self.server.workers > 1 and self.redis.url is None:
            # Workers without Redis would each spend the whole budget and keep their own records.
            raise problem(
                "server.workers", f"{self.server.workers} workers need redis.url (docs/design.md §10); set it or use 1"
            )
        return self

    @property
    def secrets(self) -> list[str]:
        """Every secret this config knows in clear, for log redaction."""
        found = [self.upstream.token_value]
        found += [key for c in self.callers if (key := c.key_value) is not None]
        found += self.redis.passwords
        found += [secret for c in self.callers if c.webhook is not None for secret in c.webhook.secret_values]
        if (signing_key := self.datasets.signing_key) is not None:
            found.append(signing_key)
        return found
