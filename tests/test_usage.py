"""Usage per caller (docs/design.md §12, "Usage"): tokens and records of finished batches, once each, and the report.

Real gateways in front of the fake upstream; the report is the real
``cohere-gateway usage`` command run as a child process.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import cohere

from gateway.events.usage import COLUMNS, Tally
from gateway.events.usage_redis import RedisUsage
from gateway.events.usage_sqlite import SqliteUsage
from tests.conftest import GatewayFactory, OpenLink
from tests.redis_server import RedisServer
from tests.support import (
    PROCESS_WAIT_S,
    FakeClock,
    fresh_store_path,
    make_config,
    raw_config,
    scrape_metrics,
    sdk,
    write_config,
)
from tests.test_follower import INTERVAL_S, newest_seq, next_events
from tests.upstream import ACTIVE, Upstream, write_callers

COMPLETED = "BATCH_STATUS_COMPLETED"
CANCELED = "BATCH_STATUS_CANCELED"


async def usage_command(*args: str) -> tuple[int, str, str]:
    """``python -m gateway usage ARGS``: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "usage",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), PROCESS_WAIT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def config_file(tmp_path: Path, store: str, base_url: str = "http://127.0.0.1:9") -> Path:
    return write_config(tmp_path / "config.yaml", raw_config(base_url, store={"path": store}))


async def test_a_finished_batch_counts_for_its_owner_and_model_once_across_a_restart(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path
) -> None:
    store = fresh_store_path()
    config = make_config(
        upstream.url, store={"path": store}, callers=write_callers(), events={"interval_s": INTERVAL_S}
    )
    gateway = await start(config)
    created = await sdk(gateway.url).batches.create(
        request=cohere.Batch(name="nightly", input_dataset_id="ds-1", model="command-a")
    )
    batch_id = created.batch.id
    assert batch_id is not None
    upstream.seed("batch-outside", status=ACTIVE, model="command-r", num_records=4, input_tokens="40")
    await sdk(gateway.url).batches.retrieve("batch-outside")
    seen = await newest_seq(gateway)
    upstream.batches[batch_id].update(num_records=10, input_tokens="1200", output_tokens="300")
    upstream.set_status(batch_id, COMPLETED)
    upstream.set_status("batch-outside", CANCELED)
    finished = await next_events(gateway, seen, 2)
    assert {e.type for e in finished} == {"batch.completed", "batch.canceled"}
    assert gateway.state.sightings is not None
    await gateway.state.sightings.drained()
    _, samples = await scrape_metrics(gateway.url)
    mine = {"caller": "billing-service", "model": "command-a"}
    assert samples[("gateway_batch_tokens_total", frozenset({**mine, "kind": "input"}.items()))] == 1200
    assert samples[("gateway_batch_tokens_total", frozenset({**mine, "kind": "output"}.items()))] == 300
    assert samples[("gateway_batches_finished_total", frozenset({**mine, "status": "completed"}.items()))] == 1
    outside = {"caller": "-", "model": "command-r", "status": "canceled"}
    assert samples[("gateway_batches_finished_total", frozenset(outside.items()))] == 1
    await gateway.stop()

    restarted = await start(config)
    assert restarted.state.usage is not None
    for event in finished:  # the same events once more (a replay, another replica): nothing is added
        await restarted.state.usage.count(event)
    await sdk(restarted.url).batches.retrieve(batch_id)
    text, _ = await scrape_metrics(restarted.url)
    assert "gateway_batches_finished_total{" not in text
    await restarted.stop()

    code, out, err = await usage_command("--config", str(config_file(tmp_path, store)), "--format", "json")
    assert code == 0, err
    assert json.loads(out) == [
        {
            "caller": "-",
            "model": "command-r",
            "batches_completed": 0,
            "batches_failed": 0,
            "batches_canceled": 1,
            "records": 4,
            "input_tokens": 40,
            "output_tokens": 0,
        },
        {
            "caller": "billing-service",
            "model": "command-a",
            "batches_completed": 1,
            "batches_failed": 0,
            "batches_canceled": 0,
            "records": 10,
            "input_tokens": 1200,
            "output_tokens": 300,
        },
    ]


async def test_a_batch_seen_finishing_just_before_a_stop_is_still_counted(
    upstream: Upstream, start: GatewayFactory, tmp_path: Path
) -> None:
    store = fresh_store_path()
    config = make_config(upstream.url, store={"path": store}, callers=write_callers())
    upstream.seed("batch-last-minute", status=ACTIVE, model="command-a", num_records=3, input_tokens="30")
    clock = FakeClock()
    gateway = await start(config, clock=clock)
    await sdk(gateway.url).batches.retrieve("batch-last-minute")
    assert gateway.state.sightings is not None
    await gateway.state.sightings.drained()
    upstream.set_status("batch-last-minute", COMPLETED)
    clock.advance(3600)  # the active answer is stale: the next retrieve asks the upstream and sees the finish
    await sdk(gateway.url).batches.retrieve("batch-last-minute")
    # Stopped at once: the sighting of the finish is still queued (recorded a moment after it is seen).
    await gateway.stop()

    code, out, err = await usage_command("--config", str(config_file(tmp_path, store)), "--format", "json")
    assert code == 0, err
    assert [(row["caller"], row["batches_completed"], row["input_tokens"]) for row in json.loads(out)] == [("-", 1, 30)]


async def kept_usage(store: str) -> None:
    """Three days of usage, as the gateway keeps it."""
    usage = SqliteUsage(store)
    await usage.start()
    try:
        for tally in (
            Tally("b1", "2026-11-30", "billing-service", "command-a", "completed", 10, 1000, 100),
            Tally("b2", "2026-12-01", "billing-service", "command-a", "failed", 5, 500, 0),
            Tally("b3", "2026-12-01", "reporting", "command-r", "completed", 2, 20, 2),
            Tally("b4", "2026-12-02", "billing-service", "command-a", "completed", 1, 7, 3),
        ):
            assert await usage.add(tally)
        assert not await usage.add(Tally("b1", "2026-12-02", "billing-service", "command-a", "completed", 10, 1, 1))
    finally:
        await usage.close()


async def test_the_usage_report_prints_table_csv_and_json_and_filters_by_day(tmp_path: Path) -> None:
    store = fresh_store_path()
    await kept_usage(store)
    config = str(config_file(tmp_path, store))

    code, out, _ = await usage_command("--config", config, "--since", "2026-12-01", "--format", "json")
    assert code == 0
    rows: list[dict[str, Any]] = json.loads(out)
    assert [(r["caller"], r["batches_completed"], r["batches_failed"], r["input_tokens"]) for r in rows] == [
        ("billing-service", 1, 1, 507),
        ("reporting", 1, 0, 20),
    ]

    code, out, _ = await usage_command("--config", config, "--until", "2026-11-30", "--format", "csv")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        [
            "caller",
            "model",
            "batches_completed",
            "batches_failed",
            "batches_canceled",
            "records",
            "input_tokens",
            "output_tokens",
        ],
        ["billing-service", "command-a", "1", "0", "0", "10", "1000", "100"],
    ]

    code, out, _ = await usage_command("--config", config, "--since", "2026-12-01", "--until", "2026-12-01")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == list(COLUMNS)
    assert [line.split() for line in lines[1:]] == [
        ["billing-service", "command-a", "0", "1", "0", "5", "500", "0"],
        ["reporting", "command-r", "1", "0", "0", "2", "20", "2"],
    ]


async def test_the_usage_report_refuses_a_bad_date_with_exit_code_2(tmp_path: Path) -> None:
    config = str(config_file(tmp_path, fresh_store_path()))
    for args in (
        ("--since", "2026-13-01"),
        ("--until", "yesterday"),
        ("--since", "2026-12-02", "--until", "2026-12-01"),
    ):
        code, out, err = await usage_command("--config", config, *args)
        assert code == 2, (args, out, err)
        assert out == ""
        assert "Traceback" not in err
        assert "2026-13-01" in err or "yesterday" in err or "after" in err


async def test_the_usage_report_of_a_gateway_that_never_ran_is_empty(tmp_path: Path) -> None:
    code, out, _ = await usage_command("--config", str(config_file(tmp_path, fresh_store_path())), "--format", "json")
    assert (code, json.loads(out)) == (0, [])


async def test_usage_on_redis_counts_a_batch_once_for_every_replica_and_the_report_reads_it(
    open_link: OpenLink, redis_server: RedisServer, tmp_path: Path
) -> None:
    prefix = "usage-test:"
    links = [await open_link(), await open_link()]  # two processes
    stores = [RedisUsage(link) for link in links]
    for link in links:
        link.prefix = prefix
    tally = Tally("b-redis", "2026-12-05", "billing-service", "command-a", "completed", 10, 1200, 300)
    added = await asyncio.gather(*(store.add(tally) for store in stores))
    assert sorted(added) == [False, True]
    assert await stores[1].add(Tally("b-other", "2026-12-06", "-", "command-r", "canceled", 4, 40, 0))
    assert await stores[0].totals("2026-12-06", None) == [
        {
            "caller": "-",
            "model": "command-r",
            "batches_completed": 0,
            "batches_failed": 0,
            "batches_canceled": 1,
            "records": 4,
            "input_tokens": 40,
            "output_tokens": 0,
        }
    ]
    raw = raw_config("http://127.0.0.1:9", redis={"url": redis_server.url, "key_prefix": prefix})
    path = write_config(tmp_path / "redis.yaml", raw)
    code, out, err = await usage_command("--config", str(path), "--until", "2026-12-05", "--format", "csv")
    assert code == 0, err
    assert out.splitlines()[1:] == ["billing-service,command-a,1,0,0,10,1200,300"]
