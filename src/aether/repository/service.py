"""`ArtifactService`: the asyncio adapter of the cluster's artifact repository (docs/repository.md).

An upload streams into a private temporary file under the node's data directory (metered: size
limit and sha256, `core.UploadMeter`), is inspected as a wheel (metadata, RECORD hashes, unpack
limits) in a worker thread, then:

1. `decide` against the manifest this node's replica holds, read again through consensus when
   the replica has one: the same bytes again answer at once, other bytes are a 409;
2. its chunks go to the map `aether.repository` (defined on first use, `core.map_spec`), keyed by
   sha256, the upload's own id and index: no other upload writes or deletes them;
3. a slice wheel claims its coordinates with compare-and-set at `repository-coords/{coords}`
   (`core.claim_check`: a claim held by another project or version is a 409);
4. its manifest is written with compare-and-set (absent -> manifest) at `repository/{project}/{version}`.

Only step 4 makes the wheel visible, so a failed or concurrent upload never shows a half-stored
wheel; an upload that fails after step 2 with a known outcome removes its chunks. The chunks a
crash or a write of unknown outcome leaves are garbage the leader collects (`collect_orphans`)
once no manifest referred to them for `orphan_age` seconds, and so is the claim on coordinates
such an upload took (`collect_claims`); an upload that would take more than
half that long to write its manifest gives up instead (`core.upload_overdue`). A delete writes
a tombstone (`repository-deleted/...`) before it removes the manifest, then removes that upload's
chunks: nodes drop their copies of a deleted version, do not publish them at start-up and do not
load a file kept under it (`tombstone`, `deleted`) nor install a library version kept under it
(`deleted_libraries`). Reading fetches the chunks and checks size and sha256
before a file is renamed into place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aether.core.artifact import Artifact
from aether.core.errors import BadRequest
from aether.core.files import make_private_dirs
from aether.core.maps import MapDefinitionConflict, MapSpec, MapUnavailable, PartitionTable, UnknownMap
from aether.kv.keys import (
    ArtifactKey,
    ArtifactManifest,
    ArtifactTombstone,
    ArtifactTombstoneKey,
    BlueprintKey,
    CoordinatesClaim,
    CoordinatesClaimKey,
    MapDefKey,
    RolloutKey,
)
from aether.repository import core
from aether.repository.errors import ArtifactConflict, ArtifactMissing, RepositoryUnavailable
from aether.slices.errors import InvalidWheel
from aether.slices.repository import Repository
from aether.slices.wheel import (
    ZIP_READ_ERRORS,
    WheelInfo,
    WheelLimits,
    WheelRecord,
    inspect_wheel,
    sha256_file,
)

__all__ = ["ArtifactService", "ChunkMap", "ManifestStore"]

_T = TypeVar("_T")
_PARALLEL_CHUNKS = 4


class ManifestStore(Protocol):
    """The node's `KVStore`, as far as the repository needs it."""

    def get_local(self, key: Any) -> Any: ...

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]: ...

    async def get(self, key: Any, timeout: float = 5.0) -> Any: ...

    async def put(self, key: Any, value: Any, timeout: float = 5.0) -> int: ...

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool: ...

    def watch(self, prefix: str, callback: Callable[[Any], None]) -> Callable[[], None]: ...


class ChunkMap(Protocol):
    """The node's `MapService`, as far as the repository needs it."""

    async def map_get(self, name: str, key: str) -> bytes | None: ...

    async def map_put(self, name: str, key: str, value: bytes, *, ttl: float | None = None) -> None: ...

    async def map_remove(self, name: str, key: str) -> bool: ...

    async def map_keys(self, name: str, prefix: str = "") -> list[str]: ...

    async def define(self, name: str, spec: MapSpec) -> bool: ...


_CORRUPT: tuple[type[BaseException], ...] = (*ZIP_READ_ERRORS, OSError)


def _inspect(path: Path, limits: WheelLimits) -> WheelInfo:
    """Inspect a wheel and check every member against its RECORD (a corrupt zip fails here)."""
    info = inspect_wheel(path, limits=limits)
    try:
        with zipfile.ZipFile(path) as zf:
            WheelRecord.read(zf, path).verify_all(zf, limits.budget(path))
    except _CORRUPT as e:
        raise InvalidWheel(f"{path.name}: corrupt wheel ({e})") from None
    return info


def _no_space(e: BaseException, where: Path, what: str) -> BaseException:
    """A full disk (ENOSPC, EDQUOT) as `RepositoryUnavailable` (503) naming the directory; any
    other error as it is."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RepositoryUnavailable(
            f"no space left on the node's disk for {what} (in {where}: {e.strerror}); nothing of it "
            "was kept: free some space, or use another node"
        )
    return e


def cache_path(cache: Repository, manifest: ArtifactManifest) -> Path:
    """Where the local directory keeps this wheel: the slice layout, or the wheelhouse `_libs/`."""
    if manifest.coords is not None:
        return cache.artifact_dir(Artifact.parse(manifest.coords)) / manifest.filename
    return cache.libs_dir / manifest.filename


def place(src: Path, dest: Path, *, move: bool = False) -> Path:
    """Put `src` at `dest` atomically (temporary file in `dest`'s directory + rename); for a slice
    wheel, other wheels of that version directory go (one wheel per version, as `Repository`)."""
    make_private_dirs(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".whl", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if move:
        src.unlink(missing_ok=True)
    return dest


def _loop_time_at(deadline: float) -> float:
    """The running loop's time at `deadline` (`time.monotonic`), for `asyncio.timeout_at`."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


class ArtifactService:
    """Uploads to, reads from and deletes in the cluster's artifact repository (one per node).

    `members` is the cluster's size (the chunk map keeps min(3, members) copies); `cache` the local
    directory fetched wheels are kept in; `work_dir` a private directory for uploads in progress.
    """

    def __init__(
        self,
        store: ManifestStore,
        maps: ChunkMap,
        *,
        members: int,
        cache: Repository,
        work_dir: Path,
        max_upload: int = core.DEFAULT_MAX_UPLOAD,
        map_budget: float = 30.0,
        partition_table: Callable[[], PartitionTable | None] | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
        orphan_age: float = core.DEFAULT_ORPHAN_AGE,
        is_leader: Callable[[], bool] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        has_quorum: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.maps = maps
        self.members = members
        self.cache = cache
        self.work_dir = Path(work_dir)
        self.max_upload = max_upload
        self.map_budget = map_budget
        self.partition_table = partition_table
        self.log = logger or logging.getLogger("aether.repository")
        self.clock = clock
        self.monotonic = monotonic
        self.orphan_age = orphan_age
        self.is_leader = is_leader
        self.has_quorum = has_quorum
        self._orphans: core.OrphanTracker[core.Upload] = core.OrphanTracker(orphan_age)
        self._orphan_claims: core.OrphanTracker[core.ClaimRef] = core.OrphanTracker(orphan_age)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._map_ready = False
        self._fetches: dict[str, asyncio.Future[Path]] = {}  # sha256 -> the fetch in progress
        self._tasks: set[asyncio.Task[Any]] = set()
        self._calls: set[concurrent.futures.Future[Any]] = set()  # worker threads waiting on the loop
        self._stopped = False
        self._unwatch: Callable[[], None] | None = None  # the watch of removed manifests
        self.removed_leftovers = self._remove_leftovers()

    LEFTOVER_AGE = 600.0  # s: a temporary this old belongs to no fetch or copy still running

    def _remove_leftovers(self) -> int:
        """Remove the ``.tmp-*.whl`` files that fetches and copies into the cache (`place`,
        `_fetch`, `Repository.deploy`) left when their process was killed between writing and
        renaming them: each removes its own when it fails, and a wheel may weigh megabytes. Only
        those older than `LEFTOVER_AGE`: the cache may be shared with other nodes on this machine,
        whose fetches running now keep theirs. (Uploads' ``upload-*`` directories are in this
        node's own `work_dir`: `bind` removes them all.) Returns how many."""
        cutoff = time.time() - self.LEFTOVER_AGE
        removed = 0
        for top, _dirs, files in os.walk(self.cache.root):
            for name in files:
                if name.startswith(".tmp-") and name.endswith(".whl"):
                    f = Path(top) / name
                    with contextlib.suppress(OSError):
                        if f.stat().st_mtime < cutoff:
                            f.unlink()
                            removed += 1
        if removed:
            self.log.info("removed %d wheels of unfinished fetches from %s", removed, self.cache.root)
        return removed

    # --- lifecycle ---------------------------------------------------------------------------------

    def bind(self) -> None:
        """Remember the running loop (worker threads reach the service through it)."""
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        make_private_dirs(self.work_dir)
        for stale in self.work_dir.glob("upload-*"):  # uploads a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)

    def start_bootstrap(self, *, delay: float = 0.0, retry: float = 1.0) -> None:
        """Publish the local directory's wheels the cluster lacks, in the background, after `delay`
        seconds, retrying while the cluster has no quorum (a single machine's bootstrap: bundled ->
        self-hosted). The node staggers the delay by its rank, so nodes sharing one directory do
        not all publish the same wheels at once while the cluster is starting: the later ones
        find the manifests there and skip them."""
        self.bind()
        if self._unwatch is None:
            self._unwatch = self.store.watch(ArtifactKey.prefix, self._on_manifest_event)

        async def run() -> None:
            await asyncio.sleep(delay)
            while True:
                try:
                    n = await self.publish_local()
                    if n:
                        self.log.info(
                            "published %d wheel(s) of %s to the cluster's repository", n, self.cache.root
                        )
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # no quorum yet, map not served yet...
                    self.log.debug("publishing the local repository failed (%s); retrying", e)
                    await asyncio.sleep(retry)

        task = asyncio.get_running_loop().create_task(run(), name="repository-bootstrap")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self._stopped = True
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for f in list(self._calls):
            f.cancel()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    def on_loop_thread(self) -> bool:
        return self._loop_thread is not None and threading.get_ident() == self._loop_thread

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 120.0) -> _T:
        """Run `coro` on the service's loop from a worker thread and wait for its result
        (`RepositoryUnavailable` once the service stops: a loader thread never waits for a loop
        that is gone)."""
        if self.loop is None or self.on_loop_thread() or self._stopped:
            coro.close()
            raise RepositoryUnavailable("the cluster's repository is not reachable (is the node stopping?)")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._calls.add(fut)
        try:
            return fut.result(timeout)
        except concurrent.futures.CancelledError:
            raise RepositoryUnavailable("the node stopped while reading the cluster's repository") from None
        finally:
            self._calls.discard(fut)

    # --- manifests -----------------------------------------------------------------------------------

    def manifests(self) -> list[ArtifactManifest]:
        """Every wheel of the cluster's repository (this node's replica; loop thread only)."""
        return [v for _, v in self.store.list_local(ArtifactKey.prefix) if isinstance(v, ArtifactManifest)]

    async def manifests_async(self) -> list[ArtifactManifest]:
        return self.manifests()

    def manifest(self, project: str, version: str) -> ArtifactManifest | None:
        v = self.store.get_local(ArtifactKey(project, version))
        return v if isinstance(v, ArtifactManifest) else None

    def project(self, project: str) -> list[ArtifactManifest]:
        return [m for m in self.manifests() if m.project == project]

    # --- upload ---------------------------------------------------------------------------------------

    async def upload(
        self,
        body: AsyncIterator[bytes],
        filename: str,
        *,
        declared: int | None = None,
        sha256: str | None = None,
        expected: Artifact | None = None,
    ) -> tuple[ArtifactManifest, bool]:
        """Store the wheel streamed by `body`; returns its manifest and whether it is new (False: the
        same bytes were there already). Raises BadRequest (bad name, not a wheel, mismatch),
        `HashMismatch`, `UploadTooLarge`, `ArtifactConflict`; nothing is visible unless it succeeds."""
        core.wheel_filename(filename)
        began = time.monotonic()  # the client's timeout runs from about here (`core.upload_wait`)
        meter = core.UploadMeter(self.max_upload, declared=declared, expected_sha256=sha256)
        if self.has_quorum is not None and not self.has_quorum():
            # nothing could be stored: its chunks' partitions and the manifest need a majority.
            # Answered before a byte is read (else the chunk writes retried for their budget and
            # the client, which gave up first, saw no answer at all)
            raise RepositoryUnavailable(
                f"no quorum: this node cannot reach a majority of the cluster, so {filename} cannot be "
                "stored (nothing was stored); upload it again once the cluster has a quorum "
                "(`aether status`)"
            )
        try:
            make_private_dirs(self.work_dir)
            tmpdir = Path(tempfile.mkdtemp(prefix="upload-", dir=self.work_dir))
        except OSError as e:
            raise _no_space(e, self.work_dir, f"the upload of {filename}") from None
        path = tmpdir / filename
        try:
            try:
                with open(path, "wb") as out:
                    async for data in body:
                        meter.feed(data)
                        out.write(data)
            except OSError as e:
                raise _no_space(e, self.work_dir, f"the upload of {filename}") from None
            digest = meter.finish()
            try:
                info = await asyncio.to_thread(_inspect, path, self.cache.wheel_limits)
            except InvalidWheel as e:
                # the checks name the file they read: name it as the client did, not by the
                # node's private temporary path (`/data/repository/upload-x1y2/NAME: ...`)
                e.args = (str(e).replace(str(path), filename), *e.args[1:])
                raise
            manifest = core.manifest_for(
                info, filename, meter.size, digest, now=self.clock(), expected=expected,
                upload=secrets.token_hex(8),
            )
            stands, created = await self._store(manifest, path, began + core.upload_wait(meter.size))
            if not created:
                return stands, False
            with contextlib.suppress(OSError):
                await asyncio.to_thread(place, path, cache_path(self.cache, manifest), move=True)
            self.log.info(
                "stored %s %s (%d bytes, sha256 %s)",
                manifest.project,
                manifest.version,
                manifest.size,
                manifest.sha256[:12],
            )
            return manifest, True
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    async def _store(
        self, manifest: ArtifactManifest, path: Path, deadline: float
    ) -> tuple[ArtifactManifest, bool]:
        """Store `manifest`'s upload; (the manifest that stands, whether it is this one, new).
        `RepositoryUnavailable` with ``Retry-After`` when the map has not taken its chunks by
        `deadline` (`time.monotonic`): nothing is stored."""
        key = core.key_of(manifest)
        # this node's replica: an early answer for a version it does not know yet costs nothing
        # (the compare-and-sets below decide). One it knows (the same bytes: "already there"; other
        # bytes or coordinates: 409) is read again through consensus first: the replica may not
        # have applied a delete committed through another node yet
        existing = await self._confirmed(self.store.get_local(key), key)
        others = [
            o
            for o in self.manifests()
            if o.coords is not None and o.coords == manifest.coords and core.key_of(o) != key
        ]
        others = [o for o in others if await self._confirmed(o, core.key_of(o)) == o]
        if core.decide(existing, manifest, others) == "same":
            assert existing is not None
            return existing, False
        try:
            await self._ensure_map(deadline)
            started = self.monotonic()
            await self._put_chunks(manifest, path, deadline)
        except (MapUnavailable, TimeoutError) as e:
            # its chunks written so far are garbage the collector removes (no manifest names them)
            why = str(e) or "a chunk write was still waiting for an answer"
            raise RepositoryUnavailable(
                f"the cluster's map did not store the chunks of {manifest.filename} within "
                f"{core.upload_wait(manifest.size):.0f} s of the upload's start ({why}); nothing was "
                "stored. A partition may be being taken over (a node was lost): upload it again in a "
                "few seconds",
                retry_after=core.UPLOAD_RETRY_AFTER,
            ) from None
        # from here on the chunks are this upload's alone: a known failure removes them
        try:
            self._in_time(manifest, started)
            await self._claim(manifest)
            for _ in range(3):
                self._in_time(manifest, started)
                if await self.store.compare_and_set(key, None, manifest):
                    break
                # another upload of this version won the race (or a delete removed it since)
                got = await self.store.get(key)
                if isinstance(got, ArtifactManifest):
                    core.decide(got, manifest)  # the same bytes, or ArtifactConflict
                    await self._drop_chunks(manifest)  # the winner's chunks serve it
                    return got, False
                # ...and a delete removed it since: nothing is stored yet, try again
            else:
                raise ArtifactConflict(
                    f"{manifest.project} {manifest.version} was uploaded and deleted by others while "
                    "this upload ran; try again"
                )
        except (ArtifactConflict, RepositoryUnavailable):
            await self._drop_chunks(manifest)
            raise
        try:
            # a delete of this version released the claim between it and the manifest: take it again
            await self._claim(manifest)
        except ArtifactConflict:
            with contextlib.suppress(Exception):
                if await self.store.compare_and_set(key, manifest, None):
                    await self._drop_chunks(manifest)
            raise
        return manifest, True

    async def _confirmed(self, local: Any, key: ArtifactKey) -> ArtifactManifest | None:
        """None when `local` (the replica's value of `key`) is no manifest; else the manifest of
        `key` read through consensus (linearizable: what the cluster holds now), or None."""
        if not isinstance(local, ArtifactManifest):
            return None
        got = await self.store.get(key)
        return got if isinstance(got, ArtifactManifest) else None

    def _in_time(self, manifest: ArtifactManifest, started: float) -> None:
        """`RepositoryUnavailable` once the upload is too late to claim and write its manifest:
        its chunks, written `started` (monotonic) on, may count as orphans by now."""
        elapsed = self.monotonic() - started
        if core.upload_overdue(elapsed, self.orphan_age):
            raise RepositoryUnavailable(
                f"the upload of {manifest.filename} took {elapsed:.0f} s to store its chunks, longer than "
                f"half the repository's orphan age ({self.orphan_age:g} s): its chunks could be collected "
                "as garbage, so it is not stored; try again (or raise repository_orphan_age)"
            )

    async def _put_chunks(self, manifest: ArtifactManifest, path: Path, deadline: float) -> None:
        sem = asyncio.Semaphore(_PARALLEL_CHUNKS)

        async def put(i: int, data: bytes) -> None:
            async with sem:
                key = core.chunk_key(manifest.sha256, i, manifest.upload)
                await self._retrying(functools.partial(self.maps.map_put, core.MAP_NAME, key, data), deadline)

        tasks = []
        with open(path, "rb") as f:
            for i in range(manifest.chunks):
                tasks.append(asyncio.ensure_future(put(i, f.read(manifest.chunk_size))))
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _drop_chunks(self, manifest: ArtifactManifest) -> None:
        """Remove the chunks of `manifest`'s upload (no other manifest refers to them)."""
        for i in range(manifest.chunks):
            with contextlib.suppress(Exception):  # garbage at worst; never visible without a manifest
                await self.maps.map_remove(core.MAP_NAME, core.chunk_key(manifest.sha256, i, manifest.upload))

    async def _claim(self, manifest: ArtifactManifest) -> None:
        """Hold the slice's coordinates for `manifest`'s project and version (nothing for a library
        wheel): a compare-and-set of `repository-coords/{coords}`, so that of two uploads of one
        coordinates by different projects racing on two nodes only one passes; ArtifactConflict
        when another project or version holds them."""
        if manifest.coords is None:
            return
        ckey = CoordinatesClaimKey(manifest.coords)
        for _ in range(5):
            got = await self.store.get(ckey)  # through consensus: the replica is as recent now
            claim = got if isinstance(got, CoordinatesClaim) else None
            holder = None
            if claim is not None and (claim.project, claim.version) != (manifest.project, manifest.version):
                got = await self.store.get(ArtifactKey(claim.project, claim.version))
                holder = got if isinstance(got, ArtifactManifest) else None
            if core.claim_check(manifest, claim, holder) == "ours":
                return
            # free; a wheel stored before coordinates were claimed holds them without a claim
            mine = CoordinatesClaim(manifest.project, manifest.version, self.clock())
            for other in self.manifests():
                if other.coords == manifest.coords and core.key_of(other) != core.key_of(manifest):
                    with contextlib.suppress(Exception):
                        await self.store.compare_and_set(
                            ckey, None, CoordinatesClaim(other.project, other.version, other.uploaded)
                        )
                    core.decide(None, manifest, [other])  # ArtifactConflict
            if await self.store.compare_and_set(ckey, None, mine):
                return
        raise ArtifactConflict(
            f"the slice {manifest.coords} is claimed and released by other uploads while this one "
            "ran; try again"
        )

    async def _retrying(self, op: Callable[[], Awaitable[_T]], deadline: float | None = None) -> _T:
        """`op()` again while the map answers `MapUnavailable`, for up to `map_budget` seconds (a
        map defined a moment ago, a partition being taken over; the map's own deadline is 5 s).
        Safe: chunk writes put the same bytes under the same content-addressed key. With
        `deadline` (`time.monotonic`, an upload's): until then, and an `op` still running then is
        given up (TimeoutError): the client waits for the answer no longer."""
        bounded = deadline is not None
        if deadline is None:
            deadline = time.monotonic() + self.map_budget
        pause = 0.2
        while True:
            try:
                if bounded:
                    async with asyncio.timeout_at(_loop_time_at(deadline)):
                        return await op()
                return await op()
            except MapUnavailable as e:
                if time.monotonic() + pause >= deadline:
                    raise
                self.log.info("the repository's map is unavailable (%s); retrying", e)
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)

    async def _ensure_map(self, deadline: float | None = None) -> None:
        """Define the chunk map once the cluster's first partition takeover is over (defining it
        during the takeover was seen to stall it); after `map_budget` seconds it is defined
        anyway, but by an upload's `deadline` (`time.monotonic`) MapUnavailable: the upload
        answers 503, to be tried again."""
        if self._map_ready:
            return
        if self.partition_table is not None:  # let the cluster's first takeover finish first
            until = time.monotonic() + self.map_budget if deadline is None else deadline
            while not core.maps_serving(self.partition_table()) and time.monotonic() < until:
                await asyncio.sleep(0.05)
            if deadline is not None and not core.maps_serving(self.partition_table()):
                raise MapUnavailable("the cluster's first takeover of its map partitions is still running")
        try:
            await self.maps.define(core.MAP_NAME, core.map_spec(self.members))
        except MapDefinitionConflict:
            pass  # defined with other settings (by hand, or a smaller cluster): it is usable as it is
        self._map_ready = True

    # --- reading ------------------------------------------------------------------------------------

    async def chunks(self, manifest: ArtifactManifest) -> AsyncIterator[bytes]:
        """The wheel's bytes, chunk by chunk (each chunk's size checked; the caller checks the hash)."""
        for i in range(manifest.chunks):
            key = core.chunk_key(manifest.sha256, i, manifest.upload)
            data = await self._retrying(functools.partial(self.maps.map_get, core.MAP_NAME, key))
            want = min(manifest.chunk_size, manifest.size - i * manifest.chunk_size)
            if data is None or len(data) != want:
                raise RepositoryUnavailable(
                    f"{manifest.filename}: chunk {i + 1} of {manifest.chunks} is "
                    f"{'missing' if data is None else f'{len(data)} bytes, not {want}'} in the cluster's map"
                )
            yield data

    async def fetch(self, manifest: ArtifactManifest, dest: Path | None = None) -> Path:
        """The wheel in the local directory (fetched from the cluster unless already there with the
        right sha256); one fetch per wheel at a time."""
        dest = dest if dest is not None else cache_path(self.cache, manifest)
        running = self._fetches.get(manifest.sha256)
        if running is not None:
            return await asyncio.shield(running)
        fut: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._fetches[manifest.sha256] = fut
        try:
            result = await self._fetch(manifest, dest)
            fut.set_result(result)
            return result
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters get it through shield
            raise
        finally:
            del self._fetches[manifest.sha256]

    async def _fetch(self, manifest: ArtifactManifest, dest: Path) -> Path:
        if (
            dest.is_file()
            and dest.stat().st_size == manifest.size
            and await asyncio.to_thread(sha256_file, dest) == manifest.sha256
        ):
            return dest
        what = f"fetching {manifest.filename}"
        try:
            make_private_dirs(dest.parent)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".whl", dir=dest.parent)
        except OSError as e:
            raise _no_space(e, dest.parent, what) from None
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for data in self.chunks(manifest):
                    h.update(data)
                    size += len(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if size != manifest.size or h.hexdigest() != manifest.sha256:
                raise RepositoryUnavailable(
                    f"{manifest.filename}: the chunks read from the cluster hash to {h.hexdigest()[:12]}…, "
                    f"not {manifest.sha256[:12]}…"
                )
            os.replace(tmp, dest)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            full = _no_space(e, dest.parent, what)
            if full is not e:
                raise full from None
            raise
        if manifest.coords is not None:  # one wheel per version directory
            for other in dest.parent.glob("*.whl"):
                # (not the .tmp-* of a fetch running in another node sharing the directory)
                if other != dest and not other.name.startswith("."):
                    other.unlink(missing_ok=True)
        self.log.info("fetched %s from the cluster's repository", manifest.filename)
        return dest

    # --- delete -------------------------------------------------------------------------------------

    async def delete(self, project: str, version: str) -> ArtifactManifest:
        """Remove a version: a tombstone first (nodes drop their copies of the version and do not
        publish them again), then the manifest (with compare-and-set: it is gone for everyone at
        once), then the chunks of its upload, its claim on the slice's coordinates and the cached
        copy. A slice version a blueprint or an active rollout uses is refused (`ArtifactConflict`).
        A version with no manifest is `ArtifactMissing`; the claim an interrupted upload of it left
        on coordinates is released on the way (the way to free them)."""
        key = ArtifactKey(project, version)
        current = self.store.get_local(key)  # a stale one fails the compare-and-set: try again
        if not isinstance(current, ArtifactManifest):
            freed = await self._release_claims(project, version)
            raise ArtifactMissing(
                f"{project} {version} is not in the cluster's repository"
                + (
                    f" (the claim its interrupted upload left on {', '.join(freed)} was released)"
                    if freed
                    else ""
                )
            )
        if current.coords is not None:
            users = core.deployed_by(
                current.coords,
                self.store.list_local(BlueprintKey.prefix),
                (v for _, v in self.store.list_local(RolloutKey.prefix)),
            )
            if users:
                raise ArtifactConflict(
                    f"{current.coords} is deployed ({', '.join(users)}): undeploy it, or roll it out "
                    "to another version, before deleting its wheel (a node that restarts or joins "
                    "could not load it any more)"
                )
        # before the manifest goes: no node can see the version missing without its tombstone
        await self.store.put(
            ArtifactTombstoneKey(project, version),
            ArtifactTombstone(
                project, version, current.filename, current.sha256, self.clock(), current.coords
            ),
        )
        if not await self.store.compare_and_set(key, current, None):
            raise ArtifactConflict(f"{project} {version} changed while it was being deleted; try again")
        # an upload's chunks are its own; those of a manifest written before uploads had ids are
        # keyed by sha256 alone (shared with another such manifest of the same bytes, if any)
        if current.upload or not any(m.sha256 == current.sha256 and not m.upload for m in self.manifests()):
            await self._drop_chunks(current)
        await self._release_claims(project, version)
        with contextlib.suppress(OSError):
            cached = cache_path(self.cache, current)
            if cached.is_file() and await asyncio.to_thread(sha256_file, cached) == current.sha256:
                cached.unlink()
        return current

    async def _release_claims(self, project: str, version: str) -> list[str]:
        """Release the coordinates `project` `version` claims (compare-and-set); the freed ones."""
        freed = []
        for k, claim in self.store.list_local(CoordinatesClaimKey.prefix):
            if isinstance(claim, CoordinatesClaim) and (claim.project, claim.version) == (project, version):
                with contextlib.suppress(Exception):
                    if await self.store.compare_and_set(k, claim, None):
                        freed.append(k.removeprefix(CoordinatesClaimKey.prefix))
        return freed

    # --- garbage: chunks no manifest refers to ----------------------------------------------------------

    def start_collector(self, interval: float | None = None) -> None:
        """Every `interval` seconds (default: a twelfth of the orphan age, between 0.5 s and 5
        minutes), on the leader only, remove the chunks of uploads that have had no manifest for
        the orphan age (`collect_orphans`)."""
        if self.is_leader is None:
            return
        every = interval if interval is not None else max(0.5, min(300.0, self.orphan_age / 12))
        self.bind()

        async def run() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.collect_orphans()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # no quorum, a partition without its primary...
                    self.log.debug("collecting the repository's orphan chunks failed (%s)", e)

        task = asyncio.get_running_loop().create_task(run(), name="repository-collector")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self) -> None:
        """Bring this node's replica up to date (a read through consensus: the store answers once
        the replica applied it), so that its manifests are the cluster's as of now."""
        await self.store.get(MapDefKey(core.MAP_NAME))

    async def collect_orphans(self, limit: int = 4096) -> int:
        """One pass of the collector (the leader's; another node only forgets what it counted):
        the chunks of uploads no manifest refers to that were orphans already `orphan_age` seconds
        ago, at most `limit` of them, are removed, and so are the claims on slice coordinates
        whose version had no manifest then (`collect_claims`); returns how many keys went. An
        upload in progress is not one of them (`upload_overdue`: it gives up before half that
        age), a listed version's chunks are referred to by its manifest, read after the map's keys
        and again, through consensus, before anything is removed."""
        if self.is_leader is not None and not self.is_leader():
            self._orphans.reset()  # a later leadership counts again from its own first pass
            self._orphan_claims.reset()
            return 0
        return await self._collect_chunks(limit) + await self.collect_claims()

    async def collect_claims(self) -> int:
        """Release the claims on slice coordinates whose project and version have had no manifest
        for `orphan_age` seconds, as seen by this leader's passes (`core.orphan_claims`: an upload
        interrupted between its claim and its manifest; one in progress writes its manifest within
        half that age or gives up, as for its chunks). Each is read again through consensus, with
        its version's manifest, and released with compare-and-set (a claim taken again since is
        another one); a manifest found after the release gets its claim back. Returns how many."""
        await self._refresh()
        orphans = core.orphan_claims(self.store.list_local(CoordinatesClaimKey.prefix), self.manifests())
        due = self._orphan_claims.observe(orphans, self.monotonic())
        released = 0
        for ref in due:
            self._orphan_claims.forget(ref)
            coords, project, version, _ = ref
            claim, key = orphans[ref], CoordinatesClaimKey(coords)
            if isinstance(await self.store.get(ArtifactKey(project, version)), ArtifactManifest):
                continue  # written since the pass that saw the claim
            if not await self.store.compare_and_set(key, claim, None):
                continue  # released or taken again since
            if isinstance(await self.store.get(ArtifactKey(project, version)), ArtifactManifest):
                # its upload wrote the manifest in between after all: the claim is its own
                with contextlib.suppress(Exception):
                    await self.store.compare_and_set(key, None, claim)
                continue
            released += 1
            self.log.info(
                "released the claim of %s %s on %s: its version had no manifest for %g s (an upload a "
                "crash or a failed write interrupted)",
                project,
                version,
                coords,
                self.orphan_age,
            )
        return released

    async def _collect_chunks(self, limit: int) -> int:
        try:
            keys = await self.maps.map_keys(core.MAP_NAME)
        except UnknownMap:
            return 0  # no upload ever wrote a chunk
        await self._refresh()  # after the keys: a manifest written before them is seen
        orphans = core.orphan_uploads(keys, self.manifests())
        due = self._orphans.observe(orphans, self.monotonic())
        if not due:
            return 0
        await self._refresh()
        still = core.orphan_uploads(keys, self.manifests())
        removed = 0
        for upload in due:
            if upload not in still:
                self._orphans.forget(upload)
                continue
            if removed >= limit:
                break
            chunks = still[upload][: limit - removed]
            for key in chunks:
                await self.maps.map_remove(core.MAP_NAME, key)
            removed += len(chunks)
            if len(chunks) == len(still[upload]):
                self._orphans.forget(upload)
            sha, upload_id = upload
            self.log.info(
                "removed %d chunk(s) of upload %s of sha256 %s from the repository's map: no manifest "
                "referred to them for %g s (an upload a crash or a failed write interrupted)",
                len(chunks),
                upload_id or "(without id)",
                sha[:12],
                self.orphan_age,
            )
        return removed

    # --- deleted versions' copies -------------------------------------------------------------------

    def _copy_of(self, tomb: ArtifactTombstone) -> Path:
        if tomb.coords is not None:
            return self.cache.artifact_dir(Artifact.parse(tomb.coords)) / tomb.filename
        return self.cache.libs_dir / tomb.filename

    async def drop_deleted_copy(self, project: str, version: str) -> bool:
        """Remove this node's copy of `project` `version` if the cluster deleted it (its tombstone,
        no manifest) and the copy holds the deleted bytes; whether a file was removed."""
        tomb = self.store.get_local(ArtifactTombstoneKey(project, version))
        if not isinstance(tomb, ArtifactTombstone) or self.manifest(project, version) is not None:
            return False
        path = self._copy_of(tomb)
        try:
            if not path.is_file() or await asyncio.to_thread(sha256_file, path) != tomb.sha256:
                return False
            path.unlink()
        except OSError as e:
            self.log.warning("could not drop the copy of deleted %s %s (%s): %s", project, version, path, e)
            return False
        self.log.info("dropped %s: %s %s was deleted from the cluster's repository", path, project, version)
        return True

    def tombstone(self, project: str, version: str) -> ArtifactTombstone | None:
        """The tombstone of `project` `version` in this node's replica, if the version was deleted
        and not uploaded again (no manifest); None otherwise."""
        tomb = self.store.get_local(ArtifactTombstoneKey(project, version))
        if not isinstance(tomb, ArtifactTombstone) or self.manifest(project, version) is not None:
            return None
        return tomb

    def deleted_coords(self) -> set[str]:
        """The coordinates of the slice versions the cluster deleted and holds no more (this node's
        replica; loop thread only)."""
        held = {m.coords for m in self.manifests() if m.coords is not None}
        return {
            t.coords
            for _, t in self.store.list_local(ArtifactTombstoneKey.prefix)
            if isinstance(t, ArtifactTombstone) and t.coords is not None and t.coords not in held
        }

    async def deleted_coords_async(self) -> set[str]:
        return self.deleted_coords()

    async def deleted(self, project: str, version: str, timeout: float = 5.0) -> ArtifactTombstone | None:
        """`tombstone`, read through consensus (a replica recovered from disk may not know yet of
        a delete); this node's replica when the cluster does not answer (no quorum)."""
        try:
            manifest = await self.store.get(ArtifactKey(project, version), timeout)
            tomb = await self.store.get(ArtifactTombstoneKey(project, version), timeout)
        except Exception as e:  # no quorum, a timeout: the replica's knowledge stands
            self.log.debug("reading the tombstone of %s %s through consensus failed: %s", project, version, e)
            return self.tombstone(project, version)
        if isinstance(manifest, ArtifactManifest) or not isinstance(tomb, ArtifactTombstone):
            return None
        return tomb

    def deleted_libraries(self) -> dict[tuple[str, str], ArtifactTombstone]:
        """The library versions the cluster deleted and holds no more, `(project, version)` -> the
        tombstone (this node's replica; loop thread only)."""
        held = {(m.project, m.version) for m in self.manifests()}
        return {
            (t.project, t.version): t
            for _, t in self.store.list_local(ArtifactTombstoneKey.prefix)
            if isinstance(t, ArtifactTombstone) and t.coords is None and (t.project, t.version) not in held
        }

    async def deleted_libraries_async(self, timeout: float = 5.0) -> dict[tuple[str, str], ArtifactTombstone]:
        """`deleted_libraries` after a read through consensus (a replica recovered from disk may not
        know yet of a delete); this node's replica as it is when the cluster does not answer."""
        try:
            await asyncio.wait_for(self._refresh(), timeout)
        except Exception as e:  # no quorum, a timeout: the replica's knowledge stands
            self.log.debug("reading the deleted library versions through consensus failed: %s", e)
        return self.deleted_libraries()

    def _on_manifest_event(self, event: Any) -> None:
        """The store's watch of `repository/`: a removed manifest (or a replica reset: any of them)
        makes this node drop its copy of the deleted version, in the background."""
        if event.kind == "remove":
            parts = str(event.key).split("/")
            if len(parts) != 3:
                return
            targets = [(parts[1], parts[2])]
        elif event.kind == "reset":
            targets = [
                (t.project, t.version)
                for _, t in self.store.list_local(ArtifactTombstoneKey.prefix)
                if isinstance(t, ArtifactTombstone)
            ]
        else:
            return
        if not targets or self._stopped:
            return

        async def run() -> None:
            for project, version in targets:
                await self.drop_deleted_copy(project, version)

        task = asyncio.get_running_loop().create_task(run(), name="repository-drop-deleted")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- bootstrap ----------------------------------------------------------------------------------

    async def publish_local(self) -> int:
        """Upload the local directory's wheels that the cluster lacks and never deleted; returns how
        many were new. A version the cluster has with other bytes stays as the cluster has it (a
        warning); a copy of a version the cluster deleted is removed (other bytes than the deleted
        ones: kept, not published, a warning)."""
        local: list[Path] = []
        for a in await asyncio.to_thread(self.cache.list):
            with contextlib.suppress(Exception):
                local.append(await asyncio.to_thread(Repository.resolve, self.cache, a))
        local += await asyncio.to_thread(self.cache.library_wheels)
        new = 0
        for path in local:
            try:
                project, version = core.wheel_filename(path.name)
            except BadRequest:
                continue
            have = self.manifest(project, version)
            if have is None:
                # through consensus: a replica recovered from disk may not know yet of what
                # happened while this node was down (an upload, a delete)
                got = await self.store.get(ArtifactKey(project, version))
                have = got if isinstance(got, ArtifactManifest) else None
            if have is not None:
                if have.filename == path.name and await asyncio.to_thread(sha256_file, path) != have.sha256:
                    self.log.warning(
                        "%s in %s differs from the cluster's %s %s: the cluster's copy is used",
                        path.name,
                        self.cache.root,
                        project,
                        version,
                    )
                continue
            got = await self.store.get(ArtifactTombstoneKey(project, version))
            tomb = got if isinstance(got, ArtifactTombstone) else None
            sha = await asyncio.to_thread(sha256_file, path) if tomb is not None else ""
            action = core.bootstrap_action(have, tomb, sha)
            if action == "drop":
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self.log.info(
                    "dropped %s: %s %s was deleted from the cluster's repository", path, project, version
                )
                continue
            if action == "withhold":
                self.log.warning(
                    "not publishing %s: %s %s was deleted from the cluster's repository (this file "
                    "holds other bytes than the deleted ones); upload it to publish it again",
                    path,
                    project,
                    version,
                )
                continue
            try:
                _, created = await self.upload(_read_file(path), path.name, declared=path.stat().st_size)
            except (BadRequest, ArtifactConflict) as e:
                self.log.warning("not publishing %s to the cluster's repository: %s", path, e)
                continue
            new += created
        return new


async def _read_file(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(size):
            yield data
