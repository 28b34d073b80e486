"""The scenarios' judging (pure: samples and counts in, criteria out) and their names and orders."""

from __future__ import annotations

import pytest

from aether.core.errors import BadRequest
from aether.forge.load import SentRequest
from aether.forge.scenarios import (
    CI_SUBSET,
    SCENARIOS,
    LoadCounts,
    OrderBook,
    Sample,
    at_least,
    at_most,
    quorum_gap,
    resolve_names,
    success_rate,
    within,
)

UP = frozenset({"node-1", "node-2", "node-3"})


def s(t: float, leader: str | None = "node-1", quorum: bool = True, up: frozenset[str] = UP) -> Sample:
    return Sample(t, leader, quorum, up, UP, up)


def test_quorum_gap_is_the_longest_stretch_without_quorum() -> None:
    samples = [s(0), s(1, quorum=False), s(1.5, quorum=False), s(2), s(3, quorum=False), s(6, quorum=False)]
    assert quorum_gap(samples, 0, 2.5) == 1.0
    assert quorum_gap(samples, 0, 7) == 4.0  # still without quorum at the end: counted to the end
    assert quorum_gap(samples, 2, 2.9) == 0.0
    assert quorum_gap([], 0, 10) == 0.0


def test_load_counts_exclude_the_nodes_the_fault_hit() -> None:
    before = LoadCounts({"a": 10, "b": 10}, {"a": 0, "b": 1})
    after = LoadCounts({"a": 30, "b": 12, "c": 5}, {"a": 0, "b": 9, "c": 0})
    delta = after.minus(before)
    assert delta.total() == (20 + 2 + 5, 8)
    assert delta.total(exclude={"b"}) == (25, 0)
    assert success_rate(delta) == pytest.approx(100 * 27 / 35)
    assert success_rate(delta, {"b"}) == 100.0
    assert success_rate(LoadCounts({}, {})) == 100.0


def test_criteria_say_what_was_expected_and_seen() -> None:
    assert within("x", 1.5, 2).passed and within("x", 1.5, 2).observed == "1.5 s"
    assert not within("x", None, 2).passed and within("x", None, 2).observed == "never"
    assert not within("x", 2.5, 2).passed
    assert at_most("failed", 0, 0).passed and not at_most("failed", 1, 0).passed
    assert at_least("rate", 99.5, 99, " %").passed and not at_least("rate", 98, 99, " %").passed
    assert at_least("rate", 98, 99, " %").expected == ">= 99 %"


def test_names_expand_and_unknown_ones_are_refused() -> None:
    assert resolve_names(["ci"]) == list(CI_SUBSET)
    assert resolve_names(["all"]) == list(SCENARIOS)
    assert resolve_names(["kill-leader", "latency"]) == ["kill-leader", "latency"]
    with pytest.raises(BadRequest, match=r"unknown scenario 'kil-leader'.*kill-leader"):
        resolve_names(["kil-leader"])
    wanted = {"kill-follower", "kill-leader", "rolling-restart", "partition-minority", "partition-two",
              "add-node", "remove-node", "load-spike", "latency", "crash-slice", "chaos"}
    assert set(SCENARIOS) == wanted


def _req(method: str, path: str) -> SentRequest:
    return SentRequest("t", "127.0.0.1:1", method, f"http://127.0.0.1:1{path}", {}, None)


def test_the_order_book_keeps_only_acknowledged_orders() -> None:
    book = OrderBook()
    post = _req("POST", "/api/orders")
    book.on_response("place-order", 201, b'{"orderId": "ORD-1", "status": "CONFIRMED"}', post)
    book.on_response("place-order", 200, b'{"orderId": "ORD-2"}', post)
    book.on_response("place-order", 503, b'{"orderId": "ORD-3"}', post)  # not acknowledged
    book.on_response("place-order", 201, b"not json", post)
    book.on_response("place-order", 201, b"[1, 2]", post)
    book.on_response("status", 200, b'{"orderId": "ORD-4"}', _req("GET", "/api/orders/ORD-4"))  # a read
    book.on_response("cancel", 200, b'{"orderId": "ORD-5"}', _req("POST", "/api/orders/ORD-5/x"))
    book.on_response("place-order", 201, None, post)
    assert book.ids == {"ORD-1", "ORD-2"}
