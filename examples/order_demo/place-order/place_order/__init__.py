"""`org.demo:place-order` — ``POST /api/orders``: validate, price, hold the stock, store.

1. parse the request (`PlaceOrder.parse`: 400 naming the field, e.g. ``items[0].quantity``); a
   product not in the catalog is a 400 naming its line (``items[1].productId``);
2. price the lines (pricing-service ``calculate_total``), at the same time as the read of whether
   the order exists already (below); both are reads, so the outcome is the one of doing them one
   after the other (an existing order wins over the total), in the time of the slower;
3. hold the stock of all lines (inventory-service ``hold_stock``, all or nothing): too little stock
   is a 409 naming the line (``items[0]: insufficient stock for ...``), a product inventory has no
   stock entry for a 400 naming it (its errors say ``lines[i]``, this answers ``items[i]``). There
   is no separate check of the stock before: the hold is the check (a check per line was a call
   and a read per order that decided nothing the hold does not: 0.87x the CPU per order without it);
4. store the order, with the hold (`Order.reservation`: the order is the reservation's record), in
   the distributed map ``orders`` under its id, unless it is there already (``put_if_absent``); if
   that fails, the stock is released before the error is answered (not stored within the time
   ``hold_stock`` answered: a 503, and inventory judges the hold by whether the order is there);
   then the hold is settled as kept with this instance's next ``hold_stock`` (`ReserveStock.kept`:
   no write, the holds go with inventory's next write of the stock; a ``settle`` call per order
   was 4 % of the CPU). Best effort: a hold not settled (the next call failed, or none came) is
   checked against its order by inventory seconds later.

The order id is derived from the call's idempotency key (`order_id_for`): a retry of the same call
(the runtime's after a crash, or a client's with the same ``Idempotency-Key`` header) places the
same order; an order that is stored already is answered as it is. The read of whether it exists
(step 2) is made only for a key given from outside (``self.context.idempotency_key_given``: a
client's, which may come again at any later time). A key the runtime made up is shared by the
attempts of this one call only: there an attempt that finds the order stored by another (step 4)
answers that one and gives its own hold back (``settle`` not kept); the stored order keeps the
hold it was stored with (a cancellation releases that one).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from order_domain import (
    CATALOG,
    MAX_KEPT,
    KeptHold,
    Order,
    OrderStatus,
    OrderTotal,
    PlaceOrder,
    PriceOrder,
    ReleaseStock,
    ReserveStock,
    SettleStock,
    StockHeld,
    StockHold,
    StockLevel,
    StockLine,
    order_id_for,
)

from aether.invoke.errors import SliceAppError
from aether.slices import BadRequest, Conflict, Slice, SliceHttpError, route
from aether.slices.maps import SliceMap

INVENTORY = "org.demo:inventory-service"
PRICING = "org.demo:pricing-service"
ORDERS_MAP = "orders"
# below this many seconds to store an order (what `hold_stock` answers: half of inventory's
# hold_gc_s, a minute by default, less the take), its write gets a timer of its own; above, the
# map's own retry budget ends it first (a timer per order cost 1.2 % of the CPU)
TIMER_FROM_S = 10.0
_LINES, _ITEMS = "lines[", "items["  # how inventory's errors name a line, and this entry's
MAX_PENDING = 1024  # stored orders whose holds wait for the next hold_stock to settle them


def _retrieve(f: asyncio.Future[Any]) -> None:
    """Take a dropped read's outcome, so that asyncio does not log it as never retrieved."""
    if not f.cancelled():
        f.exception()


class Clock:
    """ISO 8601 times in UTC with milliseconds (``2026-12-06T19:34:33.599Z``); the part up to the
    second is formatted once a second (a `datetime` formatted per order cost ~1 % of the CPU)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now_iso(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1000):03d}Z"


class PlaceOrderService(Slice):
    """Places orders; the order is readable through every node as soon as this answers."""

    async def start(self) -> None:
        self.orders: SliceMap[Order] = self.map(ORDERS_MAP, Order)
        self.clock = Clock()
        self._kept: list[KeptHold] = []  # orders stored with their holds, for the next hold_stock

    @route("POST", "/api/orders")
    async def place_order(self, req: PlaceOrder) -> Order:
        """Place an order; answers it with its id, status PLACED, priced lines and total."""
        customer, lines = req.parse()
        for i, line in enumerate(lines):
            if line.product_id not in CATALOG:
                raise BadRequest(f"items[{i}].productId: no product {line.product_id}")
        order_id = order_id_for(self.context.idempotency_key)
        # reads at once (they change nothing): whether an earlier call with this key placed the
        # order already (only a given key can come from one), and the total; decided in that
        # order, as if one after the other
        found = (
            asyncio.ensure_future(self.orders.get(order_id)) if self.context.idempotency_key_given else None
        )
        total = asyncio.ensure_future(self.call(PRICING, "calculate_total", PriceOrder(lines), OrderTotal))
        reads: list[asyncio.Future[Any]] = [total] if found is None else [found, total]
        try:
            if found is not None and (placed := await found) is not None:  # a repeat that placed it
                return placed
            priced: OrderTotal = await total
        finally:
            for f in reads:  # what is not needed any more (an error decided first, or a repeat)
                if not f.done():
                    f.cancel()
                f.add_done_callback(_retrieve)
        kept = self._kept[:MAX_KEPT]  # earlier orders' holds, settled as kept by this call
        del self._kept[:MAX_KEPT]
        try:
            held = await self.call(INVENTORY, "hold_stock", ReserveStock(order_id, lines, kept), StockHeld)
        except SliceAppError as e:
            if e.status not in (404, 409) or not e.detail.startswith(_LINES):
                raise
            detail = _ITEMS + e.detail[len(_LINES) :]  # inventory's line i is the request's item i
            raise (BadRequest(detail) if e.status == 404 else Conflict(detail)) from None
        order = Order(
            order_id,
            customer,
            OrderStatus.PLACED,
            priced.lines,
            priced.total,
            self.clock.now_iso(),
            None,
            held.hold,
        )
        try:
            if held.within_s < TIMER_FROM_S:
                async with asyncio.timeout(held.within_s):
                    placed = await self.orders.put_if_absent(order_id, order)
            else:  # the write gives up by itself well before (its retries' budget, 5 s by default)
                placed = await self.orders.put_if_absent(order_id, order)
        except TimeoutError:  # the write may still land: the hold is left for inventory to judge
            raise SliceHttpError(
                f"order {order_id} could not be stored within {held.within_s:.1f}s; try again with the "
                "same Idempotency-Key (its stock goes back unless it was stored after all)",
                status=503,
            ) from None
        except BaseException:
            self.logger.warning("storing order %s failed: releasing its stock", order_id)
            await asyncio.shield(self._release(order_id, lines, held.hold))
            raise
        if placed is not None and placed.reservation != held.hold:
            # another attempt of this call stored it first: its answer is this one's, and the stock
            # this attempt holds goes back (the stored order keeps its own)
            await asyncio.shield(self._not_kept(order_id, held.hold))
            return placed
        if len(self._kept) < MAX_PENDING:  # (beyond: inventory asks the order, seconds later)
            self._kept.append(KeptHold(order_id, held.hold))  # settled by the next hold_stock
        self.logger.debug("order %s placed for %s: %s", order_id, customer, order.total)
        return order

    async def _not_kept(self, order_id: str, hold: StockHold) -> None:
        """Tell inventory-service now that the order does not keep `hold` (its stock goes back).
        Best effort: a hold not settled is judged by the order itself after a while (kept if the
        order holds it, else given back)."""
        try:
            await self.call(INVENTORY, "settle", SettleStock(order_id, hold, False), int)
        except Exception as e:
            self.logger.info("settling the stock of order %s: %s (the order decides later)", order_id, e)

    async def _release(self, order_id: str, lines: list[StockLine], hold: StockHold) -> None:
        await self.call(INVENTORY, "release", ReleaseStock(order_id, lines, hold), list[StockLevel])
