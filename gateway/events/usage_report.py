"""``cohere-gateway usage``: the per-day usage totals, read from the store and printed (docs/operations.md).

It reads what the gateway keeps (SQLite at ``store.path``, or Redis with
``redis.url``) directly, with no gateway running, and never writes.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import date
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gateway.events.usage import COLUMNS
from gateway.events.usage_redis import totals_from
from gateway.events.usage_sqlite import read_totals

FORMATS = ("table", "csv", "json")


def parse_day(value: str) -> str:
    """``YYYY-MM-DD`` as given, or ValueError with what is wrong."""
    try:
        parsed = date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid date (YYYY-MM-DD)") from None
    if len(value) != len("YYYY-MM-DD"):
        raise ValueError(f"{value!r} is not a valid date (YYYY-MM-DD)")
    return parsed.isoformat()


def read_usage(config: GatewayConfig, since: str | None, until: str | None) -> list[dict[str, Any]]:
    """The report's rows; OSError, sqlite3.Error or a redis error when the store cannot be read."""
    url = config.redis.url_value
    if url:
        import redis  # only the Redis report needs the blocking client

        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            return totals_from(client, config.redis.key_prefix, since, until)
        finally:
            client.close()
    path = Path(config.store.path)
    if not path.exists():
        return []  # the gateway never ran with this store: nothing used
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        has_table = connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage_days'").fetchone()
        return read_totals(connection, since, until) if has_table else []
    finally:
        connection.close()


def render(rows: list[dict[str, Any]], form: str) -> str:
    """The rows as a table (aligned, a header), CSV (a header row, then the rows) or JSON (a list of objects)."""
    if form == "json":
        return json.dumps(rows, indent=2) + "\n"
    if form == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    cells = [list(COLUMNS)] + [[str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        # Names to the left, numbers to the right.
        "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    ]
    text = "\n".join(line.rstrip() for line in lines) + "\n"
    return text if rows else text + "(no usage in this period)\n"
