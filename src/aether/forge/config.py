"""`forge-config.toml`: the defaults of `aether forge` and the load generator's targets, rates and
schedule, parsed once into frozen structs (docs/forge.md, "Load generator and forge-config.toml").

`parse_forge_config(text, filename)` and `load_forge_config(path)` refuse unknown keys, wrong types,
out-of-range values and bad templates with a `ForgeConfigError` (a `BadRequest`) naming the file,
the key, its line where it can be found, and what is wrong. Paths in ``[forge]`` are relative to
the config file and come back resolved.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated

import msgspec

from aether.core.errors import BadRequest
from aether.core.numbers import format_path, number_problem
from aether.forge.templates import Template, TemplateError, compile_template

__all__ = [
    "ForgeConfig",
    "ForgeConfigError",
    "ForgeSection",
    "LoadConfig",
    "ScheduleStep",
    "Target",
    "TargetTemplates",
    "compile_target",
    "load_forge_config",
    "parse_forge_config",
]

_NonNeg = Annotated[float, msgspec.Meta(ge=0)]
_Pos = Annotated[float, msgspec.Meta(gt=0)]
_Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class ForgeConfigError(BadRequest):
    """`forge-config.toml` is invalid; the message names the file, the key and the problem."""


class ForgeSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[forge]``: defaults for the `aether forge` flags (None: the flag's own default)."""

    nodes: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    port: _Port | None = None
    blueprint: str | None = None  # resolved against the config file's directory
    wheels: str | None = None  # likewise


class ScheduleStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[[load.schedule]]``: at `at` seconds after the load starts, go to `rate` requests/s,
    linearly over `ramp` seconds (0: at once)."""

    at: _NonNeg
    rate: _NonNeg
    ramp: _NonNeg = 0.0


class Target(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[[load.targets]]``: one HTTP route the generator drives; `path`, header values and `body`
    are templates (`aether.forge.templates`)."""

    name: str
    path: str
    method: str = "GET"
    weight: _NonNeg = 1.0  # share of the total rate: weight / sum of weights
    headers: dict[str, str] = {}
    body: str | None = None
    expect: list[Annotated[int, msgspec.Meta(ge=100, le=599)]] | None = None  # None: any 2xx
    capture: bool = False  # hand the response body to the generator's on_response hook

    def is_success(self, status: int) -> bool:
        return 200 <= status <= 299 if self.expect is None else status in self.expect


class LoadConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[load]``: the load generator."""

    rate: _NonNeg = 0.0  # total requests/s at start, split over the targets by weight
    paused: bool = False
    max_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 256  # beyond: dropped_client_side
    connections: Annotated[int, msgspec.Meta(ge=1)] = 100  # the HTTP client's connection pool
    timeout: _Pos = 10.0  # seconds per request (connect + response)
    history: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 300  # seconds of per-second stats kept
    seed: int | None = None  # templates and target choice reproducible with a seed
    schedule: list[ScheduleStep] = []
    targets: list[Target] = []


class ForgeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole file."""

    forge: ForgeSection = ForgeSection()
    load: LoadConfig = LoadConfig()


class TargetTemplates(msgspec.Struct, frozen=True):
    """A target's compiled templates."""

    path: Template
    headers: dict[str, Template]
    body: Template | None


def compile_target(target: Target, where: str = "target") -> TargetTemplates:
    """Compile `target`'s templates (`TemplateError` naming `where`.path/headers/body)."""
    return TargetTemplates(
        path=compile_template(target.path, f"{where}.path"),
        headers={k: compile_template(v, f"{where}.headers.{k}") for k, v in target.headers.items()},
        body=None if target.body is None else compile_template(target.body, f"{where}.body"),
    )


def _line_of(text: str, key: str, path: str = "") -> int | None:
    """The line (1-based) of ``key =`` in `text`, looked for first in the table `path` names
    (``load.schedule[1]``: the second ``[[load.schedule]]``), then anywhere (a best effort for
    error messages)."""
    start, end = 0, len(text)
    table = re.sub(r"\[\d+\]\Z", "", path)
    if table:
        m = re.search(r"\[(\d+)\]\Z", path)
        nth = int(m.group(1)) if m else 0
        header = rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]" if m else rf"^\s*\[\s*{re.escape(table)}\s*\]"
        found = list(re.finditer(header, text, re.MULTILINE))
        if nth < len(found):
            start = found[nth].end()
            nxt = re.compile(r"^\s*\[", re.MULTILINE).search(text, start)
            end = nxt.start() if nxt else len(text)
    for lo, hi in ((start, end), (0, len(text))):
        for pat in (rf"^\s*\"?{re.escape(key)}\"?\s*=", rf"[{{,]\s*\"?{re.escape(key)}\"?\s*="):
            m = re.compile(pat, re.MULTILINE).search(text, lo, hi)
            if m is not None:
                return text.count("\n", 0, m.start()) + 1
    return None


def _validation_error(e: msgspec.ValidationError, text: str, filename: str) -> ForgeConfigError:
    msg = str(e)
    what, _, at = msg.partition(" - at `$")
    key = at.rstrip("`").lstrip(".")
    m = re.match(r"Object contains unknown field `([^`]+)`", what)
    if m:
        unknown = m.group(1)
        full = f"{key}.{unknown}" if key else unknown
        line = _line_of(text, unknown, key)
        where = f"{filename}:{line}" if line else filename
        return ForgeConfigError(f"{where}: unknown key {full!r}")
    table, _, last = re.sub(r"\[\d+\]$", "", key).rpartition(".")
    line = _line_of(text, last, table) if last else None
    where = f"{filename}:{line}" if line else filename
    return ForgeConfigError(f"{where}: {key or 'the file'}: {what}")


def _check(cfg: ForgeConfig, text: str, filename: str) -> None:
    def fail(key: str, why: str, line_key: str | None = None) -> ForgeConfigError:
        line = _line_of(text, line_key, key.rpartition(".")[0]) if line_key else None
        where = f"{filename}:{line}" if line else filename
        return ForgeConfigError(f"{where}: {key}: {why}")

    names: set[str] = set()
    for i, t in enumerate(cfg.load.targets):
        where = f"load.targets[{i}]"
        if not t.name:
            raise fail(f"{where}.name", "must not be empty", "name")
        if t.name in names:
            raise fail(f"{where}.name", f"duplicate target name {t.name!r}", "name")
        names.add(t.name)
        if t.method.upper() not in _HTTP_METHODS:
            raise fail(f"{where}.method", f"unknown HTTP method {t.method!r}", "method")
        if not t.path.startswith("/"):
            raise fail(f"{where}.path", f"must start with '/' (got {t.path!r})", "path")
        try:
            compile_target(t, f"{filename}: {where} ({t.name})")
        except TemplateError as e:
            raise ForgeConfigError(str(e)) from None
    if cfg.load.targets and sum(t.weight for t in cfg.load.targets) <= 0:
        raise fail("load.targets", "at least one target needs a weight above 0", "weight")
    last_at = -1.0
    for i, s in enumerate(cfg.load.schedule):
        if s.at < last_at:
            raise fail(f"load.schedule[{i}].at", f"steps must be in time order ({s.at} < {last_at})", "at")
        last_at = s.at


def parse_forge_config(text: str, filename: str = "forge-config.toml") -> ForgeConfig:
    """Parse and check a `forge-config.toml`; ``[forge]`` paths are resolved against the directory
    of `filename`. `ForgeConfigError` naming the file, key and problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ForgeConfigError(f"{filename}: not valid TOML: {e}") from None
    if (found := number_problem(data)) is not None:
        where, number, problem = found
        key = format_path(where)
        line = None
        if where and isinstance(where[-1], str):
            line = _line_of(text, where[-1], key.rpartition(".")[0])
        at = f"{filename}:{line}" if line else filename
        raise ForgeConfigError(f"{at}: {key} = {number!r} {problem}")
    try:
        cfg = msgspec.convert(data, ForgeConfig)
    except msgspec.ValidationError as e:
        raise _validation_error(e, text, filename) from None
    _check(cfg, text, filename)
    base = Path(filename).parent
    forge = cfg.forge
    if forge.blueprint is not None or forge.wheels is not None:
        forge = msgspec.structs.replace(
            forge,
            blueprint=None if forge.blueprint is None else str(base / forge.blueprint),
            wheels=None if forge.wheels is None else str(base / forge.wheels),
        )
    targets = [msgspec.structs.replace(t, method=t.method.upper()) for t in cfg.load.targets]
    return ForgeConfig(forge=forge, load=msgspec.structs.replace(cfg.load, targets=targets))


def load_forge_config(path: str | Path) -> ForgeConfig:
    """Read and parse the file at `path` (`ForgeConfigError` also when it cannot be read)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ForgeConfigError(f"{p}: cannot read the forge config: {e}") from None
    return parse_forge_config(text, str(p))
