"""The contract's error table as one exception tree, rendered in one place.

Every error a caller can see is a ``GatewayError`` subclass whose ``status``
and ``code`` are one row of docs/design.md §5::

    GatewayError
    ├── CallerError            caused by the caller; never answered from stale
    │   ├── Unauthorized, InvalidBatchId, RouteNotFound, MethodNotAllowed,
    │   ├── MalformedRequest (not in the contract's table: unparseable HTTP),
    │   ├── RequestTooLarge (BodyTooLarge), CallerRateLimited, ExpectationFailed,
    │   ├── OperationNotAllowed, InvalidRequest, NotVisible (an ``own`` caller's 404),
    │   ├── IdempotencyKeyReused, IdempotencyKeyInUse, RequestTimeout (a body that stopped),
    │   └── ClientDisconnected (not in the contract's table: no one is left to answer)
    ├── StoreUnavailable       the gateway's own store cannot answer (§8, §10)
    ├── UpstreamAnswer         the upstream answered about the batch itself
    │   └── BadRequest, NotFound
    └── UpstreamFailure        the upstream failed or must be spared; a stale
        ├── UpstreamAuthFailed, UpstreamRateLimited, RateLimited,
        ├── UpstreamUnavailable, UpstreamError, UpstreamTimeout,
        └── UpstreamUnreachable, UpstreamInvalidResponse
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import ClassVar


class GatewayError(Exception):
    """One row of the contract's error table."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "The gateway failed unexpectedly."

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: float | None = None,
        upstream_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.retry_after_s = retry_after_s
        self.upstream_status = upstream_status
        self.extra_headers = headers or {}
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        """Headers beside the body: ``Retry-After`` where due, and any extra ones."""
        if self.retry_after_s is None:
            return dict(self.extra_headers)
        # Retry-After is whole seconds; rounding up never invites an early retry.
        return {**self.extra_headers, "Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self, request_id: str, redact: Callable[[str], str] | None = None) -> bytes:
        """The one JSON error shape; ``message`` first so the SDK shows it.

        ``redact`` cleans the message, which may quote the upstream (a 400's
        or 404's own text), and an upstream may echo the token it was sent.
        """
        payload: dict[str, object] = {
            "message": self.message if redact is None else redact(self.message),
            "code": self.code,
            "request_id": request_id,
        }
        if self.upstream_status is not None:
            payload["upstream_status"] = self.upstream_status
        return json.dumps(payload).encode()


class InternalError(GatewayError):
    """A bug in the gateway: reported without detail, logged in full."""


class CallerError(GatewayError):
    """Caused by the caller's request; stale entries are never served for it."""


class Unauthorized(CallerError):
    status = 401
    code = "unauthorized"
    default_message = "Missing or unknown caller key. Send 'Authorization: Bearer <your caller key>'."


class InvalidBatchId(CallerError):
    status = 400
    code = "invalid_batch_id"
    default_message = (
        "Batch ids are 1 to 128 characters of letters, digits, '_' and '-', starting with a letter or digit."
    )


class RouteNotFound(CallerError):
    status = 404
    code = "route_not_found"
    default_message = (
        "No such route. The gateway serves GET and POST /v2/batches, GET /v2/batches/{id}"
        " and POST /v2/batches/{id}:cancel."
    )


class MalformedRequest(CallerError):
    status = 400
    code = "malformed_request"
    default_message = "The request is not valid HTTP."


class MethodNotAllowed(CallerError):
    status = 405
    code = "method_not_allowed"
    default_message = "Method not allowed on this route."


class RequestTooLarge(CallerError):
    status = 431
    code = "request_too_large"
    default_message = "The request line or headers are too large."


class BodyTooLarge(RequestTooLarge):
    status = 413
    default_message = "The request body is too large."


class CallerRateLimited(CallerError):
    status = 429
    code = "caller_rate_limited"
    default_message = "This caller is over its own rate limit."


class ExpectationFailed(CallerError):
    status = 417
    code = "expectation_failed"
    default_message = "The gateway only understands 'Expect: 100-continue'."


class OperationNotAllowed(CallerError):
    status = 403
    code = "operation_not_allowed"
    default_message = "This caller may not use this operation."


class InvalidRequest(CallerError):
    status = 400
    code = "invalid_request"
    default_message = "The request is not valid."


class NotVisible(CallerError):
    """A batch an ``own``-scoped caller did not create: the same answer as a batch that does not exist."""

    status = 404
    code = "not_found"
    default_message = "No batch with this id."


class IdempotencyKeyReused(CallerError):
    status = 422
    code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was already used with another request body."


class IdempotencyKeyInUse(CallerError):
    status = 409
    code = "idempotency_key_in_use"
    default_message = "A request with this Idempotency-Key is still running. Retry after the given time."


class RequestTimeout(CallerError):
    """A request body that sent no byte for ``server.body_timeout_s`` (docs/design.md §7); the connection is closed."""

    status = 408
    code = "request_timeout"
    default_message = "The request body stopped arriving. Send it again, without pauses."

    def headers(self) -> dict[str, str]:
        # RFC 9110 15.5.9: a 408 means the server closes the connection rather than wait on.
        return {**super().headers(), "Connection": "close"}


class ClientDisconnected(CallerError):
    """The client hung up before its request body was whole: nothing is done, and the answer reaches no one.

    Its status, nginx's 499, is seen only in the access log and the request
    metrics, where it keeps a client's hang-up from counting as a server error.
    """

    status = 499
    code = "client_closed_request"
    default_message = "The client closed the connection before its request body was whole."


class DownloadUrlInvalid(CallerError):
    """A download URL whose signature, caller or permission does not hold (docs/design.md §11)."""

    status = 403
    code = "download_url_invalid"
    default_message = "This download URL is not valid. Get a fresh one from the dataset."


class DownloadUrlExpired(CallerError):
    """A download URL past its expiry (docs/design.md §11)."""

    status = 403
    code = "download_url_expired"
    default_message = "This download URL has expired. Get a fresh one from the dataset."


class CursorExpired(CallerError):
    """An events cursor older than the events kept (docs/design.md §12)."""

    status = 410
    code = "cursor_expired"
    default_message = "This cursor is older than the events kept. List what you need, then resume from after=latest."


class StoreUnavailable(GatewayError):
    """The gateway's own record store cannot answer: never a guess."""

    status = 503
    code = "store_unavailable"
    default_message = "The gateway cannot read its own records right now. Retry later."


class UpstreamAnswer(GatewayError):
    """The upstream answered about the batch itself; passed on, never stale."""


class BadRequest(UpstreamAnswer):
    status = 400
    code = "bad_request"
    default_message = "The upstream rejected the request."


class NotFound(UpstreamAnswer):
    status = 404
    code = "not_found"
    default_message = "No batch with this id."


class UpstreamFailure(GatewayError):
    """The upstream failed or must be spared: a stale entry may answer instead."""

    status = 502


class UpstreamAuthFailed(UpstreamFailure):
    status = 502
    code = "upstream_auth_failed"
    default_message = (
        "The upstream refused the gateway's token. Operators have to fix it; it is not the caller's fault."
    )


class UpstreamRateLimited(UpstreamFailure):
    status = 429
    code = "upstream_rate_limited"
    default_message = "The upstream is rate limiting the gateway. Retry after the given time."


class RateLimited(UpstreamFailure):
    status = 429
    code = "rate_limited"
    default_message = "The gateway's own upstream budget is spent. Retry after the given time."


class UpstreamUnavailable(UpstreamFailure):
    status = 503
    code = "upstream_unavailable"
    default_message = "The upstream is unavailable. Retry after the given time."


class UpstreamError(UpstreamFailure):
    status = 502
    code = "upstream_error"
    default_message = "The upstream failed to answer."


class UpstreamTimeout(UpstreamFailure):
    status = 504
    code = "upstream_timeout"
    default_message = "The upstream did not answer in time."


class UpstreamUnreachable(UpstreamFailure):
    status = 502
    code = "upstream_unreachable"
    default_message = "The upstream could not be reached."


class UpstreamInvalidResponse(UpstreamFailure):
    status = 502
    code = "upstream_invalid_response"
    default_message = "The upstream's answer was not the expected JSON, or was too large."


class RedisDown(Exception):
    """Redis is lost (or just failed): the caller falls back to its local policy."""
