"""The tutorial of docs/slices.md, run as written: its files are written and its shell commands run
in order in an empty directory, with real processes (pip, `aether cluster start`, curl). Only the
ports are shifted (AETHER_PORT_OFFSET, AETHER_CONNECT and the HTTP ports in the commands) so the
test runs beside anything else; the doc cannot rot without this test failing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aether.cli import local_cluster as lc
from conftest import free_port_offset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DOC = Path(__file__).resolve().parents[1] / "docs" / "slices.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def tutorial_steps() -> list[tuple[str, str]]:
    """("file", "PATH\\nTEXT") and ("sh", "COMMAND") steps of the tutorial section, in order."""
    text = DOC.read_text()
    start = text.index("## Tutorial: your first slice")
    section = text[start : text.index("\n## ", start + 1)]
    steps: list[tuple[str, str]] = []
    for lang, body in _BLOCK.findall(section):
        if lang == "sh":
            steps += [("sh", line) for line in body.splitlines() if line.strip() and not line.startswith("#")]
        elif lang in ("toml", "python"):
            first, _, rest = body.partition("\n")
            m = re.match(r"^# (\S+)$", first)
            assert m, f"a {lang} block of the tutorial must start with '# PATH': {first!r}"
            steps.append(("file", f"{m.group(1)}\n{rest}"))
    return steps



def test_the_steps_are_found() -> None:
    steps = tutorial_steps()
    files = [body.partition("\n")[0] for kind, body in steps if kind == "file"]
    assert files == ["counter/pyproject.toml", "counter/counter_slice/__init__.py",
                     "counter/counter_slice/aether-slice.toml"]
    commands = [body for kind, body in steps if kind == "sh"]
    assert commands[0] == "mkdir -p counter/counter_slice" and commands[-1] == "aether cluster stop"
    assert "aether cluster restart node-3" in commands


@pytest.mark.skipif(shutil.which("curl") is None, reason="the tutorial uses curl")
def test_tutorial_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    offset = free_port_offset(3)
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        HOME=str(tmp_path / "home"),
        AETHER_PORT_OFFSET=str(offset),
        AETHER_CONNECT=f"127.0.0.1:{9000 + offset}",
        COLUMNS="200",
        PIP_NO_INDEX="1",
    )
    script = ["set -euo pipefail"]
    for kind, body in tutorial_steps():
        if kind == "file":
            path, _, content = body.partition("\n")
            script.append(f"mkdir -p $(dirname {path}) && cat > {path} <<'AETHER_EOF'\n{content}AETHER_EOF")
        else:
            cmd = re.sub(r"localhost:(808\d)", lambda m: f"localhost:{int(m.group(1)) + offset}", body)
            script.append(f"echo '### {body}'")
            script.append(cmd)
            script.append("echo")
    try:
        r = subprocess.run(
            ["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True, timeout=200
        )
    finally:
        lc.stop_cluster(work / ".aether" / "cluster", timeout=5.0)
    out = r.stdout
    assert r.returncode == 0, f"{out}\n{r.stderr}"
    assert (work / "dist" / "counter_slice-0.1.0-py3-none-any.whl").is_file()
    # uploaded to the cluster, and fetched by the node running it into the nodes' directory (the
    # local cluster's own, not the machine's ~/.aether/repository)
    assert "Stored org.example:counter:0.1.0" in out
    counter = Path("org", "example", "counter", "0.1.0")
    assert (work / ".aether" / "cluster" / "repository" / counter).is_dir()
    assert not (tmp_path / "home" / ".aether" / "repository" / counter).exists()
    assert re.findall(r'"count":(\d+)', out) == ["1", "2", "2", "3", "3"], out
    assert "3/3 nodes up" in out  # cluster start, and restart
    assert re.search(r"org\.example:counter:0\.1\.0\s*│\s*3\s*│\s*3", out), out  # aether slices
    assert "Stopped node-3" in r.stderr and "Stopped node-1" in out
