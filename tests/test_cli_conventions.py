"""The CLI's conventions (issue 18): `-o table|wide|json|yaml`, no truncation when piped, `--watch`,
`aether completion`, an Examples section in every command's help, text never read as emoji."""

from __future__ import annotations

import json
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner, Result

from aether.cli import common
from aether.cli.examples import EXAMPLES
from aether.cli.main import main
from aether.core.status import KVEntry
from conftest import refusing_port
from test_cli_ops import FakeNode, Servers, addr

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        s.close()


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    base: dict[str, str | None] = {"AETHER_CONNECT": None, "AETHER_API_KEY": None, "COLUMNS": None}
    return CliRunner(env={**base, **(env or {})}).invoke(main, list(args), catch_exceptions=False)


def commands() -> Iterator[tuple[str, click.Command]]:
    def walk(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, f"{path} {name}".strip())

    return walk(main, "")


# -- Examples in every command's help -------------------------------------------------------------------


@pytest.mark.parametrize("path", [p for p, _ in commands()], ids=lambda p: p or "aether")
def test_every_command_help_has_examples(path: str) -> None:
    r = invoke(*path.split(), "--help")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(line.strip() == "Examples:" for line in lines), f"`aether {path} --help` has no Examples"
    at = next(i for i, line in enumerate(lines) if line.strip() == "Examples:")
    examples = [line.strip() for line in lines[at + 1 :] if line.strip()]
    assert examples and all(e.startswith(("aether", "eval", "printf")) for e in examples[:2]), examples
    # kept as written: an example line is never rewrapped into two
    own = EXAMPLES.get(path, [])
    for line in own:
        assert line in r.output, f"{line!r} rewrapped in `aether {path} --help`"


def _parse(words: list[str]) -> None:
    """Parse `aether WORDS` down to the last subcommand (no callback runs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # click 8.2's protected_args
        ctx = main.make_context("aether", list(words))
        cmd: click.Command = main
        rest = [*ctx.protected_args, *ctx.args]
        while isinstance(cmd, click.Group) and rest:
            name, sub, rest = cmd.resolve_command(ctx, rest)
            assert sub is not None and name is not None
            ctx = sub.make_context(name, rest, parent=ctx)
            cmd = sub
            rest = [*ctx.protected_args, *ctx.args] if isinstance(cmd, click.Group) else []


def test_every_example_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    checked = 0
    for lines in EXAMPLES.values():
        for line in lines:
            words = shlex.split(line, comments=True)
            if words[0] != "aether" or {"|", ">"} & set(words):
                continue
            for w in words:  # the files an example names exist here
                if w.endswith((".whl", ".toml", ".txt", ".json", ".jsonl", ".blueprint")):
                    (tmp_path / w).parent.mkdir(parents=True, exist_ok=True)
                    (tmp_path / w).touch()
            _parse(words[1:])
            checked += 1
    assert checked > 80


# -- -o table|wide|json|yaml -------------------------------------------------------------------------------


def test_output_formats(servers: Servers) -> None:
    srv = servers.start(FakeNode())
    a = addr(srv)
    as_json = json.loads(invoke("--connect", a, "status", "-o", "json").output)
    assert as_json["node_id"] == "node-1"
    assert json.loads(invoke("--connect", a, "status", "--json").output) == as_json  # the alias
    assert json.loads(invoke("--connect", a, "--json", "status").output) == as_json
    assert yaml.safe_load(invoke("--connect", a, "status", "-o", "yaml").output) == as_json
    assert yaml.safe_load(invoke("--connect", a, "-o", "yaml", "status").output) == as_json
    listed = yaml.safe_load(invoke("--connect", a, "nodes", "-o", "yaml").output)
    assert [m["id"] for m in listed] == ["node-1", "node-2"]
    table = invoke("--connect", a, "status", "-o", "table").output
    assert "Cluster as seen by node-1" in table and "Quorum" in table
    wide = invoke("--connect", a, "nodes", "-o", "wide").output
    assert "node-2" in wide and "127.0.0.1:7001" in wide
    bad = invoke("--connect", a, "nodes", "-o", "xml")
    assert bad.exit_code == 2 and "xml" in bad.output


def test_every_listing_command_takes_output_and_json() -> None:
    listings = ["status", "nodes", "slices", "kv list", "blueprint list", "map list", "key list",
                "secret list", "artifact list", "rollout status", "alerts", "audit", "metrics",
                "controller decisions", "cluster status"]  # fmt: skip
    for path in listings:
        cmd: Any = main
        for word in path.split():
            cmd = cmd.commands[word]
        names = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert {"-o", "--output", "--json"} <= names, path


# -- no truncation when piped ------------------------------------------------------------------------------


def test_a_piped_table_is_never_truncated(servers: Servers) -> None:
    node = FakeNode()
    long_value = "v" * 300
    node.slices = [KVEntry("config/" + "k" * 120, long_value)]
    srv = servers.start(node)
    r = invoke("--connect", addr(srv), "kv", "list")  # the runner's stdout is not a terminal
    assert r.exit_code == 0, r.output
    assert any(long_value in line and "k" * 120 in line for line in r.output.splitlines()), r.output
    assert "…" not in r.output


# -- rich never reads text as emoji codes --------------------------------------------------------------------


def test_g_a_v_is_printed_as_typed(servers: Servers) -> None:
    srv = servers.start(FakeNode())
    r = invoke("--connect", addr(srv), "slices")  # nothing deployed: the hint names `aether deploy G:A:V`
    assert "aether deploy G:A:V" in r.output and "🅰" not in r.output
    assert "G:A:V" in invoke("deploy", "--help").output


# -- --watch -------------------------------------------------------------------------------------------------


def test_watch_redraws_until_ctrl_c(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = servers.start(FakeNode())
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "_sleep", fake_sleep)
    r = invoke("--connect", addr(srv), "nodes", "--watch", "-o", "json")
    assert r.exit_code == 0, r.output  # Ctrl-C ends it cleanly
    docs = [json.loads(line) for line in r.output.splitlines()]  # one JSON document per line
    assert len(docs) == 3 and all([m["id"] for m in d] == ["node-1", "node-2"] for d in docs)
    assert sleeps == [2.0, 2.0, 2.0]

    sleeps.clear()
    r = invoke("--connect", addr(srv), "status", "--watch")
    assert r.exit_code == 0 and r.output.count("Cluster as seen by node-1") == 3

    sleeps.clear()
    r = invoke("--connect", addr(srv), "slices", "-w", "--json")
    assert r.exit_code == 0 and r.output.splitlines() == ["[]", "[]", "[]"]


# -- completion ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    r = invoke("completion", shell)
    assert r.exit_code == 0 and "_AETHER_COMPLETE" in r.output


def test_completion_completes_commands_and_choices() -> None:
    # what the bash script asks the program: the candidates for the word being typed
    env = {"_AETHER_COMPLETE": "bash_complete", "COMP_WORDS": "aether sta", "COMP_CWORD": "1"}
    r = CliRunner(env=env).invoke(main, [], prog_name="aether")
    assert "plain,status" in r.output
    env = {"_AETHER_COMPLETE": "bash_complete", "COMP_WORDS": "aether nodes -o y", "COMP_CWORD": "3"}
    r = CliRunner(env=env).invoke(main, [], prog_name="aether")
    assert "plain,yaml" in r.output


def test_the_shell_keeps_the_output_format() -> None:
    from aether.cli.repl import global_args

    assert global_args(common.Settings(output="yaml", json=True))[-2:] == ["-o", "yaml"]
    assert global_args(common.Settings(output="wide"))[-2:] == ["-o", "wide"]
    assert global_args(common.Settings(output="json", json=True))[-1] == "--json"
    assert "-o" not in global_args(common.Settings())


# -- Float options --------------------------------------------------------------------------------------


def _float_options() -> list[tuple[str, click.Option]]:
    return [
        (f"{path} {opt.opts[0]}".strip(), opt)
        for path, cmd in commands()
        for opt in cmd.params
        if isinstance(opt, click.Option) and isinstance(opt.type, click.types.FloatParamType)
    ]


def test_every_float_option_refuses_inf_and_nan() -> None:
    """click's float types accept inf and nan (and FloatRange(min=0, min_open=True) lets both
    through: inf > 0, nan fails no comparison); a JSON body has no form for them, msgspec writes
    null and the server reads "not set"."""
    found = _float_options()
    assert {"update --interval", "update --max-error-rate", "update --max-p99-ratio"} <= {p for p, _ in found}
    for _, opt in found:
        for text in ("inf", "-inf", "nan"):
            with pytest.raises(click.BadParameter, match="not a finite number"):
                opt.type.convert(text, opt, None)


def test_no_help_describes_a_range_with_none_and_wait_timeouts_are_above_zero() -> None:
    # `aether deploy --help` said "--wait-timeout FLOAT RANGE [default: 120.0; x<=None]", and a
    # negative or zero --wait-timeout was taken
    for path, cmd in commands():
        if cmd.params and not isinstance(cmd, click.Group):
            r = invoke(*path.split(), "--help")
            assert "None]" not in r.output and "x<=None" not in r.output, (path, r.output)
    for path in ("deploy a:b:1", "scale a:b 2", "blueprint apply x.toml", "update a:b --to 1"):
        r = invoke(*path.split(), "--wait", "--wait-timeout", "0")
        assert r.exit_code == 2 and "is not in the range x>0" in r.output, (path, r.output)


def test_update_with_interval_inf_is_a_usage_error_not_a_rollout_with_the_default() -> None:
    """`aether update G:A --to V --interval inf` sent {"interval": null} (msgspec's JSON for inf):
    the rollout ran with the blueprint's interval, silently. Now a usage error (exit 2) before any
    request: the address given refuses connections, which would be exit 3."""
    target = f"127.0.0.1:{refusing_port()}"
    r = invoke("--connect", target, "update", "org.demo:a", "--to", "2.0.0", "--interval", "inf")
    assert r.exit_code == 2, r.output
    assert "--interval" in r.output and "'inf' is not a finite number" in r.output


@pytest.mark.parametrize(
    ("state", "said"),
    [
        ("succeeded", "org.demo:a is already at 2.0.0: its rollout from 1.0.0 succeeded."),
        ("rolling-back", "org.demo:a: the rollout from 1.0.0 to 2.0.0 is rolling-back; follow it with "
                         "`aether rollout status org.demo:a`."),
    ],
)
def test_a_repeated_update_says_what_the_existing_rollout_is_doing(
    monkeypatch: pytest.MonkeyPatch, state: str, said: str
) -> None:
    """The API answers a repeated update with the rollout that exists (200): one that succeeded
    is "already at", one rolling back is not (it said "already at 2.0.0 ... rolling-back")."""
    from aether.cli import rollout

    answer = {"artifact": "org.demo:a", "old_version": "1.0.0", "new_version": "2.0.0",
              "strategy": "rolling", "state": state}
    monkeypatch.setattr(rollout, "make_client", lambda settings: object())
    monkeypatch.setattr(rollout, "call", lambda client, fn: answer)
    r = invoke("--connect", "127.0.0.1:1", "update", "org.demo:a", "--to", "2.0.0")
    assert r.exit_code == 0 and r.output.strip() == said, r.output
