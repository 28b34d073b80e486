"""Forge's directory (`aether.forge.app.prepare_workdir`): wiped when Forge made it, refused when it
holds a user's files or when another Forge runs in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aether.forge.app import MARKER, prepare_workdir
from aether.forge.errors import ForgeSetupError


def test_a_directory_forge_made_is_wiped_and_a_users_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "forge"
    with prepare_workdir(d):
        assert (d / MARKER).exists() and (d / "forge.lock").read_text() == f"{os.getpid()}\n"
        (d / "node-1").mkdir()
        (d / "node-1.log").write_text("old run")
    with prepare_workdir(d):  # the earlier Forge stopped: its leftovers go
        assert sorted(p.name for p in d.iterdir()) == sorted([MARKER, "forge.lock"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(ForgeSetupError, match="not made by Forge"):
        prepare_workdir(mine)
    assert (mine / "precious.txt").read_text() == "keep me"


def test_a_directory_a_running_forge_uses_is_refused_not_wiped(tmp_path: Path) -> None:
    # `make demo` runs in one terminal, `aether forge scenario ci` is started in another with the
    # same default --dir: before, the second wiped the first one's node data, logs, secret and token
    # from under its running nodes
    d = tmp_path / "forge"
    lock = prepare_workdir(d)
    try:
        (d / "node-1.log").write_text("the running Forge's log")
        with pytest.raises(ForgeSetupError, match=rf"in use by another Forge \(pid {os.getpid()}\)"):
            prepare_workdir(d)
        assert (d / "node-1.log").read_text() == "the running Forge's log"
        # the command from another terminal, while this process holds the directory
        env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
        r = subprocess.run(
            [sys.executable, "-m", "aether.cli.main", "forge", "--dir", str(d), "--nodes", "1",
             "--port", "0"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 1 and f"in use by another Forge (pid {os.getpid()})" in r.stderr, r.stderr
        assert (d / "node-1.log").read_text() == "the running Forge's log"
    finally:
        if lock is not None:
            lock.close()
    with prepare_workdir(d):  # once it stopped, the directory is free again
        assert not (d / "node-1.log").exists()


def test_a_taken_dashboard_port_is_refused_before_any_node_starts(tmp_path: Path) -> None:
    # found by hand: `aether forge --port 9300` (taken) started the nodes (with `make demo`: the
    # wheels, the nodes and the blueprint's instances, about 40 s) and only then said the port was
    # taken
    import asyncio
    import socket

    from aether.forge.app import ForgeOptions, open_forge

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    opts = ForgeOptions(nodes=1, port=port, workdir=tmp_path / "forge")

    async def run() -> None:
        async with open_forge(opts, say=lambda _: None):
            raise AssertionError("Forge started on a taken port")

    try:
        with pytest.raises(ForgeSetupError, match=rf"127\.0\.0\.1:{port}: .*pass another --port"):
            asyncio.run(run())
    finally:
        taken.close()
    assert not (tmp_path / "forge").exists()  # nothing was prepared, no node was started
