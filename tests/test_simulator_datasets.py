"""The simulated upstream serves Cohere's dataset routes (docs/design.md §11) and the whole batch job with them.

The cohere SDK is pointed straight at the simulator (no gateway): upload a
JSONL file, ``co.wait`` for it, run a batch on it, ``save_dataset`` its
output. aiohttp checks what the SDK hides: the exact fields of the objects,
the storage route's signed URLs (Range, expiry, no Authorization), refusals
and a large upload streamed to disk. The last tests drive the fake upstream
of the test suite (tests/upstream.py), which mounts the same routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import cohere
import pytest
from cohere.batches import Batch
from cohere.types import Dataset, DatasetPart

from gateway.demo.simulator import Simulator, start_simulator
from tests.support import UPSTREAM_TOKEN, FakeClock, eventually, http, sdk
from tests.upstream import Upstream

ROWS = [{"custom_id": f"row-{n}", "body": {"texts": [f"text {n}"], "model": "embed-v4.0"}} for n in range(7)]
CHAT_ROWS = [
    {"custom_id": f"chat-{n}", "body": {"messages": [{"role": "user", "content": f"hi {n}"}]}} for n in range(3)
]
MiB = 1 << 20

MakeSim = Callable[..., Awaitable[Simulator]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_sim(clock: FakeClock) -> AsyncIterator[MakeSim]:
    """Start simulators on the test's clock (validation at once unless ``validation_s`` says otherwise)."""
    runners: list[Any] = []

    async def make(**options: Any) -> Simulator:
        simulator = Simulator(token=UPSTREAM_TOKEN, lifetime_s=20, clock=clock, **{"validation_s": 0.0, **options})
        runner, _url = await start_simulator(simulator)
        runners.append(runner)
        return simulator

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def sim(make_sim: MakeSim) -> Simulator:
    return await make_sim()


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def write_jsonl(tmp_path: Path, content: bytes, name: str = "input.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


async def upload(
    simulator: Simulator, tmp_path: Path, content: bytes, kind: str = "batch-embed-v2-input", **options: Any
) -> str:
    """An upload with the SDK; the new dataset's id."""
    with write_jsonl(tmp_path, content).open("rb") as data:
        made = await sdk(simulator.url, key=simulator.token).datasets.create(
            name="nightly input", type=kind, data=data, **options
        )
    assert made.id is not None
    return made.id


async def get_document(simulator: Simulator, dataset_id: str) -> dict[str, Any]:
    answer = await http(f"{simulator.url}/v1/datasets/{dataset_id}", key=simulator.token)
    assert answer.status == 200, answer.body
    dataset: dict[str, Any] = answer.document["dataset"]
    return dataset


async def saved_rows(dataset: Dataset, tmp_path: Path) -> list[dict[str, Any]]:
    """The rows ``co.utils.save_dataset`` writes (it fetches the part URLs with requests, off the loop)."""
    target = tmp_path / f"saved-{dataset.id}.jsonl"
    await asyncio.to_thread(cohere.utils.SdkUtils.save_dataset, dataset, str(target))
    return [json.loads(line) for line in target.read_text().splitlines()]


def schema_keys(model: type[Any]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


# --- the SDK's whole job ------------------------------------------------------------------------------------------


async def test_the_sdk_uploads_a_jsonl_file_waits_for_it_and_reads_its_rows_back(
    sim: Simulator, tmp_path: Path
) -> None:
    co = sdk(sim.url, key=sim.token)
    dataset_id = await upload(sim, tmp_path, jsonl(ROWS))
    waited = await co.wait(cohere.DatasetsCreateResponse(id=dataset_id))
    dataset = waited.dataset
    assert (dataset.id, dataset.name, dataset.dataset_type) == (dataset_id, "nightly input", "batch-embed-v2-input")
    assert (dataset.validation_status, dataset.validation_error) == ("validated", None)
    assert dataset.dataset_parts is not None
    assert sum(part.num_rows or 0 for part in dataset.dataset_parts) == len(ROWS)
    saved = await saved_rows(dataset, tmp_path)
    assert [(row["custom_id"], json.loads(row["body"])) for row in saved] == [(r["custom_id"], r["body"]) for r in ROWS]
    listed = await co.datasets.list()
    assert [d.id for d in listed.datasets or []] == [dataset_id]
    usage = await co.datasets.get_usage()
    assert usage.organization_usage == len(jsonl(ROWS))
    await co.datasets.delete(id=dataset_id)
    assert (await co.datasets.get_usage()).organization_usage == 0
    with pytest.raises(cohere.NotFoundError):
        await co.datasets.get(id=dataset_id)


@pytest.mark.parametrize(
    ("kind", "rows", "field"),
    [("batch-embed-v2-input", ROWS, "embedding"), ("batch-chat-v2-input", CHAT_ROWS, "response")],
)
async def test_a_completed_batch_has_an_output_dataset_with_one_row_per_input_row(
    sim: Simulator, clock: FakeClock, tmp_path: Path, kind: str, rows: list[dict[str, Any]], field: str
) -> None:
    co = sdk(sim.url, key=sim.token)
    dataset_id = await upload(sim, tmp_path, jsonl(rows), kind)
    created = await co.batches.create(request=Batch(name="nightly", input_dataset_id=dataset_id, model="m"))
    batch = created.batch
    assert batch is not None
    assert batch.id is not None
    assert (batch.num_records, batch.output_dataset_id) == (len(rows), None)
    clock.advance(21)  # past the batch's lifetime
    done = (await co.batches.retrieve(id=batch.id)).batch
    assert done is not None
    assert done.status == "BATCH_STATUS_COMPLETED"
    assert done.output_dataset_id
    output = (await co.datasets.get(id=done.output_dataset_id)).dataset
    assert (output.validation_status, output.dataset_type) == ("validated", kind.replace("-input", "-output"))
    saved = await saved_rows(output, tmp_path)
    assert [row["custom_id"] for row in saved] == [row["custom_id"] for row in rows]
    for row in saved:
        assert set(row) == {"custom_id", field}
        assert row[field]
    if field == "embedding":
        assert all(isinstance(value, float) for row in saved for value in row["embedding"])


async def test_a_batch_on_a_dataset_it_never_saw_names_an_output_all_along_as_before(sim: Simulator) -> None:
    created = await sdk(sim.url, key=sim.token).batches.create(
        request=Batch(name="nightly", input_dataset_id="uploaded-elsewhere", model="m")
    )
    assert created.batch is not None
    assert created.batch.output_dataset_id == f"{created.batch.id}-output"


async def test_a_batch_may_not_read_a_dataset_that_failed_or_is_not_an_input(sim: Simulator, tmp_path: Path) -> None:
    co = sdk(sim.url, key=sim.token)
    failed = await upload(sim, tmp_path, b"not json\n")
    other = await upload(sim, tmp_path, b"text\n", "embed-input")
    for dataset_id in (failed, other):
        await co.datasets.get(id=dataset_id)  # validation over
        with pytest.raises(cohere.BadRequestError, match=dataset_id):
            await co.batches.create(request=Batch(name="n", input_dataset_id=dataset_id, model="m"))


# --- validation ---------------------------------------------------------------------------------------------------


async def test_validation_goes_queued_processing_then_validated_over_its_time(
    make_sim: MakeSim, clock: FakeClock, tmp_path: Path
) -> None:
    slow = await make_sim(validation_s=8.0)
    dataset_id = await upload(slow, tmp_path, jsonl(ROWS))
    seen = []
    for step in (0.0, 3.0, 6.0):
        clock.advance(step)
        dataset = await get_document(slow, dataset_id)
        seen.append((dataset["validation_status"], dataset["updated_at"], len(dataset["dataset_parts"])))
    statuses = [status for status, _, _ in seen]
    assert statuses == ["queued", "processing", "validated"]
    assert len({stamp for _, stamp, _ in seen}) == 3  # updated_at moves with the status
    assert [parts for _, _, parts in seen] == [0, 0, 1]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (jsonl(ROWS[:2]) + b"{not json\n", "line 3: not valid JSON"),
        (jsonl(ROWS[:1]) + b'{"body": {}}\n', "line 2: custom_id must be a non-empty string"),
        (b'{"custom_id": "a", "body": "text"}\n', "line 1: body must be a JSON object"),
        (b"[1, 2]\n", "line 1: expected a JSON object"),
        (jsonl(ROWS[:1]) + b"\n" + b"x" * (MiB + 10) + b"\n", "line 3: longer than"),
        (b"\n\n", "the file holds no rows"),
    ],
)
async def test_a_bad_row_fails_the_dataset_naming_its_line(
    sim: Simulator, tmp_path: Path, content: bytes, named: str
) -> None:
    dataset_id = await upload(sim, tmp_path, content)
    with pytest.raises(Exception, match=named):
        await sdk(sim.url, key=sim.token).wait(cohere.DatasetsCreateResponse(id=dataset_id))
    dataset = await get_document(sim, dataset_id)
    assert dataset["validation_status"] == "failed"
    assert named in dataset["validation_error"]
    assert dataset["dataset_parts"] == []


async def test_with_skip_malformed_input_bad_lines_are_skipped_and_named_in_warnings(
    sim: Simulator, tmp_path: Path
) -> None:
    content = jsonl(ROWS[:2]) + b"{not json\n" + b"y" * (MiB + 5) + b"\n" + jsonl(ROWS[2:3])
    dataset_id = await upload(sim, tmp_path, content, skip_malformed_input=True)
    dataset = (await sdk(sim.url, key=sim.token).wait(cohere.DatasetsCreateResponse(id=dataset_id))).dataset
    assert dataset.validation_warnings == ["line 3: not valid JSON", f"line 4: longer than {MiB} bytes"]
    assert dataset.dataset_parts is not None
    rows = await saved_rows(dataset, tmp_path)
    assert [row["custom_id"] for row in rows] == ["row-0", "row-1", "row-2"]


async def test_a_type_the_demo_does_not_parse_ends_skipped(sim: Simulator, tmp_path: Path) -> None:
    dataset_id = await upload(sim, tmp_path, b"some,csv\n", "embed-input")
    assert (await get_document(sim, dataset_id))["validation_status"] == "skipped"


# --- the objects, exactly as Cohere's schemas ---------------------------------------------------------------------


async def test_every_dataset_object_has_exactly_the_fields_and_types_of_cohere_s_schema(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    kept = await upload(sim, tmp_path, jsonl(ROWS), keep_original_file=True, keep_fields="custom_id")
    failed = await upload(sim, tmp_path, b"oops\n")
    created = await sdk(sim.url, key=sim.token).batches.create(
        request=Batch(name="n", input_dataset_id=kept, model="m")
    )
    assert created.batch is not None
    clock.advance(21)
    output = f"{created.batch.id}-output"
    assert (await http(f"{sim.url}/v2/batches/{created.batch.id}", key=sim.token)).document["batch"][
        "output_dataset_id"
    ] == output
    listed = (await http(f"{sim.url}/v1/datasets", key=sim.token)).document["datasets"]
    documents = [await get_document(sim, dataset_id) for dataset_id in (kept, failed, output)] + listed
    for document in documents:
        assert set(document) == schema_keys(Dataset)
        parsed = Dataset.model_validate(document)
        assert parsed.model_extra == {}
        assert isinstance(document["created_at"], str)
        assert document["created_at"].endswith("Z")
        for part in document["dataset_parts"]:
            assert set(part) == schema_keys(DatasetPart)
            assert DatasetPart.model_validate(part).model_extra == {}
    kept_document = await get_document(sim, kept)
    assert kept_document["preserve_fields"] == ["custom_id"]
    assert kept_document["dataset_parts"][0]["original_url"]


async def test_a_batch_on_an_uploaded_dataset_has_exactly_the_fields_of_cohere_s_batch(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    dataset_id = await upload(sim, tmp_path, jsonl(ROWS))
    body = json.dumps({"name": "n", "input_dataset_id": dataset_id, "model": "m"}).encode()
    created = (await http(f"{sim.url}/v2/batches", method="POST", key=sim.token, data=body)).document["batch"]
    clock.advance(21)
    done = (await http(f"{sim.url}/v2/batches/{created['id']}", key=sim.token)).document["batch"]
    fields = schema_keys(Batch)
    assert set(created) == fields - {"output_dataset_id"}  # none yet, as upstream
    assert set(done) == fields
    for batch in (created, done):
        assert Batch.model_validate(batch).model_extra == {}
    assert (done["status"], done["num_records"], done["num_successful_records"]) == ("BATCH_STATUS_COMPLETED", 7, 7)


async def test_the_kept_original_file_downloads_as_it_was_uploaded(sim: Simulator, tmp_path: Path) -> None:
    dataset_id = await upload(sim, tmp_path, jsonl(ROWS), keep_original_file=True)
    original = (await get_document(sim, dataset_id))["dataset_parts"][0]["original_url"]
    answer = await http(original, key=None)
    assert (answer.status, answer.body) == (200, jsonl(ROWS))


# --- list, delete, usage ------------------------------------------------------------------------------------------


async def test_list_filters_by_type_status_and_time_and_pages_by_limit_and_offset(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    embed = await upload(sim, tmp_path, jsonl(ROWS))
    clock.advance(10)
    chat = await upload(sim, tmp_path, jsonl(CHAT_ROWS), "batch-chat-v2-input")
    clock.advance(10)
    broken = await upload(sim, tmp_path, b"nope\n")
    chat_created = (await get_document(sim, chat))["created_at"]

    async def listed(query: str) -> list[str]:
        answer = await http(f"{sim.url}/v1/datasets?{query}", key=sim.token)
        assert answer.status == 200, answer.body
        return [dataset["id"] for dataset in answer.document["datasets"]]

    assert await listed("") == [broken, chat, embed]  # newest first
    assert await listed("datasetType=batch-chat-v2-input") == [chat]
    assert await listed("validationStatus=failed") == [broken]
    assert await listed(f"before={chat_created}") == [embed]
    assert await listed(f"after={chat_created}") == [broken]
    assert await listed("limit=1&offset=1") == [chat]
    for bad in ("limit=x", "offset=-1", "before=yesterday"):
        assert (await http(f"{sim.url}/v1/datasets?{bad}", key=sim.token)).status == 400


async def test_a_deleted_dataset_is_gone_with_its_parts(sim: Simulator, tmp_path: Path) -> None:
    dataset_id = await upload(sim, tmp_path, jsonl(ROWS))
    url = (await get_document(sim, dataset_id))["dataset_parts"][0]["url"]
    deleted = await http(f"{sim.url}/v1/datasets/{dataset_id}", method="DELETE", key=sim.token)
    assert (deleted.status, deleted.document) == (200, {})
    assert (await http(f"{sim.url}/v1/datasets/{dataset_id}", key=sim.token)).status == 404
    assert (await http(f"{sim.url}/v1/datasets/{dataset_id}", method="DELETE", key=sim.token)).status == 404
    assert (await http(url, key=None)).status == 404
    assert not list(sim.datasets.directory.iterdir())


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/datasets?name=a&type=batch-embed-v2-input"),
        ("GET", "/v1/datasets"),
        ("GET", "/v1/datasets/usage"),
        ("GET", "/v1/datasets/some-id"),
        ("DELETE", "/v1/datasets/some-id"),
    ],
)
async def test_every_dataset_route_refuses_a_wrong_token(sim: Simulator, method: str, path: str) -> None:
    answer = await http(f"{sim.url}{path}", method=method, key="wrong-token")
    assert answer.status == 401
    assert answer.document == {"message": "invalid api token"}


# --- uploads ------------------------------------------------------------------------------------------------------


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f.jsonl"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
        for name, content in parts
    )
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(
    ("query", "body", "headers", "named"),
    [
        ("name=a&type=batch-embed-v2-input&color=red", *multipart([("data", b"x")]), "unknown parameter(s): color"),
        ("type=batch-embed-v2-input", *multipart([("data", b"x")]), "name is required"),
        ("name=a&type=no-such-type", *multipart([("data", b"x")]), "type must be one of"),
        ("name=a&type=batch-embed-v2-input", b"x", {"Content-Type": "application/json"}, "multipart/form-data"),
        ("name=a&type=batch-embed-v2-input", *multipart([("eval_data", b"x")]), "a data part is required"),
        ("name=a&type=batch-embed-v2-input", *multipart([("other", b"x")]), "unexpected part 'other'"),
        ("name=a&type=batch-embed-v2-input", *multipart([("data", b"x"), ("data", b"y")]), "more than one data"),
        ("name=a&type=batch-embed-v2-input", b"garbage", {"Content-Type": "multipart/form-data"}, "malformed"),
        ("name=a&type=batch-embed-v2-input", b"no boundary here", multipart([])[1], "malformed"),
    ],
)
async def test_an_invalid_upload_is_400_naming_what_is_wrong_and_makes_no_dataset(
    sim: Simulator, query: str, body: bytes, headers: dict[str, str], named: str
) -> None:
    answer = await http(f"{sim.url}/v1/datasets?{query}", method="POST", key=sim.token, headers=headers, data=body)
    assert answer.status == 400, answer.body
    assert named in answer.document["message"]
    assert sim.datasets.datasets == {}
    assert not [path for path in sim.datasets.directory.iterdir()]


async def test_an_upload_over_the_limit_is_413_and_kept_nowhere(make_sim: MakeSim) -> None:
    small = await make_sim()
    small.datasets.max_upload_bytes = 1000
    body, headers = multipart([("data", jsonl(ROWS) * 20)])
    answer = await http(
        f"{small.url}/v1/datasets?name=a&type=batch-embed-v2-input",
        method="POST",
        key=small.token,
        headers=headers,
        data=body,
    )
    assert answer.status == 413
    assert not list(small.datasets.directory.iterdir())


async def test_a_64_mib_upload_streams_to_disk_without_holding_the_body(sim: Simulator) -> None:
    chunk = (b"x" * 1023 + b"\n") * 64  # 64 KiB of lines that are not JSON: validation stops at line 1
    size = 64 * MiB
    boundary = "streamed-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="big.jsonl"\r\n\r\n'.encode()
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(size // len(chunk)):
            digest.update(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    tracemalloc.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{sim.url}/v1/datasets?name=big&type=batch-embed-v2-input",
                data=body(),
                headers={
                    "Authorization": f"Bearer {sim.token}",
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                },
            ) as answer,
        ):
            assert answer.status == 200
            dataset_id = (await answer.json())["id"]
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"the upload held {peak / MiB:.1f} MiB"
    [uploaded] = sim.datasets.uploads
    [part] = uploaded.parts
    assert (uploaded.dataset_id, part.name, part.size, part.sha256) == (dataset_id, "data", size, digest.hexdigest())
    assert uploaded.body_size > size
    dataset = await get_document(sim, dataset_id)
    assert (dataset["validation_status"], dataset["validation_error"]) == ("failed", "line 1: not valid JSON")
    assert [seen.body for seen in sim.seen] == [b"", b""]  # neither the upload nor the GET keeps a body


async def test_a_client_that_leaves_mid_upload_leaves_no_dataset_and_no_file(sim: Simulator) -> None:
    port = int(sim.url.rsplit(":", 1)[1])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head, headers = multipart([("data", b"x" * 50_000)])
    writer.write(
        b"POST /v1/datasets?name=a&type=batch-embed-v2-input HTTP/1.1\r\nHost: sim\r\n"
        + f"Authorization: Bearer {sim.token}\r\nContent-Type: {headers['Content-Type']}\r\n".encode()
        + f"Content-Length: {len(head) * 10}\r\n\r\n".encode()
        + head[:30_000]
    )
    await writer.drain()
    assert await eventually(lambda: any(sim.datasets.directory.iterdir()))  # the body is on its way to disk
    writer.close()
    await writer.wait_closed()
    assert await eventually(lambda: not any(sim.datasets.directory.iterdir()))
    assert sim.datasets.datasets == {}
    assert (await http(f"{sim.url}/v1/datasets", key=sim.token)).document == {"datasets": []}


# --- the storage route --------------------------------------------------------------------------------------------


async def part_url(simulator: Simulator, tmp_path: Path) -> str:
    dataset_id = await upload(simulator, tmp_path, jsonl(ROWS))
    url: str = (await get_document(simulator, dataset_id))["dataset_parts"][0]["url"]
    return url


async def test_a_part_url_serves_the_avro_file_whole_and_by_range_with_no_key(sim: Simulator, tmp_path: Path) -> None:
    url = await part_url(sim, tmp_path)
    whole = await http(url, key=None)
    assert whole.status == 200
    assert whole.body.startswith(b"Obj\x01")  # an Avro object container file
    assert whole.header("Content-Type") == "application/octet-stream"
    assert whole.header("Content-Length") == str(len(whole.body))
    ranged = await http(url, key=None, headers={"Range": "bytes=4-19"})
    assert (ranged.status, ranged.body) == (206, whole.body[4:20])
    assert ranged.header("Content-Range") == f"bytes 4-19/{len(whole.body)}"
    assert ranged.header("Content-Length") == "16"
    assert (await http(url, method="HEAD", key=None)).header("Content-Length") == str(len(whole.body))


async def test_a_part_url_refuses_an_authorization_header_with_400_and_counts_it(
    sim: Simulator, tmp_path: Path
) -> None:
    url = await part_url(sim, tmp_path)
    answer = await http(url, key=sim.token)
    assert answer.status == 400
    assert b"<Code>InvalidArgument</Code>" in answer.body
    assert sim.datasets.authorized_storage_requests == 1


async def test_a_tampered_or_expired_part_url_is_403_as_gcs_answers(
    sim: Simulator, clock: FakeClock, tmp_path: Path
) -> None:
    url = await part_url(sim, tmp_path)
    for tampered in (url.replace("-part-0.avro", "-part-1.avro"), url[:-4] + "0000", url.split("?")[0]):
        answer = await http(tampered, key=None)
        assert answer.status == 403, tampered
        assert b"<Code>SignatureDoesNotMatch</Code>" in answer.body
    clock.advance(sim.datasets.urls.ttl_s + 1)
    expired = await http(url, key=None)
    assert expired.status == 403
    assert b"<Code>ExpiredToken</Code>" in expired.body
    fresh = (await http(f"{sim.url}/v1/datasets", key=sim.token)).document["datasets"][0]["dataset_parts"][0]["url"]
    assert (await http(fresh, key=None)).status == 200


# --- the fake upstream of the test suite mounts the same routes ---------------------------------------------------


async def test_the_fake_upstream_serves_datasets_and_records_uploads_by_size_and_digest(
    upstream: Upstream, tmp_path: Path
) -> None:
    content = jsonl(ROWS)
    body, headers = multipart([("data", content)])
    made = await http(
        f"{upstream.url}/v1/datasets?name=a&type=batch-embed-v2-input", method="POST", headers=headers, data=body
    )
    dataset_id = made.document["id"]
    dataset = (await http(f"{upstream.url}/v1/datasets/{dataset_id}")).document["dataset"]
    assert dataset["validation_status"] == "validated"
    part = await http(dataset["dataset_parts"][0]["url"], key=None)
    assert part.status == 200
    [seen] = upstream.calls("upload")
    assert (seen.body, seen.body_size, seen.data_sha256) == (b"", len(body), hashlib.sha256(content).hexdigest())
    assert [upstream.count(route) for route in ("upload", "dataset", "part")] == [1, 1, 1]
    assert "Authorization" not in upstream.calls("part")[0].headers
    seeded = upstream.seed_dataset([{"custom_id": "x", "body": "{}"}])
    assert (await http(f"{upstream.url}/v1/datasets/{seeded}")).document["dataset"]["dataset_parts"][0]["num_rows"] == 1


async def test_the_fake_upstream_fails_and_holds_dataset_routes_by_name(upstream: Upstream) -> None:
    body, headers = multipart([("data", jsonl(ROWS))])
    upstream.fail("upload", 503, times=1)
    url = f"{upstream.url}/v1/datasets?name=a&type=batch-embed-v2-input"
    assert (await http(url, method="POST", headers=headers, data=body)).status == 503
    assert upstream.datasets.datasets == {}
    release = upstream.hold("dataset_usage")
    usage = asyncio.create_task(http(f"{upstream.url}/v1/datasets/usage"))
    await upstream.arrival("dataset_usage")
    assert not usage.done()
    release.set()
    assert (await usage).document == {"organization_usage": 0}
