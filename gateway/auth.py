"""Caller keys to ``Caller``: who is asking, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gateway import errors
from gateway.config import CallerSettings, RateLimit


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated internal service, as configured."""

    name: str
    rate_limit: RateLimit | None


class CallerDirectory:
    """The configured callers, looked up by the sha256 of the presented key.

    Only digests are held. Every digest is compared, with
    ``hmac.compare_digest``, whatever matched, so that timing does not tell
    how close a guess came or which caller it hit.
    """

    def __init__(self, callers: list[CallerSettings]) -> None:
        self._entries = [(c.key_digest, Caller(c.name, c.rate_limit)) for c in callers]

    def authenticate(self, authorization: list[str]) -> Caller:
        """Resolve the request's ``Authorization`` header values to a caller."""
        if len(authorization) != 1:
            raise errors.Unauthorized(
                "Missing caller key. Send 'Authorization: Bearer <your caller key>'."
                if not authorization
                else "Send exactly one Authorization header."
            )
        # HTTP trims only SP and HTAB around a value (RFC 9110 5.5): any other
        # space-like character (NBSP, U+2028, VT) is part of what was sent.
        scheme, _, key = authorization[0].strip(" \t").partition(" ")
        key = key.strip(" \t")
        if scheme.lower() != "bearer" or not key:
            raise errors.Unauthorized("The Authorization header must be 'Bearer <your caller key>'.")
        # Header bytes that are not UTF-8 arrive as surrogates; hash them as sent.
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for known, caller in self._entries:
            if hmac.compare_digest(known, digest):
                found = caller
        if found is None:
            raise errors.Unauthorized("Unknown caller key.")
        return found
