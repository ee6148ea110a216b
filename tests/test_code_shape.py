"""Sizes a reader can hold: no module in gateway/ over 400 lines, no function over 60.

A function that is a declarative table (a list of collectors, a table of
rows) may be longer if its definition says so: ``# a declarative table: WHY``
on the ``def`` line or its signature. Anything else that is over goes in
``ALLOWED`` below with its reason, and leaves it once it fits: an allowance
that is no longer needed fails the check too, so none outlives its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
TABLE_MARKER = "# a declarative table:"

# "path" for a module, "path:function" for a function (dotted through classes: "path:Class.method").
ALLOWED: dict[str, str] = {}


def _functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function in a module, with its dotted name (``Class.method``, ``outer.inner``)."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((prefix + child.name, child))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def _marked_as_table(lines: list[str], function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """The marker on the ``def`` line or anywhere in the signature, before the body starts."""
    signature = lines[function.lineno - 1 : function.body[0].lineno - 1] or [lines[function.lineno - 1]]
    return any(TABLE_MARKER in line for line in signature)


def oversized(root: Path) -> dict[str, int]:
    """Each module and function under ``root/gateway`` over its bound, by allowance key, with its length."""
    found: dict[str, int] = {}
    for path in sorted((root / "gateway").rglob("*.py")):
        name = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            found[name] = len(lines)
        for dotted, function in _functions(ast.parse(text, filename=name)):
            assert function.end_lineno is not None
            length = function.end_lineno - function.lineno + 1
            if length > MAX_FUNCTION_LINES and not _marked_as_table(lines, function):
                found[f"{name}:{dotted}"] = length
    return found


def shape_problems(root: Path, allowed: dict[str, str]) -> list[str]:
    """What is over its bound without an allowance, and each allowance that is no longer needed."""
    found = oversized(root)
    problems = [
        f"{key} is {length} lines (at most {MAX_FUNCTION_LINES if ':' in key else MAX_MODULE_LINES})"
        for key, length in found.items()
        if key not in allowed
    ]
    problems += [
        f"{key} is allowed ({why}) but now fits: drop it from ALLOWED"
        for key, why in allowed.items()
        if key not in found
    ]
    return problems


def test_no_module_in_gateway_is_over_400_lines_and_no_function_over_60() -> None:
    assert shape_problems(REPO, ALLOWED) == []


def _write(root: Path, name: str, text: str) -> None:
    path = root / "gateway" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _function(name: str, body_lines: int, marker: str = "") -> str:
    return f"def {name}() -> None:{marker}\n" + "".join(f"    x{i} = {i}\n" for i in range(body_lines))


def test_a_long_module_and_a_long_method_are_named_with_their_length(tmp_path: Path) -> None:
    _write(tmp_path, "big.py", "".join(f"X{i} = {i}\n" for i in range(401)))
    method = "    " + _function("fetch", 60).replace("\n    ", "\n        ")
    _write(tmp_path, "sub/client.py", f"class Client:\n{method}")
    assert shape_problems(tmp_path, {}) == [
        "gateway/big.py is 401 lines (at most 400)",
        "gateway/sub/client.py:Client.fetch is 61 lines (at most 60)",
    ]


def test_a_function_of_exactly_60_lines_and_a_marked_table_pass(tmp_path: Path) -> None:
    _write(tmp_path, "fits.py", _function("fits", 59))
    _write(tmp_path, "table.py", _function("collectors", 100, marker="  # a declarative table: one row per metric"))
    assert shape_problems(tmp_path, {}) == []


def test_an_allowance_for_code_that_now_fits_is_reported(tmp_path: Path) -> None:
    _write(tmp_path, "small.py", _function("short", 3))
    assert shape_problems(tmp_path, {"gateway/small.py": "being split"}) == [
        "gateway/small.py is allowed (being split) but now fits: drop it from ALLOWED"
    ]
