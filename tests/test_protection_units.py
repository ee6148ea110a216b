"""The guards as pure logic on a FakeClock: TokenBucket, CircuitBreaker, parse_retry_after."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.upstream.cohere import parse_retry_after
from gateway.upstream.guards import PROBE_RETRY_AFTER_S, Admission, BreakerState, CircuitBreaker, TokenBucket
from tests.support import FakeClock

# --- TokenBucket -------------------------------------------------------------------


def take_all(bucket: TokenBucket, limit: int = 10_000) -> int:
    """Take tokens until the bucket refuses; how many it gave."""
    taken = 0
    while taken < limit and bucket.try_take() == 0:
        taken += 1
    return taken


# Steps of 1/16 s are exact in binary floating point, so the counts below are exact.
STEP_S = 1 / 16


@pytest.mark.parametrize(
    ("rate", "burst", "elapsed", "granted"),
    [
        (5, 5, 0.0, 5),  # a full bucket gives its burst at once
        (5, 5, 1.0, 10),  # then rate per second
        (5, 5, 0.1875, 5),  # a token is whole: 0.9375 of one is not one
        (5, 5, 0.25, 6),
        (10, 20, 2.5, 45),
        (0.5, 1, 4.0, 3),
        (5, 5, 600.0, 5 + 5 * 600),
    ],
)
def test_a_bucket_never_grants_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, elapsed: float, granted: int
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    total = take_all(bucket)
    # A greedy taker, taking all that is due every step, gets the most a bucket can give.
    for _ in range(int(elapsed / STEP_S)):
        clock.advance(STEP_S)
        total += take_all(bucket)
    assert total == granted
    assert total <= burst + rate * elapsed


@pytest.mark.parametrize(
    ("rate", "burst", "idle_s", "tokens"),
    [
        (5, 5, 0.0, 5),
        (5, 5, 10.0, 5),  # idling never stores more than the burst
        (1, 100, 1000.0, 100),
    ],
)
def test_an_idle_bucket_fills_up_to_its_burst_and_no_further(
    rate: float, burst: int, idle_s: float, tokens: int
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    clock.advance(idle_s)
    assert bucket.tokens == tokens


@pytest.mark.parametrize(
    ("rate", "burst", "after_s", "wait_s"),
    [
        (5, 5, 0.0, 0.2),
        (5, 5, 0.1, 0.1),
        (0.5, 1, 0.0, 2.0),
        (0.1, 1, 4.0, 6.0),
    ],
)
def test_an_empty_bucket_says_how_long_until_the_next_token(
    rate: float, burst: int, after_s: float, wait_s: float
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    assert take_all(bucket) == burst
    clock.advance(after_s)
    assert bucket.try_take() == pytest.approx(wait_s)
    clock.advance(wait_s)
    assert bucket.try_take() == 0  # the promised token is there


def test_a_refusal_takes_nothing_from_the_bucket() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1, 1, clock)
    bucket.try_take()
    for _ in range(50):
        assert bucket.try_take() == 1.0
    clock.advance(1.0)
    assert bucket.try_take() == 0


@pytest.mark.parametrize(
    ("before", "after", "tokens_after"),
    [
        ((10, 20), (10, 5), 5),  # a smaller burst trims what is stored
        ((10, 5), (10, 20), 2),  # a larger one is not a fresh burst
        ((10, 5), (1, 5), 2),
    ],
)
def test_a_reloaded_limit_never_hands_out_a_fresh_burst(
    before: tuple[float, int], after: tuple[float, int], tokens_after: int
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(*before, clock)
    for _ in range(3):
        bucket.try_take()
    bucket.reconfigure(*after)
    assert bucket.tokens == tokens_after


def test_a_clock_that_steps_back_takes_no_tokens_away() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1, 5, clock)
    bucket.try_take()
    clock.advance(-10)
    assert bucket.tokens == 4


# --- CircuitBreaker ----------------------------------------------------------------


def open_breaker(clock: FakeClock, threshold: int = 3, cooldown_s: float = 10.0) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold, cooldown_s, clock)
    for _ in range(threshold):
        assert breaker.admit().admitted
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    return breaker


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_the_breaker_opens_after_threshold_consecutive_failures_and_not_before(threshold: int) -> None:
    breaker = CircuitBreaker(threshold, 10.0, FakeClock())
    for _ in range(threshold - 1):
        breaker.record_failure()
        assert breaker.state is BreakerState.CLOSED
        assert breaker.admit() == Admission(0.0)
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN


def test_a_success_between_failures_resets_the_run() -> None:
    breaker = CircuitBreaker(3, 10.0, FakeClock())
    for outcome in ["fail", "fail", "ok", "fail", "fail", "ok", "fail", "fail"]:
        breaker.record_failure() if outcome == "fail" else breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("elapsed_s", "wait_s"),
    [(0.0, 10.0), (2.5, 7.5), (9.9, 0.1)],
)
def test_an_open_breaker_fails_fast_with_the_cooldown_that_remains(elapsed_s: float, wait_s: float) -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(elapsed_s)
    admission = breaker.admit()
    assert not admission.admitted
    assert admission.wait_s == pytest.approx(wait_s)


def test_after_the_cooldown_exactly_one_probe_goes_through() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit() == Admission(0.0, probe=True)
    others = [breaker.admit() for _ in range(20)]
    assert others == [Admission(PROBE_RETRY_AFTER_S)] * 20


@pytest.mark.parametrize(
    ("probe_outcome", "state_after", "next_admitted"),
    [
        ("success", BreakerState.CLOSED, True),
        ("failure", BreakerState.OPEN, False),
    ],
)
def test_the_probe_closes_the_breaker_on_success_and_reopens_it_on_failure(
    probe_outcome: str, state_after: BreakerState, next_admitted: bool
) -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(10.0)
    assert breaker.admit().probe
    breaker.record_success() if probe_outcome == "success" else breaker.record_failure()
    assert breaker.state is state_after
    assert breaker.admit().admitted is next_admitted


def test_a_reopened_breaker_waits_a_full_cooldown_again() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(10.0)
    breaker.admit()
    clock.advance(3.0)  # the probe took 3 s to fail
    breaker.record_failure()
    assert breaker.admit().wait_s == pytest.approx(10.0)
    clock.advance(10.0)
    assert breaker.admit().probe


def test_an_abandoned_probe_frees_the_slot_for_the_next_call() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(10.0)
    probe = breaker.admit()
    breaker.abandon(probe)
    assert breaker.state is BreakerState.HALF_OPEN  # nothing was learnt
    assert breaker.admit().probe


def test_a_call_that_was_not_the_probe_cannot_free_the_probe_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, clock)
    straggler = breaker.admit()  # admitted while closed, still out
    breaker.record_failure()
    clock.advance(10.0)
    assert breaker.admit().probe
    breaker.abandon(straggler)
    assert not breaker.admit().admitted


def test_failures_of_calls_sent_before_the_breaker_opened_do_not_extend_the_cooldown() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(6.0)
    breaker.record_failure()
    clock.advance(4.0)
    assert breaker.admit().probe


def test_the_state_reads_half_open_once_the_cooldown_has_passed_without_a_call() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(9.99)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.01)
    assert breaker.state is BreakerState.HALF_OPEN


# --- parse_retry_after -------------------------------------------------------------

NOW = datetime(2026, 1, 15, 9, 30, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        ("0", 0.0),
        ("60", 60.0),
        ("61", 60.0),  # capped
        ("86400", 60.0),
        ("Thu, 15 Jan 2026 09:30:20 GMT", 20.0),  # IMF-fixdate
        ("Thursday, 15-Jan-26 09:30:20 GMT", 20.0),  # RFC 850
        ("Thu Jan 15 09:30:20 2026", 20.0),  # asctime, no zone: UTC
        ("Thu, 15 Jan 2026 10:30:00 GMT", 60.0),  # an hour away: capped
        ("Thu, 15 Jan 2026 09:00:00 GMT", 0.0),  # in the past: no wait
        (None, 7.0),  # absent: the default
        ("", 7.0),
        ("soon", 7.0),
        ("2 seconds", 7.0),
        ("-2", 7.0),
        ("2.5", 7.0),
        ("0x10", 7.0),
        ("Thu, 32 Jan 2026 09:30:20 GMT", 7.0),
    ],
)
def test_retry_after_takes_seconds_or_an_http_date_with_a_default_and_a_cap(value: str | None, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW, default_s=7.0, max_s=60.0) == seconds


def test_a_default_larger_than_the_cap_is_capped() -> None:
    assert parse_retry_after("garbage", now=NOW, default_s=600.0, max_s=60.0) == 60.0
