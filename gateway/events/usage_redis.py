"""Usage totals on the shared Redis (docs/design.md §12, "Usage"), for replicas.

Keys, under ``redis.key_prefix``:

- ``usage:batch:{batch_id}``: set once when the batch is counted (what
  makes a count happen once across replicas and restarts);
- ``usage:day:{YYYY-MM-DD}``: a hash, one field per caller, model and
  column (``caller``, ``model`` and the column as a JSON list), added to
  with ``HINCRBY``;
- ``usage:days``: a sorted set of the days that have totals.

A tally is one Lua script: the batch key is set unless present, and only
then the day's hash grows. None of these keys expires: they need a Redis
that never evicts them, as the records do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date
from functools import partial
from typing import Any

from gateway.events.usage import COUNTS, Tally, sum_rows
from gateway.replicas.link import RedisLink

# KEYS: the batch key, the day's hash, the days; ARGV: the day's ordinal, then field and amount pairs.
_ADD = """
if redis.call('SET', KEYS[1], '1', 'NX') == false then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
return 1
"""


def field_of(caller: str, model: str, column: str) -> str:
    return json.dumps([caller, model, column], separators=(",", ":"))


def day_keys(key: Callable[..., str], tally: Tally) -> list[str]:
    return [key("usage", "batch", tally.batch_id), key("usage", "day", tally.day), key("usage", "days")]


def add_args(tally: Tally) -> list[str | int]:
    args: list[str | int] = [date.fromisoformat(tally.day).toordinal()]
    for column, amount in tally.counts().items():
        args += [field_of(tally.caller, tally.model, column), amount]
    return args


def ordinal_bounds(since: str | None, until: str | None) -> tuple[str, str]:
    low = str(date.fromisoformat(since).toordinal()) if since else "-inf"
    high = str(date.fromisoformat(until).toordinal()) if until else "+inf"
    return low, high


def rows_from_hashes(hashes: list[dict[bytes, bytes]]) -> list[dict[str, Any]]:
    """The report's rows from the days' hashes (fields this version cannot read are passed over)."""
    days: list[tuple[str, str, dict[str, int]]] = []
    for fields in hashes:
        for name, amount in fields.items():
            try:
                caller, model, column = json.loads(name)
                counts = {str(column): int(amount)}
            except (ValueError, TypeError):
                continue
            if column in COUNTS:
                days.append((str(caller), str(model), counts))
    return sum_rows(days)


class RedisUsage:
    """``UsageStore`` on Redis; every call may raise ``RedisDown`` (the tally is then not counted)."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def add(self, tally: Tally) -> bool:
        keys, args = day_keys(self._link.key, tally), add_args(tally)
        added = await self._link.call("usage_add", lambda r: r.eval(_ADD, len(keys), *keys, *args))
        return bool(added)

    async def totals(self, since: str | None, until: str | None) -> list[dict[str, Any]]:
        low, high = ordinal_bounds(since, until)
        days_key = self._link.key("usage", "days")
        days: list[Any] = await self._link.call("usage_days", partial(_days, days_key, low, high))
        hashes: list[dict[bytes, bytes]] = []
        for ordinal in days:
            key = self._link.key("usage", "day", date.fromordinal(int(ordinal)).isoformat())
            hashes.append(await self._link.call("usage_day", partial(_hgetall, key)))
        return rows_from_hashes(hashes)


async def _days(key: str, low: str, high: str, client: Any) -> list[Any]:
    days: list[Any] = await client.zrangebyscore(key, low, high)
    return days


async def _hgetall(key: str, client: Any) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = await client.hgetall(key)
    return fields


def totals_from(client: Any, prefix: str, since: str | None, until: str | None) -> list[dict[str, Any]]:
    """The report's rows read with a plain (blocking) redis client: ``cohere-gateway usage``, no gateway running."""

    def key(*parts: str) -> str:
        return prefix + ":".join(parts)

    low, high = ordinal_bounds(since, until)
    days = client.zrangebyscore(key("usage", "days"), low, high)
    return rows_from_hashes([client.hgetall(key("usage", "day", date.fromordinal(int(d)).isoformat())) for d in days])
