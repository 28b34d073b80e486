"""`aether artifact deploy|list|versions` through click's CliRunner."""

from __future__ import annotations

import json
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from aether.cli.artifact import artifact
from aether.slices.repository import Repository
from aether.slices.testing import build_library_wheel, build_slice_wheel, write_wheel

pytestmark = pytest.mark.timeout(30)

SRC = """
from aether.slices import Slice, entry

class Echo(Slice):
    @entry
    async def echo(self, text: str) -> str:
        return text
"""


def run(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(artifact, list(args), env=env, catch_exceptions=False)


def test_deploy_list_versions(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    w1 = build_slice_wheel(tmp_path / "a", "org.example:echo:0.1.0", SRC, "Echo")
    w2 = build_slice_wheel(
        tmp_path / "b", "org.example:echo:0.2.0", SRC, "Echo", {"org.example:hello": "^0.1.0"}
    )
    r = run("--repository", repo, "deploy", str(w1))
    assert r.exit_code == 0, r.output
    assert "Deployed org.example:echo:0.1.0" in r.output
    r = run("--repository", repo, "deploy", str(w2))
    assert r.exit_code == 0 and "Slice dependencies: org.example:hello ^0.1.0" in r.output
    r = run("--repository", repo, "list")
    assert r.exit_code == 0
    assert "org.example:echo" in r.output and "0.1.0" in r.output and "0.2.0" in r.output
    assert "org.example:hello" in r.output and "^0.1.0" in r.output
    r = run("--repository", repo, "list", "--json")
    rows = json.loads(r.output)
    assert [x["artifact"] for x in rows] == ["org.example:echo:0.1.0", "org.example:echo:0.2.0"]
    assert rows[1]["dependencies"] == {"org.example:hello": "^0.1.0"}
    r = run("--repository", repo, "versions", "org.example:echo")
    assert r.exit_code == 0 and r.output.split() == ["0.1.0", "0.2.0"]
    r = run("--repository", repo, "versions", "org.example:echo", "--json")
    assert json.loads(r.output) == ["0.1.0", "0.2.0"]


def test_the_list_is_not_cut_when_piped(tmp_path: Path) -> None:
    # `aether artifact list` printed through a console of its own: cut to the terminal's (or
    # COLUMNS') width with "…" when piped, unlike every other table (docs/cli.md, *No truncation
    # when piped*)
    repo = str(tmp_path / "repo")
    w = build_slice_wheel(
        tmp_path / "a", "org.example:echo:0.1.0", SRC, "Echo", {"org.example:hello": "^0.1.0"}
    )
    assert run("--repository", repo, "deploy", str(w)).exit_code == 0
    r = run("--repository", repo, "list", env={"COLUMNS": "40"})
    assert r.exit_code == 0, r.output
    assert "org.example:echo" in r.output and w.name in r.output, r.output
    assert "org.example:hello ^0.1.0" in r.output, r.output
    assert "…" not in r.output, r.output


def test_repository_from_env_and_coords(tmp_path: Path) -> None:
    env = {"AETHER_REPOSITORY": str(tmp_path / "envrepo")}
    w = build_slice_wheel(tmp_path, "org.example:echo:0.1.0", SRC, "Echo")
    r = run("deploy", str(w), "--coords", "org.acme:echo2:1.0.0", "--json", env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["artifact"] == "org.acme:echo2:1.0.0"
    assert Repository(tmp_path / "envrepo").versions("org.acme:echo2")[0].major == 1


def test_library_wheels(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    lib = build_library_wheel(tmp_path, "tinylib", "1.0")
    r = run("--repository", repo, "deploy", str(lib))
    assert r.exit_code == 0 and "Stored library wheel tinylib-1.0-py3-none-any.whl" in r.output
    r = run("--repository", repo, "list", "--libs")
    assert r.output.split() == ["tinylib-1.0-py3-none-any.whl"]
    r = run("--repository", repo, "list")
    assert "No artifacts" in r.output
    r = run("--repository", repo, "deploy", str(lib), "--coords", "org.acme:x:1.0.0")
    assert r.exit_code == 2 and "library wheel" in r.output


def test_errors_and_exit_codes(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    r = run("--repository", repo, "deploy", str(tmp_path / "missing.whl"))
    assert r.exit_code == 2  # click: path does not exist
    junk = tmp_path / "junk-1.0-py3-none-any.whl"
    junk.write_bytes(b"nope")
    r = run("--repository", repo, "deploy", str(junk))
    assert (
        r.exit_code == 1 and "error:" in r.output and "not a zip" in r.output and "docs/slices.md" in r.output
    )
    bad = write_wheel(
        tmp_path / "bad",
        "thing",
        "1.0.0",
        {"m/__init__.py": ""},
        entry_points={"aether.slices": {"x": "m:A"}},
    )
    r = run("--repository", repo, "deploy", str(bad))
    assert r.exit_code == 1 and "GROUP:ARTIFACT" in r.output
    w = build_slice_wheel(tmp_path, "org.example:echo:0.1.0", SRC, "Echo")
    r = run("--repository", repo, "deploy", str(w), "--coords", "nonsense")
    assert r.exit_code == 2 and "GROUP:ARTIFACT:VERSION" in r.output
    r = run("--repository", repo, "versions", "nocolon")
    assert r.exit_code == 2 and "GROUP:ARTIFACT" in r.output
    r = run("--repository", repo, "versions", "org.example:nothing")
    assert r.exit_code == 1 and "no versions of org.example:nothing" in r.output


def test_global_json_flag_is_honoured(tmp_path: Path) -> None:
    """Registered under `aether`, the global `--json` (Settings.json) switches to JSON output."""

    @click.group()
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def fake_main(ctx: click.Context, as_json: bool) -> None:
        ctx.obj = types.SimpleNamespace(json=as_json)

    fake_main.add_command(artifact)
    repo = str(tmp_path / "repo")
    w = build_slice_wheel(tmp_path, "org.example:echo:0.1.0", SRC, "Echo")
    r = CliRunner().invoke(fake_main, ["--json", "artifact", "--repository", repo, "deploy", str(w)])
    assert r.exit_code == 0 and json.loads(r.output)["kind"] == "slice"
    r = CliRunner().invoke(fake_main, ["--json", "artifact", "--repository", repo, "list"])
    assert json.loads(r.output)[0]["artifact"] == "org.example:echo:0.1.0"


def test_repository_option_after_the_subcommand(tmp_path: Path) -> None:
    """Issue 11: `aether artifact deploy --repository DIR W` failed with "No such option"."""
    import os
    import subprocess
    import sys

    repo, other = tmp_path / "repo", tmp_path / "env-repo"
    w = build_slice_wheel(tmp_path / "w", "org.example:echo:0.1.0", SRC, "Echo")
    env = dict(os.environ, AETHER_REPOSITORY=str(other))

    def aether(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aether.cli.main", "artifact", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )

    r = aether("deploy", "--repository", str(repo), str(w))
    assert r.returncode == 0, r.stderr
    assert f"to {repo}/org/example/echo/0.1.0/" in r.stdout
    assert [str(a) for a in Repository(repo).list()] == ["org.example:echo:0.1.0"]
    assert not other.exists()  # the option beats the environment
    r = aether("list", "--repository", str(repo), "--json")
    assert [x["artifact"] for x in json.loads(r.stdout)] == ["org.example:echo:0.1.0"]
    r = aether("versions", "org.example:echo", "--repository", str(repo))
    assert r.returncode == 0 and r.stdout.split() == ["0.1.0"]
    # after the subcommand wins over before it
    r = aether("--repository", str(other), "versions", "org.example:echo", "--repository", str(repo))
    assert r.returncode == 0 and r.stdout.split() == ["0.1.0"]
    # an empty repository is named in the error
    r = aether("versions", "org.example:echo", "--repository", str(other))
    assert r.returncode == 1 and f"no versions of org.example:echo in {other}" in r.stderr
