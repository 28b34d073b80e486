"""The fault injection endpoints (issue 16), in process: 403 when the node runs without
--fault-injection (reads still answer), 404 for an unknown peer or artifact, 400 naming a bad field,
a round trip when on, roles, the audit trail and the event stream."""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
import pytest

from aether.api.server import ManagementServer
from aether.core.artifact import Artifact
from aether.node.faults import DISABLED, FaultChanged, FaultInjector, LinkFault, SliceFault
from aether.slices.errors import NoLocalInstance
from test_api_ops import FakeNode

pytestmark = pytest.mark.timeout(30)

ART = "org.example:hello:0.1.0"
BLOCK = {"blocked": True}


class FakeLinks:
    """The transport's fault methods over a member list."""

    def __init__(self, node_id: str, members: list[str]) -> None:
        self.node_id = node_id
        self.members = members
        self.faults: dict[str, LinkFault] = {}

    def set_link_fault(self, peer: str, fault: LinkFault | None) -> None:
        if peer == self.node_id or peer not in self.members:
            raise KeyError(peer)
        if fault is None:
            self.faults.pop(peer, None)
        else:
            self.faults[peer] = fault

    def link_faults(self) -> dict[str, LinkFault]:
        return dict(self.faults)

    def clear_faults(self) -> None:
        self.faults.clear()


class FakeSlices:
    """The slice runtime's fault methods over {artifact: instance ids running here}."""

    def __init__(self, running: dict[str, list[int]]) -> None:
        self.running = {Artifact.parse(a): ids for a, ids in running.items()}
        self.faults_: dict[Artifact, tuple[SliceFault, list[int]]] = {}

    def inject_fault(self, artifact: Artifact, fault: SliceFault) -> list[int]:
        ids = self.running.get(artifact)
        if not ids:
            raise NoLocalInstance(f"no instance of {artifact}")
        self.faults_[artifact] = (fault, ids)
        return ids

    def clear_fault(self, artifact: Artifact) -> bool:
        return self.faults_.pop(artifact, None) is not None

    def faults(self) -> dict[Artifact, tuple[SliceFault, list[int]]]:
        return dict(self.faults_)


def fake_injector(node_id: str = "node-1", *, enabled: bool = True, publish: Any = None) -> FaultInjector:
    return FaultInjector(
        node_id, enabled=enabled, links=FakeLinks(node_id, ["node-1", "node-2", "node-3"]),
        slices=FakeSlices({ART: [0, 2]}), publish=publish,
    )


class FaultNode(FakeNode):
    def __init__(self, *, enabled: bool) -> None:
        super().__init__()
        self.faults = fake_injector(self.node_id, enabled=enabled, publish=self.bus.publish)


async def call(
    http: aiohttp.ClientSession, srv: ManagementServer, method: str, path: str, body: Any = None,
    key: str | None = None, raw: bytes | None = None,
) -> tuple[int, Any]:
    headers = {"X-API-Key": key} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
    async with http.request(method, f"{srv.url}{path}", json=body, data=raw, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_off_by_default_refuses_every_write_but_answers_reads() -> None:
    node = FaultNode(enabled=False)
    async with ManagementServer(node, host="127.0.0.1", port=0) as srv, aiohttp.ClientSession() as http:
        status, doc = await call(http, srv, "GET", "/api/v1/faults")
        assert status == 200
        assert doc == {"node_id": "node-1", "enabled": False, "links": {}, "slices": {}}
        for method, path, body in [
            ("PUT", "/api/v1/faults/links/node-2", {"blocked": True}),
            ("PUT", "/api/v1/faults/links/node-2", {"loss": 7}),  # 403 before looking at the body
            ("DELETE", "/api/v1/faults/links/node-2", None),
            ("PUT", f"/api/v1/faults/slices/{ART}", {}),
            ("DELETE", f"/api/v1/faults/slices/{ART}", None),
            ("DELETE", "/api/v1/faults", None),
            ("PUT", "/api/v1/faults/links/nobody", {}),
        ]:
            status, doc = await call(http, srv, method, path, body)
            assert status == 403, (method, path, doc)
            assert doc["detail"] == DISABLED
            assert "--fault-injection" in doc["detail"]
        assert node.faults.view().links == {}


async def test_round_trip_when_on(caplog: pytest.LogCaptureFixture) -> None:
    node = FaultNode(enabled=True)
    events: list[FaultChanged] = []
    node.bus.subscribe(FaultChanged, events.append)
    caplog.set_level(logging.WARNING)
    async with ManagementServer(node, host="127.0.0.1", port=0) as srv, aiohttp.ClientSession() as http:
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-2",
                                 {"delay_ms": 300, "jitter_ms": 20, "loss": 0.1})
        assert status == 200
        assert doc == {"delay_ms": 300.0, "jitter_ms": 20.0, "loss": 0.1, "blocked": False}
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-3", {"blocked": True})
        assert status == 200 and doc["blocked"] is True
        status, doc = await call(http, srv, "PUT", f"/api/v1/faults/slices/{ART}", {"delay_ms": 50})
        assert status == 200
        assert doc == {"error_rate": 1.0, "delay_ms": 50.0, "unhealthy": False, "instances": [0, 2]}
        status, doc = await call(http, srv, "GET", "/api/v1/faults")
        assert status == 200
        assert doc == {
            "node_id": "node-1", "enabled": True,
            "links": {
                "node-2": {"delay_ms": 300.0, "jitter_ms": 20.0, "loss": 0.1, "blocked": False},
                "node-3": {"delay_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0, "blocked": True},
            },
            "slices": {ART: {"error_rate": 1.0, "delay_ms": 50.0, "unhealthy": False, "instances": [0, 2]}},
        }
        status, doc = await call(http, srv, "DELETE", "/api/v1/faults/links/node-2")
        assert status == 200 and list(doc["links"]) == ["node-3"]
        status, doc = await call(http, srv, "DELETE", "/api/v1/faults/links/node-2")  # idempotent
        assert status == 200 and list(doc["links"]) == ["node-3"]
        status, doc = await call(http, srv, "DELETE", f"/api/v1/faults/slices/{ART}")
        assert status == 200 and doc["slices"] == {}
        await call(http, srv, "PUT", f"/api/v1/faults/slices/{ART}", {"unhealthy": True, "error_rate": 0})
        status, doc = await call(http, srv, "DELETE", "/api/v1/faults")
        assert status == 200 and doc["links"] == {} and doc["slices"] == {}
    # loud: every change logged at WARNING and published on the bus
    changes = [(e.action, e.target, e.peer, e.artifact) for e in events]
    assert changes == [
        ("set", "link", "node-2", None), ("set", "link", "node-3", None), ("set", "slice", None, ART),
        ("cleared", "link", "node-2", None), ("cleared", "slice", None, ART), ("set", "slice", None, ART),
        ("cleared", "all", None, None),
    ]
    assert events[0].fault == {"delay_ms": 300.0, "jitter_ms": 20.0, "loss": 0.1, "blocked": False}
    assert events[2].instances == [0, 2] and events[0].by == "anonymous"
    warnings = [
        r.getMessage() for r in caplog.records
        if r.levelno == logging.WARNING and "fault" in r.getMessage().lower()
    ]
    assert any("link to node-2: delay 300 ms ± 20 ms, loss 10%" in w for w in warnings), warnings
    assert any(f"{ART} instances [0, 2]" in w for w in warnings), warnings
    assert len(warnings) >= 7


async def test_unknown_peers_and_artifacts_are_404_and_bad_bodies_400() -> None:
    node = FaultNode(enabled=True)
    async with ManagementServer(node, host="127.0.0.1", port=0) as srv, aiohttp.ClientSession() as http:
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-9", {"blocked": True})
        assert status == 404 and "'node-9'" in doc["detail"] and "not a member" in doc["detail"]
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-1", {"blocked": True})
        assert status == 404 and "'node-1'" in doc["detail"] and "this node itself" in doc["detail"]
        status, doc = await call(http, srv, "DELETE", "/api/v1/faults/links/node-9")
        assert status == 404 and "node-9" in doc["detail"]
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/slices/org.example:other:1.0.0", {})
        assert status == 404 and "org.example:other:1.0.0" in doc["detail"]
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/slices/not-coordinates", {})
        assert status == 400
        for body, field in [({"loss": 1.5}, "loss"), ({"delay_ms": -3}, "delay_ms"),
                            ({"jitter_ms": "x"}, "jitter_ms"), ({"blocked": 1}, "blocked")]:
            status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-2", body)
            assert status == 400 and field in doc["detail"], (body, doc)
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-2", {"lossy": 1})
        assert status == 400 and "lossy" in doc["detail"]
        status, doc = await call(http, srv, "PUT", f"/api/v1/faults/slices/{ART}", {"error_rate": 2})
        assert status == 400 and "error_rate" in doc["detail"]
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-2", raw=b"{not json")
        assert status == 400
        status, doc = await call(http, srv, "GET", "/api/v1/faults?x=1")
        assert status == 400
        assert node.faults.view().links == {} and node.faults.view().slices == {}


async def test_writes_need_the_admin_role_and_are_audited() -> None:
    from test_api_roles import DictKV

    node = FaultNode(enabled=True)
    node.kv = DictKV()  # type: ignore[assignment]
    node.bus = None  # type: ignore[assignment]  # no event stream here (DictKV cannot watch)
    async with (
        ManagementServer(node, host="127.0.0.1", port=0, api_key="boot") as srv,
        aiohttp.ClientSession() as http,
    ):
        keys = {}
        for role in ("read", "operate"):
            status, doc = await call(
                http, srv, "POST", "/api/v1/keys", {"name": role, "role": role}, key="boot"
            )
            assert status == 201, doc
            keys[role] = doc["key"]
        for role, key in keys.items():
            status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-2", BLOCK, key=key)
            assert status == 403 and "'admin' role" in doc["detail"], (role, doc)
            status, _ = await call(http, srv, "GET", "/api/v1/faults", key=key)
            assert status == 200
        status, doc = await call(http, srv, "PUT", "/api/v1/faults/links/node-2", BLOCK, key="boot")
        assert status == 200
        status, audit = await call(http, srv, "GET", "/api/v1/audit", key="boot")
        entries = [e for e in audit if e["path"].startswith("/api/v1/faults")]
        assert [(e["key"], e["status"], e["target"]) for e in entries][-1] == ("bootstrap", 200, "node-2")


async def test_changes_appear_in_the_event_stream() -> None:
    node = FaultNode(enabled=True)
    async with (
        ManagementServer(node, host="127.0.0.1", port=0) as srv,
        aiohttp.ClientSession() as http,
        http.get(f"{srv.url}/api/v1/events") as stream,
    ):
        assert stream.status == 200
        hello = await stream.content.readline()
        assert hello.startswith(b"event: hello")
        await call(http, srv, "PUT", "/api/v1/faults/links/node-3", BLOCK)
        seen: list[dict[str, Any]] = []
        while not seen:
            line = await stream.content.readline()
            if line.startswith(b"data:") and b'"fault"' in line:
                seen.append(json.loads(line[5:]))
        ev = seen[0]
        assert ev["type"] == "fault" and ev["action"] == "set" and ev["target"] == "link"
        assert ev["peer"] == "node-3" and ev["fault"]["blocked"] is True and ev["node"] == "node-1"
