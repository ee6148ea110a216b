"""The docs: every link and anchor resolves inside the repository, every config key and error code is
documented, and every "§N" the project cites is a section of docs/design.md.

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
    design_config_problems,
    design_sections,
    documented_keys,
    error_code_problems,
    error_codes,
    link_problems,
    nav_problems,
    section_citation_problems,
    section_citations,
    slug,
    web_link_problem,
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


def test_a_link_that_leaves_the_repository_fails_the_link_check(tmp_path: Path) -> None:
    root = copy_of_the_docs(tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "DESIGN.md").write_text("# A contract outside the repository\n", encoding="utf-8")
    readme = root / "README.md"
    readme.write_text(
        readme.read_text(encoding="utf-8")
        + "\nThe contract: [DESIGN.md](../outside/DESIGN.md), [here](/work/outside/DESIGN.md),"
        " [the demo](http://127.0.0.1:8080/healthz), [hooks](https://billing.internal/hooks),"
        " [mail](mailto:ops@example.com); but [RFC 7240](https://www.rfc-editor.org/rfc/rfc7240) is fine.\n",
        encoding="utf-8",
    )
    line = len(readme.read_text(encoding="utf-8").splitlines())
    # Only that line: the copy leaves out files the README links to (.ci/, the Makefile).
    assert [p for p in link_problems(root) if p.startswith(f"README.md:{line}:")] == [
        f"README.md:{line}: ../outside/DESIGN.md: leaves the repository",
        f"README.md:{line}: /work/outside/DESIGN.md: leaves the repository",
        f"README.md:{line}: http://127.0.0.1:8080/healthz: only https:// links may leave the repository",
        f"README.md:{line}: https://billing.internal/hooks: billing.internal is not a public host",
        f"README.md:{line}: mailto:ops@example.com: only https:// links may leave the repository",
    ]


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("https://keepachangelog.com/en/1.1.0/", None),
        ("https://semver.org/spec/v2.0.0.html", None),
        ("https://www.rfc-editor.org/rfc/rfc9110#section-9.3.2", None),
        ("https://docs.cohere.com/reference/get-batch", None),
        ("http://semver.org/", "only https:// links may leave the repository"),
        ("file:///work/outside/DESIGN.md", "only https:// links may leave the repository"),
        ("https://localhost:8080/", "localhost is not a public host"),
        ("https://10.0.0.7/metrics", "10.0.0.7 is not a public host"),
        ("https://cohere-gateway:8080/v2/batches", "cohere-gateway is not a public host"),
        ("https://redis.default.svc/", "redis.default.svc is not a public host"),
        ("https://billing.example/hooks", "billing.example is not a public host"),
    ],
)
def test_only_https_links_to_public_hosts_may_leave_the_repository(target: str, problem: str | None) -> None:
    assert web_link_problem(target) == problem


def test_every_docs_page_has_the_same_nav_line_and_it_links_every_page() -> None:
    assert nav_problems(REPO) == []


def test_a_page_missing_from_a_nav_line_fails_the_nav_check(tmp_path: Path) -> None:
    root = copy_of_the_docs(tmp_path)
    page = root / "docs" / "caching.md"
    page.write_text(page.read_text(encoding="utf-8").replace(" · [design](design.md)", "", 1), encoding="utf-8")
    assert nav_problems(root) == [
        "docs/caching.md: its nav line differs from docs/api.md's",
        "docs/caching.md: its nav line does not link design.md",
    ]


def test_the_design_keeps_its_twelve_numbered_sections() -> None:
    # Issues, commits, code and tests cite these numbers: renumbering one would repoint every citation.
    sections = design_sections(REPO)
    assert sorted(sections) == list(range(1, 13))
    assert sections[5] == "5. The caller-facing API"
    assert sections[8] == "8. The whole batch API, per caller"
    assert sections[10] == "10. Replicas and workers on Redis"


def test_every_section_the_project_cites_is_a_section_of_the_design() -> None:
    cited_in = {path.relative_to(REPO).parts[0] for path, *_ in section_citations(REPO)}
    assert {"README.md", "docs", "gateway", "tests"} <= cited_in  # the check reads where the citations are
    assert section_citation_problems(REPO) == []


def test_a_citation_of_a_section_the_design_lacks_fails_the_section_check(tmp_path: Path) -> None:
    root = copy_of_the_docs(tmp_path)
    sign = "\N{SECTION SIGN}"  # spelled out, so that this file cites no missing section itself
    (root / "gateway").mkdir()
    (root / "gateway" / "feed.py").write_text(
        f"# The event feed ({sign}13), If-None-Match as RFC 9110 {sign}13.1.2 says, webhooks ({sign}12).\n",
        encoding="utf-8",
    )
    api = root / "docs" / "api.md"
    api.write_text(api.read_text(encoding="utf-8") + f"\nSee {sign} 14 and {sign}8.\n", encoding="utf-8")
    line = len(api.read_text(encoding="utf-8").splitlines())
    assert section_citation_problems(root) == [
        f"docs/api.md:{line}: {sign} 14 is not a section of docs/design.md",
        f"gateway/feed.py:1: {sign}13 is not a section of docs/design.md",
    ]


def test_a_design_section_dropped_or_renumbered_fails_the_section_check(tmp_path: Path) -> None:
    root = copy_of_the_docs(tmp_path)
    design = root / "docs" / "design.md"
    design.write_text(
        design.read_text(encoding="utf-8").replace("## 9. Waiting for a change", "## Waiting for a change"),
        encoding="utf-8",
    )
    problems = section_citation_problems(root)
    assert problems[0] == "docs/design.md: its sections are numbered [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12], not 1 to 11"
    assert any(p.startswith("CHANGELOG.md:") and "9 is not a section" in p for p in problems)


def test_the_design_names_every_config_key_with_its_default() -> None:
    assert design_config_problems(REPO) == []


def design_edited(root: Path, *edits: tuple[str, str]) -> Path:
    design = root / "docs" / "design.md"
    text = design.read_text(encoding="utf-8")
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    design.write_text(text, encoding="utf-8")
    return root


def test_a_default_the_design_gets_wrong_fails_the_design_config_check(tmp_path: Path) -> None:
    root = design_edited(copy_of_the_docs(tmp_path), ("  port: 8080\n", "  port: 8081\n"))
    assert design_config_problems(root) == ["docs/design.md §4 shows server.port: 8081, the default is 8080"]


def test_a_key_the_design_misses_or_invents_fails_the_design_config_check(tmp_path: Path) -> None:
    root = design_edited(
        copy_of_the_docs(tmp_path),
        ('  pid_file: ""', "  # pid_file"),
        ("  max_waiters: 10000\n", "  max_waiters: 10000\n  max_holders: 5\n"),
    )
    problems = design_config_problems(root)
    assert problems[:2] == [
        "docs/design.md §4 does not name server.pid_file",
        "docs/design.md §4 shows cache.max_holders, which the code does not accept",
    ]
    assert any(
        p.startswith("docs/design.md §4's yaml block is not a valid config: cache.max_holders") for p in problems
    )


def documented_modules(text: str) -> set[str]:
    """The module paths the layout block of docs/development.md names (``edge/server.py``...)."""
    block = text.split("## The layout", 1)[1].split("```", 2)[1]
    found: set[str] = set()
    folder = ""
    for line in block.splitlines():
        name = line.strip().split(" ", 1)[0]
        indent = len(line) - len(line.lstrip())
        if indent == 2 and name.endswith("/"):
            folder = name
        elif indent == 2 and name.endswith(".py"):
            folder = ""
            found.add(name)
        elif indent == 4 and name.endswith(".py"):
            found.add(folder + name)
    return found


def package_modules(root: Path) -> set[str]:
    gateway = root / "gateway"
    return {
        str(path.relative_to(gateway))
        for path in gateway.rglob("*.py")
        if path.name != "__init__.py" or path.parent == gateway
    }


def test_the_development_page_names_every_module_of_the_package_and_no_other() -> None:
    documented = documented_modules((REPO / "docs" / "development.md").read_text(encoding="utf-8"))
    modules = package_modules(REPO)
    assert modules - documented == set(), "modules with no line in docs/development.md's layout"
    assert documented - modules == set(), "lines in docs/development.md's layout for modules that do not exist"


def test_the_module_check_fails_on_a_module_missing_from_the_page(tmp_path: Path) -> None:
    (tmp_path / "gateway" / "edge").mkdir(parents=True)
    for name in ("__init__.py", "cli.py", "edge/__init__.py", "edge/server.py", "edge/new.py"):
        (tmp_path / "gateway" / name).write_text("")
    page = "## The layout\n\n```\ngateway/\n  __init__.py  v\n  cli.py  c\n  edge/  e\n    server.py  s\n```\n"
    assert package_modules(tmp_path) - documented_modules(page) == {"edge/new.py"}
