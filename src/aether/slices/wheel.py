"""Reading slice and library wheels without importing or installing them (docs/slices.md).

Owns the packaging format of a slice:

- the slice class: entry point group `aether.slices`, name `group:artifact`, value
  `module:Class` (e.g. ``"org.example:hello" = "hello_slice:Hello"``); the wheel's version is the
  artifact version. Exactly one such entry per wheel. A wheel without one is a library wheel.
- the slices it calls: a TOML descriptor `aether-slice.toml` with one table::

      [dependencies]
      "org.example:hello" = "^0.1.0"

  shipped as package data in the slice's package (next to the module holding the class: for
  `greeter_slice:Greeter` that is `greeter_slice/aether-slice.toml`), or in the wheel's
  `*.dist-info/` directory. setuptools rejects version patterns such as `^0.1.0` as entry-point
  values, so the descriptor is the format that works with every build backend. An
  `aether.slice-dependencies` entry-point group (name `group:artifact`, value the pattern), which
  backends that do not validate entry-point values can write, is read too.
- the distributed maps it uses: ``maps = ["orders"]`` in the same descriptor; deploying the
  slice fails while one of them is not defined.
- library dependencies: ordinary `Requires-Dist`, environment markers evaluated for this
  interpreter.

Size limits (`WheelLimits`): a wheel whose members add up to more than `max_bytes` uncompressed
(default 256 MiB) or more than `max_files` members (default 10,000) is refused with
`WheelTooLarge` before anything is unpacked; `AETHER_WHEEL_MAX_BYTES` / `AETHER_WHEEL_MAX_FILES`
change the defaults.

Integrity (`WheelRecord`): every member of a wheel but `RECORD` itself (and its signature files)
is listed in `*.dist-info/RECORD` with a hash of at least SHA-256 and its size (PEP 376, PEP 427); a
member that is missing there or whose bytes do not match is refused with `WheelRecordMismatch`
naming the wheel and the member, before anything of the wheel is used. The check streams each member
through its hash while it is unpacked (`libstore`), so it reads no byte twice and counts against
the same size limits.

Metadata: METADATA and `entry_points.txt` are read through `importlib.metadata` (`DistInfo`: its
email-based METADATA parser and its entry-point parser, which keeps the ':' in names), requirements
and markers through `packaging`; the WHEEL file (RFC 822 headers, not core metadata) through
`email.parser`, as pip and installer read it.

May import: `aether.core`, `aether.slices.errors`, `packaging`. No I/O besides reading the zip.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import os
import re
import tomllib
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path, PurePosixPath

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion
from packaging.version import Version as PepVersion

from aether.core.artifact import Artifact, Version, VersionPattern
from aether.core.errors import BadRequest, ConfigError
from aether.slices.errors import InvalidWheel, NotASliceWheel, WheelRecordMismatch, WheelTooLarge

__all__ = [
    "DEPENDENCIES_GROUP",
    "DESCRIPTOR_NAME",
    "SLICES_GROUP",
    "ZIP_READ_ERRORS",
    "DistInfo",
    "WheelInfo",
    "WheelLimits",
    "WheelRecord",
    "aether_version",
    "evaluate_requirements",
    "inspect_wheel",
    "parse_entry_points",
    "sha256_file",
    "unsafe_member",
]

SLICES_GROUP = "aether.slices"
DEPENDENCIES_GROUP = "aether.slice-dependencies"
DESCRIPTOR_NAME = "aether-slice.toml"
_MAX_META = 4 * 1024 * 1024  # bytes read from one metadata file at most
_DIST_INFO_READ = ("METADATA", "WHEEL", "entry_points.txt")  # the *.dist-info files inspect_wheel reads
ZIP_READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,  # a CRC mismatch, a bad header
    zlib.error,  # a damaged deflate stream
    EOFError,  # a member cut short
    NotImplementedError,  # a compression method zipfile lacks
    RuntimeError,  # an encrypted member
)
"""What reading a member of a damaged or hand-made zip raises (the wheel's fault, never ours)."""


def unsafe_member(name: str) -> bool:
    """Whether a zip member's name would land outside the directory a wheel is installed into
    (an absolute path, a `..` part, a backslash)."""
    p = PurePosixPath(name)
    return p.is_absolute() or ".." in p.parts or "\\" in name


_OBJECT_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")


DEFAULT_MAX_WHEEL_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_WHEEL_FILES = 10_000
MAX_BYTES_ENV = "AETHER_WHEEL_MAX_BYTES"
MAX_FILES_ENV = "AETHER_WHEEL_MAX_FILES"


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={raw!r}: expected a positive integer")
    return value


@dataclass(frozen=True)
class WheelLimits:
    """How much one wheel may unpack to: total uncompressed bytes and number of members."""

    max_bytes: int = DEFAULT_MAX_WHEEL_BYTES
    max_files: int = DEFAULT_MAX_WHEEL_FILES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WheelLimits:
        """The defaults, overridden by AETHER_WHEEL_MAX_BYTES / AETHER_WHEEL_MAX_FILES (ConfigError
        if one is not a positive integer)."""
        env = os.environ if environ is None else environ
        return cls(
            _env_int(env, MAX_BYTES_ENV, DEFAULT_MAX_WHEEL_BYTES),
            _env_int(env, MAX_FILES_ENV, DEFAULT_MAX_WHEEL_FILES),
        )

    def check(self, zf: zipfile.ZipFile, path: Path | str) -> None:
        """Refuse (WheelTooLarge) a wheel whose central directory declares too many members or
        too many uncompressed bytes. Extraction must still count (`ExtractBudget`): a member's
        declared size may lie."""
        infos = zf.infolist()
        if len(infos) > self.max_files:
            raise WheelTooLarge(
                f"{path}: the wheel holds {len(infos)} files, more than the limit of {self.max_files} "
                f"({MAX_FILES_ENV})"
            )
        total = sum(i.file_size for i in infos)
        if total > self.max_bytes:
            raise WheelTooLarge(
                f"{path}: the wheel unpacks to {total} bytes, more than the limit of {self.max_bytes} "
                f"bytes ({MAX_BYTES_ENV})"
            )

    def budget(self, path: Path | str) -> ExtractBudget:
        return ExtractBudget(self, str(path))


class ExtractBudget:
    """Counts what is really written while a wheel is unpacked; WheelTooLarge past a limit."""

    def __init__(self, limits: WheelLimits, path: str) -> None:
        self.limits = limits
        self.path = path
        self.bytes = 0
        self.files = 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise WheelTooLarge(
                f"{self.path}: the wheel holds more than {self.limits.max_files} files, the limit "
                f"({MAX_FILES_ENV})"
            )

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_bytes:
            raise WheelTooLarge(
                f"{self.path}: the wheel unpacks to more than {self.limits.max_bytes} bytes, the limit "
                f"({MAX_BYTES_ENV})"
            )


DEFAULT_WHEEL_LIMITS = WheelLimits()

# RECORD hashes a wheel may use: SHA-256 or stronger (PEP 427 forbids md5 and sha1)
_RECORD_HASHES = frozenset({"sha256", "sha384", "sha512", "sha3_256", "sha3_384", "sha3_512", "blake2b"})
_RECORD_UNLISTED = ("RECORD", "RECORD.jws", "RECORD.p7s")  # RECORD itself and its signatures


class WheelRecord:
    """The `*.dist-info/RECORD` of an open wheel: what each member must hash to.

    `WheelRecord.read(zf, path)` parses it (InvalidWheel if it is missing or malformed);
    `hasher(member)` starts the check of one member: feed it the member's bytes, then `verify()`
    raises `WheelRecordMismatch` if the member is not listed with a usable hash or does not match.
    `verify_all()` checks every member without writing anything (for wheels handed to pip, which
    rewrites RECORD for what it installed but does not compare the wheel's hashes).
    """

    def __init__(self, path: str, record_name: str, entries: dict[str, tuple[str, str, int | None]]) -> None:
        self.path = path
        self.record_name = record_name
        self.entries = entries  # member -> (algorithm, urlsafe-base64 digest without padding, size)
        self._unlisted = frozenset(f"{record_name.rsplit('/', 1)[0]}/{n}" for n in _RECORD_UNLISTED)

    @classmethod
    def read(cls, zf: zipfile.ZipFile, path: Path | str) -> WheelRecord:
        names = zf.namelist()
        records = sorted(n for n in names if re.match(r"^[^/]+\.dist-info/RECORD\Z", n))
        if not records:
            raise InvalidWheel(f"{path}: not a wheel (no *.dist-info/RECORD listing its files and hashes)")
        if len(records) > 1:
            raise InvalidWheel(f"{path}: several RECORD files ({', '.join(records)})")
        record_name = records[0]
        text = _read(zf, record_name, Path(path))
        entries: dict[str, tuple[str, str, int | None]] = {}
        for row_no, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row:
                continue
            where = f"{path}: {record_name} line {row_no}"
            if len(row) != 3:
                raise InvalidWheel(f"{where}: expected path,hash,size; got {row!r}")
            member, digest, size = row
            algo, sep, value = digest.partition("=")
            try:
                size_n = int(size) if size else None
            except ValueError:
                raise InvalidWheel(f"{where}: size {size!r} is not a number") from None
            entries[member] = (algo if sep else "", value, size_n)
        return cls(str(path), record_name, entries)

    def hasher(self, member: str) -> _MemberCheck | None:
        """The check of `member` (None for RECORD itself and its signature files, which it cannot
        list). Every verdict comes from `verify()`, after the member's bytes went through: a
        member that is too large is reported as such (`WheelTooLarge`) before it is found unlisted."""
        if member in self._unlisted:
            return None
        entry = self.entries.get(member)
        if entry is None:
            return _MemberCheck(
                self, member, None,
                f"{member} is not listed in {self.record_name}; the wheel was changed after it was built, "
                "refusing to install it",
            )  # fmt: skip
        algo, digest, _ = entry
        if algo not in _RECORD_HASHES or not digest:
            what = f"a {algo} hash" if algo else "no hash"
            return _MemberCheck(
                self, member, None,
                f"{member} has {what} in {self.record_name}; a wheel records SHA-256 (or a stronger "
                "hash) for every file",
            )  # fmt: skip
        return _MemberCheck(self, member, entry)

    def verify_all(self, zf: zipfile.ZipFile, budget: ExtractBudget | None = None) -> None:
        """Stream every member through its hash (counting against `budget`); raise on the first
        member that is not listed or does not match."""
        for info in zf.infolist():
            if info.is_dir():
                continue
            if budget is not None:
                budget.add_file()
            check = self.hasher(info.filename)
            try:
                with zf.open(info) as src:
                    while chunk := src.read(1 << 20):
                        if budget is not None:
                            budget.add_bytes(len(chunk))
                        if check is not None:
                            check.update(chunk)
            except ZIP_READ_ERRORS as e:
                raise InvalidWheel(f"{self.path}: {info.filename} cannot be read ({e})") from None
            if check is not None:
                check.verify()


class _MemberCheck:
    """The running hash of one wheel member, compared with its RECORD entry by `verify()`
    (`entry` None: the member cannot pass, `problem` says why)."""

    def __init__(
        self, record: WheelRecord, member: str, entry: tuple[str, str, int | None] | None, problem: str = ""
    ) -> None:
        self.record = record
        self.member = member
        self.entry = entry
        self.problem = problem
        self.seen = 0
        self._hash = hashlib.new(entry[0] if entry is not None else "sha256")

    def update(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        self._hash.update(chunk)

    def verify(self) -> None:
        where = f"{self.record.path}: {self.member}"
        if self.entry is None:
            raise WheelRecordMismatch(f"{self.record.path}: {self.problem}")
        algo, digest, size = self.entry
        got = base64.urlsafe_b64encode(self._hash.digest()).rstrip(b"=").decode("ascii")
        if got != digest.rstrip("="):
            raise WheelRecordMismatch(
                f"{where} does not match its hash in {self.record.record_name} ({algo}={digest} recorded, "
                f"{algo}={got} found); the wheel was changed after it was built, refusing to install it"
            )
        if size is not None and size != self.seen:
            raise WheelRecordMismatch(
                f"{where} is {self.seen} bytes, but {self.record.record_name} records {size}; the wheel "
                "was changed after it was built, refusing to install it"
            )


@dataclass(frozen=True)
class WheelInfo:
    """What a wheel declares. `coords`/`slice_class` are None for a library wheel."""

    path: Path
    dist_name: str
    dist_version: str
    tags: frozenset[Tag]
    pure: bool
    coords: Artifact | None
    slice_class: str | None
    dependencies: dict[str, VersionPattern] = field(default_factory=dict)
    requires_dist: tuple[str, ...] = ()
    requirements: tuple[Requirement, ...] = ()
    top_level: tuple[str, ...] = ()
    maps: tuple[str, ...] = ()  # the distributed maps the slice uses (`maps` in aether-slice.toml)

    @property
    def is_slice(self) -> bool:
        return self.slice_class is not None

    @property
    def canonical_name(self) -> str:
        return canonicalize_name(self.dist_name)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def aether_version(text: str) -> Version:
    """Convert a wheel (PEP 440) version to an Aether version.

    `1.2.3` stays; pre-releases and dev releases become qualifiers (`1.0.0rc1` -> `1.0.0-rc1`,
    `1.0.0.dev2` -> `1.0.0-dev2`). Post-releases, epochs, local versions and more than three
    release numbers cannot be expressed: BadRequest (deploy with explicit coordinates instead).
    """
    try:
        return Version.parse(text)
    except BadRequest:
        pass
    try:
        v = PepVersion(text)
    except InvalidVersion:
        raise BadRequest(f"invalid version {text!r}") from None
    if v.epoch or v.post is not None or v.local or len(v.release) > 3:
        raise BadRequest(
            f"wheel version {text!r} has no Aether equivalent (MAJOR.MINOR.PATCH[-QUALIFIER]); "
            "pass explicit coordinates (--coords GROUP:ARTIFACT:VERSION)"
        )
    rel = list(v.release) + [0] * (3 - len(v.release))
    qual = ""
    if v.pre is not None:
        qual = f"{v.pre[0]}{v.pre[1]}"
    if v.dev is not None:
        qual = f"{qual}.dev{v.dev}" if qual else f"dev{v.dev}"
    return Version(rel[0], rel[1], rel[2], qual)


class DistInfo(importlib.metadata.Distribution):
    """A distribution's `*.dist-info` files, read beforehand (`name -> text`), seen through
    `importlib.metadata`: its parsers of METADATA (`metadata`, `requires`, `name`, `version`) and of
    `entry_points.txt` (`entry_points`). Nothing is installed, so `locate_file` has nothing to find.
    """

    def __init__(self, files: Mapping[str, str]) -> None:
        self._files = dict(files)

    def read_text(self, filename: str) -> str | None:
        return self._files.get(filename)

    def locate_file(self, path: str | os.PathLike[str]) -> Path:
        raise FileNotFoundError(f"{path}: a wheel's metadata, not an installed distribution")


def parse_entry_points(text: str) -> dict[str, dict[str, str]]:
    """Parse `entry_points.txt` (`importlib.metadata`'s parser: names may contain ':', which
    configparser would split on) into `{group: {name: value}}`; ValueError on a malformed line."""
    try:
        eps = DistInfo({"entry_points.txt": text}).entry_points
    except (TypeError, ValueError):  # importlib.metadata's words for a line without '='
        raise ValueError("a line is not NAME = VALUE") from None
    return {group: {ep.name: ep.value for ep in eps.select(group=group)} for group in sorted(eps.groups)}


def evaluate_requirements(
    raw: Iterable[str],
    *,
    extras: Iterable[str] = (),
    environment: Mapping[str, str] | None = None,
    source: str = "",
) -> list[Requirement]:
    """Parse `Requires-Dist` lines; keep those whose markers hold here (for the given extras)."""
    wanted = [""] + [canonicalize_name(e) for e in extras]
    out: list[Requirement] = []
    for line in raw:
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise InvalidWheel(f"{source}: invalid Requires-Dist {line!r}: {e}") from None
        if req.marker is not None and not _marker_holds(req.marker, wanted, environment):
            continue
        req.marker = None
        out.append(req)
    return out


def _marker_holds(marker: Marker, extras: list[str], environment: Mapping[str, str] | None) -> bool:
    for extra in extras:
        env = dict(environment or {})
        env["extra"] = extra
        if marker.evaluate(env):
            return True
    return False


def _read(zf: zipfile.ZipFile, name: str, path: Path) -> str:
    info = zf.getinfo(name)
    if info.file_size > _MAX_META:
        raise InvalidWheel(f"{path}: {name} is too large ({info.file_size} bytes)")
    try:
        return zf.read(name).decode("utf-8")
    except ZIP_READ_ERRORS as e:
        raise InvalidWheel(f"{path}: {name} cannot be read ({e})") from None
    except UnicodeDecodeError:
        raise InvalidWheel(f"{path}: {name} is not UTF-8 text") from None


def _parse_descriptor(text: str, where: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """The descriptor's `[dependencies]` and `maps` (the distributed maps the slice uses)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidWheel(f"{where}: invalid TOML: {e}") from None
    unknown = sorted(set(doc) - {"dependencies", "maps"})
    if unknown:
        raise InvalidWheel(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: maps = [...] and [dependencies]"
        )
    deps = doc.get("dependencies", {})
    if not isinstance(deps, dict) or not all(isinstance(v, str) for v in deps.values()):
        raise InvalidWheel(
            f'{where}: [dependencies] must map "group:artifact" to a version pattern string, '
            'e.g. "org.example:hello" = "^0.1.0"'
        )
    maps = doc.get("maps", [])
    if not isinstance(maps, list) or not all(isinstance(m, str) and m for m in maps):
        raise InvalidWheel(f'{where}: maps must be a list of map names, e.g. maps = ["orders"]')
    return dict(deps), tuple(sorted(set(maps)))


def _top_level(names: list[str], dist_info: str, zf: zipfile.ZipFile, path: Path) -> tuple[str, ...]:
    tl = f"{dist_info}/top_level.txt"
    if tl in names:
        return tuple(sorted({ln.strip() for ln in _read(zf, tl, path).splitlines() if ln.strip()}))
    tops: set[str] = set()
    for n in names:
        head, _, rest = n.partition("/")
        if head.endswith((".dist-info", ".data")):
            continue
        if rest and head.isidentifier():
            tops.add(head)
        elif not rest and head.endswith(".py") and head[:-3].isidentifier():
            tops.add(head[:-3])
    return tuple(sorted(tops))


def inspect_wheel(
    path: Path | str, coords: Artifact | str | None = None, *, limits: WheelLimits = DEFAULT_WHEEL_LIMITS
) -> WheelInfo:
    """Read a wheel's declarations (no import, no install).

    `coords` overrides the coordinates taken from the `aether.slices` entry point and the wheel
    version. Raises `InvalidWheel` (a BadRequest) naming the file and the problem; for a library
    wheel given explicit `coords`, `NotASliceWheel`; `WheelTooLarge` beyond `limits`.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidWheel(f"{path}: no such file")
    try:
        _, _, _, tags = parse_wheel_filename(path.name)
    except InvalidWheelFilename as e:
        raise InvalidWheel(f"{path}: not a wheel file name ({e})") from None
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InvalidWheel(f"{path}: not a wheel (not a zip archive: {e})") from None
    with zf:
        limits.check(zf, path)
        names = zf.namelist()
        for n in names:
            if unsafe_member(n):
                raise InvalidWheel(
                    f"{path}: unsafe path {n!r} in the wheel: a member must stay inside the directory "
                    "the wheel is installed into"
                )
        metas = sorted({n.split("/")[0] for n in names if re.match(r"^[^/]+\.dist-info/METADATA\Z", n)})
        if not metas:
            raise InvalidWheel(f"{path}: not a wheel (no *.dist-info/METADATA)")
        if len(metas) > 1:
            raise InvalidWheel(f"{path}: several .dist-info directories ({', '.join(metas)})")
        di = metas[0]
        dist = DistInfo({n: _read(zf, f"{di}/{n}", path) for n in _DIST_INFO_READ if f"{di}/{n}" in names})
        meta = dist.metadata
        # PackageMetadata has no .get, and [] on a missing field is deprecated (3.12)
        dist_name = meta["Name"] if "Name" in meta else None  # noqa: SIM401
        dist_version = meta["Version"] if "Version" in meta else None  # noqa: SIM401
        if not dist_name or not dist_version:
            raise InvalidWheel(f"{path}: METADATA lacks Name or Version")
        wheel_text = dist.read_text("WHEEL")
        wheel_meta = HeaderParser().parsestr(wheel_text) if wheel_text is not None else None
        pure = bool(wheel_meta and (wheel_meta.get("Root-Is-Purelib", "").strip().lower() == "true"))
        try:
            eps = parse_entry_points(dist.read_text("entry_points.txt") or "")
        except ValueError as e:
            raise InvalidWheel(f"{path}: {di}/entry_points.txt: {e}") from None
        requires_dist = tuple(dist.requires or ())
        requirements = tuple(evaluate_requirements(requires_dist, source=str(path)))
        top_level = _top_level(names, di, zf, path)

        slices = eps.get(SLICES_GROUP, {})
        if not slices:
            if coords is not None:
                raise NotASliceWheel(
                    f"{path}: no [{SLICES_GROUP}] entry point, so it is a library wheel and takes no "
                    "coordinates; a slice wheel declares its class, e.g. "
                    '"org.example:hello" = "hello_slice:Hello"'
                )
            return WheelInfo(
                path, dist_name, dist_version, frozenset(tags), pure, None, None, {}, requires_dist,
                requirements, top_level,
            )  # fmt: skip
        if len(slices) > 1:
            listed = ", ".join(f"{k} = {v}" for k, v in slices.items())
            raise InvalidWheel(
                f"{path}: several [{SLICES_GROUP}] entry points ({listed}); a wheel holds one slice"
            )
        ((ep_name, ep_value),) = slices.items()
        if not _OBJECT_REF.match(ep_value):
            raise InvalidWheel(
                f"{path}: [{SLICES_GROUP}] {ep_name} = {ep_value!r}: the value must be module:Class"
            )
        if coords is None:
            if ep_name.count(":") != 1:
                raise InvalidWheel(
                    f"{path}: [{SLICES_GROUP}] entry name {ep_name!r} must be GROUP:ARTIFACT, "
                    "e.g. org.example:hello"
                )
            try:
                version = aether_version(dist_version)
                art = Artifact.parse(f"{ep_name}:{version}")
            except BadRequest as e:
                raise InvalidWheel(f"{path}: bad coordinates: {e}") from None
        else:
            try:
                art = coords if isinstance(coords, Artifact) else Artifact.parse(coords)
            except BadRequest as e:
                raise InvalidWheel(f"bad coordinates: {e}") from None

        declared: dict[str, tuple[str, str]] = {}  # name -> (pattern text, where)
        module = ep_value.split(":")[0]
        mod_path = module.replace(".", "/")
        candidates = [f"{di}/{DESCRIPTOR_NAME}"]
        if f"{mod_path}/__init__.py" in names:
            candidates.append(f"{mod_path}/{DESCRIPTOR_NAME}")
        elif "/" in mod_path:
            candidates.append(f"{mod_path.rsplit('/', 1)[0]}/{DESCRIPTOR_NAME}")
        found = [c for c in candidates if c in names]
        if len(found) > 1:
            raise InvalidWheel(f"{path}: {' and '.join(found)} both exist; declare slice dependencies once")
        maps: tuple[str, ...] = ()
        for c in found:
            descriptor_deps, maps = _parse_descriptor(_read(zf, c, path), f"{path}!{c}")
            for k, v in descriptor_deps.items():
                declared[k] = (v, c)
        for k, v in eps.get(DEPENDENCIES_GROUP, {}).items():
            if k in declared and declared[k][0].strip() != v.strip():
                raise InvalidWheel(
                    f"{path}: dependency {k} declared as {declared[k][0]!r} in {declared[k][1]} and as "
                    f"{v!r} in [{DEPENDENCIES_GROUP}]"
                )
            declared[k] = (v, f"[{DEPENDENCIES_GROUP}]")
        deps: dict[str, VersionPattern] = {}
        for k, (v, where) in declared.items():
            try:
                if k.strip().count(":") != 1:
                    raise BadRequest(f"dependency name {k!r} must be GROUP:ARTIFACT, e.g. org.example:hello")
                dep_name = Artifact.parse(f"{k.strip()}:0.0.0").name
                pattern = VersionPattern.parse(v)
            except BadRequest as e:
                raise InvalidWheel(f"{path}: slice dependency {k} = {v!r} ({where}): {e}") from None
            if dep_name == art.name:
                raise InvalidWheel(f"{path}: {art.name} declares a dependency on itself ({where})")
            deps[dep_name] = pattern
        return WheelInfo(
            path, dist_name, dist_version, frozenset(tags), pure, art, ep_value, deps, requires_dist,
            requirements, top_level, maps,
        )  # fmt: skip
