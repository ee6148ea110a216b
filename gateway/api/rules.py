"""The rules of the batch API as pure functions both answer paths call:
permission, visibility, ETag, waiting (docs/design.md §8, §9).
"""

from __future__ import annotations

from gateway import errors
from gateway.api.auth import Caller
from gateway.cache.entry import CacheEntry
from gateway.config import Operation

BATCH_OPERATIONS = frozenset({"retrieve", "list", "create", "cancel"})


def authorize(caller: Caller, operation: Operation) -> None:
    """Raise 403 ``operation_not_allowed`` unless ``callers[].allow`` lists ``operation``."""
    if operation not in caller.allow:
        what = f"{operation} batches" if operation in BATCH_OPERATIONS else f"use '{operation}'"
        raise errors.OperationNotAllowed(
            f"This caller may not {what}. Ops can allow it in the gateway's config (callers[].allow)."
        )


def sees_every_batch(caller: Caller) -> bool:
    """``batches: all``: no ownership check is needed for this caller."""
    return caller.batches == "all"


def may_see(caller: Caller, owner: str | None) -> bool:
    """Whether ``caller`` may see a batch created by ``owner`` (None: not created through the gateway)."""
    return caller.batches == "all" or owner == caller.name


def check_visible(caller: Caller, owner: str | None) -> None:
    """Raise 404 ``not_found`` for a batch this caller may not see: the answer a missing batch gets."""
    if not may_see(caller, owner):
        raise errors.NotVisible()


def not_modified(if_none_match: list[str], etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (or ``*``): the caller already holds this answer.

    If-None-Match compares weakly (RFC 9110 §13.1.2): ``W/"x"`` matches ``"x"``.
    """
    for value in if_none_match:
        for tag in value.split(","):
            tag = tag.strip()
            if tag == "*" or tag.removeprefix("W/") == etag:
                return True
    return False


def must_wait(entry: CacheEntry, if_none_match: list[str], held_on_arrival: CacheEntry | None) -> bool:
    """Whether a ``Prefer: wait`` request is held: the caller already has ``entry``, and it may still change.

    With ``If-None-Match``, the caller holds what it names; without, what
    the cache held when the request arrived. A terminal batch or a 404 will
    not change: it is answered at once.
    """
    if entry.status != 200 or entry.terminal:
        return False
    if if_none_match:
        return not_modified(if_none_match, entry.etag)
    return held_on_arrival is not None and held_on_arrival.etag == entry.etag


def requested_wait(prefer: list[str]) -> int | None:
    """The N of ``Prefer: wait=N`` (RFC 7240), in whole seconds; None if no usable wait was asked for."""
    for value in prefer:
        for preference in value.split(","):
            name, _, rest = preference.partition("=")
            if name.strip().lower() != "wait":
                continue
            seconds = rest.partition(";")[0].strip().strip('"')
            if seconds.isascii() and seconds.isdigit() and len(seconds) <= 9:
                return int(seconds)
    return None
