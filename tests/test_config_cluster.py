"""Slice configuration and secrets on a 3-node in-process cluster, through the management API
(issue 14): `[slices.NAME.config]` reaches `context.config`, a missing secret is a FAILED reason
naming it, setting it heals the slice, a changed config restarts instances one at a time while
calls keep succeeding, a slice with a reload hook is reconfigured in place, and the secret's value
appears in none of the API's answers, the events, the audit log or the logs."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from conftest import running_cluster

pytestmark = pytest.mark.timeout(120)

SECRET = "s3cr3t-Pa55word-0f-the-db"
ROTATED = "r0tated-Pa55word-n3xt"

CONFIGURED = """
import msgspec
from aether.slices import Slice, entry

EVENTS = []

class Db(msgspec.Struct):
    host: str
    password: str

class Settings(msgspec.Struct):
    greeting: str
    db: Db
    retries: int = 1

class Configured(Slice):
    config_type = Settings

    async def start(self):
        EVENTS.append(("start", self.context.node_id, self.context.instance, self.context.config.greeting))

    async def stop(self):
        EVENTS.append(("stop", self.context.node_id, self.context.instance, self.context.config.greeting))

    @entry
    async def show(self) -> dict:
        c = self.context.config
        return {"greeting": c.greeting, "retries": c.retries, "password_ok": c.db.password == %r,
                "password_len": len(c.db.password), "node": self.context.node_id}
"""

RELOADABLE = """
from aether.slices import Slice, entry

EVENTS = []

class Reloadable(Slice):
    async def start(self):
        EVENTS.append(("start", self.context.node_id, self.context.instance))

    async def reconfigure(self, config):
        EVENTS.append(("reconfigure", self.context.node_id, self.context.instance))

    @entry
    async def token_len(self) -> int:
        return len(self.context.config["token"])
"""

BLUEPRINT = """
id = "configured"

[slices.configured]
artifact = "org.example:configured:1.0.0"
instances = 4

[slices.configured.config]
greeting = "{greeting}"
retries = 3
db = {{ host = "db.local", password = {{ secret = "db-password" }} }}

[slices.reloadable]
artifact = "org.example:reloadable:1.0.0"
instances = 2

[slices.reloadable.config]
token = {{ secret = "db-password" }}
"""


def _modules() -> dict[str, Any]:
    import sys

    return {n: sys.modules[f"{n}_slice"] for n in ("configured", "reloadable") if f"{n}_slice" in sys.modules}


async def until(cond: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await cond()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


async def test_config_and_secrets_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    extra = {
        "org.example:configured:1.0.0": (CONFIGURED % SECRET, "Configured"),
        "org.example:reloadable:1.0.0": (RELOADABLE, "Reloadable"),
    }
    seen: list[str] = []  # every answer and event, checked for the secret's value at the end
    async with running_cluster(tmp_path, extra=extra) as nodes, aiohttp.ClientSession() as http:
        url = nodes[0].management.url
        sub = nodes[1].management.events.subscribe()

        async def req(method: str, path: str, body: Any = None, *, base: str = url) -> tuple[int, Any]:
            kw: dict[str, Any] = {}
            if isinstance(body, str):
                kw = {"data": body, "headers": {"Content-Type": "application/toml"}}
            elif body is not None:
                kw = {"json": body}
            async with http.request(method, base + path, **kw) as r:
                text = await r.text()
                seen.append(text)
                return r.status, (msgspec.json.decode(text) if text else None)

        async def states(artifact: str) -> list[tuple[str, str | None]]:
            _, doc = await req("GET", "/api/v1/slices")
            for s in doc:
                if s["artifact"] == artifact:
                    return [(i["state"], i["reason"]) for i in s["instances"]]
            return []

        # 1. the blueprint names a secret that is not set: accepted, the instances FAIL naming it
        status, doc = await req("POST", "/api/v1/blueprints", BLUEPRINT.format(greeting="hello"))
        assert status == 201, doc
        stored = {s["artifact"]: s for s in doc["slices"]}["org.example:configured:1.0.0"]
        assert stored["config"]["db"]["password"] == {"secret": "db-password"}  # a reference, kept typed
        assert stored["config"]["retries"] == 3

        async def failed() -> Any:
            return [r for st, r in await states("org.example:configured:1.0.0") if st == "FAILED"]

        reasons = await until(failed, "FAILED for the missing secret")
        assert "names the secret 'db-password', which is not set" in reasons[0]
        assert "aether secret set db-password" in reasons[0]

        # 2. setting it heals the slices (the leader retries after its backoff)
        status, doc = await req("PUT", "/api/v1/secrets/db-password", {"value": SECRET})
        assert status == 201 and doc["version"] == 1 and set(doc) == {"name", "created", "updated", "version"}

        async def all_active() -> bool:
            a = await states("org.example:configured:1.0.0")
            b = await states("org.example:reloadable:1.0.0")
            return (sum(1 for st, _ in a if st == "ACTIVE") == 3 and all(st == "ACTIVE" for st, _ in a)
                    and len(b) == 2 and all(st == "ACTIVE" for st, _ in b))

        await until(all_active, "ACTIVE after the secret was set", 60)
        status, doc = await req("POST", "/api/v1/invoke/org.example:configured/show", {})
        assert status == 200, doc
        assert doc["greeting"] == "hello" and doc["retries"] == 3 and doc["password_ok"] is True
        status, doc = await req("POST", "/api/v1/invoke/org.example:reloadable/token_len", {})
        assert (status, doc) == (200, len(SECRET))

        # 3. a changed config: every instance restarted, one at a time per node, calls keep working
        events = _modules()["configured"].EVENTS
        mark = len(events)
        errors: list[str] = []
        greetings: set[str] = set()
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                st, d = await req("POST", "/api/v1/invoke/org.example:configured/show", {})
                if st != 200:
                    errors.append(f"{st}: {d}")
                else:
                    greetings.add(d["greeting"])
                await asyncio.sleep(0.01)

        calling = asyncio.create_task(caller())
        status, _ = await req("POST", "/api/v1/blueprints", BLUEPRINT.format(greeting="bonjour"))
        assert status == 201

        async def all_bonjour() -> bool:
            got = set()
            for n in nodes:
                for _ in range(4):
                    show = "/api/v1/invoke/org.example:configured/show"
                    _, d = await req("POST", show, {}, base=n.management.url)
                    got.add(d["greeting"])
            return got == {"bonjour"}

        await until(all_bonjour, "every instance on the new config")
        await asyncio.sleep(0.3)
        stop.set()
        await calling
        assert errors == [], errors[:5]
        assert greetings == {"hello", "bonjour"}
        changed = events[mark:]
        assert len([e for e in changed if e[0] == "start"]) == 4  # each instance restarted once
        by_node: dict[str, list[tuple[str, int, str]]] = {}
        for kind, node, inst, greeting in changed:
            by_node.setdefault(node, []).append((kind, inst, greeting))
        assert sorted(len(v) for v in by_node.values()) == [2, 2, 4]
        for node, seq in by_node.items():  # make-before-break, one instance after the other
            for start, stop_ in zip(seq[::2], seq[1::2], strict=True):
                assert start[0] == "start" and start[2] == "bonjour", (node, seq)
                assert stop_ == ("stop", start[1], "hello"), (node, seq)

        # 3b. a config that does not decode: the running instances keep serving the old one, the
        # reason names the field; going back to the running config clears it
        bad = BLUEPRINT.format(greeting="bonjour").replace('greeting = "bonjour"', "greeting = 42")
        status, _ = await req("POST", "/api/v1/blueprints", bad)
        assert status == 201

        async def not_applied() -> Any:
            got = await states("org.example:configured:1.0.0")
            ok = len(got) == 3 and all(
                st == "ACTIVE" and r and "config change not applied" in r for st, r in got
            )
            return got if ok else None

        got = await until(not_applied, "the bad config reported, the instances still ACTIVE")
        assert "does not fit Settings: Expected `str`, got `int` - at `$.greeting`" in got[0][1]
        for _ in range(6):
            status, doc = await req("POST", "/api/v1/invoke/org.example:configured/show", {})
            assert status == 200 and doc["greeting"] == "bonjour", doc
        status, _ = await req("POST", "/api/v1/blueprints", BLUEPRINT.format(greeting="bonjour"))

        async def cleared() -> bool:
            got = await states("org.example:configured:1.0.0")
            return len(got) == 3 and all(st == "ACTIVE" and r is None for st, r in got)

        await until(cleared, "the reason cleared once the config is the running one again")

        # 4. a changed secret: the slice with a reload hook keeps its objects
        rel = _modules()["reloadable"].EVENTS
        rel_mark = len(rel)
        status, doc = await req("PUT", "/api/v1/secrets/db-password", {"value": ROTATED})
        assert status == 200 and doc["version"] == 2

        async def rotated() -> bool:
            got = [
                (await req("POST", "/api/v1/invoke/org.example:reloadable/token_len", {},
                           base=n.management.url))[1]
                for n in nodes
            ]
            return got == [len(ROTATED)] * len(nodes)

        await until(rotated, "the reloadable slice on the rotated secret")
        assert sorted(e[0] for e in rel[rel_mark:]) == ["reconfigure", "reconfigure"]  # no restart

        # 5. secrets: list shows no values; delete refused while used; errors name the problem
        status, doc = await req("GET", "/api/v1/secrets")
        assert status == 200 and [s["name"] for s in doc] == ["db-password"] and "value" not in doc[0]
        status, doc = await req("DELETE", "/api/v1/secrets/db-password")
        assert status == 409 and "blueprint configured" in doc["detail"]
        status, doc = await req("DELETE", "/api/v1/secrets/nope")
        assert status == 404 and "no secret 'nope'" in doc["detail"]
        status, doc = await req("PUT", "/api/v1/secrets/bad%20name", {"value": "x"})
        assert status == 400 and "invalid secret name" in doc["detail"]
        status, doc = await req("PUT", "/api/v1/secrets/x", {"value": ""})
        assert status == 400

        # 6. nothing shows the value: the store listing, blueprints, slices, audit, events, logs
        for path in ("/api/v1/kv", "/api/v1/kv?prefix=secrets/", "/api/v1/blueprints",
                     "/api/v1/blueprints/configured", "/api/v1/slices", "/api/v1/audit?limit=1000",
                     "/api/v1/status"):
            status, _ = await req("GET", path)
            assert status == 200, path
        status, doc = await req("GET", "/api/v1/kv?prefix=secrets/")
        assert doc["entries"][0]["value"]["value"] == "***" and doc["entries"][0]["value"]["version"] == 2
        while (ev := await sub.next(0.01)) is not None:
            seen.append(msgspec.json.encode(ev.data).decode())
        assert any("blueprint-applied" in s for s in seen)
        everything = "\n".join(seen) + "\n" + caplog.text
        for value in (SECRET, ROTATED):
            assert value not in everything
        # the audit names the secret written, not its value
        _, audit = await req("GET", "/api/v1/audit?limit=1000")
        assert any(e["path"] == "/api/v1/secrets/db-password" and e["target"] == "db-password" for e in audit)
        sub.close()


async def test_two_blueprints_may_not_configure_one_artifact_differently(tmp_path: Path) -> None:
    extra = {"org.example:configured:1.0.0": (CONFIGURED % SECRET, "Configured")}
    async with running_cluster(tmp_path, extra=extra) as nodes:
        svc = nodes[0].deployments
        text = (
            'id = "{id}"\n[slices.c]\nartifact = "org.example:configured:1.0.0"\n'
            '[slices.c.config]\ngreeting = "{g}"\n'
        )
        await svc.apply_blueprint(text.format(id="one", g="a"), "one.toml")
        await svc.apply_blueprint(text.format(id="one", g="b"), "one.toml")  # replacing itself is fine
        await svc.apply_blueprint(text.format(id="two", g="b"), "two.toml")  # the same config is fine
        from aether.deploy.errors import BlueprintError

        with pytest.raises(BlueprintError, match=re.escape(
            "two.toml: org.example:configured:1.0.0 is configured differently by blueprint 'one'"
        )):
            await svc.apply_blueprint(text.format(id="two", g="c"), "two.toml")

        # these configs lack `db`: the instance starting with one goes FAILED naming the field
        async def failed() -> Any:
            for s in svc.slices_status():
                for i in s.instances:
                    if s.artifact == "org.example:configured:1.0.0" and i.state == "FAILED":
                        return i.reason
            return None

        reason = await until(failed, "FAILED for a config that does not decode")
        assert reason == (
            "activate failed: the config of org.example:configured:1.0.0 does not fit Settings: Object "
            "missing required field `db` (its [slices.NAME.config] table in the blueprint)"
        )
