"""The README's quick start runs as written: the whole batch job through ``cohere-gateway --demo`` with the SDK.

The Python block under the README's "the whole job" marker is run as a
service would run it, in a process of its own, against a demo gateway
started the way ``make run`` starts it; only the port differs. It holds no
Cohere token: uploads, the wait, the batch and the downloads all go through
the gateway with the caller's key (docs/design.md §11).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_demo_isolation import start_demo

pytestmark = [pytest.mark.one_loop, pytest.mark.timeout(180)]

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- the whole job: tests/test_readme_workflow.py runs this block -->"
README_URL = "http://127.0.0.1:8080"
# The demo's batches end within a minute; the block's own waits are the SDK's.
RUN_BOUND_S = 150


def whole_job_block() -> str:
    text = README.read_text()
    assert MARKER in text, "the README lost the marker of its whole-job example"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], flags=re.DOTALL)
    assert block is not None
    return block.group(1)


def test_the_readme_block_uses_only_a_caller_key_and_the_gateway() -> None:
    code = whole_job_block()

    assert 'api_key="demo-billing-key-0001"' in code
    assert README_URL in code
    assert "COHERE_API_KEY" not in code
    assert "storage" not in code


async def test_the_readme_whole_job_runs_end_to_end_through_the_demo_gateway(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("logging:\n  access_log: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "COHERE_", "CO_API"))}
    demo = await start_demo(config, env, "--port", "0")
    try:
        code = whole_job_block().replace(README_URL, demo.url)
        service = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(service.communicate(), RUN_BOUND_S)
    finally:
        demo.process.terminate()
        await demo.process.wait()

    assert service.returncode == 0, err.decode()[-3000:]
    # co.wait prints its own progress ("...") between the rows the block prints.
    rows = [line for line in out.decode().splitlines() if not line.startswith(".")]
    assert [row.split(" ", 1)[0] for row in rows] == ["doc-0", "doc-1", "doc-2"]
    assert all(
        re.fullmatch(r"doc-\d \[-?\d+\.\d+(e-?\d+)?, -?\d+\.\d+(e-?\d+)?, -?\d+\.\d+(e-?\d+)?\]", r) for r in rows
    ), rows
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 3
