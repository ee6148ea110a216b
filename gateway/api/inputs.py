"""What a caller may send to the batch API (docs/design.md §8), checked as pure functions.

The list query (and the dataset list's, §11), the create body (valid Unicode throughout), the cancel body
and the ``Idempotency-Key`` are checked before anything reaches the
upstream, and every problem is named in one 400 ``invalid_request``. Also
here: whether a listed batch matches every field a create sent (the
recovery of an ambiguous create, ``gateway.api.create``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from multidict import MultiMapping

from gateway import errors
from gateway.datasets.facts import VALIDATION_STATUSES
from gateway.upstream.cohere import UNPARSEABLE

# 1 to 255 visible ASCII characters (docs/design.md §8).
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_PAGE_TOKEN = re.compile(r"[A-Za-z0-9._~=-]{1,1024}")
# Any positive integer: above MAX_PAGE_SIZE it is forwarded as MAX_PAGE_SIZE, as the upstream coerces it.
_PAGE_SIZE = re.compile(r"[0-9]{1,18}")
MAX_PAGE_SIZE = 1000
ORDERS = ("created_at", "updated_at")
LIST_PARAMETERS = ("page_size", "page_token", "order_by")
# GET /v1/datasets (docs/design.md §11): the SDK sends limit and offset as numbers ("10" or "10.0").
_DATASET_TYPE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_NUMBER = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
CREATE_FIELDS = ("name", "input_dataset_id", "model")
# A listed batch must carry these, equal to the create's, to be taken for the batch a create made.
IDENTIFYING_FIELDS = ("name", "input_dataset_id")
# Bad fields named in one answer at most; a body can hold thousands.
MAX_NAMED_FIELDS = 10


def list_query(query: MultiMapping[str]) -> tuple[tuple[str, str], ...]:
    """The list call's query as it goes upstream: only the three known parameters, each checked."""
    problems = [f"unknown parameter '{_shown(name)}'" for name in query if name not in LIST_PARAMETERS]
    given: list[tuple[str, str]] = []
    for name in LIST_PARAMETERS:
        values = query.getall(name, [])
        if len(values) > 1:
            problems.append(f"'{name}' given more than once")
        elif values:
            problem = _list_parameter_problem(name, values[0])
            if problem:
                problems.append(problem)
            elif name == "page_size":
                given.append((name, str(min(int(values[0]), MAX_PAGE_SIZE))))
            else:
                given.append((name, values[0]))
    if problems:
        raise errors.InvalidRequest("Bad list query: " + "; ".join(dict.fromkeys(problems)) + ".")
    return tuple(given)


def _list_parameter_problem(name: str, value: str) -> str | None:
    if name == "page_size":
        if not _PAGE_SIZE.fullmatch(value) or int(value) < 1:
            return "page_size must be a positive integer"
    elif name == "page_token":
        if not _PAGE_TOKEN.fullmatch(value):
            return "page_token must be 1 to 1024 characters of letters, digits and '._~=-'"
    elif value not in ORDERS:
        return "order_by must be created_at or updated_at"
    return None


def dataset_list_query(query: MultiMapping[str]) -> tuple[tuple[str, str], ...]:
    """``GET /v1/datasets``'s query as it goes upstream: only its six parameters, each at most once and checked."""
    problems = [f"unknown parameter '{_shown(name)}'" for name in query if name not in DATASET_LIST_PARAMETERS]
    given: list[tuple[str, str]] = []
    for name, check in DATASET_LIST_PARAMETERS.items():
        values = query.getall(name, [])
        if len(values) > 1:
            problems.append(f"'{name}' given more than once")
        elif values and not check(values[0]):
            problems.append(f"'{name}' must be {DATASET_LIST_RULES[name]}")
        elif values:
            given.append((name, values[0]))
    if problems:
        raise errors.InvalidRequest("Bad list query: " + "; ".join(dict.fromkeys(problems)) + ".")
    return tuple(given)


def _rfc3339(value: str) -> bool:
    if not _RFC3339.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


DATASET_LIST_PARAMETERS: dict[str, Callable[[str], bool]] = {
    "datasetType": lambda value: bool(_DATASET_TYPE.fullmatch(value)),
    "before": _rfc3339,
    "after": _rfc3339,
    "limit": lambda value: bool(_NUMBER.fullmatch(value)),
    "offset": lambda value: bool(_NUMBER.fullmatch(value)),
    "validationStatus": lambda value: value in VALIDATION_STATUSES,
}
DATASET_LIST_RULES = {
    "datasetType": "a dataset type such as batch-embed-v2-input",
    "before": "an RFC 3339 date-time",
    "after": "an RFC 3339 date-time",
    "limit": "a number of at least 0",
    "offset": "a number of at least 0",
    "validationStatus": "one of " + ", ".join(VALIDATION_STATUSES),
}


def _shown(text: str) -> str:
    """A caller-sent name, bounded and printable, for an error message."""
    return text[:64].encode("ascii", "backslashreplace").decode("ascii")


def idempotency_key(values: list[str]) -> str | None:
    """The create's ``Idempotency-Key``, if it sent one; 400 ``invalid_request`` if it is malformed."""
    if not values:
        return None
    if len(values) > 1:
        raise errors.InvalidRequest("Send at most one Idempotency-Key header.")
    if not _IDEMPOTENCY_KEY.fullmatch(values[0]):
        raise errors.InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters.")
    return values[0]


def create_document(content_type: str, body: bytes) -> dict[str, Any]:
    """The create's body as JSON: an object with non-empty string ``name``, ``input_dataset_id`` and ``model``,
    and no string in it, key or value, that is not valid Unicode."""
    if content_type != "application/json":
        raise errors.InvalidRequest("Send the batch as JSON, with 'Content-Type: application/json'.")
    document = _json_object(body, "The body must be a JSON object describing the batch.")
    problems = []
    bad = [name for name in CREATE_FIELDS if not _non_empty_string(document.get(name))]
    if bad:
        problems.append("Each of these fields must be a non-empty string: " + ", ".join(bad) + ".")
    # JSON lets a body escape half of a surrogate pair ("\ud800"): no UTF-8 can
    # carry it, so it is refused here rather than fail later or reach the upstream.
    bad = _not_unicode(document)
    if bad:
        problems.append("These fields hold a string that is not valid Unicode: " + _listed(bad) + ".")
    if problems:
        raise errors.InvalidRequest(" ".join(problems))
    return document


def _not_unicode(document: dict[str, Any]) -> list[str]:
    """The path of each string in ``document`` (a key's own path for a bad key) that UTF-8 cannot encode."""
    bad: list[str] = []
    pending: list[tuple[str, object]] = [("", document)]
    # A stack, not recursion: json.loads accepts nesting deeper than Python's recursion limit.
    while pending:
        path, value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{_shown(key)}" if path else _shown(key)
                if not _encodable(key):
                    bad.append(child)
                pending.append((child, item))
        elif isinstance(value, list):
            pending += ((f"{path}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, str) and not _encodable(value):
            bad.append(path)
    return sorted(bad)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED_FIELDS])
    return shown if len(names) <= MAX_NAMED_FIELDS else f"{shown} and {len(names) - MAX_NAMED_FIELDS} more"


def check_cancel_body(body: bytes) -> None:
    """A cancel takes no body: empty, or ``{}``."""
    if body.strip() and _json_object(body, "A cancel takes no body (or '{}').") != {}:
        raise errors.InvalidRequest("A cancel takes no body (or '{}').")


def _json_object(body: bytes, message: str) -> dict[str, Any]:
    try:
        # JSON between systems is UTF-8 (RFC 8259); json.loads would also guess
        # UTF-16 and UTF-32 from bytes, and the upstream would get what it cannot read.
        document = json.loads(body.decode("utf-8"))
    except UNPARSEABLE:
        raise errors.InvalidRequest(message) from None
    if not isinstance(document, dict):
        raise errors.InvalidRequest(message)
    return document


def _non_empty_string(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def matches_create(batch: object, document: dict[str, Any]) -> bool:
    """Whether a listed batch may be the one a create with ``document`` made.

    Every field of the create that the batch carries must be equal (the
    upstream adds fields of its own, and may not echo every one it was
    sent), and the identifying ones must be there.
    """
    return (
        isinstance(batch, dict)
        and all(name in batch for name in IDENTIFYING_FIELDS)
        and all(batch[name] == value for name, value in document.items() if name in batch)
    )
