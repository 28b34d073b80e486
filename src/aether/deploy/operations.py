"""`DeploymentService`: the operator-facing deployment operations (docs/deployment.md: deploy, scale,
undeploy, blueprint apply/list/get/delete, slices status) over the replicated store.

Owns: how requests become desired state (`blueprints/…` keys; nothing here commands nodes
directly — the leader's `ClusterDeploymentManager` converges on what is written) and how
progress is reported. Usable on any node: writes go through consensus, reads use the local
replica (which includes every write this node has made). May import `aether.core`,
`aether.kv` and `aether.deploy.*`.

Decisions:
- A direct deployment (`deploy`) is a one-slice blueprint with id `direct:{group}:{artifact}`
  and source "api"; deploying another version of the artifact replaces the version in that
  blueprint. It never changes other blueprints that list the artifact.
- `scale` sets the count in every blueprint that lists the artifact (the desired count is the
  maximum over blueprints, so changing only one of them could have no effect). Coordinates
  with a version match that version, `group:artifact` matches every version.
- An autoscaled artifact (one with a `[slices.NAME.scaling]` rule) is scaled through its
  `scale/{artifact}` key instead (docs/controller.md, "Operator bounds"): `scale(a, N)` pins it
  (``instances = min = max = N``, ``source = operator``); `scale(a, min=A, max=B)` sets the
  operator's bounds, which win over the blueprint's, keeping the count in force (clamped); and
  `scale(a, auto=True)` clears them (back to the blueprint's bounds). The controller moves the
  count within the bounds in force. The admission check counts the `scale/` values too.
- `undeploy` removes the artifact from every blueprint that lists it (deleting blueprints left
  empty) together with dependency entries nobody needs any more; it refuses when a remaining
  slice depends on it, naming that slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import msgspec

from aether.core.artifact import Artifact
from aether.core.errors import AetherError, BadRequest
from aether.core.maps import MapSpec
from aether.deploy import admission
from aether.deploy.admission import InstanceLimits
from aether.deploy.blueprint import (
    DIRECT_PREFIX,
    Blueprint,
    BlueprintSliceSpec,
    expand,
    parse_blueprint,
)
from aether.deploy.config import config_conflict
from aether.deploy.errors import (
    BlueprintError,
    BlueprintNotFound,
    ConvergenceTimeout,
    DeploymentFailed,
    RolloutConflict,
    RolloutNotFound,
)
from aether.deploy.lifecycle import SliceState
from aether.deploy.ports import DependenciesOf, MapsOf, Resolve
from aether.deploy.reconcile import Autoscaled, autoscaled, desired_state, stale_scales
from aether.deploy.rollout import ACTIVE_STATES, begin, version_of
from aether.deploy.rollout import abort as rollout_abort
from aether.deploy.rollout import pause as rollout_pause
from aether.deploy.rollout import resume as rollout_resume
from aether.kv.contract import ClusterStore, WatchEvent
from aether.kv.keys import (
    BlueprintKey,
    BlueprintSlice,
    BlueprintValue,
    MapDefKey,
    RolloutKey,
    RolloutPolicy,
    RolloutValue,
    ScaleKey,
    ScaleValue,
    SliceKey,
    SliceStateValue,
    parse_key,
)


class SliceInstanceStatus(msgspec.Struct, frozen=True):
    node: str
    state: str
    reason: str | None
    instance_ids: list[int]


class SliceStatus(msgspec.Struct, frozen=True):
    """One artifact: desired count (from blueprints), ACTIVE instance count, per-node states."""

    artifact: str
    desired: int
    active: int
    instances: list[SliceInstanceStatus]


class ScaleBounds(msgspec.Struct, frozen=True):
    """An autoscaled artifact after a scale command: the count and bounds in force."""

    artifact: str
    instances: int
    min: int
    max: int
    bounds_source: str
    """``operator`` while an operator's bounds are set, else ``blueprint``."""
    count_source: str
    """Who set the count: ``operator``, ``controller`` or ``blueprint``."""


class ScaleOutcome(msgspec.Struct, frozen=True):
    """What a scale command changed."""

    blueprints: list[str]
    """Ids of the blueprints changed (artifacts without a scaling rule)."""
    autoscaled: list[ScaleBounds]
    """The autoscaled artifacts it matched, as they are now."""


class BlueprintEntry(msgspec.Struct, frozen=True):
    id: str
    blueprint: BlueprintValue


ProgressCallback = Callable[[list[SliceStatus]], None]


def direct_id(artifact: Artifact) -> str:
    return f"{DIRECT_PREFIX}{artifact.group}:{artifact.artifact}"


def _matcher(coords: str) -> Callable[[str], bool]:
    text = coords.strip()
    parts = text.split(":")
    if len(parts) == 3:
        exact = str(Artifact.parse(text))
        return lambda a: a == exact
    if len(parts) == 2 and all(parts):
        return lambda a: ":".join(a.split(":")[:2]) == text
    raise BlueprintError(f"invalid artifact {coords!r}: expected GROUP:ARTIFACT:VERSION or GROUP:ARTIFACT")


Written = tuple[BlueprintKey, "BlueprintValue | None", "BlueprintValue | None"]
"""One blueprint write of an operation: its key, the value before and the value written (None: absent)."""


class DeploymentService:
    def __init__(
        self,
        kv: ClusterStore,
        *,
        dependencies_of: DependenciesOf,
        resolve: Resolve,
        maps_of: MapsOf | None = None,
        repository: str | None = None,
        timeout: float = 5.0,
        limits: InstanceLimits | None = None,
        members: int = 1,
    ) -> None:
        self.kv = kv
        self.dependencies_of = dependencies_of
        self.resolve = resolve
        self.maps_of = maps_of
        self.repository = repository  # named in "not found" errors
        self.timeout = timeout
        self.limits = limits
        self.members = members

    def _admit(
        self, changes: dict[str, BlueprintValue | None], what: str,
        scales_after: dict[str, ScaleValue] | None = None,
    ) -> None:
        """Admission control (`aether.deploy.admission`): raise `AdmissionRejected` if replacing
        the blueprints in `changes` (None: deleted) and the `scale/` values by `scales_after` (None:
        unchanged) would exceed the instance limits. Autoscaled artifacts count with the count in
        force (the `scale/` values within their bounds)."""
        if self.limits is None:
            return
        current = {e.id: e.blueprint for e in self.list_blueprints()}
        after = {**current, **changes}
        scales = self.scales()

        def counts(bps: dict[str, BlueprintValue | None], sc: dict[str, ScaleValue]) -> dict[str, int]:
            values = (v for v in bps.values() if v is not None)
            return {a: d.instances for a, d in desired_state(values, sc).items()}

        admission.check(counts(dict(current), scales), counts(after, scales_after or scales), self.members,
                        self.limits, what)  # fmt: skip

    def scales(self) -> dict[str, ScaleValue]:
        """The `scale/` values of this replica, by artifact."""
        out = {}
        for k, v in self.kv.list_local("scale/"):
            if isinstance(v, ScaleValue):
                out[k.removeprefix("scale/")] = v
        return out

    def _expand(self, bp: Blueprint, source: str) -> BlueprintValue:
        value = expand(bp, self.dependencies_of, self.resolve, source=source, repository=self.repository)
        self._check_maps(bp, value)
        return value

    def _check_maps(self, bp: Blueprint, value: BlueprintValue) -> None:
        """Every map a slice of `value` declares must be defined (or defined by `bp` itself):
        otherwise the slices would start and every call using the map would fail."""
        if self.maps_of is None:
            return
        defined = {name for name, _ in bp.maps}
        for s in value.slices:
            try:
                used = list(self.maps_of(Artifact.parse(s.artifact)))
            except BlueprintError:
                raise
            except Exception as e:
                raise BlueprintError(f"{bp.filename}: cannot read the maps {s.artifact} uses: {e}") from None
            missing = [n for n in used if n not in defined and self.kv.get_local(MapDefKey(n)) is None]
            if len(missing) == 1:
                (name,) = missing
                raise BlueprintError(
                    f"{bp.filename}: {s.artifact} uses the distributed map {name!r}, which is not "
                    f"defined; define it first with `aether map create {name}`, or add a "
                    f"[maps.{name}] section to the blueprint that deploys {s.artifact}"
                )
            if missing:  # all of them at once: one apply per missing map to learn the next
                names = ", ".join(repr(n) for n in missing)
                creates = "; ".join(f"`aether map create {n}`" for n in missing)
                sections = ", ".join(f"[maps.{n}]" for n in missing)
                raise BlueprintError(
                    f"{bp.filename}: {s.artifact} uses the distributed maps {names}, which are not "
                    f"defined; define them first ({creates}), or add {sections} sections to the "
                    f"blueprint that deploys {s.artifact}"
                )

    # --- blueprints -----------------------------------------------------------------------------

    async def apply_blueprint(
        self, toml_text: str, filename: str = "<blueprint>", *, source: str = "operator"
    ) -> BlueprintValue:
        """Parse, expand and store a blueprint (replacing one with the same id)."""
        bp = parse_blueprint(toml_text, filename)
        value = self._expand(bp, source)
        conflict = config_conflict(((e.id, e.blueprint) for e in self.list_blueprints()), bp.id, value)
        if conflict is not None:
            raise BlueprintError(f"{filename}: {conflict}")
        self._admit({bp.id: value}, f"blueprint {bp.id!r}")
        # every refusal before the first write: a map defined for a blueprint that is then refused
        # (a rollout of another version runs: 409; another map conflicts) would stay behind
        previous = self.kv.get_local(BlueprintKey(bp.id))
        previous = previous if isinstance(previous, BlueprintValue) else None
        self._planned_rollouts(previous, value, bp.id, time.time())
        for name, spec in bp.maps:
            if (current := self.kv.get_local(MapDefKey(name))) is not None:
                self._check_map(bp, name, spec, current)
        for name, spec in bp.maps:  # before the slices, which may use them in start()
            await self._define_map(bp, name, spec)
        await self._put_with_rollouts(bp.id, value)
        return value

    # --- rollouts -------------------------------------------------------------------------------

    def rollouts(self) -> list[RolloutValue]:
        """Every recorded rollout (active and finished; one per artifact, the latest), sorted."""
        return sorted(
            (v for _, v in self.kv.list_local("rollouts/") if isinstance(v, RolloutValue)),
            key=lambda r: r.artifact,
        )

    def rollout(self, artifact: str) -> RolloutValue:
        """The latest rollout of `artifact` (``group:artifact``, a version is ignored)."""
        name = _name(artifact)
        v = self.kv.get_local(RolloutKey(name))
        if not isinstance(v, RolloutValue):
            raise RolloutNotFound(f"no rollout of {name} is recorded (`aether rollout status` lists them)")
        return v

    def _running_versions(self, name: str) -> dict[str, int]:
        """``{version: ACTIVE instances}`` of `name` in this replica."""
        out: dict[str, int] = {}
        for key, v in self.kv.list_local("slices/"):
            if isinstance(v, SliceStateValue) and v.state == SliceState.ACTIVE:
                k = parse_key(key)
                if isinstance(k, SliceKey) and k.artifact.rpartition(":")[0] == name:
                    version = k.artifact.rpartition(":")[2]
                    out[version] = out.get(version, 0) + len(v.instances)
        return out

    def _planned_rollouts(
        self, previous: BlueprintValue | None, value: BlueprintValue, blueprint_id: str, now: float,
        policy: RolloutPolicy | None = None,
    ) -> list[tuple[RolloutValue | None, RolloutValue]]:
        """The rollouts replacing `previous` by `value` starts: one per artifact whose version
        changed and whose old version has ACTIVE instances; [(record it replaces, new record)]."""
        if previous is None:
            return []
        before = {_name(s.artifact): s for s in previous.slices}
        scales = self.scales()
        # an autoscaled slice keeps the count the controller (or an operator) gave the old version
        carried = _carried_scales(previous, value, scales)
        counts = desired_state([value], {**scales, **carried})
        out: list[tuple[RolloutValue | None, RolloutValue]] = []
        for s in value.slices:
            name, version = version_of(s.artifact)
            old = before.get(name)
            if old is None or old.artifact == s.artifact:
                continue
            old_version = version_of(old.artifact)[1]
            current = self.kv.get_local(RolloutKey(name))
            current = current if isinstance(current, RolloutValue) else None
            if current is not None and current.state in ACTIVE_STATES:
                if current.new_version == version:
                    continue
                way_out = (  # a rollback cannot be aborted: it ends once the old version runs again
                    "wait until it is back on " + current.old_version if current.state == "rolling-back"
                    else f"wait for it or abort it (`aether rollout abort {name}`)"
                )
                raise RolloutConflict(
                    f"a rollout of {name} from {current.old_version} to {current.new_version} is "
                    f"{current.state}; {way_out} before asking for {version}"
                )
            if not self._running_versions(name).get(old_version):
                continue  # nothing of the old version runs: a plain replacement loses no call
            d = counts.get(s.artifact)
            out.append((current, begin(
                uuid.uuid4().hex[:12], name, old_version, version, d.instances if d else s.instances,
                policy or s.rollout or RolloutPolicy(), now, blueprint=blueprint_id, old_slice=old,
            )))  # fmt: skip
        return out

    async def _put_with_rollouts(
        self, blueprint_id: str, value: BlueprintValue, policy: RolloutPolicy | None = None,
        written: list[Written] | None = None,
    ) -> list[RolloutValue]:
        """Store a blueprint, first recording a rollout for each artifact whose running version it
        changes (so the leader never sees the new version without the rollout that keeps the old
        one serving). Returns the rollouts started; appends (key, before, after) to `written`."""
        key = BlueprintKey(blueprint_id)
        # read through consensus (this replica may lag another node's apply): the write below is a
        # compare-and-set against it, so a concurrent apply is refused rather than overwritten
        stored = await self.kv.get(key, self.timeout)
        previous = stored if isinstance(stored, BlueprintValue) else None
        planned = self._planned_rollouts(previous, value, blueprint_id, time.time(), policy)
        started: list[RolloutValue] = []
        carried = _carried_scales(previous, value, self.scales()) if previous is not None else {}
        try:
            for current, new in planned:
                if not await self.kv.compare_and_set(RolloutKey(new.artifact), current, new, self.timeout):
                    raise RolloutConflict(f"the rollout of {new.artifact} changed meanwhile; try again")
                started.append(new)
            if not await self.kv.compare_and_set(key, stored, value, self.timeout):
                raise RolloutConflict(
                    f"blueprint {blueprint_id} changed meanwhile (another apply, update or deploy); "
                    "try again"
                )
            if written is not None:
                written.append((key, stored, value))
        except BaseException:
            for r in started:  # best effort: a rollout whose blueprint was not written must not run
                await self._withdraw(r)
            raise
        # the new version of an autoscaled slice starts from the old one's count; written once the
        # blueprint lists it (before, the leader's pass would forget it as listed by no blueprint)
        for coords, sv in carried.items():
            with contextlib.suppress(Exception):
                await self.kv.compare_and_set(ScaleKey(coords), None, sv, self.timeout)
        await self._forget_scales()
        return started

    async def _forget_scales(self) -> None:
        """Remove the `scale/` values no blueprint needs any more (`reconcile.stale_scales`), best
        effort (the leader's pass removes what is left): deleting a blueprint forgets the count and
        bounds of what it autoscaled, so applying it again starts from its own."""
        for w in stale_scales((e.blueprint for e in self.list_blueprints()), self.scales(), self.rollouts()):
            with contextlib.suppress(Exception):
                await self.kv.compare_and_set(w.key, w.expected, w.new, self.timeout)

    async def _all_or_nothing(
        self, err: BaseException, written: list[Written], started: list[RolloutValue]
    ) -> NoReturn:
        """An operation over several blueprints (`update`, `undeploy`, `scale`) failed part-way with
        `err`: set the blueprints it wrote back (newest first, each a compare-and-set against what
        it wrote), withdraw the rollouts it started, and raise `err` saying what was set back and
        what could not be (changed meanwhile). The store has no transaction over several keys:
        without this the first blueprints stayed changed (a rollout running for them) while the
        answer read as a refusal."""
        back: list[str] = []
        stuck: list[str] = []
        for key, before, after in reversed(written):
            try:
                ok = await self.kv.compare_and_set(key, after, before, self.timeout)
            except Exception:
                ok = False
            (back if ok else stuck).append(str(key).removeprefix("blueprints/"))
        for r in started:
            await self._withdraw(r)
        with contextlib.suppress(Exception):
            await self._forget_scales()
        if not written or not isinstance(err, AetherError):
            raise err
        back.sort()
        stuck.sort()

        def ids(names: list[str]) -> str:
            return f"blueprint{'s' if len(names) > 1 else ''} {', '.join(names)}"

        if not stuck:
            note = f"nothing was changed: {ids(back)} {'were' if len(back) > 1 else 'was'} set back"
        else:
            keeps = "they keep" if len(stuck) > 1 else "it keeps"
            note = (f"{ids(stuck)} changed meanwhile and could not be set back: {keeps} this change; "
                    "run the command again to finish it" + (f" ({ids(back)} set back)" if back else ""))
        try:
            again = type(err)(f"{err}; {note}")
        except Exception:
            raise err from None
        raise again from None

    async def _withdraw(self, r: RolloutValue) -> None:
        """Remove rollout `r` (best effort), also when the leader advanced it meanwhile (its write
        wakes the leader's pass at once): any value with its id is it."""
        key = RolloutKey(r.artifact)
        for _ in range(3):
            try:
                cur = await self.kv.get(key, self.timeout)  # through consensus: the leader's step too
                if not isinstance(cur, RolloutValue) or cur.id != r.id:
                    return
                if await self.kv.compare_and_set(key, cur, None, self.timeout):
                    return
            except Exception:
                return

    async def update(
        self, artifact: str, version: str, *, policy: RolloutPolicy | None = None,
        restore: tuple[str, BlueprintSlice] | None = None, **overrides: Any,
    ) -> RolloutValue:
        """Replace the running version of `artifact` (``group:artifact``) by `version` in every
        blueprint that lists it, through a rollout (`policy`, else the blueprint's
        `[slices.NAME.rollout]`, else rolling with one surge instance; `overrides` replace fields
        of that policy, e.g. ``strategy="canary", steps=[10, 100]``). `restore` (blueprint id,
        slice): that blueprint's slice of the artifact becomes this one (its settings: config,
        limits, isolation, entry policies; the instance count stays the blueprint's), as `undo`
        brings back what an earlier version ran with. Asked again for the version a rollout is
        already taking the artifact to, it answers that rollout (see `update_started`)."""
        value, _ = await self.update_started(artifact, version, policy=policy, restore=restore, **overrides)
        return value

    async def update_started(
        self, artifact: str, version: str, *, policy: RolloutPolicy | None = None,
        restore: tuple[str, BlueprintSlice] | None = None, **overrides: Any,
    ) -> tuple[RolloutValue, bool]:
        """`update`, and whether this call started the rollout (False: the blueprints already ask
        for `version` and the rollout answered is the one that took them there, still running or
        ended). Settings given explicitly (`overrides`) that differ from that rollout's are a
        `RolloutConflict` naming them: a repeated request is answered, a different one is not
        silently dropped."""
        name = _name(artifact)
        explicit = dict(overrides)
        if policy is None and overrides:
            base = self._policy_of(name)
            if "strategy" in overrides and "steps" not in overrides:
                overrides["steps"] = []
            try:  # convert, not replace: the types are checked (and 60 stored as 60.0, as decoded)
                policy = msgspec.convert({**msgspec.structs.asdict(base), **overrides}, RolloutPolicy)
            except msgspec.ValidationError as err:
                raise BadRequest(f"invalid rollout setting: {err}") from None
        try:
            target = Artifact.parse(f"{name}:{version}")
        except BadRequest as err:
            # the parser's message already starts "invalid version '...'" when the version is at fault
            text = str(err)
            if not text.startswith("invalid version"):
                text = f"invalid version {version!r}: {text}"
            raise BlueprintError(text) from None
        entries = [
            b for b in self.list_blueprints() if any(_name(s.artifact) == name for s in b.blueprint.slices)
        ]
        if not entries:
            raise BlueprintError(f"{name} is not deployed: no blueprint lists it (deploy it first)")
        try:
            self.dependencies_of(target)  # the new version must be in the repository
        except BlueprintError:
            raise
        except Exception as err:
            raise BlueprintError(f"cannot read {target} from the repository: {err}") from None
        listed = {s.artifact for e in entries for s in e.blueprint.slices if _name(s.artifact) == name}
        if listed == {str(target)}:
            current = self.kv.get_local(RolloutKey(name))
            if isinstance(current, RolloutValue) and current.new_version == version:
                _check_same_settings(current, explicit)
                return current, False
            raise BlueprintError(f"{target} is already the version the blueprints ask for")
        started: list[RolloutValue] = []
        written: list[Written] = []
        try:
            for b in entries:
                back = restore[1] if restore is not None and restore[0] == b.id else None
                slices = [
                    _with_version(
                        s if back is None or _name(s.artifact) != name
                        else msgspec.structs.replace(back, instances=s.instances, scaling=s.scaling),
                        name, str(target),
                    )
                    for s in b.blueprint.slices
                ]
                value = BlueprintValue(slices, b.blueprint.source)
                started += await self._put_with_rollouts(b.id, value, policy, written)
        except BaseException as err:
            await self._all_or_nothing(err, written, started)
        if started:
            return started[0], True
        current = self.kv.get_local(RolloutKey(name))
        if isinstance(current, RolloutValue) and current.new_version == version:
            return current, False
        raise BlueprintError(
            f"{name} was switched to {version} directly: no instance of the old version was running, "
            "so there was nothing to roll over"
        )

    def _policy_of(self, name: str) -> RolloutPolicy:
        """The `[slices.NAME.rollout]` policy a blueprint gives `name` (the default without one)."""
        for e in self.list_blueprints():
            for s in e.blueprint.slices:
                if _name(s.artifact) == name and s.rollout is not None:
                    return s.rollout
        return RolloutPolicy()

    async def wait_rollout(
        self, artifact: str, timeout: float = 300.0, progress_cb: Callable[[RolloutValue], None] | None = None
    ) -> RolloutValue:
        """Wait until the rollout of `artifact` is no longer active; returns it (the caller looks at
        its state). `ConvergenceTimeout` naming its step after `timeout` seconds."""
        key = RolloutKey(_name(artifact))
        wake = asyncio.Event()
        cancel = self.kv.watch("rollouts/", lambda _ev: wake.set())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: RolloutValue | None = None
        try:
            while True:
                wake.clear()
                r = self.rollout(artifact)
                if r != last:
                    last = r
                    if progress_cb is not None:
                        progress_cb(r)
                if r.state not in ACTIVE_STATES:
                    return r
                remaining = deadline - loop.time()
                if remaining <= 0:
                    step = r.history[-1] if r.history else r.state
                    raise ConvergenceTimeout(
                        f"the rollout of {key.artifact} to {r.new_version} is still {r.state} after"
                        f" {timeout:g} s (last step: {step}); `aether rollout status {key.artifact}` shows it"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 1.0)):
                        await wake.wait()
        finally:
            cancel()

    async def _change_rollout(
        self, artifact: str, change: Callable[[RolloutValue], RolloutValue]
    ) -> RolloutValue:
        key = RolloutKey(_name(artifact))
        for _ in range(20):
            current = self.rollout(artifact)
            new = change(current)
            if await self.kv.compare_and_set(key, current, new, self.timeout):
                return new
            await self.kv.get(key, self.timeout)  # catch up and decide again
        raise RolloutConflict(f"the rollout of {artifact} keeps changing; try again")

    async def pause_rollout(self, artifact: str) -> RolloutValue:
        return await self._change_rollout(artifact, lambda r: rollout_pause(r, time.time()))

    async def resume_rollout(self, artifact: str) -> RolloutValue:
        return await self._change_rollout(artifact, lambda r: rollout_resume(r, time.time()))

    async def abort_rollout(self, artifact: str) -> RolloutValue:
        return await self._change_rollout(artifact, lambda r: rollout_abort(r, time.time()))

    async def undo_rollout(self, artifact: str) -> RolloutValue:
        """Go back to the version before the last rollout: abort it while it runs; after it
        succeeded, roll back to its old version (a new rollout with the same policy) with the
        settings it ran with (`RolloutValue.old_slice`, in the blueprint that started the rollout;
        the instance count and scaling rule stay what they are now)."""
        r = self.rollout(artifact)
        if r.state in ACTIVE_STATES and r.state != "rolling-back":
            return await self.abort_rollout(artifact)
        if r.state != "succeeded":
            raise RolloutConflict(
                f"the last rollout of {r.artifact} is {r.state}: {r.old_version} already runs, "
                "nothing to undo"
            )
        policy = RolloutPolicy(
            strategy=r.strategy, steps=list(r.steps) if r.strategy == "canary" else [], interval=r.interval,
            max_error_rate=r.max_error_rate, max_p99_ratio=r.max_p99_ratio, max_surge=r.max_surge,
            max_unavailable=r.max_unavailable, progress_deadline=r.progress_deadline, min_calls=r.min_calls,
        )  # fmt: skip
        restore = (r.blueprint, r.old_slice) if r.blueprint and r.old_slice is not None else None
        return await self.update(r.artifact, r.old_version, policy=policy, restore=restore)

    async def _define_map(self, bp: Blueprint, name: str, spec: MapSpec) -> None:
        key = MapDefKey(name)
        current = self.kv.get_local(key)
        if current is None and await self.kv.compare_and_set(key, None, spec, self.timeout):
            return
        self._check_map(bp, name, spec, self.kv.get_local(key))

    def _check_map(self, bp: Blueprint, name: str, spec: MapSpec, current: object) -> None:
        """`BlueprintError` if map `name`, defined as `current`, has other settings than `spec`."""
        if current != spec:
            raise BlueprintError(
                f"{bp.filename}: [maps.{name}] asks for {spec.describe()}, but map {name!r} exists with "
                f"{current.describe() if isinstance(current, MapSpec) else repr(current)}; use the existing "
                f"settings or delete the map first (`aether map delete {name}`)"
            )

    async def delete_blueprint(self, blueprint_id: str) -> bool:
        """Remove a blueprint; its slices are undeployed unless another blueprint lists them, and
        the `scale/` values of what only it autoscaled are forgotten (`_forget_scales`)."""
        removed = await self.kv.remove(self._key(blueprint_id), self.timeout)
        await self._forget_scales()
        return removed

    def list_blueprints(self) -> list[BlueprintEntry]:
        out = []
        for key, v in self.kv.list_local("blueprints/"):
            if isinstance(v, BlueprintValue):
                out.append(BlueprintEntry(key[len("blueprints/"):], v))
        return out

    def get_blueprint(self, blueprint_id: str) -> BlueprintValue | None:
        v = self.kv.get_local(self._key(blueprint_id))
        return v if isinstance(v, BlueprintValue) else None

    @staticmethod
    def _key(blueprint_id: str) -> BlueprintKey:
        try:
            parse_key(f"blueprints/{blueprint_id}")
        except BadRequest as e:
            raise BlueprintError(str(e)) from None
        return BlueprintKey(blueprint_id)

    # --- deploy / scale / undeploy --------------------------------------------------------------

    async def deploy(self, artifact: Artifact, instances: int) -> BlueprintValue:
        """Deploy `instances` of `artifact` (and its dependencies) as blueprint
        `direct:{group}:{artifact}`."""
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
            raise BlueprintError(f"instances must be an integer >= 1, got {instances!r} "
                                 "(to remove an artifact use undeploy)")
        bp = Blueprint(direct_id(artifact), (BlueprintSliceSpec(artifact.artifact, artifact, instances),),
                       filename=f"deploy {artifact}")
        value = self._expand(bp, "api")
        self._admit({bp.id: value}, f"deploying {instances} instances of {artifact}")
        await self._put_with_rollouts(bp.id, value)
        return value

    async def scale(self, artifact_coords: str, instances: int) -> list[str]:
        """Set the instance count of an artifact in every blueprint listing it; returns their ids
        (an autoscaled artifact is pinned at `instances` instead: `scale_to`)."""
        return (await self.scale_to(artifact_coords, instances)).blueprints

    async def scale_to(
        self, artifact_coords: str, instances: int | None = None, *, min: int | None = None,
        max: int | None = None, auto: bool = False, now: float | None = None,
    ) -> ScaleOutcome:
        """Scale the artifacts `artifact_coords` matches (see the module docstring): `instances`
        alone sets the count of a fixed artifact and pins an autoscaled one; `min`/`max` set an
        autoscaled artifact's bounds (with `instances` too: its count, within them); `auto` clears
        them. `BlueprintError` when nothing matches or the request does not fit."""
        for name, v in (("instances", instances), ("min", min), ("max", max)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise BlueprintError(f"{name} must be an integer >= 1, got {v!r}"
                                     + (" (0 would mean undeploy, which is its own command)"
                                        if name == "instances" else ""))
        bounds = min is not None or max is not None
        if auto and (bounds or instances is not None):
            raise BlueprintError("--auto clears the operator's bounds and count; give it alone")
        if instances is None and not bounds and not auto:
            raise BlueprintError("give an instance count, --min/--max bounds, or --auto")
        if min is not None and max is not None and min > max:
            raise BlueprintError(f"min {min} is above max {max}")
        match = _matcher(artifact_coords)
        entries = self.list_blueprints()
        bps = [e.blueprint for e in entries]
        matching = sorted({s.artifact for b in bps for s in b.slices if match(s.artifact)})
        if not matching:
            raise BlueprintError(f"{artifact_coords} is not deployed: no blueprint lists it")
        scales = self.scales()
        info = autoscaled(bps, scales)
        plain = [a for a in matching if a not in info]
        if plain and (bounds or auto):
            raise BlueprintError(
                f"{plain[0]} has no [slices.NAME.scaling] rule, so it has no bounds to set: give an "
                f"instance count (`aether scale {plain[0]} N`), or add a scaling rule to its blueprint"
            )
        wall = time.time() if now is None else now
        after = dict(scales)
        for a in matching:
            if a in info:
                sv = _scale_value(a, info[a], scales.get(a), instances, min, max, auto, wall)
                if sv is not None:
                    after[a] = sv
        plain_set = set(plain)

        def change(bp_id: str, v: BlueprintValue) -> BlueprintValue | None:
            if instances is None or not any(s.artifact in plain_set for s in v.slices):
                return None
            return msgspec.structs.replace(v, slices=[
                msgspec.structs.replace(s, instances=instances) if s.artifact in plain_set else s
                for s in v.slices
            ])

        scaled = {e.id: new for e in entries if (new := change(e.id, e.blueprint)) is not None}
        self._admit(dict(scaled), f"scaling {artifact_coords}", after)
        changed = await self._update_all(change) if plain else []
        for a in matching:
            if a in info:
                await self._write_scale(a, instances, min, max, auto, wall)
        now_info = autoscaled((e.blueprint for e in self.list_blueprints()), self.scales())
        return ScaleOutcome(changed, [
            ScaleBounds(a, i.instances, i.min, i.max, i.bounds_source, i.count_source)
            for a in matching if (i := now_info.get(a)) is not None
        ])

    async def _write_scale(
        self, artifact: str, instances: int | None, lo: int | None, hi: int | None, auto: bool, wall: float,
    ) -> None:
        key = ScaleKey(artifact)
        for _ in range(20):
            cur = self.kv.get_local(key)
            cur = cur if isinstance(cur, ScaleValue) else None
            bps = [e.blueprint for e in self.list_blueprints()]
            info = autoscaled(bps, {**self.scales()})
            if artifact not in info:
                return  # its blueprint changed meanwhile: no longer autoscaled
            new = _scale_value(artifact, info[artifact], cur, instances, lo, hi, auto, wall)
            if new is None or new == cur:
                return
            if await self.kv.compare_and_set(key, cur, new, self.timeout):
                return
        raise BlueprintError(f"scale/{artifact} keeps changing; try again")

    async def undeploy(self, artifact_coords: str) -> list[str]:
        """Remove an artifact from every blueprint listing it; returns the ids changed or deleted."""
        match = _matcher(artifact_coords)
        entries = self.list_blueprints()
        if not any(match(s.artifact) for e in entries for s in e.blueprint.slices):
            raise BlueprintError(f"{artifact_coords} is not deployed: no blueprint lists it")
        # refuse if anything that stays depends on it
        after = {e.id: _without(e.blueprint, match) for e in entries}
        for bp_id, v in sorted(after.items()):
            for s in v.slices if v is not None else []:
                for dep in s.depends_on:
                    if match(dep):
                        raise BlueprintError(
                            f"cannot undeploy {artifact_coords}: {s.artifact} (blueprint {bp_id}) depends on "
                            f"{dep}; undeploy {s.artifact} first"
                        )

        def change(bp_id: str, v: BlueprintValue) -> BlueprintValue | None:
            if not any(match(s.artifact) for s in v.slices):
                return None
            return _without(v, match) or BlueprintValue([], v.source)

        changed = await self._update_all(change)
        await self._forget_scales()
        return changed

    async def _update_all(self, change: Callable[[str, BlueprintValue], BlueprintValue | None]) -> list[str]:
        """Apply `change` to every blueprint with compare-and-set (re-read and retry on conflict);
        a result without slices deletes the blueprint. All or nothing: a failure part-way sets the
        blueprints already written back (`_all_or_nothing`)."""
        changed: list[str] = []
        written: list[Written] = []
        try:
            for entry in self.list_blueprints():
                key = BlueprintKey(entry.id)
                current: BlueprintValue | None = entry.blueprint
                for _ in range(20):
                    if current is None:
                        break
                    new = change(entry.id, current)
                    if new is None:
                        break
                    after = new if new.slices else None
                    if await self.kv.compare_and_set(key, current, after, self.timeout):
                        changed.append(entry.id)
                        written.append((key, current, after))
                        break
                    current = await self.kv.get(key, self.timeout)
                else:
                    raise BlueprintError(f"blueprint {entry.id} keeps changing; try again")
        except BaseException as err:
            await self._all_or_nothing(err, written, [])
        return changed

    # --- status ---------------------------------------------------------------------------------

    def slices_status(self) -> list[SliceStatus]:
        """Per artifact: desired count, ACTIVE instances and the state on every node, sorted."""
        blueprints = self.kv.list_local("blueprints/")
        desired = desired_state(
            (v for _, v in blueprints if isinstance(v, BlueprintValue)), self.scales(), self.rollouts()
        )
        per: dict[str, list[SliceInstanceStatus]] = {}
        for key, v in self.kv.list_local("slices/"):
            if not isinstance(v, SliceStateValue):
                continue
            k = parse_key(key)
            if isinstance(k, SliceKey):
                per.setdefault(k.artifact, []).append(
                    SliceInstanceStatus(k.node_id, v.state, v.reason, sorted(v.instances)))
        out = []
        for artifact in sorted(set(desired) | set(per)):
            inst = sorted(per.get(artifact, []), key=lambda s: s.node)
            active = sum(len(s.instance_ids) for s in inst if s.state == SliceState.ACTIVE)
            d = desired.get(artifact)
            out.append(SliceStatus(artifact, d.instances if d else 0, active, inst))
        return out

    def _rollouts_of(self, artifacts: Sequence[str]) -> list[RolloutValue]:
        """The recorded rollouts of the artifacts (any version) of `artifacts` that concern one of
        them (as the old or the new version)."""
        wanted = set(artifacts)
        return [
            r for r in self.rollouts()
            if f"{r.artifact}:{r.new_version}" in wanted or f"{r.artifact}:{r.old_version}" in wanted
        ]  # fmt: skip

    async def wait_converged(
        self,
        target: str | Sequence[str],
        timeout: float = 60.0,
        progress_cb: ProgressCallback | None = None,
    ) -> list[SliceStatus]:
        """Wait until every instance of the target is ACTIVE (exactly the desired count, every key
        ACTIVE; an artifact with desired 0 must have no keys left).

        `target` is a blueprint id or a list of artifact coordinates. Raises `DeploymentFailed`
        naming artifact, node and reason as soon as an instance is FAILED, `ConvergenceTimeout`
        saying what is missing after `timeout` seconds. `progress_cb(statuses)` is called with
        the target's statuses whenever they change.
        """
        if isinstance(target, str):
            bp = self.get_blueprint(target)
            if bp is None:
                # applied through another node a moment ago? a read through consensus brings this
                # replica up to date before we call it missing
                v = await self.kv.get(self._key(target), self.timeout)
                bp = v if isinstance(v, BlueprintValue) else None
            if bp is None:
                raise BlueprintNotFound(f"no blueprint {target!r}; `aether blueprint list` shows the ids")
            artifacts = [s.artifact for s in bp.slices]
        else:
            artifacts = [str(Artifact.parse(a)) for a in target]
        wake = asyncio.Event()

        def on_event(_: WatchEvent) -> None:
            wake.set()

        finished_before = {r.id for r in self._rollouts_of(artifacts) if r.state not in ACTIVE_STATES}
        cancels = [
            self.kv.watch("slices/", on_event), self.kv.watch("blueprints/", on_event),
            self.kv.watch("rollouts/", on_event),
        ]  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: list[SliceStatus] | None = None
        try:
            while True:
                wake.clear()
                by_artifact = {s.artifact: s for s in self.slices_status()}
                statuses = [by_artifact.get(a) or SliceStatus(a, 0, 0, []) for a in artifacts]
                if statuses != last:
                    last = statuses
                    if progress_cb is not None:
                        progress_cb(statuses)
                rolling = [r for r in self._rollouts_of(artifacts) if r.id not in finished_before]
                for r in rolling:
                    if r.state in ("rolled-back", "aborted") and f"{r.artifact}:{r.new_version}" in artifacts:
                        raise DeploymentFailed(
                            f"the rollout of {r.artifact} to {r.new_version} was {r.state}: {r.reason}"
                        )
                for s in statuses:
                    for i in s.instances:
                        if i.state == SliceState.FAILED and not rolling:
                            raise DeploymentFailed(f"{s.artifact} failed on {i.node}: {i.reason}")
                busy = any(r.state in ACTIVE_STATES for r in rolling)
                if all(_converged(s) for s in statuses) and not busy:
                    return statuses
                remaining = deadline - loop.time()
                if remaining <= 0:
                    missing = "; ".join(_describe(s) for s in statuses if not _converged(s))
                    raise ConvergenceTimeout(f"not converged after {timeout:.1f}s: {missing}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 0.5)):
                        await wake.wait()
        finally:
            for c in cancels:
                c()


def _converged(s: SliceStatus) -> bool:
    if s.desired == 0:
        return not s.instances
    return s.active == s.desired and all(i.state == SliceState.ACTIVE for i in s.instances)


def _describe(s: SliceStatus) -> str:
    states = ", ".join(f"{i.node} {i.state}" + (f" ({i.reason})" if i.reason else "") for i in s.instances)
    return f"{s.artifact} {s.active}/{s.desired} ACTIVE" + (f" [{states}]" if states else "")


def _scale_value(
    artifact: str, info: Autoscaled, cur: ScaleValue | None, instances: int | None, lo: int | None,
    hi: int | None, auto: bool, wall: float,
) -> ScaleValue | None:
    """The `scale/{artifact}` value an operator's command makes of `cur` (None: nothing to write)."""
    if auto:
        if cur is None or (cur.min is None and cur.max is None):
            return None
        return ScaleValue(cur.instances, cur.source, wall, "the operator cleared the bounds")
    if lo is None and hi is None:
        assert instances is not None
        why = f"pinned at {instances} by the operator"
        return ScaleValue(instances, "operator", wall, why, instances, instances)
    new_lo = lo if lo is not None else (cur.min if cur is not None else None)
    new_hi = hi if hi is not None else (cur.max if cur is not None else None)
    eff_lo = new_lo if new_lo is not None else info.rule.min
    eff_hi = new_hi if new_hi is not None else info.rule.max
    if eff_lo > eff_hi:
        raise BlueprintError(
            f"{artifact}: min {eff_lo} would be above max {eff_hi}"
            + (" (the blueprint's)" if new_hi is None or new_lo is None else "")
            + "; give both --min and --max"
        )
    if instances is not None:
        if not eff_lo <= instances <= eff_hi:
            raise BlueprintError(f"{artifact}: {instances} instances is outside the bounds "
                                 f"{eff_lo}..{eff_hi}")
        count, source = instances, "operator"
    else:
        count = info.instances if cur is None else cur.instances
        clamped = min(eff_hi, max(eff_lo, count))
        source = (cur.source if cur is not None else "blueprint") if clamped == count else "operator"
        count = clamped
    return ScaleValue(count, source, wall, f"bounds {eff_lo}..{eff_hi} set by the operator", new_lo, new_hi)


def _without(v: BlueprintValue, match: Callable[[str], bool]) -> BlueprintValue | None:
    """`v` without the matching slices and without dependency-only entries nobody needs any more."""
    slices = [s for s in v.slices if not match(s.artifact)]
    while True:
        needed = {d for s in slices for d in s.depends_on}
        kept = [s for s in slices if s.name or s.artifact in needed]
        if len(kept) == len(slices):
            break
        slices = kept
    return BlueprintValue(slices, v.source) if slices else None


def _check_same_settings(current: RolloutValue, explicit: dict[str, Any]) -> None:
    """A `RolloutConflict` naming the settings of a repeated update that differ from the rollout
    already taking the artifact to that version (steps left out of a canary take the defaults)."""
    differ = []
    for field, asked in sorted(explicit.items()):
        have = getattr(current, field, None)
        if field == "steps" and not asked and current.strategy != "rolling":
            continue  # the strategy's default steps
        if isinstance(have, float) and isinstance(asked, int | float) and not isinstance(asked, bool):
            same = float(asked) == have
        else:
            same = asked == have
        if not same:
            differ.append(f"{field} {asked!r} (it runs with {have!r})")
    if differ:
        raise RolloutConflict(
            f"a rollout of {current.artifact} to {current.new_version} is already {current.state} "
            f"with other settings: {', '.join(differ)}; wait for it or abort it "
            f"(`aether rollout abort {current.artifact}`), then update again"
        )


def _name(artifact: str) -> str:
    """``group:artifact`` of coordinates with or without a version (validated)."""
    parts = artifact.strip().split(":")
    if len(parts) == 3:
        return str(Artifact.parse(artifact.strip())).rpartition(":")[0]
    if len(parts) == 2 and all(parts):
        return ":".join(parts)
    raise BlueprintError(f"invalid artifact {artifact!r}: expected GROUP:ARTIFACT or GROUP:ARTIFACT:VERSION")


def _with_version(s: BlueprintSlice, name: str, coords: str) -> BlueprintSlice:
    """`s` with every coordinates of `name` (its artifact, its dependencies) replaced by `coords`."""
    return msgspec.structs.replace(
        s, artifact=coords if _name(s.artifact) == name else s.artifact,
        depends_on=[coords if _name(d) == name else d for d in s.depends_on],
    )  # fmt: skip


def _carried_scales(
    previous: BlueprintValue, value: BlueprintValue, scales: dict[str, ScaleValue]
) -> dict[str, ScaleValue]:
    """`scale/` values the new versions in `value` take over from the versions of the same
    artifacts in `previous` (only for an autoscaled new version without a value of its own)."""
    before = {_name(s.artifact): s.artifact for s in previous.slices}
    out: dict[str, ScaleValue] = {}
    for s in value.slices:
        old = before.get(_name(s.artifact))
        if s.scaling is not None and old is not None and old != s.artifact and s.artifact not in scales:
            sv = scales.get(old)
            if sv is not None:
                out[s.artifact] = sv
    return out
