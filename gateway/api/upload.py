"""``POST /v1/datasets``: a dataset upload, streamed to the upstream as it arrives (docs/design.md §11).

The caller is admitted as for a create (``upload_dataset``); the query and
the Content-Type are checked; the body's opening is read (``CallerBody``)
so that a body that is not multipart goes nowhere; then the body streams to
the upstream (``gateway.upstream.upload``) while it arrives. The new id is
recorded as the caller's before the answer leaves.

**Idempotency-Key.** The fingerprint is of the body's parts, known only
once the whole body has passed, but the key must be taken before anything
goes upstream. So the key is claimed at the start under a fingerprint that
says only "an upload" (the record ``upload:<key>``, namespaced so that a
batch create with the same key is another record), and the real fingerprint
is kept with the outcome: a settled record's body is
``{"fingerprint", "body"}``. A later request with the key reads the record
by claiming it: still running, 409; settled, it reads its own body (no
upstream call), and replays the answer if the fingerprints match, else 422.
After an ambiguous failure (the whole body left, and no answer came), the
fingerprint is kept in a second record (``upload-fingerprint:<key>``,
claimed and settled at once, so that a claim of it compares), and a retry
first looks for the dataset in the upstream's list (same name and type,
created between the first try's start and the retry's, no other caller's): one found is replayed if
the retry's body is the same file; none found, the upload is made anew.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.api import inputs, rules
from gateway.api.admission import Admitted, admit, readmit, upstream_request
from gateway.api.answers import json_answer
from gateway.api.keys import REQUEST_ID, TRACE
from gateway.api.upload_body import CallerBody, Check
from gateway.datasets.multipart import PartsFingerprint
from gateway.ops.logs import log_event
from gateway.records.base import Claimed, InUse, Replay, Reused, dataset_key
from gateway.upstream.answers import JsonAnswer, accept_json_object
from gateway.upstream.cohere import BATCH_ID, parse_timestamp
from gateway.upstream.upload import send_upload

log = logging.getLogger("gateway")

REPLAYED = {"Idempotent-Replayed": "true"}
# The query an upload may hold (Cohere's API reference); only these two may repeat.
QUERY = frozenset(
    {"name", "type", "keep_original_file", "skip_malformed_input", "keep_fields", "optional_fields"}
    | {"text_separator", "csv_delimiter"}
)
REPEATABLE = frozenset({"keep_fields", "optional_fields"})
MAX_QUERY_VALUE = 1024
# The key's record while its upload runs: says only that it is an upload (the real fingerprint comes at the end).
UPLOADING = "upload"
# Upstream answers to an upload that are definite: the same request would get them again.
DEFINITE_ERRORS = frozenset({400, 404, 422})
# Looking for a dataset an ambiguous try may have made: one page of this size.
SEARCH_LIMIT = 100


async def upload_dataset(request: web.Request) -> web.Response:
    started = time.perf_counter()
    admitted = await admit(request, "upload_dataset")
    metrics, caller = admitted.state.metrics.datasets, admitted.caller.name
    outcome = "error"
    try:
        response = await _upload(request, admitted)
        outcome = "replayed" if "Idempotent-Replayed" in response.headers else "created"
        return response
    except errors.GatewayError as error:
        outcome = error.code
        raise
    finally:
        metrics.uploads.labels(caller, outcome).inc()
        metrics.upload_seconds.labels(caller).observe(time.perf_counter() - started)


def upload_query(query: Any) -> tuple[tuple[str, str], ...]:
    """The upload's query, as sent; 400 ``invalid_request`` naming what is wrong with it."""
    pairs = tuple((str(name), str(value)) for name, value in query.items())
    names = [name for name, _ in pairs]
    unknown = sorted({name for name in names if name not in QUERY})
    if unknown:
        raise errors.InvalidRequest(f"Unknown query parameters: {', '.join(unknown)}.")
    repeated = sorted({name for name in names if names.count(name) > 1 and name not in REPEATABLE})
    if repeated:
        raise errors.InvalidRequest(f"Query parameters given more than once: {', '.join(repeated)}.")
    for required in ("name", "type"):
        if not dict(pairs).get(required):
            raise errors.InvalidRequest(f"The query parameter '{required}' is required.")
    for name, value in pairs:
        if len(value) > MAX_QUERY_VALUE or not value.isprintable():
            raise errors.InvalidRequest(f"The query parameter '{name}' must be printable, at most 1024 characters.")
    return pairs


async def _upload(request: web.Request, admitted: Admitted) -> web.Response:
    query = upload_query(request.query)
    key = inputs.idempotency_key(request.headers.getall("Idempotency-Key", []))
    parts = PartsFingerprint(request.headers.get("Content-Type", ""), query, whole=key is not None)
    config = admitted.snapshot.config
    counter = admitted.state.metrics.datasets.upload_bytes.labels(admitted.caller.name)
    body = CallerBody(
        request,
        parts,
        rules.body_limit(config, request.method, request.path),
        config.datasets.upload_idle_timeout_s,
        counter.inc,
        admitted.caller.name,
    )
    if key is None:
        reply = await _send(request, admitted, query, body)
        return json_answer(reply.status, reply.body)
    return await _keyed(request, admitted, query, body, key)


async def _send(
    request: web.Request,
    admitted: Admitted,
    query: Sequence[tuple[str, str]],
    body: CallerBody,
    before_last: Check | None = None,
) -> JsonAnswer:
    """The upload upstream: the opening read here, the rest streamed; the new id recorded as the caller's."""
    held = await body.opening()
    # A reload may have come while the opening arrived: the config in force now decides (docs/design.md §7).
    admitted = readmit(request, admitted, "upload_dataset")
    call = upstream_request(
        request,
        admitted.caller,
        rules.UPLOAD_PATH,
        method="POST",
        query=tuple(query),
        retry_after_sending=False,
        write=True,
    )
    headers = {"Content-Type": request.headers["Content-Type"]}
    if request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    reply = await send_upload(
        admitted.state.upstream,
        call,
        headers,
        body.stream(held, before_last),
        accept_json_object,
        admitted.snapshot.config.datasets.upload_idle_timeout_s,
    )
    await _keep(admitted, reply)
    return reply


async def _keep(admitted: Admitted, reply: JsonAnswer) -> None:
    """Record an uploaded dataset as the caller's, durably, before its answer leaves."""
    dataset_id = reply.document.get("id")
    if not isinstance(dataset_id, str) or not BATCH_ID.fullmatch(dataset_id):
        raise errors.UpstreamInvalidResponse(
            "The upstream's answer to an upload held no dataset id.", upstream_status=reply.status
        )
    state, caller = admitted.state, admitted.caller.name
    try:
        await state.records.record_owner(dataset_key(dataset_id), caller)
    except errors.StoreUnavailable:
        # The dataset exists: the caller still gets it, and ops learn whose it is from the log.
        state.metrics.store_write_failures.inc()
        log_event(log, logging.ERROR, "could not record a new dataset's owner", dataset_id=dataset_id, caller=caller)


async def _keyed(
    request: web.Request, admitted: Admitted, query: Sequence[tuple[str, str]], body: CallerBody, key: str
) -> web.Response:
    """An upload under an ``Idempotency-Key`` (see the module docstring)."""
    records, caller = admitted.state.records, admitted.caller.name
    claim = await records.claim_key(caller, f"upload:{key}", UPLOADING)
    admitted.state.metrics.idempotency.labels(_claim_outcome(claim)).inc()
    if isinstance(claim, InUse):
        raise errors.IdempotencyKeyInUse(retry_after_s=claim.retry_after_s)
    if isinstance(claim, Reused):
        raise errors.IdempotencyKeyReused()
    if isinstance(claim, Replay):
        return await _replay(request, body, claim)
    return await _upload_claimed(request, admitted, query, body, key, claim)


def _claim_outcome(claim: Claimed | Replay | InUse | Reused) -> str:
    return {Claimed: "new", Replay: "replayed", InUse: "in_use", Reused: "reused"}[type(claim)]


async def _replay(request: web.Request, body: CallerBody, claim: Replay) -> web.Response:
    """A settled key: the body is read and compared, nothing goes upstream; the answer again, or 422."""
    fingerprint = await body.drain()
    settled = json.loads(claim.body)
    if settled.get("fingerprint") != fingerprint:
        raise errors.IdempotencyKeyReused()
    answer = settled["body"]
    if claim.status >= 400:
        answer = json.dumps({**json.loads(answer), "request_id": request[REQUEST_ID]})
    return json_answer(claim.status, answer.encode(), REPLAYED)


async def _upload_claimed(
    request: web.Request,
    admitted: Admitted,
    query: Sequence[tuple[str, str]],
    body: CallerBody,
    key: str,
    claim: Claimed,
) -> web.Response:
    """Upload under a claimed key, and record the outcome as definite, ambiguous or free."""
    state, caller = admitted.state, admitted.caller.name
    since = claim.ambiguous_since
    replayed = False
    try:
        found = None if since is None else await _find_uploaded(request, admitted, query, since)
        if found is not None:
            await _same_file(admitted, key, await body.drain())
            reply, replayed = found, True
            await _keep(admitted, reply)
        else:
            check = None if since is None else (lambda fingerprint: _same_file(admitted, key, fingerprint))
            reply = await _send(request, admitted, query, body, check)
    except errors.GatewayError as error:
        if error.upstream_status in DEFINITE_ERRORS and body.fingerprint is not None:
            await _settle(admitted, key, error.status, error.body(request[REQUEST_ID], state.redact.known), body)
        elif request[TRACE].outcome_unknown or _answered_2xx(error):
            await _keep_fingerprint(admitted, key, body.fingerprint)
            await _unless_store_fails(state.records.mark_ambiguous(caller, f"upload:{key}"))
        else:
            # Also a definite refusal that came before the body had all passed: with no fingerprint to compare,
            # a retry with the same file could only be 422; freed, it is refused again by the upstream itself.
            await _unless_store_fails(state.records.release_key(caller, f"upload:{key}"))
        raise
    except BaseException:
        # Cancelled (the gateway is stopping), or a bug: the upstream may have the dataset.
        await _unless_store_fails(state.records.mark_ambiguous(caller, f"upload:{key}"))
        raise
    await _settle(admitted, key, reply.status, reply.body, body)
    return json_answer(reply.status, reply.body, REPLAYED if replayed else None)


def _answered_2xx(error: errors.GatewayError) -> bool:
    return error.upstream_status is not None and 200 <= error.upstream_status < 300


async def _settle(admitted: Admitted, key: str, status: int, answer: bytes, body: CallerBody) -> None:
    """Record a definite outcome with the body's fingerprint; if that fails, the key's lease runs out."""
    settled = json.dumps({"fingerprint": body.fingerprint, "body": answer.decode()}).encode()
    try:
        await admitted.state.records.settle_key(admitted.caller.name, f"upload:{key}", status, settled)
    except errors.StoreUnavailable:
        admitted.state.metrics.store_write_failures.inc()
        log_event(log, logging.ERROR, "could not record an idempotent upload's outcome", caller=admitted.caller.name)


async def _keep_fingerprint(admitted: Admitted, key: str, fingerprint: str | None) -> None:
    """After an ambiguous failure: the body's fingerprint, for a retry to compare with (a record of its own)."""
    if fingerprint is None:
        return
    records, caller = admitted.state.records, admitted.caller.name
    try:
        claim = await records.claim_key(caller, f"upload-fingerprint:{key}", fingerprint)
        if isinstance(claim, Claimed):
            await records.settle_key(caller, f"upload-fingerprint:{key}", 200, b"")
    except errors.StoreUnavailable:
        log_event(log, logging.ERROR, "could not keep an ambiguous upload's fingerprint", caller=caller)


async def _same_file(admitted: Admitted, key: str, fingerprint: str) -> None:
    """422 unless ``fingerprint`` is the one kept after the ambiguous try (or none was kept)."""
    records, caller = admitted.state.records, admitted.caller.name
    claim = await records.claim_key(caller, f"upload-fingerprint:{key}", fingerprint)
    if isinstance(claim, Reused):
        raise errors.IdempotencyKeyReused()
    if isinstance(claim, Claimed):
        await _unless_store_fails(records.release_key(caller, f"upload-fingerprint:{key}"))


async def _unless_store_fails(update: Awaitable[None]) -> None:
    """A key's state change that may fail: the key then stays claimed until its lease ends,
    after which a retry treats it as ambiguous and looks before it uploads."""
    try:
        await update
    except errors.StoreUnavailable:
        log_event(log, logging.ERROR, "could not update an idempotency key's state")


async def _find_uploaded(
    request: web.Request, admitted: Admitted, query: Sequence[tuple[str, str]], since: float
) -> JsonAnswer | None:
    """The dataset an earlier, ambiguous try made, if exactly one can be it: the same name and type,
    created between the first try's start and this retry's, and no other caller's. No slack before the first
    try: a dataset of the same name made earlier (another caller's through no gateway, or an older upload of
    this caller's) is not taken for this one."""
    sent = dict(query)
    earliest, latest = since, time.time()
    after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(earliest))  # whole seconds: filtered exactly below
    listing = (("datasetType", sent["type"]), ("after", after), ("limit", str(SEARCH_LIMIT)))
    call = upstream_request(request, admitted.caller, rules.UPLOAD_PATH, query=listing)
    page = await admitted.state.upstream.fetch(call, True, accept_json_object)
    datasets = page.document.get("datasets")
    found: list[str] = []
    for dataset in datasets if isinstance(datasets, list) else []:
        if not isinstance(dataset, dict) or dataset.get("name") != sent["name"]:
            continue
        dataset_id, when = dataset.get("id"), parse_timestamp(dataset.get("created_at"))
        if not isinstance(dataset_id, str) or not BATCH_ID.fullmatch(dataset_id):
            continue
        if when is None or not earliest <= when <= latest:
            continue
        if dataset.get("dataset_type", sent["type"]) != sent["type"]:
            continue
        if await admitted.state.records.owner_of(dataset_key(dataset_id)) in (None, admitted.caller.name):
            found.append(dataset_id)
    if len(found) != 1:
        if found:
            log_event(log, logging.INFO, "an ambiguous upload matched several datasets; none adopted", count=len(found))
        return None
    document = {"id": found[0]}
    return JsonAnswer(200, json.dumps(document).encode(), document)
