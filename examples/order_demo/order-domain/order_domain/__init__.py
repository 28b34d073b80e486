"""Shared domain of the order demo: parsed value types, the wire types of the five slices, the catalog.

A plain library (no slice in it): every order-demo slice lists ``order-domain`` in its
``[project] dependencies`` and nodes install it from the repository's ``_libs/`` wheelhouse.

Value types are parsed, not validated after the fact: ``parse_order_id("ORD-1", "orderId")``
returns an `OrderId` or raises `aether.slices.BadRequest` whose message starts with the field name
(``orderId: 'X-1' is not an order id ...``), which the HTTP router answers with 400. Wire types are
msgspec structs with camelCase names (``customerId``), shared by the slices that exchange them.
"""

from __future__ import annotations

import enum
import hashlib
import re
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NewType

import msgspec

from aether.slices import BadRequest

__all__ = [
    "CATALOG",
    "CURRENCIES",
    "MAX_KEPT",
    "MAX_LINES",
    "MAX_QUANTITY",
    "CheckStock",
    "CustomerId",
    "KeptHold",
    "Money",
    "Order",
    "OrderId",
    "OrderLine",
    "OrderStatus",
    "OrderTotal",
    "PlaceOrder",
    "PlaceOrderItem",
    "PriceOrder",
    "Product",
    "ProductId",
    "ProductPrice",
    "Quantity",
    "ReleaseStock",
    "ReserveStock",
    "SettleStock",
    "StockAvailability",
    "StockHeld",
    "StockHold",
    "StockLevel",
    "StockLine",
    "StockPiece",
    "new_order_id",
    "order_id_for",
    "parse_currency",
    "parse_customer_id",
    "parse_money",
    "parse_order_id",
    "parse_order_status",
    "parse_product_id",
    "parse_quantity",
]

MAX_QUANTITY: Final = 100
"""Most units of one product in one order line."""
MAX_LINES: Final = 50
"""Most lines in one order."""
CURRENCIES: Final = frozenset({"USD", "EUR", "GBP", "JPY", "CHF"})
"""ISO 4217 codes the demo accepts."""
_MINOR_UNITS: Final = {"USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "CHF": 2}
_ID_BODY = r"[A-Z0-9][A-Z0-9-]{0,39}"

OrderId = NewType("OrderId", str)
"""``ORD-`` followed by 1-40 upper-case letters, digits or dashes (e.g. ``ORD-5F3A9C21``)."""
ProductId = NewType("ProductId", str)
"""``PROD-`` followed by 1-40 upper-case letters, digits or dashes (e.g. ``PROD-ABC123``)."""
CustomerId = NewType("CustomerId", str)
"""``CUST-`` followed by 1-40 upper-case letters, digits or dashes (e.g. ``CUST-123``)."""
Quantity = NewType("Quantity", int)
"""Units of one product in one line: 1..`MAX_QUANTITY`."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _id_parser(prefix: str, what: str) -> Any:
    pattern = re.compile(rf"^{prefix}-{_ID_BODY}$")

    def parse(value: object, field: str) -> str:
        if not isinstance(value, str):
            raise BadRequest(f"{field}: expected {what} ({prefix}-...), got {type(value).__name__}")
        if not pattern.match(value):
            raise BadRequest(
                f"{field}: {_show(value)} is not {what}: expected {prefix}- followed by 1-40 "
                f"upper-case letters, digits or dashes (e.g. {prefix}-ABC123)"
            )
        return value

    return parse


_parse_order = _id_parser("ORD", "an order id")
_parse_product = _id_parser("PROD", "a product id")
_parse_customer = _id_parser("CUST", "a customer id")


def parse_order_id(value: object, field: str = "orderId") -> OrderId:
    """An `OrderId` from `value`; `BadRequest` naming `field` otherwise."""
    return OrderId(_parse_order(value, field))


def parse_product_id(value: object, field: str = "productId") -> ProductId:
    """A `ProductId` from `value`; `BadRequest` naming `field` otherwise."""
    return ProductId(_parse_product(value, field))


def parse_customer_id(value: object, field: str = "customerId") -> CustomerId:
    """A `CustomerId` from `value`; `BadRequest` naming `field` otherwise."""
    return CustomerId(_parse_customer(value, field))


def new_order_id() -> OrderId:
    """A fresh, random order id (``ORD-`` and 16 hex digits)."""
    return OrderId(f"ORD-{uuid.uuid4().hex[:16].upper()}")


def order_id_for(idempotency_key: str | None) -> OrderId:
    """The order id of the call with `idempotency_key` (``ORD-`` and 16 hex digits of its SHA-256):
    every retry of one call places the same order. A new random id when there is no key."""
    if not idempotency_key:
        return new_order_id()
    return OrderId(f"ORD-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:16].upper()}")


def parse_quantity(value: object, field: str = "quantity") -> Quantity:
    """A `Quantity` (an int from 1 to `MAX_QUANTITY`); `BadRequest` naming `field` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{field}: expected a whole number of units, got {type(value).__name__}")
    if not 1 <= value <= MAX_QUANTITY:
        raise BadRequest(f"{field}: must be between 1 and {MAX_QUANTITY}, got {value}")
    return Quantity(value)


def parse_currency(value: object, field: str = "currency") -> str:
    """An ISO 4217 code the demo knows (`CURRENCIES`); `BadRequest` naming `field` otherwise."""
    if not isinstance(value, str) or value not in CURRENCIES:
        raise BadRequest(
            f"{field}: {_show(value)} is not a supported currency; use one of {', '.join(sorted(CURRENCIES))}"
        )
    return value


class Money(msgspec.Struct, frozen=True, rename="camel"):
    """An amount in a currency. Build it with `parse_money` (or `Money.of`) to have it checked.

    JSON: ``{"amount": "24.99", "currency": "USD"}`` (the amount is a decimal string, never a float).
    """

    amount: Decimal
    currency: str

    @classmethod
    def of(cls, amount: Decimal | int | str, currency: str) -> Money:
        return parse_money(amount, currency)

    @classmethod
    def zero(cls, currency: str) -> Money:
        return parse_money(0, currency)

    def __add__(self, other: Money) -> Money:
        if other.currency != self.currency:
            raise BadRequest(f"currency: cannot add {other.currency} to {self.currency}")
        return Money(self.amount + other.amount, self.currency)

    def times(self, quantity: int) -> Money:
        return Money(self.amount * quantity, self.currency)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"


def parse_money(amount: object, currency: object, field: str = "amount") -> Money:
    """`Money` from an amount (Decimal, int or decimal string) and a currency code.

    The amount must be finite, not negative, and have no more decimal places than the currency
    (2 for USD, 0 for JPY); it is quantized to exactly that many. `BadRequest` names `field` (or
    ``currency``) otherwise.
    """
    cur = parse_currency(currency)
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int | str):
        raise BadRequest(f"{field}: expected a decimal amount, got {type(amount).__name__}")
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise BadRequest(f"{field}: {_show(amount)} is not a decimal amount") from None
    if not value.is_finite():
        raise BadRequest(f"{field}: must be a finite amount, got {_show(amount)}")
    if value < 0:
        raise BadRequest(f"{field}: must not be negative, got {value}")
    places = _MINOR_UNITS[cur]
    quantum = Decimal(1).scaleb(-places)
    if value != value.quantize(quantum):
        raise BadRequest(f"{field}: {cur} amounts have at most {places} decimal place(s), got {value}")
    return Money(value.quantize(quantum), cur)


class OrderStatus(enum.Enum):
    """Where an order is: PLACED (stock reserved) or CANCELLED (stock released)."""

    PLACED = "PLACED"
    CANCELLED = "CANCELLED"


def parse_order_status(value: object, field: str = "status") -> OrderStatus:
    """An `OrderStatus` from its name; `BadRequest` naming `field` otherwise."""
    try:
        return OrderStatus(value)
    except ValueError:
        names = ", ".join(s.value for s in OrderStatus)
        raise BadRequest(f"{field}: {_show(value)} is not an order status; one of {names}") from None


# --- the catalog ------------------------------------------------------------------------------------


class Product(msgspec.Struct, frozen=True, rename="camel"):
    product_id: str
    name: str
    unit_price: Money
    initial_stock: int


def _product(pid: str, name: str, price: str, stock: int) -> Product:
    return Product(parse_product_id(pid), name, parse_money(price, "USD"), stock)


CATALOG: Final[dict[str, Product]] = {
    p.product_id: p
    for p in (
        _product("PROD-ABC123", "Wireless mouse", "24.99", 100),
        _product("PROD-XYZ789", "USB-C cable", "9.50", 250),
        _product("PROD-DEF456", "Mechanical keyboard", "89.00", 10),
        _product("PROD-POSTER", "Signed poster (only one)", "150.00", 1),
        # effectively unlimited: for load tests and the benchmark
        _product("PROD-STICKER", "Sticker", "0.50", 100_000_000),
    )
}
"""The demo's products: prices (pricing-service) and the stock seeded on first start (inventory)."""


# --- wire types -------------------------------------------------------------------------------------


class PlaceOrderItem(msgspec.Struct, frozen=True, rename="camel"):
    """One requested line, as the client sends it (checked by `PlaceOrder.parse`)."""

    product_id: str
    quantity: int


class StockLine(msgspec.Struct, frozen=True, rename="camel"):
    """A checked line: a product and a quantity."""

    product_id: ProductId
    quantity: Quantity


class PlaceOrder(msgspec.Struct, frozen=True, rename="camel"):
    """The ``POST /api/orders`` body.

    ``{"customerId": "CUST-123", "items": [{"productId": "PROD-ABC123", "quantity": 2}]}``
    """

    customer_id: str
    items: list[PlaceOrderItem]

    def parse(self) -> tuple[CustomerId, list[StockLine]]:
        """The checked customer and lines; `BadRequest` naming the field (``items[1].quantity``)."""
        customer = parse_customer_id(self.customer_id, "customerId")
        if not self.items:
            raise BadRequest("items: an order needs at least one item")
        if len(self.items) > MAX_LINES:
            raise BadRequest(f"items: at most {MAX_LINES} lines per order, got {len(self.items)}")
        lines: list[StockLine] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(self.items):
            pid = parse_product_id(item.product_id, f"items[{i}].productId")
            if pid in seen:
                raise BadRequest(
                    f"items[{i}].productId: {pid} is already in items[{seen[pid]}]; "
                    "put the whole quantity in one line"
                )
            seen[pid] = i
            lines.append(StockLine(pid, parse_quantity(item.quantity, f"items[{i}].quantity")))
        return customer, lines


class CheckStock(msgspec.Struct, frozen=True, rename="camel"):
    product_id: str
    quantity: int


class StockAvailability(msgspec.Struct, frozen=True, rename="camel"):
    product_id: str
    requested: int
    available: int
    sufficient: bool


class StockLevel(msgspec.Struct, frozen=True, rename="camel"):
    """What the ``stock`` map holds per product; also the answer of ``GET /api/inventory/{id}``."""

    product_id: str
    available: int
    reserved: int = 0


class StockPiece(msgspec.Struct, frozen=True, rename="camel"):
    """Units of one line of an order taken from one key (shard) of the ``stock`` map."""

    product_id: str
    key: str
    quantity: int


class StockHold(msgspec.Struct, frozen=True, rename="camel"):
    """Where inventory-service holds an order's stock (``hold_stock`` answers it, the order keeps
    it): the attempt that took it and the pieces it took."""

    attempt: str
    pieces: list[StockPiece]


MAX_KEPT = 64  # holds of earlier orders one ``hold_stock`` may carry (`ReserveStock.kept`)


class KeptHold(msgspec.Struct, frozen=True, rename="camel"):
    """An order stored with `hold` (`settle` with keep, carried by a later ``hold_stock``)."""

    order_id: str
    hold: StockHold


class ReserveStock(msgspec.Struct, frozen=True, rename="camel"):
    """inventory-service ``reserve`` and ``hold_stock``; `kept` (``hold_stock`` only): holds of
    earlier orders stored with them, settled as kept before this one takes (what place-order
    would otherwise tell ``settle`` in a call of its own)."""

    order_id: str
    lines: list[StockLine]
    kept: list[KeptHold] = []


class StockHeld(msgspec.Struct, frozen=True, rename="camel"):
    """The answer of inventory-service ``hold_stock``: each line's level after the take, the hold,
    and the seconds the caller has from now to store its order with it (later, a collector may
    judge the hold, finding no order, and give its stock back)."""

    levels: list[StockLevel]
    hold: StockHold
    within_s: float


class SettleStock(msgspec.Struct, frozen=True, rename="camel"):
    """inventory-service ``settle``: the order was stored with `hold` (`keep`: its stock stays
    taken) or not (the stock goes back)."""

    order_id: str
    hold: StockHold
    keep: bool


class ReleaseStock(msgspec.Struct, frozen=True, rename="camel"):
    """inventory-service ``release``; `hold`: the order's (`Order.reservation`), if it keeps one."""

    order_id: str
    lines: list[StockLine]
    hold: StockHold | None = None


class ProductPrice(msgspec.Struct, frozen=True, rename="camel"):
    """``GET /api/pricing/{id}``."""

    product_id: str
    name: str
    unit_price: Money


class PriceOrder(msgspec.Struct, frozen=True, rename="camel"):
    lines: list[StockLine]


class OrderLine(msgspec.Struct, frozen=True, rename="camel"):
    """A priced line of an order."""

    product_id: str
    quantity: int
    unit_price: Money
    line_total: Money


class OrderTotal(msgspec.Struct, frozen=True, rename="camel"):
    """What pricing-service answers for a list of lines."""

    lines: list[OrderLine]
    total: Money


class Order(msgspec.Struct, frozen=True, rename="camel"):
    """What the ``orders`` map holds, and the answer of the order routes."""

    order_id: str
    customer_id: str
    status: OrderStatus
    lines: list[OrderLine]
    total: Money
    placed_at: str  # ISO 8601, UTC
    cancelled_at: str | None = None
    # where inventory-service holds its stock (an order placed by a version before holds: None)
    reservation: StockHold | None = None
