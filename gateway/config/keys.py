"""Caller keys the gateway refuses, and keys read from files.

A caller key is a bearer secret: one that is short, well known, or published
with the gateway (the demo's) can be guessed, so it is refused whatever form
the config gives it in (in clear, ``key_sha256``, ``key_file``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

# A caller key is a bearer secret: short ones can be guessed.
MIN_CALLER_KEY_LENGTH = 16

# The demo's callers (gateway/demo/mode.py) use these keys. They are published in the
# README, so they are accepted only with --demo, never from a config file.
DEMO_BILLING_KEY = "demo-billing-key-0001"
DEMO_REPORTING_KEY = "demo-reporting-key-0002"
DEMO_KEYS = frozenset({DEMO_BILLING_KEY, DEMO_REPORTING_KEY})
# Keys anyone would try first, or that an example once published. A caller
# whose key (in clear or as key_sha256) is one of them is refused; the short
# ones are refused by length too, but a key_sha256 hides the length.
WEAK_KEYS = frozenset(
    {
        "",
        "test",
        "testing",
        "password",
        "passw0rd",
        "password1",
        "password123",
        "changeme",
        "change-me",
        "changeit",
        "replace-me",
        "secret",
        "admin",
        "root",
        "guest",
        "default",
        "example",
        "demo",
        "key",
        "apikey",
        "api-key",
        "token",
        "letmein",
        "qwerty",
        "hunter2",
        "123456",
        "1234567890",
        "12345678",
        "123456789",
        "1234567890123456",
        "0000000000000000",
        "some-key-of-16-chars-or-more",
    }
)
_WEAK_DIGESTS = frozenset(hashlib.sha256(key.encode()).hexdigest() for key in WEAK_KEYS)
_DEMO_DIGESTS = frozenset(hashlib.sha256(key.encode()).hexdigest() for key in DEMO_KEYS)
NEW_KEY_HINT = "make a new one with: cohere-gateway new-caller NAME"


def weak_key_problem(hexdigest: str, demo: bool = False) -> str | None:
    """Why a caller key with this sha256 (hex) must not be accepted, or None if it may."""
    if hexdigest in _WEAK_DIGESTS:
        return f"is a well-known weak key; {NEW_KEY_HINT}"
    if hexdigest in _DEMO_DIGESTS and not demo:
        return f"is a demo key (published with the gateway), accepted only with --demo; {NEW_KEY_HINT}"
    return None


def check_usable_key(key: str, demo: bool) -> None:
    """Raise ValueError (pydantic's field error) if a caller key in clear is too short, weak or the demo's."""
    if len(key) < MIN_CALLER_KEY_LENGTH:
        raise ValueError(f"must be at least {MIN_CALLER_KEY_LENGTH} characters (is its environment variable set?)")
    problem = weak_key_problem(hashlib.sha256(key.encode()).hexdigest(), demo)
    if problem:
        raise ValueError(problem)


@dataclass(frozen=True, slots=True)
class TokenFile:
    """A token read from a file (a mounted secret); re-read on every reload."""

    path: Path
    token: SecretStr


def read_token_file(value: object) -> TokenFile:
    """A config value naming a token file, read now (pydantic's plain validator for ``*_file`` keys)."""
    if isinstance(value, TokenFile):
        return value
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError("must be a file path")
    path = Path(value)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ValueError(f"{path} is empty")
    return TokenFile(path=path, token=SecretStr(token))


def duplicate_callers(callers: Any) -> list[str]:
    """Callers sharing a name or a key, checked on the raw list.

    This runs beside model validation rather than inside it, so that a
    duplicate is reported even when another caller has a problem of its own.
    """
    if not isinstance(callers, list):
        return []
    problems: list[str] = []
    names: dict[str, int] = {}
    digests: dict[str, int] = {}
    for index, caller in enumerate(callers):
        if not isinstance(caller, dict):
            continue
        name, key, digest = caller.get("name"), caller.get("key"), caller.get("key_sha256")
        if isinstance(name, str):
            if name in names:
                problems.append(f"callers.{index}.name: duplicate of callers.{names[name]}.name")
            names.setdefault(name, index)
        field, hexdigest = (
            ("key", hashlib.sha256(key.encode()).hexdigest())
            if isinstance(key, str) and key
            else ("key_sha256", digest.lower() if isinstance(digest, str) else None)
        )
        if hexdigest:
            if hexdigest in digests:
                problems.append(f"callers.{index}.{field}: same key as callers.{digests[hexdigest]}")
            digests.setdefault(hexdigest, index)
    return problems
