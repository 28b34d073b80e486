"""`DeploymentService.apply_blueprint` over an in-memory store: a refused apply writes nothing."""

from __future__ import annotations

import pytest

from aether.deploy.blueprint import any_artifact, no_dependencies
from aether.deploy.errors import BlueprintError, RolloutConflict
from aether.deploy.operations import DeploymentService
from aether.deploy.rollout import begin
from aether.kv.keys import BlueprintSlice, BlueprintValue, RolloutPolicy, SliceStateValue
from controller_fakes import FakeKV

pytestmark = pytest.mark.timeout(10)

A1, A2 = "org.demo:a:1.0.0", "org.demo:a:2.0.0"


def _rolling_store(rollout: object) -> FakeKV:
    """The blueprint on 2.0.0, 1.0.0 still ACTIVE on node-1, and `rollout` of org.demo:a."""
    return FakeKV({
        "blueprints/shop": BlueprintValue([BlueprintSlice(A2, 1, name="a")]),
        f"slices/node-1/{A1}": SliceStateValue("ACTIVE", 1.0, None, [0]),
        "rollouts/org.demo:a": rollout,
    })  # fmt: skip


async def test_an_apply_refused_for_a_running_rollout_defines_none_of_its_maps() -> None:
    """A blueprint asking for a third version while a rollout runs is refused (409), but its
    `[maps.NAME]` sections used to be defined first: the map stayed, and a corrected blueprint with
    other map settings was then refused because "map 'orders' exists"."""
    rollout = begin("r1", "org.demo:a", "1.0.0", "2.0.0", 1, RolloutPolicy(), 1.0)
    kv = _rolling_store(rollout)
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    before = dict(kv.data)
    toml = (
        'id = "shop"\n[maps.orders]\nreplicas = 1\nwrite_quorum = 1\n'
        '[slices.a]\nartifact = "org.demo:a:3.0.0"\n'
    )
    with pytest.raises(RolloutConflict, match=r"rollout of org\.demo:a from 1\.0\.0 to 2\.0\.0 is"):
        await svc.apply_blueprint(toml, "shop.toml")
    assert kv.data == before  # no map definition, no blueprint, no rollout


async def test_an_apply_refused_for_a_conflicting_map_defines_none_of_its_other_maps() -> None:
    from aether.core.maps import MapSpec
    from aether.deploy.errors import BlueprintError

    kv = FakeKV({"maps/defs/orders": MapSpec(replicas=1, write_quorum=1)})
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    toml = (
        'id = "shop"\n[maps.carts]\n[maps.orders]\nreplicas = 3\n[slices.a]\nartifact = "org.demo:a:1.0.0"\n'
    )
    with pytest.raises(BlueprintError, match="map 'orders' exists with"):
        await svc.apply_blueprint(toml, "shop.toml")
    assert sorted(kv.data) == ["maps/defs/orders"]  # carts was not defined


async def test_a_conflicting_map_of_a_blueprint_is_named_with_every_setting() -> None:
    """The refusal named the blueprint's replicas, write_quorum and engine only, and the existing
    map as a repr (`MapSpec(replicas=3, ...)`): a map that differs in `max_value_bytes` alone read
    as asking for what exists."""
    from aether.core.maps import MapSpec
    from aether.deploy.errors import BlueprintError

    kv = FakeKV({"maps/defs/claims": MapSpec(engine="sqlite", max_value_bytes=4096)})
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    toml = (
        'id = "shop"\n[maps.claims]\nengine = "sqlite"\nmax_value_bytes = 8192\n'
        '[slices.a]\nartifact = "org.demo:a:1.0.0"\n'
    )
    with pytest.raises(BlueprintError) as e:
        await svc.apply_blueprint(toml, "shop.toml")
    assert str(e.value) == (
        "shop.toml: [maps.claims] asks for replicas=3 write_quorum=2 engine=sqlite max_value_bytes=8192, "
        "but map 'claims' exists with replicas=3 write_quorum=2 engine=sqlite max_value_bytes=4096; use "
        "the existing settings or delete the map first (`aether map delete claims`)"
    )


async def test_a_refusal_during_a_rollback_does_not_suggest_an_abort_that_is_refused() -> None:
    """The 409 for another version during a rollout said "wait for it or abort it"; a rollback
    cannot be aborted (`abort` answers 409 "only a progressing or paused rollout can be aborted")."""
    import msgspec

    from aether.deploy.rollout import abort

    rollout = abort(begin("r1", "org.demo:a", "1.0.0", "2.0.0", 1, RolloutPolicy(), 1.0), 2.0)
    assert rollout.state == "rolling-back"
    kv = _rolling_store(rollout)
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    with pytest.raises(RolloutConflict) as e:
        await svc.apply_blueprint('id = "shop"\n[slices.a]\nartifact = "org.demo:a:3.0.0"\n', "shop.toml")
    assert "is rolling-back; wait until it is back on 1.0.0 before asking for 3.0.0" in str(e.value)
    assert "abort" not in str(e.value)
    with pytest.raises(RolloutConflict, match="only a progressing or paused rollout can be aborted"):
        await svc.abort_rollout("org.demo:a")
    # a progressing one still offers the abort
    kv.data["rollouts/org.demo:a"] = msgspec.structs.replace(rollout, state="progressing")
    with pytest.raises(RolloutConflict, match="wait for it or abort it"):
        await svc.apply_blueprint('id = "shop"\n[slices.a]\nartifact = "org.demo:a:3.0.0"\n', "shop.toml")


class RacingKV(FakeKV):
    """The in-memory store, where another apply lands just before the next write of a blueprint."""

    def __init__(self, data: dict[str, object]) -> None:
        super().__init__(data)
        self.before_blueprint_write: list[object] = []  # coroutine functions, run once each

    async def get(self, key: object, timeout: float = 5.0) -> object:  # the read through consensus
        return self.get_local(key)

    async def _race(self, key: object) -> None:
        if str(key).startswith("blueprints/") and self.before_blueprint_write:
            await self.before_blueprint_write.pop(0)()  # type: ignore[operator]

    async def put(self, key: object, value: object, timeout: float = 5.0) -> int:
        await self._race(key)
        return await super().put(key, value, timeout)

    async def compare_and_set(self, key: object, expected: object, new: object, timeout: float = 5.0) -> bool:
        await self._race(key)
        return await super().compare_and_set(key, expected, new, timeout)


async def test_two_applies_racing_cannot_leave_a_rollout_its_blueprint_does_not_ask_for() -> None:
    """Two applies of one blueprint id: the one that read the blueprint first wrote it last with an
    unconditional put, over the other's new version and the rollout recorded for it. The store then
    held blueprint 1.0.0 with a rollout to 2.0.0 running (which ends in a plain replacement back to
    1.0.0, without a rollout). The write is now a compare-and-set against what the apply read:
    the stale apply is refused (409) and the store is what the other apply wrote."""
    kv = RacingKV({
        "blueprints/shop": BlueprintValue([BlueprintSlice(A1, 1, name="a")]),
        f"slices/node-1/{A1}": SliceStateValue("ACTIVE", 1.0, None, [0]),
    })  # fmt: skip
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    to_v2 = 'id = "shop"\n[slices.a]\nartifact = "org.demo:a:2.0.0"\n'
    more_v1 = 'id = "shop"\n[slices.a]\nartifact = "org.demo:a:1.0.0"\ninstances = 2\n'

    async def other_apply() -> None:
        await svc.apply_blueprint(to_v2, "v2.toml")

    kv.before_blueprint_write.append(other_apply)
    with pytest.raises(RolloutConflict, match="blueprint shop changed meanwhile"):
        await svc.apply_blueprint(more_v1, "v1.toml")
    bp = kv.data["blueprints/shop"]
    assert [s.artifact for s in bp.slices] == [A2]  # type: ignore[attr-defined]
    assert kv.data["rollouts/org.demo:a"].new_version == "2.0.0"  # type: ignore[attr-defined]


def test_the_versions_of_a_rollout_keep_the_config_limits_and_policies_the_blueprints_give() -> None:
    """Once a rollout starts, the blueprints list only the new version. The node looks up config,
    capacity limits and entry policies by full coordinates, so the old version, still serving every
    call, got an empty config: its fingerprint changed and every node reconfigured (restarted) the
    old instances without their config or secrets; old instances started again by a rollback got
    none either, nor their `max_concurrency` and entry policies."""
    from aether.core.policy import EntryPolicy
    from aether.deploy.config import SliceConfigs
    from aether.kv.keys import SecretValue

    config = {"currency": "EUR", "db": {"secret": "db-password"}}
    policies = {"charge": EntryPolicy(timeout=2.5)}

    def blueprint(coords: str) -> BlueprintValue:
        return BlueprintValue([BlueprintSlice(coords, 2, name="a", config=config, max_concurrency=8,
                                              entries=policies)])  # fmt: skip

    kv = FakeKV({"blueprints/shop": blueprint(A1), "secrets/db-password": SecretValue("s3cret", 1.0, 1.0, 1)})
    configs = SliceConfigs(kv)
    running = configs.fingerprint(A1)
    kv.data["blueprints/shop"] = blueprint(A2)  # the rollout to 2.0.0 starts
    assert configs.fingerprint(A1) == running  # the old instances are not reconfigured
    assert configs.resolved(A1).values == {"currency": "EUR", "db": "s3cret"}
    limits = configs.limits(A1)
    assert limits is not None and limits.max_concurrency == 8
    # entry policies only for the version listed: another version's may name entries this one lacks
    # (its activation would fail on them), and running instances keep the policies they started with
    assert configs.entry_policies(A1) == {} and configs.entry_policies(A2) == policies
    # the listed version's own settings win; another artifact gets nothing from it
    kv.data["blueprints/other"] = BlueprintValue([BlueprintSlice("org.demo:b:1.0.0", 1, config={"x": 1})])
    assert configs.raw("org.demo:b:1.0.0") == {"x": 1} and configs.raw("org.demo:c:1.0.0") == {}


async def test_a_refused_write_withdraws_its_rollout_also_after_the_leader_advanced_it() -> None:
    """The rollout is recorded before the blueprint; when the blueprint write then fails, the
    rollout is withdrawn with a compare-and-set against the value first written. The leader's
    pass, which the rollout's write wakes, has usually advanced it by then (step 1), so that
    compare-and-set failed and the rollout kept running for a blueprint that never asked for it."""
    import msgspec

    kv = RacingKV({
        "blueprints/shop": BlueprintValue([BlueprintSlice(A1, 1, name="a")]),
        f"slices/node-1/{A1}": SliceStateValue("ACTIVE", 1.0, None, [0]),
    })  # fmt: skip
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]

    async def leader_step_and_another_write() -> None:
        r = kv.data["rollouts/org.demo:a"]
        kv.data["rollouts/org.demo:a"] = msgspec.structs.replace(r, new_instances=1, step=1)  # type: ignore[arg-type]
        kv.data["blueprints/shop"] = BlueprintValue([BlueprintSlice(A1, 3, name="a")])

    kv.before_blueprint_write.append(leader_step_and_another_write)
    with pytest.raises(RolloutConflict, match="blueprint shop changed meanwhile"):
        await svc.apply_blueprint('id = "shop"\n[slices.a]\nartifact = "org.demo:a:2.0.0"\n', "v2.toml")
    assert "rollouts/org.demo:a" not in kv.data


async def test_a_rollout_keeps_the_old_versions_own_settings_and_a_rollback_restores_them() -> None:
    """A blueprint changing the version and the slice's settings at once (config, a secret, limits,
    isolation, entry policies): the old version, still serving, took the NEW blueprint's settings
    (`config.slices_of` fell back to the version listed), so every node reconfigured the old
    instances with 2.0.0's config; after a rollback the leader wrote 1.0.0 back with 2.0.0's
    settings, so 1.0.0 kept running with a config it was never deployed with. The rollout now
    records the old version's slice; the old instances keep it, and a rollback restores it."""
    from aether.core.policy import EntryPolicy
    from aether.deploy.config import SliceConfigs
    from aether.kv.keys import SecretValue

    old_toml = (
        'id = "shop"\n[slices.a]\nartifact = "org.demo:a:1.0.0"\ninstances = 2\nmax_concurrency = 4\n'
        '[slices.a.config]\ncurrency = "EUR"\ndb = { secret = "db-v1" }\n'
        "[slices.a.entries.charge]\ntimeout = 1.0\n"
    )
    new_toml = (
        'id = "shop"\n[slices.a]\nartifact = "org.demo:a:2.0.0"\ninstances = 2\n'
        'max_concurrency = 16\nisolation = "process"\n'
        '[slices.a.config]\ncurrency = "USD"\ndb = { secret = "db-v2" }\n'
        "[slices.a.entries.refund]\ntimeout = 9.0\n"
    )
    kv = RacingKV({
        f"slices/node-1/{A1}": SliceStateValue("ACTIVE", 1.0, None, [0, 1]),
        "secrets/db-v1": SecretValue("one", 1.0, 1.0, 1),
        "secrets/db-v2": SecretValue("two", 1.0, 1.0, 1),
    })  # fmt: skip
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    configs = SliceConfigs(kv)
    await svc.apply_blueprint(old_toml, "v1.toml")
    running = configs.fingerprint(A1)
    old_slice = svc.get_blueprint("shop").slices[0]  # type: ignore[union-attr]

    await svc.apply_blueprint(new_toml, "v2.toml")
    assert svc.rollout("org.demo:a").state == "progressing"
    # while it runs, the old version keeps its own settings: nothing to reconfigure
    assert configs.fingerprint(A1) == running
    assert configs.resolved(A1).values == {"currency": "EUR", "db": "one"}
    assert configs.limits(A1).max_concurrency == 4  # type: ignore[union-attr]
    assert configs.entry_policies(A1) == {"charge": EntryPolicy(timeout=1.0)}
    assert configs.resolved(A2).values == {"currency": "USD", "db": "two"}
    assert configs.entry_policies(A2) == {"refund": EntryPolicy(timeout=9.0)}
    from aether.deploy.config import slices_of

    bps = [e.blueprint for e in svc.list_blueprints()]
    assert [s.isolation for s in slices_of(bps, A1, svc.rollouts())] == ["auto"]
    assert [s.isolation for s in slices_of(bps, A2, svc.rollouts())] == ["process"]
    assert svc.rollout("org.demo:a").old_slice == old_slice  # what a rollback writes back

    # the rollout succeeded; the operator scaled to 3 since; `undo` brings 1.0.0 back with its own
    # settings (it changed only the version: 1.0.0 ran with 2.0.0's config, limits, isolation) and
    # keeps the count
    import msgspec

    kv.data["rollouts/org.demo:a"] = msgspec.structs.replace(svc.rollout("org.demo:a"), state="succeeded")
    kv.data[f"slices/node-1/{A2}"] = SliceStateValue("ACTIVE", 1.0, None, [0, 1])
    kv.data.pop(f"slices/node-1/{A1}")
    new_slice = msgspec.structs.replace(svc.get_blueprint("shop").slices[0], instances=3)  # type: ignore[union-attr]
    kv.data["blueprints/shop"] = BlueprintValue([new_slice])
    undo = await svc.undo_rollout("org.demo:a")
    assert (undo.old_version, undo.new_version) == ("2.0.0", "1.0.0")
    assert svc.get_blueprint("shop").slices == [msgspec.structs.replace(old_slice, instances=3)]  # type: ignore[union-attr]
    assert undo.old_slice == new_slice  # and undoing the undo brings 2.0.0's back


async def test_an_update_of_several_blueprints_failing_part_way_sets_the_written_ones_back() -> None:
    """`update` changes every blueprint listing the artifact, one compare-and-set each. When a later
    one failed (another apply landed first: 409 "changed meanwhile; try again"), the earlier ones
    stayed on the new version with their rollout running: half applied, while the answer read as a
    refusal. Once the rollout ended, blueprint "other" asked for 2.0.0 and "shop" for 1.0.0, and
    both versions ran for good. The written blueprints are now set back and their rollout
    withdrawn, and the error says so."""
    kv = RacingKV({
        "blueprints/other": BlueprintValue([BlueprintSlice(A1, 1, name="a")]),
        "blueprints/shop": BlueprintValue([BlueprintSlice(A1, 2, name="a")]),
        f"slices/node-1/{A1}": SliceStateValue("ACTIVE", 1.0, None, [0, 1]),
    })  # fmt: skip
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    theirs = BlueprintValue([BlueprintSlice(A1, 3, name="a")])

    async def nothing() -> None:
        pass

    async def another_apply_of_shop() -> None:
        kv.data["blueprints/shop"] = theirs

    kv.before_blueprint_write += [nothing, another_apply_of_shop]  # "other" is written first
    with pytest.raises(RolloutConflict) as e:
        await svc.update("org.demo:a", "2.0.0")
    assert kv.data["blueprints/other"] == BlueprintValue([BlueprintSlice(A1, 1, name="a")])
    assert kv.data["blueprints/shop"] == theirs
    assert "rollouts/org.demo:a" not in kv.data  # withdrawn
    assert "blueprint shop changed meanwhile" in str(e.value)
    assert "nothing was changed: blueprint other was set back" in str(e.value)
    # and again, without the race: every blueprint goes over
    r = await svc.update("org.demo:a", "2.0.0")
    assert r.new_version == "2.0.0"
    assert {s.artifact for e in svc.list_blueprints() for s in e.blueprint.slices} == {A2}


async def test_an_undeploy_failing_part_way_sets_the_written_blueprints_back() -> None:
    """`undeploy` (and `scale` of a fixed artifact) change every blueprint listing it; when one kept
    changing, the ones before stayed changed and the error only said "try again"."""
    from aether.deploy.errors import BlueprintError

    before = {
        "blueprints/a-first": BlueprintValue([BlueprintSlice(A1, 1, name="a"),
                                              BlueprintSlice("org.demo:b:1.0.0", 1, name="b")]),
        "blueprints/b-second": BlueprintValue([BlueprintSlice(A1, 2, name="a")]),
    }  # fmt: skip
    kv = RacingKV(dict(before))
    kv.refuse["blueprints/b-second"] = 100  # someone keeps writing it
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    with pytest.raises(BlueprintError) as e:
        await svc.undeploy("org.demo:a")
    assert kv.data == before
    assert "blueprint b-second keeps changing" in str(e.value)
    assert "nothing was changed: blueprint a-first was set back" in str(e.value)


async def test_a_repeated_update_answers_the_running_rollout_and_refuses_other_settings() -> None:
    """The same update sent twice (a retry, a second click in Forge) was answered 201 "started"
    both times, and a repeat with other settings (a canary asked while a rolling update to that
    version ran) was answered with the rolling one as if it had been taken. Now the repeat says it
    started nothing, and other explicit settings are a 409 naming them."""
    kv = RacingKV({
        "blueprints/shop": BlueprintValue([BlueprintSlice(A1, 2, name="a")]),
        f"slices/node-1/{A1}": SliceStateValue("ACTIVE", 1.0, None, [0, 1]),
    })  # fmt: skip
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    first, started = await svc.update_started("org.demo:a", "2.0.0", strategy="canary", interval=5)
    assert started and first.strategy == "canary" and first.steps
    again, started = await svc.update_started("org.demo:a", "2.0.0", strategy="canary", interval=5.0)
    assert (again, started) == (first, False)
    plain, started = await svc.update_started("org.demo:a:2.0.0", "2.0.0")  # no settings: that rollout
    assert (plain, started) == (first, False)
    with pytest.raises(RolloutConflict) as e:
        await svc.update_started("org.demo:a", "2.0.0", strategy="rolling", max_surge=2)
    assert "already progressing with other settings" in str(e.value)
    assert "max_surge 2 (it runs with 1)" in str(e.value)
    assert "strategy 'rolling' (it runs with 'canary')" in str(e.value)
    assert kv.data["rollouts/org.demo:a"] == first  # the refusal changed nothing


async def test_a_slice_with_several_undefined_maps_is_refused_naming_them_all() -> None:
    """The refusal named the first undefined map only: a slice using three maps took three applies
    (or deploys) to learn which were missing. One missing map keeps its message."""
    from aether.core.maps import MapSpec
    from aether.deploy.errors import BlueprintError

    kv = FakeKV({"maps/defs/notes": MapSpec()})
    svc = DeploymentService(
        kv,
        dependencies_of=no_dependencies,
        resolve=any_artifact,  # type: ignore[arg-type]
        maps_of=lambda a: ["claims", "notes", "sessions"],
    )
    toml = 'id = "shop"\n[slices.a]\nartifact = "org.demo:a:1.0.0"\n'
    with pytest.raises(BlueprintError) as e:
        await svc.apply_blueprint(toml, "shop.toml")
    assert str(e.value) == (
        "shop.toml: org.demo:a:1.0.0 uses the distributed maps 'claims', 'sessions', which are not defined; "
        "define them first (`aether map create claims`; `aether map create sessions`), or add [maps.claims], "
        "[maps.sessions] sections to the blueprint that deploys org.demo:a:1.0.0"
    )
    with pytest.raises(BlueprintError) as e:
        await svc.apply_blueprint(toml + "[maps.sessions]\n", "shop.toml")
    assert str(e.value) == (
        "shop.toml: org.demo:a:1.0.0 uses the distributed map 'claims', which is not defined; define it "
        "first with `aether map create claims`, or add a [maps.claims] section to the blueprint that "
        "deploys org.demo:a:1.0.0"
    )
    assert sorted(kv.data) == ["maps/defs/notes"]  # nothing written


async def test_an_update_to_an_invalid_version_says_so_once() -> None:
    """Found with Forge's update control (`{"version": "nope"}`): the detail read "invalid version
    'nope': invalid version 'nope': expected MAJOR.MINOR.PATCH..."."""
    kv = RacingKV({"blueprints/shop": BlueprintValue([BlueprintSlice(A1, 2, name="a")])})
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    with pytest.raises(BlueprintError) as e:
        await svc.update("org.demo:a", "nope")
    assert str(e.value).count("invalid version") == 1, str(e.value)
    assert "expected MAJOR.MINOR.PATCH" in str(e.value)
