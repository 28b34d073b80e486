"""Slice configuration and secrets on a real 3-process local cluster, driven by the `aether` CLI
(issue 14): the secret set from stdin reaches the slice, a restarted node starts its instance with
the config again, a rotated secret reaches every instance, and the value appears in no CLI output
and no node's log."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import LocalCluster, deploy_hello_examples

pytestmark = pytest.mark.timeout(240)

SECRET = "pr0cess-Secret-Value-7781"
ROTATED = "pr0cess-Rotated-Value-9912"
COORDS = "org.example:vault:1.0.0"
SOURCE = """
import msgspec
from aether.slices import Slice, entry

class Settings(msgspec.Struct):
    greeting: str
    token: str

class Vault(Slice):
    config_type = Settings

    @entry
    async def check(self, guess: str) -> dict:
        c = self.context.config
        return {"greeting": c.greeting, "match": c.token == guess, "node": self.context.node_id}

    @entry
    async def login(self) -> str:
        raise ConnectionError("cannot connect to postgresql://app:" + self.context.config.token + "@db")
"""
BLUEPRINT = """
id = "vault"

[slices.vault]
artifact = "org.example:vault:1.0.0"
instances = 3

[slices.vault.config]
greeting = "hi"
token = { secret = "vault-token" }
"""


def run(
    c: LocalCluster, *args: str, stdin: str | None = None, node: int = 0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aether.cli.main", "--connect", c.connect(node), *args],
        env=c.env, input=stdin, capture_output=True, text=True, timeout=90,
    )


def wait_for(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout} s ({last})")


def test_config_and_secrets_across_processes(make_local_cluster: Any, tmp_path: Path) -> None:
    c = make_local_cluster(3)
    c.env["COLUMNS"] = "200"
    deploy_hello_examples(c.repository, tmp_path / "wheels", extra={COORDS: (SOURCE, "Vault")})
    outputs: list[str] = []

    def cli(*args: str, stdin: str | None = None, node: int = 0) -> subprocess.CompletedProcess[str]:
        r = run(c, *args, stdin=stdin, node=node)
        outputs.append(r.stdout + r.stderr)
        return r

    r = c.start()
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("secret", "set", "vault-token", stdin=SECRET + "\n")
    assert r.returncode == 0 and "Created secret 'vault-token' (version 1)." in r.stdout, r.stdout + r.stderr
    bp = tmp_path / "vault.toml"
    bp.write_text(BLUEPRINT)
    r = cli("blueprint", "apply", str(bp), "--wait", "--wait-timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr

    def answers(guess: str) -> list[Any]:
        out = []
        for i in range(3):
            status, doc = c.api(i, "POST", "/api/v1/invoke/org.example:vault/check", guess)
            outputs.append(str(doc))
            out.append(doc if status == 200 else (status, doc))
        return out

    def all_match(guess: str) -> Any:
        got = answers(guess)
        return True if all(isinstance(d, dict) and d["match"] and d["greeting"] == "hi" for d in got) else got

    wait_for(lambda: all_match(SECRET), "every node answers with the secret in its config")
    # an entry whose error holds the secret (a driver's DSN): redacted in the 502's detail (and in
    # the node's log, checked below); it was answered and logged with the value
    for i in range(3):
        status, doc = c.api(i, "POST", "/api/v1/invoke/org.example:vault/login", None)
        outputs.append(str(doc))
        assert status == 502 and "postgresql://app:***@db" in doc["detail"], (status, doc)

    # a node restarted: its instance starts again with the config from its replica
    r = c.cli("cluster", "restart", "node-2", "--dir", str(c.dir), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: all_match(SECRET), "the restarted node serves with the config again")

    # the secret rotated: every instance gets it, one at a time
    r = cli("secret", "set", "vault-token", stdin=ROTATED, node=2)
    assert r.returncode == 0 and "version 2" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: all_match(ROTATED), "every instance on the rotated secret")

    r = cli("blueprint", "show", "vault")
    assert 'greeting="hi"' in r.stdout and "token=secret(vault-token)" in r.stdout, r.stdout
    for args in (("blueprint", "show", "vault"), ("blueprint", "show", "vault", "--json"), ("slices",),
                 ("slices", "--json"), ("secret", "list"), ("secret", "list", "--json"),
                 ("audit", "--json"), ("status",)):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stdout + r.stderr)
    assert any("vault-token" in o for o in outputs)  # the name shows, the values never do
    logs = "\n".join(c.log_path(i).read_text(errors="replace") for i in range(3))
    assert "restarted with its new config" in logs or "reconfigured" in logs
    for value in (SECRET, ROTATED):
        assert not any(value in o for o in outputs), value
        assert value not in logs, value
