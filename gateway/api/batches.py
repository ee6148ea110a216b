"""``GET /v2/batches`` (list, filtered for an ``own`` caller) and ``POST
/v2/batches/{id}:cancel`` (docs/design.md §8).
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway import errors
from gateway.api import inputs, rules
from gateway.api.admission import admit, check_scope, receive_body, upstream_request
from gateway.api.answers import json_answer
from gateway.upstream import cohere
from gateway.upstream.answers import accept_json_object
from gateway.upstream.client import BATCHES_PATH, batch_path
from gateway.upstream.cohere import parse_batch_id


async def list_batches(request: web.Request) -> web.Response:
    """``GET /v2/batches``: the upstream's page; an ``own`` caller sees only its batches in it."""
    admitted = await admit(request, "list")
    state, caller = admitted.state, admitted.caller
    query = inputs.list_query(request.query)
    call = upstream_request(request, caller, BATCHES_PATH, query=query)
    page = await state.upstream.fetch(call, True, accept_json_object)
    if state.sightings is not None:
        state.sightings.page(cohere.batches_of(page.document))  # every batch listed is a sighting (§12)
    if rules.sees_every_batch(caller):
        return json_answer(page.status, page.body)
    batches = cohere.batches_of(page.document)
    owners = {batch_id: await state.records.owner_of(batch_id) for batch_id in cohere.ids_of(batches)}
    # A page may come back shorter or empty; next_page_token is kept, as the upstream allows.
    mine = [b for b in batches if isinstance(b, dict) and rules.may_see(caller, owners.get(b.get("id")))]  # type: ignore[arg-type]
    return json_answer(page.status, json.dumps({**page.document, "batches": mine}).encode())


async def cancel_batch(request: web.Request) -> web.Response:
    """``POST /v2/batches/{id}:cancel``: cancel upstream, then evict the id's cache entry."""
    admitted = await admit(request, "cancel")
    if not request.raw_path.partition("?")[0].endswith(":cancel"):
        # The router matched a decoded path: '/v2/batches/a%3Acancel' names a batch
        # whose id is 'a:cancel' (a percent-encoded ':' is not a delimiter), not a cancel.
        raise errors.InvalidBatchId()
    batch_id = parse_batch_id(request.match_info["id"])
    admitted, body = await receive_body(request, admitted, "cancel")
    inputs.check_cancel_body(body)
    state, caller = admitted.state, admitted.caller
    await check_scope(state, caller, batch_id)
    # Cancelling twice is harmless, so a cancel may be retried like a read.
    call = upstream_request(request, caller, f"{batch_path(batch_id)}:cancel", method="POST", write=True)
    answer = await state.upstream.fetch(call, True, accept_json_object)
    await state.cache.evict(batch_id)
    return json_answer(answer.status, answer.body)
