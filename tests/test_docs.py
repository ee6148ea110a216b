"""The docs: every link and anchor resolves, every config key and error code is documented.

Each check is also run on a broken copy in tmp_path, to show that it fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.opskit import (
    REPO,
    config_key_problems,
    config_keys,
    documented_keys,
    error_code_problems,
    error_codes,
    link_problems,
    slug,
)


def copy_of_the_docs(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("README.md", "CHANGELOG.md", "config.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copytree(REPO / "deploy", root / "deploy")
    shutil.copytree(REPO / "bench", root / "bench", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return root


def test_every_relative_link_and_anchor_in_the_docs_resolves() -> None:
    assert link_problems(REPO) == []


def test_every_config_key_the_code_accepts_is_documented_and_every_documented_key_exists() -> None:
    assert config_key_problems(REPO) == []


def test_every_error_code_the_gateway_can_answer_is_in_the_api_doc() -> None:
    assert error_code_problems(REPO) == []


def test_the_key_walk_sees_nested_list_and_optional_sections() -> None:
    every, leaves = config_keys()
    assert {"server.port", "upstream.breaker.cooldown_s", "cache.ttl_s.active_min", "callers[].allow"} <= leaves
    assert "callers[].rate_limit.burst" in leaves  # inside an optional model inside a list
    assert "upstream.rate_limit" in every
    assert "upstream.rate_limit" not in leaves
    assert "internal_error" in error_codes()
    assert "upstream_auth_failed" in error_codes()


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Rotating the upstream token", "rotating-the-upstream-token"),
        ("`GET /v2/batches/{id}`", "get-v2batchesid"),
        ("Per-caller limits: `callers[].rate_limit`", "per-caller-limits-callersrate_limit"),
        ("The whole batch API: create, list, cancel", "the-whole-batch-api-create-list-cancel"),
    ],
)
def test_anchors_are_githubs(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_link_to_a_missing_file_or_heading_fails_the_link_check(tmp_path: Path) -> None:
    root = copy_of_the_docs(tmp_path)
    readme = root / "README.md"
    readme.write_text(
        readme.read_text(encoding="utf-8")
        + "\nSee [gone](docs/no-such-file.md) and [nowhere](docs/operations.md#no-such-heading).\n",
        encoding="utf-8",
    )
    problems = link_problems(root)
    assert any("docs/no-such-file.md: no such file" in p for p in problems)
    assert any("no heading #no-such-heading in operations.md" in p for p in problems)


def test_a_key_missing_from_the_docs_or_only_in_the_docs_fails_the_key_check(tmp_path: Path) -> None:
    root = copy_of_the_docs(tmp_path)
    doc = root / "docs" / "configuration.md"
    lines = doc.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not line.startswith("| `cache.max_waiters` |")]
    assert len(kept) == len(lines) - 1
    kept.append("| `cache.no_such_key` | `1` | a key the code does not have |")
    doc.write_text("\n".join(kept) + "\n", encoding="utf-8")
    assert "cache.no_such_key" in documented_keys(doc)
    assert config_key_problems(root) == [
        "docs/configuration.md does not document cache.max_waiters",
        "docs/configuration.md documents cache.no_such_key, which the code does not accept",
    ]


def test_an_error_code_missing_from_the_api_doc_fails_the_code_check(tmp_path: Path) -> None:
    root = copy_of_the_docs(tmp_path)
    doc = root / "docs" / "api.md"
    doc.write_text(doc.read_text(encoding="utf-8").replace("`upstream_auth_failed`", "upstream auth"), encoding="utf-8")
    assert error_code_problems(root) == ["docs/api.md does not name the error code upstream_auth_failed"]
