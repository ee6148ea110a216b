"""Webhook deliveries (docs/design.md §12, "Webhooks"), against a real receiver that verifies every signature.

The gateway runs in this process, its event log fed with sightings as the
answers it relays would feed it; the receiver is an aiohttp server on
127.0.0.1 that checks each request with the ``standardwebhooks`` library.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.config import GatewayConfig
from gateway.config.features import EventsSettings
from gateway.edge.server import RunningGateway, start_gateway
from gateway.events import webhook_send
from gateway.events.base import EventLog
from gateway.ops.logs import Redactor
from gateway.ops.tasks import cancel_and_wait
from gateway.runtime import build_state, reload_config
from tests.redis_server import RedisServer
from tests.support import (
    UPSTREAM_TOKEN,
    LogCapture,
    eventually,
    fresh_store_path,
    lease_losing_one_cancellation,
    make_config,
    registry_value,
)
from tests.webhook_kit import (
    RECEIVE_WITHIN_S,
    Delivery,
    Receiver,
    batch_sighting,
    dataset_sighting,
    never_accepting,
    new_batches,
    new_secret,
    subjects,
)

BILLING = "billing-service"
# Short retries, so that a test sees several in a second or two.
QUICK_EVENTS = {"webhook_retry_s": [0.2, 0.4, 0.8], "webhook_timeout_s": 1}

Receivers = Callable[..., Awaitable[Receiver]]
Gateways = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Receivers]:
    made: list[Receiver] = []

    async def _make(secrets: list[str], behaviour: Any = None, port: int = 0) -> Receiver:
        receiver = Receiver(list(secrets)) if behaviour is None else Receiver(list(secrets), behaviour)
        made.append(await receiver.start(port=port))
        return receiver

    yield _make
    for receiver in made:
        await receiver.close()


@pytest.fixture
async def gateways(logs: LogCapture, redactor: Redactor) -> AsyncIterator[Gateways]:
    """Gateways whose webhooks are delivering (each position read) before the test appends its events."""
    running: list[RunningGateway] = []

    async def _start(config: GatewayConfig, ready: bool = True) -> RunningGateway:
        state = build_state(config, redactor)
        gateway = await start_gateway(state, "127.0.0.1", 0)
        running.append(gateway)
        if ready:
            await until_delivering(gateway)
        return gateway

    yield _start
    for gateway in running:
        await gateway.stop()
    assert "a receiver's own words" not in logs.text


async def until_delivering(gateway: RunningGateway) -> None:
    webhooks = gateway.state.webhooks
    assert webhooks is not None
    assert await eventually(lambda: all(c.position is not None for c in webhooks.callers.values()), RECEIVE_WITHIN_S)


def event_log(gateway: RunningGateway) -> EventLog:
    assert gateway.state.events is not None
    return gateway.state.events


def config_with(
    upstream_url: str, *webhooks: dict[str, Any], events: dict[str, Any] | None = None, **sections: Any
) -> GatewayConfig:
    """Callers named in ``webhooks`` (each {"name", "url", "secrets", and caller keys}); ``billing-service`` first."""
    callers = []
    for number, spec in enumerate(webhooks):
        caller = {k: v for k, v in spec.items() if k not in ("url", "secrets")}
        caller.setdefault("key", f"caller-key-{number}-{'x' * 24}")
        caller["webhook"] = {"url": spec["url"], "secrets": spec["secrets"]}
        callers.append(caller)
    return make_config(upstream_url, callers=callers, events={**QUICK_EVENTS, **(events or {})}, **sections)


async def test_each_event_reaches_the_receiver_once_in_order_signed_with_its_id(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    receiver = await receiver_factory([secret])
    gateway = await gateways(
        config_with("http://127.0.0.1:9", {"name": BILLING, "url": receiver.url, "secrets": [secret]})
    )

    ids = await new_batches(event_log(gateway), 30, owner=BILLING)
    got = await receiver.wait_delivered(30)

    assert subjects(got) == ids
    assert len(receiver.got) == 30  # once each
    for delivery in got:
        assert delivery.verified_by == [secret]
        assert delivery.id == delivery.event["id"]
        assert delivery.headers["content-type"] == "application/json"
        assert "authorization" not in delivery.headers
        assert UPSTREAM_TOKEN not in str(delivery.headers)
    assert len({d.id for d in got}) == 30
    assert registry_value(gateway, "gateway_webhook_deliveries_total", caller=BILLING, outcome="delivered") == 30


async def test_a_caller_gets_only_the_events_it_may_see(receiver_factory: Receivers, gateways: Gateways) -> None:
    secret = new_secret()
    own, everything, no_datasets = [await receiver_factory([secret]) for _ in range(3)]
    gateway = await gateways(
        config_with(
            "http://127.0.0.1:9",
            {
                "name": BILLING,
                "batches": "own",
                "allow": ["retrieve", "read_dataset"],
                "url": own.url,
                "secrets": [secret],
            },
            {"name": "auditor", "allow": ["retrieve", "read_dataset"], "url": everything.url, "secrets": [secret]},
            {"name": "reporting", "url": no_datasets.url, "secrets": [secret]},
        )
    )
    log = event_log(gateway)
    await log.record(batch_sighting("batch-theirs", owner="reporting"))
    await log.record(batch_sighting("batch-mine", owner=BILLING))
    await log.record(dataset_sighting("ds-mine", owner=BILLING))
    await log.record(batch_sighting("batch-nobodys"))

    await everything.wait_delivered(4)
    await no_datasets.wait_delivered(3)
    await own.wait_delivered(2)
    assert [d.event["type"] for d in everything.delivered] == ["batch.queued"] * 2 + [
        "dataset.validating",
        "batch.queued",
    ]
    assert [d.event["type"] for d in no_datasets.delivered] == ["batch.queued"] * 3
    assert [d.event["owner"] for d in own.delivered] == [BILLING, BILLING]
    # The last event was passed over for the own caller: nothing more comes.
    await asyncio.sleep(0.5)
    assert len(own.got) == 2


async def test_a_webhook_added_by_a_reload_starts_at_the_newest_event_not_the_oldest(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    receiver = await receiver_factory([secret])
    gateway = await gateways(make_config("http://127.0.0.1:9", events=QUICK_EVENTS))
    log = event_log(gateway)
    await new_batches(log, 5, prefix="before")  # seen before the webhook existed: not sent

    with_webhook = config_with("http://127.0.0.1:9", {"name": BILLING, "url": receiver.url, "secrets": [secret]})
    assert await reload_config(gateway.state, lambda: with_webhook)
    await until_delivering(gateway)
    await new_batches(log, 2, prefix="after")
    got = await receiver.wait_delivered(2)

    assert all(s.startswith("after") for s in subjects(got))
    assert len(receiver.got) == 2


async def test_a_refused_delivery_is_retried_on_the_schedule_and_later_events_wait_behind_it(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    tries: dict[str, int] = {}

    def refuse_three_times(delivery: Delivery) -> int:
        tries[delivery.id] = tries.get(delivery.id, 0) + 1
        return 503 if len(tries) == 1 and tries[delivery.id] <= 3 else 200

    receiver = await receiver_factory([secret], refuse_three_times)
    schedule = [0.3, 0.6, 1.2]
    gateway = await gateways(
        config_with(
            "http://127.0.0.1:9",
            {"name": BILLING, "url": receiver.url, "secrets": [secret]},
            events={"webhook_retry_s": schedule},
        )
    )
    ids = await new_batches(event_log(gateway), 2)
    await receiver.wait_delivered(2)

    first = [d for d in receiver.got if d.event["data"]["batch"]["id"] == ids[0]]
    assert [d.status for d in first] == [503, 503, 503, 200]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(first)]
    for gap, wait in zip(gaps, schedule, strict=True):
        assert wait * 0.8 - 0.05 <= gap <= wait * 1.2 + 0.5, (gaps, schedule)
    assert subjects(receiver.delivered) == ids  # the second waited for the first
    assert receiver.got[-1].at >= first[-1].at
    assert all(d.verified_by == [secret] for d in receiver.got)
    assert registry_value(gateway, "gateway_webhook_deliveries_total", caller=BILLING, outcome="refused") == 3


async def test_an_event_that_reaches_its_max_age_is_dropped_logged_and_counted_and_the_next_goes_on(
    receiver_factory: Receivers, gateways: Gateways, logs: LogCapture
) -> None:
    secret = new_secret()
    refused: set[str] = set()

    def refuse_the_first(delivery: Delivery) -> int:
        if not refused or delivery.id in refused:
            refused.add(delivery.id)
            return 500
        return 204

    receiver = await receiver_factory([secret], refuse_the_first)
    gateway = await gateways(
        config_with(
            "http://127.0.0.1:9",
            {"name": BILLING, "url": receiver.url, "secrets": [secret]},
            events={"webhook_max_age_s": 1.5, "webhook_retry_s": [0.3]},
        )
    )
    ids = await new_batches(event_log(gateway), 2)
    got = await receiver.wait_delivered(1)

    assert subjects(got) == ids[1:]
    assert 3 <= len(receiver.got) - 1 <= 7  # tried for about 1.5 s, every 0.3 s
    assert registry_value(gateway, "gateway_webhook_deliveries_total", caller=BILLING, outcome="dropped") == 1
    dropped = [e for e in logs.events("gateway.webhooks") if e["event"] == "webhook event dropped"]
    assert [(e["caller"], e["id"]) for e in dropped] == [(BILLING, next(iter(refused)))]


async def test_a_410_turns_the_webhook_off_until_a_reload_which_resumes_where_it_stopped(
    receiver_factory: Receivers, gateways: Gateways, logs: LogCapture
) -> None:
    secret = new_secret()
    answer = {"status": 410}
    receiver = await receiver_factory([secret], lambda _d: answer["status"])
    config = config_with("http://127.0.0.1:9", {"name": BILLING, "url": receiver.url, "secrets": [secret]})
    gateway = await gateways(config)
    ids = await new_batches(event_log(gateway), 3)

    await receiver.wait_for(lambda got: len(got) == 1)
    assert await eventually(lambda: registry_value(gateway, "gateway_webhook_off", caller=BILLING) == 1)
    await asyncio.sleep(1.0)  # several retry waits: nothing more is sent while it is off
    assert len(receiver.got) == 1
    assert any(e["event"].startswith("webhook off") for e in logs.events("gateway.webhooks"))
    # While off, its lag is still the age of the event that got the 410 (the alert sees it).
    assert registry_value(gateway, "gateway_webhook_lag_seconds", caller=BILLING) >= 1.0

    answer["status"] = 200
    assert await reload_config(gateway.state, lambda: config)
    got = await receiver.wait_delivered(3)
    assert subjects(got) == ids  # from the event that got the 410, in order
    assert registry_value(gateway, "gateway_webhook_off", caller=BILLING) == 0
    assert await eventually(lambda: registry_value(gateway, "gateway_webhook_lag_seconds", caller=BILLING) == 0)


async def test_a_redirect_is_never_followed_and_the_event_is_retried(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    answers = iter([301, 302, 307, 308, 204])
    receiver = await receiver_factory([secret], lambda _d: next(answers))
    gateway = await gateways(
        config_with("http://127.0.0.1:9", {"name": BILLING, "url": receiver.url, "secrets": [secret]})
    )
    await new_batches(event_log(gateway), 1)
    await receiver.wait_delivered(1)

    assert [d.status for d in receiver.got] == [301, 302, 307, 308, 204]
    assert len({d.id for d in receiver.got}) == 1
    # Only the configured URL was ever asked, never the Location (the receiver's own /hooks/elsewhere).
    assert {d.path for d in receiver.got} == {"/hooks"}
    assert registry_value(gateway, "gateway_webhook_deliveries_total", caller=BILLING, outcome="refused") == 4


async def test_a_receiver_that_hangs_is_given_up_after_the_timeout_and_tried_again(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    answers = iter([None, 204])  # None: never answers
    receiver = await receiver_factory([secret], lambda _d: next(answers))
    gateway = await gateways(
        config_with(
            "http://127.0.0.1:9",
            {"name": BILLING, "url": receiver.url, "secrets": [secret]},
            events={"webhook_timeout_s": 0.5, "webhook_retry_s": [0.2]},
        )
    )
    started = time.monotonic()
    await new_batches(event_log(gateway), 1)
    await receiver.wait_delivered(1)

    assert len(receiver.got) == 2
    assert receiver.got[1].at - receiver.got[0].at >= 0.5 + 0.2 * 0.8 - 0.05
    assert time.monotonic() - started < 5
    assert registry_value(gateway, "gateway_webhook_deliveries_total", caller=BILLING, outcome="timeout") == 1


async def test_a_receiver_down_for_a_while_then_back_gets_every_event_in_order(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    first = await receiver_factory([secret])
    gateway = await gateways(
        config_with("http://127.0.0.1:9", {"name": BILLING, "url": first.url, "secrets": [secret]})
    )
    log = event_log(gateway)
    ids = await new_batches(log, 3)
    await first.wait_delivered(3)

    port = first.port
    await first.close()  # down: connections refused
    ids += await new_batches(log, 5)
    assert await eventually(
        lambda: registry_value(gateway, "gateway_webhook_deliveries_total", caller=BILLING, outcome="unreachable") >= 3
    )
    assert registry_value(gateway, "gateway_webhook_lag_seconds", caller=BILLING) > 0
    back = await receiver_factory([secret], port=port)
    await back.wait_delivered(5)

    assert subjects(first.delivered + back.delivered) == ids
    assert len(back.got) == 5
    assert await eventually(lambda: registry_value(gateway, "gateway_webhook_lag_seconds", caller=BILLING) == 0)


async def test_one_callers_dead_receiver_does_not_delay_another_callers_events(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    hanging = await receiver_factory([secret], lambda _d: None)
    healthy = await receiver_factory([secret])
    gateway = await gateways(
        config_with(
            "http://127.0.0.1:9",
            {"name": BILLING, "url": hanging.url, "secrets": [secret]},
            {"name": "reporting", "url": healthy.url, "secrets": [secret]},
            events={"webhook_timeout_s": 30, "webhook_max_in_flight": 2},
        )
    )
    await hanging.wait_for(lambda got: True)
    await new_batches(event_log(gateway), 1)
    await hanging.wait_for(lambda got: len(got) == 1)  # billing's first try hangs for 30 s
    started = time.monotonic()
    ids = await new_batches(event_log(gateway), 10)

    got = await healthy.wait_delivered(11, within_s=10)
    assert subjects(got)[1:] == ids
    assert time.monotonic() - started < 5
    assert len(hanging.got) == 1


async def test_deliveries_in_flight_stay_within_the_limit_over_every_caller(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    now_in = {"n": 0, "most": 0}

    async def slow(_delivery: Delivery) -> int:
        now_in["n"] += 1
        now_in["most"] = max(now_in["most"], now_in["n"])
        await asyncio.sleep(0.3)
        now_in["n"] -= 1
        return 204

    receivers = [await receiver_factory([secret], slow) for _ in range(4)]
    gateway = await gateways(
        config_with(
            "http://127.0.0.1:9",
            *({"name": f"caller-{i}", "url": r.url, "secrets": [secret]} for i, r in enumerate(receivers)),
            events={"webhook_max_in_flight": 2},
        )
    )
    await new_batches(event_log(gateway), 3)
    for receiver in receivers:
        await receiver.wait_delivered(3)
    assert now_in["most"] == 2


async def test_a_reload_that_rotates_a_secret_signs_with_both_during_the_overlap(
    receiver_factory: Receivers, gateways: Gateways, upstream: Any
) -> None:
    old, new = new_secret(), new_secret(32)
    receiver = await receiver_factory([old, new])
    spec = {"name": BILLING, "url": receiver.url}
    gateway = await gateways(config_with("http://127.0.0.1:9", {**spec, "secrets": [old]}))
    log = event_log(gateway)

    await new_batches(log, 1)
    await receiver.wait_delivered(1)
    assert await reload_config(
        gateway.state, lambda: config_with("http://127.0.0.1:9", {**spec, "secrets": [old, new]})
    )
    await new_batches(log, 1)
    await receiver.wait_delivered(2)
    assert await reload_config(gateway.state, lambda: config_with("http://127.0.0.1:9", {**spec, "secrets": [new]}))
    await new_batches(log, 1)
    got = await receiver.wait_delivered(3)

    assert [d.verified_by for d in got] == [[old], [old, new], [new]]
    assert len(got[1].headers["webhook-signature"].split(" ")) == 2
    assert len(receiver.got) == 3  # the reloads resent nothing: the position was kept


async def test_a_reload_adds_and_removes_webhooks_and_a_moved_url_gets_the_next_events(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    first, moved, added = [await receiver_factory([secret]) for _ in range(3)]
    billing = {"name": BILLING, "secrets": [secret]}
    gateway = await gateways(config_with("http://127.0.0.1:9", {**billing, "url": first.url}))
    log = event_log(gateway)
    ids = await new_batches(log, 2)
    await first.wait_delivered(2)

    changed = config_with(
        "http://127.0.0.1:9",
        {**billing, "url": moved.url},
        {"name": "reporting", "url": added.url, "secrets": [secret]},
    )
    assert await reload_config(gateway.state, lambda: changed)
    await until_delivering(gateway)
    ids += await new_batches(log, 2)
    assert subjects(await moved.wait_delivered(2)) == ids[2:]
    assert subjects(await added.wait_delivered(2)) == ids[2:]  # a new webhook: from the newest event on

    assert await reload_config(gateway.state, lambda: config_with("http://127.0.0.1:9", {**billing, "url": moved.url}))
    await new_batches(log, 1)
    await moved.wait_delivered(3)
    await asyncio.sleep(0.3)
    assert len(added.got) == 2  # removed: nothing more
    assert len(first.got) == 2


async def test_a_2xx_whose_body_never_ends_is_a_delivery_and_the_event_is_not_sent_again(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    receiver = await receiver_factory([secret], lambda _d: 200)
    receiver.stalled_bodies = True  # the status comes at once; the rest never does
    gateway = await gateways(
        config_with(
            "http://127.0.0.1:9",
            {"name": BILLING, "url": receiver.url, "secrets": [secret]},
            events={"webhook_timeout_s": 0.3, "webhook_retry_s": [0.2]},
        )
    )
    ids = await new_batches(event_log(gateway), 3)
    await receiver.wait_for(lambda got: len(got) >= 3)

    assert subjects(receiver.got[:3]) == ids  # each once, in order: the 2xx came within the timeout
    delivered = {"caller": BILLING, "outcome": "delivered"}
    assert await eventually(lambda: registry_value(gateway, "gateway_webhook_deliveries_total", **delivered) == 3)
    await asyncio.sleep(0.5)  # longer than a timeout and a retry wait: nothing is sent again
    assert len(receiver.got) == 3
    assert registry_value(gateway, "gateway_webhook_deliveries_total", caller=BILLING, outcome="timeout") == 0


async def test_a_receiver_whose_connection_never_completes_is_given_up_at_the_connect_timeout(
    gateways: Gateways, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connect timeout, short here, is its own: far below the whole delivery's 10 s.
    monkeypatch.setattr(webhook_send, "CONNECT_TIMEOUT_S", 0.3, raising=False)
    with never_accepting() as url:
        gateway = await gateways(
            config_with(
                "http://127.0.0.1:9",
                {"name": BILLING, "url": url, "secrets": [new_secret()]},
                events={"webhook_timeout_s": 10, "webhook_retry_s": [30]},
            )
        )
        started = time.monotonic()
        await new_batches(event_log(gateway), 1)
        unreachable = {"caller": BILLING, "outcome": "unreachable"}
        assert await eventually(
            lambda: registry_value(gateway, "gateway_webhook_deliveries_total", **unreachable) == 1, 3
        )
        assert time.monotonic() - started < 3
        assert registry_value(gateway, "gateway_webhook_deliveries_total", caller=BILLING, outcome="timeout") == 0


async def test_a_reload_that_leaves_a_webhook_unchanged_does_not_cut_its_retry_wait_short(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret, rotated = new_secret(), new_secret()
    receiver = await receiver_factory([secret, rotated], lambda _d: 503)
    other = await receiver_factory([secret])
    billing = {"name": BILLING, "url": receiver.url, "secrets": [secret]}
    reporting = {"name": "reporting", "url": other.url, "secrets": [secret]}
    slow = {"webhook_retry_s": [30]}
    gateway = await gateways(config_with("http://127.0.0.1:9", billing, events=slow))
    await new_batches(event_log(gateway), 1)
    await receiver.wait_for(lambda got: len(got) == 1)

    # Another caller's webhook added: billing's 30 s wait goes on (no retry storm on every SIGHUP).
    assert await reload_config(
        gateway.state, lambda: config_with("http://127.0.0.1:9", billing, reporting, events=slow)
    )
    await until_delivering(gateway)
    await asyncio.sleep(0.5)
    assert len(receiver.got) == 1

    # Billing's own secrets changed: its waiting event is tried again at once, with them.
    changed = {**billing, "secrets": [secret, rotated]}
    assert await reload_config(
        gateway.state, lambda: config_with("http://127.0.0.1:9", changed, reporting, events=slow)
    )
    await receiver.wait_for(lambda got: len(got) == 2, within_s=5)
    assert receiver.got[1].verified_by == [secret, rotated]


def test_retry_waits_follow_the_schedule_the_last_repeating_each_jittered_by_up_to_a_fifth() -> None:
    # The default: about 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, then every 2 h.
    assert EventsSettings().webhook_retry_s == (5, 30, 120, 600, 1800, 3600, 7200)
    rng = random.Random(23)
    schedule = [5.0, 30.0, 120.0]
    for failures, base in [(1, 5.0), (2, 30.0), (3, 120.0), (4, 120.0), (40, 120.0)]:
        waits = [webhook_send.retry_wait(schedule, failures, rng) for _ in range(200)]
        assert base * 0.8 <= min(waits)
        assert max(waits) <= base * 1.2
        assert max(waits) - min(waits) > base * 0.3  # spread out: never the bare schedule


async def test_a_reload_that_adds_the_receivers_new_secret_delivers_the_waiting_events_in_order(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    old, new = new_secret(), new_secret()
    # The receiver moved to the new secret first: it refuses what it cannot verify.
    receiver = await receiver_factory([new], lambda d: 204 if d.verified_by else 401)
    spec = {"name": BILLING, "url": receiver.url}
    slow = {"webhook_retry_s": [30]}
    gateway = await gateways(config_with("http://127.0.0.1:9", {**spec, "secrets": [old]}, events=slow))
    ids = await new_batches(event_log(gateway), 3)
    await receiver.wait_for(lambda got: len(got) == 1)

    rotated = config_with("http://127.0.0.1:9", {**spec, "secrets": [old, new]}, events=slow)
    assert await reload_config(gateway.state, lambda: rotated)
    got = await receiver.wait_delivered(3, within_s=5)  # at once, not after the 30 s wait

    assert subjects(got) == ids  # the position was kept: none lost, none skipped, in order
    assert [d.status for d in receiver.got] == [401, 204, 204, 204]


async def test_a_replica_whose_lease_lapsed_while_it_waited_goes_on_from_where_the_other_replica_stopped(
    receiver_factory: Receivers, gateways: Gateways, redis_server: RedisServer
) -> None:
    secret = new_secret()
    receiver = await receiver_factory([secret])
    config = config_with(
        "http://127.0.0.1:9",
        {"name": BILLING, "url": receiver.url, "secrets": [secret]},
        events={"webhook_timeout_s": 0.3, "webhook_max_in_flight": 1},  # the lease: 3 x 0.3 + 1 = 1.9 s
        redis={"url": redis_server.url, "key_prefix": f"lapse-{random.getrandbits(32)}:", "probe_interval_s": 0.1},
    )
    first = await gateways(config)  # it takes billing's lease
    second = await gateways(config, ready=False)
    first_webhooks, second_webhooks = first.state.webhooks, second.state.webhooks
    assert first_webhooks is not None
    assert second_webhooks is not None
    log = event_log(first)
    ids = await new_batches(log, 2)
    await receiver.wait_delivered(2)

    # The first replica's one slot is taken (as by other callers' slow receivers): its next try waits, and
    # its lease lapses meanwhile; the second takes the lease over, delivers, and stops (its lease given up).
    await first_webhooks.shared.slots.acquire()
    ids += await new_batches(log, 1)
    await asyncio.sleep(0.1)  # the first replica's task now waits for the slot, holding the third event
    ids += await new_batches(log, 2)
    assert subjects(await receiver.wait_delivered(5)) == ids
    await asyncio.wait_for(second_webhooks.callers[BILLING].stop(forget=False), 5)

    # The first gets its slot back and the lease again: it goes on from the stored position, resending nothing.
    first_webhooks.shared.slots.release()
    ids += await new_batches(log, 1)
    got = await receiver.wait_delivered(6)
    assert subjects(got) == ids
    await asyncio.sleep(0.3)
    assert len(receiver.got) == 6


async def test_a_webhook_removed_by_a_reload_stops_even_if_a_lease_call_loses_the_cancellation(
    receiver_factory: Receivers, gateways: Gateways, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = new_secret()
    receiver = await receiver_factory([secret])
    billing = {"name": BILLING, "url": receiver.url, "secrets": [secret]}
    quick = {"webhook_timeout_s": 0.1}  # the lease renewed every (3 x 0.1 + 1) / 3 s
    gateway = await gateways(config_with("http://127.0.0.1:9", billing, events=quick))
    webhooks = gateway.state.webhooks
    assert webhooks is not None
    deliveries = webhooks.callers[BILLING]

    # A renewal whose Redis call swallows the cancellation once.
    renewing, lost = lease_losing_one_cancellation(monkeypatch, RECEIVE_WITHIN_S)
    await asyncio.wait_for(renewing.wait(), RECEIVE_WITHIN_S)
    assert await reload_config(gateway.state, lambda: make_config("http://127.0.0.1:9", events=QUICK_EVENTS))
    await asyncio.wait_for(lost.wait(), RECEIVE_WITHIN_S)

    task = deliveries.task
    assert task is not None
    try:
        assert await eventually(task.done, 5)  # stopped, not delivering on for a removed webhook
    finally:
        await cancel_and_wait(task)  # so that the gateway can stop when the test failed
    await new_batches(event_log(gateway), 1)
    await asyncio.sleep(0.3)
    assert receiver.got == []


async def test_events_removed_from_the_log_before_delivery_are_logged_and_counted_as_dropped(
    receiver_factory: Receivers, gateways: Gateways, logs: LogCapture
) -> None:
    secret = new_secret()
    answer = {"status": 410}
    receiver = await receiver_factory([secret], lambda _d: answer["status"])
    config = config_with(
        "http://127.0.0.1:9",
        {"name": BILLING, "url": receiver.url, "secrets": [secret]},
        events={"max_events": 3},
        store={"path": fresh_store_path()},
    )
    gateway = await gateways(config)
    log = event_log(gateway)
    first = await new_batches(log, 1)
    await receiver.wait_for(lambda got: len(got) == 1)  # off after the 410: the event waits
    later = await new_batches(log, 5)  # the log keeps the newest 3: the waiting one and 2 after it are gone
    await gateway.stop()

    answer["status"] = 200
    restarted = await gateways(config)  # on again, from its stored position: before the waiting event
    got = await receiver.wait_delivered(3)
    assert subjects(got) == later[2:]
    assert first[0] not in subjects(got)
    (line,) = [e for e in logs.events("gateway.webhooks") if e["event"].startswith("webhook events removed")]
    assert (line["caller"], line["up_to"]) == (BILLING, 3)
    assert registry_value(restarted, "gateway_webhook_deliveries_total", caller=BILLING, outcome="dropped") == 3


async def test_a_webhook_removed_and_added_again_at_once_keeps_its_metrics_and_delivers_what_comes_next(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    receiver = await receiver_factory([secret])
    config = config_with("http://127.0.0.1:9", {"name": BILLING, "url": receiver.url, "secrets": [secret]})
    gateway = await gateways(config)
    webhooks = gateway.state.webhooks
    assert webhooks is not None

    # Two reloads in one breath: the first's stop of the old webhook is still under way when the second adds it.
    without = config_with("http://127.0.0.1:9", {"name": "reporting", "url": receiver.url, "secrets": [secret]})
    assert await reload_config(gateway.state, lambda: without)
    assert await reload_config(gateway.state, lambda: config)
    await until_delivering(gateway)
    ids = await new_batches(event_log(gateway), 2, owner=BILLING)

    got = await receiver.wait_delivered(2)
    assert subjects(got) == ids
    assert await eventually(lambda: not webhooks._stopping)  # the old webhook's stop has ended
    registry = gateway.state.metrics.registry
    assert registry.get_sample_value("gateway_webhook_off", {"caller": BILLING}) == 0  # still there, not removed
    assert registry.get_sample_value("gateway_webhook_lag_seconds", {"caller": BILLING}) is not None


async def test_receivers_that_hang_never_take_every_slot_from_a_caller_whose_receiver_answers(
    receiver_factory: Receivers, gateways: Gateways
) -> None:
    secret = new_secret()
    hanging = [await receiver_factory([secret], lambda _d: None) for _ in range(4)]
    healthy = await receiver_factory([secret])
    gateway = await gateways(
        config_with(
            "http://127.0.0.1:9",
            *({"name": f"hangs-{n}", "url": r.url, "secrets": [secret]} for n, r in enumerate(hanging)),
            {"name": BILLING, "url": healthy.url, "secrets": [secret]},
            events={"webhook_timeout_s": 2, "webhook_retry_s": [0.05], "webhook_max_in_flight": 4},
        )
    )
    log = event_log(gateway)
    await new_batches(log, 1)
    await healthy.wait_delivered(1)
    for receiver in hanging:  # each has timed out once: its receiver fails, and it retries every 0.05 s
        await receiver.wait_for(lambda got: len(got) >= 2)

    started = time.monotonic()
    ids = await new_batches(log, 10)
    got = await healthy.wait_delivered(11)
    assert subjects(got)[1:] == ids
    # Each of the 4 retries a try that hangs 2 s, 0.05 s after the last: were they to take all 4 slots,
    # the 10 events would wait for them about 2 s each.
    assert time.monotonic() - started < 2


async def test_a_reload_that_lengthens_the_webhook_timeout_lengthens_the_lease_on_redis(
    receiver_factory: Receivers, gateways: Gateways, redis_server: RedisServer
) -> None:
    secret = new_secret()
    receiver = await receiver_factory([secret])
    billing = {"name": BILLING, "url": receiver.url, "secrets": [secret]}
    redis = {"url": redis_server.url, "key_prefix": f"ttl-{random.getrandbits(32)}:"}
    gateway = await gateways(config_with("http://127.0.0.1:9", billing, events={"webhook_timeout_s": 1}, redis=redis))
    key = gateway.state.redis.key("lease", f"webhook:{BILLING}")  # type: ignore[union-attr]
    assert 0 < await redis_server.client().pttl(key) <= 4000  # 3 x 1 + 1 s: a try in flight never outlives it

    longer = config_with("http://127.0.0.1:9", billing, events={"webhook_timeout_s": 20}, redis=redis)
    assert await reload_config(gateway.state, lambda: longer)
    await new_batches(event_log(gateway), 1)
    await receiver.wait_delivered(1)
    assert await redis_server.client().pttl(key) > 4000  # renewed with 3 x 20 + 1 s
