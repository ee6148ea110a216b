"""``GET /v1/datasets/{id}/parts/{part_id}[/original]``: a signed download URL, served from storage (§11).

No caller key: the URL itself says who it was given to (``SignedLinks``).
In order: the ids, the signature, the expiry, then the named caller as
configured now (it exists, it may ``read_dataset``, it sees the dataset).
Only then is anything asked of the upstream: the dataset's current answer
(``PartUrls``, kept per dataset for ``datasets.upstream_url_ttl_s``) names
the part's storage URL, which is fetched with ``StorageClient`` (no token,
no redirects, allowed origins only) and streamed to the caller as it comes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from cachetools import LRUCache

from gateway import errors
from gateway.api.keys import CALLER, REQUEST_ID, STATE, TRACE
from gateway.api.state import GatewayState
from gateway.config import CallerSettings
from gateway.datasets.signing import SignedLinks, SignedPart
from gateway.ops.logs import log_event
from gateway.records.base import dataset_key
from gateway.upstream.answers import accept_json_object
from gateway.upstream.client import UpstreamRequest
from gateway.upstream.cohere import BATCH_ID
from gateway.upstream.storage import FORWARDED_REQUEST_HEADERS, StorageClient, allowed_origin

PART_ROUTE = "/v1/datasets/{id}/parts/{part_id}"
ORIGINAL_ROUTE = "/v1/datasets/{id}/parts/{part_id}/original"
# The storage answer's headers a caller gets: what it needs to read the bytes, and to resume.
PASSED_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Content-Encoding", "Accept-Ranges", "ETag")
KEPT_DATASETS = 10_000  # datasets whose part URLs are kept (each a few hundred bytes)

log = logging.getLogger("gateway")


class RangeNotSatisfiable(errors.InvalidRequest):
    """The storage host could not serve the ``Range`` asked for (RFC 9110 15.5.17)."""

    status = 416
    default_message = "The requested range is not within the part."


@dataclass(frozen=True, slots=True)
class _Known:
    """A dataset's part URLs (part id to ``url`` and ``original_url``), and when they were read (loop time)."""

    read_at: float
    urls: dict[str, tuple[str | None, str | None]]


class PartUrls:
    """The upstream's storage URLs of each dataset's parts, read from its current answer and kept a while."""

    def __init__(self) -> None:
        self._known: LRUCache[str, _Known] = LRUCache(maxsize=KEPT_DATASETS)

    async def url_of(self, request: web.Request, state: GatewayState, part: SignedPart, *, afresh: bool) -> str:
        """The storage URL of ``part``; the dataset asked for again if kept too long, or ``afresh``."""
        now = state.clock()
        known = self._known.get(part.dataset_id)
        max_age = state.snapshot.config.datasets.upstream_url_ttl_s
        if afresh or known is None or now - known.read_at >= max_age:
            known = _Known(now, await _read_part_urls(request, state, part))
            self._known[part.dataset_id] = known
        urls = known.urls.get(part.part_id)
        url = None if urls is None else urls[1] if part.original else urls[0]
        if not url:
            raise errors.NotFound("The dataset has no such part file.", upstream_status=200)
        return url


async def _read_part_urls(
    request: web.Request, state: GatewayState, part: SignedPart
) -> dict[str, tuple[str | None, str | None]]:
    """``GET /v1/datasets/{id}`` upstream, as the caller the URL names, under the budget: its parts' URLs."""
    call = UpstreamRequest(
        path=f"/v1/datasets/{part.dataset_id}",
        caller_name=part.caller,
        request_id=request[REQUEST_ID],
        trace=request[TRACE],
    )
    answer = await state.upstream.fetch(call, True, accept_json_object)
    dataset = answer.document.get("dataset")
    if not isinstance(dataset, dict):
        raise errors.UpstreamInvalidResponse("The upstream's answer did not hold a dataset.", upstream_status=200)
    urls: dict[str, tuple[str | None, str | None]] = {}
    for item in dataset.get("dataset_parts") or []:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            url, original = item.get("url"), item.get("original_url")
            urls[item["id"]] = (url if isinstance(url, str) else None, original if isinstance(original, str) else None)
    return urls


class Downloads:
    """What the download route keeps for the life of the app: the storage client and the part URLs."""

    def __init__(self, state: GatewayState) -> None:
        upstream = state.snapshot.config.upstream
        self.storage = StorageClient(upstream.connect_timeout_s, upstream.timeout_s)
        self.part_urls = PartUrls()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """Started after the Redis link (the signing key may be shared through it), closed with the app."""
        links = app[STATE].links
        if isinstance(links, SignedLinks):
            await links.start()
        await self.storage.start()
        yield
        await self.storage.close()


DOWNLOADS = web.AppKey("downloads", Downloads)


async def download_part(request: web.Request) -> web.StreamResponse:
    return await _download(request, original=False)


async def download_original(request: web.Request) -> web.StreamResponse:
    return await _download(request, original=True)


def _checked_id(raw: str, what: str) -> str:
    # Decoded already: a %2F is a "/" here, and ".." or an over-long id fail the pattern too.
    if not BATCH_ID.fullmatch(raw):
        raise errors.InvalidRequest(f"Malformed {what} id.")
    return raw


async def _download(request: web.Request, *, original: bool) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.perf_counter()
    tally = _Tally()
    try:
        dataset_id = _checked_id(request.match_info["id"], "dataset")
        part_id = _checked_id(request.match_info["part_id"], "part")
        links = state.links
        if not isinstance(links, SignedLinks):
            raise errors.DownloadUrlInvalid("This gateway gives no download URLs (datasets.downloads: direct).")
        part = links.verify(dataset_id, part_id, original, request.query)
        await _check_holder(state, part)
        tally.caller = request[CALLER] = part.caller
        return await _serve(request, state, part, tally)
    except errors.GatewayError as error:
        tally.outcome = error.code
        raise
    finally:
        seconds = time.perf_counter() - started
        state.metrics.downloads.observe(tally.caller, tally.outcome, tally.sent, seconds)


@dataclass(slots=True)
class _Tally:
    """What the metrics say of one download: whose (``-`` until the URL is verified), how it ended, bytes sent."""

    caller: str = "-"
    outcome: str = "ok"
    sent: int = 0


def _configured(state: GatewayState, name: str) -> CallerSettings | None:
    # A scan: one per download, of at most some thousands of callers.
    return next((c for c in state.snapshot.config.callers if c.name == name), None)


async def _check_holder(state: GatewayState, part: SignedPart) -> None:
    """The caller the URL was given to, as configured now: it exists, may read datasets and sees this one."""
    caller = _configured(state, part.caller)
    if caller is None or "read_dataset" not in caller.allow:
        raise errors.DownloadUrlInvalid()
    if caller.batches == "own" and await state.records.owner_of(dataset_key(part.dataset_id)) != caller.name:
        raise errors.DownloadUrlInvalid()


async def _serve(request: web.Request, state: GatewayState, part: SignedPart, tally: _Tally) -> web.StreamResponse:
    """Fetch the part from storage and stream it; once more with a fresh URL if storage says 403."""
    downloads = request.app[DOWNLOADS]
    origins = state.snapshot.config.datasets.part_origins
    sent = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
    for afresh in (False, True):
        url = await downloads.part_urls.url_of(request, state, part, afresh=afresh)
        if not allowed_origin(url, origins):
            raise errors.UpstreamInvalidResponse(
                "The part is stored on an origin the gateway may not fetch from (datasets.part_origins)."
            )
        async with downloads.storage.get(url, sent) as reply:
            if reply.status == 403 and not afresh:
                continue  # the upstream's signed URL has expired: ask the upstream for the dataset again
            return await _relay(request, reply, tally)
    raise AssertionError("unreachable: the second try returns or raises")


def _storage_error(reply: aiohttp.ClientResponse) -> errors.GatewayError:
    status = reply.status
    if status == 416:
        return RangeNotSatisfiable(headers={"Content-Range": reply.headers.get("Content-Range", "bytes */*")})
    if status == 404:
        return errors.NotFound("The storage host has no such part.", upstream_status=404)
    if 300 <= status < 400:
        return errors.UpstreamError(
            f"The storage host answered with a redirect ({status}); redirects are not followed.", upstream_status=status
        )
    if status == 403:
        return errors.UpstreamError(
            "The storage host refused the part's URL, also when fetched afresh.", upstream_status=403
        )
    return errors.UpstreamError(f"The storage host answered {status}.", upstream_status=status)


async def _relay(request: web.Request, reply: aiohttp.ClientResponse, tally: _Tally) -> web.StreamResponse:
    """The storage answer to the caller: its status and headers, then its body as fast as the caller reads."""
    if reply.status not in (200, 206):
        raise _storage_error(reply)
    response = web.StreamResponse(status=reply.status)
    for name in PASSED_HEADERS:
        if name in reply.headers:
            response.headers[name] = reply.headers[name]
    response.headers["Cache-Control"] = "private, no-store"
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    # A caller that stops reading would hold the storage connection (one of a shared pool) for ever: each write
    # may wait this long. The caller-side idle bound of the dataset routes (an upload's caller that stops sending
    # is cut after as long), not upstream.timeout_s, which is how long an upstream may take to answer.
    idle_s = request.app[STATE].snapshot.config.datasets.upload_idle_timeout_s
    try:
        # Each write waits while the caller's connection is full: a slow caller slows the read.
        # iter_any (one turn per buffered batch) measured cheaper than iter_chunks (one per socket read); larger
        # write-buffer limits or socket buffers changed nothing: the cost per byte is in the kernel's copies and
        # aiohttp's and uvloop's, not in this loop (bench/scenarios/downloads.py, docs/benchmark.md).
        async for chunk in reply.content.iter_any():
            await _write(response, chunk, idle_s)
            tally.sent += len(chunk)
        await response.write_eof()
    except ConnectionError:  # the caller hung up ("Connection lost", or a reset)
        tally.outcome = "client_gone"
    except _CallerStalled:
        # Counted as gone: it took nothing for ``idle_s``. Cut, so that the storage answer is released with it.
        tally.outcome = "client_gone"
        log_event(log, logging.INFO, "a download's caller stopped reading; its connection was cut", idle_s=idle_s)
        _cut(request)
    except (errors.GatewayError, aiohttp.ClientError, TimeoutError) as exc:
        # The head is sent: the only way left to say the body is short is to cut the connection.
        tally.outcome = "storage_failed"
        log_event(log, logging.WARNING, "a part stopped arriving from storage", reason=_reason(exc))
        _cut(request)
    except Exception:
        # Never an error answer: a head is already sent. Logged as a bug, and the body cut short.
        tally.outcome = "internal_error"
        log.exception("a download failed mid-part")
        _cut(request)
    return response


class _CallerStalled(Exception):
    """The caller took none of a chunk within the idle bound."""


async def _write(response: web.StreamResponse, chunk: bytes, idle_s: float) -> None:
    try:
        async with asyncio.timeout(idle_s):
            await response.write(chunk)
    except TimeoutError:
        raise _CallerStalled from None


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _reason(exc: BaseException) -> Any:
    return exc.code if isinstance(exc, errors.GatewayError) else type(exc).__name__
