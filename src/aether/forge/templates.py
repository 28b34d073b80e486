"""Request templates of the load generator: ``${uuid}``, ``${range:A:B}``, ``${choice:a,b,c}``,
``${random:N}`` in a target's path, header values and body (docs/forge.md).

A template is compiled once (`compile_template`: a syntax error names the template and the bad
placeholder) and rendered per request with a `random.Random` the caller owns, so a run with a seed
is reproducible (``${uuid}`` draws its 128 bits from that rng too). Placeholders:

- ``${uuid}``: a random version-4 UUID (``3f2b...-4...``);
- ``${range:A:B}``: an integer from A to B, both inclusive (A <= B, either may be negative);
- ``${choice:a,b,c}``: one of the comma-separated values (none empty), equally likely;
- ``${random:N}``: N random ASCII letters and digits (1 <= N <= 4096).

``$$`` is a literal ``$``; a ``$`` not followed by ``{`` or ``$`` stands for itself. Values are
inserted as they are (no JSON or URL quoting): a template writes the quotes it needs.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass

from aether.core.errors import BadRequest

__all__ = ["Template", "TemplateError", "compile_template"]

_ALNUM = string.ascii_letters + string.digits
_MAX_RANDOM = 4096


class TemplateError(BadRequest):
    """A template does not parse; the message names the template and the placeholder."""


@dataclass(frozen=True, slots=True)
class _Uuid:
    def render(self, rng: random.Random) -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass(frozen=True, slots=True)
class _Range:
    low: int
    high: int

    def render(self, rng: random.Random) -> str:
        return str(rng.randint(self.low, self.high))


@dataclass(frozen=True, slots=True)
class _Choice:
    values: tuple[str, ...]

    def render(self, rng: random.Random) -> str:
        return self.values[rng.randrange(len(self.values))]


@dataclass(frozen=True, slots=True)
class _Random:
    length: int

    def render(self, rng: random.Random) -> str:
        return "".join(rng.choices(_ALNUM, k=self.length))


_Part = str | _Uuid | _Range | _Choice | _Random


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: literal text and placeholders, rendered with `render(rng)`."""

    source: str
    parts: tuple[_Part, ...]

    @property
    def constant(self) -> bool:
        """True when the template has no placeholder (it renders to the same text every time)."""
        return all(isinstance(p, str) for p in self.parts)

    def render(self, rng: random.Random) -> str:
        """The text with every placeholder replaced by a value drawn from `rng`."""
        return "".join(p if isinstance(p, str) else p.render(rng) for p in self.parts)


def _placeholder(spec: str, where: str) -> _Part:
    def bad(why: str) -> TemplateError:
        return TemplateError(f"{where}: bad placeholder ${{{spec}}}: {why}")

    name, sep, arg = spec.partition(":")
    if name == "uuid":
        if sep:
            raise bad("uuid takes no argument")
        return _Uuid()
    if name == "range":
        low_s, sep2, high_s = arg.partition(":")
        if not sep or not sep2:
            raise bad("expected ${range:A:B} with integers A <= B")
        try:
            low, high = int(low_s), int(high_s)
        except ValueError:
            raise bad("expected ${range:A:B} with integers A <= B") from None
        if low > high:
            raise bad(f"the range is empty ({low} > {high})")
        return _Range(low, high)
    if name == "choice":
        values = tuple(arg.split(","))
        if not sep or any(v == "" for v in values):
            raise bad("expected ${choice:a,b,c} with no empty value")
        return _Choice(values)
    if name == "random":
        try:
            n = int(arg) if sep else -1
        except ValueError:
            n = -1
        if not 1 <= n <= _MAX_RANDOM:
            raise bad(f"expected ${{random:N}} with an integer 1 <= N <= {_MAX_RANDOM}")
        return _Random(n)
    raise bad(f"unknown placeholder {name!r} (known: uuid, range, choice, random)")


def compile_template(text: str, where: str = "template") -> Template:
    """Compile `text`; `where` names it in errors (``forge-config.toml: load.targets[0].body``)."""
    parts: list[_Part] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("$", i)
        if j < 0:
            literal.append(text[i:])
            break
        literal.append(text[i:j])
        nxt = text[j + 1] if j + 1 < n else ""
        if nxt == "$":
            literal.append("$")
            i = j + 2
        elif nxt == "{":
            end = text.find("}", j + 2)
            if end < 0:
                bad = text[j : j + 20]
                raise TemplateError(f"{where}: unterminated placeholder {bad!r} (no closing '}}')")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_placeholder(text[j + 2 : end], where))
            i = end + 1
        else:
            literal.append("$")
            i = j + 1
    if literal and "".join(literal):
        parts.append("".join(literal))
    return Template(text, tuple(parts))
