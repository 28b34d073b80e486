"""`org.demo:cancel-order` — ``DELETE /api/orders/{order_id}``: cancel an order, release its stock.

The status flips from PLACED to CANCELLED with an atomic update of the order in the map
``orders``; only the request that made that change releases the stock (inventory-service
``release``, with the order's hold: back where it was taken), so concurrent or repeated
cancellations release it once. Cancelling a cancelled order is a 409, an unknown order a 404.

A cancellation whose release failed (the order is cancelled, the error is answered) is finished by
repeating it: within `RELEASE_AGAIN_S` of the order's cancellation, cancelling a cancelled order
calls ``release`` again before its 409 (release is idempotent: it gives back only what no earlier
try gave back). Until 2026-12-08 the 409 came at once: the stock of an order cancelled while
inventory failed (a node killed or stopped during the call) stayed reserved for good.
"""

from __future__ import annotations

from datetime import UTC, datetime

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
# a cancellation repeated this long after the order was cancelled releases its stock again (well
# within the 10 minutes inventory keeps the record that makes a release idempotent)
RELEASE_AGAIN_S = 300.0


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
        cancelled: list[Order] = []

        def cancel(cur: Order | None) -> Order:
            if cur is None:
                raise NotFound(f"no order {oid}")
            if cur.status is OrderStatus.CANCELLED:
                cancelled.append(cur)
                raise Conflict(f"order {oid} is already cancelled (at {cur.cancelled_at})")
            return msgspec.structs.replace(cur, status=OrderStatus.CANCELLED, cancelled_at=when)

        try:
            order = await self.orders.update(oid, cancel)
        except Conflict:
            if cancelled and _seconds_since(cancelled[-1].cancelled_at) < RELEASE_AGAIN_S:
                await self._release(cancelled[-1])  # the first cancellation's may have failed
            raise
        assert order is not None
        await self._release(order)
        return order

    async def _release(self, order: Order) -> None:
        lines = [StockLine(parse_product_id(x.product_id), parse_quantity(x.quantity)) for x in order.lines]
        await self.call(
            INVENTORY, "release", ReleaseStock(order.order_id, lines, order.reservation), list[StockLevel]
        )
        self.logger.debug("order %s cancelled; released %d line(s)", order.order_id, len(lines))


def _seconds_since(iso: str | None) -> float:
    """Seconds from the time `iso` (as `_now_iso` writes it) to now; infinite if unknown."""
    if not iso:
        return float("inf")
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    return (datetime.now(UTC) - then).total_seconds()
