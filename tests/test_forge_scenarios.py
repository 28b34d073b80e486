"""The scenarios' judging (pure: samples and counts in, criteria out) and their names and orders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aether.core.errors import BadRequest
from aether.forge.load import FailedRequest, SentRequest
from aether.forge.scenarios import (
    CI_SUBSET,
    SCENARIOS,
    LoadCounts,
    OrderBook,
    Sample,
    ScenarioReport,
    at_least,
    at_most,
    failed_share,
    failure_examples,
    ordered_quantities,
    other_version,
    quorum_gap,
    resolve_names,
    stock_keys,
    stock_taken_matches,
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
              "add-node", "remove-node", "load-spike", "latency", "crash-slice", "chaos", "update",
              "canary-rollback"}
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


def _order(body: str) -> SentRequest:
    return SentRequest("place-order", "127.0.0.1:1", "POST", "http://127.0.0.1:1/api/orders", {}, body)


def test_the_order_book_keeps_the_units_each_acknowledged_order_asked_for() -> None:
    book = OrderBook()

    def items(*lines: tuple[str, object]) -> str:
        return json.dumps({"items": [{"productId": p, "quantity": q} for p, q in lines]})

    two = items(("P-A", 2), ("P-B", 1))
    book.on_response("place-order", 201, b'{"orderId": "ORD-1"}', _order(two))
    book.on_response("place-order", 201, b'{"orderId": "ORD-2"}', _order(items(("P-A", 3))))
    book.on_response("place-order", 409, b'{"orderId": "ORD-3"}', _order(two))  # not acknowledged
    book.on_response("place-order", 201, b'{"orderId": "ORD-4"}', _order("not json"))
    bad = items(("P-A", True)).replace("]}", ", 7]}")  # a bool quantity, an item that is no object
    book.on_response("place-order", 201, b'{"orderId": "ORD-5"}', _order(bad))
    assert book.quantities == {"ORD-1": {"P-A": 2, "P-B": 1}, "ORD-2": {"P-A": 3}, "ORD-4": {}, "ORD-5": {}}
    assert ordered_quantities(book, ["ORD-1", "ORD-2", "ORD-9"]) == {"P-A": 5, "P-B": 1}
    assert book.acknowledged == 4
    book.on_response("place-order", 201, b'{"orderId": "ORD-1"}', _order(two))  # the same id again
    assert book.acknowledged == 5 and len(book.ids) == 4


def test_the_stock_check_catches_an_order_reserved_twice_or_not_at_all() -> None:
    before = {"P-A": 1000, "P-B": 50}
    ok = stock_taken_matches(before, {"P-A": 995, "P-B": 49}, {"P-A": 5, "P-B": 1})
    assert ok.passed and ok.observed == "P-A: 5 taken = 5 ordered; P-B: 1 taken = 1 ordered"
    twice = stock_taken_matches(before, {"P-A": 993, "P-B": 49}, {"P-A": 5, "P-B": 1})
    assert not twice.passed and "P-A: 7 taken, 5 ordered (+2, an order reserved twice?)" in twice.observed
    missing = stock_taken_matches(before, {"P-A": 997, "P-B": 49}, {"P-A": 5, "P-B": 1})
    assert not missing.passed and "(-2)" in missing.observed
    unread = stock_taken_matches({"P-A": 1000}, {"P-A": 995}, {"P-A": 5, "P-B": 1})
    assert not unread.passed and "P-B: stock not read" in unread.observed
    assert not stock_taken_matches(before, before, {}).passed  # no order placed: nothing was shown


def test_the_stock_of_a_product_is_read_from_its_key_and_its_shards() -> None:
    listed = ["P-A~2", "P-A", "P-AB", "P-A~1", "P-AB~1", "reservation:ORD-1"]
    assert stock_keys("P-A", listed) == ["P-A", "P-A~1", "P-A~2"]
    assert stock_keys("P-AB", listed) == ["P-AB", "P-AB~1"] and stock_keys("P-C", listed) == []


def test_the_update_goes_to_the_other_deployed_version() -> None:
    assert other_version("0.1.0", ["0.1.0", "0.1.1"]) == "0.1.1"
    assert other_version("0.1.1", ["0.1.0", "0.1.1"]) == "0.1.0"
    assert other_version("0.1.0", ["0.1.0", "0.1.1", "0.2.0"]) == "0.2.0"
    assert other_version("0.1.0", ["0.1.0"]) is None and other_version("0.1.0", []) is None


EXAMPLE = "503 x2 place-order via n:1 at 3.0: busy"


def test_the_cli_rate_applies_to_every_scenario_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from aether.cli.main import main
    from aether.forge import scenarios

    seen: list[Any] = []

    async def fake_run(names: Any, opts: Any, **kw: Any) -> list[ScenarioReport]:
        seen.append((list(names), kw.get("rates")))
        failed = ScenarioReport("kill-leader", "", False, 1.0, [], failures=[EXAMPLE])
        return [ScenarioReport("update", "", True, 1.0, [], measures={"orders_per_second": 120.0}), failed]

    monkeypatch.setattr(scenarios, "run_scenarios", fake_run)
    cfg = tmp_path / "forge-config.toml"
    cfg.write_text("")
    args = ["forge", "scenario", "update", "ci", "--config", str(cfg), "--dir", str(tmp_path / "f")]
    r = CliRunner().invoke(main, [*args, "--rate", "240", "--json"])
    assert r.exit_code == 1, r.output  # one scenario failed
    assert seen[-1] == (["update", "ci"], dict.fromkeys(["update", *CI_SUBSET], 240.0))
    assert json.loads(r.output)[0]["measures"] == {"orders_per_second": 120.0}
    assert json.loads(r.output)[1]["failures"] == [EXAMPLE]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and seen[-1][1] is None
    # the failed scenario's failed requests are shown under the table
    assert f"Failed requests during kill-leader (examples):\n  {EXAMPLE}" in r.output
    r = CliRunner().invoke(main, [*args, "--rate", "-1"])
    assert r.exit_code == 2 and "--rate" in r.output


def test_the_canary_share_of_failed_requests() -> None:
    counts = LoadCounts({"a": 500, "b": 497}, {"a": 0, "b": 3}, {"b": {"500": 3}})
    c = failed_share("failed", counts, 1.0)
    assert c.passed and c.observed == "0.30 % (3 of 1000; 500: 3)" and c.expected == "<= 1 %"
    assert not failed_share("failed", LoadCounts({"a": 90}, {"a": 10}), 1.0).passed
    assert not failed_share("failed", LoadCounts({}, {}), 1.0).passed  # no request: nothing shown


def test_failure_examples_show_each_cause_and_message_once_with_a_count() -> None:
    def f(seq: int, node: str, cause: str, detail: str) -> FailedRequest:
        return FailedRequest(seq, 10.0 + seq, "place-order", node, cause, detail)

    failures = [
        f(1, "n:1", "503", "map 'orders' key 'ORD-AB12CD34EF': get got no answer after 16 attempt(s) in 5s"),
        f(2, "n:2", "503", "map 'orders' key 'ORD-9F8E7D6C5B': get got no answer after 15 attempt(s) in 5s"),
        f(3, "n:9", "503", "from the node the fault hit"),
        f(4, "n:1", "500", "injected fault"),
        f(5, "n:1", "error:timeout", "no answer within 10 s"),
        f(6, "n:2", "500", "injected fault"),
    ]
    # `at`: seconds since the scenario started (origin 8.0), as its timeline reads, not the
    # generator's wall clock (a report said "at 1796674981.3")
    lines = failure_examples(failures, exclude={"n:9"}, origin=8.0)
    assert lines == [
        "503 x2 place-order via n:1 at 3.0s: map 'orders' key 'ORD-AB12CD34EF': get got no answer after "
        "16 attempt(s) in 5s",
        "500 x2 place-order via n:1 at 6.0s: injected fault",
        "error:timeout x1 place-order via n:1 at 7.0s: no answer within 10 s",
    ]
    # the count goes on past the limit
    assert failure_examples(failures, limit=1, origin=8.0) == [lines[0]]
    assert failure_examples([], exclude=()) == []
