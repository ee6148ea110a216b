"""The gateway's configuration: ``config.yaml`` read into frozen, validated objects.

``model`` holds the sections, ``load`` reads, interpolates and validates a file
(every problem at once, each named by its key's dotted path), and ``keys`` the
checks on caller keys (too short, well known, the demo's) and key files. The
names the rest of the gateway uses are re-exported here.
"""

from gateway.config.keys import (
    DEMO_BILLING_KEY,
    DEMO_KEYS,
    DEMO_REPORTING_KEY,
    MIN_CALLER_KEY_LENGTH,
    WEAK_KEYS,
    TokenFile,
    duplicate_callers,
    weak_key_problem,
)
from gateway.config.load import ConfigError, deep_merge, interpolate, load_config, read_yaml, unknown_key, validate
from gateway.config.model import (
    DEFAULT_ALLOW,
    OPERATIONS,
    BatchesSettings,
    BreakerSettings,
    CacheSettings,
    CallerSettings,
    GatewayConfig,
    LoggingSettings,
    Operation,
    RedisSettings,
    Scope,
    ServerSettings,
    StoreSettings,
    TtlSettings,
    UpstreamSettings,
)
from gateway.config.section import RateLimit

__all__ = [
    "DEFAULT_ALLOW",
    "DEMO_BILLING_KEY",
    "DEMO_KEYS",
    "DEMO_REPORTING_KEY",
    "MIN_CALLER_KEY_LENGTH",
    "OPERATIONS",
    "WEAK_KEYS",
    "BatchesSettings",
    "BreakerSettings",
    "CacheSettings",
    "CallerSettings",
    "ConfigError",
    "GatewayConfig",
    "LoggingSettings",
    "Operation",
    "RateLimit",
    "RedisSettings",
    "Scope",
    "ServerSettings",
    "StoreSettings",
    "TokenFile",
    "TtlSettings",
    "UpstreamSettings",
    "deep_merge",
    "duplicate_callers",
    "interpolate",
    "load_config",
    "read_yaml",
    "unknown_key",
    "validate",
    "weak_key_problem",
]
