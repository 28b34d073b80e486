"""The interactive `aether` shell: driven through a pseudo-terminal against a fake node, plus the
completer and line runner in-process."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prompt_toolkit")

from aether.cli.main import Settings, main
from aether.cli.repl import AetherCompleter, NodeData, prompt_text, run_line
from test_cli_ops import FakeNode, Servers, addr

pytestmark = pytest.mark.timeout(60)

ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")


class FakeDeployments:
    """Enough of a deployment service for GET /api/v1/slices and /api/v1/blueprints."""

    class Entry:
        def __init__(self, bp_id: str, blueprint: dict[str, Any]) -> None:
            self.id = bp_id
            self.blueprint = blueprint

    def slices_status(self) -> list[dict[str, Any]]:
        return [{"artifact": "org.example:hello:0.1.0", "desired": 1, "active": 1, "instances": []}]

    def list_blueprints(self) -> list[Entry]:
        return [
            self.Entry(
                "shop",
                {
                    "source": "shop.toml",
                    "slices": [{"artifact": "org.example:greeter:1.0.0", "instances": 2}],
                },
            )
        ]

    def get_blueprint(self, bp_id: str) -> dict[str, Any] | None:
        return next((e.blueprint for e in self.list_blueprints() if e.id == bp_id), None)


class DeployingNode(FakeNode):
    def __init__(self) -> None:
        super().__init__()
        self.deployments = FakeDeployments()


@pytest.fixture
def node_addr() -> Iterator[str]:
    s = Servers()
    try:
        yield addr(s.start(DeployingNode()))
    finally:
        s.close()


class Pty:
    """`aether` on a pseudo-terminal; output is read with deadlines and ANSI codes removed."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        pid, fd = os.forkpty()
        if pid == 0:  # child
            try:
                os.execve(sys.executable, [sys.executable, "-m", "aether.cli.main", *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.raw = b""
        self.pos = 0  # text before pos has been matched already
        self.status: int | None = None

    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode(errors="replace")

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.fd, 65536)
            except OSError:  # EIO: the child is gone
                time.sleep(timeout)

    def expect(self, pattern: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            text = self.text()
            m = rx.search(text, self.pos)
            if m:
                self.pos = m.end()
                return text
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{text[-3000:]}")
            self._read(min(remaining, 0.2))

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        raise AssertionError(f"the REPL did not exit; output:\n{self.text()[-3000:]}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)


def repl_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    env.update(
        AETHER_HISTORY=str(tmp_path / "hist" / "history"),
        TERM="xterm",
        PROMPT_TOOLKIT_NO_CPR="1",
        COLUMNS="200",
        LINES="50",
        HOME=str(tmp_path),
    )
    return env


@pytest.mark.skipif(not hasattr(os, "forkpty"), reason="needs a pseudo-terminal")
def test_repl_session_through_a_pty(node_addr: str, tmp_path: Path) -> None:
    p = Pty(["--connect", node_addr], repl_env(tmp_path))
    try:
        p.expect(r"aether>")
        p.send("status\r")
        p.expect(r"node-2")
        p.expect(r"aether>")

        p.send("sta\t")
        p.expect(r"status")
        p.send("\r")
        p.expect(r"node-1")
        p.expect(r"aether>")

        p.send("help\r")
        p.expect(r"Commands")
        text = p.expect(r"aether>")
        assert "blueprint" in text and "exit, quit" in text

        p.send("blueprint show sh\t")  # blueprint ids come from the node
        time.sleep(0.5)
        p.send("\r")
        p.expect(r"Blueprint shop")
        p.expect(r"aether>")

        p.send("undeploy x")
        time.sleep(0.2)
        p.send("\x03")  # Ctrl-C drops the line
        p.expect(r"aether>")

        p.send("blueprint show nope\r")
        p.expect(r"error: .*404")
        p.expect(r"aether \[1\]>")
        p.send("status\r")
        p.expect(r"node-2")
        p.expect(r"aether>")

        p.send("exit\r")
        assert p.wait() == 0
    finally:
        p.close()
    history = (tmp_path / "hist" / "history").read_text()
    for line in ("status", "help", "blueprint show nope", "exit"):
        assert f"+{line}\n" in history
    assert "undeploy" not in history  # the line cancelled with Ctrl-C never ran


@pytest.mark.skipif(not hasattr(os, "forkpty"), reason="needs a pseudo-terminal")
def test_repl_ctrl_d_exits_0(tmp_path: Path) -> None:
    p = Pty(["--connect", "127.0.0.1:1"], repl_env(tmp_path))
    try:
        p.expect(r"aether>")
        p.send("\x04")
        assert p.wait() == 0
    finally:
        p.close()


def test_no_tty_prints_help(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "aether.cli.main"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        env=repl_env(tmp_path),
    )
    assert r.returncode == 0
    assert "Commands:" in r.stdout and "status" in r.stdout
    assert not (tmp_path / "hist").exists()


# -- in-process ---------------------------------------------------------------------------------------


def test_completer_walks_the_click_tree_and_the_node(node_addr: str) -> None:
    c = AetherCompleter(main, NodeData(Settings(connect=node_addr)))

    def names(text: str) -> list[str]:
        return [v for v, _ in c.candidates(text)[1]]

    assert names("sta") == ["status"]
    assert "show" in names("blueprint s")
    assert names("help clu") == ["cluster"]
    assert "--dir" in names("cluster start --d")
    assert "exit" in names("ex") and "quit" in names("q")
    assert names("--connect x sta") == ["status"]
    assert names("deploy ") == ["org.example:greeter:1.0.0", "org.example:hello:0.1.0"]
    assert names("scale org.example:he") == ["org.example:hello:0.1.0"]
    assert names("blueprint show ") == ["shop"]
    assert names("cluster start --dir ") == []


def test_completer_ignores_an_unreachable_node() -> None:
    c = AetherCompleter(main, NodeData(Settings(connect="127.0.0.1:1", timeout=0.5)))
    assert c.candidates("deploy ")[1] == []


def test_run_line_codes_and_global_options(node_addr: str, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(connect=node_addr, json=True)
    assert run_line(main, settings, "status") == 0
    assert '"node_id": "node-1"' in capsys.readouterr().out  # --json from the start applies
    assert run_line(main, settings, "blueprint show nope") == 1
    assert "404" in capsys.readouterr().err
    assert run_line(main, settings, "no-such-command") == 2
    assert "No such command" in capsys.readouterr().err
    assert run_line(main, settings, "status 'open") == 2
    assert run_line(main, settings, "help status") == 0
    assert "--json" in capsys.readouterr().out
    assert run_line(main, settings, "") == 0
    assert run_line(main, settings, "quit") is None
    assert prompt_text(0) == "aether> " and prompt_text(3) == "aether [3]> "
