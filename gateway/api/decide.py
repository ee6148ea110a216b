"""One decision for ``GET``/``HEAD /v2/batches/{id}``, for both ways a request is answered.

A request for a batch is answered inline, as soon as its head is parsed
(``gateway.edge.inline``), or by the Application (``gateway.api.retrieve``).
Both call ``decide`` with the routed head; it runs the steps in the one
order the contract gives (docs/design.md §7, §8, §9):

1. authenticate the caller key (401);
2. the caller's own rate limit (429);
3. the ``retrieve`` permission (403);
4. the batch id, as routed (decoded) (400);
5. the caller's scope, from what is known in memory (404 for another's batch);
6. a fresh 200 in the cache;
7. ``Prefer: wait``: a wait that must be held is the app's;
8. ``If-None-Match``: 304 when it names the ETag.

and returns what to do: ``Answer`` (the whole answer, from memory),
``Refuse`` (a contract error) or ``HandOn`` (the step that needs I/O: the
app carries on from there, awaiting Redis, the record store, the upstream
or a change). It does no I/O and spends nothing: the caller's token is
taken by whoever carries out the decision (``Limit``), so a request handed
on from the inline path is not charged twice.

``Prefer: wait=0`` (RFC 7240: answer within 0 seconds) is no wait: the
request is answered at once, like one without ``Prefer``, and carries no
``Preference-Applied`` (nothing was held). Both paths answer it the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from multidict import CIMultiDictProxy

from gateway import errors
from gateway.api import rules
from gateway.api.answers import cache_headers
from gateway.api.auth import Caller
from gateway.api.state import GatewayState, Snapshot
from gateway.cache.entry import CacheEntry, CacheState
from gateway.upstream.cohere import parse_batch_id

JSON = "application/json"


class Head(NamedTuple):
    """A routed request for one batch: what the decision reads.

    Head and Answer are made on every hit: a NamedTuple is as immutable as a
    frozen dataclass, and made in a third of its time.
    """

    method: str  # GET or HEAD
    batch_id: str  # the route's {id}, decoded, not yet validated
    headers: CIMultiDictProxy[str]


class Stage(Enum):
    """The step a decision handed on at: where the app carries on."""

    LIMIT = "limit"  # the caller's bucket is in Redis: awaited, then decided again
    SCOPE = "scope"  # the batch's owner is not known in memory: the record store answers
    CACHE = "cache"  # no fresh 200 in the cache: the upstream, single-flighted
    WAIT = "wait"  # Prefer: wait on a batch that may change: held for a change


@dataclass(frozen=True, slots=True)
class Rendered:
    """A batch answer from a cache entry: one rendering for both paths."""

    status: int
    headers: dict[str, str]
    body: bytes  # empty for a 304; a HEAD's writer leaves it out


class Answer(NamedTuple):
    """A fresh 200 from memory: 304 when ``If-None-Match`` named its ETag; rendered as ``rendered`` says."""

    caller: Caller
    batch_id: str
    entry: CacheEntry
    now: float  # the clock when decided: Age and max-age are counted from it
    not_modified: bool

    @property
    def status(self) -> int:
        return 304 if self.not_modified else 200

    @property
    def rendered(self) -> Rendered:
        return rendered_hit(self.entry, self.now, self.not_modified)


@dataclass(frozen=True, slots=True)
class Refuse:
    error: errors.GatewayError
    caller: Caller | None  # None when the key itself was refused


@dataclass(frozen=True, slots=True)
class HandOn:
    stage: Stage
    caller: Caller
    batch_id: str | None  # None until step 4 has passed


Decision = Answer | Refuse | HandOn
# The caller's limit step: 0 if a token is (or would be) taken, the seconds until one is due if not,
# or None if it cannot be told without I/O (the bucket is in Redis).
Limit = Callable[[GatewayState, Caller], float | None]


def take_token(state: GatewayState, caller: Caller) -> float | None:
    """The app's limit step: take the caller's token from this process's bucket (None with redis.url)."""
    if state.shared_caller_limits is not None:
        return None
    assert caller.rate_limit is not None
    return state.caller_bucket(caller.name, caller.rate_limit).try_take()


def token_taken(_state: GatewayState, _caller: Caller) -> float | None:
    """The limit step once the app has taken the token itself (awaited from Redis)."""
    return 0.0


def token_available(state: GatewayState, caller: Caller) -> float | None:
    """The inline limit step: is a token there? It is taken only once the answer is sure (``take_token``).

    Nothing runs between this and that take (the inline path is synchronous),
    so the outcome is the one of taking it here.
    """
    if state.shared_caller_limits is not None:
        return None
    assert caller.rate_limit is not None
    return state.caller_bucket(caller.name, caller.rate_limit).wait_s()


def decide(state: GatewayState, snapshot: Snapshot, head: Head, limit: Limit) -> Decision:
    """The steps above, in their order, for ``head`` under ``snapshot``."""
    try:
        caller = snapshot.callers.authenticate(head.headers.getall("Authorization", []))
    except errors.GatewayError as error:
        return Refuse(error, None)
    if caller.rate_limit is not None:
        wait = limit(state, caller)
        if wait is None:
            return HandOn(Stage.LIMIT, caller, None)
        if wait:
            return Refuse(errors.CallerRateLimited(retry_after_s=wait), caller)
    try:
        rules.authorize(caller, "retrieve")
        batch_id = parse_batch_id(head.batch_id)
    except errors.GatewayError as error:
        return Refuse(error, caller)
    if not rules.sees_every_batch(caller) and not rules.may_see(caller, state.records.known_owner(batch_id)):
        return HandOn(Stage.SCOPE, caller, batch_id)  # the store has the last word, 404 included
    entry = state.cache.fresh(batch_id)
    if entry is None or entry.status != 200:
        return HandOn(Stage.CACHE, caller, batch_id)
    if_none_match = head.headers.getall("If-None-Match", [])
    wait_s = rules.requested_wait(head.headers.getall("Prefer", [])) if "Prefer" in head.headers else None
    # A fresh entry is also what the cache held on arrival: the caller holds it unless it names another.
    if wait_s and rules.must_wait(entry, if_none_match, entry):
        return HandOn(Stage.WAIT, caller, batch_id)
    not_modified = bool(if_none_match) and rules.not_modified(if_none_match, entry.etag)
    return Answer(caller, batch_id, entry, state.clock(), not_modified)


def render(entry: CacheEntry, cache_state: CacheState, now: float, if_none_match: list[str]) -> Rendered:
    """A cached 200 as its answer: 304 with no body when ``If-None-Match`` names its ETag (docs/design.md §9)."""
    return _rendered(entry, cache_state, now, rules.not_modified(if_none_match, entry.etag))


def rendered_hit(entry: CacheEntry, now: float, not_modified: bool) -> Rendered:
    """A fresh hit's answer (``Answer.rendered``): the rendering ``render`` gives."""
    return _rendered(entry, CacheState.HIT, now, not_modified)


def _rendered(entry: CacheEntry, cache_state: CacheState, now: float, not_modified: bool) -> Rendered:
    headers = cache_headers(entry, cache_state, now)
    if not_modified:
        return Rendered(304, headers, b"")
    headers["Content-Type"] = JSON
    return Rendered(200, headers, entry.body)
