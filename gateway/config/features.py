"""The sections of docs/design.md §11 and §12: datasets, the event feed and webhooks."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator
from yarl import URL

from gateway.config.section import PositiveSeconds, Section

_ORIGIN = re.compile(r"^https?://[^/?#\s@]+$")
_WEBHOOK_URL = re.compile(r"^https?://[^/?#\s@]+(/[^#\s]*)?$")
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
# The Standard Webhooks specification: a secret is 24 to 64 random bytes, base64, after "whsec_".
WEBHOOK_SECRET_BYTES = (24, 64)
# One label of a host name: letters, digits, inner hyphens (RFC 1123), and underscores (container names have them).
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def _has_a_host(url: str) -> bool:
    """Whether ``url`` names a host (a DNS name or an IP address) and, if any, a port that exists."""
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 (raises on a port out of range)
    except ValueError:
        return False
    host = parsed.raw_host or ""  # IDNA-encoded, an IPv6 address without its brackets
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return len(host) <= 253 and all(_LABEL.match(label) for label in labels)


class DatasetsSettings(Section):
    """Uploads and downloads through the gateway (docs/design.md §11)."""

    # Cohere's own limit; a larger Content-Length is 413 before any upstream call.
    max_upload_bytes: Annotated[int, Field(ge=1)] = 1610612736
    # An upload that sends no byte for this long is 408 request_timeout and aborted upstream.
    upload_idle_timeout_s: PositiveSeconds = 60
    # gateway: part URLs in answers become signed gateway URLs; direct: passed through.
    downloads: Literal["gateway", "direct"] = "gateway"
    url_ttl_s: PositiveSeconds = 3600
    # The HMAC key of download URLs; empty: random at start (shared through Redis with redis.url).
    url_signing_key: SecretStr | None = None
    # The only origins (scheme://host[:port]) a part is ever fetched from.
    part_origins: tuple[str, ...] = ("https://storage.googleapis.com",)
    # An upstream part URL older than this is fetched afresh before use.
    upstream_url_ttl_s: PositiveSeconds = 600

    @field_validator("url_signing_key", mode="before")
    @classmethod
    def _empty_is_random(cls, value: object) -> object:
        # ``${DOWNLOAD_SIGNING_KEY:-}`` interpolates to "": a random key, not an empty one.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("url_signing_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (it signs every download URL)")
        return value

    @field_validator("part_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if not _ORIGIN.match(origin) or not _has_a_host(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return tuple(origin.lower() for origin in value)

    @property
    def signing_key(self) -> str | None:
        return None if self.url_signing_key is None else self.url_signing_key.get_secret_value()


class EventsSettings(Section):
    """Following batches, the event feed and webhook deliveries (docs/design.md §12)."""

    enabled: bool = True
    # How often followed batches are checked (one list call covers up to 1000).
    interval_s: PositiveSeconds = 5
    retention_s: PositiveSeconds = 604800
    max_events: Annotated[int, Field(ge=1)] = 1000000
    # An event stream is closed after this; the client resumes with Last-Event-ID.
    max_stream_s: PositiveSeconds = 3600
    # A comment line this often keeps idle proxies from closing a stream.
    keepalive_s: PositiveSeconds = 15
    webhook_timeout_s: PositiveSeconds = 10
    # An event is retried until it is this old, then dropped (the feed still has it).
    webhook_max_age_s: PositiveSeconds = 259200
    # The waits between tries of one delivery (jittered); the last one repeats.
    webhook_retry_s: Annotated[tuple[PositiveSeconds, ...], Field(min_length=1)] = (5, 30, 120, 600, 1800, 3600, 7200)
    # Deliveries in flight at once, over every caller.
    webhook_max_in_flight: Annotated[int, Field(ge=1)] = 16


def _webhook_secret(secret: SecretStr) -> SecretStr:
    value = secret.get_secret_value()
    if not value.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {WEBHOOK_SECRET_PREFIX} (cohere-gateway new-caller makes one)")
    try:
        raw = base64.b64decode(value[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ and base64") from None
    low, high = WEBHOOK_SECRET_BYTES
    if not low <= len(raw) <= high:
        raise ValueError(f"a webhook secret holds {low} to {high} bytes (it holds {len(raw)})")
    return secret


# Checked one by one, so that a problem names the secret's place: callers.2.webhook.secrets.1.
WebhookSecret = Annotated[SecretStr, AfterValidator(_webhook_secret)]


class WebhookSettings(Section):
    """Where a caller's events are POSTed, and the secrets that sign them (docs/design.md §12)."""

    url: str
    secrets: tuple[WebhookSecret, ...]

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not _WEBHOOK_URL.match(value):
            raise ValueError("must be an http:// or https:// URL with no credentials or fragment")
        if not _has_a_host(value):
            raise ValueError("must name a host (a DNS name or an IP address) and a valid port, if any")
        return value

    @field_validator("secrets")
    @classmethod
    def _one_to_four(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # Here rather than Field(min_length=...): a bad secret is then reported once, at its own place.
        if not 1 <= len(value) <= 4:
            raise ValueError("must hold one to four secrets (two at once rotate with overlap)")
        return value

    @property
    def secret_values(self) -> list[str]:
        return [secret.get_secret_value() for secret in self.secrets]
