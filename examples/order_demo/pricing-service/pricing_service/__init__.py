"""`org.demo:pricing-service` — prices from the demo catalog and order totals.

Entries: ``GET /api/pricing/{product_id}`` (the unit price) and ``calculate_total`` (the priced
lines of an order and their sum). Stateless: prices are the catalog's (`order_domain.CATALOG`).
"""

from __future__ import annotations

from order_domain import (
    CATALOG,
    Money,
    OrderLine,
    OrderTotal,
    PriceOrder,
    Product,
    ProductPrice,
    parse_product_id,
    parse_quantity,
)

from aether.slices import BadRequest, NotFound, Slice, entry, route


class PricingService(Slice):
    """Knows the price of every product in the catalog."""

    def _product(self, product_id: str) -> Product:
        product = CATALOG.get(product_id)
        if product is None:
            raise NotFound(f"no price for {product_id}: not in the catalog")
        return product

    @route("GET", "/api/pricing/{product_id}")
    async def get_price(self, product_id: str) -> ProductPrice:
        """The unit price of one product (404 for a product not in the catalog)."""
        product = self._product(parse_product_id(product_id, "productId"))
        return ProductPrice(product.product_id, product.name, product.unit_price)

    @entry
    async def calculate_total(self, req: PriceOrder) -> OrderTotal:
        """Each line priced (unit price x quantity) and the order total, in the catalog currency."""
        if not req.lines:
            raise BadRequest("lines: nothing to price")
        priced: list[OrderLine] = []
        total: Money | None = None
        for i, line in enumerate(req.lines):
            product = self._product(parse_product_id(line.product_id, f"lines[{i}].productId"))
            qty = parse_quantity(line.quantity, f"lines[{i}].quantity")
            line_total = product.unit_price.times(qty)
            priced.append(OrderLine(product.product_id, qty, product.unit_price, line_total))
            total = line_total if total is None else total + line_total
        assert total is not None
        return OrderTotal(priced, total)
