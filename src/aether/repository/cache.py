"""`ClusterRepository`: the node's `Repository`, backed by the cluster (docs/repository.md).

The loader and the deployment service keep using the `Repository` interface; this one answers
from the cluster's manifests first and the local directory second:

- `list`, `versions`, `resolve_pattern`, `dependencies`, `maps`, `requirements`: the union of the
  cluster's slices and the local directory's (manifests need no wheel file, so these never fetch
  and are safe on the event loop);
- `resolve` (called by the loader in a worker thread): a slice the cluster has is fetched into the
  local directory unless it is there with the right sha256 (memoised by size and mtime), together
  with the library wheels its `Requires-Dist` names; a slice only in the local directory is
  resolved there, as before (the bootstrap of a single machine, published to the cluster at start),
  unless the cluster deleted that version (its tombstone): a file a node keeps under a deleted
  version is neither listed nor loaded (`ArtifactNotFound` naming the tombstone);
- `withdrawn_libraries`: the library versions the cluster deleted, which the library store does
  not install from a copy the node keeps (an installed directory, a wheel in `_libs/`);
- `library_hashes`: the sha256 of each library version the cluster holds: the library store uses
  only a directory installed from those bytes (one installed from a deleted upload's other bytes
  of the same version is not used, and is removed once nothing uses it).
"""

from __future__ import annotations

import builtins
import time
from pathlib import Path

from packaging.requirements import Requirement

from aether.core.artifact import Artifact, Version, VersionPattern
from aether.core.errors import BadRequest
from aether.kv.keys import ArtifactManifest, ArtifactTombstone, ArtifactTombstoneKey
from aether.repository import core
from aether.repository.service import ArtifactService, cache_path
from aether.slices.errors import ArtifactNotFound
from aether.slices.repository import Repository, _parse_name
from aether.slices.wheel import WheelLimits, evaluate_requirements, sha256_file

__all__ = ["ClusterRepository"]


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class ClusterRepository(Repository):
    """A `Repository` whose source of truth is the cluster; its directory is a cache."""

    def __init__(
        self, root: Path | str | None, service: ArtifactService, *, wheel_limits: WheelLimits | None = None
    ) -> None:
        super().__init__(root, wheel_limits=wheel_limits)
        self.service = service
        self._hashes: dict[Path, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256)

    def __repr__(self) -> str:
        return f"ClusterRepository({str(self.root)!r})"

    # --- the cluster's view -----------------------------------------------------------------------

    def _cluster(self) -> builtins.list[ArtifactManifest]:
        s = self.service
        if s.loop is None or s.on_loop_thread():
            return s.manifests()
        return s.call(s.manifests_async(), timeout=30.0)

    def _deleted_coords(self) -> set[str]:
        s = self.service
        if s.loop is None or s.on_loop_thread():
            return s.deleted_coords()
        return s.call(s.deleted_coords_async(), timeout=30.0)

    def _local(self, artifacts: builtins.list[Artifact]) -> builtins.list[Artifact]:
        """The local directory's `artifacts` but those of versions the cluster deleted."""
        deleted = self._deleted_coords() if artifacts else set()
        return [a for a in artifacts if str(a) not in deleted]

    def _tombstone(self, path: Path) -> ArtifactTombstone | None:
        """The tombstone of the version of the local wheel `path`, if the cluster deleted it (read
        through consensus from a worker thread; the replica on the loop)."""
        try:
            project, version = core.wheel_filename(path.name)
        except BadRequest:
            return None
        s = self.service
        if s.loop is None or s.on_loop_thread():
            return s.tombstone(project, version)
        return s.call(s.deleted(project, version), timeout=30.0)

    def _manifest(self, artifact: Artifact) -> ArtifactManifest | None:
        return core.find_slice(self._cluster(), artifact)

    def _cached(self, path: Path, sha256: str) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        memo = self._hashes.get(path)
        if memo is not None and memo[:2] == (st.st_size, st.st_mtime_ns):
            return memo[2] == sha256
        digest = sha256_file(path)
        self._hashes[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest == sha256

    def _ensure(self, manifest: ArtifactManifest) -> Path:
        path = cache_path(self, manifest)
        if self._cached(path, manifest.sha256):
            return path
        if self.service.on_loop_thread() or self.service.loop is None:
            raise ArtifactNotFound(
                f"{manifest.filename} is in the cluster's repository but not yet in {self.root}"
            )
        got = self.service.call(self.service.fetch(manifest, path))
        self._hashes.pop(got, None)
        return got

    # --- Repository -------------------------------------------------------------------------------

    def list(self) -> builtins.list[Artifact]:
        found = set(self._local(super().list()))
        found.update(Artifact.parse(m.coords) for m in self._cluster() if m.coords is not None)
        return sorted(found)

    def versions(self, name: str) -> builtins.list[Version]:
        n = _parse_name(name)
        local = super().versions(n)
        deleted = self._deleted_coords() if local else set()
        local = [v for v in local if str(Artifact.parse(f"{n}:{v}")) not in deleted]
        return sorted(set(local) | set(core.slice_versions(self._cluster(), n)))

    def resolve_pattern(self, name: str, pattern: VersionPattern | str) -> Artifact | None:
        n = _parse_name(name)
        p = pattern if isinstance(pattern, VersionPattern) else VersionPattern.parse(pattern)
        matching = [v for v in self.versions(n) if p.matches(v)]
        return Artifact.parse(f"{n}:{max(matching)}") if matching else None

    def resolve(self, artifact: Artifact | str) -> Path:
        """The slice's wheel in the local directory, fetched from the cluster (with the library
        wheels it requires) when the cluster has it and the directory does not."""
        a = artifact if isinstance(artifact, Artifact) else Artifact.parse(artifact)
        cluster = self._cluster()
        m = core.find_slice(cluster, a)
        if m is None:
            local = super().resolve(a)  # ArtifactNotFound when it is not there either
            tomb = self._tombstone(local)
            if tomb is not None:
                raise ArtifactNotFound(
                    f"{a} was deleted from the cluster's repository (its tombstone "
                    f"{ArtifactTombstoneKey(tomb.project, tomb.version)}: {tomb.filename}, sha256 "
                    f"{tomb.sha256[:12]}…, deleted {_utc(tomb.deleted)}); the file {local} this node "
                    "keeps under that version is not loaded: upload it "
                    f"(aether artifact deploy {local}) to publish the version again"
                )
            # a read through consensus brought the replica up to date: the version may be there now
            cluster = self._cluster()
            m = core.find_slice(cluster, a)
            if m is None:
                return local
        path = self._ensure(m)
        for lib in core.library_closure(cluster, m.requires_dist):
            self._ensure(lib)
        return path

    def dependencies(self, artifact: Artifact | str) -> dict[str, VersionPattern]:
        a = artifact if isinstance(artifact, Artifact) else Artifact.parse(artifact)
        m = self._manifest(a)
        if m is None:
            return super().dependencies(a)
        return {k: VersionPattern.parse(v) for k, v in m.dependencies.items()}

    def maps(self, artifact: Artifact | str) -> builtins.list[str]:
        a = artifact if isinstance(artifact, Artifact) else Artifact.parse(artifact)
        m = self._manifest(a)
        return list(m.maps) if m is not None else super().maps(a)

    def requirements(self, artifact: Artifact | str) -> builtins.list[Requirement]:
        a = artifact if isinstance(artifact, Artifact) else Artifact.parse(artifact)
        m = self._manifest(a)
        if m is None:
            return super().requirements(a)
        return list(evaluate_requirements(m.requires_dist, source=m.filename))

    def withdrawn_libraries(self) -> dict[tuple[str, str], str]:
        """The library versions the cluster deleted (a tombstone, no manifest; read through
        consensus from a worker thread, the replica on the loop): the library store installs none
        of them, neither from the directory it installed one into nor from a wheel kept in `_libs/`."""
        s = self.service
        if s.loop is None or s.on_loop_thread():
            tombs = s.deleted_libraries()
        else:
            tombs = s.call(s.deleted_libraries_async(), timeout=30.0)
        return {
            key: f"{t.project} {t.version} was deleted from the cluster's repository (its tombstone "
            f"{ArtifactTombstoneKey(t.project, t.version)}: {t.filename}, sha256 {t.sha256[:12]}…, "
            f"deleted {_utc(t.deleted)})"
            for key, t in tombs.items()
        }

    def library_hashes(self) -> dict[tuple[str, str], str]:
        """The sha256 of every library wheel the cluster holds (its manifests, this node's replica:
        read after `withdrawn_libraries`, which brings it up to date through consensus): a library
        directory a node installed from other bytes of such a version is not used (e.g. a version
        deleted and uploaded again with other bytes)."""
        return {(m.project, m.version): m.sha256 for m in self._cluster() if m.coords is None}

    def cached(self) -> builtins.list[Path]:
        """The wheels of the cluster's repository that are in the local directory now."""
        return [p for m in self._cluster() if (p := cache_path(self, m)).is_file()]
