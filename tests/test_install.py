"""A fresh clone installs exactly what was tested: every installed package at its locked version.

``make`` installs with ``pip -c .ci/constraints.txt``; this checks that what the
tests run on is what that file says, so that a registry release can never
change a clone that passed (a new redis-py once broke mypy on one).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / ".ci" / "constraints.txt"


def _normalized(name: str) -> str:
    # PEP 503: case, '-', '_' and '.' do not tell two names apart.
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(text: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file, by normalized name."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{LOCK.name}: not an exact pin: {line}"  # a range would let the registry choose
            pins[_normalized(name)] = version.strip()
    return pins


def installed_versions() -> dict[str, str]:
    found = {_normalized(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    found.pop("cohere-gateway", None)  # the project itself, installed from this tree
    return found


def test_every_installed_package_is_the_locked_version() -> None:
    locked = locked_versions(LOCK.read_text(encoding="utf-8"))
    installed = installed_versions()
    differ = {name: (version, locked.get(name)) for name, version in installed.items() if locked.get(name) != version}
    assert not differ, f"installed (version, locked) that differ from {LOCK}: {differ}; run `make lock` to upgrade"


def test_the_lock_pins_every_runtime_dependency_and_the_build_tools() -> None:
    locked = locked_versions(LOCK.read_text(encoding="utf-8"))
    requirements = metadata.requires("cohere-gateway") or []
    runtime = {
        _normalized(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]) for req in requirements if "extra ==" not in req
    }
    assert runtime - set(locked) == set()
    assert {"pip", "setuptools", "redis", "hiredis", "aiohttp"} <= set(locked)
