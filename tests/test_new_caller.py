"""``cohere-gateway new-caller NAME`` (docs/design.md §8 "Ops"), end to end: print, paste, check, serve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.demo.simulator import Simulator
from tests.conftest import ProcessFactory
from tests.support import http, process_config, sha256_hex, write_config

# The gateway under test runs in child processes (on uvloop whatever the test's loop): one loop is enough.
pytestmark = pytest.mark.one_loop


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "COHERE_"))}
    return subprocess.run(  # noqa: S603 (our own interpreter and module)
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, env=clean, check=False
    )


def printed_key(stdout: str) -> str:
    """The key line: the one indented line that is nothing but a key."""
    keys = re.findall(r"^    ([A-Za-z0-9_-]{40,})$", stdout, flags=re.MULTILINE)
    assert len(keys) == 1, stdout
    return keys[0]


def printed_config_lines(stdout: str) -> str:
    """Everything from the ``- name:`` line on: what ops paste under ``callers:``."""
    start = stdout.index("  - name: ")
    return stdout[start:]


def config_text_with(pasted: str, upstream_url: str) -> str:
    """A whole config file: the test's sections, then ``callers:`` with ``pasted`` under it, as an operator would."""
    raw = process_config(upstream_url)
    raw.pop("callers")
    return yaml.safe_dump(raw) + "callers:\n" + pasted


def test_new_caller_prints_a_fresh_key_its_sha256_and_commented_defaults() -> None:
    first, second = run_cli("new-caller", "some-service"), run_cli("new-caller", "some-service")
    assert first.returncode == 0, first.stderr
    key = printed_key(first.stdout)
    assert key != printed_key(second.stdout)
    lines = printed_config_lines(first.stdout)
    assert "  - name: some-service\n" in lines
    assert f"    key_sha256: {sha256_hex(key)}\n" in lines
    assert key not in lines  # the config keeps only the digest
    assert "# allow: [retrieve, list]" in lines
    assert "retrieve, list, create, cancel" in lines
    assert "# batches: all" in lines
    assert "own" in lines


@pytest.mark.parametrize("name", ["bad name", "a" * 65, "über", ".leading-dot", "x/y", ""])
def test_new_caller_refuses_a_name_the_config_would_refuse(name: str) -> None:
    result = run_cli("new-caller", name)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "not a valid caller name" in result.stderr
    assert "Traceback" not in result.stderr


def test_new_caller_needs_a_name() -> None:
    result = run_cli("new-caller")
    assert result.returncode == 2
    assert "NAME" in result.stderr


async def test_a_pasted_new_caller_passes_check_config_and_its_key_is_accepted(
    tmp_path: Path, simulator: Simulator, gateway_process: ProcessFactory
) -> None:
    result = run_cli("new-caller", "some-service")
    assert result.returncode == 0, result.stderr
    key = printed_key(result.stdout)
    path = tmp_path / "config.yaml"
    path.write_text(config_text_with(printed_config_lines(result.stdout), simulator.url), encoding="utf-8")
    parsed = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert parsed["callers"] == [{"name": "some-service", "key_sha256": sha256_hex(key)}]

    checked = run_cli("--check-config", "--config", str(path))
    assert checked.returncode == 0, checked.stderr

    gateway = await gateway_process(path)
    answer = await http(f"{gateway.url}/v2/batches/x", key=key)
    assert answer.status == 200
    assert answer.document["batch"]["id"] == "x"
    assert simulator.seen[-1].headers["X-Client-Name"] == "some-service"
    refused = await http(f"{gateway.url}/v2/batches/x", key=key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert refused.status == 401
    gateway.proc.terminate()
    assert await gateway.exit_code(15) == 0
    assert gateway.lines, "the gateway logged nothing"
    assert key not in gateway.text


def test_the_existing_flags_still_work_beside_the_command(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.yaml", process_config("http://127.0.0.1:9"))
    assert run_cli("--check-config", "--config", str(path)).returncode == 0
    assert run_cli("--config", str(path), "--check-config").returncode == 0
    usage = run_cli("--help")
    assert usage.returncode == 0
    for flag in ("--config", "--host", "--port", "--check-config", "--demo", "new-caller"):
        assert flag in usage.stdout
