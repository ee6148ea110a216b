"""The simulated upstream's list paging: order, page size and opaque page tokens, as upstream reads them.

And the dataset list's query (``limit`` and ``offset``, with filters).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

# List paging, as upstream: the default and the largest page.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
ORDERS = ("created_at", "updated_at")


@dataclass(frozen=True, slots=True)
class PageQuery:
    """One list request: the order, the page size, and the (timestamp, id) the page starts after."""

    order_by: str
    page_size: int
    after: tuple[str, str] | None = None


def read_page_query(query: Mapping[str, str]) -> PageQuery | str:
    """The list request's query, or why upstream would answer it 400."""
    order_by = query.get("order_by", "created_at")
    if order_by not in ORDERS:
        return f"order_by must be one of {', '.join(ORDERS)}"
    size = query.get("page_size", "0")
    if not size.isdigit():
        return "page_size must be a non-negative integer"
    # As upstream documents: unset (or 0) is 50, and above 1000 is 1000.
    page_size = min(int(size), MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE
    after = None
    if query.get("page_token"):
        after = _read_token(query["page_token"], order_by)
        if after is None:
            return "invalid page_token"
    return PageQuery(order_by, page_size, after)


def page_token(order_by: str, stamp: str, batch_id: str) -> str:
    """An opaque token (URL-safe base64) for the page after ``(stamp, batch_id)`` in ``order_by`` order."""
    return base64.urlsafe_b64encode(json.dumps([order_by, stamp, batch_id]).encode()).decode()


def _read_token(token: str, order_by: str) -> tuple[str, str] | None:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error):
        return None
    if not (isinstance(decoded, list) and len(decoded) == 3 and all(isinstance(part, str) for part in decoded)):
        return None
    if decoded[0] != order_by:
        return None
    return decoded[1], decoded[2]


ListQuery = tuple[str | None, str | None, datetime | None, datetime | None, int, int | None]


def read_dataset_list_query(query: Mapping[str, str]) -> ListQuery | str:
    """``GET /v1/datasets``'s query (camelCase, as Cohere's), or why it is 400."""
    try:
        before, after = (_moment(query[n]) if query.get(n) else None for n in ("before", "after"))
        offset = int(query.get("offset") or 0)
        limit = int(query["limit"]) if query.get("limit") else None
    except ValueError:
        return "before and after must be RFC 3339 times, limit and offset integers"
    if offset < 0 or (limit is not None and limit < 0):
        return "limit and offset must not be negative"
    return query.get("datasetType") or None, query.get("validationStatus") or None, before, after, offset, limit


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
