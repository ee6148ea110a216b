"""What an upstream answer is to the gateway: the reply the cache keeps, and the checks each route makes of a 2xx."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.upstream.cohere import Lifetime

if TYPE_CHECKING:
    pass
import json

# @SPLIT-IMPORTS@
from gateway.upstream.cohere import (
    UNPARSEABLE,
    batch_facts,
)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """What the upstream client hands the cache: only cacheable answers."""

    status: int
    body: bytes
    lifetime: Lifetime
    updated_at: float | None = None


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    """A 2xx upstream answer whose body is a JSON object."""

    status: int
    body: bytes
    document: dict[str, Any]


def accept_json_object(status: int, body: bytes) -> JsonAnswer | None:
    """List and cancel: any 2xx whose body is a JSON object."""
    if not 200 <= status < 300:
        return None
    try:
        document = json.loads(body)
    except UNPARSEABLE:
        document = None
    if not isinstance(document, dict):
        raise errors.UpstreamInvalidResponse("The upstream's answer was not a JSON object.", upstream_status=status)
    return JsonAnswer(status, body, document)


def accept_batch(status: int, body: bytes) -> UpstreamReply | None:
    """Retrieve: a 200 batch, or a 404 (both cached)."""
    if status == 200:
        lifetime, updated_at = batch_facts(body)
        return UpstreamReply(200, body, lifetime, updated_at)
    if status == 404:
        return UpstreamReply(404, body, Lifetime.NOT_FOUND)
    return None
