"""Downloads through the gateway (docs/design.md §11, "Downloads"): signed gateway URLs, streamed from storage.

The upstream's dataset route is scripted on the fake upstream; its part
URLs point at a storage host of the test's own (``Storage``), which signs
its URLs with a token it can rotate (an expired upstream URL is a 403
there, as on Google Cloud Storage), records every request it gets, and
serves ``Range``. The caller reaches storage only through the gateway.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cohere
import fastavro
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.config import GatewayConfig
from gateway.datasets.links import DirectLinks
from gateway.datasets.signing import SignedLinks
from gateway.edge.server import RunningGateway
from tests.redis_server import RedisServer
from tests.support import (
    BILLING_KEY,
    SECRETS,
    UPSTREAM_TOKEN,
    FakeClock,
    LogCapture,
    assert_no_secrets,
    eventually,
    http,
    make_config,
    registry_value,
    sha256_hex,
)
from tests.upstream import Upstream, assert_error

GatewayFactory = Callable[..., Awaitable[RunningGateway]]

DATASET_ID = "dataset-out-1"
PART_ID = "part-0"
SCHEMA = {
    "type": "record",
    "name": "row",
    "fields": [{"name": "custom_id", "type": "string"}, {"name": "text", "type": "string"}],
}
ROWS = [{"custom_id": f"row-{n}", "text": f"embedding input number {n}"} for n in range(50)]
READ_ALL = ["retrieve", "list", "read_dataset"]


def avro_bytes(rows: list[dict[str, Any]]) -> bytes:
    out = io.BytesIO()
    fastavro.writer(out, fastavro.parse_schema(SCHEMA), rows)
    return out.getvalue()


@dataclass
class StorageSeen:
    path: str
    query: str
    headers: CIMultiDict[str]


@dataclass
class Storage:
    """A storage host on 127.0.0.1: files at URLs signed with ``token``; ``rotate()`` expires every URL given."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[StorageSeen] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    redirect_to: str | None = None
    # Files made as they are sent (name: size), and how many of their bytes have been written so far.
    streamed: dict[str, int] = field(default_factory=dict)
    written: int = 0
    cut_after: int | None = None  # a streamed file's connection is cut once this many bytes are written
    ended: int = 0  # streamed answers whose handler has returned (sent whole, or its connection gone)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> Storage:
        app = web.Application()
        app.router.add_route("*", "/{name}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}?token={self.token}"

    def rotate(self) -> None:
        self.token = secrets.token_hex(8)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(StorageSeen(request.path, request.query_string, CIMultiDict(request.headers)))
        if self.redirect_to is not None:
            return web.Response(status=302, headers={"Location": self.redirect_to})
        if request.query.get("token") != self.token:
            return web.Response(status=403, body=b"<Error>ExpiredToken</Error>", content_type="application/xml")
        if request.match_info["name"] in self.streamed:
            return await self._stream(request, self.streamed[request.match_info["name"]])
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if wanted is None:
            return web.Response(body=data, content_type="application/avro")
        first = int(wanted[1])
        last = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
        if first >= len(data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        return web.Response(
            status=206,
            body=data[first : last + 1],
            content_type="application/avro",
            headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"},
        )

    async def _stream(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        try:
            return await self._stream_body(request, response, size)
        finally:
            self.ended += 1

    async def _stream_body(self, request: web.Request, response: web.StreamResponse, size: int) -> web.StreamResponse:
        chunk = b"x" * STREAM_CHUNK
        while self.written < size:
            if self.cut_after is not None and self.written >= self.cut_after:
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(chunk[: size - self.written])
            self.written += min(STREAM_CHUNK, size - self.written)
        await response.write_eof()
        return response


STREAM_CHUNK = 256 * 1024


def dataset_object(storage: Storage, dataset_id: str = DATASET_ID, part_origin: str | None = None) -> dict[str, Any]:
    """A dataset as Cohere answers it, its part URLs fresh from ``storage`` (or on ``part_origin``)."""
    data = storage.files[f"{dataset_id}.avro"]
    url = storage.url_of(f"{dataset_id}.avro")
    if part_origin is not None:
        url = part_origin + url.removeprefix(storage.url)
    return {
        "id": dataset_id,
        "name": "nightly-output",
        "created_at": "2026-12-01T10:00:00Z",
        "updated_at": "2026-12-01T10:05:00Z",
        "dataset_type": "embed-result",
        "validation_status": "validated",
        "schema": json.dumps(SCHEMA),
        "dataset_parts": [
            {
                "id": PART_ID,
                "name": "part-0.avro",
                "url": url,
                "original_url": storage.url_of(f"{dataset_id}.original"),
                "index": 0,
                "size_bytes": len(data),
                "num_rows": len(ROWS),
            }
        ],
    }


def serve_datasets(upstream: Upstream, storage: Storage, part_origin: str | None = None) -> None:
    """The upstream's ``GET /v1/datasets/{id}``: each dataset whose file ``storage`` holds, its URLs fresh."""

    async def handler(request: web.Request) -> web.Response:
        found = re.fullmatch(r"/v1/datasets/([A-Za-z0-9_-]+)", request.path)
        if request.method != "GET" or found is None or f"{found[1]}.avro" not in storage.files:
            return web.json_response({"message": "not found"}, status=404)
        return web.json_response({"dataset": dataset_object(storage, found[1], part_origin)})

    upstream.script(handler)


def dataset_calls(upstream: Upstream, dataset_id: str = DATASET_ID) -> int:
    return sum(1 for seen in upstream.calls() if seen.path == f"/v1/datasets/{dataset_id}")


def download_config(upstream: Upstream, storage: Storage, **sections: Any) -> GatewayConfig:
    """Both callers may read datasets; parts only from ``storage``'s origin."""
    callers = [
        {"name": "billing-service", "key": BILLING_KEY, "allow": READ_ALL},
        {"name": "reporting", "key_sha256": sha256_hex(SECRETS[2]), "allow": READ_ALL},
    ]
    datasets = {"part_origins": [storage.url], **sections.pop("datasets", {})}
    return make_config(upstream.url, callers=sections.pop("callers", callers), datasets=datasets, **sections)


def signed(
    gateway: RunningGateway,
    storage: Storage,
    caller: str = "billing-service",
    dataset_id: str = DATASET_ID,
    field_name: str = "url",
) -> str:
    """The gateway URL ``caller`` gets for the dataset's first part, as the dataset routes rewrite it."""
    rewritten = gateway.state.links.rewrite(dataset_object(storage, dataset_id), caller=caller, base_url=gateway.url)
    url: str = rewritten["dataset_parts"][0][field_name]
    return url


@pytest.fixture
async def storage() -> AsyncIterator[Storage]:
    started = await Storage().start()
    started.files[f"{DATASET_ID}.avro"] = avro_bytes(ROWS)
    started.files[f"{DATASET_ID}.original"] = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
    yield started
    await started.stop()


def assert_storage_saw_no_credentials(storage: Storage) -> None:
    assert storage.requests
    for seen in storage.requests:
        assert "Authorization" not in seen.headers
        assert "X-Client-Name" not in seen.headers
        assert_no_secrets(json.dumps(list(seen.headers.items())))


# ---------------------------------------------------------------------------
# The SDK's save_dataset, through the gateway only
# ---------------------------------------------------------------------------


async def test_the_sdks_save_dataset_reads_every_row_through_the_gateway_and_no_token_reaches_storage(
    start: GatewayFactory, upstream: Upstream, storage: Storage, tmp_path: Path, logs: LogCapture
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    answer = gateway.state.links.rewrite(dataset_object(storage), caller="billing-service", base_url=gateway.url)
    # What the caller holds names the gateway only: it needs no route to the storage host.
    assert storage.url not in json.dumps(answer)
    assert "127.0.0.1" in answer["dataset_parts"][0]["url"]
    assert answer["dataset_parts"][0]["url"].startswith(f"{gateway.url}/v1/datasets/{DATASET_ID}/parts/{PART_ID}?")
    dataset = cohere.Dataset.model_validate({**answer, "schema_": answer["schema"]})
    target = tmp_path / "rows.jsonl"

    co = cohere.ClientV2(api_key=BILLING_KEY, base_url=gateway.url)

    await asyncio.to_thread(co.utils.save_dataset, dataset, str(target))

    assert [json.loads(line) for line in target.read_text().splitlines()] == ROWS
    assert_storage_saw_no_credentials(storage)
    assert UPSTREAM_TOKEN not in storage.requests[0].query
    gateway.state.access_log.flush()
    [line] = [e for e in logs.events("gateway.access") if "/parts/" in (e.get("path") or "")]
    assert line["caller"] == "billing-service"
    assert line["status"] == 200
    assert registry_value(gateway, "gateway_download_bytes_total", caller="billing-service") == len(
        storage.files[f"{DATASET_ID}.avro"]
    )
    assert registry_value(gateway, "gateway_downloads_total", caller="billing-service", outcome="ok") == 1


async def test_save_dataset_of_a_simulated_dataset_through_the_gateway_gets_its_rows_and_storage_no_token(
    start: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """The simulator's own dataset and storage routes (the fake upstream fails the test on any Authorization
    reaching its storage route)."""
    inputs = [{"custom_id": f"c-{n}", "body": json.dumps({"texts": [f"text {n}"]})} for n in range(250)]
    dataset_id = upstream.seed_dataset(inputs)
    callers = [{"name": "billing-service", "key": BILLING_KEY, "allow": READ_ALL}]
    gateway = await start(make_config(upstream.url, callers=callers, datasets={"part_origins": [upstream.url]}))
    seen = await http(f"{upstream.url}/v1/datasets/{dataset_id}", key=UPSTREAM_TOKEN)
    assert seen.status == 200
    upstream_answer = seen.document["dataset"]
    assert len(upstream_answer["dataset_parts"]) > 1  # several parts, each its own download

    answer = gateway.state.links.rewrite(upstream_answer, caller="billing-service", base_url=gateway.url)
    assert upstream.url not in json.dumps(answer)
    dataset = cohere.Dataset.model_validate({**answer, "schema_": answer["schema"]})
    target = tmp_path / "rows.jsonl"
    co = cohere.ClientV2(api_key=BILLING_KEY, base_url=gateway.url)
    await asyncio.to_thread(co.utils.save_dataset, dataset, str(target))

    saved = [json.loads(line) for line in target.read_text().splitlines()]
    assert saved == inputs
    parts = upstream.calls("part")
    assert len(parts) == len(answer["dataset_parts"])
    assert all("Authorization" not in part.headers for part in parts)


async def test_a_range_request_gets_206_with_only_those_bytes_and_their_content_range(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    data = storage.files[f"{DATASET_ID}.avro"]

    answer = await http(signed(gateway, storage), key=None, headers={"Range": "bytes=10-99"})

    assert answer.status == 206
    assert answer.body == data[10:100]
    assert answer.header("Content-Range") == f"bytes 10-99/{len(data)}"
    assert answer.header("Content-Length") == "90"
    assert answer.header("Content-Type") == "application/avro"
    assert storage.requests[-1].headers["Range"] == "bytes=10-99"


async def test_a_whole_part_comes_with_its_length_and_type_and_head_gives_them_without_the_body(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    data = storage.files[f"{DATASET_ID}.avro"]
    url = signed(gateway, storage)

    whole = await http(url, key=None)
    head = await http(url, method="HEAD", key=None)

    assert (whole.status, whole.body) == (200, data)
    assert whole.header("Content-Length") == str(len(data))
    assert whole.header("Content-Type") == "application/avro"
    assert (head.status, head.body) == (200, b"")
    assert head.header("Content-Length") == str(len(data))


async def test_the_original_url_serves_the_original_file(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    url = signed(gateway, storage, field_name="original_url")
    assert f"/parts/{PART_ID}/original?" in url

    answer = await http(url, key=None)

    assert (answer.status, answer.body) == (200, storage.files[f"{DATASET_ID}.original"])
    # A URL for the part file does not open the original, nor the other way round: the path is signed.
    swapped = await http(url.replace("/original?", "?"), key=None)
    assert_error(swapped, 403, "download_url_invalid")


# ---------------------------------------------------------------------------
# The upstream's URL: kept a while, read again when old or refused
# ---------------------------------------------------------------------------


async def test_when_storage_says_the_upstream_url_expired_the_dataset_is_read_again_once_and_the_part_served(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    url = signed(gateway, storage)
    assert (await http(url, key=None)).status == 200
    assert dataset_calls(upstream) == 1
    assert (await http(url, key=None)).status == 200
    assert dataset_calls(upstream) == 1  # the upstream URL is kept

    storage.rotate()  # every URL the upstream gave so far is refused now
    answer = await http(url, key=None)

    assert (answer.status, answer.body) == (200, storage.files[f"{DATASET_ID}.avro"])
    assert dataset_calls(upstream) == 2
    assert [seen.query.endswith(storage.token) for seen in storage.requests[-2:]] == [False, True]


async def test_a_storage_host_that_keeps_refusing_is_a_502_after_one_fresh_url(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    async def always_stale(request: web.Request) -> web.Response:
        stale = dataset_object(storage)
        stale["dataset_parts"][0]["url"] = f"{storage.url}/{DATASET_ID}.avro?token=expired"
        return web.json_response({"dataset": stale})

    upstream.script(always_stale)
    gateway = await start(download_config(upstream, storage))

    answer = await http(signed(gateway, storage), key=None)

    assert_error(answer, 502, "upstream_error")
    assert dataset_calls(upstream) == 2
    assert len(storage.requests) == 2


async def test_an_upstream_url_older_than_upstream_url_ttl_s_is_read_again_before_use(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    clock = FakeClock()
    gateway = await start(download_config(upstream, storage, datasets={"upstream_url_ttl_s": 60}), clock=clock)
    url = signed(gateway, storage)
    assert (await http(url, key=None)).status == 200
    clock.advance(59)
    assert (await http(url, key=None)).status == 200
    assert dataset_calls(upstream) == 1

    clock.advance(2)
    assert (await http(url, key=None)).status == 200

    assert dataset_calls(upstream) == 2
    # Only the fresh URL was used: storage never refused one.
    assert len(storage.requests) == 3


async def test_the_upstream_is_asked_for_the_dataset_as_the_urls_caller_with_the_token_and_never_storage(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))

    assert (await http(signed(gateway, storage, caller="reporting"), key=None)).status == 200

    [seen] = [s for s in upstream.calls() if s.path.startswith("/v1/datasets/")]
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert seen.headers["X-Client-Name"] == "reporting"
    assert_storage_saw_no_credentials(storage)


# ---------------------------------------------------------------------------
# Modes, and replicas
# ---------------------------------------------------------------------------


async def test_direct_mode_passes_the_upstreams_urls_through_and_signs_nothing(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    gateway = await start(download_config(upstream, storage, datasets={"downloads": "direct"}))
    dataset = dataset_object(storage)

    assert isinstance(gateway.state.links, DirectLinks)
    assert gateway.state.links.rewrite(dataset, caller="billing-service", base_url=gateway.url) == dataset
    # Nor does it serve download URLs: it gives none (here, one a gateway in gateway mode signed).
    other = await start(download_config(upstream, storage))
    answer = await http(signed(other, storage).replace(other.url, gateway.url), key=None)
    assert_error(answer, 403, "download_url_invalid")
    assert upstream.count() == 0


async def test_a_url_signed_by_one_replica_works_on_another_sharing_its_redis(
    start: GatewayFactory, upstream: Upstream, storage: Storage, redis_server: RedisServer
) -> None:
    serve_datasets(upstream, storage)
    redis = {"url": redis_server.url, "key_prefix": f"downloads-{secrets.token_hex(4)}:"}
    first = await start(download_config(upstream, storage, redis=redis))
    second = await start(download_config(upstream, storage, redis=redis))
    alone = await start(download_config(upstream, storage))

    url = signed(first, storage)
    answer = await http(url.replace(first.url, second.url), key=None)

    assert (answer.status, answer.body) == (200, storage.files[f"{DATASET_ID}.avro"])
    # A process with a key of its own (no Redis, none configured) refuses it.
    assert_error(await http(url.replace(first.url, alone.url), key=None), 403, "download_url_invalid")
    # The key in Redis is the one both sign with.
    client = redis_server.client()
    try:
        stored = await client.get(f"{redis['key_prefix']}datasets:url-signing-key")
    finally:
        await client.aclose()
    assert stored is not None
    assert isinstance(first.state.links, SignedLinks)
    assert first.state.links.keys.current == bytes.fromhex(stored.decode())


async def test_a_configured_signing_key_signs_urls_that_every_process_configured_with_it_accepts(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    serve_datasets(upstream, storage)
    key = {"url_signing_key": "k" * 40}
    first = await start(download_config(upstream, storage, datasets=key))
    second = await start(download_config(upstream, storage, datasets=key))

    answer = await http(signed(first, storage).replace(first.url, second.url), key=None)

    assert answer.status == 200


# ---------------------------------------------------------------------------
# Streaming: a slow caller slows the read; a cut from storage reaches the caller
# ---------------------------------------------------------------------------

BIG = 256 * 1024 * 1024


async def plateau(read: Callable[[], int], polls: int = 10, every_s: float = 0.05, within_s: float = 20.0) -> int:
    """``read()`` once it has stopped changing for ``polls`` polls in a row (bounded by ``within_s``)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within_s
    last, same = read(), 0
    while same < polls and loop.time() < give_up:
        await asyncio.sleep(every_s)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return last


async def test_a_caller_that_stops_reading_stops_the_read_from_storage(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    storage.streamed[f"{DATASET_ID}.avro"] = BIG
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    url = signed(gateway, storage)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        path = url.removeprefix(gateway.url)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert f"Content-Length: {BIG}".encode() in head

        held = await plateau(lambda: storage.written)

        # Held back by the caller: what sits in socket buffers and the gateway's reader, a few MiB, not the file.
        assert held < 32 * 1024 * 1024, held
        received = 0
        while received < BIG:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert chunk
            received += len(chunk)
        assert received == BIG
    finally:
        writer.close()


async def test_a_part_cut_short_by_storage_reaches_the_caller_as_a_cut_connection_not_a_whole_file(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    storage.streamed[f"{DATASET_ID}.avro"] = 4 * 1024 * 1024
    storage.cut_after = 1024 * 1024
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        path = signed(gateway, storage).removeprefix(gateway.url)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
        received = 0
        for _ in range(10_000):  # bounded: ends when the gateway closes the connection
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
            if not chunk:
                break
            received += len(chunk)
    finally:
        writer.close()

    assert received < 4 * 1024 * 1024
    assert registry_value(gateway, "gateway_downloads_total", caller="billing-service", outcome="storage_failed") == 1


async def test_a_caller_that_hangs_up_mid_part_ends_the_read_from_storage_with_no_error_logged(
    start: GatewayFactory, upstream: Upstream, storage: Storage, logs: LogCapture
) -> None:
    storage.streamed[f"{DATASET_ID}.avro"] = BIG
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    path = signed(gateway, storage).removeprefix(gateway.url)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
    await asyncio.wait_for(reader.readexactly(1 << 20), 10)
    writer.transport.abort()

    def counted() -> bool:
        return registry_value(gateway, "gateway_downloads_total", caller="billing-service", outcome="client_gone") == 1

    assert await eventually(counted)
    assert await plateau(lambda: storage.written) < BIG
    # (The test's storage host may log its own write cut short; the gateway logs no error.)
    gateway_lines = [e for e in logs.events() if e["logger"].startswith("gateway")]
    assert not [e for e in gateway_lines if e["level"] in ("error", "critical")]
    gateway.state.access_log.flush()
    [line] = [e for e in logs.events("gateway.access") if "/parts/" in (e.get("path") or "")]
    assert line["status"] == 200


async def test_a_caller_that_stops_reading_is_cut_off_and_the_storage_connection_is_let_go(
    start: GatewayFactory, upstream: Upstream, storage: Storage
) -> None:
    storage.streamed[f"{DATASET_ID}.avro"] = BIG
    serve_datasets(upstream, storage)
    gateway = await start(download_config(upstream, storage, datasets={"upload_idle_timeout_s": 0.5}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        path = signed(gateway, storage).removeprefix(gateway.url)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        # ...and reads nothing more: the socket buffers fill, and the gateway's writes wait.

        # The storage host sees its answer end (the gateway let its connection go), well before the part is sent.
        assert await eventually(lambda: storage.ended == 1)
        assert storage.written < BIG
        assert registry_value(gateway, "gateway_downloads_total", caller="billing-service", outcome="client_gone") == 1
    finally:
        writer.transport.abort()
    # Another download still works.
    storage.files[f"{DATASET_ID}.avro"] = avro_bytes(ROWS)
    del storage.streamed[f"{DATASET_ID}.avro"]
    answer = await http(signed(gateway, storage), key=None)
    assert (answer.status, answer.body) == (200, storage.files[f"{DATASET_ID}.avro"])
