"""The simulated upstream's storage host: dataset part files at signed, expiring URLs, as Cohere's are on GCS.

A URL is ``{origin}{prefix}/storage/{dataset_id}/{file}`` with GCS-style
``X-Goog-Date``, ``X-Goog-Expires`` and ``X-Goog-Signature`` (an HMAC of the
path and the expiry) in its query. As Google Cloud Storage does, the route
refuses a request that carries an Authorization header (400), and an expired
URL or a bad signature (403), each with an XML body; it serves ``Range``
(206) with Content-Length and ``application/octet-stream``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiMapping

GOOG_DATE = "%Y%m%dT%H%M%SZ"
PART_CONTENT_TYPE = "application/octet-stream"


def _signature(key: bytes, path: str, date: str, expires: str) -> str:
    return hmac.new(key, f"GET\n{path}\n{date}\n{expires}".encode(), hashlib.sha256).hexdigest()


class SignedUrls:
    """Signs and checks storage URLs with a key of its own; the time is ``wall()``, in epoch seconds."""

    def __init__(self, key: bytes, ttl_s: float, wall: Callable[[], float]) -> None:
        self._key = key
        self.ttl_s = ttl_s
        self._wall = wall

    def sign(self, origin: str, path: str) -> str:
        date = datetime.fromtimestamp(self._wall(), UTC).strftime(GOOG_DATE)
        expires = str(max(1, int(self.ttl_s)))
        query = {
            "X-Goog-Algorithm": "GOOG4-HMAC-SHA256",
            "X-Goog-Date": date,
            "X-Goog-Expires": expires,
            "X-Goog-Signature": _signature(self._key, path, date, expires),
        }
        return f"{origin}{path}?{urlencode(query)}"

    def refusal(self, path: str, query: MultiMapping[str]) -> str | None:
        """Why a storage request to ``path`` with ``query`` is refused (403), or None if its signature holds."""
        date, expires, given = (query.get(name, "") for name in ("X-Goog-Date", "X-Goog-Expires", "X-Goog-Signature"))
        try:
            signed_at = datetime.strptime(date, GOOG_DATE).replace(tzinfo=UTC).timestamp()
            lifetime = int(expires)
        except ValueError:
            return "SignatureDoesNotMatch"
        if not hmac.compare_digest(given.encode(), _signature(self._key, path, date, expires).encode()):
            return "SignatureDoesNotMatch"
        if self._wall() > signed_at + lifetime:
            return "ExpiredToken"
        return None


def xml_error(status: int, code: str, message: str) -> web.Response:
    """An error as GCS writes one."""
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return web.Response(status=status, text=body, content_type="application/xml")


def serve_file(request: web.Request, urls: SignedUrls, file: Path | None) -> web.StreamResponse:
    """The storage route's answer to a GET or HEAD of one file (None: no such file)."""
    if "Authorization" in request.headers:
        return xml_error(400, "InvalidArgument", "A signed URL must not be sent with an Authorization header.")
    refusal = urls.refusal(request.path, request.query)
    if refusal is not None:
        message = "Request has expired" if refusal == "ExpiredToken" else "The request signature does not match."
        return xml_error(403, refusal, message)
    if file is None or not file.is_file():
        return xml_error(404, "NoSuchKey", "The specified key does not exist.")
    # Streamed from disk in chunks, with Range (206, 416), Content-Length and ETag as aiohttp serves files.
    return web.FileResponse(file, headers={"Content-Type": PART_CONTENT_TYPE})
