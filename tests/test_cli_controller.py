"""`aether controller status|config|decisions` and `aether alerts` against a management server with
a controller over fakes (the CLI runs in a thread, the server on the test's loop)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from aether.api.server import ManagementServer
from aether.cli.main import main
from aether.controller.types import AlertState
from aether.kv.keys import BlueprintSlice, BlueprintValue, ScaleValue, ScalingRule
from controller_fakes import ControllerNode

pytestmark = pytest.mark.timeout(30)

A = "org.demo:a:1.0.0"


@pytest.fixture
async def served() -> AsyncIterator[tuple[ControllerNode, ManagementServer]]:
    bp = BlueprintValue([BlueprintSlice(A, 2, scaling=ScalingRule(min=1, max=8, in_flight=4.0))])
    n = ControllerNode({"blueprints/x": bp, f"scale/{A}": ScaleValue(3, "controller", 1.0)})
    await n.controller.start()
    srv = ManagementServer(n, host="127.0.0.1", port=0)
    await srv.start()
    try:
        yield n, srv
    finally:
        await srv.stop()
        await n.controller.stop()


async def cli(srv: ManagementServer, *args: str, input: str | None = None) -> Result:
    connect = srv.url.removeprefix("http://")
    return await asyncio.to_thread(
        CliRunner(env={"COLUMNS": "250"}).invoke, main, ["--connect", connect, *args], input=input,
        catch_exceptions=False,
    )


async def test_status_table_and_json(served: Any) -> None:
    n, srv = served
    n.plan = lambda obs: [{"kind": "scale_up", "artifact": A, "from_count": 3, "to_count": 5,
                           "reason": "in flight 18 per 3 instances, target 4"}]
    n.controller.tick()
    r = await cli(srv, "controller", "status")
    assert r.exit_code == 0, r.output
    assert "running on node-1" in r.output and A in r.output and "1..8 (blueprint)" in r.output
    assert "scale_up" in r.output and "Steps on this node: 1" in r.output
    r = await cli(srv, "--json", "controller", "status")
    assert json.loads(r.output)["artifacts"][0]["artifact"] == A


async def test_status_without_autoscaled_slices_names_the_rule_table() -> None:
    # the caption's "[slices.NAME.scaling]" was read as rich markup and dropped: "no slice has a  rule"
    n = ControllerNode({})
    await n.controller.start()
    srv = ManagementServer(n, host="127.0.0.1", port=0)
    await srv.start()
    try:
        r = await cli(srv, "controller", "status")
    finally:
        await srv.stop()
        await n.controller.stop()
    assert r.exit_code == 0, r.output
    assert "no slice has a [slices.NAME.scaling] rule" in r.output, r.output


async def test_config_show_and_set(served: Any, tmp_path: Path) -> None:
    n, srv = served
    r = await cli(srv, "controller", "config")
    assert r.exit_code == 0 and "no controller config set" in r.output
    good = tmp_path / "controller.toml"
    good.write_text("dry_run = true\n[scaling]\ntolerance = 0.2\n")
    r = await cli(srv, "controller", "config", "--set", str(good))
    assert r.exit_code == 0, r.output
    assert "Controller config set by anonymous (dry run: yes)" in r.output
    assert n.controller.config.scaling.tolerance == 0.2
    r = await cli(srv, "controller", "config")
    assert "tolerance = 0.2" in r.output and "by anonymous" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[scaling]\ntolerance = 3\n")
    r = await cli(srv, "controller", "config", "--set", str(bad))
    assert r.exit_code == 1 and "bad.toml" in r.output and "tolerance" in r.output
    assert "docs/controller.md" in r.output
    r = await cli(srv, "controller", "config", "--set", "-", input="[health]\nfailures = 5\n")
    assert r.exit_code == 0 and n.controller.config.health.failures == 5
    r = await cli(srv, "controller", "config", "--set", str(tmp_path / "missing.toml"))
    assert r.exit_code == 2 and "cannot read" in r.output


async def test_decisions_table_json_and_follow(served: Any) -> None:
    n, srv = served
    n.plan = lambda obs: [{"kind": "skip", "artifact": A, "rule": "cooldown", "reason": "cooling down"}]
    for _ in range(3):
        n.controller.tick()
    r = await cli(srv, "controller", "decisions", "--limit", "2")
    assert r.exit_code == 0 and "cooling down" in r.output and "Controller decisions" in r.output
    r = await cli(srv, "controller", "decisions", "--json", "--since", "1")
    assert [d["seq"] for d in json.loads(r.output)] == [2, 3]

    follow = asyncio.ensure_future(cli(srv, "controller", "decisions", "--follow", "--limit", "1"))
    await asyncio.sleep(1.0)
    n.plan = lambda obs: [
        {"kind": "scale_up", "artifact": A, "from_count": 3, "to_count": 4, "reason": "surge"}
    ]
    n.controller.tick()
    await asyncio.sleep(1.5)
    await srv.stop()  # ends the stream: the command says so and exits 3
    r = await asyncio.wait_for(follow, 20)
    assert "#3" in r.output and "#4" in r.output and "3 → 4" in r.output and "surge" in r.output
    assert r.exit_code == 3 and "lost the decision stream" in r.output


async def test_alerts(served: Any) -> None:
    n, srv = served
    r = await cli(srv, "alerts")
    assert r.exit_code == 0 and "no alert is pending or firing" in r.output
    await n.controller.set_config_text(
        '[[alerts]]\nname = "slow"\nmetric = "entry.p99_ms"\nthreshold = 100.0\nsummary = "calls are slow"\n'
    )
    n.controller.tick()
    n.cores[0].memory.alerts = {"slow{artifact=a}": AlertState("firing", 10.0, 150.0, {"artifact": "a"})}
    r = await cli(srv, "alerts")
    assert r.exit_code == 0, r.output
    assert "firing" in r.output and "entry.p99_ms > 100" in r.output and "calls are slow" in r.output
    r = await cli(srv, "alerts", "--json")
    assert json.loads(r.output)["firing"] == 1
