"""Webhooks through faults (docs/design.md §12, "Webhooks"): the gateway killed mid-delivery, its config checked.

The gateway runs as ``python -m gateway`` in a child process; its events
come from what it relays (each new batch a caller retrieves while it is
active is one event), and a receiver in this process verifies every
signature with the ``standardwebhooks`` library.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.events.base import decode_cursor
from tests.conftest import ProcessFactory
from tests.redis_server import RedisServer
from tests.support import (
    BILLING_KEY,
    PROCESS_WAIT_S,
    GatewayProcess,
    http,
    process_config,
    scrape_metrics,
    write_config,
)
from tests.test_config import run_cli
from tests.test_demo_isolation import start_demo
from tests.test_new_caller import printed_key
from tests.upstream import Upstream, json_handler
from tests.webhook_kit import Delivery, Receiver, new_secret, subjects

# The gateway under test runs in child processes (on uvloop whatever the test's loop): one loop is enough.
pytestmark = pytest.mark.one_loop

Receivers = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Receivers]:
    made: list[Receiver] = []

    async def _make(secrets: list[str], behaviour: Any = None) -> Receiver:
        receiver = Receiver(list(secrets)) if behaviour is None else Receiver(list(secrets), behaviour)
        made.append(await receiver.start())
        return receiver

    yield _make
    for receiver in made:
        await receiver.close()


async def see_batches(gateway: GatewayProcess, ids: list[str], key: str = BILLING_KEY) -> None:
    """Retrieve each batch through the gateway: each, new and active, becomes one event."""
    for batch_id in ids:
        assert (await http(f"{gateway.url}/v2/batches/{batch_id}", key=key)).status == 200


async def appended(gateway: GatewayProcess, count: int) -> bool:
    """Whether the gateway's log has ``count`` events (sightings are recorded off the request path)."""

    async def total() -> float:
        _, samples = await scrape_metrics(gateway.url)
        return sum(v for (name, _labels), v in samples.items() if name == "gateway_events_total")

    give_up = asyncio.get_running_loop().time() + PROCESS_WAIT_S
    while await total() < count:
        if asyncio.get_running_loop().time() > give_up:
            return False
        await asyncio.sleep(0.05)
    return True


def seqs(deliveries: list[Delivery]) -> list[int]:
    return [decode_cursor(d.id, log_id_of(d.id)) for d in deliveries]


def log_id_of(cursor: str) -> str:
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().rpartition(".")[0]


def webhook_config(upstream_url: str, receiver_url: str, secret: str, **events: Any) -> dict[str, Any]:
    return process_config(
        upstream_url,
        callers=[
            {"name": "billing-service", "key": BILLING_KEY, "webhook": {"url": receiver_url, "secrets": [secret]}}
        ],
        events={"webhook_timeout_s": 5, "webhook_retry_s": [0.2], **events},
    )


async def test_a_gateway_killed_mid_delivery_resends_only_the_event_in_flight_after_a_restart(
    tmp_path: Path, upstream: Upstream, gateway_process: ProcessFactory, receiver_factory: Receivers
) -> None:
    upstream.script(json_handler())
    secret = new_secret()
    answer: dict[str, int | None] = {"next": 204}

    def until_told(delivery: Delivery) -> int | None:
        # The fifth request hangs: it is in flight when the gateway is killed.
        return None if len(receiver.got) == 4 and answer["next"] == 204 and "killed" not in answer else answer["next"]

    receiver = await receiver_factory([secret], until_told)
    path = write_config(tmp_path / "config.yaml", webhook_config(upstream.url, receiver.url, secret))
    first = await gateway_process(path)
    await first.wait_for_event("webhook delivering")
    ids = [f"batch-{n}" for n in range(10)]
    await see_batches(first, ids)
    assert await appended(first, 10)  # every event is in the store before the kill
    await receiver.wait_for(lambda got: len(got) == 5)

    first.proc.send_signal(signal.SIGKILL)
    await first.exit_code(15)
    answer["killed"] = 1
    second = await gateway_process(path)
    got = await receiver.wait_distinct(10)

    assert sorted(subjects(got)) == sorted(ids)  # nothing lost
    assert seqs(got) == sorted(seqs(got))  # in order
    assert len(receiver.got) - len({d.id for d in receiver.got}) <= 1  # at most the one in flight, twice
    assert all(d.verified_by == [secret] for d in receiver.got)
    assert second.proc.returncode is None


async def test_new_caller_with_a_webhook_prints_a_secret_that_the_receiver_verifies(
    tmp_path: Path, upstream: Upstream, gateway_process: ProcessFactory, receiver_factory: Receivers
) -> None:
    upstream.script(json_handler())
    receiver = await receiver_factory([])
    made = run_cli("new-caller", "nightly-jobs", "--webhook", receiver.url)
    assert made.returncode == 0, made.stderr
    secret = next(line.strip() for line in made.stdout.splitlines() if line.strip().startswith("whsec_"))
    receiver.secrets.append(secret)
    key = printed_key(made.stdout)
    pasted = made.stdout[made.stdout.index("  - name: ") :]
    raw = process_config(upstream.url, events={"webhook_retry_s": [0.2]})
    raw.pop("callers")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw) + "callers:\n" + pasted, encoding="utf-8")
    assert yaml.safe_load(path.read_text())["callers"][0]["webhook"] == {"url": receiver.url, "secrets": [secret]}
    checked = run_cli("--check-config", "--config", str(path))
    assert checked.returncode == 0, checked.stderr

    gateway = await gateway_process(path)
    await gateway.wait_for_event("webhook delivering")
    await see_batches(gateway, ["batch-a"], key=key)
    got = await receiver.wait_delivered(1)
    assert got[0].verified_by == [secret]
    assert got[0].event["type"] == "batch.in_progress"
    assert secret not in gateway.text  # the secret is never logged


def test_check_config_names_each_bad_webhook_url_and_secret_by_its_place(tmp_path: Path) -> None:
    good, short = new_secret(), "whsec_c2hvcnQ="
    raw = process_config(
        "http://127.0.0.1:9",
        callers=[
            {"name": "a", "key_sha256": "ab" * 32, "webhook": {"url": "ftp://x/y", "secrets": [good, short]}},
            {"name": "b", "key_sha256": "cd" * 32, "webhook": {"url": "https://u:p@x/y", "secrets": ["plain"]}},
            {"name": "c", "key_sha256": "ef" * 32, "webhook": {"url": "https://ok.example/y", "secrets": []}},
            {"name": "d", "key_sha256": "fa" * 32, "webhook": {"url": "https://ok.example/y", "secrets": [good]}},
            {"name": "e", "key_sha256": "12" * 32, "webhook": {"url": "http://:8080/hooks", "secrets": [good]}},
            {"name": "f", "key_sha256": "34" * 32, "webhook": {"url": "https://-/hooks", "secrets": [good]}},
            {"name": "g", "key_sha256": "56" * 32, "webhook": {"url": "https://ok.example:99999/", "secrets": [good]}},
            {"name": "h", "key_sha256": "78" * 32, "webhook": {"url": "http://[::1]:8080/h", "secrets": [good]}},
        ],
        events={"webhook_retry_s": [], "webhook_max_in_flight": 0},
    )
    result = run_cli("--check-config", "--config", str(write_config(tmp_path / "config.yaml", raw)))

    assert result.returncode == 2
    problems = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert [p.split(":")[0] for p in problems] == [
        "events.webhook_retry_s",
        "events.webhook_max_in_flight",
        "callers.0.webhook.url",
        "callers.0.webhook.secrets.1",
        "callers.1.webhook.url",
        "callers.1.webhook.secrets.0",
        "callers.2.webhook.secrets",
        "callers.4.webhook.url",
        "callers.5.webhook.url",
        "callers.6.webhook.url",
    ]
    assert "must name a host" in result.stderr
    assert "24 to 64 bytes" in result.stderr
    assert "starts with whsec_" in result.stderr
    assert "Traceback" not in result.stderr
    for secret in (good, short, "u:p"):
        assert secret not in result.stderr + result.stdout


async def first_holder(gateways: list[GatewayProcess]) -> GatewayProcess:
    """The replica that logs ``webhook delivering`` first: it holds the caller's lease."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PROCESS_WAIT_S
    while loop.time() < give_up:
        for gateway in gateways:
            if any(e["event"] == "webhook delivering" for e in gateway.events):
                return gateway
        await asyncio.sleep(0.05)
    raise AssertionError("no replica started delivering")


async def test_two_replicas_on_redis_deliver_each_event_once_and_the_lease_moves_when_its_holder_dies(
    tmp_path: Path,
    upstream: Upstream,
    gateway_process: ProcessFactory,
    receiver_factory: Receivers,
    redis_server: RedisServer,
) -> None:
    upstream.script(json_handler())
    secret = new_secret()
    receiver = await receiver_factory([secret])
    replicas = []
    for number in range(2):
        raw = webhook_config(upstream.url, receiver.url, secret, webhook_timeout_s=1)
        raw["redis"] = {"url": redis_server.url, "timeout_s": 1, "probe_interval_s": 0.1}
        replicas.append(await gateway_process(write_config(tmp_path / f"replica-{number}.yaml", raw)))
    holder = await first_holder(replicas)
    other = next(r for r in replicas if r is not holder)

    ids = [f"batch-{n}" for n in range(10)]
    for number, batch_id in enumerate(ids):  # seen through either replica: one event each, in one log
        await see_batches(replicas[number % 2], [batch_id])
    got = await receiver.wait_delivered(10)
    assert sorted(subjects(got)) == sorted(ids)
    assert len(receiver.got) == 10  # each once, by one replica
    assert not any(e["event"] == "webhook delivering" for e in other.events)

    holder.proc.send_signal(signal.SIGKILL)
    await holder.exit_code(15)
    later = [f"batch-later-{n}" for n in range(5)]
    await see_batches(other, later)
    await other.wait_for_event("webhook delivering")  # the lease lapsed (3 x webhook_timeout_s + 1) and moved
    # The last event before the kill may come again (its 2xx can beat the position's write): once at most.
    got = await receiver.wait_distinct(15)

    assert set(subjects(got)) == set(ids + later)
    assert seqs(got) == sorted(seqs(got))
    assert len(receiver.got) - len({d.id for d in receiver.got}) <= 1
    assert all(d.verified_by == [secret] for d in receiver.got)


async def test_the_demo_sends_webhooks_to_a_local_receiver_signed_with_the_secret_its_banner_prints(
    tmp_path: Path, receiver_factory: Receivers
) -> None:
    receiver = await receiver_factory([])
    config = write_config(tmp_path / "config.yaml", {"upstream": {"token": "unused-in-the-demo"}, "callers": []})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "COHERE_"))}
    demo = await start_demo(config, env, "--port", "0", "--demo-webhook", receiver.url)
    try:
        assert demo.process.stdout is not None
        line = (await asyncio.wait_for(demo.process.stdout.readline(), PROCESS_WAIT_S)).decode()
        while not line.startswith("Webhooks:"):
            line = (await asyncio.wait_for(demo.process.stdout.readline(), PROCESS_WAIT_S)).decode()
            assert line, "the demo printed no webhook line"
        secret = re.search(r"signed with (whsec_\S+)", line)
        assert secret is not None
        assert receiver.url in line
        receiver.secrets.append(secret.group(1))
        # The webhook took its position when the demo started, before the banner: this batch is after it.
        created = await http(
            f"{demo.url}/v2/batches",
            method="POST",
            key=demo.keys["demo-billing"],
            headers={"Content-Type": "application/json"},
            data=json.dumps({"name": "nightly", "input_dataset_id": "ds", "model": "m"}).encode(),
        )
        assert created.status == 200
        got = await receiver.wait_distinct(1)
        assert got[0].verified_by == [secret.group(1)]
        assert got[0].event["data"]["batch"]["id"] == created.document["batch"]["id"]
    finally:
        code, logged_text = await demo.stop()
    assert code == 0
    assert secret.group(1) not in logged_text


def test_demo_webhook_without_demo_is_refused(tmp_path: Path) -> None:
    result = run_cli("--demo-webhook", "http://127.0.0.1:9/hooks", "--config", str(tmp_path / "none.yaml"))
    assert result.returncode == 2
    assert "--demo-webhook goes with --demo" in result.stderr
