"""The dataset read routes (docs/design.md §11): get, list, delete and usage.

Each starts with ``admit`` as the batch routes do (key, the caller's own
limit, the operation's permission), then checks its input and the caller's
scope before anything reaches the upstream. ``GET /v1/datasets/{id}`` takes
the cache path of a batch (``gateway.api.retrieve.cached_answer``) under the
key ``dataset_key(id)``: a TTL from ``validation_status``, single-flight,
stale-if-error, answers only forward, ``Prefer: wait``. Every dataset the
caller gets has its part URLs made the caller's own (``state.links``), so a
dataset answer's ETag is weak, derived from the upstream's answer.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.api import inputs, rules
from gateway.api.admission import Admitted, admit, upstream_request
from gateway.api.answers import cache_headers, json_answer
from gateway.api.auth import Caller
from gateway.api.dataset_scope import check_dataset_visible
from gateway.api.keys import CACHE_STATE
from gateway.api.retrieve import Cached, Held, cached_answer
from gateway.api.state import GatewayState
from gateway.cache.entry import CacheState
from gateway.cache.flight import SingleFlight
from gateway.datasets.facts import (
    DATASETS_PATH,
    USAGE_PATH,
    accept_dataset,
    dataset_path,
    datasets_of,
    parse_dataset_id,
)
from gateway.records.base import dataset_key
from gateway.upstream.answers import JsonAnswer, accept_json_object
from gateway.upstream.cohere import upstream_message

# GET /v1/datasets/usage is an organisation-wide figure, kept this long (docs/design.md §11).
USAGE_TTL_S = 60.0


async def get_dataset(request: web.Request) -> web.Response:
    """``GET /v1/datasets/{id}``: from the cache, or one shared upstream call; held for a change if asked."""
    admitted = await admit(request, "read_dataset")
    dataset_id = parse_dataset_id(request.match_info["id"])
    await check_dataset_visible(admitted.state, admitted.caller, dataset_id)
    resource = Cached(dataset_key(dataset_id), dataset_path(dataset_id), accept_dataset, listed=False)
    held = await cached_answer(request, admitted, resource)
    response = _render(request, admitted, held)
    if held.applied is not None:
        response.headers["Preference-Applied"] = f"wait={held.applied}"
    return response


def _render(request: web.Request, admitted: Admitted, held: Held) -> web.Response:
    """The cached answer for this caller: its part URLs rewritten, a weak ETag, 304 when the caller holds it."""
    entry, state = held.result.entry, admitted.state
    headers = cache_headers(entry, held.result.state, state.clock())
    # The body the caller gets changes with every rewrite (signed URLs): only the upstream's answer is compared.
    headers["ETag"] = "W/" + entry.etag
    if entry.status != 200:
        raise errors.NotFound(upstream_message(entry.body), upstream_status=404, headers=headers)
    if rules.not_modified(held.if_none_match, entry.etag):
        return web.Response(status=304, headers=headers)
    document = json.loads(entry.body)
    dataset = _rewritten(request, admitted, document["dataset"])
    body = entry.body if dataset is document["dataset"] else json.dumps({**document, "dataset": dataset}).encode()
    return json_answer(200, body, headers)


def _rewritten(request: web.Request, admitted: Admitted, dataset: Any) -> Any:
    """``dataset`` with its part URLs as this caller may use them (the same object when nothing changes)."""
    if not isinstance(dataset, dict):
        return dataset
    public_url = admitted.snapshot.config.server.public_url
    base_url = public_url or f"http://{request.host}"
    return admitted.state.links.rewrite(dataset, caller=admitted.caller.name, base_url=base_url)


async def list_datasets(request: web.Request) -> web.Response:
    """``GET /v1/datasets``: the upstream's page, filtered for an ``own`` caller, each dataset's URLs rewritten."""
    admitted = await admit(request, "read_dataset")
    state, caller = admitted.state, admitted.caller
    query = inputs.dataset_list_query(request.query)
    call = upstream_request(request, caller, DATASETS_PATH, query=query)
    page = await state.upstream.fetch(call, True, accept_json_object)
    listed = datasets_of(page.document)
    shown = await _visible(state, caller, listed)
    rewritten = [_rewritten(request, admitted, dataset) for dataset in shown]
    if len(rewritten) == len(listed) and all(new is old for new, old in zip(rewritten, listed, strict=True)):
        return json_answer(page.status, page.body)  # nothing to change: the upstream's bytes
    return json_answer(page.status, json.dumps({**page.document, "datasets": rewritten}).encode())


async def _visible(state: GatewayState, caller: Caller, datasets: list[Any]) -> list[Any]:
    """The datasets of a page this caller may see (a page may come back shorter or empty, as in §8)."""
    if rules.sees_every_batch(caller):
        return datasets
    shown = []
    for dataset in datasets:
        dataset_id = dataset.get("id") if isinstance(dataset, dict) else None
        if isinstance(dataset_id, str) and rules.may_see(caller, await state.records.owner_of(dataset_key(dataset_id))):
            shown.append(dataset)
    return shown


async def delete_dataset(request: web.Request) -> web.Response:
    """``DELETE /v1/datasets/{id}``: delete upstream, then evict the id's cache entry."""
    admitted = await admit(request, "delete_dataset")
    dataset_id = parse_dataset_id(request.match_info["id"])
    state, caller = admitted.state, admitted.caller
    await check_dataset_visible(state, caller, dataset_id)
    # Not sent twice: a second delete of a deleted dataset would answer 404 for a delete that worked.
    call = upstream_request(
        request, caller, dataset_path(dataset_id), method="DELETE", write=True, retry_after_sending=False
    )
    answer = await state.upstream.fetch(call, True, accept_json_object)
    await state.cache.evict(dataset_key(dataset_id))
    return json_answer(answer.status, answer.body)


class UsageCache:
    """The organisation's dataset usage, kept ``USAGE_TTL_S``, one upstream call at a time (per process)."""

    def __init__(self) -> None:
        self._held: tuple[float, JsonAnswer] | None = None
        self._flight: SingleFlight[JsonAnswer] = SingleFlight()

    async def get(self, request: web.Request, admitted: Admitted) -> web.Response:
        state = admitted.state
        now = state.clock()
        if self._held is not None and now < self._held[0] + USAGE_TTL_S:
            fetched_at, answer = self._held
            cache = CacheState.HIT
        else:

            async def fetch() -> JsonAnswer:
                call = upstream_request(request, admitted.caller, USAGE_PATH)
                fetched = await state.upstream.fetch(call, True, accept_json_object)
                self._held = (state.clock(), fetched)
                return fetched

            request[CACHE_STATE] = CacheState.MISS.value
            answer = await self._flight.run("usage", fetch, state.upstream.flight_wait_s())
            fetched_at, cache = (self._held or (now, answer))[0], CacheState.MISS
        now = state.clock()
        request[CACHE_STATE] = cache.value
        headers = {
            "X-Cache": cache.value,
            "Age": str(max(0, int(now - fetched_at))),
            "Cache-Control": f"private, max-age={max(0, int(fetched_at + USAGE_TTL_S - now))}",
        }
        return json_answer(answer.status, answer.body, headers)


USAGE: web.AppKey[UsageCache] = web.AppKey("dataset_usage", UsageCache)


async def dataset_usage(request: web.Request) -> web.Response:
    """``GET /v1/datasets/usage``: organisation-wide, so no scope applies; cached ``USAGE_TTL_S``."""
    admitted = await admit(request, "dataset_usage")
    return await request.app[USAGE].get(request, admitted)
