"""The scenarios, in the order they run and are reported.

Each module has ``TITLE`` (for the log), ``measure(env)`` (its results, ``{}`` when it was skipped), ``keys(result)``
(its figures in the JSON line) and ``lines(env, result)`` (its section of the report).
"""

from types import ModuleType

from bench.scenarios import (
    callers,
    config,
    downloads,
    feed,
    follow,
    hits,
    memory,
    miss,
    notice,
    reload,
    replicas,
    uploads,
    upstream,
    webhooks,
)

SCENARIOS: dict[str, ModuleType] = {
    "hits": hits,
    "upstream": upstream,
    "miss": miss,
    "memory": memory,
    "callers": callers,
    "config": config,
    "notice": notice,
    "replicas": replicas,
    "reload": reload,
    "downloads": downloads,
    "uploads": uploads,
    "webhooks": webhooks,
    "feed": feed,
    "follow": follow,
}
