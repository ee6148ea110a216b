"""Requests refused before the app: the ones aiohttp could not parse, and an ``Expect`` the gateway will not meet.

aiohttp answers both in text/plain, before any middleware runs; these
render them in the contract's JSON shape, with an access log line and
metrics of their own (routes ``unparsed`` and ``expect``).
"""

from __future__ import annotations

from aiohttp import hdrs, web

from gateway import errors
from gateway._aiohttp import Handler, HttpProcessingError, LineTooLong
from gateway.api import rules
from gateway.api.app import error_response, record_request, request_id_for
from gateway.api.state import GatewayState

# The route label of requests aiohttp could not parse (they never reach the router).
UNPARSED_ROUTE = "unparsed"
# The route label of requests refused for their Expect header (before the router).
EXPECT_ROUTE = "expect"


def protocol_error(status: int, exc: BaseException | None) -> errors.GatewayError:
    """The contract's error for a request aiohttp could not parse."""
    text = str(getattr(exc, "message", "") or "")
    if isinstance(exc, LineTooLong) or "too many headers" in text.lower():
        return errors.RequestTooLarge()
    if status == 413:
        return errors.BodyTooLarge()
    if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
        return errors.MalformedRequest()
    return errors.InternalError()


def account_unparsed(state: GatewayState, request_id: str, status: int) -> None:
    """Metrics and the access log line for a request that never reached the app."""
    record_request(
        state,
        request_id=request_id,
        caller="-",
        route=UNPARSED_ROUTE,
        path=None,
        batch_id=None,
        status=status,
        cache="-",
        trace=None,
        elapsed_s=None,
        method=None,
    )


class ExpectCheck:
    """A request handler that first answers an ``Expect`` the gateway will not meet.

    aiohttp answers an unknown ``Expect`` in text/plain, and sends
    ``100 Continue`` before anyone looks at ``Content-Length``; the contract
    wants 417 ``expectation_failed``, and 413 at once for a body too large
    (RFC 9110 10.1.1), both in its JSON shape.
    """

    def __init__(self, state: GatewayState, handler: Handler) -> None:
        self._state = state
        self._handler = handler
        self.refused = False  # answered here, before any 100 Continue: the body was never asked for

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        error = expect_error(
            request.headers.getall(hdrs.EXPECT),
            request.content_length,
            rules.body_limit(self._state.snapshot.config, request.method, request.path),
        )
        if error is None:
            return await self._handler(request)
        self.refused = True
        request_id = request_id_for(request.headers)
        response = error_response(error, request_id)
        if request.content_length or request.headers.get(hdrs.TRANSFER_ENCODING):
            response.force_close()  # the body was never asked for: it is not read
        record_request(
            self._state,
            request_id=request_id,
            caller="-",
            route=EXPECT_ROUTE,
            path=None,
            batch_id=None,
            status=error.status,
            cache="-",
            trace=None,
            elapsed_s=None,
            method=request.method,
        )
        return response


def expect_error(expect: list[str], content_length: int | None, max_body_bytes: int) -> errors.GatewayError | None:
    """The contract's error for a request's ``Expect`` headers, or None to answer it as usual.

    ``max_body_bytes`` is ``rules.body_limit`` for the request: an upload past
    ``datasets.max_upload_bytes`` is 413 before any ``100 Continue``.
    """
    # An empty Expect asks for nothing (aiohttp ignores it too).
    if any(value.strip() and value.strip().lower() != "100-continue" for value in expect):
        return errors.ExpectationFailed()
    if content_length is not None and content_length > max_body_bytes:
        return errors.BodyTooLarge()
    return None
