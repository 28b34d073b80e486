"""`org.demo:get-order-status` — ``GET /api/orders/{order_id}``: an order from the map ``orders``."""

from __future__ import annotations

from order_domain import Order, parse_order_id

from aether.slices import NotFound, Slice, route
from aether.slices.maps import SliceMap

ORDERS_MAP = "orders"


class GetOrderStatus(Slice):
    """Reads orders placed through any node."""

    async def start(self) -> None:
        self.orders: SliceMap[Order] = self.map(ORDERS_MAP, Order)

    @route("GET", "/api/orders/{order_id}")
    async def get_order(self, order_id: str) -> Order:
        """The order with its status (404 for an unknown order, 400 for a malformed id)."""
        oid = parse_order_id(order_id, "orderId")
        order = await self.orders.get(oid)
        if order is None:
            raise NotFound(f"no order {oid}")
        return order
