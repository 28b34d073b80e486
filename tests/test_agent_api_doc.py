"""Runs every `example:` block of docs/agent-api.md against a live 3-node cluster, in order."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import running_cluster

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

DOC = Path(__file__).resolve().parents[1] / "docs" / "agent-api.md"
BLOCK = re.compile(r"^```(sh|python) example:(\S+)(?: status=(\d+))?\n(.*?)^```$", re.M | re.S)


def examples() -> list[tuple[str, str, int | None, str]]:
    return [(m[2], m[1], int(m[3]) if m[3] else None, m[4]) for m in BLOCK.finditer(DOC.read_text())]


def test_the_doc_has_examples_of_each_kind() -> None:
    names = [e[0] for e in examples()]
    assert {
        "discover", "health", "deploy", "slices", "invoke", "scale", "events", "error",
        "metrics", "metrics-python", "prometheus",
        "client", "client-async", "deploy-client", "slices-client", "invoke-client", "error-client",
    } <= set(names)  # fmt: skip
    assert {e[1] for e in examples()} == {"sh", "python"}


async def test_every_example_runs_against_a_live_cluster(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as nodes:
        env = {**os.environ, "AETHER": f"http://127.0.0.1:{nodes[1].management.port}", "AETHER_API_KEY": ""}
        for name, lang, status, code in examples():
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
            proc = await asyncio.create_subprocess_exec(
                *cmd, env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 45)
            text = out.decode() + err.decode()
            assert proc.returncode == 0, f"example {name} failed:\n{text}"
            if status is not None:
                assert out.decode().strip().splitlines()[-1] == str(status), f"example {name}:\n{text}"
