"""How big each kind of run is: ``full`` (bench/RESULTS.md), ``quick`` and ``smoke`` (CI: every scenario once,
numbers not checked)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    hit_rounds: int
    hit_seconds: int
    connections: tuple[int, ...]
    pollers: int
    batches: int
    poll_interval_s: float
    lifetime_s: float
    window_s: float
    miss_rounds: int
    miss_per_round: int
    memory_entries: int
    install: bool
    notice_batches: int  # scenario 7: batches, one caller each
    notice_window_s: float  # scenario 7: each batch completes at a random moment within this window
    outage_s: float  # scenario 8: how long Redis stays killed, in the middle of the lifecycle window
    reload_callers: int  # scenario 9: callers in the config that SIGHUP reloads
    reload_rounds: int  # scenario 9: reloads measured (the key is their median)


# A table, in Mode's field order.
MODES = {
    "full": Mode("full", 5, 4, (64, 256), 200, 50, 0.5, 25.0, 45.0, 5, 400, 100_000, True, 40, 60.0, 5.0, 10_000, 5),
    "quick": Mode("quick", 3, 2, (64,), 200, 50, 0.5, 10.0, 15.0, 3, 300, 25_000, True, 20, 25.0, 5.0, 10_000, 3),
    "smoke": Mode("smoke", 1, 1, (64,), 20, 5, 0.5, 2.0, 3.0, 1, 30, 500, False, 3, 2.0, 1.0, 1_000, 1),
}
