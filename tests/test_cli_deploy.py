"""Deployment operations end to end: the `aether` CLI and the management API against real node
processes (blueprint apply --wait, slices, deploy, scale, undeploy, blueprint list/show/delete,
invoke, FAILED reasons, bad input)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLES, deploy_hello_examples

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


BROKEN = """
from aether.slices import Slice, entry


class Broken(Slice):
    async def start(self) -> None:
        raise RuntimeError("database password missing")

    @entry
    async def ping(self) -> str:
        return "pong"
"""


def aether(addr: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aether.cli.main", "--connect", addr, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def api(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def slices(addr: str) -> dict[str, Any]:
    out = aether(addr, "slices", "--json")
    assert out.returncode == 0, out.stderr
    return {s["artifact"]: s for s in json.loads(out.stdout)}


def until(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_deployment_commands_end_to_end(make_process_cluster: Any, tmp_path: Path) -> None:
    c = make_process_cluster(3, start=False)
    deploy_hello_examples(
        c.repository, tmp_path / "wheels", extra={"org.example:broken:0.1.0": (BROKEN, "Broken")}
    )
    c.start_all()
    c.wait_quorum(30)
    addr = f"127.0.0.1:{c.management_ports[1]}"  # any node serves deployment operations

    # apply the example blueprint and wait for every instance
    out = aether(addr, "blueprint", "apply", str(EXAMPLES / "hello.blueprint"), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every instance is ACTIVE" in out.stdout
    s = slices(addr)
    assert s["org.example:hello:0.1.0"]["active"] == 2 and s["org.example:greeter:0.1.0"]["active"] == 1
    inst = s["org.example:hello:0.1.0"]["instances"][0]
    assert set(inst) >= {"node", "state", "reason"} and inst["state"] == "ACTIVE"

    # list / show
    out = aether(addr, "blueprint", "list", "--json")
    assert out.returncode == 0 and [b["id"] for b in json.loads(out.stdout)] == ["hello:0.1.0"]
    out = aether(addr, "blueprint", "show", "hello:0.1.0")
    assert out.returncode == 0 and "org.example:greeter:0.1.0" in out.stdout
    out = aether(addr, "blueprint", "show", "nope")
    assert out.returncode == 1 and "no blueprint 'nope'" in out.stderr

    # call an entry through the management API (greeter calls hello through the runtime)
    status, body = api(
        c.management_ports[2], "POST", "/api/v1/invoke/org.example:greeter/welcome", {"name": "Ann"}
    )
    assert status == 200 and body["text"] == "Welcome! Hello, Ann!", body

    # a slice whose start raises: --wait fails with the reason, and `slices` shows it
    out = aether(addr, "deploy", "org.example:broken:0.1.0", "-n", "1", "--wait", "--wait-timeout", "30")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED" in out.stderr and "database password missing" in out.stderr
    assert re.search(r"`aether logs node-\d --since 5m`", out.stderr), out.stderr  # the failed node's log
    # (the cluster places a failed instance again elsewhere at once, where it fails the same way:
    # a read right after --wait could find every instance loading again, so poll for a FAILED one)
    until(
        lambda: any(
            i["state"] == "FAILED" and "database password missing" in (i["reason"] or "")
            for i in slices(addr)["org.example:broken:0.1.0"]["instances"]
        ),
        30,
        "slices shows the broken instance FAILED with its reason",
    )
    out = aether(addr, "undeploy", "org.example:broken:0.1.0")
    assert out.returncode == 0, out.stderr
    until(lambda: "org.example:broken:0.1.0" not in slices(addr), 30, "broken slice removed")

    # scale up, then undeploy greeter: its route goes away with its last instance
    out = aether(addr, "scale", "org.example:hello:0.1.0", "-n", "3")
    assert out.returncode == 0, out.stderr
    until(lambda: slices(addr)["org.example:hello:0.1.0"]["active"] == 3, 30, "hello scaled to 3")
    assert len({i["node"] for i in slices(addr)["org.example:hello:0.1.0"]["instances"]}) == 3
    out = aether(addr, "undeploy", "org.example:greeter")
    assert out.returncode == 0, out.stderr
    until(lambda: "org.example:greeter:0.1.0" not in slices(addr), 30, "greeter undeployed")
    until(lambda: not c.kv(0, "routes/POST:/greeter"), 10, "greeter route removed")
    assert c.kv(0, "routes/GET:/hello")  # hello still serves its route

    # delete the blueprint: everything goes
    out = aether(addr, "blueprint", "delete", "hello:0.1.0")
    assert out.returncode == 0, out.stderr
    until(lambda: slices(addr) == {}, 30, "all slices undeployed")
    until(lambda: not c.kv(0, "routes/"), 10, "all routes removed")
    until(lambda: not c.kv(0, "endpoints/"), 10, "all endpoints removed")


def test_deployment_api_rejects_bad_input(make_process_cluster: Any, tmp_path: Path) -> None:
    c = make_process_cluster(3, start=False)
    deploy_hello_examples(
        c.repository, tmp_path / "wheels", extra={"org.example:broken:0.1.0": (BROKEN, "Broken")}
    )
    c.start_all()
    c.wait_quorum(30)
    port = c.management_ports[0]
    cases: list[tuple[str, str, Any, bytes | None, int, str]] = [
        ("POST", "/api/v1/deploy", None, b"{not json", 400, "not valid JSON"),
        (
            "POST",
            "/api/v1/deploy",
            {"artifact": "nonsense", "instances": 1},
            None,
            400,
            "GROUP:ARTIFACT:VERSION",
        ),
        (
            "POST",
            "/api/v1/deploy",
            {"artifact": "org.example:hello:0.1.0", "instances": 0},
            None,
            400,
            ">= 1",
        ),
        (
            "POST",
            "/api/v1/deploy",
            {"artifact": "org.example:hello:0.1.0", "instances": "two"},
            None,
            400,
            "instances",
        ),
        ("POST", "/api/v1/deploy", {"artifact": "org.example:hello:0.1.0", "bogus": 1}, None, 400, "bogus"),
        (
            "POST",
            "/api/v1/blueprints",
            {"toml": 'id = "x"\n[slices.a]\nartifact = "g:a:1.0.0"\ncolor = 1\n'},
            None,
            400,
            "color",
        ),
        ("POST", "/api/v1/blueprints", {"toml": 'id = "x"\n[slices.a\n'}, None, 400, "<blueprint>:2:"),
        (
            "POST",
            "/api/v1/blueprints",
            {"toml": 'id = "x"\n[slices.a]\nartifact = "org.none:a:1.0.0"\n'},
            None,
            400,
            "org.none:a",
        ),
        ("GET", "/api/v1/blueprints/missing", None, None, 404, "missing"),
        (
            "POST",
            "/api/v1/scale",
            {"artifact": "org.example:nothing:1.0.0", "instances": 2},
            None,
            400,
            "nothing",
        ),
        ("POST", "/api/v1/invoke/org.example:hello/greet?timeout=abc", {}, None, 400, "timeout"),
        # not deployed anywhere: 404 at once (issue 11: it used to wait the deadline, then 503)
        ("POST", "/api/v1/invoke/org.example:nothing/greet", {}, None, 404, "is not deployed"),
    ]
    for method, path, body, raw, want, text in cases:
        status, doc = api(port, method, path, body, raw)
        assert status == want, (method, path, body, raw, status, doc)
        assert doc["status"] == want and text in doc["detail"], (path, doc)
    # the node still works after all that
    status, _ = api(port, "POST", "/api/v1/deploy", {"artifact": "org.example:hello:0.1.0", "instances": 1})
    assert status == 201
    until(
        lambda: slices(f"127.0.0.1:{port}").get("org.example:hello:0.1.0", {}).get("active") == 1,
        30,
        "hello deployed after the bad requests",
    )


COUNTER = """
from aether.slices import Slice, entry


class Counter(Slice):
    async def start(self) -> None:
        self.counts = self.map("counts", int)

    @entry
    async def hit(self, name: str) -> int:
        return await self.counts.update(name, lambda c: (c or 0) + 1)
"""

UNDECLARED = """
from aether.slices import Slice, entry


class Undeclared(Slice):
    async def start(self) -> None:
        self.other = self.map("other", int)   # not declared in aether-slice.toml

    @entry
    async def ping(self) -> str:
        return "pong"
"""


def test_deploy_fails_while_a_slice_map_is_undefined(make_process_cluster: Any, tmp_path: Path) -> None:
    """Issue 11: a slice whose map is undefined was deployed, went ACTIVE, and every call failed."""
    from aether.slices.repository import Repository
    from aether.slices.testing import build_slice_wheel

    c = make_process_cluster(1, start=False)
    repo = Repository(c.repository)
    wheels = tmp_path / "wheels"
    repo.deploy(build_slice_wheel(
        wheels, "org.t:counter:1.0.0", COUNTER, "Counter",
        extra_files={"counter_slice/aether-slice.toml": 'maps = ["counts"]\n'},
    ))
    repo.deploy(build_slice_wheel(wheels, "org.t:undeclared:1.0.0", UNDECLARED, "Undeclared"))
    c.start_all()
    c.wait_quorum(30)
    addr = f"127.0.0.1:{c.management_ports[0]}"

    # declared map, not defined: the deploy is refused with the fix, nothing is stored
    r = aether(addr, "deploy", "org.t:counter:1.0.0")
    assert r.returncode == 1, r.stdout
    assert "org.t:counter:1.0.0 uses the distributed map 'counts', which is not defined" in r.stderr
    assert "`aether map create counts`" in r.stderr and "[maps.counts]" in r.stderr
    assert slices(addr) == {}
    bp = tmp_path / "counter.blueprint"
    bp.write_text('id = "counter:1"\n[slices.counter]\nartifact = "org.t:counter:1.0.0"\n')
    r = aether(addr, "blueprint", "apply", str(bp))
    assert r.returncode == 1 and "[maps.counts]" in r.stderr, r.stderr

    # the fix the message gives works: define it in the blueprint
    bp.write_text(bp.read_text() + "[maps.counts]\nreplicas = 1\nwrite_quorum = 1\n")
    r = aether(addr, "blueprint", "apply", str(bp), "--wait", "--wait-timeout", "60")
    assert r.returncode == 0, r.stderr
    status, body = api(c.management_ports[0], "POST", "/api/v1/invoke/org.t:counter/hit", {"name": "a"})
    assert (status, body) == (200, 1), body

    # an undeclared map is caught when the instance starts: FAILED with the fix, not ACTIVE
    r = aether(addr, "deploy", "org.t:undeclared:1.0.0", "--wait", "--wait-timeout", "60")
    assert r.returncode == 1, r.stdout
    assert "map 'other' is not defined" in r.stderr and "aether map create other" in r.stderr
    assert slices(addr)["org.t:undeclared:1.0.0"]["active"] == 0

    # an artifact that is not there: the error names the repository it looked in
    r = aether(addr, "deploy", "org.t:nothing:1.0.0")
    assert r.returncode == 1
    assert f"not found in the repository {c.repository}" in r.stderr, r.stderr
    assert "upload it to the cluster with `aether artifact deploy WHEEL`" in r.stderr, r.stderr


def test_the_slices_table_names_its_instance_column_as_ids() -> None:
    """The column lists instance ids (``0``, ``1,3``), not a count: headed "Instances" a row
    reading ``node-1 ACTIVE 0`` looked like a node running none."""
    from rich.console import Console

    from aether.cli.deploy import _slice_rows

    statuses = [
        {
            "artifact": "org.example:hello:0.1.0",
            "desired": 3,
            "active": 3,
            "instances": [
                {"node": "node-1", "state": "ACTIVE", "instance_ids": [0]},
                {"node": "node-2", "state": "ACTIVE", "instance_ids": [1, 2]},
            ],
        }
    ]
    console = Console(width=200, record=True, color_system=None)
    console.print(_slice_rows(statuses))
    text = console.export_text()
    assert "Instance ids" in text
    assert any("node-2" in line and "1,2" in line for line in text.splitlines()), text


def test_the_slices_table_shows_a_reason_with_brackets_as_it_is() -> None:
    """Found walking docs/slices.md: a rejected config's reason quotes `[slices.NAME.config]`,
    which the table printed as Rich markup: "(its  table in the blueprint)"."""
    from rich.console import Console

    from aether.cli.deploy import _slice_rows
    from aether.cli.rollout import _table

    reason = "does not fit CalcConfig (its [slices.NAME.config] table in the blueprint); [bold]x[/bold]"
    statuses = [
        {
            "artifact": "org.walk:calc:0.1.0",
            "desired": 1,
            "active": 1,
            "instances": [{"node": "node-1", "state": "ACTIVE", "instance_ids": [0], "reason": reason}],
        }
    ]
    rollout = {
        "artifact": "org.walk:calc", "old_version": "0.1.0", "new_version": "0.2.0", "strategy": "rolling",
        "state": "ROLLED_BACK", "step": 0, "steps": [], "old_instances": 1, "new_instances": 0,
        "weights": {}, "reason": reason,
    }  # fmt: skip
    for table in (_slice_rows(statuses), _table([rollout])):
        console = Console(width=400, record=True, color_system=None)
        console.print(table)
        assert reason in console.export_text()
