"""Operator commands on autoscaled artifacts (`DeploymentService.scale_to`): a pin, bounds (the count
kept, clamped), `auto` clearing them; fixed artifacts keep today's behaviour; the admission check
counts the `scale/` values."""

from __future__ import annotations

from typing import Any

import pytest

from aether.deploy.admission import InstanceLimits
from aether.deploy.blueprint import any_artifact, no_dependencies
from aether.deploy.errors import AdmissionRejected, BlueprintError
from aether.deploy.operations import DeploymentService
from aether.deploy.reconcile import autoscaled
from aether.kv.keys import BlueprintSlice, BlueprintValue, ScaleValue, ScalingRule
from controller_fakes import FakeKV

pytestmark = pytest.mark.timeout(10)

A = "org.demo:a:1.0.0"
B = "org.demo:b:1.0.0"
RULE = ScalingRule(min=2, max=8, in_flight=4.0)


def service(data: dict[str, Any] | None = None, limits: InstanceLimits | None = None) -> DeploymentService:
    bp = BlueprintValue([BlueprintSlice(A, 3, scaling=RULE, name="a"), BlueprintSlice(B, 1, name="b")])
    kv = FakeKV({"blueprints/x": bp, **(data or {})})
    return DeploymentService(kv, dependencies_of=lambda a: {}, resolve=lambda p: None,  # type: ignore[arg-type]
                             limits=limits, members=3)


def scale_of(svc: DeploymentService) -> ScaleValue:
    v = svc.kv.get_local(f"scale/{A}")
    assert isinstance(v, ScaleValue)
    return v


async def test_pin_sets_count_and_both_bounds() -> None:
    svc = service()
    out = await svc.scale_to(A, 5, now=10.0)
    assert out.blueprints == []
    (b,) = out.autoscaled
    assert (b.instances, b.min, b.max, b.bounds_source, b.count_source) == (5, 5, 5, "operator", "operator")
    assert scale_of(svc) == ScaleValue(5, "operator", 10.0, "pinned at 5 by the operator", 5, 5)
    # the plain `scale` pins too; the blueprint's own count is untouched
    assert await svc.scale("org.demo:a", 4) == []
    assert scale_of(svc).instances == 4
    assert svc.get_blueprint("x").slices[0].instances == 3  # type: ignore[union-attr]


async def test_bounds_keep_the_count_clamped_and_auto_clears_them() -> None:
    svc = service({f"scale/{A}": ScaleValue(7, "controller", 1.0, "load", None, None)})
    out = await svc.scale_to(A, min=2, max=5, now=10.0)
    (b,) = out.autoscaled
    assert (b.instances, b.min, b.max, b.bounds_source, b.count_source) == (5, 2, 5, "operator", "operator")
    # only --min: the operator's max stays; the count (5) is within: kept with its source
    await svc.kv.put(f"scale/{A}", ScaleValue(4, "controller", 2.0, "load", 2, 5))
    out = await svc.scale_to(A, min=3, now=11.0)
    assert scale_of(svc) == ScaleValue(4, "controller", 11.0, "bounds 3..5 set by the operator", 3, 5)
    # a count with bounds must be within them
    with pytest.raises(BlueprintError, match=r"outside the bounds 3\.\.5"):
        await svc.scale_to(A, 6, min=3, max=5)
    # min above the blueprint's max
    with pytest.raises(BlueprintError, match="min 9 would be above max 5"):
        await svc.scale_to(A, min=9)
    out = await svc.scale_to(A, auto=True, now=12.0)
    v = scale_of(svc)
    assert (v.instances, v.source, v.min, v.max) == (4, "controller", None, None)
    (b,) = out.autoscaled
    assert (b.min, b.max, b.bounds_source) == (2, 8, "blueprint")
    # auto again: nothing to clear, nothing written
    calls = len(svc.kv.cas_calls)  # type: ignore[attr-defined]
    await svc.scale_to(A, auto=True)
    assert len(svc.kv.cas_calls) == calls  # type: ignore[attr-defined]


async def test_fixed_artifacts_keep_todays_behaviour_and_refuse_bounds() -> None:
    svc = service()
    out = await svc.scale_to(B, 3)
    assert out.blueprints == ["x"] and out.autoscaled == []
    assert [s.instances for s in svc.get_blueprint("x").slices] == [3, 3]  # type: ignore[union-attr]
    with pytest.raises(BlueprintError, match=r"has no \[slices\.NAME\.scaling\] rule"):
        await svc.scale_to(B, min=1, max=4)
    for kwargs, msg in (({}, "give an instance count"), ({"auto": True, "min": 2}, "give it alone"),
                        ({"min": 5, "max": 2}, "min 5 is above max 2"), ({"instances": 0}, ">= 1")):
        with pytest.raises(BlueprintError, match=msg):
            await svc.scale_to(A, **kwargs)
    with pytest.raises(BlueprintError, match="not deployed"):
        await svc.scale_to("org.demo:none:1.0.0", 2)


async def test_admission_and_status_count_the_scale_values() -> None:
    limits = InstanceLimits(per_node=100, per_cluster=10)
    svc = service({f"scale/{A}": ScaleValue(6, "controller", 1.0)}, limits)
    assert {s.artifact: s.desired for s in svc.slices_status()} == {A: 6, B: 1}
    with pytest.raises(AdmissionRejected, match="12 slice instances"):
        await svc.scale_to(A, 11, min=1, max=11)  # 11 + 1 over the cluster's 10
    await svc.scale_to(A, 9)  # 9 + 1: admitted
    bps = [e.blueprint for e in svc.list_blueprints()]
    assert autoscaled(bps, svc.scales())[A].instances == 9


class DeployNode:
    node_id = "node-1"

    def __init__(self, svc: DeploymentService) -> None:
        self.deployments = svc

    def status(self) -> Any:
        from aether.core.status import NodeStatus

        return NodeStatus(node_id="node-1", leader="node-1", quorum=True, nodes=[])

    def kv_list(self, prefix: str) -> list[Any]:
        return []


async def test_api_and_cli_scale_with_bounds() -> None:
    import asyncio
    import json

    import aiohttp
    from click.testing import CliRunner

    from aether.api.server import ManagementServer
    from aether.cli.main import main

    svc = service()
    srv = ManagementServer(DeployNode(svc), host="127.0.0.1", port=0)
    await srv.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{srv.url}/api/v1/scale", json={"artifact": A, "min": 2, "max": 6}) as r:
                assert r.status == 200, await r.text()
                doc = await r.json()
            assert doc["instances"] is None and doc["blueprints"] == []
            assert doc["autoscaled"][0] | {"artifact": A} == {
                "artifact": A, "instances": 3, "min": 2, "max": 6, "bounds_source": "operator",
                "count_source": "blueprint"}
            async with s.post(f"{srv.url}/api/v1/scale", json={"artifact": B, "max": 3}) as r:
                assert r.status == 400 and "no [slices.NAME.scaling] rule" in (await r.json())["detail"]
            async with s.post(f"{srv.url}/api/v1/scale", json={"artifact": A}) as r:
                assert r.status == 400 and "give an instance count" in (await r.json())["detail"]

        def cli(*args: str) -> Any:
            return CliRunner().invoke(main, ["--connect", srv.url.removeprefix("http://"), *args])

        r = await asyncio.to_thread(cli, "scale", A, "4")
        assert r.exit_code == 0, r.output
        assert "pinned at 4 instance(s)" in r.output and "bounds 4..4 (operator)" in r.output
        r = await asyncio.to_thread(cli, "scale", A, "--auto", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["autoscaled"][0]["bounds_source"] == "blueprint"
        r = await asyncio.to_thread(cli, "scale", B, "-n", "2")
        assert r.exit_code == 0 and "Scaling org.demo:b:1.0.0 to 2 instance(s) (blueprints: x)" in r.output
        r = await asyncio.to_thread(cli, "scale", A)
        assert r.exit_code == 2 and "give an instance count N" in r.output
        r = await asyncio.to_thread(cli, "scale", A, "--auto", "--min", "2")
        assert r.exit_code == 2 and "give it alone" in r.output
    finally:
        await srv.stop()


async def test_waiting_for_an_unknown_blueprint_is_a_404_as_the_route_declares() -> None:
    """`POST /api/v1/blueprints/{id}/wait` declares 404 for no such blueprint; the service raised a
    BlueprintError, which answers 400 (a bad request) instead."""
    from aether.core.problem import problem_for
    from aether.deploy.errors import BlueprintNotFound

    svc = service()

    async def get(key: Any, timeout: float = 5.0) -> Any:  # the read through consensus
        return svc.kv.get_local(key)

    svc.kv.get = get  # type: ignore[attr-defined]
    with pytest.raises(BlueprintNotFound, match="no blueprint 'nope'") as e:
        await svc.wait_converged("nope", timeout=1)
    assert problem_for(e.value).status == 404


class Store(FakeKV):
    """The in-memory store with the reads through consensus and the removal the service uses."""

    async def get(self, key: Any, timeout: float = 5.0) -> Any:
        return self.get_local(key)

    async def remove(self, key: Any, timeout: float = 5.0) -> bool:
        existed = str(key) in self.data
        self._set(str(key), None)
        return existed


AUTOSCALED = (
    'id = "x"\n[slices.a]\nartifact = "org.demo:a:1.0.0"\n'
    "[slices.a.scaling]\nmin = 2\nmax = 8\nin_flight = 4.0\n"
)


def bounds(svc: DeploymentService) -> tuple[int, int, int, str, str]:
    a = autoscaled([e.blueprint for e in svc.list_blueprints()], svc.scales())[A]
    return a.instances, a.min, a.max, a.bounds_source, a.count_source


async def test_a_deleted_blueprint_applied_again_starts_from_its_own_count_not_an_old_pin() -> None:
    """`scale/{artifact}` outlived the blueprint: an operator's pin (min = max = 6) or the
    controller's count came back with a blueprint deleted and applied again, weeks later too. As
    deleting a Kubernetes Deployment forgets its scale, deleting the blueprint (or undeploying the
    artifact) now removes the `scale/` values of what no other blueprint autoscales."""
    kv = Store()
    svc = DeploymentService(kv, dependencies_of=no_dependencies, resolve=any_artifact)  # type: ignore[arg-type]
    await svc.apply_blueprint(AUTOSCALED, "x.toml")
    await svc.scale_to(A, 6, now=1.0)
    assert bounds(svc) == (6, 6, 6, "operator", "operator")
    assert await svc.delete_blueprint("x")
    assert f"scale/{A}" not in kv.data
    await svc.apply_blueprint(AUTOSCALED, "x.toml")
    assert bounds(svc) == (2, 2, 8, "blueprint", "blueprint")
    # undeploy forgets it too
    await svc.scale_to(A, min=3, max=5, now=2.0)
    await svc.undeploy("org.demo:a")
    assert svc.scales() == {}
    # another blueprint still autoscaling the artifact keeps the value
    await svc.apply_blueprint(AUTOSCALED, "x.toml")
    await svc.apply_blueprint(AUTOSCALED.replace('id = "x"', 'id = "y"'), "y.toml")
    await svc.scale_to(A, 4, now=3.0)
    assert await svc.delete_blueprint("x")
    assert bounds(svc) == (4, 4, 4, "operator", "operator")
