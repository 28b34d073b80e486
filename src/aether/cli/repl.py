"""The interactive `aether` shell: `aether` with no command on a terminal.

Each line is split like a shell would (shlex) and run in-process through the same click group as
batch mode, with the global options given when the REPL started (--connect, --json, --api-key,
--timeout) applied first, so a line may still override them (`--json status`). A failing command
prints its error and the REPL goes on; the exit code of the last command shows in the prompt
when it is not 0 (`aether [1]> `).

History persists in `~/.aether/history` (env AETHER_HISTORY). Tab completes command and
subcommand names, options, artifact coordinates and blueprint ids (from the connected node's
`/api/v1/slices` and `/api/v1/blueprints`), node ids (`/api/v1/nodes`) and map names
(`/api/v1/maps`), cached for a few seconds; a node that does not answer just yields no suggestions.

prompt_toolkit is imported only here, so batch commands never pay for it.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, ThreadedCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory

from aether.cli.common import Settings
from aether.core.files import make_private_dirs, open_private

EXIT_WORDS = ("exit", "quit")
BUILTINS = {"help": "Show the commands, or `help CMD` for one command's help.", "exit": "Leave the shell."}
CACHE_SECONDS = 5.0


def history_path() -> Path:
    """`AETHER_HISTORY`, else `~/.aether/history`."""
    env = os.environ.get("AETHER_HISTORY")
    return Path(env).expanduser() if env else Path.home() / ".aether" / "history"


def _history() -> History:
    path = history_path()
    try:
        make_private_dirs(path.parent)
        os.close(open_private(path, os.O_WRONLY))  # 0600: lines may carry an --api-key
    except OSError as e:
        click.secho(f"warning: no persistent history ({path}: {e.strerror or e})", fg="yellow", err=True)
        return InMemoryHistory()
    return FileHistory(str(path))


def global_args(settings: Settings) -> list[str]:
    """The REPL's global options as arguments, put before every line."""
    args = ["--connect", settings.connect, "--timeout", repr(settings.timeout)]
    if settings.output not in ("table", "json"):
        args += ["-o", settings.output]  # `aether -o yaml` (or wide): every line in that format
    elif settings.json:
        args.append("--json")
    if settings.api_key:
        args += ["--api-key", settings.api_key]
    if settings.ca:
        args += ["--ca", settings.ca]
    return args


# -- data from the node, for completion ---------------------------------------------------------------


class NodeData:
    """Artifact coordinates, blueprint ids and node ids from the node, cached for CACHE_SECONDS."""

    def __init__(self, settings: Settings, ttl: float = CACHE_SECONDS) -> None:
        self.settings = settings
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Any]] = {}

    def _doc(self, path: str) -> Any:
        """The decoded answer to GET `path`, or None if the node does not give one."""
        now = time.monotonic()
        hit = self._cache.get(path)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        doc: Any = None
        try:
            from aether.cli.client import client_for

            timeout = min(self.settings.timeout, 1.0)
            doc = client_for(
                self.settings.connect, api_key=self.settings.api_key, timeout=timeout, ca=self.settings.ca
            ).get_json(path)
        except Exception:
            doc = None
        self._cache[path] = (now, doc)
        return doc

    def _items(self, path: str) -> list[dict[str, Any]]:
        doc = self._doc(path)
        if isinstance(doc, dict):  # /api/v1/status
            doc = doc.get("nodes")
        return [d for d in doc if isinstance(d, dict)] if isinstance(doc, list) else []

    def artifacts(self) -> list[str]:
        found = {s.get("artifact") for s in self._items("/api/v1/slices")}
        for bp in self._items("/api/v1/blueprints"):
            found.update(s.get("artifact") for s in bp.get("slices", []) if isinstance(s, dict))
        return sorted(a for a in found if isinstance(a, str) and a)

    def blueprints(self) -> list[str]:
        return sorted({b["id"] for b in self._items("/api/v1/blueprints") if isinstance(b.get("id"), str)})

    def maps(self) -> list[str]:
        doc = self._doc("/api/v1/maps")
        found = doc.get("maps") if isinstance(doc, dict) else None
        items = [m for m in found if isinstance(m, dict)] if isinstance(found, list) else []
        return sorted({m["name"] for m in items if isinstance(m.get("name"), str)})

    def node_ids(self) -> list[str]:
        members = self._items("/api/v1/nodes") or self._items("/api/v1/status")
        return sorted({m["id"] for m in members if isinstance(m.get("id"), str)})


# -- completion ---------------------------------------------------------------------------------------


def _split(text: str) -> tuple[list[str], str]:
    """(complete words, the word being typed) of the text before the cursor."""
    try:
        lex = shlex.shlex(text, posix=True, punctuation_chars=False)
        lex.whitespace_split = True
        words = list(lex)
    except ValueError:  # an open quote
        words = text.split()
    if text and not text[-1].isspace() and words:
        return words[:-1], words[-1]
    return words, ""


def _takes_value(command: click.Command, option: str) -> bool:
    for p in command.params:
        if isinstance(p, click.Option) and option in (*p.opts, *p.secondary_opts):
            return not p.is_flag and not p.count
    return False


def _options(command: click.Command) -> list[str]:
    names = [o for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)]
    return [*sorted(n for n in names if n.startswith("--")), "--help"]


class AetherCompleter(Completer):
    """Completes against the click tree of `group` plus REPL builtins and the node's data."""

    def __init__(self, group: click.Group, data: NodeData) -> None:
        self.group = group
        self.data = data

    def candidates(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """(word being typed, [(candidate, description)]) for `text` before the cursor."""
        words, word = _split(text)
        command: click.Command = self.group
        args: list[str] = []
        first = True
        skip = False
        for w in words:
            if skip:
                skip = False
                continue
            if w.startswith("-"):
                skip = "=" not in w and _takes_value(command, w)
                continue
            if first and w == "help":
                return word, self._subcommands(self.group, word)
            if isinstance(command, click.Group):
                sub = command.commands.get(w)
                if sub is None:
                    return word, []
                command = sub
                first = False
            else:
                args.append(w)
        if skip:  # the value of an option
            return word, []
        if word.startswith("-"):
            return word, [(o, "") for o in _options(command) if o.startswith(word)]
        if isinstance(command, click.Group):
            found = self._subcommands(command, word)
            if command is self.group:
                found += [(b, d) for b, d in BUILTINS.items() if b.startswith(word)]
                found += [("quit", BUILTINS["exit"])] if "quit".startswith(word) else []
            return word, sorted(found)
        positional = [p for p in command.params if isinstance(p, click.Argument)]
        if len(args) >= len(positional):
            return word, []
        return word, [(v, "") for v in self._values(positional[len(args)]) if v.startswith(word)]

    def _subcommands(self, group: click.Group, word: str) -> list[tuple[str, str]]:
        return [
            (name, cmd.get_short_help_str(60))
            for name, cmd in sorted(group.commands.items())
            if name.startswith(word) and not cmd.hidden
        ]

    def _values(self, param: click.Argument) -> list[str]:
        name = (param.name or "").lower()
        if "blueprint" in name:
            return self.data.blueprints()
        if name == "map_name":
            return self.data.maps()
        if name in ("key", "value"):  # a map's keys and JSON values: nothing to suggest
            return []
        if "node" in name:
            return self.data.node_ids()
        if "artifact" in name or "coord" in name:
            return self.data.artifacts()
        if isinstance(param.type, click.Path):
            return []
        return self.data.artifacts() + self.data.node_ids()

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        word, found = self.candidates(document.text_before_cursor)
        for value, meta in found:
            yield Completion(value, start_position=-len(word), display_meta=meta or None)


# -- running lines ------------------------------------------------------------------------------------


def print_help(group: click.Group) -> None:
    click.echo("Commands (run `help CMD` for one command's options):\n")
    rows = [(n, c.get_short_help_str(70)) for n, c in sorted(group.commands.items()) if not c.hidden]
    rows += [("help [CMD]", BUILTINS["help"]), ("exit, quit", "Leave the shell (also Ctrl-D).")]
    width = max(len(n) for n, _ in rows)
    for name, text in rows:
        click.echo(f"  {name.ljust(width)}  {text}")


def run_line(group: click.Group, settings: Settings, line: str) -> int | None:
    """Run one line; its exit code, or None to leave the REPL."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        return 2
    if not words:
        return 0
    if words[0] in EXIT_WORDS and len(words) == 1:
        return None
    if words[0] == "help":
        if len(words) == 1:
            print_help(group)
            return 0
        words = [*words[1:], "--help"]
    return run_command(group, settings, words)


def run_command(group: click.Group, settings: Settings, words: list[str]) -> int:
    """Run `aether WORDS` in-process with the REPL's global options; its exit code."""
    try:
        rv = group.main(
            [*global_args(settings), *words], prog_name="aether", standalone_mode=False, obj=settings
        )
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.ClickException as e:
        e.show()
        return int(e.exit_code)
    except click.Abort:
        click.secho("Aborted.", fg="red", err=True)
        return 1
    except KeyboardInterrupt:
        click.secho("Interrupted.", fg="red", err=True)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:
        click.secho(f"error: {type(e).__name__}: {e}", fg="red", err=True)
        return 1
    return rv if isinstance(rv, int) else 0


def prompt_text(code: int) -> str:
    return "aether> " if code == 0 else f"aether [{code}]> "


def run_repl(settings: Settings, group: click.Group) -> int:
    """The interactive loop over the commands of `group` (`aether.cli.main.main`); returns the
    exit code of the shell (0)."""
    session: PromptSession[str] = PromptSession(
        history=_history(),
        completer=ThreadedCompleter(AetherCompleter(group, NodeData(settings))),
        complete_while_typing=False,
    )
    click.echo(f"Aether shell, connected to {settings.connect}. `help` lists commands, `exit` leaves.")
    code = 0
    while True:
        try:
            line = session.prompt(prompt_text(code))
        except KeyboardInterrupt:  # Ctrl-C: drop the line
            continue
        except EOFError:  # Ctrl-D
            click.echo()
            return 0
        result = run_line(group, settings, line)
        if result is None:
            return 0
        code = result
