"""Test helpers for slices: build slice and library wheels directly (no pip), and simple invokers.

A wheel is a zip with `{name}-{version}.dist-info/{METADATA,WHEEL,RECORD,...}`; writing one takes
milliseconds, so tests of the repository, the loader, the deployment managers and the invoker
can make the wheels they need in a temporary directory::

    wheel = build_slice_wheel(tmp_path, "org.example:echo:1.0.0", SOURCE, "Echo",
                              dependencies={"org.example:hello": "^0.1.0"}, requires=["tinylib>=1"])
    Repository(tmp_path / "repo").deploy(wheel)

`StoreInvoker` serves `SliceCaller.invoke` from `SliceRuntime`s in this process (single-node runs and
tests); `FakeInvoker` records calls and answers them from a handler. `LocalMaps` is an in-process
`MapBackend` (one dict per map, TTLs on an injectable clock) for unit tests of slices that use
`self.map(...)`.

May import: `aether.core`, `aether.slices.*` (no pytest: usable from any test suite).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import inspect
import re
import sys
import textwrap
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from packaging.version import InvalidVersion
from packaging.version import Version as PepVersion

from aether.core.artifact import Artifact, Version
from aether.core.maps import DEFAULT_MAX_VALUE_BYTES, MapValueTooLarge, UnknownMap, check_key
from aether.slices.errors import NoLocalInstance

if TYPE_CHECKING:
    from aether.slices.runtime import SliceRuntime

__all__ = [
    "FakeInvoker",
    "LocalMaps",
    "StoreInvoker",
    "build_library_wheel",
    "build_slice_wheel",
    "damage_wheel_member",
    "default_module_name",
    "isolated_imports",
    "wheel_version",
    "write_wheel",
]


def _dist_filename(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def write_wheel(
    out_dir: Path | str,
    dist_name: str,
    version: str,
    files: Mapping[str, str | bytes],
    *,
    requires: Sequence[str] = (),
    entry_points: Mapping[str, Mapping[str, str]] | None = None,
    dist_info_files: Mapping[str, str | bytes] | None = None,
    tag: str = "py3-none-any",
    pure: bool = True,
) -> Path:
    """Write `{dist}-{version}-{tag}.whl` into `out_dir` with the given files; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{_dist_filename(dist_name)}-{version}"
    di = f"{stem}.dist-info"
    meta = ["Metadata-Version: 2.1", f"Name: {dist_name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    contents: dict[str, bytes] = {k: (v.encode() if isinstance(v, str) else v) for k, v in files.items()}
    contents[f"{di}/METADATA"] = ("\n".join(meta) + "\n\n").encode()
    contents[f"{di}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: aether.slices.testing\n"
        f"Root-Is-Purelib: {'true' if pure else 'false'}\nTag: {tag}\n\n"
    ).encode()
    if entry_points:
        ep = "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n"
            for group, items in entry_points.items()
        )
        contents[f"{di}/entry_points.txt"] = ep.encode()
    tops = sorted(
        {n.split("/")[0].removesuffix(".py") for n in files if not n.split("/")[0].endswith(".data")}
    )
    if tops:
        contents[f"{di}/top_level.txt"] = ("\n".join(tops) + "\n").encode()
    for k, v in (dist_info_files or {}).items():
        contents[f"{di}/{k}"] = v.encode() if isinstance(v, str) else v
    record = [f"{n},{_record_hash(d)},{len(d)}" for n, d in contents.items()]
    record.append(f"{di}/RECORD,,")
    contents[f"{di}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = out / f"{stem}-{tag}.whl"
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, d in contents.items():
            zf.writestr(zipfile.ZipInfo(n, date_time=(2024, 1, 1, 0, 0, 0)), d)
    tmp.replace(path)
    return path


def wheel_version(version: Version) -> str:
    """The PEP 440 spelling of an Aether version for a wheel (`1.0.0-rc1` -> `1.0.0rc1`).

    Qualifiers PEP 440 cannot express are kept as a local version label (`1.0.0+foo`); such a
    wheel's coordinates must then be given explicitly when deploying it.
    """
    text = str(version)
    try:
        return str(PepVersion(text))
    except InvalidVersion:
        base = f"{version.major}.{version.minor}.{version.patch}"
        return f"{base}+{re.sub(r'[^A-Za-z0-9.]', '.', version.qualifier)}"


def default_module_name(coords: Artifact | str) -> str:
    """`org.example:place-order:1.0.0` -> `place_order_slice`."""
    a = coords if isinstance(coords, Artifact) else Artifact.parse(coords)
    return re.sub(r"\W", "_", a.artifact) + "_slice"


def _toml_deps(deps: Mapping[str, str]) -> str:
    lines = ["[dependencies]"] + [f'"{k}" = "{v}"' for k, v in deps.items()]
    return "\n".join(lines) + "\n"


def build_slice_wheel(
    tmp_dir: Path | str,
    coords: Artifact | str,
    module_source: str,
    class_name: str,
    dependencies: Mapping[str, str] | None = None,
    requires: Sequence[str] | None = None,
    *,
    module: str | None = None,
    dist_name: str | None = None,
    dependencies_in: Literal["package", "dist-info", "entry-points"] = "package",
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Build a slice wheel: package `module` (default `{artifact}_slice`) whose `__init__.py` is
    `module_source` and defines `class_name`; entry point `group:artifact = module:class_name`;
    slice `dependencies` (`{"group:artifact": "pattern"}`) in `aether-slice.toml` inside the package
    (or the dist-info, or an `aether.slice-dependencies` entry-point group); `requires` as
    Requires-Dist. The wheel's version is the coordinates' version (`wheel_version`).
    Returns the wheel's path."""
    a = coords if isinstance(coords, Artifact) else Artifact.parse(coords)
    mod = module or default_module_name(a)
    files: dict[str, str | bytes] = {f"{mod}/__init__.py": textwrap.dedent(module_source).strip("\n") + "\n"}
    files.update(extra_files or {})
    eps: dict[str, dict[str, str]] = {"aether.slices": {a.name: f"{mod}:{class_name}"}}
    di_files: dict[str, str | bytes] = {}
    if dependencies:
        if dependencies_in == "package":
            files[f"{mod}/aether-slice.toml"] = _toml_deps(dependencies)
        elif dependencies_in == "dist-info":
            di_files["aether-slice.toml"] = _toml_deps(dependencies)
        else:
            eps["aether.slice-dependencies"] = dict(dependencies)
    return write_wheel(
        tmp_dir,
        dist_name or a.artifact,
        wheel_version(a.version),
        files,
        requires=list(requires or ()),
        entry_points=eps,
        dist_info_files=di_files,
    )


def build_library_wheel(
    tmp_dir: Path | str,
    name: str,
    version: str,
    modules: Mapping[str, str] | None = None,
    requires: Sequence[str] = (),
) -> Path:
    """Build a pure library wheel. Default content: package `{name}` with `__version__ = version`.

    `modules` maps file paths inside the wheel (e.g. `tinylib/__init__.py`) to their source.
    """
    files = (
        dict(modules) if modules else {f"{_dist_filename(name)}/__init__.py": f'__version__ = "{version}"\n'}
    )
    return write_wheel(tmp_dir, name, version, files, requires=requires)


@contextlib.contextmanager
def isolated_imports() -> Iterator[None]:
    """Restore `sys.path` and forget the modules imported meanwhile from the paths added meanwhile
    (slice and library code loaded by tests). Modules imported from the interpreter's own paths
    (rich, aiohttp, aether itself...) stay: forgetting them would create second copies of their
    classes and break `isinstance` checks in code that kept the first."""
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    try:
        yield
    finally:
        added = [p for p in sys.path if p not in saved_path and p]
        sys.path[:] = saved_path
        roots = tuple(str(Path(p).resolve()) for p in added)
        for name in list(sys.modules):
            if name in saved_modules:
                continue
            module = sys.modules[name]
            where = getattr(module, "__file__", None) or ""
            search = list(getattr(module, "__path__", []) or [])
            files = [str(Path(f).resolve()) for f in [where, *search] if f]
            if not files or any(f.startswith(roots) for f in files):
                del sys.modules[name]
        importlib.invalidate_caches()


# --- invokers -----------------------------------------------------------------------------------------


class StoreInvoker:
    """An `SliceCaller` that calls local `SliceRuntime`s (the first one with an active instance)."""

    def __init__(self, *stores: SliceRuntime) -> None:
        self.stores: list[SliceRuntime] = list(stores)

    def add(self, store: SliceRuntime) -> None:
        self.stores.append(store)

    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        for store in self.stores:
            if store.local_instances(target):
                return await store.call(
                    target, method, payload, request_id=request_id, idempotency_key=idempotency_key
                )
        raise NoLocalInstance(f"no active instance of {target} in {len(self.stores)} local store(s)")


@dataclass
class FakeInvoker:
    """An `SliceCaller` that records each call and answers with `handler(target, method, payload)`."""

    handler: Callable[[str, str, bytes], Awaitable[bytes] | bytes]
    calls: list[tuple[str, str, bytes, str | None, float | None]] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)  # the idempotency key of each call

    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        self.calls.append((target, method, payload, request_id, timeout))
        self.keys.append(idempotency_key)
        result = self.handler(target, method, payload)
        if inspect.isawaitable(result):
            return await result
        return result


class LocalMaps:
    """An in-process `MapBackend`: the maps named in `names` exist (or every name, with
    ``create_on_use=True``); values are bytes in dicts; TTLs expire on `clock` (seconds)."""

    def __init__(
        self,
        names: Sequence[str] = (),
        *,
        create_on_use: bool = False,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data: dict[str, dict[str, tuple[bytes, float | None]]] = {n: {} for n in names}
        self.create_on_use = create_on_use
        self.max_value_bytes = max_value_bytes
        self.clock = clock

    def _map(self, name: str) -> dict[str, tuple[bytes, float | None]]:
        m = self.data.get(name)
        if m is None:
            if not self.create_on_use:
                raise UnknownMap(f"map {name!r} is not defined; defined maps: {', '.join(sorted(self.data))}")
            m = self.data[name] = {}
        return m

    def _live(self, name: str, key: str) -> bytes | None:
        m = self._map(name)
        check_key(name, key)
        item = m.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] <= self.clock():
            del m[key]
            return None
        return item[0]

    def _set(self, name: str, key: str, value: bytes | None, ttl: float | None) -> None:
        m = self._map(name)
        if value is None:
            m.pop(key, None)
            return
        if len(value) > self.max_value_bytes:
            raise MapValueTooLarge(
                f"map {name!r} key {key!r}: value of {len(value)} bytes exceeds {self.max_value_bytes} bytes"
            )
        m[key] = (value, None if ttl is None else self.clock() + ttl)

    def require_map(self, name: str) -> None:
        self._map(name)

    async def map_get(self, name: str, key: str) -> bytes | None:
        return self._live(name, key)

    async def map_put(self, name: str, key: str, value: bytes, *, ttl: float | None = None) -> None:
        check_key(name, key)
        self._set(name, key, value, ttl)

    async def map_remove(self, name: str, key: str) -> bool:
        present = self._live(name, key) is not None
        self._set(name, key, None, None)
        return present

    async def map_compare_and_set(
        self, name: str, key: str, expected: bytes | None, new: bytes | None, *, ttl: float | None = None
    ) -> bool:
        if self._live(name, key) != expected:
            return False
        self._set(name, key, new, ttl)
        return True

    async def map_keys(self, name: str, prefix: str = "") -> list[str]:
        keys = [k for k in list(self._map(name)) if k.startswith(prefix)]
        return sorted(k for k in keys if self._live(name, k) is not None)


def damage_wheel_member(wheel: Path, member: str, *, flags: int = 0, method: int | None = None) -> Path:
    """Set general-purpose `flags` bits (e.g. 0x1: encrypted) and/or the compression `method` of
    `member` of `wheel`, in its local header and its central-directory entry, in place: what a
    damaged or hand-made zip can carry (for tests of how such a wheel is refused)."""
    raw = bytearray(wheel.read_bytes())
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
    headers = [(info.header_offset, 6, 8)]  # local header: flags at +6, method at +8
    i = raw.find(b"PK\x01\x02")
    while i != -1:  # central directory entries: flags at +8, method at +10
        n = int.from_bytes(raw[i + 28 : i + 30], "little")
        if raw[i + 46 : i + 46 + n] == member.encode():
            headers.append((i, 8, 10))
        i = raw.find(b"PK\x01\x02", i + 1)
    for at, f, m in headers:
        raw[at + f] |= flags
        if method is not None:
            raw[at + m : at + m + 2] = method.to_bytes(2, "little")
    wheel.write_bytes(bytes(raw))
    return wheel
