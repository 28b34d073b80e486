"""The artifact repository's decisions, with no I/O (docs/repository.md).

- an upload is metered while it streams (`UploadMeter`: size limit, sha256 against the declared
  one), then checked against the wheel's own metadata (`manifest_for`: the file name's project and
  version must be the METADATA's) and against what the cluster holds (`decide`: a new version, the
  same bytes again, or a conflict);
- wheel bytes are `chunks` values of `chunk_size` bytes in the map `MAP_NAME`, keyed by the wheel's
  sha256, the upload's id and the chunk's index (`chunk_key`): each upload writes chunks of its own,
  so deleting one upload never removes the chunks another (of the same bytes) relies on, and the
  manifest (written last) is what makes a wheel visible;
- chunks no manifest refers to (an upload a crash or a timed-out write interrupted, a delete whose
  removals failed) are garbage: `orphan_uploads` finds them, `OrphanTracker` says which have been
  orphans for `orphan_age` seconds (the leader then removes them), and `upload_overdue` keeps an
  upload from writing its manifest after half that age (its chunks could be collected by then);
  so is the claim on a slice's coordinates such an upload took (`orphan_claims`: a claim whose
  version has no manifest), released the same way;
- a slice's coordinates are held by one wheel (`claim_check`: a claim taken with compare-and-set
  before the manifest is written), and a deleted version leaves a tombstone that keeps nodes from
  publishing their copies of it again at start-up (`bootstrap_action`);
- reading: the slice wheel of some coordinates, the versions of a slice, the library wheels a set
  of requirements needs (`library_closure`);
- the read protocols: Maven-style paths (`parse_maven_path`, `maven_metadata`) and the PEP 503 /
  PEP 691 simple index (`negotiate`, `simple_root`, `simple_project`).
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion
from packaging.version import Version as PepVersion

from aether.core.artifact import Artifact, Version, VersionPattern
from aether.core.errors import BadRequest
from aether.core.maps import MapSpec, PartitionTable
from aether.kv.keys import (
    ArtifactKey,
    ArtifactManifest,
    ArtifactTombstone,
    BlueprintValue,
    CoordinatesClaim,
    CoordinatesClaimKey,
    RolloutValue,
)
from aether.repository.errors import ArtifactConflict, HashMismatch, UploadTooLarge
from aether.slices.wheel import WheelInfo

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_ORPHAN_AGE",
    "JSON_V1",
    "MAP_NAME",
    "MavenPath",
    "OrphanTracker",
    "UploadMeter",
    "bootstrap_action",
    "chunk_count",
    "chunk_key",
    "chunk_upload",
    "claim_check",
    "decide",
    "deployed_by",
    "find_slice",
    "key_of",
    "library_closure",
    "manifest_for",
    "map_spec",
    "maps_serving",
    "maven_metadata",
    "negotiate",
    "orphan_claims",
    "orphan_uploads",
    "parse_maven_path",
    "simple_project",
    "simple_root",
    "slice_versions",
    "upload_overdue",
    "wheel_filename",
]

MAP_NAME: Final = "aether.repository"
"""The distributed map holding wheel chunks (defined by the first upload)."""
CHUNK_SIZE: Final = 512 * 1024
DEFAULT_MAX_UPLOAD: Final = 64 * 1024 * 1024
"""Largest wheel an upload may carry (bytes); the node's `ArtifactService(max_upload=...)` changes it."""
DEFAULT_ORPHAN_AGE: Final = 3600.0
"""Seconds chunks no manifest refers to stay before they are removed (`repository_orphan_age`)."""
JSON_V1: Final = "application/vnd.pypi.simple.v1+json"
HTML_V1: Final = "application/vnd.pypi.simple.v1+html"
_SHA256_HEX = frozenset("0123456789abcdef")


def map_spec(members: int) -> MapSpec:
    """The chunk map's settings: sqlite, min(3, members) copies, min(2, copies) acknowledgements."""
    replicas = max(1, min(3, members))
    return MapSpec(replicas, min(2, replicas), "sqlite", 2 * CHUNK_SIZE).validate(MAP_NAME)


def maps_serving(table: PartitionTable | None) -> bool:
    """Whether every partition of the maps has been taken over at least once (its active
    configuration recorded): defining the chunk map before that, while the cluster's first
    takeover runs, has been seen to stall it (docs/repository.md)."""
    return table is not None and len(table.active) == table.partitions and all(a > 0 for a in table.active)


def chunk_key(sha256: str, index: int, upload: str = "") -> str:
    """`{sha256}/{upload}/{index}`; `{sha256}/{index}` for a manifest written before uploads had
    ids (`upload` "")."""
    return f"{sha256}/{upload}/{index}" if upload else f"{sha256}/{index}"


def chunk_upload(key: str) -> tuple[str, str] | None:
    """(sha256, upload) of a chunk key (`chunk_key`'s inverse, without the index; upload "" for a
    key of a manifest written before uploads had ids); None for a key that is no chunk's."""
    parts = key.split("/")
    if len(parts) not in (2, 3) or not parts[-1].isdigit() or len(parts[0]) != 64:
        return None
    if not set(parts[0]) <= _SHA256_HEX or (len(parts) == 3 and not parts[1]):
        return None
    return parts[0], parts[1] if len(parts) == 3 else ""


Upload = tuple[str, str]
"""(sha256, upload id) of the chunks of one upload."""


def orphan_uploads(keys: Iterable[str], manifests: Iterable[ArtifactManifest]) -> dict[Upload, list[str]]:
    """The chunk keys of the map, grouped by upload, of the uploads no manifest refers to (keys
    that are no chunk's are left alone). An upload's chunks are referred to by the manifest with
    its sha256 and upload id; the chunks keyed by sha256 alone by any manifest of that sha256
    written before uploads had ids."""
    referred = {(m.sha256, m.upload) for m in manifests}
    out: dict[Upload, list[str]] = {}
    for key in keys:
        up = chunk_upload(key)
        if up is not None and up not in referred:
            out.setdefault(up, []).append(key)
    return out


ClaimRef = tuple[str, str, str, float]
"""(coordinates, project, version, claimed) of one claim on a slice's coordinates: a claim taken
again (another upload) is another one."""


def orphan_claims(
    claims: Iterable[tuple[str, object]], manifests: Iterable[ArtifactManifest]
) -> dict[ClaimRef, CoordinatesClaim]:
    """The claims on slice coordinates (`(key, value)` pairs of the store's `repository-coords/`)
    whose project and version have no manifest: taken by an upload that has not written its
    manifest (yet: `upload_overdue` bounds how long it may take) or never will (interrupted), or
    left by a delete whose release failed. A claim of a listed version is never one."""
    listed = {(m.project, m.version) for m in manifests}
    out: dict[ClaimRef, CoordinatesClaim] = {}
    for key, c in claims:
        if isinstance(c, CoordinatesClaim) and (c.project, c.version) not in listed:
            coords = str(key).removeprefix(CoordinatesClaimKey.prefix)
            out[(coords, c.project, c.version, c.claimed)] = c
    return out


K = TypeVar("K", Upload, ClaimRef)


class OrphanTracker(Generic[K]):
    """Which uploads (or claims) have had no manifest for at least `age` seconds (sans-IO: the
    caller gives the time, from a monotonic clock). An upload is an orphan from the first pass
    that saw it so (`observe`), and stops being one as soon as a pass sees its manifest or no
    chunk of it; only an orphan seen so for `age` seconds is due. Memory only: a new leader
    starts counting again (removal is delayed, never hastened)."""

    def __init__(self, age: float) -> None:
        if not age > 0:
            raise ValueError(f"the orphan age must be a positive number of seconds (got {age})")
        self.age = age
        self.first_seen: dict[K, float] = {}

    def observe(self, orphans: Iterable[K], now: float) -> list[K]:
        """Record this pass's orphans; the ones due for removal (sorted)."""
        self.first_seen = {o: self.first_seen.get(o, now) for o in orphans}
        return sorted(o for o, t in self.first_seen.items() if now - t >= self.age)

    def forget(self, upload: K) -> None:
        self.first_seen.pop(upload, None)

    def reset(self) -> None:
        self.first_seen.clear()


UPLOAD_WAIT: Final = 10.0
"""Seconds an upload waits for the cluster's map (defined, its chunks' partitions serving) beyond
`UPLOAD_BYTES_PER_SECOND`, counted from the request's start; then it answers 503 with
``Retry-After``. The CLI waits 15 s plus one second per MiB for each answer (`aether.client.
management.ManagementClient.upload`): the node answers first, and the CLI tries again (an upload
used to wait up to 30 s for the map, and the CLI gave up first with no answer)."""
UPLOAD_BYTES_PER_SECOND: Final = 1024 * 1024
UPLOAD_RETRY_AFTER: Final = 2
"""Seconds the 503 of an upload that ran out of `upload_wait` asks the client to wait."""


def upload_wait(size: int) -> float:
    """The seconds an upload of `size` bytes may take, from its request's start to its chunks
    stored (`UPLOAD_WAIT`)."""
    return UPLOAD_WAIT + size / UPLOAD_BYTES_PER_SECOND


def upload_overdue(elapsed: float, orphan_age: float) -> bool:
    """Whether an upload whose chunks began to be written `elapsed` seconds ago is too late to
    write its claim or manifest: after half the orphan age the collector may have counted its
    chunks as orphans long enough (it removes them after the whole age, counted from a moment
    after they were written; the other half covers a slow compare-and-set and clock rates)."""
    return elapsed > orphan_age / 2


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return max(1, -(-size // chunk_size))


def key_of(manifest: ArtifactManifest) -> ArtifactKey:
    return ArtifactKey(manifest.project, manifest.version)


def check_sha256(text: str) -> str:
    """A sha256 hex digest (64 lowercase hex digits) or BadRequest."""
    t = text.strip().lower()
    if len(t) != 64 or not set(t) <= _SHA256_HEX:
        raise BadRequest(f"invalid sha256 {text!r}: expected 64 hex digits")
    return t


class UploadMeter:
    """Counts and hashes an upload as it streams; refuses it as soon as it is too large.

    `declared` is the request's Content-Length (None when chunked): one over `limit` is refused before
    a byte is read; bytes beyond the declared length are refused as they come."""

    def __init__(
        self, limit: int, *, declared: int | None = None, expected_sha256: str | None = None
    ) -> None:
        self.limit = limit
        self.declared = declared
        self.expected = check_sha256(expected_sha256) if expected_sha256 is not None else None
        self.size = 0
        self._hash = hashlib.sha256()
        if declared is not None and declared > limit:
            raise UploadTooLarge(
                f"the upload of {declared} bytes exceeds the repository's {limit}-byte limit"
            )

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise UploadTooLarge(f"the upload exceeds the repository's {self.limit}-byte limit")
        self._hash.update(data)

    def finish(self) -> str:
        """The sha256 of what was fed; `HashMismatch` if it is not the declared one (or the body is
        shorter than its declared length), BadRequest if it was empty."""
        if self.size == 0:
            raise BadRequest("the upload is empty: send the wheel's bytes as the request body")
        if self.declared is not None and self.size != self.declared:
            raise BadRequest(f"the upload ended after {self.size} of {self.declared} declared bytes")
        digest = self._hash.hexdigest()
        if self.expected is not None and digest != self.expected:
            raise HashMismatch(
                f"sha256 mismatch: the client declared {self.expected}, the {self.size} bytes received "
                f"hash to {digest}; the upload was corrupted on the way (nothing was stored)"
            )
        return digest


def wheel_filename(filename: str) -> tuple[str, str]:
    """(project, version) of a wheel file name, BadRequest naming the problem."""
    if not filename or "/" in filename or "\\" in filename or filename.startswith(".") or "\x00" in filename:
        raise BadRequest(f"invalid wheel file name {filename!r}")
    try:
        name, version, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename as e:
        raise BadRequest(f"not a wheel: {filename!r} is not a wheel file name ({e})") from None
    return canonicalize_name(name), str(version)


def manifest_for(
    info: WheelInfo,
    filename: str,
    size: int,
    sha256: str,
    *,
    now: float,
    expected: Artifact | None = None,
    chunk_size: int = CHUNK_SIZE,
    upload: str = "",
) -> ArtifactManifest:
    """The manifest of an inspected wheel. Refuses (BadRequest) a file name whose project or
    version is not the METADATA's, and, with `expected` (a Maven path's coordinates), a wheel that
    is not that slice."""
    project, version = wheel_filename(filename)
    try:
        meta_version = str(PepVersion(info.dist_version))
    except InvalidVersion:
        raise BadRequest(
            f"{filename}: METADATA version {info.dist_version!r} is not a PEP 440 version"
        ) from None
    if canonicalize_name(info.dist_name) != project:
        raise BadRequest(
            f"{filename}: the file name says project {project!r}, the wheel's METADATA says "
            f"{info.dist_name!r}"
        )
    if meta_version != version:
        raise BadRequest(
            f"{filename}: the file name says version {version}, the wheel's METADATA says {meta_version}"
        )
    if expected is not None:
        if info.coords is None:
            raise BadRequest(f"{filename} is a library wheel, not the slice {expected}")
        if info.coords != expected:
            raise BadRequest(f"{filename} is the slice {info.coords}, not {expected} as the path says")
    return ArtifactManifest(
        project=project,
        version=version,
        filename=filename,
        size=size,
        sha256=sha256,
        chunks=chunk_count(size, chunk_size),
        chunk_size=chunk_size,
        coords=None if info.coords is None else str(info.coords),
        slice_class=info.slice_class,
        dependencies={k: str(v) for k, v in info.dependencies.items()},
        maps=list(info.maps),
        requires_dist=list(info.requires_dist),
        uploaded=now,
        upload=upload,
    )


Decision = Literal["new", "same"]


def decide(
    existing: ArtifactManifest | None, new: ArtifactManifest, others: Iterable[ArtifactManifest] = ()
) -> Decision:
    """`new` when nothing holds the version, `same` when it holds these very bytes (an idempotent
    upload); `ArtifactConflict` when it holds other bytes, or another project has the coordinates."""
    if existing is not None:
        if existing.sha256 == new.sha256:
            return "same"
        raise ArtifactConflict(
            f"{new.project} {new.version} is already in the repository with other content "
            f"({existing.filename}, sha256 {existing.sha256[:12]}…; this upload {new.filename}, "
            f"sha256 {new.sha256[:12]}…); a version is immutable: publish a new version, or delete "
            "this one first"
        )
    if new.coords is not None:
        for o in others:
            if o.coords == new.coords and (o.project, o.version) != (new.project, new.version):
                raise ArtifactConflict(
                    f"the slice {new.coords} is already in the repository as {o.filename}; "
                    f"{new.filename} declares the same coordinates"
                )
    return "new"


def claim_check(
    new: ArtifactManifest, claim: CoordinatesClaim | None, holder: ArtifactManifest | None
) -> Literal["free", "ours"]:
    """Whether `new` (a slice wheel) may hold its coordinates: `free` (no claim: take it), `ours`
    (claimed by this very project and version); `ArtifactConflict` when another project or
    version claimed them. `holder` is the claimant's manifest (read through consensus): None when
    its upload has not finished (or was interrupted, or it is being deleted)."""
    if claim is None:
        return "free"
    if (claim.project, claim.version) == (new.project, new.version):
        return "ours"
    if holder is not None:
        raise ArtifactConflict(
            f"the slice {new.coords} is already in the repository as {holder.filename}; "
            f"{new.filename} declares the same coordinates"
        )
    raise ArtifactConflict(
        f"the slice {new.coords} is claimed by {claim.project} {claim.version}, whose upload has not "
        f"finished; {new.filename} declares the same coordinates. If that upload was interrupted, "
        f"upload {claim.project} {claim.version} again, or delete it (aether artifact delete "
        f"{claim.project} {claim.version}) to free the coordinates"
    )


Bootstrap = Literal["skip", "publish", "drop", "withhold"]


def bootstrap_action(
    manifest: ArtifactManifest | None, tombstone: ArtifactTombstone | None, local_sha256: str = ""
) -> Bootstrap:
    """What a node does at start-up with a wheel of its local directory, given what the cluster
    holds for its version: `skip` (the cluster has the version), `publish` (the cluster does not
    have it and never deleted it: the bootstrap of a prepared directory), `drop` (a copy of a
    version the cluster deleted: remove the file), `withhold` (the version was deleted and this
    file holds other bytes than the deleted ones: neither published nor removed; an explicit
    upload publishes it). `local_sha256` (the file's) is needed only with a tombstone."""
    if manifest is not None:
        return "skip"
    if tombstone is None:
        return "publish"
    return "drop" if local_sha256 == tombstone.sha256 else "withhold"


_ROLLOUT_ACTIVE = frozenset({"progressing", "paused"})


def deployed_by(
    coords: str, blueprints: Iterable[tuple[str, object]], rollouts: Iterable[object] = ()
) -> list[str]:
    """What keeps the slice `coords` deployed: the blueprints naming it (`(key, value)` pairs of
    the store's `blueprints/`) and the active rollouts from or to it. A version in use is not
    deleted: a node that restarts, lost its directory or joins could not load it any more."""
    users: list[str] = []
    for key, bp in blueprints:
        if isinstance(bp, BlueprintValue) and any(s.artifact == coords for s in bp.slices):
            users.append(f"blueprint {key.removeprefix('blueprints/')}")
    for r in rollouts:
        if (
            isinstance(r, RolloutValue)
            and r.state in _ROLLOUT_ACTIVE
            and coords in (f"{r.artifact}:{r.old_version}", f"{r.artifact}:{r.new_version}")
        ):
            users.append(f"rollout {r.id} of {r.artifact}")
    return users


# --- reading ----------------------------------------------------------------------------------------


def find_slice(manifests: Iterable[ArtifactManifest], artifact: Artifact) -> ArtifactManifest | None:
    want = str(artifact)
    for m in manifests:
        if m.coords == want:
            return m
    return None


def slice_versions(manifests: Iterable[ArtifactManifest], name: str) -> list[Version]:
    out = set()
    for m in manifests:
        if m.coords is not None:
            a = Artifact.parse(m.coords)
            if a.name == name:
                out.add(a.version)
    return sorted(out)


def best_match(manifests: Iterable[ArtifactManifest], name: str, pattern: VersionPattern) -> Artifact | None:
    matching = [v for v in slice_versions(manifests, name) if pattern.matches(v)]
    return Artifact.parse(f"{name}:{max(matching)}") if matching else None


def _names(requires: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for text in requires:
        try:
            out.add(canonicalize_name(Requirement(text).name))
        except InvalidRequirement:
            continue
    return out


def library_closure(manifests: Iterable[ArtifactManifest], requires: Iterable[str]) -> list[ArtifactManifest]:
    """Every library wheel (all versions) whose project `requires` names, and theirs in turn."""
    libs: dict[str, list[ArtifactManifest]] = {}
    for m in manifests:
        if m.coords is None:
            libs.setdefault(m.project, []).append(m)
    wanted, seen = list(_names(requires)), set()
    out: list[ArtifactManifest] = []
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        for m in libs.get(name, []):
            out.append(m)
            wanted.extend(_names(m.requires_dist) - seen)
    return sorted(out, key=lambda m: (m.project, m.version))


# --- Maven-style paths ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MavenPath:
    """`{group as path}/{artifact}/maven-metadata.xml`, `{group as path}/{artifact}/{version}/` or
    `{group as path}/{artifact}/{version}/{file}`."""

    group: str
    artifact: str
    version: str | None = None
    filename: str | None = None

    @property
    def name(self) -> str:
        return f"{self.group}:{self.artifact}"

    @property
    def metadata(self) -> bool:
        return self.version is None

    def coords(self) -> Artifact:
        return Artifact.parse(f"{self.name}:{self.version}")


def parse_maven_path(path: str) -> MavenPath:
    parts = [p for p in path.strip("/").split("/")]
    if any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f"invalid repository path {path!r}")
    try:
        if parts[-1] == "maven-metadata.xml" and len(parts) >= 3:
            mp = MavenPath(".".join(parts[:-2]), parts[-2])
            Artifact.parse(f"{mp.name}:0.0.0")
            return mp
        if path.endswith("/") and len(parts) >= 3:
            mp = MavenPath(".".join(parts[:-2]), parts[-2], parts[-1])
            mp.coords()
            return mp
        if len(parts) >= 4:
            mp = MavenPath(".".join(parts[:-3]), parts[-3], parts[-2], parts[-1])
            mp.coords()
            return mp
    except BadRequest as e:
        raise BadRequest(f"invalid repository path {path!r}: {e}") from None
    raise BadRequest(
        f"invalid repository path {path!r}: expected GROUP/PATH/ARTIFACT/maven-metadata.xml, "
        "GROUP/PATH/ARTIFACT/VERSION/ or GROUP/PATH/ARTIFACT/VERSION/FILE"
    )


def maven_metadata(group: str, artifact: str, versions: list[Version]) -> str:
    """maven-metadata.xml listing `versions` (ascending)."""
    esc = html.escape
    items = "".join(f"      <version>{esc(str(v))}</version>\n" for v in versions)
    latest = esc(str(versions[-1])) if versions else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<metadata>\n'
        f"  <groupId>{esc(group)}</groupId>\n  <artifactId>{esc(artifact)}</artifactId>\n"
        f"  <versioning>\n    <latest>{latest}</latest>\n    <release>{latest}</release>\n"
        f"    <versions>\n{items}    </versions>\n  </versioning>\n</metadata>\n"
    )


# --- the simple index (PEP 503 HTML, PEP 691 JSON) -------------------------------------------------


def negotiate(accept: str | None, query_format: str | None = None) -> Literal["json", "html"]:
    """JSON (PEP 691) when asked for in `?format=` or preferred in Accept, else HTML (PEP 503)."""
    if query_format in (JSON_V1, "json"):
        return "json"
    if query_format in (HTML_V1, "html", "text/html"):
        return "html"
    best, best_q = "html", -1.0
    for part in (accept or "").split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        kind = "json" if media == JSON_V1 else "html" if media in (HTML_V1, "text/html", "*/*") else None
        if kind is not None and q > best_q:
            best, best_q = kind, q
    return "json" if best == "json" else "html"


def _content_type(fmt: str) -> str:
    return JSON_V1 if fmt == "json" else "text/html; charset=utf-8"


def simple_root(projects: Iterable[str], fmt: Literal["json", "html"]) -> tuple[bytes, str]:
    names = sorted(set(projects))
    if fmt == "json":
        doc = {"meta": {"api-version": "1.0"}, "projects": [{"name": n} for n in names]}
        return json.dumps(doc).encode(), _content_type(fmt)
    links = "".join(f'    <a href="{html.escape(n)}/">{html.escape(n)}</a>\n' for n in names)
    body = (
        '<!DOCTYPE html>\n<html>\n  <head><meta name="pypi:repository-version" content="1.0">'
        f"<title>Simple index</title></head>\n  <body>\n{links}  </body>\n</html>\n"
    )
    return body.encode(), _content_type(fmt)


def simple_project(
    project: str,
    manifests: Iterable[ArtifactManifest],
    url_of: Callable[[ArtifactManifest], str],
    fmt: Literal["json", "html"],
) -> tuple[bytes, str]:
    """The project page: one link per wheel, with its sha256 (the `#sha256=` fragment in HTML)."""
    files = sorted(manifests, key=lambda m: (PepVersion(m.version), m.filename))
    if fmt == "json":
        doc = {
            "meta": {"api-version": "1.0"},
            "name": project,
            "files": [
                {
                    "filename": m.filename,
                    "url": url_of(m),
                    "hashes": {"sha256": m.sha256},
                    **({"requires-python": m.requires_python} if m.requires_python else {}),
                }
                for m in files
            ],
        }
        return json.dumps(doc).encode(), _content_type(fmt)
    links = "".join(
        f'    <a href="{html.escape(url_of(m))}#sha256={m.sha256}"'
        + (f' data-requires-python="{html.escape(m.requires_python)}"' if m.requires_python else "")
        + f">{html.escape(m.filename)}</a>\n"
        for m in files
    )
    body = (
        '<!DOCTYPE html>\n<html>\n  <head><meta name="pypi:repository-version" content="1.0">'
        f"<title>Links for {html.escape(project)}</title></head>\n  <body>\n"
        f"    <h1>Links for {html.escape(project)}</h1>\n{links}  </body>\n</html>\n"
    )
    return body.encode(), _content_type(fmt)
