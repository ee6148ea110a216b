"""The collectors of webhook deliveries (docs/design.md §12, "Webhooks"); labels: caller names from config."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# The outcomes of one try, as ``gateway_webhook_deliveries_total`` labels them.
DELIVERED = "delivered"  # a 2xx in time
REFUSED = "refused"  # any other answer, redirects included (never followed)
TIMEOUT = "timeout"  # no answer within events.webhook_timeout_s
UNREACHABLE = "unreachable"  # no connection (refused, or not made within the connect timeout), or it broke
GONE = "gone"  # 410: the webhook is off until the next reload
DROPPED = "dropped"  # an event that reached events.webhook_max_age_s undelivered (not a try)


class WebhookMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "gateway_webhook_deliveries",
            "Webhook deliveries tried, by caller and outcome: delivered, refused (non-2xx, redirects included),"
            " timeout, unreachable, gone (410); dropped counts events given up at events.webhook_max_age_s.",
            ["caller", "outcome"],
            registry=r,
        )
        self.lag = Gauge(
            "gateway_webhook_lag_seconds",
            "Age of the caller's oldest undelivered event (0 when its webhook is caught up); reported by the"
            " process that delivers for the caller, 0 in the others.",
            ["caller"],
            registry=r,
        )
        self.off = Gauge(
            "gateway_webhook_off",
            "1 while the caller's webhook is off (its receiver answered 410) until the next reload.",
            ["caller"],
            registry=r,
        )
