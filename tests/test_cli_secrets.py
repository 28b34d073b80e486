"""`aether secret set|list|delete` against an in-process 3-node cluster: values from a file, from
stdin, never printed back; errors with their exit codes."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from aether.cli.main import EXIT_FAILED, EXIT_USAGE, main
from conftest import running_cluster

pytestmark = pytest.mark.timeout(60)

VALUE = "cli-s3cret-value-42"


async def test_secret_commands(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_cluster(tmp_path) as nodes:
        port = nodes[1].management.port
        outputs: list[str] = []

        async def cli(*args: str, stdin: bytes | None = None) -> Result:
            env = {"AETHER_CONNECT": f"127.0.0.1:{port}", "AETHER_API_KEY": None, "COLUMNS": "200"}
            runner = CliRunner(env=env)
            r = await asyncio.to_thread(runner.invoke, main, list(args), input=stdin, catch_exceptions=False)
            outputs.append(r.output)
            return r

        value_file = tmp_path / "pw.txt"
        value_file.write_text(VALUE + "\n")  # one trailing newline is dropped
        r = await cli("secret", "set", "db-password", "--from-file", str(value_file))
        assert r.exit_code == 0, r.output
        assert r.output.strip() == "Created secret 'db-password' (version 1)."
        stored: Any = nodes[0].kv.get_local("secrets/db-password")
        assert stored.value == VALUE and stored.version == 1
        r = await cli("secret", "set", "api-token", stdin=b"tok-from-stdin\n")
        assert r.exit_code == 0, r.output
        assert nodes[0].kv.get_local("secrets/api-token").value == "tok-from-stdin"
        r = await cli("secret", "set", "db-password", "--json", stdin=b"second")
        assert r.exit_code == 0 and json.loads(r.stdout)["version"] == 2
        assert set(json.loads(r.stdout)) == {"name", "created", "updated", "version"}
        caplog.clear()
        with caplog.at_level(logging.INFO):
            r = await cli("secret", "set", "db-password", "--json", stdin=b"second")  # the same value again
        assert r.exit_code == 0 and json.loads(r.stdout)["version"] == 2  # unchanged: nothing restarts
        # nor does the node log a change (it logged "secret 'db-password' changed (version 2)")
        assert "secret 'db-password'" not in caplog.text, caplog.text
        # said so (it said "Changed ... (version 2)", and "Created" for a version 1 set again)
        r = await cli("secret", "set", "db-password", stdin=b"second")
        unchanged = "Secret 'db-password' already has this value: unchanged (version 2)."
        assert r.output.strip() == unchanged, r.output
        with caplog.at_level(logging.INFO):
            r = await cli("secret", "set", "db-password", stdin=b"third")
        assert r.output.strip() == "Changed secret 'db-password' (version 3).", r.output
        assert "secret 'db-password' changed (version 3)" in caplog.text, caplog.text
        r = await cli("secret", "set", "api-token", stdin=b"tok-from-stdin")
        assert "unchanged (version 1)" in r.output and "Created" not in r.output, r.output

        r = await cli("secret", "list")
        assert r.exit_code == 0 and "db-password" in r.output and "api-token" in r.output
        r = await cli("secret", "list", "--json")
        listed = json.loads(r.stdout)
        assert [s["name"] for s in listed] == ["api-token", "db-password"]

        r = await cli("secret", "set", "bad name", stdin=b"x")
        assert r.exit_code == EXIT_FAILED and "invalid secret name" in r.output
        r = await cli("secret", "set", "empty", stdin=b"\n")
        assert r.exit_code == EXIT_USAGE and "is empty" in r.output
        r = await cli("secret", "set", "binary", stdin=b"\xff\xfe")
        assert r.exit_code == EXIT_USAGE and "not UTF-8" in r.output

        r = await cli("secret", "delete", "api-token")
        assert r.exit_code == 0 and "Deleted secret 'api-token'." in r.output
        r = await cli("secret", "delete", "api-token")
        assert r.exit_code == EXIT_FAILED and "no secret 'api-token'" in r.output
        r = await cli("secret", "list")
        assert "api-token" not in r.output
        # never printed back
        assert not any(VALUE in out or "second" in out or "third" in out for out in outputs)
