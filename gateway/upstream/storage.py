"""The storage host's client: where dataset parts are fetched from (docs/design.md §11, "Downloads").

A ``ClientSession`` of its own, apart from the upstream's: it carries no
default header at all, so neither the upstream token nor anything the API
calls send can reach a storage host. Only URLs on an origin of
``datasets.part_origins`` are fetched; redirects are never followed; the
body is neither decompressed nor read here: the download route streams it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from yarl import URL

from gateway import errors
from gateway._aiohttp import turn_off_silent_resend

DEFAULT_PORTS = {"http": 80, "https": 443}
# What of the caller's request goes to the storage host: only which bytes it wants.
FORWARDED_REQUEST_HEADERS = ("Range", "If-Range")
# What a download may hold of a part before its caller takes it (aiohttp pauses reading at twice this), small per
# download. Measured with bench/scenarios/downloads.py (the gateway's CPU per GiB relayed): 64 KiB to 1 MiB cost the
# same; 4 MiB costs about 30% more (each turn joins more buffered reads).
READ_BUFFER = 1 << 20


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an absolute http(s) URL with no credentials in it; None for anything else."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return None
    scheme = (parsed.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or not parsed.host or parsed.user is not None or parsed.password is not None:
        return None
    return scheme, parsed.host.lower(), parsed.port or DEFAULT_PORTS[scheme]


def allowed_origin(url: str, origins: tuple[str, ...]) -> bool:
    """Whether ``url`` is on one of ``origins`` (``datasets.part_origins``): scheme, host and port all equal."""
    origin = origin_of(url)
    return origin is not None and any(origin == origin_of(allowed) for allowed in origins)


class StorageClient:
    """Fetches part files from storage hosts; one session, started and closed with the app."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, max_connections: int = 100) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            # No total deadline: a large part takes as long as its bytes keep coming.
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s, sock_read=self.read_timeout_s),
            trust_env=False,  # no environment proxy sees the signed URLs
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # the bytes go to the caller as stored, with their Content-Length
            skip_auto_headers=("User-Agent",),
            read_bufsize=READ_BUFFER,
        )
        turn_off_silent_resend(self._session)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @asynccontextmanager
    async def get(self, url: str, headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """``GET url`` with only ``headers`` (and ``Accept-Encoding: identity``); the answer, body unread.

        Failures to connect or to get an answer head are the contract's
        errors: 502 ``upstream_unreachable``, 504 ``upstream_timeout``.
        """
        assert self._session is not None, "StorageClient.start() was not awaited"
        sent = {"Accept-Encoding": "identity", **headers}
        try:
            async with self._session.get(URL(url, encoded=True), headers=sent, allow_redirects=False) as response:
                yield response
        except TimeoutError:
            raise errors.UpstreamTimeout("The storage host did not answer in time.") from None
        except aiohttp.ClientConnectorError as exc:
            raise errors.UpstreamUnreachable(f"The storage host could not be reached ({type(exc).__name__}).") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise errors.UpstreamUnreachable(
                f"The storage host closed the connection ({type(exc).__name__})."
            ) from None
        except aiohttp.ClientResponseError as exc:
            raise errors.UpstreamInvalidResponse(
                f"The storage host's answer was malformed ({type(exc).__name__})."
            ) from None
