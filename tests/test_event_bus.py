"""Tests of aether.transport.EventBus (in-process typed pub/sub)."""

from __future__ import annotations

import logging

import msgspec
import pytest

from aether.transport import EventBus, PeerDown, PeerUp, QuorumChanged, TransportEvent

pytestmark = pytest.mark.timeout(30)


class Base:
    pass


class Child(Base):
    def __init__(self, n: int = 0) -> None:
        self.n = n


class Other:
    pass


def test_publish_reaches_exact_type_and_base_classes_in_subscription_order() -> None:
    r = EventBus()
    calls: list[str] = []
    r.subscribe(Child, lambda m: calls.append("child-1"))
    r.subscribe(Base, lambda m: calls.append("base"))
    r.subscribe(object, lambda m: calls.append("any"))
    r.subscribe(Child, lambda m: calls.append("child-2"))
    r.subscribe(Other, lambda m: calls.append("other"))

    r.publish(Child())
    assert calls == ["child-1", "base", "any", "child-2"]
    calls.clear()
    r.publish(Base())
    assert calls == ["base", "any"]
    calls.clear()
    r.publish(42)
    assert calls == ["any"]
    assert r.handler_count(Child) == 4 and r.handler_count(Other) == 2


def test_handler_receives_the_message_itself() -> None:
    r = EventBus()
    got: list[Child] = []
    r.subscribe(Child, got.append)
    m = Child(7)
    r.publish(m)
    assert got == [m] and got[0] is m


def test_unsubscribe_is_idempotent_and_precise() -> None:
    r = EventBus()
    calls: list[str] = []

    def h(m: object) -> None:
        calls.append("h")

    unsub_1 = r.subscribe(Child, h)
    unsub_2 = r.subscribe(Child, h)  # the same function twice: two subscriptions
    r.publish(Child())
    assert calls == ["h", "h"]
    unsub_1()
    unsub_1()
    calls.clear()
    r.publish(Child())
    assert calls == ["h"]
    unsub_2()
    calls.clear()
    r.publish(Child())
    assert calls == []
    assert r.handler_count(Child) == 0


def test_failing_handler_is_logged_and_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.bus.failing")
    r = EventBus(log)
    calls: list[str] = []

    def bad(m: object) -> None:
        raise RuntimeError("handler exploded")

    r.subscribe(Child, lambda m: calls.append("first"))
    r.subscribe(Child, bad)
    r.subscribe(Base, lambda m: calls.append("last"))
    r.publish(Child())
    assert calls == ["first", "last"]
    errors = [rec for rec in caplog.records if rec.name == log.name and rec.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "handler exploded" in caplog.text


def test_subscribe_during_publish_applies_to_next_publish() -> None:
    r = EventBus()
    calls: list[str] = []

    def first(m: object) -> None:
        calls.append("first")
        r.subscribe(Child, lambda m: calls.append("late"))

    unsub = r.subscribe(Child, first)
    r.publish(Child())
    assert calls == ["first"]
    unsub()
    calls.clear()
    r.publish(Child())
    assert calls == ["late"]


def test_routers_are_independent() -> None:
    r1, r2 = EventBus(), EventBus()
    got1: list[object] = []
    got2: list[object] = []
    r1.subscribe(object, got1.append)
    r2.subscribe(object, got2.append)
    r1.publish("x")
    assert got1 == ["x"] and got2 == []


def test_transport_events_hierarchy_and_values() -> None:
    r = EventBus()
    every: list[TransportEvent] = []
    downs: list[PeerDown] = []
    r.subscribe(TransportEvent, every.append)
    r.subscribe(PeerDown, downs.append)
    events = [PeerUp("b"), PeerDown("b", "heartbeat timeout"), QuorumChanged(False, frozenset())]
    for ev in events:
        r.publish(ev)
    assert every == events and downs == [events[1]]
    with pytest.raises(AttributeError):
        events[0].node_id = "c"  # type: ignore[misc]
    assert msgspec.structs.asdict(events[2]) == {"has_quorum": False, "up": frozenset()}


def test_subscribe_validates_arguments() -> None:
    r = EventBus()
    with pytest.raises(TypeError):
        r.subscribe("Child", lambda m: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        r.subscribe(Child, "not callable")  # type: ignore[arg-type]
