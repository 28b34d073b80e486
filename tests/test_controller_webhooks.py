"""`WebhookSender`: a slow or failing webhook never blocks the controller; timeouts, retries with
backoff, a bounded queue that drops the oldest, event filtering, config changes. Local aiohttp
servers stand for the receivers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from aether.controller.config import Webhook
from aether.controller.types import Decision
from aether.controller.webhooks import WebhookSender, event_of

pytestmark = pytest.mark.timeout(30)


def decision(seq: int, kind: str = "scale_up") -> Decision:
    return Decision(seq, 1000.0 + seq, kind, "target:in_flight", f"decision {seq}",  # type: ignore[arg-type]
                    artifact="org.demo:a:1.0.0", from_count=1, to_count=2)


@asynccontextmanager
async def receiver(handle: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


def test_event_of() -> None:
    assert event_of(decision(1, "alert_firing")) == "alert"
    assert event_of(decision(1, "alert_resolved")) == "alert"
    assert event_of(decision(1, "skip")) == "decision"


async def test_failing_then_succeeding_webhook_is_retried_with_backoff() -> None:
    got: list[dict[str, Any]] = []
    attempts: list[float] = []

    async def handle(request: web.Request) -> web.Response:
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            return web.Response(status=503)
        got.append(json.loads(await request.read()))
        return web.Response(status=204)

    async with receiver(handle) as url:
        sender = WebhookSender(backoff=0.05, backoff_cap=1.0)
        sender.set_webhooks([Webhook(url, events=["decision"], timeout=2.0, retries=3)])
        await sender.start()
        try:
            sender.submit(decision(1))
            await until(lambda: len(got) == 1)
            assert got[0]["kind"] == "decision"
            assert got[0]["decision"]["seq"] == 1 and got[0]["decision"]["kind"] == "scale_up"
            assert attempts[2] - attempts[1] >= attempts[1] - attempts[0] >= 0.04  # backoff doubles
            (st,) = sender.stats()
            assert (st.sent, st.failed, st.retries, st.last_error) == (1, 0, 2, None)
        finally:
            await sender.stop()


async def test_slow_webhook_times_out_gives_up_and_never_blocks_submit() -> None:
    calls = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(5)
        return web.Response(status=200)

    async with receiver(slow) as url:
        sender = WebhookSender(queue_size=3, backoff=0.01)
        sender.set_webhooks([Webhook(url, events=["alert", "decision"], timeout=0.2, retries=1)])
        await sender.start()
        try:
            t0 = time.perf_counter()
            for i in range(10):
                sender.submit(decision(i))
            assert time.perf_counter() - t0 < 0.05  # submit never waits
            await until(lambda: sender.stats()[0].failed >= 1)
            st = sender.stats()[0]
            assert st.last_error is not None and "no answer within 0.2 s" in st.last_error
            assert st.dropped >= 6  # the queue holds 3; the oldest went first
            assert calls >= 2  # one retry
        finally:
            await sender.stop()


async def test_events_filter_and_config_change() -> None:
    got: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(json.loads(await request.read())["kind"])
        return web.Response(status=200)

    async with receiver(handle) as url:
        sender = WebhookSender()
        sender.set_webhooks([Webhook(url, events=["alert"])])
        await sender.start()
        try:
            sender.submit(decision(1))  # a decision: not wanted
            sender.submit(decision(2, "alert_firing"))
            await until(lambda: got == ["alert"])
            sender.set_webhooks([])  # removed: nothing more is delivered
            sender.submit(decision(3, "alert_resolved"))
            await asyncio.sleep(0.2)
            assert got == ["alert"] and sender.stats() == []
        finally:
            await sender.stop()


async def test_unreachable_webhook_fails_and_is_counted() -> None:
    sender = WebhookSender(backoff=0.01)
    sender.set_webhooks([Webhook("http://127.0.0.1:9/hook", events=["decision"], timeout=0.5, retries=2)])
    await sender.start()
    try:
        sender.submit(decision(1))
        await until(lambda: sender.stats()[0].failed == 1)
        assert sender.stats()[0].retries == 2
    finally:
        await sender.stop()


async def test_the_leaders_decisions_reach_a_slow_webhook_without_slowing_the_step() -> None:
    from aether.controller.service import ControllerService
    from aether.kv.keys import ControllerConfigValue
    from controller_fakes import FakeKV, FakeLeader, FakeMetrics, FakeTransport, ScriptedCore

    got: list[dict[str, Any]] = []

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        got.append(json.loads(await request.read()))
        return web.Response(status=200)

    async with receiver(slow) as url:
        text = f'[[webhooks]]\nurl = "{url}"\nevents = ["alert", "decision"]\ntimeout = 2.0\n'
        kv = FakeKV({"controller/config": ControllerConfigValue(text, 1.0)})
        cores: list[ScriptedCore] = []

        def factory(cfg: Any, mem: Any) -> ScriptedCore:
            core = ScriptedCore(cfg, mem)
            core.plan = lambda obs: [{"kind": "alert_firing", "rule": "slow", "reason": "p99 high"},
                                     {"kind": "skip", "artifact": "a", "rule": "cooldown"}]
            cores.append(core)
            return core

        svc = ControllerService(kv, FakeLeader("node-1", ["node-1"], "node-1"), FakeTransport("node-1", {}),  # type: ignore[arg-type]
                                FakeMetrics(), core_factory=factory, interval=60.0)
        await svc.start()
        try:
            t0 = time.perf_counter()
            svc.tick()
            svc.tick()
            assert time.perf_counter() - t0 < 0.1
            await until(lambda: len(got) == 4)
            assert [g["kind"] for g in got] == ["alert", "decision", "alert", "decision"]
            assert [g["decision"]["seq"] for g in got] == [1, 2, 3, 4]
            # the receiver holds the 4th before its answer reaches the sender, which counts it then
            await until(lambda: svc.status().webhooks[0].sent == 4)
        finally:
            await svc.stop()


async def test_a_url_aiohttp_refuses_is_a_failed_delivery_not_a_dead_task() -> None:
    sender = WebhookSender(backoff=0.01)
    sender.set_webhooks([Webhook("http://[not-a-host/hook", events=["decision"], timeout=0.5, retries=1)])
    await sender.start()
    try:
        sender.submit(decision(1))
        sender.submit(decision(2))
        await until(lambda: sender.stats()[0].failed == 2)
    finally:
        await sender.stop()
