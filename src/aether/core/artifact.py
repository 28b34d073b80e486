"""Artifact coordinates `group:artifact:version`, semantic versions and version patterns.

Parsed once at the edge into validated, comparable value objects:

- `Version`: `MAJOR.MINOR.PATCH[-QUALIFIER]` (semver order: a qualified version sorts before
  the plain one, qualifiers compare by dot-separated identifiers, numbers numerically);
- `VersionPattern`: exact `1.2.3`, ranges `[1.0,2.0)` / `(1.0,]`, comparisons `>=1.5`, `<2`,
  `>1.0, <2.0`, tilde `~1.2.3` (>=1.2.3 <1.3.0), caret `^1.2.3` (>=1.2.3 <2.0.0; for 0.x,
  <0.(x+1).0), and `*` (any);
- `Artifact`: coordinates with a validated group (dotted), artifact id and version.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from aether.core.errors import BadRequest

_VERSION_RE = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?\Z")
_GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*\Z", re.IGNORECASE)
_ARTIFACT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*\Z", re.IGNORECASE)


@functools.total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    major: int
    minor: int
    patch: int
    qualifier: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        m = _VERSION_RE.match(text.strip())
        if not m:
            raise BadRequest(f"invalid version {text!r}: expected MAJOR.MINOR.PATCH[-QUALIFIER], e.g. 1.2.0")
        return cls(int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), m.group(4) or "")

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{self.qualifier}" if self.qualifier else base

    def _key(self) -> tuple[object, ...]:
        # no qualifier sorts after any qualifier (1.0.0-rc1 < 1.0.0)
        if not self.qualifier:
            q: tuple[object, ...] = ((1,),)
        else:
            parts = self.qualifier.split(".")
            q = ((0,), tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))
        return (self.major, self.minor, self.patch, q)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()


_CMP_RE = re.compile(r"^(>=|<=|>|<|==|=)?\s*(\S+)\Z")


@dataclass(frozen=True, slots=True)
class _Bound:
    version: Version
    inclusive: bool


@dataclass(frozen=True, slots=True)
class VersionPattern:
    """A set of acceptable versions. `matches(v)`; `str()` gives back the source text."""

    text: str
    lower: _Bound | None
    upper: _Bound | None

    @classmethod
    def parse(cls, text: str) -> VersionPattern:
        t = text.strip()
        if not t:
            raise BadRequest("empty version pattern")
        try:
            if t == "*":
                return cls(t, None, None)
            if t[0] in "[(" and t[-1] in "])":
                lo_s, sep, hi_s = t[1:-1].partition(",")
                if not sep:
                    if t[0] == "[" and t[-1] == "]":  # [1.0] = exactly 1.0
                        v = Version.parse(lo_s)
                        return cls(t, _Bound(v, True), _Bound(v, True))
                    raise BadRequest(f"invalid range {text!r}: expected [LOW,HIGH) with a comma")
                lo = _Bound(Version.parse(lo_s), t[0] == "[") if lo_s.strip() else None
                hi = _Bound(Version.parse(hi_s), t[-1] == "]") if hi_s.strip() else None
                return cls(t, lo, hi)
            if t[0] == "~":
                v = Version.parse(t[1:])
                return cls(t, _Bound(v, True), _Bound(Version(v.major, v.minor + 1, 0, "0"), False))
            if t[0] == "^":
                v = Version.parse(t[1:])
                if v.major > 0:
                    top = Version(v.major + 1, 0, 0, "0")
                elif v.minor > 0:
                    top = Version(0, v.minor + 1, 0, "0")
                else:
                    top = Version(0, 0, v.patch + 1, "0")
                return cls(t, _Bound(v, True), _Bound(top, False))
            lower: _Bound | None = None
            upper: _Bound | None = None
            for part in t.split(","):
                m = _CMP_RE.match(part.strip())
                if not m:
                    raise BadRequest(f"invalid version pattern {text!r}")
                op, vs = m.group(1) or "==", Version.parse(m.group(2))
                if op in ("==", "="):
                    lower, upper = _Bound(vs, True), _Bound(vs, True)
                elif op in (">", ">="):
                    lower = _Bound(vs, op == ">=")
                else:
                    upper = _Bound(vs, op == "<=")
            return cls(t, lower, upper)
        except BadRequest as e:
            if "pattern" in str(e) or "range" in str(e):
                raise
            raise BadRequest(f"invalid version pattern {text!r}: {e}") from None

    def matches(self, v: Version) -> bool:
        lo, hi = self.lower, self.upper
        if lo is not None and (v < lo.version or (v == lo.version and not lo.inclusive)):
            return False
        return not (hi is not None and (v > hi.version or (v == hi.version and not hi.inclusive)))

    def __str__(self) -> str:
        return self.text


@functools.total_ordering
@dataclass(frozen=True, slots=True)
class Artifact:
    """Coordinates `group:artifact:version`, e.g. `org.demo:place-order:0.1.0`."""

    group: str
    artifact: str
    version: Version

    @classmethod
    def parse(cls, text: str) -> Artifact:
        parts = text.strip().split(":")
        if len(parts) != 3:
            raise BadRequest(
                f"invalid artifact coordinates {text!r}: expected GROUP:ARTIFACT:VERSION, "
                "e.g. org.demo:hello:0.1.0"
            )
        group, art, ver = parts
        if not _GROUP_RE.match(group):
            raise BadRequest(f"invalid group {group!r} in {text!r}: use dotted names like org.example")
        if not _ARTIFACT_RE.match(art):
            raise BadRequest(f"invalid artifact id {art!r} in {text!r}: letters, digits, '.', '_', '-'")
        try:
            version = Version.parse(ver)
        except BadRequest as e:
            raise BadRequest(f"{e} (in {text!r})") from None
        return cls(group, art, version)

    @property
    def name(self) -> str:
        """`group:artifact` without the version."""
        return f"{self.group}:{self.artifact}"

    def __str__(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Artifact):
            return NotImplemented
        return (self.group, self.artifact, self.version) < (other.group, other.artifact, other.version)
