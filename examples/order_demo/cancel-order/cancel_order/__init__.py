"""`org.demo:cancel-order` — ``DELETE /api/orders/{order_id}``: cancel an order, release its stock.

The status flips from PLACED to CANCELLED with an atomic update of the order in the map
``orders``; only the request that made that change releases the stock (inventory-service
``release``, with the order's hold: back where it was taken), so concurrent or repeated
cancellations release it once. Cancelling a cancelled order is a 409, an unknown order a 404.
"""

from __future__ import annotations

import msgspec
from order_domain import (
    Order,
    OrderStatus,
    ReleaseStock,
    StockLevel,
    StockLine,
    parse_order_id,
    parse_product_id,
    parse_quantity,
)

from aether.slices import Conflict, NotFound, Slice, route
from aether.slices.maps import SliceMap

INVENTORY = "org.demo:inventory-service"
ORDERS_MAP = "orders"


def _now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CancelOrder(Slice):
    """Cancels orders placed through any node."""

    async def start(self) -> None:
        self.orders: SliceMap[Order] = self.map(ORDERS_MAP, Order)

    @route("DELETE", "/api/orders/{order_id}")
    async def cancel_order(self, order_id: str) -> Order:
        """Cancel the order and release its stock; answers the cancelled order."""
        oid = parse_order_id(order_id, "orderId")
        when = _now_iso()

        def cancel(cur: Order | None) -> Order:
            if cur is None:
                raise NotFound(f"no order {oid}")
            if cur.status is OrderStatus.CANCELLED:
                raise Conflict(f"order {oid} is already cancelled (at {cur.cancelled_at})")
            return msgspec.structs.replace(cur, status=OrderStatus.CANCELLED, cancelled_at=when)

        order = await self.orders.update(oid, cancel)
        assert order is not None
        lines = [StockLine(parse_product_id(x.product_id), parse_quantity(x.quantity)) for x in order.lines]
        await self.call(INVENTORY, "release", ReleaseStock(oid, lines, order.reservation), list[StockLevel])
        self.logger.debug("order %s cancelled; released %d line(s)", oid, len(lines))
        return order
