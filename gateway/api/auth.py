"""Caller keys to ``Caller``: who is asking, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gateway import errors
from gateway.config import DEFAULT_ALLOW, CallerSettings, Operation, RateLimit, Scope

# Compared against when no configured digest matched, so that a miss costs one compare too.
_NO_DIGEST = bytes(32)
# Authorization values of known callers whose digest is kept; past that many, all are forgotten at once.
_KEEP_DIGESTS = 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated internal service, as configured: who it is and what it may do (docs/design.md §8)."""

    name: str
    rate_limit: RateLimit | None
    allow: frozenset[Operation] = DEFAULT_ALLOW
    batches: Scope = "all"


class CallerDirectory:
    """The configured callers, looked up by the sha256 of the presented key.

    Only digests are held, in a dict. The lookup's timing can tell only
    facts about sha256 outputs (which digests are configured), and a
    digest tells nothing that helps guess a key: finding a key for a given
    digest is a preimage attack. The one ``hmac.compare_digest`` after the
    lookup keeps the final check constant-time all the same. One dict lookup
    costs the same for 2 callers or 10,000 (comparing against every digest
    in turn cost a third of the hit rate at 2,000).

    The digest of an ``Authorization`` value that named a known caller is
    kept (a bounded number of them), so a caller's next request skips the
    parsing and the hashing; the kept digest is looked up and compared
    as a fresh one is. Values that named no caller are never kept.
    """

    def __init__(self, callers: list[CallerSettings]) -> None:
        self._by_digest = {
            c.key_digest: (c.key_digest, Caller(c.name, c.rate_limit, frozenset(c.allow), c.batches)) for c in callers
        }
        self._recent: dict[str, bytes] = {}

    def authenticate(self, authorization: list[str]) -> Caller:
        """Resolve the request's ``Authorization`` header values to a caller."""
        if len(authorization) != 1:
            raise errors.Unauthorized(
                "Missing caller key. Send 'Authorization: Bearer <your caller key>'."
                if not authorization
                else "Send exactly one Authorization header."
            )
        value = authorization[0]
        digest = self._recent.get(value)
        kept = digest is not None
        if digest is None:
            digest = _digest_of(value)
        known, found = self._by_digest.get(digest, (_NO_DIGEST, None))
        if not hmac.compare_digest(known, digest) or found is None:
            raise errors.Unauthorized("Unknown caller key.")
        if not kept:
            if len(self._recent) >= _KEEP_DIGESTS:
                self._recent.clear()
            self._recent[value] = digest
        return found


def _digest_of(authorization: str) -> bytes:
    """The sha256 of the caller key in an ``Authorization`` value."""
    # HTTP trims only SP and HTAB around a value (RFC 9110 5.5): any other
    # space-like character (NBSP, U+2028, VT) is part of what was sent.
    scheme, _, key = authorization.strip(" \t").partition(" ")
    key = key.strip(" \t")
    if scheme.lower() != "bearer" or not key:
        raise errors.Unauthorized("The Authorization header must be 'Bearer <your caller key>'.")
    # Header bytes that are not UTF-8 arrive as surrogates; hash them as sent.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
