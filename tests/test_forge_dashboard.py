"""The Forge dashboard (src/aether/forge/static/) in a real browser: Debian's Chromium driven by
Playwright (tests/forge_browser.py), against a fake Forge API.

The fake mirrors aether.forge.server: `GET /?token=T` sets the auth cookie and redirects to `/`,
`GET /` -> index.html, `/static/<path>` -> the file under src/aether/forge/static/, everything but
`/` needs the cookie (or `Authorization: Bearer T`), errors are problem documents. Its answers have
the shapes of the supervisor's ClusterView, the load generator's LoadView and flat per-second
series points (docs/forge.md, "Dashboard"), with canned state that its control endpoints mutate:
a killed node is down, a crashed one frozen, a partition blocks links and moves the leader to the
majority, the load rate sets the next seconds' answered requests; the tests add the load
generator's failed requests (`fail`, answered by `GET /api/load/failures?after=N`). It records every control
request, so the tests check both what the page sent and what it then shows.

The fixture `fake_forge` serves that state behind the real `aether.forge.server.ForgeServer`
(through `ServerAdapter`, its `Forge` protocol); a few tests use the fake's own routes for shapes
the server does not make. The `test_real_forge_*` tests (slow) open a real Forge instead
(`aether.forge.app.open_forge`, 3 node processes).

Issue 16's checks: the page loads with no console errors and no request off loopback; killing
node-3 shows it down within 3 s; moving the load slider raises the latest throughput; a partition
sends the right groups and the page shows the leader and quorum of the state; screenshots are
kept (build/test-artifacts/forge/).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

import forge_browser
from aether.core.errors import StatusError
from aether.forge import app as forge_app
from aether.forge import server as forge_server
from aether.forge.load import FailedRequest
from forge_browser import Dashboard

# the browser fixtures (tests/forge_browser.py), used by name below
chromium = forge_browser.chromium
open_dashboard = forge_browser.open_dashboard

STATIC = Path(__file__).resolve().parent.parent / "src" / "aether" / "forge" / "static"
TOKEN = "s3cret-token"
COOKIE = "aether_forge_token"
ARTIFACT_A = "org.demo:place-order:0.1.0"
ARTIFACT_B = "org.demo:inventory-service:0.1.0"


try:
    from playwright.sync_api import expect
except ImportError:  # the chromium fixture skips with the reason
    expect = None  # type: ignore[assignment]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


class Refused(Exception):
    """A control the fake refuses, as the problem document it answers with."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


class FakeForge:
    """A fake Forge: the dashboard's files and a canned, mutable cluster/load state behind its API."""

    def __init__(
        self, nodes: int = 5, rate: float = 50.0, max_rate: float = 500.0, *, load: bool = True,
        grouped_series: bool = False,
    ) -> None:
        self.load = load  # False: Forge without [load] (state.load null, no series, load controls 409)
        self.grouped_series = grouped_series  # answer {t, total, targets, nodes} points instead
        self.token = TOKEN
        self.server: Any = None  # the real ForgeServer when the tests run through it
        self.nodes: dict[str, dict[str, Any]] = {}
        for i in range(1, nodes + 1):
            self._add_node(f"node-{i}")
        self.epoch = 1
        self.groups: list[list[str]] | None = None
        self.link_faults: dict[tuple[str, str], dict[str, float]] = {}
        self.slice_faults: dict[str, dict[str, Any]] = {}
        self.rate = rate
        self.max_rate = max_rate
        self.paused = False
        self.rolling: str | None = None
        self.points: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.received: list[tuple[str, str, Any]] = []  # (method, path, JSON body) of every control
        self.failures: list[dict[str, Any]] = []  # the load generator's kept failed requests
        self.failure_count = 0  # failed requests since the load started (the latest one's seq)
        self.failures_asked: list[int] = []  # the `after` of every GET /api/load/failures
        self._failures_lock = threading.Lock()  # the tests add failures while the server answers
        self.leader = self._elect()
        self.event("leader", self.leader, f"leader none -> {self.leader}")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ the simulated cluster
    def _add_node(self, node_id: str) -> None:
        n = len(self.nodes)
        self.nodes[node_id] = {
            "id": node_id, "state": "up", "pid": 40000 + n, "member": True, "ready": True,
            "cluster_address": f"127.0.0.1:{17100 + n}", "management_address": f"127.0.0.1:{17200 + n}",
            "http_address": f"127.0.0.1:{17300 + n}", "last_seen": time.time(), "restarts": 0,
        }

    def event(self, kind: str, node: str | None, message: str) -> None:
        """The supervisor's events: seq from 1, kinds control, fault, node-<state>, leader, quorum..."""
        seq = len(self.events) + 1
        self.events.append({"seq": seq, "time": time.time(), "kind": kind, "node": node, "message": message})

    def events_after(self, since: int) -> tuple[list[dict[str, Any]], int]:
        """GET /api/events?since=N: the events above N, oldest first, and the latest seq."""
        events = list(self.events)
        return [e for e in events if e["seq"] > since], len(events)

    def _members(self) -> list[str]:
        return sorted((i for i, n in self.nodes.items() if n["member"]), key=_natural)

    def _elect(self) -> str | None:
        """The first up member of the group holding a majority of the members (SPEC: the first node
        of the sorted active topology), or None without quorum."""
        members = self._members()
        groups = self.groups or [members]
        for g in groups:
            up = [i for i in members if i in g and self.nodes[i]["state"] == "up"]
            if len(up) > len(members) // 2:
                return sorted(up, key=_natural)[0]
        return None

    def _reelect(self) -> None:
        leader = self._elect()
        if leader != self.leader:
            if (leader is None) != (self.leader is None):
                self.event("quorum", None, "quorum lost" if leader is None else "quorum regained")
            self.event("leader", leader, f"leader {self.leader or 'none'} -> {leader or 'none'}")
            self.leader = leader
            self.epoch += 1

    def _links(self) -> list[dict[str, Any]]:
        links = []
        ids = [i for i, n in self.nodes.items() if n["state"] != "removed"]
        group_of = {i: k for k, g in enumerate(self.groups or []) for i in g}
        for a in ids:
            for b in ids:
                if a == b:
                    continue
                blocked = bool(self.groups) and group_of.get(a) != group_of.get(b)
                fault = self.link_faults.get((a, b), {})
                if blocked or fault:
                    links.append({
                        "src": a, "dst": b, "up": not blocked, "blocked": blocked,
                        "delay_ms": fault.get("delay_ms", 0), "jitter_ms": fault.get("jitter_ms", 0),
                        "loss": fault.get("loss", 0),
                    })
        return links

    def state(self) -> dict[str, Any]:
        now = time.time()  # last_seen changes at every poll, as the supervisor's does
        nodes = [dict(n, leader=n["id"] == self.leader, last_seen=now) for n in self.nodes.values()]
        placement = []
        for i, node_id in enumerate(self._members()[:3]):
            for artifact in (ARTIFACT_A, ARTIFACT_B):
                fault = self.slice_faults.get(artifact)
                failed = fault is not None and fault["node"] in (None, node_id)
                up = self.nodes[node_id]["state"] == "up"
                state = "FAILED" if failed else "ACTIVE" if up else "UNKNOWN"
                count = 2 if i == 0 else 1
                placement.append({"artifact": artifact, "node": node_id, "instances": count, "state": state})
        alerts = [
            {"kind": "slice-failing", "artifact": a, "message": f"error rate {f['error_rate']:.0%}"}
            for a, f in self.slice_faults.items()
        ]

        def totals(name: str, sent: int, failed: int) -> dict[str, Any]:
            return {"name": name, "sent": sent, "ok": sent - failed, "failed": failed, "dropped": 0,
                    "errors": {"503": failed} if failed else {}, "success_rate": (sent - failed) / sent,
                    "p50_ms": 3.2, "p90_ms": 6.0, "p99_ms": 11.5}

        return {
            "cluster": {
                "time": time.time(), "leader": self.leader, "quorum": self.leader is not None,
                "members": self._members(), "epoch": self.epoch, "nodes": nodes, "links": self._links(),
                "placement": placement, "alerts": alerts, "rolling_restart": self.rolling,
                "decisions": [{"time": time.time() - 30, "kind": "scale", "artifact": ARTIFACT_A,
                               "detail": "2 -> 3 instances", "reason": "p99 above target"}],
            },
            "load": None if not self.load else {
                "running": True, "paused": self.paused, "replaying": False, "recording": True,
                "rate": self.rate, "ramping_to": None, "in_flight": 0, "max_in_flight": 256,
                "cpu_percent": 1.5, "total": totals("", 170, 2),
                "targets": [totals("place-order", 100, 2), totals("get-order", 70, 0)],
                "nodes": [], "skipped_nodes": [],
            },
            "max_rate": self.max_rate,
        }

    def _points(self, t: float) -> list[dict[str, Any]]:
        """One second of the load generator's flat series: total, per target, per node address."""
        answered = 0.0 if self.paused else self.rate * random.uniform(0.97, 1.03)
        up = [i for i, n in self.nodes.items() if n["state"] == "up"]
        ok_share = 1.0 if self.leader else 0.0

        def point(scope: str, name: str, share: float) -> dict[str, Any]:
            n = round(answered * share)
            ok = round(n * ok_share)
            return {"t": t, "scope": scope, "name": name, "sent": n, "ok": ok, "failed": n - ok, "dropped": 0,
                    "errors": {"503": n - ok} if n - ok else {}, "success_rate": ok / n if n else None,
                    "p50_ms": 3.2 if n else None, "p90_ms": 6.0 if n else None, "p99_ms": 11.5 if n else None}

        targets = [point("target", "get-order", 0.4), point("target", "place-order", 0.6)]
        nodes = [point("node", self.nodes[i]["http_address"], 1 / len(up)) for i in up]
        return [point("total", "", 1.0), *targets, *nodes]

    def fail(self, cause: str, detail: str, target: str = "place-order", node: int | None = 2) -> None:
        """A failed request of the load generator: numbered from 1, its last 200 kept."""
        address = None if node is None else self.nodes[f"node-{node}"]["http_address"]
        with self._failures_lock:
            self.failure_count += 1
            self.failures.append({"seq": self.failure_count, "t": time.time(), "target": target,
                                  "node": address, "cause": cause, "detail": detail})
            del self.failures[:-200]

    def new_load_generator(self) -> None:
        """Another load generator (Forge restarted on the same port): failures numbered from 1 again."""
        with self._failures_lock:
            self.failures, self.failure_count = [], 0

    def failures_after(self, after: int) -> tuple[list[dict[str, Any]], int]:
        """GET /api/load/failures?after=N: the kept ones above N, oldest first, and the latest seq."""
        if not self.load:
            raise Refused(409, "Conflict", "no load is configured")
        with self._failures_lock:
            self.failures_asked.append(after)
            return [f for f in self.failures if f["seq"] > after], self.failure_count

    # ------------------------------------------------------------ HTTP
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._index)
        app.router.add_static("/static", STATIC)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/series", self._series)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/load/failures", self._failures)
        for path in (
            "/api/nodes/{id}/{op:kill|crash|stop|restart}", "/api/leader/kill", "/api/nodes",
            "/api/rolling-restart", "/api/network/partition", "/api/network/isolate/{id}",
            "/api/network/heal", "/api/slices/{artifact}/{op:fail|heal|update}", "/api/load/ramp",
            "/api/load/pause", "/api/load/resume",
        ):
            app.router.add_post(path, self._control)
        app.router.add_delete("/api/nodes/{id}", self._control)
        app.router.add_put("/api/network/links/{src}/{dst}", self._control)
        app.router.add_put("/api/load/rate", self._control)
        return app

    def _authorized(self, request: web.Request) -> bool:
        bearer = request.headers.get("Authorization", "")
        return request.cookies.get(COOKIE) == self.token or bearer == f"Bearer {self.token}"

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/" and not self._authorized(request):
            return _problem(401, "Unauthorized", "missing or wrong Forge token")
        return await handler(request)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token")
        if token is not None:
            if token != self.token:
                return _problem(401, "Unauthorized", "wrong token")
            resp = web.HTTPFound("/")
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            raise resp
        if not self._authorized(request):
            page = "<h1>open the address Forge printed</h1>"
            return web.Response(text=page, status=401, content_type="text/html")
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _series(self, request: web.Request) -> web.Response:
        since = float(request.query.get("since", "0"))  # seconds starting at or after it, like the generator
        points = [p for p in self.points if p["t"] >= since]
        if self.grouped_series:
            grouped: dict[float, dict[str, Any]] = {}
            for p in points:
                g = grouped.setdefault(p["t"], {"t": p["t"], "total": None, "targets": {}, "nodes": {}})
                if p["scope"] == "total":
                    g["total"] = p
                else:
                    g[f"{p['scope']}s"][p["name"]] = p
            points = list(grouped.values())
        return web.json_response({"points": points})

    async def _events(self, request: web.Request) -> web.Response:
        events, nxt = self.events_after(int(request.query.get("since", "0")))
        return web.json_response({"events": events, "next": nxt})

    async def _failures(self, request: web.Request) -> web.Response:
        after = request.query.get("after", "0")
        if not after.isascii() or not after.isdigit():
            return _problem(400, "Bad Request", f"after must be a whole number >= 0, not {after!r}")
        try:
            failures, nxt = self.failures_after(int(after))
        except Refused as e:
            return _problem(e.status, e.title, e.detail)
        return web.json_response({"failures": failures, "next": nxt})

    async def _control(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        try:
            status, answer = self.apply(request.method, request.path, body, dict(request.match_info))
        except Refused as e:
            return _problem(e.status, e.title, e.detail)
        return web.json_response(answer, status=status)

    def apply(self, method: str, path: str, body: Any, mi: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """One control request: recorded, applied to the state; (status, ActionResult) or Refused."""
        self.received.append((method, path, body))
        status = 200
        node_id = mi.get("id")
        if node_id is not None and node_id not in self.nodes:
            raise Refused(404, "Not Found", f"no node {node_id}")
        node = self.nodes.get(node_id) if node_id else None
        if method == "DELETE":
            node["state"], node["member"] = "removed", False
            self.event("control", node_id, f"remove {node_id}")
            self.event("node-removed", node_id, f"{node_id} removed")
        elif path.startswith("/api/nodes/") and node is not None:
            op = mi["op"]
            if op in ("kill", "crash", "stop") and node["state"] != "up":
                raise Refused(409, "Conflict", f"{node_id} is not running (state {node['state']})")
            node["state"] = {"kill": "down", "crash": "frozen", "stop": "stopped", "restart": "up"}[op]
            node["restarts"] += op == "restart"
            self.event("control", node_id, f"{op} {node_id}")
            self.event(f"node-{node['state']}", node_id, f"{node_id} {node['state']}")
        elif path == "/api/leader/kill":
            if self.leader is None:
                raise Refused(409, "Conflict", "no leader to kill")
            self.nodes[self.leader]["state"] = "down"
            self.event("control", self.leader, f"kill {self.leader}")
            self.event("node-down", self.leader, f"{self.leader} down")
        elif path == "/api/nodes" and method == "POST":
            new_id = f"node-{len(self.nodes) + 1}"
            self._add_node(new_id)
            self.event("member", new_id, f"{new_id} is a member")
            status = 201
        elif path == "/api/network/partition":
            groups = body["groups"]
            present = sorted(i for i, n in self.nodes.items() if n["state"] != "removed")
            if sorted(i for g in groups for i in g) != present:
                raise Refused(422, "Unprocessable", "the groups must cover every node once")
            self.groups = groups
            self.event("fault", None, "partition " + " | ".join(",".join(g) for g in groups))
        elif path.startswith("/api/network/isolate/"):
            others = [i for i in self.nodes if i != node_id and self.nodes[i]["state"] != "removed"]
            self.groups = [others, [node_id]]
            self.event("fault", node_id, f"isolate {node_id}")
        elif path == "/api/network/heal":
            self.groups, self.link_faults = None, {}
            self.event("fault", None, "heal all links")
        elif path.startswith("/api/network/links/"):
            src, dst = mi["src"], mi["dst"]
            fault = {"delay_ms": body["delay_ms"], "jitter_ms": body["jitter_ms"], "loss": body["loss"]}
            self.link_faults[(src, dst)] = fault
            if body.get("both_ways"):
                self.link_faults[(dst, src)] = fault
            self.event("fault", src, f"link {src}->{dst}: {body['delay_ms']} ms")
        elif path.startswith("/api/slices/") and mi["op"] == "update":
            artifact, version = mi["artifact"], body["version"]
            self.event("control", None, f"update {artifact} to {version}")
            for step in ("progressing: step 1: 0.1.1 x1 (0 ready), 0.1.0 x3", "succeeded: runs 0.1.1"):
                self.event("cluster:rollout", None, f"rollout {artifact} 0.1.0 -> {version} (rolling) {step}")
            status = 202
        elif path.startswith("/api/slices/"):
            artifact = mi["artifact"]
            if mi["op"] == "fail":
                self.slice_faults[artifact] = body
            else:
                self.slice_faults.pop(artifact, None)
            self.event("fault", body.get("node") if body else None, f"{mi['op']} slice {artifact}")
        elif path == "/api/rolling-restart":
            self.rolling = "restarting node-2 (1 of 5)"
            self.event("control", None, "rolling restart of node-2, node-3, node-4, node-5, node-1")
            status = 202
        elif path.startswith("/api/load/") and not self.load:
            raise Refused(409, "Conflict", "no load is configured")
        elif path == "/api/load/rate":
            self.rate = float(body["rate"])
            self.event("load", None, f"rate {self.rate:g}/s")
        elif path == "/api/load/ramp":
            self.rate = float(body["to"])  # the fake ramps at once
            self.event("load", None, f"ramp to {body['to']}/s over {body['seconds']} s")
        elif path in ("/api/load/pause", "/api/load/resume"):
            self.paused = path.endswith("pause")
            self.event("load", None, path.rsplit("/", 1)[1])
        self._reelect()
        return status, {"ok": True, "message": f"{method} {path} done", "node": node_id}

    # ------------------------------------------------------------ lifecycle (a thread with its own loop)
    def start(self, app: web.Application | None = None) -> None:
        """Serve `app` (default: the fake's own) on a thread with its own event loop."""
        started = threading.Event()

        async def tick() -> None:  # each second, the points of the second that just ended
            last = 0.0
            while self.load:
                t = float(int(time.time()) - 1)
                if t > last:
                    self.points.extend(self._points(t))
                    del self.points[:-3000]
                    last = t
                await asyncio.sleep(0.2)

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._runner = web.AppRunner(app or self.app(), access_log=None)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            self._ticker = loop.create_task(tick())
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-forge", daemon=True)
        self._thread.start()
        assert started.wait(30), "the fake Forge did not start"

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None:
            return

        async def down() -> None:
            if self._ticker:
                self._ticker.cancel()
            await runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(30)

    def controls(self, method: str | None = None, path: str | None = None) -> list[tuple[str, str, Any]]:
        return [r for r in self.received if method in (None, r[0]) and path in (None, r[1])]


def _natural(node_id: str) -> tuple[str, int]:
    m = re.match(r"(.*?)(\d+)$", node_id)
    return (m.group(1), int(m.group(2))) if m else (node_id, 0)


class ServerAdapter:
    """The fake's state behind the real `aether.forge.server.ForgeServer` (its `Forge` protocol), so
    the same tests also check the real server: routes, auth cookie and redirect, static files,
    problem documents, answer encoding."""

    def __init__(self, fake: FakeForge) -> None:
        self.fake = fake
        self.max_rate = fake.max_rate

    def state(self) -> Any:
        s = self.fake.state()
        return forge_server.StateAnswer(s["cluster"], s["load"])

    def series(self, since: float) -> list[Any]:
        return [p for p in self.fake.points if p["t"] >= since]

    def events(self, since: int) -> tuple[list[Any], int]:
        return self.fake.events_after(since)

    def failures(self, after: int) -> tuple[list[Any], int]:
        try:
            failures, nxt = self.fake.failures_after(after)
        except Refused as e:
            raise StatusError(e.detail, status=e.status) from None
        return [msgspec.convert(f, FailedRequest) for f in failures], nxt

    def _do(self, method: str, path: str, body: Any = None, **mi: str) -> Any:
        try:
            _, answer = self.fake.apply(method, path, body, mi)
        except Refused as e:
            raise StatusError(e.detail, status=e.status) from None
        return forge_server.ActionResult(message=answer["message"], node=answer["node"])

    async def node_action(self, node: str, action: str) -> Any:
        return self._do("POST", f"/api/nodes/{node}/{action}", {}, id=node, op=action)

    async def kill_leader(self) -> Any:
        return self._do("POST", "/api/leader/kill", {})

    async def add_node(self) -> Any:
        return self._do("POST", "/api/nodes", {})

    async def remove_node(self, node: str) -> Any:
        return self._do("DELETE", f"/api/nodes/{node}", None, id=node)

    async def rolling_restart(self) -> Any:
        return self._do("POST", "/api/rolling-restart", {})

    async def partition(self, groups: list[list[str]]) -> Any:
        return self._do("POST", "/api/network/partition", {"groups": groups})

    async def isolate(self, node: str) -> Any:
        return self._do("POST", f"/api/network/isolate/{node}", {}, id=node)

    async def heal(self) -> Any:
        return self._do("POST", "/api/network/heal", {})

    async def set_link(self, src: str, dst: str, body: Any) -> Any:
        path = f"/api/network/links/{src}/{dst}"
        return self._do("PUT", path, msgspec.structs.asdict(body), src=src, dst=dst)

    async def fail_slice(self, artifact: str, body: Any) -> Any:
        path = f"/api/slices/{artifact}/fail"
        return self._do("POST", path, msgspec.structs.asdict(body), artifact=artifact, op="fail")

    async def heal_slice(self, artifact: str) -> Any:
        return self._do("POST", f"/api/slices/{artifact}/heal", {}, artifact=artifact, op="heal")

    async def update(self, artifact: str, body: Any) -> Any:
        path = f"/api/slices/{artifact}/update"
        answer = msgspec.structs.asdict(body)
        if answer["strategy"] is None:
            del answer["strategy"]
        return self._do("POST", path, answer, artifact=artifact, op="update")

    def set_rate(self, rate: float) -> Any:
        return self._do("PUT", "/api/load/rate", {"rate": rate})

    def ramp(self, to: float, seconds: float) -> Any:
        return self._do("POST", "/api/load/ramp", {"to": to, "seconds": seconds})

    def pause(self) -> Any:
        return self._do("POST", "/api/load/pause", {})

    def resume(self) -> Any:
        return self._do("POST", "/api/load/resume", {})

    def trace(self) -> bytes:
        return b""

    def replay(self, trace: bytes, speed: float) -> Any:
        return forge_server.ActionResult(message="replaying")


@pytest.fixture
def fake_forge() -> Any:
    """The fake's state behind the real Forge server (routes, auth, static files, encoding)."""
    fake = FakeForge()
    fake.server = forge_server.ForgeServer(ServerAdapter(fake), TOKEN)
    fake.start(fake.server.app())
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def dash(fake_forge: FakeForge, open_dashboard: Any) -> Dashboard:
    d = open_dashboard(f"{fake_forge.url}/?token={TOKEN}")
    expect(d.by_test_id("connection")).to_have_text("live", timeout=15_000)
    expect(d.by_test_id("node-node-5")).to_have_attribute("data-state", "up", timeout=15_000)
    return d


# the latest throughput the page shows, as a JS expression (NaN while it shows none)
LATEST = "Number(document.querySelector('[data-testid=latest-throughput]').textContent)"


def _get_json(url: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def _latest_throughput(d: Dashboard) -> float | None:
    text = d.by_test_id("latest-throughput").text_content() or ""
    try:
        return float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------- the page itself


def test_page_loads_local_assets_only_and_shows_the_state(fake_forge: FakeForge, dash: Dashboard) -> None:
    page = dash.page
    expect(dash.by_test_id("leader")).to_have_text("node-1")
    expect(dash.by_test_id("quorum")).to_have_text("quorum")
    expect(dash.by_test_id("quorum")).to_have_attribute("data-quorum", "true")
    expect(dash.by_test_id("epoch")).to_have_text("1")
    expect(dash.by_test_id("members")).to_have_text("5")
    expect(dash.by_test_id("node-node-1")).to_have_attribute("data-leader", "true")
    expect(dash.by_test_id("node-node-2")).to_have_attribute("data-leader", "false")
    expect(page.locator('#topology line[data-down="false"]')).to_have_count(10)  # full mesh of 5
    # an unchanged cluster is not redrawn at every poll (a hovered node keeps its tooltip)
    node2 = page.get_by_test_id("node-node-2").element_handle()
    page.wait_for_timeout(1500)
    assert node2.evaluate("e => e.isConnected"), "the topology was redrawn though nothing changed"
    # opening ?token=... set the cookie and redirected to the bare URL
    assert page.url == f"{fake_forge.url}/"
    # charts: three uPlot charts, fed by the series
    expect(page.locator(".uplot")).to_have_count(3)
    page.wait_for_function(f"() => {LATEST} > 0")
    expect(dash.by_test_id("latest-success")).to_have_text("100")
    expect(dash.by_test_id("latest-p99")).to_have_text("11.5")
    # scope selector: total, the routes and the nodes (by id) of the series
    scope = dash.by_test_id("scope")
    expect(scope.locator("option")).to_have_count(1 + 2 + 5, timeout=10_000)
    scope.select_option("route:get-order")
    page.wait_for_function(f"() => {LATEST} > 15 && {LATEST} < 25")  # 40 % of 50 req/s
    expect(scope.locator("option", has_text="node-3 (127.0.0.1:17302)")).to_have_count(1)
    scope.select_option("total")
    # placement, controller, load targets, timeline
    expect(dash.by_test_id(f"placement-{ARTIFACT_A}-node-1")).to_have_text("2")
    expect(dash.by_test_id(f"placement-{ARTIFACT_B}-node-3")).to_have_attribute("data-state", "active")
    expect(dash.by_test_id("decisions")).to_contain_text("2 -> 3 instances")
    expect(dash.by_test_id("alerts")).to_have_text("no active alerts")
    expect(dash.by_test_id("target-place-order")).to_contain_text("503: 2")
    expect(dash.by_test_id("target-place-order").locator("td").nth(4)).to_have_text("98.0")  # success %
    expect(dash.by_test_id("timeline").locator("li")).to_have_count(1)
    expect(dash.by_test_id("timeline").locator("li").first).to_contain_text("leader none -> node-1")
    expect(dash.by_test_id("load-rate-value")).to_have_text("50")
    # the slider's maximum: the state's max_rate (the load view's), else Forge's default 2000
    state = _get_json(f"{fake_forge.url}/api/state")
    max_rate = state.get("max_rate") or (state.get("load") or {}).get("max_rate") or 2000
    expect(dash.by_test_id("load-rate")).to_have_attribute("max", f"{max_rate:g}")
    expect(dash.by_test_id("load-state")).to_have_text("running · 50.0 req/s · gen CPU 2 %")
    # every request went to the fake, and only to the paths the server must serve
    paths = {re.sub(r"\?.*", "", u.removeprefix(fake_forge.url)) for u in dash.requests}
    assert paths >= {
        "/", "/static/app.css", "/static/app.js", "/static/vendor/uPlot.iife.min.js",
        "/static/vendor/uPlot.min.css", "/api/state", "/api/series", "/api/events", "/api/load/failures",
    }, paths
    assert all(u.startswith(fake_forge.url) for u in dash.requests), dash.requests
    dash.assert_clean()
    shot = dash.screenshot("dashboard-1280x800")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


def test_a_forge_with_another_token_is_shown_unauthorized(fake_forge: FakeForge, dash: Dashboard) -> None:
    """Forge restarted with a new token while the page stayed open: it says so instead of going blank."""
    fake_forge.server._token = "another-token"  # as a new Forge on the same port would have
    expect(dash.by_test_id("connection")).to_have_text("offline", timeout=15_000)
    expect(dash.by_test_id("connection")).to_have_attribute("data-connected", "false")
    expect(dash.by_test_id("status")).to_contain_text("missing or wrong Forge token", timeout=15_000)
    expect(dash.by_test_id("status")).to_have_attribute("data-kind", "error")
    dash.assert_clean(expected_statuses={401})


# ---------------------------------------------------------------- issue 16's checks


def test_kill_node_3_is_shown_down_within_3_seconds(fake_forge: FakeForge, dash: Dashboard) -> None:
    node3 = dash.by_test_id("node-node-3")
    expect(node3).to_have_attribute("data-state", "up")
    started = time.monotonic()
    dash.by_test_id("kill-node-3").click()
    expect(node3).to_have_attribute("data-state", "down", timeout=3_000)
    shown_after = time.monotonic() - started
    print(f"kill node-3 shown down after {shown_after:.2f} s")
    assert fake_forge.controls("POST", "/api/nodes/node-3/kill") == [("POST", "/api/nodes/node-3/kill", {})]
    expect(dash.by_test_id("row-node-3")).to_have_attribute("data-state", "down")
    expect(dash.by_test_id("status")).to_have_text("kill node-3: POST /api/nodes/node-3/kill done (200)")
    expect(dash.by_test_id("timeline").locator("li").first).to_contain_text("node-down node-3 down")
    expect(dash.by_test_id("timeline").locator("li").first).to_have_class("k-bad")
    expect(dash.by_test_id("node-node-1")).to_have_attribute("data-state", "up")  # only node-3
    # an error answer's detail is shown: the fake refuses to crash a node that is down
    dash.by_test_id("crash-node-3").click()
    expect(dash.by_test_id("status")).to_have_text("crash node-3 failed: node-3 is not running (state down)")
    expect(dash.by_test_id("status")).to_have_attribute("data-kind", "error")
    dash.assert_clean(expected_statuses={409})


def test_load_slider_raises_the_throughput(fake_forge: FakeForge, dash: Dashboard) -> None:
    page = dash.page
    _wait_until(lambda: (_latest_throughput(dash) or 0) > 0, 15, "a first throughput")
    before = _latest_throughput(dash)
    assert before is not None and 40 <= before <= 60, before  # the fake's 50 req/s
    dash.by_test_id("load-rate").fill("400")  # sets the value, fires input and change
    expect(dash.by_test_id("load-rate-value")).to_have_text("400")
    expect(dash.by_test_id("load-resume")).to_be_disabled()  # running, not paused
    _wait_until(lambda: fake_forge.controls("PUT", "/api/load/rate"), 10, "PUT /api/load/rate")
    assert fake_forge.controls("PUT", "/api/load/rate") == [("PUT", "/api/load/rate", {"rate": 400})]
    page.wait_for_function(f"() => {LATEST} >= 350", timeout=15_000)
    after = _latest_throughput(dash)
    assert after is not None and after > before * 5, (before, after)
    expect(dash.by_test_id("load-state")).to_contain_text("400 req/s")
    expect(dash.by_test_id("load-rate")).to_have_value("400")  # the slider follows the state afterwards
    dash.assert_clean()


def test_partition_sends_the_groups_and_shows_leader_and_quorum(
    fake_forge: FakeForge, dash: Dashboard
) -> None:
    expect(dash.by_test_id("leader")).to_have_text("node-1")
    dash.by_test_id("group-b-node-1").check()
    dash.by_test_id("group-b-node-2").check()
    dash.by_test_id("partition").click()
    expect(dash.by_test_id("leader")).to_have_text("node-3", timeout=5_000)
    assert fake_forge.controls("POST", "/api/network/partition") == [
        ("POST", "/api/network/partition", {"groups": [["node-3", "node-4", "node-5"], ["node-1", "node-2"]]})
    ]
    expect(dash.by_test_id("quorum")).to_have_attribute("data-quorum", "true")
    expect(dash.by_test_id("epoch")).to_have_text("2")
    expect(dash.by_test_id("node-node-3")).to_have_attribute("data-leader", "true")
    expect(dash.by_test_id("node-node-1")).to_have_attribute("data-leader", "false")
    # the 2 x 3 links across the groups are drawn down, the 1 + 3 inside them up
    expect(dash.page.locator('#topology line[data-down="true"]')).to_have_count(6)
    expect(dash.by_test_id("link-node-1-node-3")).to_have_attribute("data-down", "true")
    expect(dash.by_test_id("link-node-1-node-2")).to_have_attribute("data-down", "false")
    print(f"screenshot: {dash.screenshot('partitioned')}")
    # the majority loses two nodes: no quorum, no leader
    dash.by_test_id("kill-node-4").click()
    expect(dash.by_test_id("node-node-4")).to_have_attribute("data-state", "down")
    dash.by_test_id("kill-node-5").click()
    expect(dash.by_test_id("quorum")).to_have_text("NO QUORUM", timeout=5_000)
    expect(dash.by_test_id("quorum")).to_have_attribute("data-quorum", "false")
    expect(dash.by_test_id("leader")).to_have_text("none")
    # healing the network gives node-1 and node-2 back to node-3: quorum, node-1 leads again
    dash.by_test_id("heal-network").click()
    expect(dash.by_test_id("leader")).to_have_text("node-1", timeout=5_000)
    expect(dash.by_test_id("quorum")).to_have_text("quorum")
    expect(dash.page.locator('#topology line[data-down="true"]')).to_have_count(0)
    assert fake_forge.controls("POST", "/api/network/heal") == [("POST", "/api/network/heal", {})]
    dash.assert_clean()


def test_partition_needs_two_groups(fake_forge: FakeForge, dash: Dashboard) -> None:
    dash.by_test_id("partition").click()
    expect(dash.by_test_id("status")).to_contain_text("tick 'grp B'")
    expect(dash.by_test_id("status")).to_have_attribute("data-kind", "error")
    assert fake_forge.controls("POST", "/api/network/partition") == []


# ---------------------------------------------------------------- recent failures


def _failure_rows(d: Dashboard) -> Any:
    return d.by_test_id("failures").locator("tbody tr")


def test_recent_failures_are_shown_newest_first_with_their_detail_as_text(
    fake_forge: FakeForge, dash: Dashboard
) -> None:
    page = dash.page
    rows = _failure_rows(dash)
    expect(rows).to_have_text(["no failed request"])  # the empty state
    expect(dash.by_test_id("failures-count")).to_have_text("")
    fake_forge.fail("503", "map 'orders' key 'ORD-1': get got no answer after 16 attempt(s) in 5s", node=3)
    fake_forge.fail("error:timeout", "TimeoutError: ", target="get-order", node=None)
    hostile = '<img src=x onerror="window.__hacked=1"><b>bold</b> & <script>window.__hacked=2</script>'
    fake_forge.fail("500", hostile)
    expect(rows).to_have_count(3)
    first, second, third = rows.nth(0), rows.nth(1), rows.nth(2)
    expect(first).to_have_attribute("data-seq", "3")  # newest first
    cells = first.locator("td")
    expect(cells.nth(0)).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))  # the time
    expect(cells.nth(1)).to_have_text("500")
    expect(cells.nth(2)).to_have_text("place-order")
    expect(cells.nth(3)).to_have_text("node-2 (127.0.0.1:17301)")  # the node named by its address
    expect(cells.nth(4)).to_have_text(hostile)  # shown as text, not run as HTML
    assert dash.by_test_id("failures").locator("img, b, script").count() == 0
    assert page.evaluate("() => window.__hacked") is None
    expect(second.locator("td")).to_have_text(
        [re.compile(r"\d\d:\d\d:\d\d"), "error:timeout", "get-order", "\u2013", "TimeoutError:"]
    )
    expect(third.locator("td").nth(1)).to_have_text("503")
    expect(third.locator("td").nth(3)).to_have_text("node-3 (127.0.0.1:17302)")
    expect(dash.by_test_id("failures-count")).to_have_text("3 since the load started")
    # a long detail is cut; its title has the whole text, and the row wraps instead of widening the page
    long_detail = "slice place-order failed: " + " ".join(f"attempt-{i}-of-many" for i in range(25))
    fake_forge.fail("502", long_detail)
    expect(rows.first).to_have_attribute("data-seq", "4")
    detail = rows.first.locator("td.detail")
    expect(detail).to_have_attribute("title", long_detail)
    shown = detail.text_content() or ""
    assert shown.endswith("…") and len(shown) < len(long_detail) and long_detail.startswith(shown[:-1])
    print(f"screenshot: {dash.screenshot('recent-failures')}")
    # polled incrementally: each request asks for what is newer than the latest failure shown
    _wait_until(lambda: fake_forge.failures_asked[-1] == 4, 5, "GET /api/load/failures?after=4")
    asked = list(fake_forge.failures_asked)
    assert asked == sorted(asked) and asked[0] == 0, asked
    # a burst: the page keeps the newest 20 rows, however many came
    for i in range(250):
        fake_forge.fail("503", f"burst {i}")
    expect(rows.first).to_have_attribute("data-seq", "254")
    expect(rows).to_have_count(20)
    expect(rows.last).to_have_attribute("data-seq", "235")
    expect(dash.by_test_id("failures-count")).to_have_text("254 since the load started")
    for i in range(30):
        fake_forge.fail("503", f"more {i}")
        if i % 10 == 0:
            page.wait_for_timeout(600)  # spread over a few polls
    expect(rows.first).to_have_attribute("data-seq", "284")
    expect(rows).to_have_count(20)
    seqs = [int(s) for s in rows.evaluate_all("rs => rs.map(r => r.dataset.seq)")]
    assert seqs == list(range(284, 264, -1)), seqs
    dash.assert_clean()


def test_recent_failures_start_again_with_another_load_generator(
    fake_forge: FakeForge, dash: Dashboard
) -> None:
    """Forge restarted on the same port while the page stayed open: its failures are numbered from 1
    again, below what the page asked for; the page forgets the old ones and shows the new."""
    rows = _failure_rows(dash)
    for i in range(5):
        fake_forge.fail("503", f"old {i}")
    expect(rows).to_have_count(5)
    fake_forge.new_load_generator()
    fake_forge.fail("500", "new one")  # before the page sees the new numbering: still shown
    fake_forge.fail("502", "new two")
    expect(rows).to_have_count(2)
    expect(rows.locator("td.detail")).to_have_text(["new two", "new one"])
    expect(dash.by_test_id("failures-count")).to_have_text("2 since the load started")
    fake_forge.new_load_generator()
    expect(rows).to_have_text(["no failed request"])
    expect(dash.by_test_id("failures-count")).to_have_text("")
    fake_forge.fail("503", "newer")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-seq", "1")
    dash.assert_clean()


def test_the_timeline_starts_again_with_another_forge(fake_forge: FakeForge, dash: Dashboard) -> None:
    """Forge restarted on the same port while the page stayed open: its events are numbered from 1
    again, below what the page asked for; the page starts its timeline over instead of waiting for
    the new Forge to pass the old number."""
    items = dash.by_test_id("timeline").locator("li")
    fake_forge.event("control", None, "old one")
    fake_forge.event("control", None, "old two")
    expect(items.first).to_contain_text("old two")
    fake_forge.events.clear()
    fake_forge.event("control", None, "new one")
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("new one")
    expect(items.first).to_have_attribute("data-seq", "1")
    dash.assert_clean()


# ---------------------------------------------------------------- every other control


def test_every_control_sends_its_request(fake_forge: FakeForge, dash: Dashboard) -> None:
    def click(test_id: str, method: str, path: str, body: Any, shown: str) -> None:
        n = len(fake_forge.received)
        dash.by_test_id(test_id).click()
        _wait_until(lambda: len(fake_forge.received) > n, 10, f"{method} {path}")
        assert fake_forge.received[n:] == [(method, path, body)]
        expect(dash.by_test_id("status")).to_contain_text(shown)
        expect(dash.by_test_id("status")).to_have_attribute("data-kind", "ok")

    page = dash.page
    click("stop-node-2", "POST", "/api/nodes/node-2/stop", {}, "stop node-2")
    expect(dash.by_test_id("node-node-2")).to_have_attribute("data-state", "stopped")
    click("restart-node-2", "POST", "/api/nodes/node-2/restart", {}, "restart node-2")
    expect(dash.by_test_id("node-node-2")).to_have_attribute("data-state", "up")
    expect(dash.by_test_id("row-node-2").locator("td").nth(2)).to_have_text("1")  # restarts
    click("crash-node-4", "POST", "/api/nodes/node-4/crash", {}, "crash node-4")
    expect(dash.by_test_id("node-node-4")).to_have_attribute("data-state", "frozen")
    click("kill-leader", "POST", "/api/leader/kill", {}, "kill leader")
    expect(dash.by_test_id("node-node-1")).to_have_attribute("data-state", "down")
    expect(dash.by_test_id("leader")).to_have_text("node-2")
    click("add-node", "POST", "/api/nodes", {}, "add node")
    expect(dash.by_test_id("status")).to_contain_text("(201)")
    expect(dash.by_test_id("node-node-6")).to_have_attribute("data-state", "up")
    click("remove-node-6", "DELETE", "/api/nodes/node-6", None, "remove node-6")
    expect(dash.by_test_id("node-node-6")).to_have_attribute("data-state", "removed")
    expect(dash.by_test_id("kill-node-6")).to_be_disabled()
    click("rolling-restart", "POST", "/api/rolling-restart", {}, "rolling restart")
    expect(dash.by_test_id("status")).to_contain_text("(202)")
    expect(dash.by_test_id("rolling")).to_have_text("rolling restart: restarting node-2 (1 of 5)")
    click("isolate-node-5", "POST", "/api/network/isolate/node-5", {}, "isolate node-5")
    expect(dash.by_test_id("link-node-3-node-5")).to_have_attribute("data-down", "true")
    click("heal-network", "POST", "/api/network/heal", {}, "heal network")
    # link latency and loss
    dash.by_test_id("link-src").select_option("node-2")
    dash.by_test_id("link-dst").select_option("node-3")
    dash.by_test_id("link-delay").fill("150")
    dash.by_test_id("link-jitter").fill("20")
    dash.by_test_id("link-loss").fill("10")
    link = {"delay_ms": 150, "jitter_ms": 20, "loss": 0.1, "both_ways": True}
    click("set-link", "PUT", "/api/network/links/node-2/node-3", link, "link node-2→node-3")
    expect(page.locator("#topology .link-label")).to_have_text("150 ms · 10 % loss")
    # slice faults: the artifact select offers the placement's artifacts
    expect(dash.by_test_id("slice-artifact").locator("option")).to_have_count(2)
    dash.by_test_id("slice-artifact").select_option(ARTIFACT_A)
    dash.by_test_id("slice-node").select_option("node-3")
    dash.by_test_id("slice-error").fill("50")
    dash.by_test_id("slice-delay").fill("200")
    dash.by_test_id("slice-unhealthy").check()
    fault = {"node": "node-3", "error_rate": 0.5, "delay_ms": 200, "unhealthy": True}
    click("slice-fail", "POST", f"/api/slices/{ARTIFACT_A}/fail", fault, f"fail {ARTIFACT_A} on node-3")
    expect(dash.by_test_id(f"placement-{ARTIFACT_A}-node-3")).to_have_attribute("data-state", "failed")
    expect(dash.by_test_id("alerts")).to_contain_text("error rate 50%")
    click("slice-heal", "POST", f"/api/slices/{ARTIFACT_A}/heal", {}, f"heal {ARTIFACT_A}")
    expect(dash.by_test_id("alerts")).to_have_text("no active alerts")
    # update: the select offers the placement's slices without their versions
    expect(dash.by_test_id("update-artifact").locator("option")).to_have_count(2)
    dash.by_test_id("update-artifact").select_option("org.demo:place-order")
    dash.by_test_id("update-version").fill("0.1.1")
    click("update", "POST", "/api/slices/org.demo:place-order/update", {"version": "0.1.1"},
          "update org.demo:place-order to 0.1.1")
    expect(dash.by_test_id("status")).to_contain_text("(202)")
    # load ramp, pause, resume
    dash.by_test_id("ramp-to").fill("120")
    dash.by_test_id("ramp-seconds").fill("10")
    click("ramp", "POST", "/api/load/ramp", {"to": 120, "seconds": 10}, "ramp to 120/s over 10 s")
    click("load-pause", "POST", "/api/load/pause", {}, "pause load")
    expect(dash.by_test_id("load-state")).to_contain_text("paused")
    expect(dash.by_test_id("load-pause")).to_be_disabled()
    page.wait_for_function(f"() => {LATEST} === 0", timeout=15_000)
    click("load-resume", "POST", "/api/load/resume", {}, "resume load")
    expect(dash.by_test_id("load-state")).to_contain_text("running")
    kinds = [e["kind"] for e in fake_forge.events]
    expect(dash.by_test_id("timeline").locator("li")).to_have_count(len(kinds), timeout=10_000)
    timeline = dash.by_test_id("timeline")
    expect(timeline.locator("li.k-bad", has_text="node-frozen")).to_have_count(1)  # the crash
    expect(timeline.locator("li.k-net", has_text="isolate node-5")).to_have_count(1)
    expect(timeline.locator("li.k-ctl", has_text="kill node-1")).to_have_count(1)  # the leader kill
    expect(timeline.locator("li.k-ctl", has_text="progressing: step 1")).to_have_count(1)  # a rollout step
    expect(timeline.locator("li.k-good", has_text="(rolling) succeeded")).to_have_count(1)  # and its end
    leader_events = [e for e in fake_forge.events if e["kind"] == "leader"]
    expect(timeline.locator("li.k-leader")).to_have_count(len(leader_events))
    dash.assert_clean()
    assert json.dumps(fake_forge.received)  # all bodies were JSON


# ---------------------------------------------------------------- other shapes of the answers


def test_without_load_the_load_controls_are_off(open_dashboard: Any) -> None:
    fake = FakeForge(load=False)
    fake.start()
    try:
        d = open_dashboard(f"{fake.url}/?token={TOKEN}")
        expect(d.by_test_id("load-state")).to_have_text("none configured", timeout=15_000)
        expect(d.by_test_id("node-node-3")).to_have_attribute("data-state", "up")
        for control in ("load-rate", "ramp", "load-pause", "load-resume"):
            expect(d.by_test_id(control)).to_be_disabled()
        expect(d.by_test_id("latest-throughput")).to_have_text("\u2013")  # no value
        expect(d.by_test_id("targets")).to_contain_text("no load")
        expect(d.by_test_id("failures").locator("tbody tr")).to_have_text(["no load"])
        expect(d.by_test_id("failures-count")).to_have_text("")
        d.page.wait_for_timeout(1200)  # a few polls: none asks for failures (they would be 409s)
        assert not [u for u in d.requests if "/api/load/failures" in u], d.requests
        d.assert_clean()
    finally:
        fake.stop()


def test_grouped_series_points_are_charted_too(open_dashboard: Any) -> None:
    """Points grouped per second ({t, total, targets, nodes}) read like the generator's flat ones."""
    fake = FakeForge(grouped_series=True)
    fake.start()
    try:
        d = open_dashboard(f"{fake.url}/?token={TOKEN}")
        d.page.wait_for_function(f"() => {LATEST} > 40 && {LATEST} < 60", timeout=15_000)
        expect(d.by_test_id("scope").locator("option")).to_have_count(1 + 2 + 5, timeout=10_000)
        d.by_test_id("scope").select_option("route:place-order")
        d.page.wait_for_function(f"() => {LATEST} > 25 && {LATEST} < 35")  # 60 % of 50 req/s
        d.assert_clean()
    finally:
        fake.stop()


# ---------------------------------------------------------------- a real Forge: node processes


@pytest.fixture
def make_real_forge(tmp_path: Path) -> Any:
    """A factory: `aether.forge.app.open_forge` with real node processes on a thread with its own
    event loop -> (dashboard URL with the token, the Forge). Every Forge it started is stopped
    when the test ends (open_forge's own cleanup stops every process it started)."""
    started: list[tuple[dict[str, Any], threading.Thread]] = []

    def make(**options: Any) -> tuple[str, Any]:
        workdir = tmp_path / f"forge-{len(started)}"
        opts = forge_app.ForgeOptions(port=0, workdir=workdir, token=TOKEN, **options)
        ready = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            async def main() -> None:
                box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
                try:
                    async with forge_app.open_forge(opts, say=lambda _: None) as (forge, url):
                        box["forge"], box["url"] = forge, url
                        ready.set()
                        await box["stop"].wait()
                except BaseException as e:
                    box["error"] = e
                    raise
                finally:
                    ready.set()

            asyncio.run(main())

        thread = threading.Thread(target=run, name="real-forge", daemon=True)
        thread.start()
        started.append((box, thread))
        assert ready.wait(300), "Forge did not start within 300 s"
        if "error" in box:
            raise box["error"]
        return box["url"], box["forge"]

    try:
        yield make
    finally:
        for box, thread in started:
            if "stop" in box:
                box["loop"].call_soon_threadsafe(box["stop"].set)
            thread.join(120)


@pytest.mark.slow
def test_real_forge_kill_restart_and_kill_leader_are_shown(make_real_forge: Any, open_dashboard: Any) -> None:
    url, _forge = make_real_forge(nodes=3)
    d = open_dashboard(url)
    expect(d.by_test_id("quorum")).to_have_attribute("data-quorum", "true", timeout=60_000)
    for i in (1, 2, 3):
        expect(d.by_test_id(f"node-node-{i}")).to_have_attribute("data-state", "up", timeout=60_000)
    expect(d.by_test_id("leader")).to_have_text(re.compile(r"^node-[123]$"))
    leader = d.by_test_id("leader").text_content()
    follower = next(f"node-{i}" for i in (3, 2, 1) if f"node-{i}" != leader)
    # issue 16: a killed node is shown down within 3 s (its target: 2 s)
    started = time.monotonic()
    d.by_test_id(f"kill-{follower}").click()
    expect(d.by_test_id(f"node-{follower}")).to_have_attribute("data-state", "down", timeout=3_000)
    print(f"real Forge: {follower} shown down {time.monotonic() - started:.2f} s after the click")
    expect(d.by_test_id("status")).to_contain_text(f"kill {follower}: ")
    expect(d.by_test_id("quorum")).to_have_attribute("data-quorum", "true")  # 2 of 3
    expect(d.by_test_id("leader")).to_have_text(leader)
    d.by_test_id(f"restart-{follower}").click()
    expect(d.by_test_id(f"node-{follower}")).to_have_attribute("data-state", "up", timeout=60_000)
    expect(d.by_test_id(f"row-{follower}").locator("td").nth(2)).to_have_text("1")  # restarts
    # the leader killed: another node leads, with quorum
    d.by_test_id("kill-leader").click()
    expect(d.by_test_id(f"node-{leader}")).to_have_attribute("data-state", "down", timeout=3_000)
    expect(d.by_test_id("leader")).not_to_have_text(re.compile(f"^({leader}|none|\\?)$"), timeout=30_000)
    expect(d.by_test_id("quorum")).to_have_attribute("data-quorum", "true", timeout=30_000)
    expect(d.by_test_id("timeline")).to_contain_text(f"kill {leader}")
    d.assert_clean()


REAL_LOAD = """
[load]
rate = 10
[[load.targets]]
name = "price"
method = "GET"
path = "/api/pricing/${choice:PROD-ABC123,PROD-XYZ789}"
"""


@pytest.mark.slow
def test_real_forge_load_slider_raises_the_throughput(
    make_real_forge: Any, open_dashboard: Any, demo_wheels: Path
) -> None:
    """The order demo on 3 real nodes with the load generator: the slider's rate reaches the
    generator and the chart's latest throughput follows."""
    from aether.forge.config import parse_forge_config

    blueprint = Path(__file__).resolve().parent.parent / "examples" / "order_demo" / "demo-order.blueprint"
    load = parse_forge_config(REAL_LOAD).load
    url, _forge = make_real_forge(nodes=3, blueprint=blueprint, wheels=demo_wheels, load=load)
    d = open_dashboard(url)
    d.page.wait_for_function(f"() => {LATEST} >= 5 && {LATEST} <= 15", timeout=30_000)  # 10 req/s
    expect(d.by_test_id("latest-success")).to_have_text("100", timeout=30_000)
    expect(d.by_test_id("placement").locator("tbody tr")).not_to_have_count(0)
    # the real GET /api/load/failures answered (its rows, or its empty state; not "no load")
    expect(d.by_test_id("failures")).to_have_attribute("data-state", re.compile(r"^(empty|shown)$"))
    d.by_test_id("load-rate").fill("80")
    expect(d.by_test_id("load-state")).to_contain_text("80.0 req/s", timeout=10_000)
    d.page.wait_for_function(f"() => {LATEST} >= 60", timeout=30_000)
    expect(d.by_test_id("latest-success")).to_have_text("100")
    d.by_test_id("scope").select_option("route:price")
    d.page.wait_for_function(f"() => {LATEST} >= 60", timeout=10_000)
    d.assert_clean()


@pytest.mark.slow
def test_real_forge_partition_is_shown_with_leader_and_quorum(
    make_real_forge: Any, open_dashboard: Any
) -> None:
    """The leader cut off from the two others: the page shows the links across blocked and the
    majority's new leader with quorum; healing gives the links back."""
    url, _forge = make_real_forge(nodes=3)
    d = open_dashboard(url)
    expect(d.by_test_id("quorum")).to_have_attribute("data-quorum", "true", timeout=60_000)
    expect(d.by_test_id("leader")).to_have_text(re.compile(r"^node-[123]$"), timeout=60_000)
    leader = d.by_test_id("leader").text_content()
    others = sorted(f"node-{i}" for i in (1, 2, 3) if f"node-{i}" != leader)
    d.by_test_id(f"group-b-{leader}").check()
    d.by_test_id("partition").click()
    expect(d.by_test_id("status")).to_contain_text("links blocked", timeout=15_000)
    for other in others:
        a, b = sorted([leader, other], key=_natural)
        expect(d.by_test_id(f"link-{a}-{b}")).to_have_attribute("data-down", "true", timeout=15_000)
    a, b = others
    expect(d.by_test_id(f"link-{a}-{b}")).to_have_attribute("data-down", "false")
    expect(d.by_test_id("leader")).to_have_text(re.compile(f"^({a}|{b})$"), timeout=30_000)
    expect(d.by_test_id("quorum")).to_have_attribute("data-quorum", "true", timeout=30_000)
    print(f"screenshot: {d.screenshot('real-forge-partitioned')}")
    d.by_test_id("heal-network").click()
    expect(d.page.locator('#topology line[data-down="true"]')).to_have_count(0, timeout=30_000)
    expect(d.by_test_id("quorum")).to_have_attribute("data-quorum", "true", timeout=30_000)
    d.assert_clean()
