"""Usage per caller in ``/metrics`` (docs/design.md §12, "Usage"), and what following costs.

Labels stay bounded: callers come from the config (or ``-``), models are
the upstream's few model names, statuses the three final ones.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class UsageMetrics:
    """Tokens and finished batches per caller and model; the follower's calls and renewals."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter(
            "gateway_batch_tokens",
            "Tokens of finished batches, by owner (caller, '-' for none), model and kind (input, output).",
            ["caller", "model", "kind"],
            registry=registry,
        )
        self.batches = Counter(
            "gateway_batches_finished",
            "Batches that finished, counted once each, by owner, model and status (completed, failed, canceled).",
            ["caller", "model", "status"],
            registry=registry,
        )
        self.follow_calls = Counter(
            "gateway_follow_calls",
            "Upstream calls the follower made, by kind (list, retrieve).",
            ["kind"],
            registry=registry,
        )
        self.renewals = Counter(
            "gateway_follow_renewals",
            "Cached answers the follower renewed because a list showed them unchanged.",
            registry=registry,
        )

    def finished(self, caller: str, model: str, status: str, input_tokens: int, output_tokens: int) -> None:
        self.batches.labels(caller, model, status).inc()
        self.tokens.labels(caller, model, "input").inc(input_tokens)
        self.tokens.labels(caller, model, "output").inc(output_tokens)
