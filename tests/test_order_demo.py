"""The order demo (examples/order_demo) in one process: domain types and the five slices' logic.

The slices run against `LocalMaps` (the in-process map backend) and call each other through
`SliceCalls`, an invoker that serves calls from the slice objects and reports errors the way the
real invoker does (a status survives as `SliceAppError.status`, a bad request is
`InvokeBadRequest`). The same code runs on real nodes in tests/test_e2e_order_demo.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.errors import BadRequest, StatusError
from aether.core.maps import MapUnavailable
from aether.invoke.errors import InvokeBadRequest, SliceAppError, describe_exception
from aether.slices import (
    Conflict,
    NotFound,
    Slice,
    SliceContext,
    SliceHttpError,
    describe_slice,
    invoke_entry,
)
from aether.slices.testing import LocalMaps

DEMO = Path(__file__).resolve().parents[1] / "examples" / "order_demo"
PROJECTS = ["order-domain", "inventory-service", "pricing-service", "place-order", "get-order-status"]
PROJECTS += ["cancel-order"]
for _p in PROJECTS:
    if str(DEMO / _p) not in sys.path:
        sys.path.insert(0, str(DEMO / _p))

import order_domain as d  # noqa: E402
from cancel_order import CancelOrder  # noqa: E402
from get_order_status import GetOrderStatus  # noqa: E402
from inventory_service import InventoryService, Piece  # noqa: E402
from place_order import PlaceOrderService  # noqa: E402
from pricing_service import PricingService  # noqa: E402

INVENTORY = "org.demo:inventory-service"
PRICING = "org.demo:pricing-service"
SLICES: dict[str, type[Slice]] = {
    INVENTORY: InventoryService,
    PRICING: PricingService,
    "org.demo:place-order": PlaceOrderService,
    "org.demo:get-order-status": GetOrderStatus,
    "org.demo:cancel-order": CancelOrder,
}


class SliceCalls:
    """An invoker over in-process slice objects; errors look like the real invoker's."""

    def __init__(self) -> None:
        self.slices: dict[str, Slice] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[tuple[str, str], Exception] = {}
        self.after: dict[tuple[str, str], Callable[[], Awaitable[object]]] = {}

    async def invoke(
        self,
        target: str,
        method: str,
        payload: bytes,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        self.calls.append((target, method))
        if (target, method) in self.fail:
            raise self.fail[(target, method)]
        inst = self.slices[target]
        try:
            answer = await invoke_entry(inst, method, payload)
            if (target, method) in self.after:
                await self.after[(target, method)]()
            return answer
        except StatusError as e:
            err = SliceAppError(f"{target}.{method} answered {e.status}: {e}", target=target, method=method)
            err.status, err.detail = e.status, str(e)
            raise err from None
        except BadRequest as e:
            raise InvokeBadRequest(f"bad request to {target}.{method}: {e}") from None
        except Exception as e:
            raise SliceAppError(f"{target}.{method} raised {describe_exception(e)}") from None


class Demo:
    """The five slices started on one shared `LocalMaps`."""

    def __init__(self, maps: LocalMaps | None = None) -> None:
        self.maps = maps or LocalMaps(["orders", "stock"])
        self.invoker = SliceCalls()

    def make(self, coords: str, instance: int = 1) -> Any:
        obj = SLICES[coords]()
        obj.context = SliceContext(
            artifact=Artifact.parse(f"{coords}:0.1.0"),
            node_id="node-1",
            instance=instance,
            logger=logging.getLogger("test.order_demo"),
            config={},
            invoker=self.invoker,
            maps=self.maps,
        )
        return obj

    async def start(self) -> Demo:
        for coords in SLICES:
            obj = self.make(coords)
            await obj.start()
            self.invoker.slices[coords] = obj
        return self

    @property
    def inventory(self) -> InventoryService:
        return self.invoker.slices[INVENTORY]  # type: ignore[return-value]

    @property
    def place(self) -> PlaceOrderService:
        return self.invoker.slices["org.demo:place-order"]  # type: ignore[return-value]

    @property
    def get(self) -> GetOrderStatus:
        return self.invoker.slices["org.demo:get-order-status"]  # type: ignore[return-value]

    @property
    def cancel(self) -> CancelOrder:
        return self.invoker.slices["org.demo:cancel-order"]  # type: ignore[return-value]

    async def available(self, pid: str) -> int:
        return (await self.inventory.get_stock(pid)).available


def order(customer: str = "CUST-123", *items: tuple[str, int]) -> d.PlaceOrder:
    return d.PlaceOrder(customer, [d.PlaceOrderItem(p, q) for p, q in items or [("PROD-ABC123", 2)]])


# --- domain types -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "good", "field"),
    [
        (d.parse_order_id, "ORD-5F3A9C21", "orderId"),
        (d.parse_product_id, "PROD-ABC123", "productId"),
        (d.parse_customer_id, "CUST-123", "customerId"),
    ],
)
def test_ids_parse_and_name_the_field(parse: Any, good: str, field: str) -> None:
    assert parse(good) == good
    prefix = good.split("-")[0]
    for bad in ["", "x", f"{prefix}-", f"{prefix.lower()}-1", f"{prefix}-abc", f"{prefix}-A B", "X" + good]:
        with pytest.raises(BadRequest, match=rf"^{field}: .* is not an? \w+ id"):
            parse(bad)
    with pytest.raises(BadRequest, match=rf"^{field}: expected"):
        parse(42)
    with pytest.raises(BadRequest, match=r"^items\[3\]\.x: "):
        parse("nope", "items[3].x")
    assert parse(f"{prefix}-" + "A" * 40)
    with pytest.raises(BadRequest, match=rf"^{field}: "):
        parse(f"{prefix}-" + "A" * 41)


def test_new_order_ids_are_valid_and_distinct() -> None:
    ids = {d.new_order_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(d.parse_order_id(i) == i for i in ids)


def test_quantity_bounds() -> None:
    assert d.parse_quantity(1) == 1 and d.parse_quantity(d.MAX_QUANTITY) == d.MAX_QUANTITY
    for bad in (0, -1, d.MAX_QUANTITY + 1):
        with pytest.raises(BadRequest, match=r"^quantity: must be between 1 and 100"):
            d.parse_quantity(bad)
    for bad in (True, 1.5, "2", None):
        with pytest.raises(BadRequest, match=r"^quantity: expected a whole number"):
            d.parse_quantity(bad)


def test_money_parses_decimal_amounts_in_a_currency() -> None:
    m = d.parse_money("24.99", "USD")
    assert m == d.Money(Decimal("24.99"), "USD")
    assert d.parse_money(3, "USD").amount == Decimal("3.00")
    assert d.parse_money("1500", "JPY").amount == Decimal("1500")
    assert m.times(3) + d.Money.of("0.03", "USD") == d.Money.of("75.00", "USD")
    assert str(m) == "24.99 USD"
    for amount, msg in [
        ("1.999", r"^amount: USD amounts have at most 2 decimal place"),
        ("10.5", r"^amount: JPY amounts have at most 0"),
        ("-1", r"^amount: must not be negative"),
        ("abc", r"^amount: 'abc' is not a decimal amount"),
        ("NaN", r"^amount: must be a finite amount"),
        (1.5, r"^amount: expected a decimal amount, got float"),
    ]:
        with pytest.raises(BadRequest, match=msg):
            d.parse_money(amount, "JPY" if amount == "10.5" else "USD")
    with pytest.raises(BadRequest, match=r"^currency: 'usd' is not a supported currency; use one of CHF"):
        d.parse_money("1", "usd")
    with pytest.raises(BadRequest, match=r"^currency: cannot add EUR to USD"):
        m + d.Money.of("1", "EUR")
    # on the wire the amount is a decimal string, never a float
    assert msgspec.json.encode(m) == b'{"amount":"24.99","currency":"USD"}'


def test_order_status_parses_by_name() -> None:
    assert d.parse_order_status("PLACED") is d.OrderStatus.PLACED
    with pytest.raises(BadRequest, match=r"^status: 'SHIPPED' is not an order status; one of PLACED, CANC"):
        d.parse_order_status("SHIPPED")


def test_place_order_request_is_camel_case_and_parse_names_the_line() -> None:
    req = msgspec.json.decode(
        b'{"customerId": "CUST-1", "items": [{"productId": "PROD-A", "quantity": 2}]}', type=d.PlaceOrder
    )
    assert req.parse() == ("CUST-1", [d.StockLine(d.ProductId("PROD-A"), d.Quantity(2))])
    cases = [
        (order("cust-1"), r"^customerId: 'cust-1' is not a customer id"),
        (d.PlaceOrder("CUST-1", []), r"^items: an order needs at least one item"),
        (order("CUST-1", ("PROD-A", 1), ("bad", 1)), r"^items\[1\]\.productId: 'bad' is not a product id"),
        (order("CUST-1", ("PROD-A", 1), ("PROD-B", 0)), r"^items\[1\]\.quantity: must be between 1"),
        (order("CUST-1", ("PROD-A", 1), ("PROD-A", 2)), r"^items\[1\]\.productId: PROD-A is already in"),
        (order("CUST-1", *[(f"PROD-{i}", 1) for i in range(51)]), r"^items: at most 50 lines per order"),
    ]
    for req, msg in cases:
        with pytest.raises(BadRequest, match=msg):
            req.parse()


def test_catalog_is_consistent() -> None:
    for pid, p in d.CATALOG.items():
        assert d.parse_product_id(pid) == p.product_id
        assert p.unit_price.currency == "USD" and p.initial_stock >= 1


# --- slice descriptions (routes the router will register) -------------------------------------------


def test_routes_and_bindings() -> None:
    routes = {
        (r.http_method, r.path): (coords, r.entry, dict(r.bindings))
        for coords, cls in SLICES.items()
        for r in describe_slice(cls).routes
    }
    assert routes == {
        ("GET", "/api/inventory/{product_id}"): (INVENTORY, "get_stock", {"product_id": "path"}),
        ("GET", "/api/pricing/{product_id}"): (PRICING, "get_price", {"product_id": "path"}),
        ("POST", "/api/orders"): (
            "org.demo:place-order",
            "place_order",
            {"customerId": "body", "items": "body"},
        ),
        ("GET", "/api/orders/{order_id}"): ("org.demo:get-order-status", "get_order", {"order_id": "path"}),
        ("DELETE", "/api/orders/{order_id}"): ("org.demo:cancel-order", "cancel_order", {"order_id": "path"}),
    }


# --- inventory ------------------------------------------------------------------------------------------


async def test_inventory_seeds_once_even_with_concurrent_starts() -> None:
    demo = Demo()
    first = demo.make(INVENTORY, 1)
    await first.start()
    level = await first.get_stock("PROD-ABC123")
    assert level == d.StockLevel("PROD-ABC123", 100, 0)
    await first.reserve(d.ReserveStock("ORD-1", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(5))]))
    # more instances starting (concurrently) later do not reset the stock
    await asyncio.gather(*(demo.make(INVENTORY, i).start() for i in range(2, 6)))
    assert await first.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 95, 5)


async def test_inventory_check_and_unknown_product() -> None:
    demo = await Demo().start()
    inv = demo.inventory
    assert await inv.check_stock(d.CheckStock("PROD-DEF456", 10)) == d.StockAvailability(
        "PROD-DEF456", 10, 10, True
    )
    assert (await inv.check_stock(d.CheckStock("PROD-DEF456", 11))).sufficient is False
    with pytest.raises(NotFound, match="no product PROD-NOPE"):
        await inv.check_stock(d.CheckStock("PROD-NOPE", 1))
    with pytest.raises(NotFound, match="no product PROD-NOPE"):
        await inv.get_stock("PROD-NOPE")
    with pytest.raises(BadRequest, match=r"^productId: 'nope' is not a product id"):
        await inv.get_stock("nope")
    with pytest.raises(BadRequest, match=r"^quantity: must be between"):
        await inv.check_stock(d.CheckStock("PROD-DEF456", 0))


async def test_reserve_is_all_or_nothing() -> None:
    demo = await Demo().start()
    inv = demo.inventory
    lines = [
        d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3)),
        d.StockLine(d.ProductId("PROD-XYZ789"), d.Quantity(4)),
        d.StockLine(d.ProductId("PROD-POSTER"), d.Quantity(2)),  # only 1 in stock
    ]
    with pytest.raises(Conflict, match=r"insufficient stock for PROD-POSTER: 1 available, 2 requested"):
        await inv.reserve(d.ReserveStock("ORD-1", lines))
    assert await demo.available("PROD-ABC123") == 100
    assert await demo.available("PROD-XYZ789") == 250
    assert (await inv.get_stock("PROD-ABC123")).reserved == 0
    with pytest.raises(NotFound, match="no product PROD-NOPE"):
        await inv.reserve(
            d.ReserveStock("ORD-1", [lines[0], d.StockLine(d.ProductId("PROD-NOPE"), d.Quantity(1))])
        )
    assert await demo.available("PROD-ABC123") == 100
    levels = await inv.reserve(d.ReserveStock("ORD-2", lines[:2]))
    assert levels == [d.StockLevel("PROD-ABC123", 97, 3), d.StockLevel("PROD-XYZ789", 246, 4)]
    await inv.release(d.ReleaseStock("ORD-2", lines[:2]))
    assert await demo.available("PROD-ABC123") == 100
    with pytest.raises(BadRequest, match=r"^lines\[0\]\.quantity: must be between"):
        await inv.reserve(d.ReserveStock("ORD-3", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(0))]))
    with pytest.raises(BadRequest, match=r"^orderId: "):
        await inv.reserve(d.ReserveStock("nope", lines[:1]))


async def test_a_repeated_reserve_or_release_of_an_order_changes_the_stock_once() -> None:
    demo = await Demo().start()
    inv = demo.inventory
    lines = [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))]
    first = await inv.reserve(d.ReserveStock("ORD-1", lines))
    # the runtime retries it (the answer was lost): the same order, the same lines
    assert await inv.reserve(d.ReserveStock("ORD-1", lines)) == first == [d.StockLevel("PROD-ABC123", 97, 3)]
    assert (await inv.get_stock("PROD-ABC123")).reserved == 3 and inv.duplicates == 1
    with pytest.raises(Conflict, match="order ORD-1 already has a reservation of other lines"):
        await inv.reserve(d.ReserveStock("ORD-1", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(1))]))
    await inv.release(d.ReleaseStock("ORD-1", lines))
    await inv.release(d.ReleaseStock("ORD-1", lines))  # repeated: nothing more given back
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)
    assert inv.duplicates == 2
    assert describe_slice(InventoryService).entries["reserve"].policy.is_idempotent


class Gated(LocalMaps):
    """Holds the next compare-and-set of a stock level (a ``PROD-`` key) until `gate` is set."""

    gate: asyncio.Event | None = None
    waiting = False

    async def map_compare_and_set(self, name: str, key: str, *a: Any, **kw: Any) -> bool:
        if key.startswith("PROD-") and self.gate is not None:
            gate, self.gate = self.gate, None
            self.waiting = True
            await gate.wait()
            self.waiting = False
        return await super().map_compare_and_set(name, key, *a, **kw)


async def test_a_reserve_repeated_while_its_first_attempt_runs_takes_the_stock_once() -> None:
    maps = Gated(["orders", "stock"])
    demo = await Demo(maps).start()
    inv = demo.inventory
    lines = [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))]
    maps.gate = gate = asyncio.Event()
    first = asyncio.create_task(inv.reserve(d.ReserveStock("ORD-1", lines)))
    while not maps.waiting:  # the first attempt is stuck writing the stock
        await asyncio.sleep(0)
    # its caller gave up and retried (on another instance): the retry takes and records
    other = demo.make(INVENTORY, 2)
    await other.start()
    assert await other.reserve(d.ReserveStock("ORD-1", lines)) == [d.StockLevel("PROD-ABC123", 97, 3)]
    gate.set()  # the first attempt takes too, finds the retry's record and gives its take back
    assert await first == [d.StockLevel("PROD-ABC123", 97, 3)]  # the recorded levels
    assert inv.duplicates == 1 and other.duplicates == 0
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 97, 3)
    held = await inv.reservations.get("reservation:ORD-1")
    assert held is not None and held.state == "reserved"
    assert list(_entry(demo.maps, "PROD-ABC123").holds) == [f"ORD-1/{held.attempt}"]  # the retry's


async def test_a_repeat_of_a_reservation_that_took_the_last_units_answers_from_the_record() -> None:
    demo = await Demo().start()
    inv = demo.inventory
    last = [d.StockLine(d.ProductId("PROD-POSTER"), d.Quantity(1))]  # 1 in stock
    first = await inv.reserve(d.ReserveStock("ORD-1", last))
    assert first == [d.StockLevel("PROD-POSTER", 0, 1)]
    assert await inv.reserve(d.ReserveStock("ORD-1", last)) == first and inv.duplicates == 1
    with pytest.raises(Conflict, match="insufficient stock for PROD-POSTER: 0 available"):
        await inv.reserve(d.ReserveStock("ORD-2", last))


class RecordFault(LocalMaps):
    """Makes the write of a reservation record (a compare-and-set of a ``reservation:`` key from
    none) raise: before writing it (`fail`), or after (`lost`: written, the answer lost); `echo`
    writes it and answers False, as a retried write whose first try landed may."""

    fail = lost = echo = False

    async def map_compare_and_set(
        self, name: str, key: str, expected: bytes | None, *a: Any, **kw: Any
    ) -> bool:
        if not key.startswith("reservation:") or expected is not None:
            return await super().map_compare_and_set(name, key, expected, *a, **kw)
        if self.fail:
            raise MapUnavailable(f"map {name!r}: no quorum (test)")
        wrote = await super().map_compare_and_set(name, key, expected, *a, **kw)
        if self.lost:
            raise MapUnavailable(f"map {name!r}: no answer (test)")
        return wrote and not self.echo


class Clock:
    """A wall clock for an inventory instance (`_clock`) that a test moves."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def _collected(inv: Any, n: int) -> None:
    for _ in range(200):
        if inv.collected >= n and not inv._collecting and not inv._writers:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"collected {inv.collected} holds, expected {n}")


@pytest.mark.parametrize("product", ["PROD-ABC123", "PROD-STICKER"])
async def test_holds_of_an_attempt_that_never_recorded_are_given_back_once_collected(
    product: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The node of the first attempt died after taking (or the map failed its record): the stock
    stays held, its retry takes anew; an instance writing the entry a minute later gives the dead
    attempt's units back (the sticker: a shard, collected by another instance)."""
    from inventory_service import shard_keys

    maps = RecordFault(["orders", "stock"])
    demo = await Demo(maps).start()
    a, b = demo.inventory, demo.make(INVENTORY, 2)
    await b.start()
    clock = Clock()
    a._clock = b._clock = clock
    key = shard_keys(product)[0]
    a._prefer[product] = b._prefer[product] = shard_keys(product)  # both take from `key`
    before = await a.get_stock(product)
    three = [d.StockLine(d.ProductId(product), d.Quantity(3))]
    maps.fail = True
    with caplog.at_level("WARNING"), pytest.raises(MapUnavailable):
        await a.reserve(d.ReserveStock("ORD-1", three))
    assert "recording the reservation of order ORD-1 failed" in caplog.text
    dead = list(_entry(demo.maps, key).holds)
    assert len(dead) == 1 and dead[0].startswith("ORD-1/")
    maps.fail = False
    await b.reserve(d.ReserveStock("ORD-1", three))  # the retry: taken again for now
    assert (await a.get_stock(product)).reserved == before.reserved + 6
    clock.now += b.hold_gc_s - 1  # not yet: b's next write leaves the dead hold alone
    await b.reserve(d.ReserveStock("ORD-2", [d.StockLine(d.ProductId(product), d.Quantity(1))]))
    await asyncio.sleep(0.01)
    assert b.collected == 0 and dead[0] in _entry(demo.maps, key).holds
    clock.now += 2
    await b.reserve(d.ReserveStock("ORD-3", [d.StockLine(d.ProductId(product), d.Quantity(1))]))
    await _collected(b, 1)  # the dead attempt's three units are back, held no more
    assert dead[0] not in _entry(demo.maps, key).holds
    assert await a.get_stock(product) == d.StockLevel(
        d.ProductId(product), before.available - 5, before.reserved + 5
    )
    record = await a.reservations.get("reservation:ORD-1")
    assert record is not None and record.state == "reserved" and not dead[0].endswith(record.attempt)


async def test_holds_of_an_attempt_whose_record_was_written_are_kept_once_collected() -> None:
    """The record was written but its answer lost (the reserve failed for its caller): the
    collector finds the attempt's record and keeps the stock, dropping the hold."""
    maps = RecordFault(["orders", "stock"])
    demo = await Demo(maps).start()
    inv = demo.inventory
    inv._clock = clock = Clock()
    maps.lost = True
    with pytest.raises(MapUnavailable):
        await inv.reserve(d.ReserveStock("ORD-1", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))]))
    maps.lost = False
    [hold] = _entry(demo.maps, "PROD-ABC123").holds
    clock.now += inv.hold_gc_s + 1
    one = [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(1))]
    await inv.reserve(d.ReserveStock("ORD-2", one))
    await _collected(inv, 1)  # dropped by a write of its own
    assert hold not in _entry(demo.maps, "PROD-ABC123").holds
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 96, 4)


async def test_a_record_write_answered_with_its_own_value_is_the_reservation() -> None:
    """`put_if_absent` may answer the very record it was given (an earlier try of the same write
    landed, its answer was lost): that is this attempt's record, not a repeat to give back."""
    maps = RecordFault(["orders", "stock"])
    demo = await Demo(maps).start()
    inv = demo.inventory
    maps.echo = True
    levels = await inv.reserve(
        d.ReserveStock("ORD-1", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))])
    )
    assert levels == [d.StockLevel("PROD-ABC123", 97, 3)] and inv.duplicates == 0
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 97, 3)


async def test_a_hold_on_an_entry_nobody_writes_is_collected_by_the_sweep() -> None:
    """The dead attempt's instance preferred a shard no other instance writes (its node is gone):
    the periodic sweep of the catalog's entries finds the old hold and gives it back."""
    from inventory_service import hold_key, new_attempt, shard_keys

    demo = await Demo().start()
    inv = demo.inventory
    inv._clock = clock = Clock()
    key = shard_keys("PROD-STICKER")[3]
    lines = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(3))]
    dead = hold_key("ORD-1", new_attempt(clock.now))
    await inv._take("ORD-1", dead, lines, [[Piece("PROD-STICKER", key, 3)]])
    await inv.sweep_once()
    await asyncio.sleep(0.01)
    assert inv.collected == 0 and dead in _entry(demo.maps, key).holds  # not old yet
    clock.now += inv.hold_gc_s + 1
    await inv.sweep_once()
    await _collected(inv, 1)
    assert not _entry(demo.maps, key).holds
    assert await inv.get_stock("PROD-STICKER") == d.StockLevel("PROD-STICKER", 100_000_000, 0)
    await inv.stop()
    assert inv._sweeper.cancelled()


async def test_a_record_write_that_does_not_end_in_time_is_a_503_and_leaves_the_holds() -> None:
    """The write is bounded by `record_within_s` too: if it lands later, a collector that already
    judged the attempt dead would have given its stock back under a written record."""

    class SlowRecords(LocalMaps):
        async def map_compare_and_set(self, name: str, key: str, *a: Any, **kw: Any) -> bool:
            if key.startswith("reservation:"):
                await asyncio.sleep(5)
            return await super().map_compare_and_set(name, key, *a, **kw)

    maps = SlowRecords(["orders", "stock"])
    demo = await Demo(maps).start()
    inv = demo.inventory
    inv.record_within_s = 0.05
    with pytest.raises(SliceHttpError, match=r"could not be recorded within 0\.05s") as err:
        await inv.reserve(d.ReserveStock("ORD-1", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))]))
    assert err.value.status == 503
    assert await inv.reservations.get("reservation:ORD-1") is None
    [hold] = _entry(demo.maps, "PROD-ABC123").holds  # for the collector to decide
    assert hold.startswith("ORD-1/")


@pytest.mark.parametrize("bad", ["60", 3, True, None])
async def test_a_bad_hold_gc_s_config_fails_the_start_naming_it(bad: object) -> None:
    demo = Demo()
    inv = demo.make(INVENTORY)
    inv.context = dataclasses.replace(inv.context, config={"hold_gc_s": bad})
    with pytest.raises(ValueError, match=r"config hold_gc_s: must be a number of seconds >= 6, got "):
        await inv.start()


@pytest.mark.parametrize(("entry", "said"), [("reserve", "reserved"), ("hold_stock", "held")])
async def test_a_take_that_leaves_no_time_to_record_gives_its_stock_back(entry: str, said: str) -> None:
    """Past `record_within_s` a collector could soon judge the attempt dead and give its stock
    back: the attempt gives it back itself and answers 503 (`reserve`: before writing any record;
    `hold_stock`: leaving its caller no time to store the order, which is the record)."""

    maps = Gated(["orders", "stock"])
    demo = await Demo(maps).start()
    inv = demo.inventory
    inv._clock = clock = Clock()
    maps.gate = gate = asyncio.Event()
    three = [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))]
    slow = asyncio.create_task(getattr(inv, entry)(d.ReserveStock("ORD-1", three)))
    while not maps.waiting:
        await asyncio.sleep(0)
    clock.now += inv.record_within_s + 0.5
    gate.set()
    with pytest.raises(SliceHttpError, match=f"took more than 30s: nothing is {said}") as err:
        await slow
    assert err.value.status == 503
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)
    assert not _entry(demo.maps, "PROD-ABC123").holds
    assert await inv.reservations.get("reservation:ORD-1") is None
    if entry == "hold_stock":  # in time, the caller's time is what is left of it
        held = await _hold(inv, "ORD-2", "PROD-ABC123", 1)
        assert 0 < held.within_s <= inv.record_within_s


async def test_an_order_not_stored_in_time_is_a_503_and_its_hold_is_judged_by_the_order() -> None:
    """The order's write does not end within the time `hold_stock` gave: a 503, and the hold is
    left (the write may still land): the collector keeps it if the order is there, else gives it
    back."""

    class SlowOrders(LocalMaps):
        delay = 0.0

        async def map_compare_and_set(self, name: str, key: str, *a: Any, **kw: Any) -> bool:
            if name != "orders":
                return await super().map_compare_and_set(name, key, *a, **kw)

            async def late() -> bool:  # goes on when its caller gives up, as a sent write does
                await asyncio.sleep(self.delay)
                return await LocalMaps.map_compare_and_set(self, name, key, *a, **kw)

            return await asyncio.shield(asyncio.ensure_future(late()))

    maps = SlowOrders(["orders", "stock"])
    demo = await Demo(maps).start()
    inv = demo.inventory
    inv.record_within_s = 0.05  # the time a caller has to store its order
    maps.delay = 0.2
    stored: list[str] = []
    for landed in (True, False):
        with pytest.raises(SliceHttpError, match=r"could not be stored within 0\.\ds") as err:
            await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 2)))
        assert err.value.status == 503 and demo.invoker.calls[-1] == (INVENTORY, "hold_stock")
        await asyncio.sleep(0.3)  # the write lands after all
        [new] = [k for k in await demo.maps.map_keys("orders") if k not in stored]
        if landed:
            stored.append(new)
        else:  # (as if it had not)
            await demo.maps.map_remove("orders", new)
    assert len(_entry(demo.maps, "PROD-ABC123").holds) == 2  # left for the collector
    inv._clock = clock = Clock()
    clock.now = 4_000_000_000.0
    await inv.sweep_once()
    await _collected(inv, 2)
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 98, 2)  # the stored order's


class YieldingMaps(LocalMaps):
    """LocalMaps that yields to the event loop between a read and a write (so updates race)."""

    async def map_get(self, name: str, key: str) -> bytes | None:
        value = await super().map_get(name, key)
        await asyncio.sleep(0)
        return value


async def _buy_40_concurrently(instances: int) -> tuple[list[bool], int, Any]:
    """40 concurrent reservations of 1 or 2 units of PROD-DEF456 (10 in stock) spread over
    `instances` inventory instances: (which succeeded, units sold, the stock level after)."""
    demo = await Demo(YieldingMaps(["orders", "stock"])).start()
    others = [demo.make(INVENTORY, i) for i in range(2, instances + 1)]
    await asyncio.gather(*(o.start() for o in others))
    inventories = [demo.inventory, *others]

    async def buy(i: int) -> bool:
        line = d.StockLine(d.ProductId("PROD-DEF456"), d.Quantity(1 + i % 2))
        try:
            await inventories[i % len(inventories)].reserve(d.ReserveStock(f"ORD-{i}", [line]))
            return True
        except Conflict:
            return False

    results = list(await asyncio.gather(*(buy(i) for i in range(40))))
    sold = sum(1 + i % 2 for i, ok in enumerate(results) if ok)
    return results, sold, await demo.inventory.get_stock("PROD-DEF456")


async def test_concurrent_reservations_never_oversell() -> None:
    _, sold, level = await _buy_40_concurrently(instances=4)
    assert sold <= 10 and level.available == 10 - sold and level.reserved == sold
    assert level.available <= 1  # sold out (a leftover single unit only if just 2-unit orders came later)


# --- escrow shards: a product with a lot of stock is split over several keys -----------------------


class CountingReads:
    """Counts the `stock` map reads of a LocalMaps from now on."""

    def __init__(self, maps: LocalMaps) -> None:
        self.count = 0
        get = maps.map_get

        async def counted(name: str, key: str) -> bytes | None:
            self.count += name == "stock"
            return await get(name, key)

        maps.map_get = counted  # type: ignore[method-assign]


def _entry(maps: LocalMaps, key: str) -> Any:
    from inventory_service import StockEntry

    raw, _ = maps.data["stock"][key]
    return msgspec.msgpack.decode(raw, type=StockEntry)


def _holds(maps: LocalMaps, key: str) -> dict[str, int]:
    """The holds of a stock entry, without the marks releases leave (``ORDER!ATTEMPT``)."""
    return {k: v for k, v in _entry(maps, key).holds.items() if "!" not in k}


async def test_a_big_product_is_split_over_shards_and_reads_as_one_level() -> None:
    from inventory_service import STOCK_SHARDS, shard_keys

    demo = await Demo().start()
    keys = shard_keys("PROD-STICKER")
    assert keys == ["PROD-STICKER"] + [f"PROD-STICKER~{k}" for k in range(1, STOCK_SHARDS)]
    assert shard_keys("PROD-ABC123") == ["PROD-ABC123"]  # small stock: one key, as before
    assert [_entry(demo.maps, k).available for k in keys] == [100_000_000 // STOCK_SHARDS] * STOCK_SHARDS
    other = demo.make(INVENTORY, 2)
    await other.start()  # seeds nothing more
    instances = [demo.inventory, other]
    assert await other.get_stock("PROD-STICKER") == d.StockLevel("PROD-STICKER", 100_000_000, 0)
    line = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(3))]
    await asyncio.gather(*(instances[i % 2].reserve(d.ReserveStock(f"ORD-{i}", line)) for i in range(20)))
    await asyncio.gather(
        *(instances[i % 2].release(d.ReleaseStock(f"ORD-{i}", line)) for i in range(0, 20, 2))
    )
    level = d.StockLevel("PROD-STICKER", 100_000_000 - 30, 30)
    assert await demo.inventory.get_stock("PROD-STICKER") == await other.get_stock("PROD-STICKER") == level
    check = await other.check_stock(d.CheckStock(d.ProductId("PROD-STICKER"), d.Quantity(5)))
    assert check.sufficient and check.available >= 5  # from what it last saw: no read
    assert sum(_entry(demo.maps, k).reserved for k in keys) == 30


async def test_a_line_larger_than_any_shard_takes_pieces_of_several(monkeypatch: pytest.MonkeyPatch) -> None:
    import inventory_service
    from inventory_service import Reservation, reservation_key, shard_keys

    monkeypatch.setattr(inventory_service, "SHARD_FROM", 10)  # PROD-DEF456 (10) is split 3, 3, 2, 2
    monkeypatch.setattr(inventory_service, "STOCK_SHARDS", 4)
    demo = await Demo().start()
    inv = demo.inventory
    keys = shard_keys("PROD-DEF456")
    assert [_entry(demo.maps, k).available for k in keys] == [3, 3, 2, 2]
    five = [d.StockLine(d.ProductId("PROD-DEF456"), d.Quantity(5))]
    assert await inv.reserve(d.ReserveStock("ORD-1", five)) == [d.StockLevel("PROD-DEF456", 5, 5)]
    record = await inv.reservations.get(reservation_key("ORD-1"))
    assert isinstance(record, Reservation) and len(record.plan) >= 2  # the record says where it took them
    assert sum(p.quantity for p in record.plan) == 5

    def check(n: int) -> Awaitable[d.StockAvailability]:
        return inv.check_stock(d.CheckStock(d.ProductId("PROD-DEF456"), d.Quantity(n)))

    reads = CountingReads(demo.maps)
    assert await check(5) == d.StockAvailability("PROD-DEF456", 5, 5, True)  # no shard has 5: all read
    assert reads.count == len(keys)
    assert (await check(1)).sufficient and reads.count == len(keys)  # its shard had enough: no read
    assert await check(6) == d.StockAvailability("PROD-DEF456", 6, 5, False)
    with pytest.raises(Conflict, match="insufficient stock for PROD-DEF456: 5 available, 6 requested"):
        await inv.reserve(d.ReserveStock("ORD-2", [d.StockLine(d.ProductId("PROD-DEF456"), d.Quantity(6))]))
    assert await inv.get_stock("PROD-DEF456") == d.StockLevel("PROD-DEF456", 5, 5)  # ORD-2 took nothing
    await inv.release(d.ReleaseStock("ORD-1", five))  # back where it came from
    assert [_entry(demo.maps, k).available for k in keys] == [3, 3, 2, 2]
    assert all(not _holds(demo.maps, k) and _entry(demo.maps, k).reserved == 0 for k in keys)


async def test_the_levels_answered_are_the_sums_of_the_shards_as_last_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance answers a split product's level from the sums of the shards as it last saw them,
    kept as it reads and writes (not summed per answer): after takes and gives by two instances, and
    a shard that went away and came back, they are what summing its view of each shard gives, and
    the stored sums once it has seen every shard as stored."""
    import inventory_service
    from inventory_service import StockEntry, shard_keys

    monkeypatch.setattr(inventory_service, "SHARD_FROM", 10)  # PROD-DEF456 (10) is split 3, 3, 2, 2
    monkeypatch.setattr(inventory_service, "STOCK_SHARDS", 4)
    demo = await Demo().start()
    a = demo.inventory
    b = demo.make(INVENTORY, 2)
    await b.start()
    keys = shard_keys("PROD-DEF456")

    def level(entries: list[Any]) -> d.StockLevel:
        available, reserved = sum(e.available for e in entries), sum(e.reserved for e in entries)
        return d.StockLevel("PROD-DEF456", available, reserved)

    def stored() -> d.StockLevel:
        return level([_entry(demo.maps, k) for k in keys if k in demo.maps.data["stock"]])

    def seen(inv: Any) -> d.StockLevel:  # its view of each shard, summed
        return level([inv._known[k] for k in keys if k in inv._known])

    for i, inv in enumerate([a, b, a, b]):
        held = await _hold(inv, f"ORD-{i}", "PROD-DEF456", 1 + i % 2)
        assert held.levels == [seen(inv)]
    assert stored() == d.StockLevel("PROD-DEF456", 4, 6)
    assert seen(a) != stored() and seen(b) != stored()  # neither saw the other's writes
    await a._read_all("PROD-DEF456")
    assert await a._estimate("PROD-DEF456") == stored()
    held = await _hold(b, "ORD-4", "PROD-DEF456", 1)
    released = await b.release(d.ReleaseStock("ORD-4", [_line("PROD-DEF456", 1)], held.hold))
    assert released == [seen(b)] != [stored()]  # b's view of a's shards is from before a's takes
    assert await b._level("PROD-DEF456") == stored() == d.StockLevel("PROD-DEF456", 4, 6)  # read all
    assert await b._estimate("PROD-DEF456") == stored()  # it read every shard just now
    # a shard goes away (a sees it gone), then comes back with other stock (a reads it again)
    gone = keys[-1]
    del demo.maps.data["stock"][gone]
    assert await a._read(gone) is None
    assert await a._estimate("PROD-DEF456") == seen(a) == stored()
    before = stored()
    await b.stock.put(gone, StockEntry("PROD-DEF456", 7, 0))
    assert await a._estimate("PROD-DEF456") == seen(a) == stored()  # read again: not seen since
    assert stored() == d.StockLevel("PROD-DEF456", before.available + 7, before.reserved)


async def test_concurrent_reservations_of_a_split_product_never_oversell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import inventory_service

    monkeypatch.setattr(inventory_service, "SHARD_FROM", 10)
    monkeypatch.setattr(inventory_service, "STOCK_SHARDS", 4)
    results, sold, level = await _buy_40_concurrently(instances=3)
    assert sold <= 10 and level.available == 10 - sold and level.reserved == sold
    # sold out: a single unit left over only if it is the last one and 2-unit orders came later
    assert level.available <= 1 or not any(results[i] is False and i % 2 == 0 for i in range(40))


def test_each_instance_starts_on_a_shard_of_its_own() -> None:
    from inventory_service import shard_keys, shard_order

    keys = shard_keys("PROD-STICKER")
    orders = [shard_order(keys, k) for k in range(len(keys))]
    assert [o[0] for o in orders] == keys  # instance k begins at shard k: no two alike
    assert all(sorted(o) == sorted(keys) for o in orders)
    assert shard_order(keys, len(keys) + 1) == orders[1]  # more instances than shards: they wrap
    assert shard_order(["PROD-ABC123"], 5) == ["PROD-ABC123"]


async def test_two_instances_write_apart_from_the_start() -> None:
    """Two instances taking the hot product lose no round to each other: each writes its own
    shard (they used to pick at random, and one time in four began on the same one)."""
    from inventory_service import shard_keys

    demo = await Demo().start()
    a, b = demo.inventory, demo.make(INVENTORY, 2)
    await b.start()
    keys = shard_keys("PROD-STICKER")
    one = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(1))]
    for i in range(10):
        await asyncio.gather(
            a.reserve(d.ReserveStock(f"ORD-A{i}", one)), b.reserve(d.ReserveStock(f"ORD-B{i}", one))
        )
    assert a.lost == b.lost == 0
    taken = {k: _entry(demo.maps, k).reserved for k in keys}
    assert taken[keys[1]] == 10 and taken[keys[2]] == 10 and sum(taken.values()) == 20


async def test_six_instances_write_apart() -> None:
    """As many instances as the blueprint may well ask for (two per node on three nodes) each write a
    shard of their own: no round lost (with 4 shards, two pairs shared one and lost rounds all the
    time: p99 350 ms in the benchmark)."""
    from inventory_service import shard_keys

    demo = await Demo().start()
    instances = [demo.inventory]
    for k in range(2, 7):
        instances.append(demo.make(INVENTORY, k))
        await instances[-1].start()
    one = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(1))]
    for i in range(5):
        await asyncio.gather(
            *(inv.reserve(d.ReserveStock(f"ORD-{k}-{i}", one)) for k, inv in enumerate(instances))
        )
    assert [inv.lost for inv in instances] == [0] * 6
    taken = [k for k in shard_keys("PROD-STICKER") if _entry(demo.maps, k).reserved]
    assert len(taken) == 6 and all(_entry(demo.maps, k).reserved == 5 for k in taken)


async def test_an_instance_writes_the_shards_whose_primary_is_on_its_node_first() -> None:
    """Shards whose primary copy is on the instance's node (`SliceMap.owned_here`) come first in
    its order, from the k-th of them for instance k; the others after, as before; asked again
    after a sweep (the owners change)."""
    from inventory_service import shard_keys, shard_order

    keys = shard_keys("PROD-STICKER")
    owned = {keys[5], keys[9], keys[12]}

    class Owning(LocalMaps):
        def map_owned_here(self, name: str, key: str) -> bool:
            return name == "stock" and key in owned

    demo = await Demo(Owning(["orders", "stock"])).start()
    a, b = demo.inventory, demo.make(INVENTORY, 2)  # instances 1 and 2
    await b.start()
    one = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(1))]
    await a.reserve(d.ReserveStock("ORD-1", one))
    await b.reserve(d.ReserveStock("ORD-2", one))
    assert _entry(demo.maps, keys[9]).reserved == 1 and _entry(demo.maps, keys[12]).reserved == 1
    assert a._prefer["PROD-STICKER"][:3] == [keys[9], keys[12], keys[5]]
    assert a._prefer["PROD-STICKER"][3:] == [k for k in shard_order(keys, 1) if k not in owned]
    owned.clear()  # the owners changed: without a new order the instance keeps writing keys[9]
    a._prefer.clear()  # (what each periodic sweep does)
    await a.reserve(d.ReserveStock("ORD-3", one))
    assert _entry(demo.maps, keys[1]).reserved == 1  # instance 1: shard 1, as without owners


async def test_stock_seeded_over_fewer_shards_by_an_earlier_version_stays_there() -> None:
    """An earlier version split the sticker over 4 shards: starting instances seed nothing more, an
    instance whose first choice is a shard that does not exist takes from the fullest existing one
    (and prefers it from then on), and the level is the sum of the 4."""
    from inventory_service import StockEntry, shard_keys

    maps = LocalMaps(["orders", "stock"])
    old = shard_keys("PROD-STICKER")[:4]
    for key, units in zip(old, (100, 300, 200, 100), strict=True):
        await maps.map_put("stock", key, msgspec.msgpack.encode(StockEntry("PROD-STICKER", units, 0)))
    demo = await Demo(maps).start()
    far = demo.make(INVENTORY, 9)  # prefers ~9: not there
    await far.start()
    assert sorted(k for k in maps.data["stock"] if k.startswith("PROD-STICKER")) == sorted(old)
    five = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(5))]
    await far.reserve(d.ReserveStock("ORD-1", five))
    await far.reserve(d.ReserveStock("ORD-2", five))
    assert _entry(maps, old[1]).reserved == 10 and far._prefer["PROD-STICKER"][0] == old[1]
    await demo.inventory.reserve(d.ReserveStock("ORD-3", five))  # instance 1 prefers ~1: there
    assert _entry(maps, old[1]).reserved == 15
    assert await far.get_stock("PROD-STICKER") == d.StockLevel("PROD-STICKER", 685, 15)


async def test_a_stale_remembered_level_costs_a_read_and_moves_the_instance_to_another_shard() -> None:
    from inventory_service import shard_keys

    demo = await Demo().start()
    a, b = demo.inventory, demo.make(INVENTORY, 2)
    await b.start()
    keys = shard_keys("PROD-STICKER")
    a._prefer["PROD-STICKER"] = list(keys)
    b._prefer["PROD-STICKER"] = list(keys)  # the same first choice: they meet on keys[0]
    one = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(1))]
    await a.reserve(d.ReserveStock("ORD-1", one))  # a remembers keys[0] as it wrote it
    await b.reserve(d.ReserveStock("ORD-2", one))  # b writes keys[0] behind a's back
    writes = a.writes
    await a.reserve(d.ReserveStock("ORD-3", one))  # a's compare-and-set on what it remembered fails
    assert a.lost == 1 and a.writes == writes + 1
    assert _entry(demo.maps, keys[0]).reserved == 3
    assert a._prefer["PROD-STICKER"][-1] == keys[0]  # it prefers the other shards from now on
    await a.reserve(d.ReserveStock("ORD-4", one))
    assert _entry(demo.maps, keys[0]).reserved == 3 and await a.get_stock("PROD-STICKER") == d.StockLevel(
        "PROD-STICKER", 100_000_000 - 4, 4
    )


async def test_stock_stored_before_shards_existed_stays_in_the_product_key() -> None:
    from inventory_service import StockEntry

    maps = LocalMaps(["orders", "stock"])
    # a version without shards kept all of the sticker's stock under its id
    await maps.map_put("stock", "PROD-STICKER", msgspec.msgpack.encode(StockEntry("PROD-STICKER", 500, 7)))
    demo = await Demo(maps).start()
    assert sorted(k for k in maps.data["stock"] if k.startswith("PROD-STICKER")) == ["PROD-STICKER"]
    line = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(3))]
    await demo.inventory.reserve(d.ReserveStock("ORD-1", line))  # its shards do not exist: falls back
    assert await demo.inventory.get_stock("PROD-STICKER") == d.StockLevel("PROD-STICKER", 497, 10)


async def test_a_record_written_by_the_version_before_shards_is_taken_over_and_released() -> None:
    from inventory_service import RELEASED, RESERVED, RESERVING, Reservation, reservation_key

    class Before(msgspec.Struct, frozen=True, rename="camel"):  # the record without `plan`
        order_id: str
        state: str
        attempt: str = ""
        lines: list[d.StockLine] = []
        levels: list[d.StockLevel] = []

    demo = await Demo().start()
    inv = demo.inventory
    lines = [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))]
    for order, state in (("ORD-1", RESERVING), ("ORD-2", RELEASED)):
        old = msgspec.msgpack.encode(Before(order, state, "dead" if state == RESERVING else "", lines))
        assert old != msgspec.msgpack.encode(msgspec.msgpack.decode(old, type=Reservation))
        await demo.maps.map_put("stock", reservation_key(order), old)
        # compare-and-set compares bytes: without reading them back this looped forever
        await asyncio.wait_for(inv.reserve(d.ReserveStock(order, lines)), 5)
        record = await inv.reservations.get(reservation_key(order))
        assert record is not None and record.state == RESERVED
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 94, 6)
    await demo.maps.map_put(
        "stock", reservation_key("ORD-3"), msgspec.msgpack.encode(Before("ORD-3", RESERVED, "x", lines))
    )
    # that version held a take by order id alone: still decoded, never collected, dropped by a release
    entry = _entry(demo.maps, "PROD-ABC123")
    legacy = msgspec.structs.replace(entry, holds={**entry.holds, "ORD-3": 3})
    await demo.maps.map_put("stock", "PROD-ABC123", msgspec.msgpack.encode(legacy))
    await asyncio.wait_for(inv.release(d.ReleaseStock("ORD-3", lines)), 5)  # gives back to the product's key
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 97, 3)
    assert "ORD-3" not in _entry(demo.maps, "PROD-ABC123").holds


# --- pricing --------------------------------------------------------------------------------------------


async def test_pricing_prices_and_totals() -> None:
    demo = await Demo().start()
    pricing: PricingService = demo.invoker.slices[PRICING]  # type: ignore[assignment]
    price = await pricing.get_price("PROD-ABC123")
    assert price == d.ProductPrice("PROD-ABC123", "Wireless mouse", d.Money.of("24.99", "USD"))
    with pytest.raises(NotFound, match="no price for PROD-NOPE"):
        await pricing.get_price("PROD-NOPE")
    total = await pricing.calculate_total(
        d.PriceOrder(
            [
                d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(2)),
                d.StockLine(d.ProductId("PROD-XYZ789"), d.Quantity(3)),
            ]
        )
    )
    assert [line.line_total for line in total.lines] == [
        d.Money.of("49.98", "USD"),
        d.Money.of("28.50", "USD"),
    ]
    assert total.total == d.Money.of("78.48", "USD")
    with pytest.raises(BadRequest, match=r"^lines: nothing to price"):
        await pricing.calculate_total(d.PriceOrder([]))


# --- place, get, cancel ---------------------------------------------------------------------------------


async def test_place_get_cancel_releases_stock() -> None:
    demo = await Demo().start()
    placed = await demo.place.place_order(order("CUST-123", ("PROD-ABC123", 2), ("PROD-XYZ789", 1)))
    assert d.parse_order_id(placed.order_id) == placed.order_id
    assert placed.status is d.OrderStatus.PLACED and placed.customer_id == "CUST-123"
    assert placed.total == d.Money.of("59.48", "USD")
    assert [(x.product_id, x.quantity) for x in placed.lines] == [("PROD-ABC123", 2), ("PROD-XYZ789", 1)]
    # pricing, then one hold of the stock (no check before: the hold decides); once the order is
    # stored its hold waits to be settled by the next hold_stock (no settle call of its own)
    assert demo.invoker.calls == [(PRICING, "calculate_total"), (INVENTORY, "hold_stock")]
    assert demo.place._kept == [d.KeptHold(placed.order_id, placed.reservation)]
    assert await demo.available("PROD-ABC123") == 98
    # the order keeps where its stock is held; no reservation record of inventory's own
    assert placed.reservation is not None and placed.reservation.attempt.endswith("o")
    assert [(p.key, p.quantity) for p in placed.reservation.pieces] == [
        ("PROD-ABC123", 2),
        ("PROD-XYZ789", 1),
    ]
    assert await demo.inventory.reservations.get(f"reservation:{placed.order_id}") is None
    assert await demo.get.get_order(placed.order_id) == placed
    # the camelCase JSON the HTTP client sees
    js = msgspec.json.decode(msgspec.json.encode(placed))
    assert js["orderId"] == placed.order_id and js["total"] == {"amount": "59.48", "currency": "USD"}
    assert js["lines"][0] == {
        "productId": "PROD-ABC123",
        "quantity": 2,
        "unitPrice": {"amount": "24.99", "currency": "USD"},
        "lineTotal": {"amount": "49.98", "currency": "USD"},
    }

    cancelled = await demo.cancel.cancel_order(placed.order_id)
    assert cancelled.status is d.OrderStatus.CANCELLED and cancelled.cancelled_at
    assert await demo.available("PROD-ABC123") == 100
    assert await demo.available("PROD-XYZ789") == 250
    assert (await demo.get.get_order(placed.order_id)).status is d.OrderStatus.CANCELLED
    with pytest.raises(Conflict, match=rf"order {placed.order_id} is already cancelled"):
        await demo.cancel.cancel_order(placed.order_id)
    assert await demo.available("PROD-ABC123") == 100  # released once


def _line(product: str, n: int) -> d.StockLine:
    return d.StockLine(d.ProductId(product), d.Quantity(n))


async def _hold(inv: Any, order_id: str, product: str, n: int) -> d.StockHeld:
    return await inv.hold_stock(d.ReserveStock(order_id, [d.StockLine(d.ProductId(product), d.Quantity(n))]))


def _hold_of(o: d.Order) -> str:
    assert o.reservation is not None
    return f"{o.order_id}/{o.reservation.attempt}"


async def test_a_stored_orders_hold_is_settled_by_the_next_hold_and_dropped_with_its_write() -> None:
    demo = await Demo().start()
    inv = demo.inventory
    first = await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 2)))
    assert _hold_of(first) in _entry(demo.maps, "PROD-ABC123").holds  # not settled yet
    second = await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 1)))  # carries the first's
    holds = _entry(demo.maps, "PROD-ABC123").holds
    assert _hold_of(first) not in holds and _hold_of(second) in holds
    assert demo.place._kept == [d.KeptHold(second.order_id, second.reservation)]
    assert (INVENTORY, "settle") not in demo.invoker.calls
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 97, 3)
    # `settle` with keep does the same for a caller that settles at once
    held = await _hold(inv, "ORD-3", "PROD-ABC123", 1)
    assert await inv.settle(d.SettleStock("ORD-3", held.hold, True)) == 1
    await _hold(inv, "ORD-4", "PROD-ABC123", 1)
    assert not any(h.startswith("ORD-3/") for h in _entry(demo.maps, "PROD-ABC123").holds)
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 95, 5)


async def test_a_hold_carries_at_most_max_kept_settlements_and_place_order_keeps_the_rest() -> None:
    demo = await Demo().start()
    held = await _hold(demo.inventory, "ORD-1", "PROD-ABC123", 1)
    waiting = [d.KeptHold("ORD-1", held.hold)] * (d.MAX_KEPT + 6)
    demo.place._kept = list(waiting)
    placed = await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 1)))
    assert demo.place._kept == [*waiting[: 6], d.KeptHold(placed.order_id, placed.reservation)]
    assert not any(h.startswith("ORD-1/") for h in _entry(demo.maps, "PROD-ABC123").holds)
    too_many = d.ReserveStock("ORD-2", [_line("PROD-ABC123", 1)], waiting)
    with pytest.raises(BadRequest, match=rf"^kept: {d.MAX_KEPT + 6} holds, at most {d.MAX_KEPT}"):
        await demo.inventory.hold_stock(too_many)


@pytest.mark.parametrize(
    ("kept", "message"),
    [
        (d.KeptHold("nope", d.StockHold("123-abco", [d.StockPiece("PROD-ABC123", "PROD-ABC123", 1)])),
         r"^kept\[0\]\.orderId: "),
        (d.KeptHold("ORD-1", d.StockHold("123-abc", [d.StockPiece("PROD-ABC123", "PROD-ABC123", 1)])),
         r"^kept\[0\]\.hold\.attempt: '123-abc'"),
        (d.KeptHold("ORD-1", d.StockHold("123-abco", [d.StockPiece("PROD-ABC123", "PROD-XYZ789", 1)])),
         r"^kept\[0\]\.hold\.pieces\[0\]\.key"),
    ],
)  # fmt: skip
async def test_a_malformed_kept_hold_is_a_400_naming_it_and_takes_nothing(
    kept: d.KeptHold, message: str
) -> None:
    demo = await Demo().start()
    with pytest.raises(BadRequest, match=message):
        await demo.inventory.hold_stock(d.ReserveStock("ORD-2", [_line("PROD-ABC123", 1)], [kept]))
    assert await demo.available("PROD-ABC123") == 100
    with pytest.raises(BadRequest, match=r"^kept: holds are settled by hold_stock"):
        await demo.inventory.reserve(d.ReserveStock("ORD-2", [_line("PROD-ABC123", 1)], [kept]))
    assert await demo.available("PROD-ABC123") == 100


@pytest.mark.parametrize("stored", [False, True])
async def test_a_hold_nobody_settles_is_judged_by_its_order(stored: bool) -> None:
    """The caller of `hold_stock` died before `settle` (before or after storing its order): a
    minute later the collector reads the order: stored with the hold, the stock stays taken;
    never stored, it goes back."""
    demo = await Demo().start()
    inv = demo.inventory
    inv._clock = clock = Clock()
    held = await _hold(inv, "ORD-1", "PROD-ABC123", 3)
    if stored:
        o = await demo.place.place_order(order("CUST-1", ("PROD-XYZ789", 1)))
        await demo.place.orders.put(
            "ORD-1", msgspec.structs.replace(o, order_id="ORD-1", reservation=held.hold)
        )
    [hold] = [h for h in _entry(demo.maps, "PROD-ABC123").holds if h.startswith("ORD-1/")]
    clock.now += inv.hold_gc_s + 1
    await _hold(inv, "ORD-2", "PROD-ABC123", 1)  # a write of the entry starts the collection
    await _collected(inv, 1)
    assert hold not in _entry(demo.maps, "PROD-ABC123").holds
    taken = 3 + 1 if stored else 1
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100 - taken, taken)


async def test_a_hold_settled_through_another_instance_goes_once_its_order_is_found() -> None:
    """`settle` reached an instance that does not write the hold's key: the instance that does asks
    the order after a few seconds and drops the hold it keeps (a hold without an order stays until
    the final judgement, which gives it back)."""
    from inventory_service import SETTLE_CHECK_S

    demo = await Demo().start()
    a, b = demo.inventory, demo.make(INVENTORY, 2)
    await b.start()
    a._clock = b._clock = clock = Clock()
    kept = await _hold(a, "ORD-1", "PROD-STICKER", 2)
    [piece] = kept.hold.pieces
    o = await demo.place.place_order(order("CUST-1", ("PROD-XYZ789", 1)))
    await demo.place.orders.put("ORD-1", msgspec.structs.replace(o, order_id="ORD-1", reservation=kept.hold))
    assert piece.key not in b._expect and await b.settle(d.SettleStock("ORD-1", kept.hold, True)) == 1
    lost = await _hold(a, "ORD-2", "PROD-STICKER", 3)  # its caller never stored the order
    assert [p.key for p in lost.hold.pieces] == [piece.key]
    await _hold(a, "ORD-3", "PROD-STICKER", 1)
    holds = _entry(demo.maps, piece.key).holds
    assert {h.split("/")[0] for h in holds} == {"ORD-1", "ORD-2", "ORD-3"}  # nothing settled on a
    clock.now += SETTLE_CHECK_S + 1
    await _hold(a, "ORD-4", "PROD-STICKER", 1)  # a's next write starts the check
    await _collected(a, 1)
    await _hold(a, "ORD-5", "PROD-STICKER", 1)
    holds = _entry(demo.maps, piece.key).holds
    assert not any(h.startswith("ORD-1/") for h in holds) and any(h.startswith("ORD-2/") for h in holds)
    clock.now += a.hold_gc_s
    await a.sweep_once()
    await _collected(a, 2 + 3)  # ORD-2 given back; ORD-3..5 (no orders either) too
    assert await a.get_stock("PROD-STICKER") == d.StockLevel("PROD-STICKER", 100_000_000 - 2, 2)


async def test_the_hold_of_an_attempt_its_order_does_not_name_goes_back() -> None:
    """The first attempt of a hold took (on one shard), and its answer was lost with its node; the
    retry took on another, which the order names: the first one's units go back, the order's stay
    (also a hold of the order's attempt on a key the order does not name: a give-back that failed)."""
    from inventory_service import hold_key, new_attempt, shard_keys

    demo = await Demo().start()
    inv = demo.inventory
    inv._clock = clock = Clock()
    keys = shard_keys("PROD-STICKER")
    held = await _hold(inv, "ORD-1", "PROD-STICKER", 2)
    [piece] = held.hold.pieces
    first, stray, *_ = (k for k in keys if k != piece.key)
    two = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(2))]
    await inv._take(
        "ORD-1", hold_key("ORD-1", new_attempt(clock.now) + "o"), two, [[Piece("PROD-STICKER", first, 2)]]
    )
    await inv._take("ORD-1", hold_key("ORD-1", held.hold.attempt), two, [[Piece("PROD-STICKER", stray, 2)]])
    o = await demo.place.place_order(order("CUST-1", ("PROD-XYZ789", 1)))
    await demo.place.orders.put("ORD-1", msgspec.structs.replace(o, order_id="ORD-1", reservation=held.hold))
    clock.now += inv.hold_gc_s + 1
    await inv.sweep_once()
    await _collected(inv, 3)
    assert not any(_entry(demo.maps, k).holds for k in (piece.key, first, stray))
    assert (await inv.get_stock("PROD-STICKER")).reserved == 2  # the order's, once
    assert _entry(demo.maps, piece.key).reserved == 2


async def test_settle_without_keep_gives_back_once_and_release_returns_to_the_held_pieces() -> None:
    from inventory_service import shard_keys

    demo = await Demo().start()
    inv = demo.inventory
    held = await _hold(inv, "ORD-1", "PROD-ABC123", 3)
    lost = d.SettleStock("ORD-1", held.hold, False)
    assert await inv.settle(lost) == 1 and await inv.settle(lost) == 1  # given back once: held no more
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)
    # a release with the order's hold gives back where it was taken, once
    held = await _hold(inv, "ORD-2", "PROD-STICKER", 5)
    [piece] = held.hold.pieces
    before = _entry(demo.maps, piece.key).available
    five = [d.StockLine(d.ProductId("PROD-STICKER"), d.Quantity(5))]
    await inv.release(d.ReleaseStock("ORD-2", five, held.hold))
    await inv.release(d.ReleaseStock("ORD-2", five, held.hold))
    assert _entry(demo.maps, piece.key).available == before + 5 and not _holds(demo.maps, piece.key)
    assert await inv.get_stock("PROD-STICKER") == d.StockLevel("PROD-STICKER", 100_000_000, 0)
    assert piece.key in shard_keys("PROD-STICKER")


@pytest.mark.parametrize(
    ("hold", "message"),
    [
        (d.StockHold("123-abc", [d.StockPiece("PROD-ABC123", "PROD-ABC123", 1)]), "hold.attempt: '123-abc'"),
        (d.StockHold("x-1o", [d.StockPiece("PROD-ABC123", "PROD-ABC123", 1)]), "hold.attempt: 'x-1o'"),
        (d.StockHold("123-abco", []), "hold.pieces: nothing held"),
        (d.StockHold("123-abco", [d.StockPiece("PROD-ABC123", "PROD-XYZ789", 1)]), r"hold.pieces\[0\].key"),
        (
            d.StockHold("123-abco", [d.StockPiece("PROD-ABC123", "PROD-ABC123", 0)]),
            r"hold.pieces\[0\].quantity",
        ),
        (d.StockHold("123-abco", [d.StockPiece("nope", "nope", 1)]), r"hold.pieces\[0\].productId"),
    ],
)
async def test_a_malformed_hold_is_a_400_naming_the_field(hold: d.StockHold, message: str) -> None:
    demo = await Demo().start()
    with pytest.raises(BadRequest, match=message):
        await demo.inventory.settle(d.SettleStock("ORD-1", hold, True))
    with pytest.raises(BadRequest, match=message):
        await demo.inventory.release(
            d.ReleaseStock("ORD-1", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(1))], hold)
        )
    assert await demo.inventory.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)


def test_order_times_are_iso_8601_utc_with_milliseconds() -> None:
    import time
    from datetime import UTC, datetime

    from place_order import Clock

    clock = Clock()
    for _ in range(3):  # (the second's part is formatted once and reused)
        before = time.time()
        stamp = clock.now_iso()
        after = time.time()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert at.tzinfo is not None and at.utcoffset() == UTC.utcoffset(None)
        assert int(before * 1000) / 1000 - 0.001 <= at.timestamp() <= after


async def test_a_repeated_place_order_call_places_one_order() -> None:
    from aether.core.context import enter_call, exit_call

    demo = await Demo().start()

    async def place(key: str) -> d.Order:
        tokens = enter_call("rid", key)  # what the runtime sets for the call (and its retries)
        try:
            return await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 2)))
        finally:
            exit_call(tokens)

    first = await place("client-key-1")
    assert first.order_id == d.order_id_for("client-key-1")
    assert await place("client-key-1") == first  # a retry: the same order, no second reservation
    assert await demo.available("PROD-ABC123") == 98
    other = await place("client-key-2")  # another call: another order
    assert other.order_id != first.order_id and await demo.available("PROD-ABC123") == 96
    assert d.order_id_for(None) != d.order_id_for(None)  # no key: random ids


class OrderReads(LocalMaps):
    """Counts the reads of the ``orders`` map."""

    reads = 0

    async def map_get(self, name: str, key: str) -> bytes | None:
        self.reads += name == "orders"
        return await super().map_get(name, key)


async def _placed_with(demo: Demo, key: str, *items: tuple[str, int]) -> d.Order:
    """place_order as served for a call with idempotency key `key` (one attempt)."""
    from aether.core.context import enter_call, exit_call

    tokens = enter_call("rid", key)
    try:
        return await demo.place.place_order(order("CUST-1", *(items or [("PROD-ABC123", 2)])))
    finally:
        exit_call(tokens)


async def test_only_a_given_key_makes_place_order_look_for_an_earlier_order() -> None:
    """A client's key may come again after the reservation's record expired: the order is looked
    for. A key the runtime made up belongs to this one call: no read."""
    from aether.core.context import new_idempotency_key

    maps = OrderReads(["orders", "stock"])
    demo = await Demo(maps).start()
    await _placed_with(demo, "client-key-1")
    assert maps.reads == 1
    await _placed_with(demo, new_idempotency_key())
    assert maps.reads == 1 and await demo.available("PROD-ABC123") == 96


async def test_attempts_of_one_call_with_a_made_up_key_place_one_order() -> None:
    """Two attempts of one call (the runtime's retry overlapping the first) without the read: the
    second to store answers the first one's order; one reservation."""
    from aether.core.context import new_idempotency_key

    demo = await Demo().start()
    key = new_idempotency_key()
    a, b = await asyncio.gather(_placed_with(demo, key), _placed_with(demo, key))
    assert a == b and a.order_id == d.order_id_for(key)
    assert await demo.available("PROD-ABC123") == 98
    assert await demo.get.get_order(a.order_id) == a


async def test_a_late_attempt_of_an_order_cancelled_meanwhile_gives_its_stock_back() -> None:
    """The first attempt arrives after its retry placed the order and the client cancelled it: its
    reservation (the record was released: it takes anew) is released again, the answer is the
    cancelled order."""
    from aether.core.context import new_idempotency_key

    demo = await Demo().start()
    key = new_idempotency_key()
    placed = await _placed_with(demo, key)
    await demo.cancel.cancel_order(placed.order_id)
    assert await demo.available("PROD-ABC123") == 100
    late = await _placed_with(demo, key)
    assert late.order_id == placed.order_id and late.status is d.OrderStatus.CANCELLED
    assert await demo.get.get_order(placed.order_id) == late
    assert await demo.inventory.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)


class SlowOrderReads(LocalMaps):
    """Reads of the ``orders`` map take 50 ms; `seen` keeps the slice calls made by the end of each."""

    def __init__(self, calls: list[tuple[str, str]]) -> None:
        super().__init__(["orders", "stock"])
        self.calls = calls
        self.seen: list[list[tuple[str, str]]] = []

    async def map_get(self, name: str, key: str) -> bytes | None:
        if name == "orders":
            await asyncio.sleep(0.05)
            self.seen.append(list(self.calls))
        return await super().map_get(name, key)


async def test_place_order_reads_existence_and_price_at_once_and_decides_in_that_order() -> None:
    """The total and the read of whether the order exists run at the same time (fails on a version
    that runs them one after the other); the outcome is the sequential one: an existing order wins
    over the total, and over a hold that would fail now."""
    from aether.core.context import enter_call, exit_call

    calls: list[tuple[str, str]] = []
    maps = SlowOrderReads(calls)
    demo = Demo(maps)
    demo.invoker.calls = calls
    await demo.start()

    async def place(key: str, *items: tuple[str, int]) -> d.Order:
        tokens = enter_call("rid", key)
        try:
            return await demo.place.place_order(order("CUST-1", *items))
        finally:
            exit_call(tokens)

    placed = await place("k-first", ("PROD-ABC123", 2))
    assert (PRICING, "calculate_total") in maps.seen[0], "the total was asked only after the read"
    last = await demo.available("PROD-POSTER")
    first = await place("k-last", ("PROD-POSTER", last))  # takes the last units
    assert await demo.available("PROD-POSTER") == 0
    assert await place("k-last", ("PROD-POSTER", last)) == first  # a repeat: not a 409 now
    cancelled = await demo.cancel.cancel_order(first.order_id)
    assert await place("k-last", ("PROD-POSTER", last)) == cancelled  # not placed (and taken) again
    assert await demo.available("PROD-POSTER") == last
    with pytest.raises(BadRequest, match=r"items\[0\]\.productId"):  # the catalog's error, not pricing's
        await demo.place.place_order(order("CUST-1", ("PROD-NOPE00", 1)))
    assert placed.status is d.OrderStatus.PLACED


async def test_concurrent_cancels_release_once() -> None:
    demo = await Demo(YieldingMaps(["orders", "stock"])).start()
    placed = await demo.place.place_order(order("CUST-1", ("PROD-DEF456", 4)))
    assert await demo.available("PROD-DEF456") == 6
    results = await asyncio.gather(
        *(demo.cancel.cancel_order(placed.order_id) for _ in range(5)), return_exceptions=True
    )
    assert sum(isinstance(r, d.Order) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, d.Order))
    assert await demo.available("PROD-DEF456") == 10


async def test_unknown_and_malformed_orders() -> None:
    demo = await Demo().start()
    with pytest.raises(NotFound, match="no order ORD-NOPE"):
        await demo.get.get_order("ORD-NOPE")
    with pytest.raises(NotFound, match="no order ORD-NOPE"):
        await demo.cancel.cancel_order("ORD-NOPE")
    with pytest.raises(BadRequest, match=r"^orderId: 'PROD-1' is not an order id"):
        await demo.get.get_order("PROD-1")
    with pytest.raises(BadRequest, match=r"^orderId: "):
        await demo.cancel.cancel_order("ord-1")


async def test_place_order_errors_name_the_line() -> None:
    demo = await Demo().start()
    with pytest.raises(BadRequest, match=r"^items\[1\]\.productId: no product PROD-NOPE"):
        await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 1), ("PROD-NOPE", 1)))
    assert demo.invoker.calls == [], "a product not in the catalog is refused before any call"
    with pytest.raises(Conflict, match=r"^items\[0\]: insufficient stock for PROD-POSTER: 1 available, 2"):
        await demo.place.place_order(order("CUST-1", ("PROD-POSTER", 2)))
    # the hold is all or nothing: the first line's take goes back when the second cannot be taken
    with pytest.raises(Conflict, match=r"^items\[1\]: insufficient stock for PROD-POSTER: 1 available, 3"):
        await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 4), ("PROD-POSTER", 3)))
    with pytest.raises(BadRequest, match=r"^customerId: "):
        await demo.place.place_order(order("nobody"))
    assert await demo.maps.map_keys("orders") == []
    # nothing was reserved by the failed attempts
    assert await demo.available("PROD-ABC123") == 100
    assert await demo.available("PROD-POSTER") == 1
    # the last poster: the first order gets it, the next one is a conflict
    await demo.place.place_order(order("CUST-1", ("PROD-POSTER", 1)))
    with pytest.raises(Conflict, match=r"^items\[0\]: insufficient stock for PROD-POSTER: 0 available"):
        await demo.place.place_order(order("CUST-2", ("PROD-POSTER", 1)))


async def test_a_product_inventory_has_no_stock_of_is_a_400_naming_the_line() -> None:
    """A product of the catalog without a stock entry (e.g. before inventory seeded it): the hold's
    404 for ``lines[i]`` is the request's 400 for ``items[i]``; any other error of the hold escapes
    as it is."""
    demo = await Demo().start()
    await demo.maps.map_remove("stock", "PROD-XYZ789")
    with pytest.raises(BadRequest, match=r"^items\[1\]\.productId: no product PROD-XYZ789"):
        await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 1), ("PROD-XYZ789", 1)))
    assert await demo.available("PROD-ABC123") == 100
    failure = SliceAppError("inventory answered 409", target=INVENTORY, method="hold_stock")
    failure.status, failure.detail = 409, "order ORD-1 already has a reservation of other lines"
    demo.invoker.fail[(INVENTORY, "hold_stock")] = failure
    with pytest.raises(SliceAppError) as e:
        await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 1)))
    assert e.value is failure


async def test_stock_taken_between_the_total_and_the_hold_is_a_409_naming_the_line() -> None:
    demo = await Demo().start()
    poster = d.StockLine(d.ProductId("PROD-POSTER"), d.Quantity(1))
    demo.invoker.after[(PRICING, "calculate_total")] = lambda: demo.inventory.reserve(
        d.ReserveStock("ORD-OTHER", [poster])
    )
    with pytest.raises(Conflict, match=r"^items\[0\]: insufficient stock for PROD-POSTER: 0 available"):
        await demo.place.place_order(order("CUST-1", ("PROD-POSTER", 1)))
    assert await demo.maps.map_keys("orders") == []


async def test_failed_store_releases_the_reservation() -> None:
    class NoOrders(LocalMaps):
        async def map_compare_and_set(self, name: str, key: str, *a: Any, **kw: Any) -> bool:
            if name == "orders":
                raise RuntimeError("disk on fire")
            return await super().map_compare_and_set(name, key, *a, **kw)

    demo = await Demo(NoOrders(["orders", "stock"])).start()
    with pytest.raises(RuntimeError, match="disk on fire"):
        await demo.place.place_order(order("CUST-1", ("PROD-DEF456", 3)))
    assert demo.invoker.calls[-1] == (INVENTORY, "release")
    assert await demo.available("PROD-DEF456") == 10


async def test_entries_decode_camel_case_payloads() -> None:
    """What the HTTP router sends for POST /api/orders (a map of the body's camelCase fields)."""
    demo = await Demo().start()
    payload = msgspec.msgpack.encode(
        {"customerId": "CUST-9", "items": [{"productId": "PROD-XYZ789", "quantity": 2}]}
    )
    raw = await invoke_entry(demo.place, "place_order", payload)
    answer = msgspec.msgpack.decode(raw)
    assert answer["status"] == "PLACED" and answer["total"] == {"amount": "19.00", "currency": "USD"}
    with pytest.raises(BadRequest, match=r"\$\.items\[0\]\.quantity"):
        await invoke_entry(
            demo.place,
            "place_order",
            msgspec.msgpack.encode(
                {"customerId": "CUST-9", "items": [{"productId": "PROD-X", "quantity": "2"}]}
            ),
        )


# --- inventory group commit -----------------------------------------------------------------------------


async def test_concurrent_changes_of_one_product_share_writes() -> None:
    demo = await Demo(YieldingMaps(["orders", "stock"])).start()
    inv = demo.inventory

    def line(pid: str) -> list[d.StockLine]:
        return [d.StockLine(d.ProductId(pid), d.Quantity(1))]

    levels = await asyncio.gather(
        *(inv.reserve(d.ReserveStock(f"ORD-{i}", line("PROD-XYZ789"))) for i in range(50))
    )
    assert sorted(lv[0].available for lv in levels) == list(range(200, 250))  # each saw its own step
    assert await demo.available("PROD-XYZ789") == 200
    assert inv.writes <= 5  # 50 reservations, a handful of compare-and-sets
    # takes beyond the stock fail one by one, in arrival order, within the same batches
    results = await asyncio.gather(
        *(inv.reserve(d.ReserveStock(f"ORD-{100 + i}", line("PROD-DEF456"))) for i in range(30)),
        return_exceptions=True,
    )
    assert [isinstance(r, list) for r in results] == [True] * 10 + [False] * 20
    assert all(isinstance(r, Conflict) and "0 available" in str(r) for r in results[10:])
    level = await inv.get_stock("PROD-DEF456")
    assert (level.available, level.reserved) == (0, 10)
    # releases batch too
    await asyncio.gather(
        *(inv.release(d.ReleaseStock(f"ORD-{100 + i}", line("PROD-DEF456"))) for i in range(10))
    )
    assert await demo.available("PROD-DEF456") == 10


async def test_a_product_that_keeps_changing_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    import inventory_service

    class Meddling(LocalMaps):
        """Another writer changes the stock right before every write of it."""

        async def map_compare_and_set(self, name: str, key: str, *a: Any, **kw: Any) -> bool:
            if name == "stock" and (value := self.data[name].get(key)) is not None:
                level = msgspec.msgpack.decode(value[0], type=d.StockLevel)
                self.data[name][key] = (
                    msgspec.msgpack.encode(msgspec.structs.replace(level, reserved=level.reserved + 1)),
                    None,
                )
            return await super().map_compare_and_set(name, key, *a, **kw)

    monkeypatch.setattr(inventory_service, "CHANGE_BUDGET_S", 0.05)
    demo = await Demo(Meddling(["orders", "stock"])).start()
    with pytest.raises(SliceAppError) as e:
        await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 1)))
    assert e.value.status == 503 and "the stock of PROD-ABC123 changed" in e.value.detail
    assert await demo.maps.map_keys("orders") == []


async def test_a_cancelled_reservation_leaves_no_stock_taken() -> None:
    demo = await Demo(YieldingMaps(["orders", "stock"])).start()
    inv = demo.inventory
    cancelled_some = False
    for spins in range(6):
        task = asyncio.create_task(
            inv.reserve(d.ReserveStock("ORD-1", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))]))
        )
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        cancelled_some |= task.cancelled()
        for _ in range(50):  # let the writers finish (and give back)
            await asyncio.sleep(0)
        level = await inv.get_stock("PROD-ABC123")
        if task.cancelled():
            assert (level.available, level.reserved) == (100, 0), spins
        else:  # it finished before the cancellation: the reservation stands
            assert (level.available, level.reserved) == (97, 3), spins
            await inv.release(
                d.ReleaseStock("ORD-1", [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(3))])
            )
    assert cancelled_some


async def test_callers_never_hang_when_a_writer_is_cancelled() -> None:
    demo = await Demo(YieldingMaps(["orders", "stock"])).start()
    inv = demo.inventory
    line = [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(1))]
    callers = [asyncio.create_task(inv.reserve(d.ReserveStock("ORD-0", line)))]
    for _ in range(3):
        await asyncio.sleep(0)
    # these queue behind a writer that is cancelled (before or after it ran)
    callers += [asyncio.create_task(inv.reserve(d.ReserveStock(f"ORD-{i}", line))) for i in range(1, 5)]
    await asyncio.sleep(0)
    (writer,) = inv._writers.values()
    writer.cancel()
    results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), timeout=2)
    # ORD-0's batch is committed or failed; the queued ones fail with 503, nothing hangs
    assert all(isinstance(r, SliceHttpError) and r.status == 503 for r in results[1:]), results
    assert "stopping" in str(results[4])
    assert await demo.available("PROD-ABC123") == (99 if isinstance(results[0], list) else 100)
    assert not inv._writers and not inv._queued
    # the product is writable again
    await inv.reserve(d.ReserveStock("ORD-9", line))


# --- the blueprint and what `aether cluster demo` prints from it -------------------------------------


def test_demo_blueprint_parses_with_its_maps_and_instance_counts() -> None:
    from aether.core.maps import MapSpec
    from aether.deploy.blueprint import parse_blueprint

    bp = parse_blueprint((DEMO / "demo-order.blueprint").read_text(), "demo-order.blueprint")
    assert bp.id == "demo-order:0.1.0"
    assert {s.artifact.name: s.instances for s in bp.slices} == {
        INVENTORY: 3,
        PRICING: 3,
        "org.demo:place-order": 3,
        "org.demo:get-order-status": 2,
        "org.demo:cancel-order": 2,
    }
    assert dict(bp.maps) == {"orders": MapSpec(3, 2, "log"), "stock": MapSpec(3, 2, "log")}


def test_try_lines_substitute_node_addresses() -> None:
    from aether.cli.main import _blueprint_maps
    from aether.deploy.blueprint import try_lines

    text = (DEMO / "demo-order.blueprint").read_text()
    lines = try_lines(text, ["h:1", "h:2", "h:3"])
    assert len(lines) == 9
    assert lines[0] == "curl -s http://h:1/api/pricing/PROD-ABC123"
    assert lines[1] == "curl -s http://h:2/api/inventory/PROD-ABC123"
    assert all("{http" not in line for line in lines)
    assert try_lines("# try: a {http} b {http2}\n#try:c\nid = 'x'\n", ["n1", "n2"]) == ["a n1 b n2", "c"]
    assert _blueprint_maps(text) == ["orders", "stock"]
    assert _blueprint_maps("not [toml") == []


def test_the_forge_blueprint_is_the_demo_with_place_order_autoscaled() -> None:
    """examples/order_demo/forge-order.blueprint (what `make demo` runs in Forge) must not drift
    from demo-order.blueprint: the same slices, maps and counts, plus place-order's scaling."""
    from aether.deploy.blueprint import parse_blueprint

    demo = parse_blueprint((DEMO / "demo-order.blueprint").read_text(), "demo-order.blueprint")
    forge = parse_blueprint((DEMO / "forge-order.blueprint").read_text(), "forge-order.blueprint")
    assert forge.id == demo.id and forge.maps == demo.maps
    plain = {s.artifact: s for s in demo.slices}
    scaled = {s.artifact: s for s in forge.slices}
    assert plain.keys() == scaled.keys()
    for art, s in scaled.items():
        if "place-order" in str(art):
            assert s.scaling is not None and (s.scaling.min, s.scaling.max) == (3, 6)
            assert s.instances == plain[art].instances == 3
        else:
            assert dataclasses.replace(s, line=0) == dataclasses.replace(plain[art], line=0)

    def tries(name: str) -> list[str]:
        return [line for line in (DEMO / name).read_text().splitlines() if line.startswith("# try:")]

    assert tries("forge-order.blueprint") == tries("demo-order.blueprint")


def test_make_demo_wheels_also_builds_place_order_0_1_1_while_the_blueprints_keep_0_1_0() -> None:
    """`make demo` must start a Forge that can be updated (the `update` scenario, docs/order-demo.md
    "Updating it under load"): the demo-wheels recipe builds place-order 0.1.1 into the same
    directory; the blueprints still name 0.1.0. (The `demo_wheels` fixture runs the same builds.)"""
    makefile = (DEMO.parents[1] / "Makefile").read_text()
    recipe = makefile[makefile.index("\ndemo-wheels:") :].split("\n\n", 1)[0].replace("\\\n", " ")
    builds = [" ".join(line.split()) for line in recipe.splitlines() if "examples/build.py" in line]
    assert builds == [
        "$(BIN)/python examples/build.py --only order_demo --no-deploy --out $(DEMO_WHEELS)",
        "$(BIN)/python examples/build.py --only order_demo --project place-order --set-version 0.1.1 "
        "--no-deploy --out $(DEMO_WHEELS)",
    ]
    for name in ("demo-order.blueprint", "forge-order.blueprint"):
        text = (DEMO / name).read_text()
        assert 'artifact = "org.demo:place-order:0.1.0"' in text and "0.1.1" not in text


class GiveFault(LocalMaps):
    """Makes the next write of the stock entries in `fail` raise before writing, and of those in
    `lost` raise after writing (the answer lost), once each."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.fail: set[str] = set()
        self.lost: set[str] = set()

    async def map_compare_and_set(
        self, name: str, key: str, expected: bytes | None, *a: Any, **kw: Any
    ) -> bool:
        if name == "stock" and key in self.fail:
            self.fail.discard(key)
            raise MapUnavailable(f"map {name!r} key {key!r}: no quorum (test)")
        wrote = await super().map_compare_and_set(name, key, expected, *a, **kw)
        if name == "stock" and key in self.lost:
            self.lost.discard(key)
            raise MapUnavailable(f"map {name!r} key {key!r}: no answer (test)")
        return wrote


async def test_a_release_that_failed_half_way_is_finished_by_its_repeat_giving_each_piece_once() -> None:
    """Found by a chaos run (a node stopped while orders were cancelled): the record said released
    before the gives, so a release whose give failed left the units reserved for good and its
    repeat answered from the record. Now the repeat gives what was not given, and the release
    marks keep it from giving again what was (a give whose answer was lost)."""
    maps = GiveFault(["orders", "stock"])
    demo = await Demo(maps).start()
    inv = demo.inventory
    placed = await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 2), ("PROD-XYZ789", 3)))
    hold = placed.reservation
    assert hold is not None
    lines = [d.StockLine(d.ProductId(x.product_id), d.Quantity(x.quantity)) for x in placed.lines]
    maps.lost.add("PROD-ABC123")  # given back, the answer lost
    maps.fail.add("PROD-XYZ789")  # not given back
    with pytest.raises(MapUnavailable):
        await inv.release(d.ReleaseStock(placed.order_id, lines, hold))
    assert await inv.get_stock("PROD-XYZ789") == d.StockLevel("PROD-XYZ789", 247, 3)
    await inv.release(d.ReleaseStock(placed.order_id, lines, hold))  # the repeat finishes it
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)
    assert await inv.get_stock("PROD-XYZ789") == d.StockLevel("PROD-XYZ789", 250, 0)
    await inv.release(d.ReleaseStock(placed.order_id, lines, hold))  # released: nothing more
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)
    assert inv.duplicates == 1
    assert not _holds(maps, "PROD-ABC123") and not _holds(maps, "PROD-XYZ789")


async def test_release_marks_are_dropped_once_the_release_is_recorded_and_old() -> None:
    demo = await Demo().start()
    inv = demo.inventory
    clock = Clock()
    inv._clock = clock
    lines = [d.StockLine(d.ProductId("PROD-ABC123"), d.Quantity(2))]
    await inv.reserve(d.ReserveStock("ORD-1", lines))
    await inv.release(d.ReleaseStock("ORD-1", lines))
    [mark] = _entry(demo.maps, "PROD-ABC123").holds
    assert mark.startswith("ORD-1!")
    await inv.sweep_once()  # young: kept
    await asyncio.sleep(0.01)
    assert mark in _entry(demo.maps, "PROD-ABC123").holds
    clock.now += inv.hold_gc_s + 1
    inv._swept.clear()
    await inv.sweep_once()
    for _ in range(100):
        if not _entry(demo.maps, "PROD-ABC123").holds:
            break
        await asyncio.sleep(0.01)
    assert _entry(demo.maps, "PROD-ABC123").holds == {}
    assert await inv.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)


async def test_a_cancellation_whose_release_failed_is_finished_by_cancelling_again() -> None:
    """The order is cancelled before its stock is released: when the release fails, repeating the
    cancellation (409: already cancelled) releases it; before, the stock stayed reserved."""
    demo = await Demo().start()
    placed = await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 2)))
    assert await demo.available("PROD-ABC123") == 98
    failure = SliceAppError("inventory went down", target=INVENTORY, method="release")
    demo.invoker.fail[(INVENTORY, "release")] = failure
    with pytest.raises(SliceAppError):
        await demo.cancel.cancel_order(placed.order_id)
    assert (await demo.get.get_order(placed.order_id)).status is d.OrderStatus.CANCELLED
    assert await demo.available("PROD-ABC123") == 98
    del demo.invoker.fail[(INVENTORY, "release")]
    with pytest.raises(Conflict, match="already cancelled"):
        await demo.cancel.cancel_order(placed.order_id)
    assert await demo.inventory.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)
    with pytest.raises(Conflict, match="already cancelled"):
        await demo.cancel.cancel_order(placed.order_id)  # released once
    assert await demo.inventory.get_stock("PROD-ABC123") == d.StockLevel("PROD-ABC123", 100, 0)


async def test_a_cancellation_repeated_long_after_does_not_call_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cancel_order

    demo = await Demo().start()
    placed = await demo.place.place_order(order("CUST-1", ("PROD-ABC123", 2)))
    await demo.cancel.cancel_order(placed.order_id)
    monkeypatch.setattr(cancel_order, "RELEASE_AGAIN_S", 0.0)
    demo.invoker.calls.clear()
    with pytest.raises(Conflict, match="already cancelled"):
        await demo.cancel.cancel_order(placed.order_id)
    assert demo.invoker.calls == []
