"""What `/readyz` (and `/api/v1/health`) say on a node that is not a member, on REAL processes.

Found walking docs/operations.md: a node started with `--join` answered `no quorum: 1 of 4 members
up, a majority is needed` while it waited for `aether cluster add-node` (it counted itself among
the members, and the members it reached as down: they refuse a non-member's hello), and a node
removed with `aether cluster remove-node` answered `no quorum: 3 of 3 members up, a majority is
needed`. Both now say what they are and what to do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import http_json
from test_membership_process import GrowingCluster, _cli

pytestmark = pytest.mark.timeout(150)


def _unready_reason(c: GrowingCluster, i: int, needle: str, timeout: float = 20.0) -> dict[str, Any]:
    """The 503 answer of node i's /readyz once its reason contains `needle`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        c.check_alive()
        try:
            status, body = http_json(c.management_ports[i], "GET", "/readyz", timeout=2)
        except OSError:
            status, body = 0, None
        last = (status, body)
        if status == 503 and needle in str(body.get("reason")):
            return dict(body)
        time.sleep(0.1)
    raise AssertionError(f"/readyz of {c.ids[i]} never said {needle!r}: last {last}\n{c.logs_report()}")


def test_readyz_of_a_joining_and_of_a_removed_node_says_so(tmp_path: Path) -> None:
    c = GrowingCluster(4, tmp_path / "grow", initial=3)
    try:
        for i in range(3):
            c.start(i)
        c.wait_quorum(30, nodes=[0, 1, 2])

        # node-4 started with --join waits for add-node: not ready, and the reason says why
        c.start(3)
        doc = _unready_reason(c, 3, "joining")
        assert doc["reason"].startswith(f"node-4 is joining through {c.address(0)}"), doc
        assert "aether cluster add-node node-4" in doc["reason"] and "no quorum" not in doc["reason"]
        assert doc["quorum"] is False and doc["detail"] == doc["reason"]
        # `aether status` on it says it is joining; it used to list itself as a member, up, and
        # the members (which refuse its hello until they add it) as down
        r = _cli(c, 3, "--json", "status")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["not_member"] == doc["reason"], st
        assert [(m["id"], m["state"]) for m in st["nodes"]] == [
            ("node-1", "unknown"), ("node-2", "unknown"), ("node-3", "unknown")
        ], st["nodes"]
        r = _cli(c, 3, "--json", "nodes")
        assert r.returncode == 0, r.stderr
        assert [(m["id"], m["state"]) for m in json.loads(r.stdout)] == [
            ("node-1", "unknown"), ("node-2", "unknown"), ("node-3", "unknown")
        ], r.stdout
        r = _cli(c, 3, "status")
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())  # rich wraps the long line
        assert "Not a member: node-4 is joining through" in text, r.stdout
        assert "down" not in r.stdout and "node-4 │" not in r.stdout and "nodes up" not in r.stdout, r.stdout

        r = _cli(c, 0, "cluster", "add-node", "node-4", c.address(3))
        assert r.returncode == 0, r.stdout + r.stderr
        c.wait_quorum(30)
        assert http_json(c.management_ports[3], "GET", "/readyz")[0] == 200

        # node-3 removed (its process still runs): not ready, and not "no quorum: 3 of 3 up"
        r = _cli(c, 0, "cluster", "remove-node", "node-3")
        assert r.returncode == 0, r.stdout + r.stderr
        doc = _unready_reason(c, 2, "not a member")
        assert doc["reason"] == (
            "node-3 is not a member of the cluster (members: node-1, node-2, node-4): add it with "
            "`aether cluster add-node node-3 HOST:PORT`, or stop it if it was removed"
        ), doc
        r = _cli(c, 2, "--json", "status")
        assert r.returncode == 0 and json.loads(r.stdout)["not_member"] == doc["reason"], r.stdout
        # the members' own probes are unchanged
        for i in (0, 1, 3):
            assert http_json(c.management_ports[i], "GET", "/readyz")[0] == 200
    finally:
        c.close()
