"""Slice configuration in the runtime: `config_type` decoding, FAILED reasons naming the field,
redaction of secret values, and changing the config of running instances (restart one at a time,
or the `reconfigure` hook)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.secrets import MissingSecret, ResolvedConfig
from aether.deploy.config import resolve
from aether.slices import SliceStartError
from aether.slices.loader import ImportSpace
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.slices.testing import StoreInvoker, build_slice_wheel, isolated_imports

pytestmark = pytest.mark.timeout(30)

dec = msgspec.msgpack.decode

TYPED = """
import asyncio
from typing import Literal
import msgspec
from aether.slices import Slice, entry

EVENTS = []
GATE = asyncio.Event()

class Db(msgspec.Struct):
    host: str
    password: str
    port: int = 5432

class Settings(msgspec.Struct):
    greeting: str
    db: Db
    mode: Literal["fast", "safe"] = "safe"

class Typed(Slice):
    config_type = Settings

    async def start(self):
        EVENTS.append(("start", self.context.instance, self.context.config.greeting))
        if self.context.config.greeting == "explode":
            raise RuntimeError("cannot log in with " + self.context.config.db.password)
        if self.context.config.greeting == "exit":
            raise SystemExit("cannot log in with " + self.context.config.db.password)

    async def stop(self):
        EVENTS.append(("stop", self.context.instance, self.context.config.greeting))

    @entry
    async def show(self) -> dict:
        c = self.context.config
        assert isinstance(c, Settings)
        return {"greeting": c.greeting, "port": c.db.port, "password": c.db.password,
                "instance": self.context.instance}

    @entry
    async def login(self) -> str:
        try:
            dsn = "postgresql://app:" + self.context.config.db.password + "@db"
            raise ConnectionError("cannot connect to " + dsn)
        except ConnectionError as exc:
            raise RuntimeError("login failed: " + str(exc)) from exc

    @entry
    async def slow(self) -> str:
        greeting = self.context.config.greeting
        await GATE.wait()
        return greeting
"""

HOOKED = """
from aether.slices import Slice, entry

EVENTS = []

class Hooked(Slice):
    async def start(self):
        EVENTS.append(("start", self.context.instance))

    async def stop(self):
        EVENTS.append(("stop", self.context.instance))

    async def reconfigure(self, config):
        if config.get("reject"):
            raise ValueError("will not take " + config["token"])
        EVENTS.append(("reconfigure", self.context.instance, dict(config)))

    @entry
    async def show(self) -> dict:
        return dict(self.context.config)

    @entry
    async def spill(self) -> str:
        raise RuntimeError("rejected token " + self.context.config["token"])
"""

TYPED_A = Artifact.parse("org.example:typed:1.0.0")
HOOKED_A = Artifact.parse("org.example:hooked:1.0.0")
PASSWORD = "hunter2-very-secret"


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    with isolated_imports():
        yield


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(tmp_path / "repo")
    r.deploy(build_slice_wheel(tmp_path / "w1", str(TYPED_A), TYPED, "Typed", module="typed_slice"))
    r.deploy(build_slice_wheel(tmp_path / "w2", str(HOOKED_A), HOOKED, "Hooked", module="hooked_slice"))
    return r


class Configs:
    """A `config_for` whose config and secrets a test changes (like the node's store)."""

    def __init__(self, config: dict[str, Any], secrets: dict[str, str] | None = None) -> None:
        self.config = config
        self.secrets = dict(secrets or {})

    def __call__(self, artifact: Artifact) -> ResolvedConfig:
        return resolve(self.config, self.secrets, str(artifact))


def runtime(repo: Repository, tmp_path: Path, configs: Configs) -> SliceRuntime:
    inv = StoreInvoker()
    rt = SliceRuntime("node-1", repo, tmp_path / "data", inv, config_for=configs, space=ImportSpace())
    inv.add(rt)
    return rt


def typed_config(greeting: str = "hello", **db: Any) -> dict[str, Any]:
    return {"greeting": greeting, "db": {"host": "db.local", "password": {"secret": "db-password"}, **db}}


def events(module: str) -> list[Any]:
    return sys.modules[module].EVENTS  # type: ignore[no-any-return]


async def test_config_is_decoded_into_the_declared_type_with_secrets_filled_in(
    repo: Repository, tmp_path: Path
) -> None:
    rt = runtime(repo, tmp_path, Configs(typed_config(port=6543), {"db-password": PASSWORD}))
    await rt.load(TYPED_A)
    await rt.activate(TYPED_A, [1])
    got = dec(await rt.call(TYPED_A, "show", b""))
    assert got == {"greeting": "hello", "port": 6543, "password": PASSWORD, "instance": 1}
    await rt.close()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (typed_config(port="6543"), r"does not fit Settings: Expected `int`, got `str` - at `\$\.db\.port`"),
        ({"db": {"host": "h", "password": "p"}},
         r"does not fit Settings: Object missing required field `greeting`"),
        ({**typed_config(), "extra": 1, "mode": "turbo"}, r"Invalid enum value 'turbo' - at `\$\.mode`"),
    ],
)
async def test_a_config_that_does_not_decode_fails_the_start_naming_the_field(
    repo: Repository, tmp_path: Path, config: dict[str, Any], expected: str
) -> None:
    rt = runtime(repo, tmp_path, Configs(config, {"db-password": PASSWORD}))
    await rt.load(TYPED_A)
    with pytest.raises(SliceStartError, match=expected) as e:
        await rt.activate(TYPED_A, [1])
    assert "the config of org.example:typed:1.0.0" in e.value.reason
    assert events("typed_slice") == []  # no object was started
    assert rt.state(TYPED_A) == "loaded"


async def test_secret_values_are_redacted_from_start_failures(repo: Repository, tmp_path: Path) -> None:
    # a secret decoded into a Literal: msgspec's message would quote it
    configs = Configs({**typed_config(), "mode": {"secret": "db-password"}}, {"db-password": PASSWORD})
    rt = runtime(repo, tmp_path, configs)
    await rt.load(TYPED_A)
    with pytest.raises(SliceStartError) as e:
        await rt.activate(TYPED_A, [1])
    assert PASSWORD not in e.value.reason and "Invalid enum value '***'" in e.value.reason
    # start() raising with the secret in its message
    configs.config = typed_config("explode")
    with pytest.raises(SliceStartError) as e:
        await rt.activate(TYPED_A, [1])
    assert PASSWORD not in str(e.value) and "cannot log in with ***" in e.value.reason


async def test_a_missing_secret_fails_the_start_naming_it(repo: Repository, tmp_path: Path) -> None:
    rt = runtime(repo, tmp_path, Configs(typed_config()))
    await rt.load(TYPED_A)
    with pytest.raises(SliceStartError, match="names the secret 'db-password', which is not set: "
                       "set it with `aether secret set db-password`"):
        await rt.activate(TYPED_A, [1])
    with pytest.raises(MissingSecret):
        resolve({"a": {"secret": "x"}, "b": [{"secret": "y"}]}, {"x": "1"})


async def test_reconfigure_restarts_an_instance_make_before_break(repo: Repository, tmp_path: Path) -> None:
    configs = Configs(typed_config("v1"), {"db-password": PASSWORD})
    rt = runtime(repo, tmp_path, configs)
    await rt.load(TYPED_A)
    await rt.activate(TYPED_A, [1, 2])
    slow = asyncio.create_task(rt.call(TYPED_A, "slow", b"", instance=1))  # in flight on the old object
    await asyncio.sleep(0.05)
    configs.config = typed_config("v2")
    restart = asyncio.create_task(rt.reconfigure(TYPED_A, 1))
    for _ in range(100):  # the new object is started while the old one still drains its call
        if ("start", 1, "v2") in events("typed_slice"):
            break
        await asyncio.sleep(0.01)
    assert ("start", 1, "v2") in events("typed_slice")
    assert ("stop", 1, "v1") not in events("typed_slice")
    assert dec(await rt.call(TYPED_A, "show", b"", instance=1))["greeting"] == "v2"  # serves meanwhile
    sys.modules["typed_slice"].GATE.set()
    assert dec(await slow) == "v1"
    assert await restart == "restarted"
    assert events("typed_slice")[-1] == ("stop", 1, "v1")
    assert dec(await rt.call(TYPED_A, "show", b"", instance=2))["greeting"] == "v1"  # one at a time
    assert await rt.reconfigure(TYPED_A, 2) == "restarted"
    assert await rt.reconfigure(TYPED_A, 9) == "absent"
    assert {dec(await rt.call(TYPED_A, "show", b"", instance=i))["greeting"] for i in (1, 2)} == {"v2"}
    await rt.close()


async def test_a_failed_restart_leaves_the_old_instance_serving(repo: Repository, tmp_path: Path) -> None:
    configs = Configs(typed_config("v1"), {"db-password": PASSWORD})
    rt = runtime(repo, tmp_path, configs)
    await rt.load(TYPED_A)
    await rt.activate(TYPED_A, [1])
    configs.config = typed_config(port="nope")
    with pytest.raises(SliceStartError, match=r"\$\.db\.port"):
        await rt.reconfigure(TYPED_A, 1)
    assert dec(await rt.call(TYPED_A, "show", b""))["greeting"] == "v1"
    await rt.close()


async def test_the_reconfigure_hook_keeps_the_object(repo: Repository, tmp_path: Path) -> None:
    configs = Configs({"token": {"secret": "api-token"}, "level": 1}, {"api-token": PASSWORD})
    rt = runtime(repo, tmp_path, configs)
    await rt.load(HOOKED_A)
    await rt.activate(HOOKED_A, [1])
    configs.config = {"token": {"secret": "api-token"}, "level": 2}
    configs.secrets["api-token"] = "rotated-token-value"
    assert await rt.reconfigure(HOOKED_A, 1) == "reloaded"
    assert events("hooked_slice") == [
        ("start", 1), ("reconfigure", 1, {"token": "rotated-token-value", "level": 2}),
    ]
    assert dec(await rt.call(HOOKED_A, "show", b"")) == {"token": "rotated-token-value", "level": 2}
    configs.config = {"token": {"secret": "api-token"}, "reject": True}
    with pytest.raises(SliceStartError) as e:
        await rt.reconfigure(HOOKED_A, 1)
    assert e.value.reason == (
        "reconfigure() of org.example:hooked:1.0.0 instance 1 raised ValueError: will not take ***"
    )
    seen = events("hooked_slice")
    await rt.close()
    assert seen[-1] == ("stop", 1)  # the same object all along: started once, stopped once


async def test_secret_values_are_redacted_from_what_an_entry_raises(repo: Repository, tmp_path: Path) -> None:
    # found walking docs/slices.md: an entry's error holding a secret (a driver's DSN) was answered
    # to the HTTP client as the 502's detail and logged with its traceback, value included
    import traceback

    rt = runtime(repo, tmp_path, Configs(typed_config(), {"db-password": PASSWORD}))
    await rt.load(TYPED_A)
    await rt.activate(TYPED_A, [1])
    with pytest.raises(RuntimeError) as e:
        await rt.call(TYPED_A, "login", b"")
    text = "".join(traceback.format_exception(e.value))
    assert PASSWORD not in text, text
    assert "login failed: cannot connect to postgresql://app:***@db" in str(e.value)
    assert "ConnectionError: cannot connect to postgresql://app:***@db" in text  # the cause, too
    assert dec(await rt.call(TYPED_A, "show", b""))["password"] == PASSWORD  # the slice still has it


async def test_a_contained_exit_from_a_hook_is_redacted_in_the_log(
    repo: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """start() raising `SystemExit` with a secret in its text: contained, the start fails; the
    reason and the node's log line about it have the value replaced (the log line had it)."""
    rt = runtime(repo, tmp_path, Configs(typed_config("exit"), {"db-password": PASSWORD}))
    await rt.load(TYPED_A)
    with caplog.at_level(logging.ERROR), pytest.raises(SliceStartError) as e:
        await rt.activate(TYPED_A, [1])
    assert "raised SystemExit(cannot log in with ***)" in e.value.reason
    assert "raised SystemExit(cannot log in with ***): contained" in caplog.text
    assert PASSWORD not in caplog.text and PASSWORD not in e.value.reason
    await rt.close()


async def test_an_instance_reconfigured_in_place_redacts_its_new_secret_values(
    repo: Repository, tmp_path: Path
) -> None:
    """After the reconfigure hook took a rotated secret, what an entry raises with the new value is
    redacted (the instance kept redacting the values it started with only)."""
    configs = Configs({"token": {"secret": "api-token"}}, {"api-token": PASSWORD})
    rt = runtime(repo, tmp_path, configs)
    await rt.load(HOOKED_A)
    await rt.activate(HOOKED_A, [1])
    configs.secrets["api-token"] = "rotated-token-value"
    assert await rt.reconfigure(HOOKED_A, 1) == "reloaded"
    with pytest.raises(RuntimeError) as e:
        await rt.call(HOOKED_A, "spill", b"")
    assert str(e.value) == "rejected token ***"
    await rt.close()
