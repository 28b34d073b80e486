"""The cluster's artifact repository on real `aether node` processes with separate repository
directories (docs/repository.md): a wheel uploaded through one node runs on every node, and a node
that lost its directory gets the wheel from the cluster again when it restarts."""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aether.slices.testing import build_slice_wheel
from conftest import EXAMPLES, ProcessCluster, http_json

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HELLO = "org.example:hello:0.1.0"


class OwnDirectories(ProcessCluster):
    """A process cluster whose nodes share no repository directory."""

    def repo(self, i: int) -> Path:
        return self.base_dir / self.ids[i] / "repository"

    def command(self, i: int) -> list[str]:
        return [*super().command(i), "--repository", str(self.repo(i))]


def _active(c: ProcessCluster) -> int:
    status, slices = http_json(c.management_ports[0], "GET", "/api/v1/slices")
    return sum(s["active"] for s in slices if s["artifact"] == HELLO) if status == 200 else -1


def _upload(c: ProcessCluster, wheel: Path) -> None:
    """PUT `wheel` into the cluster's repository through node-1: 201, stored."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{c.management_ports[0]}/api/v1/repository/files/{wheel.name}",
        data=wheel.read_bytes(),
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 201


def _wait(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def test_upload_once_run_everywhere_and_refetch_after_a_lost_directory(tmp_path: Path) -> None:
    source = (EXAMPLES / "hello-slice" / "hello_slice" / "__init__.py").read_text()
    wheel = build_slice_wheel(tmp_path / "w", HELLO, source, "Hello", module="hello_slice")
    c = OwnDirectories(3, tmp_path / "cluster")
    try:
        c.start_all()
        c.wait_quorum(30)
        _upload(c, wheel)
        # deploy through another node: it expands the blueprint from the cluster's manifests
        status, doc = http_json(
            c.management_ports[1], "POST", "/api/v1/deploy", {"artifact": HELLO, "instances": 3}
        )
        assert status in (200, 201), doc
        _wait(lambda: _active(c) == 3, 60, "3 ACTIVE instances")
        for i in range(3):
            cached = c.repo(i) / "org" / "example" / "hello" / "0.1.0" / wheel.name
            assert cached.read_bytes() == wheel.read_bytes(), c.ids[i]
        # node-3 loses its directory (and its process): restarted, it fetches the wheel again
        c.kill9(2)
        shutil.rmtree(c.repo(2))
        c.start(2)
        c.wait_quorum(30)
        _wait(
            lambda: (c.repo(2) / "org" / "example" / "hello" / "0.1.0" / wheel.name).is_file(),
            60,
            "refetched",
        )
        _wait(lambda: _active(c) == 3, 60, "3 ACTIVE instances after the restart")

        def node3_serves() -> bool:
            # (node-3 back after the down grace: its instance went to another node meanwhile, and
            # comes back with the spread rule's move; seen once in a clean-clone run)
            status, slices = http_json(c.management_ports[2], "GET", "/api/v1/slices")
            states = {x["node"]: x["state"] for s in slices for x in s["instances"]} if status == 200 else {}
            return states.get("node-3") == "ACTIVE"

        _wait(node3_serves, 60, "node-3's instance ACTIVE again, from the refetched wheel")
    finally:
        c.close()


def _manifests(c: ProcessCluster, i: int) -> list[str] | None:
    status, doc = http_json(c.management_ports[i], "GET", "/api/v1/repository/artifacts")
    return [f"{m['project']} {m['version']}" for m in doc] if status == 200 else None


def test_a_deleted_version_stays_deleted_when_nodes_that_fetched_it_restart(tmp_path: Path) -> None:
    """Seen: every node that had fetched a slice's wheel kept it in its directory after the version
    was deleted, and at start-up published its directory's wheels the cluster lacked: a node that
    restarted after the delete (here node-3, down while it happened) put the deleted version back
    (its manifest and chunks), resolvable and deployable again. Now a delete leaves a tombstone:
    a node drops its copy of a deleted version (node-2 at once, node-3 when it starts) and
    publishes nothing the cluster deleted."""
    source = (EXAMPLES / "hello-slice" / "hello_slice" / "__init__.py").read_text()
    wheel = build_slice_wheel(tmp_path / "w", HELLO, source, "Hello", module="hello_slice")
    c = OwnDirectories(3, tmp_path / "cluster")

    def cached(i: int) -> Path:
        return c.repo(i) / "org" / "example" / "hello" / "0.1.0" / wheel.name

    try:
        started = time.monotonic()
        c.start_all()
        c.wait_quorum(30)
        # past every node's first start-up publishing (node-3's: 5 s after it starts), so that
        # only the restart below can publish anything
        time.sleep(max(0.0, started + 6.5 - time.monotonic()))
        _upload(c, wheel)
        status, doc = http_json(
            c.management_ports[0], "POST", "/api/v1/deploy", {"artifact": HELLO, "instances": 3}
        )
        assert status in (200, 201), doc
        _wait(lambda: all(cached(i).is_file() for i in range(3)), 60, "every node fetched the wheel")
        status, doc = http_json(c.management_ports[0], "POST", "/api/v1/undeploy", {"artifact": HELLO})
        assert status == 200, doc
        _wait(lambda: _active(c) == 0, 60, "undeployed")
        c.stop(2)  # node-3 is down while the version is deleted
        status, doc = http_json(c.management_ports[0], "DELETE", "/api/v1/repository/artifacts/hello/0.1.0")
        assert status == 200, doc
        assert _manifests(c, 0) == []
        # node-2 was up: it drops its copy (the deleting node-1 always did)
        _wait(lambda: not cached(1).exists(), 20, "node-2 dropped its copy of the deleted version")
        assert not cached(0).exists()
        assert cached(2).is_file()  # node-3 was down: its copy is still there
        c.start(2)
        c.wait_quorum(30)
        # node-3 publishes its directory 1 + 2*2 s after it starts: it either puts the deleted
        # version back (the bug) or drops its copy
        _wait(
            lambda: not cached(2).exists() or bool(_manifests(c, 0)),
            60,
            "node-3 dropped its copy or published it",
        )
        time.sleep(3)  # anything published late shows by now
        for i in range(3):
            assert _manifests(c, i) == [], c.ids[i]
        assert not cached(2).exists()
        # the version can still be uploaded again on purpose (an explicit upload is not refused)
        _upload(c, wheel)
        _wait(lambda: _manifests(c, 2) == ["hello 0.1.0"], 10, "the new upload seen by node-3")
    finally:
        c.close()
