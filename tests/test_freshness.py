"""The pure decisions of docs/design.md §9, table by table.

Both ways a hit is answered (inline and the app) call these rules, so a
row here holds for both: does ``If-None-Match`` name the answer, what
``Prefer: wait`` asks for, who is held, which upstream answer is older than
the one held, and how far active refresh intervals stretch to fit the
budget. ``tests/test_waiting.py`` checks the same rules end to end.
"""

from __future__ import annotations

import pytest

from gateway.api.rules import must_wait, not_modified, requested_wait
from gateway.cache.entry import CacheEntry, etag_of, is_older
from gateway.cache.refresher import REFRESH_SHARE, Freshness
from gateway.config import TtlSettings
from tests.support import FakeClock
from tests.upstream import batch_body

ETAG = etag_of(batch_body("batch-1"))


def test_the_etag_is_strong_and_follows_the_body_byte_for_byte() -> None:
    body = batch_body("batch-1")

    assert ETAG.startswith('"')
    assert ETAG.endswith('"')
    assert etag_of(bytes(body)) == ETAG
    assert etag_of(body + b" ") != ETAG
    assert etag_of(batch_body("batch-2")) != ETAG


@pytest.mark.parametrize(
    ("if_none_match", "matches"),
    [
        ([ETAG], True),
        (["*"], True),
        ([f"W/{ETAG}"], True),  # If-None-Match compares weakly
        ([f'"other", {ETAG}'], True),
        ([f'"other",{ETAG}'], True),
        (['"other"', ETAG], True),  # the header sent twice
        ([f"  {ETAG}  "], True),
        (['"other"'], False),
        ([ETAG.strip('"')], False),  # unquoted: not an entity tag
        ([f'W/"{ETAG}"'], False),
        ([""], False),
        ([], False),
    ],
)
def test_if_none_match_names_the_answer(if_none_match: list[str], matches: bool) -> None:
    assert not_modified(if_none_match, ETAG) is matches


@pytest.mark.parametrize(
    ("prefer", "wait"),
    [
        (["wait=5"], 5),
        (["WAIT=5"], 5),
        (["respond-async, wait=5"], 5),
        (["wait=5, respond-async"], 5),
        (['wait="5"'], 5),
        (["wait=5; extra"], 5),
        (["wait=0"], 0),
        (["return=minimal", "wait=7"], 7),  # the header sent twice
        (["wait=5, wait=10"], 5),  # only the first instance counts (RFC 7240)
        (["handling=lenient; wait=5"], None),  # a parameter of another preference, not a wait
        (["wait"], None),
        (["wait="], None),
        (["wait=-1"], None),
        (["wait=1.5"], None),
        (["wait=abc"], None),
        (["wait=\u0665"], None),  # a digit, but not an ASCII one
        (["wait=1234567890"], None),  # longer than any wait worth holding
        (["respond-async"], None),
        ([], None),
    ],
)
def test_prefer_wait_is_read_as_whole_seconds(prefer: list[str], wait: int | None) -> None:
    assert requested_wait(prefer) == wait


def entry(
    status: int = 200,
    body: bytes | None = None,
    *,
    updated_at: float | None = None,
    terminal: bool = False,
) -> CacheEntry:
    body = body if body is not None else batch_body("batch-1")
    return CacheEntry(status, body, 0.0, 5.0, 600.0, etag_of(body), updated_at, terminal)


ACTIVE = entry()
CHANGED = entry(body=batch_body("batch-1", num_successful_records=3))
TERMINAL = entry(body=batch_body("batch-1", "BATCH_STATUS_COMPLETED"), terminal=True)
NOT_FOUND = entry(404, b'{"message": "not found"}')


@pytest.mark.parametrize(
    ("current", "if_none_match", "held_on_arrival", "held"),
    [
        (ACTIVE, [ACTIVE.etag], None, True),
        (ACTIVE, ["*"], None, True),
        (ACTIVE, ['"other"'], None, False),  # the caller's copy is out of date: answered at once
        (ACTIVE, [], ACTIVE, True),
        (ACTIVE, [], CHANGED, False),  # changed since the request arrived
        (ACTIVE, [], None, False),  # nothing held on arrival: the first answer is the news
        (TERMINAL, [TERMINAL.etag], None, False),  # it will not change
        (TERMINAL, [], TERMINAL, False),
        (NOT_FOUND, [NOT_FOUND.etag], None, False),
        (NOT_FOUND, [], NOT_FOUND, False),
    ],
    ids=[
        "its etag",
        "star",
        "another etag",
        "unchanged since arrival",
        "changed since arrival",
        "nothing on arrival",
        "terminal, its etag",
        "terminal, no etag",
        "404, its etag",
        "404, no etag",
    ],
)
def test_who_is_held(
    current: CacheEntry, if_none_match: list[str], held_on_arrival: CacheEntry | None, held: bool
) -> None:
    assert must_wait(current, if_none_match, held_on_arrival) is held


@pytest.mark.parametrize(
    ("new", "held", "older"),
    [
        (entry(updated_at=100), entry(updated_at=200), True),
        (entry(updated_at=200), entry(updated_at=200), False),
        (entry(updated_at=300), entry(updated_at=200), False),
        (entry(updated_at=None), entry(updated_at=200), False),  # nothing to compare
        (entry(updated_at=100), entry(updated_at=None), False),
        (entry(updated_at=300), entry(updated_at=200, terminal=True), True),  # active after terminal
        (entry(updated_at=300, terminal=True), entry(updated_at=200), False),
        (entry(updated_at=300, terminal=True), entry(updated_at=200, terminal=True), False),
        (NOT_FOUND, entry(updated_at=200), False),  # a 404 is not a state of the batch to compare
        (entry(updated_at=100), NOT_FOUND, False),
    ],
    ids=[
        "earlier updated_at",
        "same updated_at",
        "later updated_at",
        "new has none",
        "held has none",
        "active after terminal",
        "terminal after active",
        "terminal after terminal",
        "404 after a batch",
        "batch after a 404",
    ],
)
def test_which_upstream_answer_is_older_than_the_one_held(new: CacheEntry, held: CacheEntry, older: bool) -> None:
    assert is_older(new, held) is older


TTL = TtlSettings(active=1, active_min=0.5, active_max=10)


def followed_batches(count: int, clock: FakeClock) -> Freshness:
    freshness = Freshness(clock)
    for n in range(count):
        freshness.note_active(f"batch-{n}")
    return freshness


@pytest.mark.parametrize(
    ("polled", "waited", "rate_per_s", "stretch"),
    [
        (2, 0, 4, 1.0),  # 2 calls a second fit in 3: no stretch
        (3, 0, 4, 1.0),  # exactly the refresh share
        (20, 0, 4, 20 / (REFRESH_SHARE * 4)),
        (20, 0, 100, 1.0),
        (10, 2, 4, (8 / 1 + 2 / 0.5) / (REFRESH_SHARE * 4)),  # a waited batch wants a refresh every active_min
        (0, 0, 4, 1.0),
    ],
)
def test_active_intervals_stretch_evenly_to_fit_the_refresh_share_of_the_budget(
    polled: int, waited: int, rate_per_s: float, stretch: float
) -> None:
    freshness = followed_batches(polled, FakeClock())

    assert freshness.stretch(TTL, rate_per_s, waited) == pytest.approx(stretch)


def test_a_terminal_batch_stops_sharing_the_budget_at_once() -> None:
    freshness = followed_batches(20, FakeClock())

    freshness.forget("batch-0")

    assert freshness.followed(TTL) == 19
    assert freshness.stretch(TTL, 4, 0) == pytest.approx(19 / (REFRESH_SHARE * 4))


def test_a_batch_nobody_asked_about_for_longer_than_active_max_stops_sharing_the_budget() -> None:
    clock = FakeClock()
    freshness = followed_batches(10, clock)
    clock.advance(TTL.active_max / 2)
    freshness.note_active("batch-0")  # asked about again: its answer is recent
    freshness.note_active("batch-new")

    clock.advance(TTL.active_max / 2 + 0.1)

    assert freshness.followed(TTL) == 2
