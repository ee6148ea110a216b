"""``POST /v2/batches``: create a batch, at most once per ``Idempotency-Key`` (docs/design.md §8).

A create is never retried once a byte of it may have reached the upstream.
On success the new id is recorded as the caller's before the answer
leaves, and the answer becomes the id's cache entry. With an
``Idempotency-Key``, the store says whether this key is new, replays a
finished answer, or is still in use; only definite outcomes are recorded.
When an earlier try ended without an answer (a timeout, a connection lost
after sending), the batch may exist: a retry first looks for it in the
upstream's list, and replays it if exactly one batch can be it (no other
caller's), rather than create a second one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.api import inputs
from gateway.api.admission import Admitted, admit, receive_body, upstream_request
from gateway.api.answers import json_answer
from gateway.api.dataset_scope import check_input_dataset, record_outputs
from gateway.api.keys import REQUEST_ID, TRACE
from gateway.ops.logs import log_event
from gateway.records.base import Claimed, InUse, Replay, Reused, body_fingerprint
from gateway.upstream import cohere
from gateway.upstream.answers import JsonAnswer, UpstreamReply, accept_json_object
from gateway.upstream.client import BATCHES_PATH
from gateway.upstream.cohere import BATCH_ID, lifetime_of_status, parse_timestamp

log = logging.getLogger("gateway")

REPLAYED = {"Idempotent-Replayed": "true"}
# The idempotency metric's label for each answer of the store.
CLAIM_OUTCOMES = {Claimed: "new", Replay: "replayed", InUse: "in_use", Reused: "reused"}
# Upstream answers to a create that are definite: the same request would get them again.
DEFINITE_ERRORS = frozenset({400, 404, 422})
# Looking for a batch an ambiguous try may have made: pages of this size, at most this many.
SEARCH_PAGE_SIZE = 100
SEARCH_MAX_PAGES = 5
# The upstream's clock and ours may disagree: a batch created this long before the first try still counts.
CLOCK_SKEW_S = 120.0


async def create_batch(request: web.Request) -> web.Response:
    admitted = await admit(request, "create")
    key = inputs.idempotency_key(request.headers.getall("Idempotency-Key", []))
    admitted, body = await receive_body(request, admitted, "create")
    document = inputs.create_document(request.content_type, body)
    # An own caller may not name another caller's dataset (docs/design.md §11); checked before any key is claimed.
    await check_input_dataset(admitted.state, admitted.caller, document["input_dataset_id"])
    if key is None:
        reply = await _create(request, admitted, body)
        return json_answer(reply.status, reply.body)
    records, caller = admitted.state.records, admitted.caller.name
    claim = await records.claim_key(caller, key, body_fingerprint(document))
    admitted.state.metrics.idempotency.labels(CLAIM_OUTCOMES[type(claim)]).inc()
    if isinstance(claim, Replay):
        return json_answer(claim.status, _for_this_request(claim, request[REQUEST_ID]), REPLAYED)
    if isinstance(claim, InUse):
        raise errors.IdempotencyKeyInUse(retry_after_s=claim.retry_after_s)
    if isinstance(claim, Reused):
        raise errors.IdempotencyKeyReused()
    return await _create_claimed(request, admitted, key, body, document, claim)


async def _create_claimed(
    request: web.Request, admitted: Admitted, key: str, body: bytes, document: dict[str, Any], claim: Claimed
) -> web.Response:
    """Create under a claimed key, and record the outcome as definite, ambiguous or free."""
    state, caller = admitted.state, admitted.caller.name
    replayed = False
    try:
        found = None
        if claim.ambiguous_since is not None:
            found = await _find_created(request, admitted, document, claim.ambiguous_since)
        if found is not None:
            reply, replayed = found, True
            await _keep(admitted, reply)
        else:
            reply = await _create(request, admitted, body)
    except errors.GatewayError as error:
        if error.upstream_status in DEFINITE_ERRORS:
            rendered = error.body(request[REQUEST_ID], state.redact.known)
            await _settle(admitted, key, error.status, rendered)
        elif _may_have_created(request, error):
            await _unless_store_fails(state.records.mark_ambiguous(caller, key))
        else:
            await _unless_store_fails(state.records.release_key(caller, key))
        raise
    except BaseException:
        # Cancelled (the gateway is stopping), or a bug: the upstream may have the batch.
        await _unless_store_fails(state.records.mark_ambiguous(caller, key))
        raise
    await _settle(admitted, key, reply.status, reply.body)
    return json_answer(reply.status, reply.body, REPLAYED if replayed else None)


def _for_this_request(replay: Replay, request_id: str) -> bytes:
    """A replayed error names this request's id, as its ``X-Request-ID`` does; a batch is replayed as it was."""
    if replay.status < 400:
        return replay.body
    document = json.loads(replay.body)
    return json.dumps({**document, "request_id": request_id}).encode()


async def _unless_store_fails(update: Awaitable[None]) -> None:
    """A key's state change that may fail: the key then stays claimed until its lease ends,
    after which a retry treats it as ambiguous and looks before it creates."""
    try:
        await update
    except errors.StoreUnavailable:
        log_event(log, logging.ERROR, "could not update an idempotency key's state")


def _may_have_created(request: web.Request, error: errors.GatewayError) -> bool:
    """Whether the create may have made a batch whose answer we never read."""
    answered_2xx = error.upstream_status is not None and 200 <= error.upstream_status < 300
    return request[TRACE].outcome_unknown or answered_2xx


async def _create(request: web.Request, admitted: Admitted, body: bytes) -> JsonAnswer:
    """One create upstream; the new id is recorded as the caller's and cached before this returns."""
    call = upstream_request(
        request, admitted.caller, BATCHES_PATH, method="POST", body=body, retry_after_sending=False, write=True
    )
    reply = await admitted.state.upstream.fetch(call, True, accept_json_object)
    await _keep(admitted, reply)
    return reply


async def _keep(admitted: Admitted, reply: JsonAnswer) -> None:
    """Record a created batch as the caller's (durably, before its answer leaves) and cache it."""
    batch = reply.document.get("batch")
    batch_id = batch.get("id") if isinstance(batch, dict) else None
    if not isinstance(batch, dict) or not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
        raise errors.UpstreamInvalidResponse(
            "The upstream's answer to a create held no batch id.", upstream_status=reply.status
        )
    state, caller = admitted.state, admitted.caller.name
    try:
        await state.records.record_owner(batch_id, caller)
    except errors.StoreUnavailable:
        # The batch exists: the caller still gets it, and ops learn whose it is from the log.
        state.metrics.store_write_failures.inc()
        log_event(log, logging.ERROR, "could not record a new batch's owner", batch_id=batch_id, caller=caller)
    await record_outputs(state, [batch], caller)
    cached = json.dumps({"batch": batch}).encode() if set(reply.document) != {"batch"} else reply.body
    reply_facts = UpstreamReply(
        200, cached, lifetime_of_status(batch.get("status")), parse_timestamp(batch.get("updated_at"))
    )
    await state.cache.put(batch_id, reply_facts)


async def _settle(admitted: Admitted, key: str, status: int, body: bytes) -> None:
    """Record a definite outcome for ``key``; if that fails, the key's lease runs out and a retry looks first."""
    try:
        await admitted.state.records.settle_key(admitted.caller.name, key, status, body)
    except errors.StoreUnavailable:
        admitted.state.metrics.store_write_failures.inc()
        log_event(log, logging.ERROR, "could not record an idempotent create's outcome", caller=admitted.caller.name)


async def _find_created(
    request: web.Request, admitted: Admitted, document: dict[str, Any], since: float
) -> JsonAnswer | None:
    """The batch an earlier, ambiguous try made, if exactly one batch can be it (docs/design.md §8).

    A candidate matches every field the create sent (``inputs.matches_create``),
    was created within ``_creation_window`` of the first try, and is owned by
    no other caller. One is replayed; none, or more than one (which of them
    is this caller's cannot be told), is no batch: the create is made anew.
    """
    earliest, latest = _creation_window(since, admitted.snapshot.config.upstream.timeout_s)
    found: list[dict[str, Any]] = []
    for batch in await _listed_since(request, admitted, earliest):
        when = parse_timestamp(batch.get("created_at"))
        if when is None or not earliest <= when <= latest or not inputs.matches_create(batch, document):
            continue
        owner = await admitted.state.records.owner_of(batch["id"])
        if owner in (None, admitted.caller.name):
            found.append(batch)
    if len(found) != 1:
        if found:
            log_event(log, logging.INFO, "an ambiguous create matched several batches; none adopted", count=len(found))
        return None
    return JsonAnswer(200, json.dumps({"batch": found[0]}).encode(), {"batch": found[0]})


def _creation_window(since: float, timeout_s: float) -> tuple[float, float]:
    """When (on our clock) the upstream can have created the batch of a first try made at ``since``.

    The first try's whole create, budget wait included, ran within
    ``upstream.timeout_s`` of ``since``, so the upstream received it by then;
    ``CLOCK_SKEW_S`` either side allows for the upstream's clock (and its
    ``created_at`` being set a moment after our deadline cut the call).
    """
    return since - CLOCK_SKEW_S, since + timeout_s + CLOCK_SKEW_S


async def _listed_since(request: web.Request, admitted: Admitted, earliest: float) -> list[dict[str, Any]]:
    """Listed batches, ordered by ``created_at``, up to the first page past ``earliest``.

    The upstream does not document the sort direction, so pages are read
    until one holds nothing created since ``earliest`` and runs newest
    first, or until ``SEARCH_MAX_PAGES``.
    """
    listed: list[dict[str, Any]] = []
    page_token: str | None = None
    for _ in range(SEARCH_MAX_PAGES):
        query = [("order_by", "created_at"), ("page_size", str(SEARCH_PAGE_SIZE))]
        if page_token:
            query.append(("page_token", page_token))
        call = upstream_request(request, admitted.caller, BATCHES_PATH, query=tuple(query))
        page = await admitted.state.upstream.fetch(call, True, accept_json_object)
        batches = [b for b in cohere.batches_of(page.document) if isinstance(b, dict) and isinstance(b.get("id"), str)]
        listed += batches
        created = [parse_timestamp(b.get("created_at")) for b in batches]
        token = page.document.get("next_page_token")
        newest_first = len(created) > 1 and None not in created and created[0] >= created[-1]  # type: ignore[operator]
        all_older = bool(created) and all(w is not None and w < earliest for w in created)
        if not isinstance(token, str) or not token or (newest_first and all_older):
            break
        page_token = token
    return listed
