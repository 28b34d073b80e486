"""`org.demo:place-order` — ``POST /api/orders``: validate, check stock, price, reserve, store.

1. parse the request (`PlaceOrder.parse`: 400 naming the field, e.g. ``items[0].quantity``);
2. check the stock of every line in parallel (``asyncio.gather`` of calls to inventory-service):
   an unknown product is a 400 naming its line, too little stock a 409;
3. price the lines (pricing-service ``calculate_total``);
4. reserve the stock of all lines (inventory-service ``reserve``, all or nothing; a 409 from a
   reservation that lost a race escapes as is);
5. store the order in the distributed map ``orders`` under its id; if that fails, the
   reservation is released before the error is answered.

The order id is derived from the call's idempotency key (`order_id_for`): a retry of the same call
(the runtime's after a crash, or a client's with the same ``Idempotency-Key`` header) places the
same order, whose reservation inventory-service does not repeat; an order that is stored already is
answered as it is.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from order_domain import (
    CheckStock,
    Order,
    OrderStatus,
    OrderTotal,
    PlaceOrder,
    PriceOrder,
    ReleaseStock,
    ReserveStock,
    StockAvailability,
    StockLevel,
    StockLine,
    order_id_for,
)

from aether.invoke.errors import SliceAppError
from aether.slices import BadRequest, Conflict, Slice, route
from aether.slices.maps import SliceMap

INVENTORY = "org.demo:inventory-service"
PRICING = "org.demo:pricing-service"
ORDERS_MAP = "orders"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PlaceOrderService(Slice):
    """Places orders; the order is readable through every node as soon as this answers."""

    async def start(self) -> None:
        self.orders: SliceMap[Order] = self.map(ORDERS_MAP, Order)

    async def _check(self, i: int, line: StockLine) -> None:
        try:
            stock = await self.call(
                INVENTORY, "check_stock", CheckStock(line.product_id, line.quantity), StockAvailability
            )
        except SliceAppError as e:
            if e.status == 404:
                raise BadRequest(f"items[{i}].productId: {e.detail}") from None
            raise
        if not stock.sufficient:
            raise Conflict(
                f"items[{i}]: insufficient stock for {line.product_id}: "
                f"{stock.available} available, {line.quantity} requested"
            )

    @route("POST", "/api/orders")
    async def place_order(self, req: PlaceOrder) -> Order:
        """Place an order; answers it with its id, status PLACED, priced lines and total."""
        customer, lines = req.parse()
        order_id = order_id_for(self.context.idempotency_key)
        placed = await self.orders.get(order_id)
        if placed is not None:  # a repeat of a call that placed it already
            return placed
        await asyncio.gather(*(self._check(i, line) for i, line in enumerate(lines)))
        priced = await self.call(PRICING, "calculate_total", PriceOrder(lines), OrderTotal)
        await self.call(INVENTORY, "reserve", ReserveStock(order_id, lines), list[StockLevel])
        order = Order(order_id, customer, OrderStatus.PLACED, priced.lines, priced.total, now_iso())
        try:
            await self.orders.put(order_id, order)
        except BaseException:
            self.logger.warning("storing order %s failed: releasing its reservation", order_id)
            await asyncio.shield(
                self.call(INVENTORY, "release", ReleaseStock(order_id, lines), list[StockLevel])
            )
            raise
        self.logger.debug("order %s placed for %s: %s", order_id, customer, order.total)
        return order
