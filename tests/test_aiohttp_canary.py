"""The private aiohttp names the gateway builds on are all there, of the kind it expects, and only in one module.

``gateway/_aiohttp.py`` lists each one (``MIRRORED``). An aiohttp upgrade
that renames, removes or changes one of them fails here, naming it, rather
than in production on the rare path that touches it.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web_protocol

from gateway import _aiohttp
from gateway._aiohttp import MIRRORED, Mirror

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
# aiohttp's modules that are not its public API: imported by gateway/_aiohttp.py alone.
INTERNAL_MODULES = (
    "base_protocol",
    "client",
    "helpers",
    "http_exceptions",
    "http_parser",
    "streams",
    "web_protocol",
    "web_runner",
    "web_server",
)
# Where a signature is part of what the gateway relies on: the parameters it passes or overrides with.
SIGNATURES = {
    ("aiohttp.web_protocol.RequestHandler", "_handle_request"): ["self", "request", "start_time", "request_handler"],
    ("aiohttp.web_runner.AppRunner", "_make_server"): ["self"],
    ("aiohttp.web_protocol", "_ErrInfo"): ["status", "exc", "message"],
    ("aiohttp.web_protocol", "RequestHandler"): ["manager", "loop"],
}


def owner_of(mirror: Mirror) -> object:
    """The module or class ``mirror.owner`` names."""
    # "aiohttp.web_protocol.RequestHandler": a module path, then perhaps a class.
    parts = mirror.owner.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ImportError(mirror.owner)


def assigned_in_init(cls: type, name: str) -> bool:
    """Whether some ``__init__`` in ``cls``'s MRO sets ``self.<name>``, or a ``__slots__`` declares it."""
    for klass in cls.__mro__:
        if name in getattr(klass, "__slots__", ()):
            return True
        init = klass.__dict__.get("__init__")
        if inspect.isfunction(init) and re.search(
            rf"self\.{re.escape(name)}\b\s*(:[^=\n]*)?=", inspect.getsource(init)
        ):
            return True
    return False


def kind_problem(mirror: Mirror) -> str | None:
    """What is wrong with ``mirror`` in the aiohttp installed, or None."""
    try:
        owner = owner_of(mirror)
    except (ImportError, AttributeError):
        return f"{mirror.owner} is gone"
    if mirror.kind == "attribute":
        assert isinstance(owner, type)
        return None if assigned_in_init(owner, mirror.name) else "is gone (no __init__ sets it, no slot declares it)"
    if not hasattr(owner, mirror.name):
        return "is gone"
    value = inspect.getattr_static(owner, mirror.name)
    checks = {
        "class": inspect.isclass(value),
        "function": inspect.isfunction(value),
        "method": inspect.isfunction(value) and not inspect.iscoroutinefunction(value),
        "coroutine method": inspect.iscoroutinefunction(value),
        "object": True,
    }
    if not checks[mirror.kind]:
        return f"is no longer a {mirror.kind} (it is {type(value).__name__})"
    expected = SIGNATURES.get((mirror.owner, mirror.name))
    if expected is not None:
        params = list(inspect.signature(value).parameters)
        if params[: len(expected)] != expected:
            return f"changed its signature: {params}, where the gateway relies on {expected} first"
    return None


def problems() -> list[str]:
    """One clear line per mirrored name that is gone or changed."""
    found = []
    for mirror in MIRRORED:
        problem = kind_problem(mirror)
        if problem is not None:
            found.append(
                f"aiohttp {aiohttp.__version__}: {mirror.owner}.{mirror.name} {problem}: "
                f"gateway/_aiohttp.py mirrors it ({mirror.why}); see that module's docstring before upgrading"
            )
    return found


def test_aiohttp_is_the_version_the_mirrors_were_checked_against() -> None:
    assert aiohttp.__version__ == _aiohttp.VERSION, (
        f"aiohttp {aiohttp.__version__} is installed; gateway/_aiohttp.py was checked against {_aiohttp.VERSION}: "
        "read aiohttp's diff against each mirror there, then move VERSION and pyproject.toml's pin together"
    )


def test_every_private_aiohttp_name_the_gateway_uses_is_there_and_of_its_kind() -> None:
    assert problems() == []


def test_the_pin_in_pyproject_is_the_one_exact_version() -> None:
    pyproject = (GATEWAY.parent / "pyproject.toml").read_text()
    assert f'"aiohttp=={_aiohttp.VERSION}"' in pyproject


@pytest.mark.parametrize(
    ("owner", "name", "expected"),
    [
        (web_protocol.RequestHandler, "_messages", "RequestHandler._messages is gone"),
        (web_protocol.RequestHandler, "_handle_request", "RequestHandler._handle_request is gone"),
        (web_protocol, "_ErrInfo", "web_protocol._ErrInfo is gone"),
        (aiohttp.ClientSession, "_retry_connection", "ClientSession._retry_connection is gone"),
    ],
)
def test_a_name_gone_from_aiohttp_fails_the_check_naming_it_and_the_module_that_mirrors_it(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, expected: str
) -> None:
    """A broken copy: the check must not pass when a name it guards is missing."""
    if (isinstance(owner, type) and name not in vars(owner)) or name in getattr(owner, "__slots__", ()):
        # An instance field (a slot cannot be deleted from a class that has instances):
        # no slot declares it and no __init__ sets it, as in an aiohttp that dropped it.
        assert isinstance(owner, type)
        if "__slots__" in vars(owner):
            monkeypatch.setattr(owner, "__slots__", tuple(s for s in owner.__slots__ if s != name))
        monkeypatch.setattr(owner, "__init__", _init_without_fields)
    else:
        monkeypatch.delattr(owner, name)

    found = problems()

    assert any(expected in line and "gateway/_aiohttp.py mirrors it" in line for line in found), found


def _init_without_fields(self: object) -> None:
    pass


def test_a_name_that_changed_its_kind_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_longer_a_coroutine(self: object) -> None:
        pass

    monkeypatch.setattr(web_protocol.RequestHandler, "_handle_request", no_longer_a_coroutine)

    assert any("RequestHandler._handle_request is no longer a coroutine method" in line for line in problems())


def test_no_module_but_gateway_aiohttp_names_a_private_aiohttp_name() -> None:
    private = sorted({m.name for m in MIRRORED if m.name.startswith("_")})
    names = re.compile(r"\b({})\b".format("|".join(map(re.escape, private))))
    internal = re.compile(r"\baiohttp\.({})\b".format("|".join(INTERNAL_MODULES)))
    offenders = []
    for path in sorted(GATEWAY.rglob("*.py")):
        if path.name == "_aiohttp.py":
            continue
        source = path.read_text()
        # A name like _loop is only aiohttp's in a module that imports aiohttp.
        uses_aiohttp = re.search(r"^(from|import) aiohttp\b", source, re.MULTILINE) is not None
        for number, line in enumerate(source.splitlines(), 1):
            if internal.search(line) or (uses_aiohttp and names.search(line)):
                offenders.append(f"{path.relative_to(GATEWAY.parent)}:{number}: {line.strip()}")
    assert offenders == [], "private aiohttp names belong in gateway/_aiohttp.py only:\n" + "\n".join(offenders)
