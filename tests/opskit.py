"""The operator's kit checks as pure functions of a folder: docs, config keys, error codes, metric names.

Each returns a list of problems (empty: the check passes), so that the tests
can run it on the repository and on a broken copy of a file in tmp_path.
"""

from __future__ import annotations

import ipaddress
import json
import re
import types
import typing
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from gateway.config import ConfigError, GatewayConfig, validate
from gateway.errors import GatewayError

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# Links and anchors
# ---------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the target ends at the first space or ')'.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`[^`]*`")


def markdown_files(root: Path) -> list[Path]:
    """README.md, CHANGELOG.md and every file under docs/ and deploy/."""
    found = [root / name for name in ("README.md", "CHANGELOG.md") if (root / name).exists()]
    for folder in ("docs", "deploy"):
        found += sorted((root / folder).rglob("*.md"))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


# Host names that no reader outside the organisation can reach: loopback,
# cluster and intranet suffixes, and the names reserved for examples.
_PRIVATE_HOST = re.compile(
    r"(?:^|\.)(?:localhost|internal|local|lan|svc|cluster\.local|home\.arpa|example|test|invalid)$"
)


def web_link_problem(target: str) -> str | None:
    """Why a link with a scheme is not allowed in the docs, or None: only https:// to a public host is."""
    url = urllib.parse.urlsplit(target)
    if url.scheme != "https":
        return "only https:// links may leave the repository"
    host = (url.hostname or "").rstrip(".")
    try:
        private = not ipaddress.ip_address(host).is_global
    except ValueError:
        private = "." not in host or bool(_PRIVATE_HOST.search(host))
    return f"{host or 'no host'} is not a public host" if private else None


def link_problems(root: Path) -> list[str]:
    """Every link resolves for a reader of the repository alone.

    A relative link names a file inside the repository that exists, and its
    #anchor a heading in it; a relative link that climbs out of the
    repository (the team's shared folder, say) or an absolute path is
    reported, since a clone does not have it. A link with a scheme must be
    https:// to a public host (keepachangelog.com, semver.org, an RFC); it is
    not followed (CI has no network). Addresses of the gateway or of internal
    services belong in code spans and examples, not in links.
    """
    problems: list[str] = []
    inside = root.resolve()
    for path in markdown_files(root):
        for number, line in prose_lines(path.read_text(encoding="utf-8")):
            for target in _LINK.findall(_CODE_SPAN.sub("", line)):
                where = f"{path.relative_to(root)}:{number}: {target}"
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    if problem := web_link_problem(target):
                        problems.append(f"{where}: {problem}")
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve() if file_part else path
                if file_part.startswith("/") or not linked.is_relative_to(inside):
                    problems.append(f"{where}: leaves the repository")
                elif not linked.exists():
                    problems.append(f"{where}: no such file")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    problems.append(f"{where}: no heading #{anchor} in {linked.name}")
    return problems


_NAV = re.compile(r"^\[README\]\(\.\./README\.md\)")


def nav_problems(root: Path) -> list[str]:
    """Every page under docs/ has the same nav line, and it links every page."""
    pages = sorted((root / "docs").glob("*.md"))
    navs = {}
    for page in pages:
        lines = [line for _, line in prose_lines(page.read_text(encoding="utf-8")) if _NAV.match(line)]
        navs[page.name] = lines[0] if lines else ""
    first = navs[pages[0].name]
    problems = []
    for page in pages:
        nav = navs[page.name]
        if not nav:
            problems.append(f"docs/{page.name}: no nav line")
            continue
        if nav != first:
            problems.append(f"docs/{page.name}: its nav line differs from docs/{pages[0].name}'s")
        linked = set(_LINK.findall(nav))
        problems += [f"docs/{page.name}: its nav line does not link {p.name}" for p in pages if p.name not in linked]
    return problems


# ---------------------------------------------------------------------------
# The design: its sections, the "§N" that cite them, its config block
# ---------------------------------------------------------------------------

_SECTION_HEADING = re.compile(r"^## (\d+)\. ")
# A section sign and a number; one after "RFC 9110" (or "RFC 9110,") cites that RFC, not the design.
_CITATION = re.compile(r"(RFC\s*\d+,?\s*)?§\s*(\d+)")
# Where the project cites the design: its docs, code, tests, deployment files and benchmark.
CITING_FOLDERS = ("docs", "deploy", "gateway", "tests", "bench")
CITING_FILES = ("README.md", "CHANGELOG.md", "Makefile", "Dockerfile", "pyproject.toml", "config.yaml")
_TEXT_SUFFIXES = frozenset({".md", ".py", ".yaml", ".yml", ".toml", ".json", ".txt", ".template"})


def design_sections(root: Path) -> dict[int, str]:
    """docs/design.md's numbered sections (``## 8. The whole batch API, per caller``): number to title."""
    text = (root / "docs" / "design.md").read_text(encoding="utf-8")
    return {int(m.group(1)): line[3:] for _, line in prose_lines(text) if (m := _SECTION_HEADING.match(line))}


def citing_files(root: Path) -> Iterator[Path]:
    for name in CITING_FILES:
        if (root / name).is_file():
            yield root / name
    for folder in CITING_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in _TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield path


def section_citations(root: Path) -> Iterator[tuple[Path, int, str, int]]:
    """Each citation of a design section: (file, line number, the citation as written, section number)."""
    for path in citing_files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for match in _CITATION.finditer(line):
                if not match.group(1):
                    yield path, number, match.group(0).strip(), int(match.group(2))


def section_citation_problems(root: Path) -> list[str]:
    """Every section sign and number in the project names a section of docs/design.md, numbered 1, 2, 3 ..."""
    sections = design_sections(root)
    problems = []
    if sorted(sections) != list(range(1, len(sections) + 1)):
        problems.append(f"docs/design.md: its sections are numbered {sorted(sections)}, not 1 to {len(sections)}")
    for path, number, cited, section in section_citations(root):
        if section not in sections:
            problems.append(f"{path.relative_to(root)}:{number}: {cited} is not a section of docs/design.md")
    return problems


def _section_text(root: Path, number: int) -> str:
    text = (root / "docs" / "design.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(0) if match else ""


def _flat_keys(value: Any, prefix: str = "") -> set[str]:
    """A YAML document's keys in the docs' spelling: ``server.port``, ``callers[].rate_limit.burst``."""
    keys: set[str] = set()
    if isinstance(value, dict):
        for name, inner in value.items():
            keys |= {f"{prefix}{name}"} | _flat_keys(inner, f"{prefix}{name}.")
    elif isinstance(value, list):
        for item in value:
            keys |= _flat_keys(item, prefix[:-1] + "[].")
    return keys


# A caller and a token that pass validation; only the sections around them are compared.
_PROBE_CALLER = {"name": "probe", "key_sha256": "ab" * 32}
_PROBE_ENV = {"COHERE_API_KEY": "a-token-for-the-design-check"}


def design_config_problems(root: Path) -> list[str]:
    """§4's yaml block names every key the code accepts (or its prose names it), and shows each default.

    Keys given as one alternative of several (``upstream.token_file`` beside
    ``upstream.token``) may be named in §4's prose as `upstream.token_file`
    instead. Callers show ways of configuring a caller, not defaults; every
    other value in the block must be what the gateway uses when the key is
    absent.
    """
    section = _section_text(root, 4)
    blocks = re.findall(r"^```yaml\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    if not blocks:
        return ["docs/design.md §4 has no yaml block of the config keys"]
    block = yaml.safe_load(blocks[0])
    shown = _flat_keys(block)
    named = set(re.findall(r"`([a-z_]+(?:\[\])?(?:\.[a-z0-9_]+)+)`", section))
    every, _ = config_keys()
    problems = [f"docs/design.md §4 does not name {key}" for key in sorted(every - shown - named)]
    problems += [f"docs/design.md §4 shows {key}, which the code does not accept" for key in sorted(shown - every)]
    sections = {name: inner for name, inner in block.items() if name != "callers"}
    try:
        shown_config = validate({**sections, "callers": [_PROBE_CALLER]}, _PROBE_ENV)
        defaults = validate({"upstream": {"token": "${COHERE_API_KEY}"}, "callers": [_PROBE_CALLER]}, _PROBE_ENV)
    except ConfigError as exc:
        return [*problems, *(f"docs/design.md §4's yaml block is not a valid config: {p}" for p in exc.problems)]
    for name in sections:
        got, want = getattr(shown_config, name).model_dump(), getattr(defaults, name).model_dump()
        for key in sorted(set(got) | set(want)):
            if got.get(key) != want.get(key):
                problems.append(
                    f"docs/design.md §4 shows {name}.{key}: {got.get(key)!r}, the default is {want.get(key)!r}"
                )
    return problems


# ---------------------------------------------------------------------------
# Config keys
# ---------------------------------------------------------------------------


def _models_in(annotation: Any) -> Iterator[tuple[type[BaseModel], bool]]:
    """The pydantic models inside a field's type, each with whether it sits in a list."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _models_in(typing.get_args(annotation)[0])
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)
    elif origin is list:
        for model, _ in _models_in(typing.get_args(annotation)[0]):
            yield model, True
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, False


def config_keys(model: type[BaseModel] = GatewayConfig, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every key the code accepts, the leaves among them), in the docs' spelling: ``callers[].allow``."""
    every: set[str] = set()
    leaves: set[str] = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        every.add(key)
        inner = list(_models_in(field.annotation))
        if not inner:
            leaves.add(key)
        for sub, in_list in inner:
            sub_every, sub_leaves = config_keys(sub, f"{key}[]." if in_list else f"{key}.")
            every |= sub_every
            leaves |= sub_leaves
    return every, leaves


_KEY_ROW = re.compile(r"^\|\s*`([a-z_]+(?:\[\])?(?:\.[a-z0-9_]+)+)`\s*\|")


def documented_keys(configuration_md: Path) -> set[str]:
    """The keys named in the first column of a table in docs/configuration.md (``section.key`` rows)."""
    text = configuration_md.read_text(encoding="utf-8")
    return {m.group(1) for _, line in prose_lines(text) if (m := _KEY_ROW.match(line))}


def config_key_problems(root: Path) -> list[str]:
    every, leaves = config_keys()
    documented = documented_keys(root / "docs" / "configuration.md")
    problems = [f"docs/configuration.md does not document {key}" for key in sorted(leaves - documented)]
    problems += [
        f"docs/configuration.md documents {key}, which the code does not accept" for key in sorted(documented - every)
    ]
    return problems


# ---------------------------------------------------------------------------
# Error codes
# ---------------------------------------------------------------------------


def error_codes() -> set[str]:
    """Every code a GatewayError (the root included) can carry."""
    codes: set[str] = set()
    pending: list[type[GatewayError]] = [GatewayError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending += cls.__subclasses__()
    return codes


def error_code_problems(root: Path) -> list[str]:
    text = (root / "docs" / "api.md").read_text(encoding="utf-8")
    return [
        f"docs/api.md does not name the error code {code}" for code in sorted(error_codes()) if f"`{code}`" not in text
    ]


# ---------------------------------------------------------------------------
# Metric names and labels in the dashboard and the alert rules
# ---------------------------------------------------------------------------

# Labels Prometheus adds to every scraped series (the target's), not the gateway.
TARGET_LABELS = frozenset({"job", "instance"})
_METRIC = re.compile(r"\b(gateway_[a-z0-9_]+)")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_LABEL_VALUES = re.compile(r"label_values\(\s*(gateway_[a-z0-9_]+)[^,]*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")

Exported = dict[str, set[str]]  # sample name -> its label names


def selectors(expr: str) -> Iterator[tuple[str, list[str]]]:
    """Each metric name in a PromQL expression with the label names of its matchers."""
    for match in _METRIC.finditer(expr):
        labels: list[str] = []
        at = match.end()
        if expr[at : at + 1] == "{":
            at += 1
            while (matcher := _MATCHER.match(expr, at)) is not None:
                labels.append(matcher.group(1))
                at = matcher.end()
        yield match.group(1), labels


def expression_problems(where: str, expr: str, exported: Exported, legend: str = "") -> list[str]:
    problems: list[str] = []
    known: set[str] = set(TARGET_LABELS)
    for name, labels in selectors(expr):
        if name not in exported:
            problems.append(f"{where}: the gateway exports no metric {name}")
            continue
        known |= exported[name]
        problems += [
            f"{where}: {name} has no label {label}" for label in labels if label not in exported[name] | TARGET_LABELS
        ]
    for group in _GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in known:
                problems.append(f"{where}: no metric in the expression has the label {label}")
    problems += [
        f"{where}: the legend names {label}, a label no metric here has"
        for label in _LEGEND.findall(legend)
        if label not in known
    ]
    return problems


def dashboard_expressions(dashboard: Path) -> Iterator[tuple[str, str, str]]:
    """(where, expression, legend) for every panel target and query variable."""
    document = json.loads(dashboard.read_text(encoding="utf-8"))
    top = document.get("panels", [])
    # A collapsed row holds its panels inside it.
    for panel in [*top, *(inner for row in top for inner in row.get("panels", []))]:
        for target in panel.get("targets", []):
            where = f"{dashboard.name}: panel {panel.get('title')!r} {target.get('refId')}"
            yield where, target.get("expr", ""), target.get("legendFormat", "")
    for variable in document.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        yield f"{dashboard.name}: variable {variable.get('name')}", text, ""


def rule_expressions(rules: Path) -> Iterator[tuple[str, str, str]]:
    document = yaml.safe_load(rules.read_text(encoding="utf-8"))
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            annotations = " ".join(str(v) for v in (rule.get("annotations") or {}).values())
            # The annotations' {{ $labels.x }} are labels of the expression's result.
            legend = " ".join(f"{{{{{label}}}}}" for label in re.findall(r"\$labels\.([A-Za-z_]\w*)", annotations))
            yield f"{rules.name}: {name}", str(rule.get("expr", "")), legend


def metric_problems(root: Path, exported: Exported) -> list[str]:
    problems: list[str] = []
    sources = [*sorted((root / "deploy" / "grafana").glob("*.json"))]
    expressions = [e for dashboard in sources for e in dashboard_expressions(dashboard)]
    expressions += list(rule_expressions(root / "deploy" / "prometheus" / "alerts.yaml"))
    for where, expr, legend in expressions:
        problems += expression_problems(where, expr, exported, legend)
        for name, label in _LABEL_VALUES.findall(expr):
            if name in exported and label not in exported[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label}")
    return problems


def exported_from_text(text: str, registry: CollectorRegistry | None = None) -> Exported:
    """Sample names and their label names, from a /metrics scrape.

    A labelled family shows no sample until its first label values are
    counted (a counter of shared flights before any flight). Given the
    registry that rendered ``text``, such a family still counts as exported,
    with the label names the code declared for it: only for families that
    ``text`` names (in its HELP and TYPE lines).
    """
    from prometheus_client.parser import text_string_to_metric_families

    exported: Exported = {}
    unseen: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
        if not family.samples:
            unseen.add(family.name)
    if registry is not None:
        for name, labels in declared_samples(registry).items():
            family = re.sub(r"_(total|created|bucket|sum|count)$", "", name)
            if family in unseen:
                exported.setdefault(name, set()).update(labels)
    return exported


_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def declared_samples(registry: CollectorRegistry) -> Exported:
    """Every sample name a registry's metrics can have, with the label names declared for them.

    prometheus_client keeps a metric's declaration (name, type, label names) in
    attributes of its own, not in what it renders, hence the private names.
    """
    declared: Exported = {}
    for collector in list(registry._collector_to_names):
        name, kind, labels = (getattr(collector, a, None) for a in ("_name", "_type", "_labelnames"))
        if not isinstance(name, str) or kind not in _SAMPLE_SUFFIXES or labels is None:
            continue  # not a plain metric (a custom collector): only its rendered samples count
        for suffix in _SAMPLE_SUFFIXES[str(kind)]:
            declared[name + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    return declared


def documented_metric_problems(root: Path, text: str) -> list[str]:
    """Every metric family in a /metrics scrape has a row in docs/observability.md (counters as ``*_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    doc = (root / "docs" / "observability.md").read_text(encoding="utf-8")
    problems: list[str] = []
    families = list(text_string_to_metric_families(text))
    names = {family.name for family in families}
    for family in families:
        # The text format shows a counter's or histogram's *_created series as a family of its own.
        if not family.name.startswith("gateway_") or family.name.removesuffix("_created") in names - {family.name}:
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        if f"| `{name}` |" not in doc:
            problems.append(f"docs/observability.md has no row for the metric {name}")
    return problems
