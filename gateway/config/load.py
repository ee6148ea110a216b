"""Reading the configuration: load ``config.yaml``, interpolate, validate.

The file is read once per start or reload into the frozen model. Validation
reports every problem at once, each prefixed with the dotted path of its key
(``callers.1.key_sha256: ...``), so an operator fixes the file in one pass.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from gateway.config.keys import duplicate_callers
from gateway.config.model import DEMO_CONTEXT, CallerSettings, GatewayConfig

_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def interpolate(value: Any, env: Mapping[str, str], path: str = "") -> tuple[Any, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a YAML tree."""
    problems: list[str] = []
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path or 'config'}: environment variable {name} is not set")
            return ""

        return _ENV_REFERENCE.sub(substitute, value), problems
    if isinstance(value, dict):
        result: dict[Any, Any] = {}
        for key, item in value.items():
            result[key], found = interpolate(item, env, f"{path}.{key}" if path else str(key))
            problems += found
        return result, problems
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            interpolated, found = interpolate(item, env, f"{path}.{index}")
            items.append(interpolated)
            problems += found
        return items, problems
    return value, problems


def _shared_key_files(callers: list[CallerSettings]) -> list[str]:
    """Callers whose ``key_file`` holds another caller's key (``duplicate_callers`` sees only the file's path)."""
    problems: list[str] = []
    first: dict[bytes, int] = {}
    for index, caller in enumerate(callers):
        earlier = first.setdefault(caller.key_digest, index)
        if earlier != index and (caller.key_file is not None or callers[earlier].key_file is not None):
            field = "key_file" if caller.key_file is not None else "key" if caller.key is not None else "key_sha256"
            problems.append(f"callers.{index}.{field}: same key as callers.{earlier}")
    return problems


def _format(error: Any) -> str:
    if error["type"] == "config_problem":
        return str(error["msg"])
    path = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"{path}: {unknown_key(tuple(error['loc']))}"
    message = str(error["msg"]).removeprefix("Value error, ")
    # Never echo the offending input: it may be a secret.
    return f"{path}: {message}"


def unknown_key(loc: tuple[str | int, ...]) -> str:
    """The problem text for an unknown key at ``loc``, suggesting the nearest valid key there."""
    *parents, name = loc
    section: type[BaseModel] | None = GatewayConfig
    for part in parents:
        if section is None:
            break
        if isinstance(part, str):
            field = section.model_fields.get(part)
            section = None if field is None else _section_of(field.annotation)
        # An int is a list index: the element's model is already the section.
    choices = list(section.model_fields) if section is not None else []
    close = difflib.get_close_matches(str(name), choices, n=1)
    if not close:
        return "unknown key"
    return f"unknown key (did you mean {'.'.join(str(part) for part in (*parents, close[0]))}?)"


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The config model inside an annotation (``X``, ``X | None``, ``list[X]``, ``Annotated[X, ...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list, Annotated):
        for inner in get_args(annotation):
            found = _section_of(inner)
            if found is not None:
                return found
    return None


def validate(raw: Any, env: Mapping[str, str], *, demo: bool = False) -> GatewayConfig:
    """Turn a parsed YAML document into a config, or raise ConfigError with every problem.

    ``demo``: the config ``--demo`` builds, whose callers hold the demo keys.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["config: the file must be a YAML mapping of sections"])
    data, unset = interpolate(raw, env)
    problems = duplicate_callers(data.get("callers"))
    try:
        config = GatewayConfig.model_validate(data, context={DEMO_CONTEXT: demo})
    except ValidationError as exc:
        problems += [_format(error) for error in exc.errors()]
    else:
        problems += _shared_key_files(config.callers)
        if not unset and not problems:
            return config
    # An unset variable leaves its key empty, which then fails its own check
    # too; the operator needs only the first reason for each key.
    unset_paths = {_path_of(problem) for problem in unset}
    raise ConfigError(unset + [p for p in problems if _path_of(p) not in unset_paths])


def _path_of(problem: str) -> str:
    return problem.partition(": ")[0]


def read_yaml(path: Path) -> Any:
    """Parse the config file, turning I/O and syntax errors into ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"config: cannot read {path}: {getattr(exc, 'strerror', None) or exc}"]) from None
    try:
        # libyaml's loader when PyYAML was built with it (its wheels are): five times
        # faster than the pure-Python one, which took 4 s for 10,000 callers.
        return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"config: {path} is not valid YAML{where}"]) from None


def load_config(
    path: Path, env: Mapping[str, str] | None = None, overrides: dict[str, Any] | None = None, *, demo: bool = False
) -> GatewayConfig:
    """Read, interpolate and validate ``path``; ``overrides`` replace whole sections' keys."""
    raw = read_yaml(path) if path.exists() or overrides is None else {}
    if overrides and isinstance(raw, dict):
        raw = deep_merge(raw, overrides)
    return validate(raw, os.environ if env is None else env, demo=demo)


def deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, mapping by mapping."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
