"""`org.demo:inventory-service` — stock levels in the distributed map ``stock``.

Entries: ``check_stock`` (is there enough?), ``reserve`` (take stock for an order's lines, all or
nothing), ``release`` (give it back), and ``GET /api/inventory/{product_id}``.

Every change is an atomic read-modify-write of one product's `StockLevel`: read it, compute the
new level, write it with ``compare_and_set`` only if nobody wrote in between, else try again. So
concurrent reservations on any number of instances and nodes never oversell.

Group commit: within one instance, the changes to one product that arrive while a write of that
product is in flight are queued and then applied together, in arrival order, in one
compare-and-set (each take still checked against the stock left by the ones before it). A
popular product then costs one map write per batch instead of one per order, and each instance
has at most one write per product in flight, competing only with the other instances. A lost
round is retried after a short random pause for up to `CHANGE_BUDGET_S` seconds (then 503).

On start, each instance seeds the catalog's initial stock with ``compare_and_set(key, None,
level)``: only the first instance (on any node) to get there writes, later starts change nothing.

Idempotent reservations: ``reserve`` and ``release`` may be retried by the runtime (after the node
running them went down mid-call, the caller cannot know whether they ran), so each keeps a
`Reservation` record per order in the ``stock`` map (key ``reservation:ORDER-ID``, kept for
`RESERVATION_TTL_S`). A reserve claims the record with ``put_if_absent`` before it takes stock and
marks it reserved (with the levels it answered) after; a repeated reserve of the same order answers
the recorded levels without taking stock again. A reserve that finds the record still being
reserved takes it over (the runtime retries only when it believes the first attempt lost); should
the first attempt still finish, it answers what the record says. A release marks the record
released before giving stock back, so a repeated release gives it back once.

Takes are idempotent per order too: each product's stored `StockEntry` holds the orders whose take
is not yet settled (`holds`: order id -> units), written in the same compare-and-set as the take. A
take for an order the product already holds changes nothing, so a retry that takes over the record
of an attempt that died between taking the stock and recording the reservation does not take it
again. Once the reservation is recorded, its holds are dropped with the instance's next write of
that product (no extra write); a release drops them too.
"""

from __future__ import annotations

import asyncio
import copy
import random
import uuid
from dataclasses import dataclass, field

import msgspec
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

from aether.slices import BadRequest, Conflict, NotFound, Slice, SliceHttpError, entry, route
from aether.slices.maps import SliceMap

STOCK_MAP = "stock"
CHANGE_BUDGET_S = 5.0
RESERVATION_TTL_S = 600.0  # how long a reservation record dedupes repeated reserves and releases
RESERVING, RESERVED, RELEASED = "reserving", "reserved", "released"


class StockEntry(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """What the ``stock`` map holds per product: a `StockLevel` (what ``GET /api/inventory/{id}``
    answers; without holds it encodes the same) and the orders whose take is not settled yet."""

    product_id: str
    available: int
    reserved: int
    holds: dict[str, int] = {}

    def level(self) -> StockLevel:
        return StockLevel(self.product_id, self.available, self.reserved)


class Reservation(msgspec.Struct, frozen=True, rename="camel"):
    """The record of one order's reservation (``reservation:ORDER-ID`` in the ``stock`` map)."""

    order_id: str
    state: str  # reserving | reserved | released
    attempt: str = ""  # the reserve attempt that holds the record while reserving
    lines: list[StockLine] = []  # what was reserved
    levels: list[StockLevel] = []  # what the reserve answered


def reservation_key(order_id: str) -> str:
    return f"reservation:{order_id}"


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


def _stopping() -> SliceHttpError:
    return SliceHttpError("the inventory instance is stopping; try again", status=503)


TAKE, GIVE, UNDO = "take", "give", "undo"


@dataclass
class _Change:
    """One queued change of `quantity` units for an order: a take (reserve), a give (release) or
    the undo of a take (a reservation that failed or whose caller went away)."""

    kind: str
    quantity: int
    order_id: str
    done: asyncio.Future[StockLevel | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def take(self) -> bool:
        return self.kind == TAKE


def _without(holds: dict[str, int], order_id: str) -> dict[str, int]:
    return {o: q for o, q in holds.items() if o != order_id}


def _apply(
    product_id: str, entry: StockEntry | None, batch: list[_Change], settled: set[str] | None = None
) -> tuple[StockEntry | None, list[StockLevel | Exception | None]]:
    """The entry after `batch` (with the `settled` orders' holds dropped), and per change its
    result: the level after it, or the error."""
    results: list[StockLevel | Exception | None] = []
    if entry is not None and settled and not settled.isdisjoint(entry.holds):
        entry = msgspec.structs.replace(
            entry, holds={o: q for o, q in entry.holds.items() if o not in settled}
        )
    for ch in batch:
        if entry is None:
            results.append(NotFound(f"no product {product_id}") if ch.take else None)
            continue
        held = ch.order_id in entry.holds
        if ch.kind == TAKE:
            if held:  # an earlier attempt of this reservation took it already
                results.append(entry.level())
                continue
            if entry.available < ch.quantity:
                results.append(
                    Conflict(
                        f"insufficient stock for {product_id}: {entry.available} available, "
                        f"{ch.quantity} requested (order {ch.order_id})"
                    )
                )
                continue
            holds = {**entry.holds, ch.order_id: ch.quantity}
            entry = StockEntry(product_id, entry.available - ch.quantity, entry.reserved + ch.quantity, holds)
        elif ch.kind == GIVE or held:  # an undo gives back only a take that is still held
            holds = _without(entry.holds, ch.order_id) if held else entry.holds
            entry = StockEntry(
                product_id, entry.available + ch.quantity, max(0, entry.reserved - ch.quantity), holds
            )
        results.append(entry.level())
    return entry, results


class InventoryService(Slice):
    """Checks, reserves and releases stock; every instance sees the same `stock` map."""

    async def start(self) -> None:
        self.stock: SliceMap[StockEntry] = self.map(STOCK_MAP, StockEntry)
        self.reservations: SliceMap[Reservation] = self.map(STOCK_MAP, Reservation)
        self.duplicates = 0  # repeated reserves/releases answered from the record (for tests)
        self._queued: dict[str, list[_Change]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}  # the one writer per product with changes
        self._tasks: set[asyncio.Task[None]] = set()
        self._settled: dict[str, set[str]] = {}  # product -> orders whose holds the next write drops
        self.writes = 0  # compare-and-set rounds that changed stock (for tests and curiosity)
        seeded = 0
        for product in CATALOG.values():
            level = StockEntry(product.product_id, product.initial_stock, 0)
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
        entry = await self.stock.get(product_id)
        if entry is None:
            raise NotFound(f"no product {product_id}")
        return entry.level()

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

    # --- group commit ---------------------------------------------------------------------------

    def _submit(self, product_id: str, change: _Change) -> None:
        queue = self._queued.get(product_id)
        if queue is not None:  # a writer for this product is running: it takes this one next
            queue.append(change)
            return
        self._queued[product_id] = [change]
        task = asyncio.get_running_loop().create_task(self._writer(product_id))
        self._writers[product_id] = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._writer_done(product_id, t))

    async def _writer(self, product_id: str) -> None:
        while batch := self._queued.get(product_id):
            self._queued[product_id] = []
            await self._commit(product_id, batch)
        # no await between the last empty check and here: nothing can be queued unseen
        del self._queued[product_id]
        del self._writers[product_id]

    def _writer_done(self, product_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._writers.get(product_id) is task:  # cancelled (maybe before it ran) or failed
            del self._writers[product_id]
            for ch in self._queued.pop(product_id, []):
                if not ch.done.done():
                    ch.done.set_exception(_stopping())

    async def _commit(self, product_id: str, batch: list[_Change]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CHANGE_BUDGET_S
        rounds = 0
        try:
            while True:
                cur = await self.stock.get(product_id)
                settled = self._settled.pop(product_id, None)
                new, results = _apply(product_id, cur, batch, settled)
                if new == cur or await self.stock.compare_and_set(product_id, cur, new):
                    break
                if settled:  # not written: drop them with the next round
                    self._settled.setdefault(product_id, set()).update(settled)
                rounds += 1
                if loop.time() >= deadline:
                    raise SliceHttpError(
                        f"the stock of {product_id} changed {rounds} times while this request tried "
                        "to change it; try again",
                        status=503,
                    )
                await asyncio.sleep(random.uniform(0, 0.001 * 2 ** min(rounds, 6)))
        except BaseException as e:
            for ch in batch:
                if not ch.done.done():
                    ch.done.set_exception(copy.copy(e) if isinstance(e, Exception) else _stopping())
            if not isinstance(e, Exception):
                raise
            return
        if new != cur:
            self.writes += 1
        for ch, result in zip(batch, results, strict=True):
            if ch.done.done():
                continue
            if isinstance(result, Exception):
                ch.done.set_exception(result)
            else:
                ch.done.set_result(result)

    async def _change(self, product_id: str, change: _Change) -> StockLevel | None:
        self._submit(product_id, change)
        try:
            return await asyncio.shield(change.done)
        except asyncio.CancelledError:
            if change.take:  # the caller is gone: give back what the batch may still take for it
                change.done.add_done_callback(lambda f: self._undo(product_id, change, f))
            raise

    def _undo(self, product_id: str, took: _Change, f: asyncio.Future[StockLevel | None]) -> None:
        if f.cancelled() or f.exception() is not None:
            return
        give = _Change(UNDO, took.quantity, took.order_id)
        give.done.add_done_callback(lambda g: g.cancelled() or g.exception())  # nobody awaits it
        self._submit(product_id, give)

    # --- entries --------------------------------------------------------------------------------

    async def _release_all(self, order_id: str, lines: list[StockLine], kind: str = GIVE) -> list[StockLevel]:
        levels = await asyncio.gather(
            *(self._change(line.product_id, _Change(kind, line.quantity, order_id)) for line in lines)
        )
        return [lv for lv in levels if lv is not None]

    @entry(idempotent=True)
    async def reserve(self, req: ReserveStock) -> list[StockLevel]:
        """Take stock for every line, or none: on a failure the lines already taken are given back.
        Repeating it for the same order takes nothing more: it answers what the first one did.

        409 (`Conflict`) names the first product without enough stock; 404 an unknown product.
        """
        order_id = parse_order_id(req.order_id, "orderId")
        lines = _checked(req.lines)
        key = reservation_key(order_id)
        mine = Reservation(order_id, RESERVING, uuid.uuid4().hex, lines)
        held = await self.reservations.put_if_absent(key, mine, ttl=RESERVATION_TTL_S)
        while held is not None:  # the order has a record already
            if held.state != RELEASED and held.lines != lines:
                raise Conflict(f"order {order_id} already has a reservation of other lines")
            if held.state == RESERVED:
                self.duplicates += 1
                self.logger.info(
                    "reserve of order %s repeated (idempotency key %s): answering the first one's levels",
                    order_id, self.context.idempotency_key,
                )  # fmt: skip
                return held.levels
            # RESERVING: an attempt the caller gave up on (it retries only then): take it over;
            # RELEASED: a reservation given back before: this one starts afresh
            if await self.reservations.compare_and_set(key, held, mine, ttl=RESERVATION_TTL_S):
                break
            held = await self.reservations.put_if_absent(key, mine, ttl=RESERVATION_TTL_S)
        try:
            levels = await self._take(order_id, lines)
        except BaseException:
            # nothing stays taken: free the record (shielded, like the give-back) so a retry may try
            await asyncio.shield(self.reservations.compare_and_set(key, mine, None))
            raise
        done = Reservation(order_id, RESERVED, mine.attempt, lines, levels)
        if not await self.reservations.compare_and_set(key, mine, done, ttl=RESERVATION_TTL_S):
            # a retry took the record over meanwhile: the takes are the order's (held once, by
            # order id), the retry records them; answer what it recorded
            self.logger.warning("reserve of order %s was taken over by a retry", order_id)
            current = await self.reservations.get(key)
            if current is not None and current.state == RESERVED:
                return current.levels
            raise SliceHttpError(
                f"the reservation of order {order_id} is being retried; try again", status=503
            )
        for line in lines:  # recorded: the holds are no longer needed
            self._settled.setdefault(line.product_id, set()).add(order_id)
        return levels

    async def _take(self, order_id: str, lines: list[StockLine]) -> list[StockLevel]:
        taken: list[StockLine] = []
        levels: list[StockLevel] = []
        try:
            for line in lines:
                level = await self._change(line.product_id, _Change(TAKE, line.quantity, order_id))
                assert level is not None
                levels.append(level)
                taken.append(line)
        except BaseException:
            if taken:
                # shielded: a cancelled caller must not leave the taken lines reserved
                await asyncio.shield(self._release_all(order_id, taken, UNDO))
            raise
        return levels

    @entry(idempotent=True)
    async def release(self, req: ReleaseStock) -> list[StockLevel]:
        """Give back the stock of an order's lines (after a cancellation); repeating it for the same
        order gives nothing more back (it answers the current levels)."""
        order_id = parse_order_id(req.order_id, "orderId")
        lines = _checked(req.lines)
        key = reservation_key(order_id)
        released = Reservation(order_id, RELEASED)
        held = await self.reservations.put_if_absent(key, released, ttl=RESERVATION_TTL_S)
        while held is not None:
            if held.state == RELEASED:
                self.duplicates += 1
                return [await self._level(line.product_id) for line in lines]
            if await self.reservations.compare_and_set(key, held, released, ttl=RESERVATION_TTL_S):
                break
            held = await self.reservations.put_if_absent(key, released, ttl=RESERVATION_TTL_S)
        return await self._release_all(order_id, lines)
