"""Signed, expiring gateway URLs for dataset parts (docs/design.md §11, "Downloads").

With ``datasets.downloads: gateway`` every ``url`` and ``original_url`` of a
dataset answer's ``dataset_parts`` becomes
``{base_url}/v1/datasets/{id}/parts/{part_id}[/original]?caller=&expires=&signature=``:
the caller it was given to, a wall-clock expiry (``datasets.url_ttl_s``, epoch
seconds: every replica reads the same clock) and an HMAC-SHA256 of all of
them, so that nothing in the URL can be changed without the key.

The key is ``datasets.url_signing_key`` when configured (read from the config
in force, so a reload rotates it). Otherwise it is made at start: random,
and with ``redis.url`` shared through Redis, so that a URL signed by one
replica works on every other (the first process sets it with SET NX, the
others read it). While Redis cannot be reached at start, a process signs with
a key of its own and takes the shared one as soon as Redis answers; it keeps
accepting what it signed meanwhile.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from gateway import errors
from gateway.config.features import DatasetsSettings
from gateway.errors import RedisDown
from gateway.ops.logs import log_event
from gateway.replicas.link import RedisLink

log = logging.getLogger("gateway")

# The query a signed URL carries, each exactly once and nothing else.
QUERY = ("caller", "expires", "signature")
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class SignedPart:
    """What a verified download URL names: the caller it was given to, and which file of which part."""

    dataset_id: str
    part_id: str
    original: bool
    caller: str


def _message(part: SignedPart, expires: int) -> bytes:
    # Every field on a line of its own: ids and names never hold a newline, so no two URLs share a message.
    kind = "original" if part.original else "part"
    return f"v1\n{kind}\n{part.dataset_id}\n{part.part_id}\n{part.caller}\n{expires}".encode()


def signature_of(key: bytes, part: SignedPart, expires: int) -> str:
    return hmac.new(key, _message(part, expires), hashlib.sha256).hexdigest()


class SigningKeys:
    """The key that signs download URLs now, and every key a URL may have been signed with."""

    def __init__(self, settings: Callable[[], DatasetsSettings], link: RedisLink | None) -> None:
        self._settings = settings
        self._link = link
        self._made = secrets.token_bytes(KEY_BYTES)
        self._shared: bytes | None = None

    @property
    def current(self) -> bytes:
        configured: str | None = self._settings().signing_key
        if configured is not None:
            return configured.encode()
        return self._shared if self._shared is not None else self._made

    @property
    def accepted(self) -> tuple[bytes, ...]:
        """The current key, and the one this process made while it waited for the shared one."""
        current = self.current
        return (current,) if current == self._made else (current, self._made)

    async def start(self) -> None:
        """With ``redis.url``: take the shared key (set it if no process has); while Redis is lost, later."""
        if self._link is None:
            return
        try:
            await self._share()
        except RedisDown:
            log_event(log, logging.WARNING, "download URLs signed with a key of this process until Redis answers")
            self._link.in_background(self._share_once_up())

    async def _share(self) -> None:
        link = self._link
        assert link is not None
        key = link.key("datasets", "url-signing-key")
        made = self._made.hex()
        await link.call("signing_key", lambda r: r.set(key, made, nx=True))
        stored = await link.call("signing_key", lambda r: r.get(key))
        if stored is None:  # deleted between the two calls (ops rotating it): ours is set next start
            return
        self._shared = bytes.fromhex(stored.decode() if isinstance(stored, bytes) else str(stored))

    async def _share_once_up(self) -> None:
        link = self._link
        assert link is not None
        for _ in range(1000):  # bounded: each turn waits for Redis to be regained
            await link.until_up()
            try:
                await self._share()
            except RedisDown:
                continue
            return


class SignedLinks:
    """``PartLinks`` for ``datasets.downloads: gateway``: signs part URLs, and checks them when they come back."""

    def __init__(
        self,
        settings: Callable[[], DatasetsSettings],
        link: RedisLink | None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.keys = SigningKeys(settings, link)
        self.wall = wall

    async def start(self) -> None:
        await self.keys.start()

    def rewrite(self, dataset: dict[str, Any], *, caller: str, base_url: str) -> dict[str, Any]:
        parts = dataset.get("dataset_parts")
        dataset_id = dataset.get("id")
        if not isinstance(parts, list) or not isinstance(dataset_id, str):
            return dataset
        expires = math.ceil(self.wall() + self.settings().url_ttl_s)
        key = self.keys.current
        return {**dataset, "dataset_parts": [self._part(p, dataset_id, caller, base_url, expires, key) for p in parts]}

    def _part(self, part: Any, dataset_id: str, caller: str, base_url: str, expires: int, key: bytes) -> Any:
        if not isinstance(part, dict):
            return part
        part_id = part.get("id")
        rewritten = dict(part)
        for field, original in (("url", False), ("original_url", True)):
            if not part.get(field):
                continue  # absent, null or empty: nothing to sign
            # A part without a usable id gets no URL at all: never the upstream's own.
            signed = SignedPart(dataset_id, part_id, original, caller) if isinstance(part_id, str) else None
            rewritten[field] = None if signed is None else self.url(base_url, signed, expires, key)
        return rewritten

    @staticmethod
    def url(base_url: str, part: SignedPart, expires: int, key: bytes) -> str:
        path = f"/v1/datasets/{quote(part.dataset_id, safe='')}/parts/{quote(part.part_id, safe='')}"
        if part.original:
            path += "/original"
        signature = signature_of(key, part, expires)
        return f"{base_url}{path}?caller={quote(part.caller, safe='')}&expires={expires}&signature={signature}"

    def verify(self, dataset_id: str, part_id: str, original: bool, query: Any) -> SignedPart:
        """The part a download URL names, if its signature holds and it has not expired.

        ``query`` is the request's query (a multidict). Anything missing,
        repeated, malformed or not signed by a key in force is
        ``download_url_invalid``; a URL past its expiry is
        ``download_url_expired`` (checked after the signature, so only a real
        URL learns it has expired).
        """
        values: dict[str, str] = {}
        for name, value in query.items():  # every pair, repeated names included
            if name not in QUERY or name in values:
                raise errors.DownloadUrlInvalid()
            values[name] = value
        if len(values) != len(QUERY):
            raise errors.DownloadUrlInvalid()
        expires_text, signature = values["expires"], values["signature"]
        if not _EXPIRES.fullmatch(expires_text) or not _SIGNATURE.fullmatch(signature):
            raise errors.DownloadUrlInvalid()
        part = SignedPart(dataset_id, part_id, original, values["caller"])
        expires = int(expires_text)
        # Every accepted key is compared, whichever matches: the time taken tells nothing.
        matched = False
        for key in self.keys.accepted:
            matched |= hmac.compare_digest(signature_of(key, part, expires), signature)
        if not matched:
            raise errors.DownloadUrlInvalid()
        if self.wall() >= expires:
            raise errors.DownloadUrlExpired()
        return part
