"""`org.demo:inventory-service` — stock levels in the distributed map ``stock``.

Entries: ``check_stock`` (is there enough?), ``reserve`` (take stock for an order's lines, all or
nothing), ``release`` (give it back), and ``GET /api/inventory/{product_id}``. Every change is an
atomic read-modify-write of one product's `StockLevel` (`SliceMap.update`, a compare-and-set loop),
so concurrent reservations on any number of instances and nodes never oversell.

On start, each instance seeds the catalog's initial stock with ``compare_and_set(key, None,
level)``: only the first instance (on any node) to get there writes, later starts change nothing.
"""

from __future__ import annotations

import asyncio

from order_domain import (
    CATALOG,
    CheckStock,
    ReleaseStock,
    ReserveStock,
    StockAvailability,
    StockLevel,
    StockLine,
    parse_order_id,
    parse_product_id,
    parse_quantity,
)

from aether.slices import BadRequest, Conflict, NotFound, Slice, entry, route

STOCK_MAP = "stock"


def _checked(lines: list[StockLine]) -> list[StockLine]:
    out = [
        StockLine(
            parse_product_id(line.product_id, f"lines[{i}].productId"),
            parse_quantity(line.quantity, f"lines[{i}].quantity"),
        )
        for i, line in enumerate(lines)
    ]
    if not out:
        raise BadRequest("lines: nothing to reserve or release")
    return out


class InventoryService(Slice):
    """Checks, reserves and releases stock; every instance sees the same `stock` map."""

    async def start(self) -> None:
        self.stock = self.map(STOCK_MAP, StockLevel)
        seeded = 0
        for product in CATALOG.values():
            level = StockLevel(product.product_id, product.initial_stock, 0)
            if await self.stock.compare_and_set(product.product_id, None, level):
                seeded += 1
        self.logger.info(
            "inventory instance %d on %s: seeded %d of %d products",
            self.context.instance,
            self.context.node_id,
            seeded,
            len(CATALOG),
        )

    async def _level(self, product_id: str) -> StockLevel:
        level = await self.stock.get(product_id)
        if level is None:
            raise NotFound(f"no product {product_id}")
        return level

    @route("GET", "/api/inventory/{product_id}")
    async def get_stock(self, product_id: str) -> StockLevel:
        """The stock level of one product (404 for a product the inventory does not know)."""
        return await self._level(parse_product_id(product_id, "productId"))

    @entry
    async def check_stock(self, req: CheckStock) -> StockAvailability:
        """Whether `quantity` units of the product could be reserved now (no reservation is made)."""
        pid = parse_product_id(req.product_id, "productId")
        qty = parse_quantity(req.quantity, "quantity")
        level = await self._level(pid)
        return StockAvailability(pid, qty, level.available, level.available >= qty)

    async def _take(self, order_id: str, line: StockLine) -> StockLevel:
        def take(cur: StockLevel | None) -> StockLevel:
            if cur is None:
                raise NotFound(f"no product {line.product_id}")
            if cur.available < line.quantity:
                raise Conflict(
                    f"insufficient stock for {line.product_id}: {cur.available} available, "
                    f"{line.quantity} requested (order {order_id})"
                )
            return StockLevel(cur.product_id, cur.available - line.quantity, cur.reserved + line.quantity)

        level = await self.stock.update(line.product_id, take)
        assert level is not None
        return level

    async def _give_back(self, line: StockLine) -> StockLevel | None:
        def give(cur: StockLevel | None) -> StockLevel | None:
            if cur is None:  # the product was removed meanwhile: nothing to give back to
                return None
            return StockLevel(
                cur.product_id, cur.available + line.quantity, max(0, cur.reserved - line.quantity)
            )

        return await self.stock.update(line.product_id, give)

    @entry
    async def reserve(self, req: ReserveStock) -> list[StockLevel]:
        """Take stock for every line, or none: on a failure the lines already taken are given back.

        409 (`Conflict`) names the first product without enough stock; 404 an unknown product.
        """
        order_id = parse_order_id(req.order_id, "orderId")
        lines = _checked(req.lines)
        taken: list[StockLine] = []
        levels: list[StockLevel] = []
        try:
            for line in lines:
                levels.append(await self._take(order_id, line))
                taken.append(line)
        except BaseException:
            if taken:
                # shielded: a cancelled caller must not leave the taken lines reserved
                await asyncio.shield(self._release_all(taken))
            raise
        return levels

    async def _release_all(self, lines: list[StockLine]) -> list[StockLevel]:
        levels = await asyncio.gather(*(self._give_back(line) for line in lines))
        return [lv for lv in levels if lv is not None]

    @entry
    async def release(self, req: ReleaseStock) -> list[StockLevel]:
        """Give back the stock of an order's lines (after a cancellation)."""
        parse_order_id(req.order_id, "orderId")
        return await self._release_all(_checked(req.lines))
