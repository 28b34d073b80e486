"""`org.demo:inventory-service` — stock levels in the distributed map ``stock``.

Entries: ``check_stock`` (is there enough?), ``hold_stock`` and ``settle`` (take stock for an
order's lines, all or nothing, for a caller whose order is the record: place-order), ``reserve``
(the same with a record of its own, for a caller without one), ``release`` (give it back), and
``GET /api/inventory/{product_id}``.

Every change is an atomic read-modify-write of one stock entry (`StockEntry`): compute the new
level, write it with ``compare_and_set`` only if nobody wrote in between, else read and try again.
So concurrent reservations on any number of instances and nodes never oversell.

Group commit: within one instance, the changes to one entry that arrive while a write of it is in
flight are queued and then applied together, in arrival order, in one compare-and-set (each take
still checked against the stock left by the ones before it). A popular product then costs one map
write per batch instead of one per order. The expected value is what the instance's writer wrote
last, so a round is a single write; a lost round reads the entry and is retried after a short
random pause for up to `CHANGE_BUDGET_S` seconds (then 503).

Escrow shards: a product with at least `SHARD_FROM` units of initial stock keeps them in
`STOCK_SHARDS` entries (`shard_keys`: its id, then ``ID~1`` ...), each with a share. Instance k
prefers the shards whose primary copy is on its node (`SliceMap.owned_here`: a write decided
there, a network hop fewer each way; 0.96x the CPU per order), from the k-th of them on, then the
others from ``k mod STOCK_SHARDS`` on (`_shard_preference`, `shard_order`), and takes from the
less busy of its first `SHARDS_IN_USE` (1); a round lost on a shard sends it to the end of the
order, so the instances of the cluster write apart instead of colliding on one key (up to
`STOCK_SHARDS` instances). A take its shard cannot give (it ran low, or it does not exist: a product seeded
with fewer shards by an earlier version keeps those) makes the line read all the shards and take
from the fullest (in pieces if needed): 409 only when all together have too little. The
product's level is the sum of its shards.

On start, each instance seeds the catalog's initial stock with ``compare_and_set(key, None,
level)`` (a split product's shards first, its own key last): only the first instance (on any node)
to get there writes, later starts change nothing.

Idempotent reservations: ``reserve`` and ``release`` may be retried by the runtime (after the node
running them went down mid-call, the caller cannot know whether they ran), so each keeps a
`Reservation` record per order in the ``stock`` map (key ``reservation:ORDER-ID``, kept for
`RESERVATION_TTL_S`). Each reserve is an *attempt* with an id of its own (`new_attempt`: the
wall-clock second it began and random hex). It takes the stock first, each take held in the
entry it took from (`StockEntry.holds`, ``ORDER-ID/ATTEMPT`` -> units, `hold_key`) in the same
compare-and-set as the take; then it writes the record with ``put_if_absent`` (reserved: the
lines, the levels it answers and its `plan`, the entries each line took from) and answers. That
is one map write of its own per reservation; the take is shared with the batch it went in.

- The record is there already: a repeat of a reservation (it gives back what it just took and
  answers the recorded levels; with other lines: 409), or one given back before (released: this
  one replaces it). A repeat of a reservation that took the last units finds none left to take: the
  record answers it too. Retried compare-and-set rounds of one attempt take once (the hold is
  there).
- An attempt that took but never wrote its record (its node died, the map failed it) leaves its
  holds behind: holds older than ``hold_gc_s`` (the slice's config, `HOLD_GC_S` by default) are
  collected (`_collect`) by an instance writing the entry, and by every instance's sweep of the
  catalog's entries (`_sweep`, every quarter of that: an entry nobody writes any more, e.g. the
  shard of a dead node's instance): it reads the order's record; written by that attempt: the hold
  is dropped and the stock stays taken; not written: the units are given back. So an attempt
  writes its record within half of ``hold_gc_s`` from its start (the write itself bounded by
  that) or gives its takes back itself and answers 503: the collector's judgement leaves it ample
  time (the nodes' clocks agreeing within seconds). A retry after such a death takes anew; the dead
  attempt's units come back once collected.
- Once its record is written, an attempt's holds are dropped with the instance's next write of the
  entry (no extra write). A release marks the record *releasing* (keeping the attempt it releases
  and the plan), gives the units back where the plan took them (dropping that attempt's holds) and
  then marks it released. Each give writes a *release mark* in the entry, in the same
  compare-and-set (`release_mark`: ``ORDER-ID!ATTEMPT`` -> the second it gave), and a give that
  finds its mark gives nothing: a release that failed half-way (a give or the record's last write
  not answered) is finished by repeating it, which gives each piece once. (Until 2026-12-08 the
  record said released before the gives: a release whose give then failed left the units reserved
  for good, and its repeat answered from the record, giving nothing.) Marks are dropped by the
  collector once the record says released and the mark is ``hold_gc_s`` old, or after twice
  `RESERVATION_TTL_S` whatever the record says.

(Until this version, a reserve claimed the record before taking, a write more per order: on the
benchmark's hot product 0.82x the CPU per order without it. Holds and records written by that
version still decode; its holds, keyed by order id alone, are dropped by a release of the order.)

Holds the order keeps (``hold_stock``, ``settle``): the record costs a map write per order, and
the caller's own write of its order can carry it. ``hold_stock`` takes as ``reserve`` does (an
attempt whose id ends in `ORDER_KEPT`, its holds in the entries) and answers the levels and the
hold (`StockHold`: the attempt and the pieces, the keys each line took from), with no record.
place-order stores the order with it (`Order.reservation`, in the same ``put_if_absent``) and then
settles it: kept, carried by its next ``hold_stock`` (`ReserveStock.kept`; or ``settle``), the
holds go with this instance's next write of each entry (no write of its own); not kept (another
attempt of the call stored the order first; ``settle``), what is still held goes back. A
settlement that reaches an instance not writing the hold's key (several instances on a
node, or none on the caller's) changes nothing there; the instance that writes the key asks the
order about an unsettled hold once it is `SETTLE_CHECK_S` old and drops it if the order keeps it
(so its entry carries a few seconds of holds, not a minute's). A hold nobody settles (the caller
died, or the answer was lost and the call retried, which takes anew) is judged by the collector
as above, by the order instead of a record (`_judge`): the order stored with this attempt and
naming this key keeps it, else it goes back. A ``release`` with the order's hold gives back where
the pieces were taken (and drops their holds); its record (released) keeps a repeated release
from giving twice. On the benchmark's hot product: 0.78x the CPU per order, 1.27x the orders per
second of ``reserve`` (bench/README.md).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from order_domain import (
    CATALOG,
    MAX_KEPT,
    CheckStock,
    Order,
    ReleaseStock,
    ReserveStock,
    SettleStock,
    StockAvailability,
    StockHeld,
    StockHold,
    StockLevel,
    StockLine,
    StockPiece,
    parse_order_id,
    parse_product_id,
    parse_quantity,
)

from aether.slices import BadRequest, Conflict, NotFound, Slice, SliceHttpError, entry, route
from aether.slices.maps import SliceMap

STOCK_MAP = "stock"
ORDERS_MAP = "orders"  # where the orders that keep their holds are (`hold_stock`)
ORDER_KEPT = "o"  # the last character of a `hold_stock` attempt: its order is its record
CHANGE_BUDGET_S = 5.0
RESERVATION_TTL_S = 600.0  # how long a reservation record dedupes repeated reserves and releases
HOLD_GC_S = 60.0  # default `hold_gc_s`: holds older are collected (kept or given back, as the record says)
MIN_HOLD_GC_S = 6.0
RECORD_SHARE = 2  # a reserve gives up unless its record is written within hold_gc_s / RECORD_SHARE
# (generous: a map write waits out a failover of its key's primary, seconds after a kill -9)
MAX_SETTLED = 10_000  # holds one instance keeps to drop with its next write of a key
SETTLE_CHECK_S = 3.0  # a `hold_stock` hold older, not settled here, is checked against its order
SWEEPS = 4  # sweeps of the catalog's entries per hold_gc_s
RESERVING, RESERVED, RELEASING, RELEASED = "reserving", "reserved", "releasing", "released"
MARK = "!"  # in a key of `StockEntry.holds`: a release mark (`release_mark`), not a hold
STOCK_SHARDS = 16  # keys a product with at least SHARD_FROM units of initial stock is split over
# (at least as many as inventory instances: two instances on one shard lose rounds to each other;
# with 4, six instances placed 838 orders/s at p99 350 ms)
SHARD_FROM = 4000  # (at least 250 units a shard)
SHARDS_IN_USE = 1  # shards one instance writes at the same time (its first preferences)
REPLANS = 3  # how often one line looks for stock in other shards before answering 409


def shard_keys(product_id: str) -> list[str]:
    """The `stock` map keys holding a product's stock: the product id itself and, for a product of
    the catalog with at least `SHARD_FROM` units, ``PRODUCT-ID~1`` .. ``~15`` (escrow shards)."""
    return list(_shard_keys(product_id, SHARD_FROM, STOCK_SHARDS))


@functools.lru_cache(maxsize=1024)  # (of the constant catalog: asked several times per order)
def _shard_keys(product_id: str, shard_from: int, shards: int) -> tuple[str, ...]:
    product = CATALOG.get(product_id)  # type: ignore[call-overload]
    n = shards if product is not None and product.initial_stock >= shard_from else 1
    return (product_id, *(f"{product_id}~{k}" for k in range(1, n)))


def shard_order(keys: list[str], instance: int) -> list[str]:
    """The order in which instance `instance` prefers a product's shard `keys`: rotated to start at
    ``keys[instance % len(keys)]``, so that instances (their ids are unique per slice, 0, 1, ...)
    begin on different shards while there are at least as many shards as instances. (A random order
    per instance gave two instances the same first shard one time in four, and the same order now
    and then: rounds lost on both sides, each demoting the shard, keep them meeting on the next one,
    with backoff pauses that put a few orders at 0.2-1.2 s.)"""
    k = instance % len(keys)
    return keys[k:] + keys[:k]


def new_attempt(now: float) -> str:
    """A reserve attempt's id: the wall-clock second it began (what `hold_time` reads back) and
    32 random bits (`random`, not `secrets`: only unique among one order's attempts, and a system
    call per reserve showed in the profile)."""
    return f"{int(now)}-{random.getrandbits(32):08x}"


def hold_key(order_id: str, attempt: str) -> str:
    """The key of an attempt's hold in a `StockEntry`: ``ORDER-ID/ATTEMPT``."""
    return f"{order_id}/{attempt}"


def release_mark(order_id: str, attempt: str) -> str:
    """The key of the mark a release of `order_id`'s hold by `attempt` leaves in each entry it
    gives back to: ``ORDER-ID!ATTEMPT`` (no ``/``: `hold_time` is None, no collector judges it as
    a hold)."""
    return f"{order_id}{MARK}{attempt}"


def hold_time(key: str) -> int | None:
    """When the attempt holding `key` began (epoch seconds); None for a hold of the version before
    attempts (keyed by order id alone) or a key this version did not write."""
    _, _, attempt = key.partition("/")
    began, _, _ = attempt.partition("-")
    try:
        return int(began)
    except ValueError:
        return None


def _hold_gc_s(value: object) -> float:
    """The ``hold_gc_s`` config value, checked: seconds, at least `MIN_HOLD_GC_S`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= MIN_HOLD_GC_S:
        raise ValueError(f"config hold_gc_s: must be a number of seconds >= {MIN_HOLD_GC_S:g}, got {value!r}")
    return float(value)


def split(total: int, n: int) -> list[int]:
    """`total` units over `n` shards, as evenly as possible (the first ones get the remainder)."""
    return [total // n + (1 if k < total % n else 0) for k in range(n)]


class StockEntry(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """What the ``stock`` map holds per product (or per shard of a product): a `StockLevel` (what
    ``GET /api/inventory/{id}`` answers, summed over the shards; without holds it encodes the same)
    and the takes not settled yet: hold key (`hold_key`: order and attempt) -> units; and the
    release marks (`release_mark` -> the epoch second of the give)."""

    product_id: str
    available: int
    reserved: int
    holds: dict[str, int] = {}

    def level(self) -> StockLevel:
        return StockLevel(self.product_id, self.available, self.reserved)


Piece = StockPiece  # units of one line taken from one key (shard) of the ``stock`` map


class Reservation(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """The record of one order's reservation (``reservation:ORDER-ID`` in the ``stock`` map)."""

    order_id: str
    state: str  # reserving | reserved | releasing | released
    attempt: str = ""  # the reserve attempt that wrote it (released: the attempt it released)
    lines: list[StockLine] = []  # what was reserved
    levels: list[StockLevel] = []  # what the reserve answered
    plan: list[Piece] = []  # where each line's units were taken from (held there by `attempt`)


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


def _checked_hold(hold: StockHold, field: str = "hold") -> list[Piece]:
    """The pieces of a hold a caller sends back (`settle`, `release`, `ReserveStock.kept`), checked:
    each a key of its product's stock and a quantity; an attempt of `hold_stock`. Errors name the
    hold as `field`."""
    if not hold.attempt.endswith(ORDER_KEPT) or hold_time(f"/{hold.attempt}") is None:
        raise BadRequest(f"{field}.attempt: {hold.attempt!r} is not an attempt of hold_stock")
    if not hold.pieces:
        raise BadRequest(f"{field}.pieces: nothing held")
    out: list[Piece] = []
    for i, p in enumerate(hold.pieces):
        pid = parse_product_id(p.product_id, f"{field}.pieces[{i}].productId")
        if p.key not in shard_keys(pid):
            raise BadRequest(f"{field}.pieces[{i}].key: {p.key!r} is not a stock key of {pid}")
        out.append(Piece(pid, p.key, parse_quantity(p.quantity, f"{field}.pieces[{i}].quantity")))
    return out


def _stopping() -> SliceHttpError:
    return SliceHttpError("the inventory instance is stopping; try again", status=503)


TAKE, GIVE, UNDO, DROP, RELEASE = "take", "give", "undo", "drop", "release"


@dataclass
class _Change:
    """One queued change of `quantity` units for an order: a take (reserve), a give (release), the
    undo of a take (a reservation that failed, whose caller went away, or that was collected), or
    the drop of a hold whose stock stays taken (collected: recorded), or a release (a give that
    leaves the release mark `mark`, stamped `at`, and gives nothing if the mark is there). `hold`:
    the hold key the take writes, the undo gives back (only if held), the give, the release and
    the drop remove."""

    kind: str
    quantity: int
    order_id: str
    hold: str
    mark: str = ""
    at: int = 0
    done: asyncio.Future[StockLevel | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def take(self) -> bool:
        return self.kind == TAKE


def _without(holds: dict[str, int], *keys: str) -> dict[str, int]:
    return {k: q for k, q in holds.items() if k not in keys}


def _apply(
    product_id: str, entry: StockEntry | None, batch: list[_Change], settled: set[str] | None = None
) -> tuple[StockEntry | None, list[StockLevel | Exception | None]]:
    """The entry after `batch` (with the `settled` holds dropped), and per change its result: the
    level after it, or the error."""
    results: list[StockLevel | Exception | None] = []
    if entry is not None and settled and not settled.isdisjoint(entry.holds):
        entry = msgspec.structs.replace(
            entry, holds={o: q for o, q in entry.holds.items() if o not in settled}
        )
    for ch in batch:
        if entry is None:
            results.append(NotFound(f"no product {product_id}") if ch.take else None)
            continue
        held = ch.hold in entry.holds
        if ch.kind == TAKE:
            if held:  # an earlier round of this attempt took it already
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
            holds = {**entry.holds, ch.hold: ch.quantity}
            entry = StockEntry(product_id, entry.available - ch.quantity, entry.reserved + ch.quantity, holds)
        elif ch.kind == DROP:
            if held:
                entry = msgspec.structs.replace(entry, holds=_without(entry.holds, ch.hold))
        elif ch.kind == RELEASE:
            if ch.mark not in entry.holds:  # else an earlier try of this release gave it back
                holds = {**_without(entry.holds, ch.hold, ch.order_id), ch.mark: ch.at}
                entry = StockEntry(
                    product_id, entry.available + ch.quantity, max(0, entry.reserved - ch.quantity), holds
                )
        elif ch.kind == GIVE or held:  # an undo gives back only a take that is still held
            # (a give drops the released attempt's hold, and one of the version keyed by order id)
            legacy = ch.kind == GIVE and ch.order_id in entry.holds
            holds = _without(entry.holds, ch.hold, ch.order_id) if held or legacy else entry.holds
            entry = StockEntry(
                product_id, entry.available + ch.quantity, max(0, entry.reserved - ch.quantity), holds
            )
        results.append(entry.level())
    return entry, results


def _plan_line(product_id: str, missing: int, found: dict[str, StockEntry | None]) -> list[Piece]:
    """`missing` units of a product from the shards in `found` (key -> entry read), the fullest
    first; `Conflict` (or `NotFound` if no shard exists) when they hold fewer."""
    have = sorted(((e.available, k) for k, e in found.items() if e is not None), key=lambda x: -x[0])
    if not have:
        raise NotFound(f"no product {product_id}")
    total = sum(a for a, _ in have)
    if total < missing:
        raise Conflict(f"insufficient stock for {product_id}: {total} available, {missing} requested")
    out: list[Piece] = []
    for available, key in have:
        if missing == 0:
            break
        n = min(available, missing)
        if n > 0:
            out.append(Piece(product_id, key, n))
            missing -= n
    return out


class InventoryService(Slice):
    """Checks, reserves and releases stock; every instance sees the same `stock` map."""

    async def start(self) -> None:
        self.stock: SliceMap[StockEntry] = self.map(STOCK_MAP, StockEntry)
        self.reservations: SliceMap[Reservation] = self.map(STOCK_MAP, Reservation)
        self._raw: SliceMap[msgspec.Raw] = self.map(STOCK_MAP, msgspec.Raw)
        self._orders: SliceMap[Order] | None = None  # the records of `hold_stock` (`_judge` opens it)
        self.duplicates = 0  # repeated reserves/releases answered from the record (for tests)
        self._queued: dict[str, list[_Change]] = {}  # stock key -> changes waiting for its writer
        self._writers: dict[str, asyncio.Task[None]] = {}  # the one writer per key with changes
        self._tasks: set[asyncio.Task[None]] = set()
        self._settled: dict[str, set[str]] = {}  # stock key -> holds the next write of it drops
        self._collecting: set[tuple[str, str]] = set()  # (stock key, hold) being judged (`_collect`)
        self._swept: dict[str, float] = {}  # stock key -> when `_collect` may look at it again
        self._clock: Callable[[], float] = time.time  # wall clock: attempts' ids and holds' ages
        self.hold_gc_s = _hold_gc_s(self.context.config.get("hold_gc_s", HOLD_GC_S))
        self.record_within_s = self.hold_gc_s / RECORD_SHARE
        self.collected = 0  # old holds collected, kept or given back (for tests and curiosity)
        self._known: dict[str, StockEntry] = {}  # stock key -> its value as this instance last saw it
        # product -> [available, reserved, keys] summed over its shards in `_known` (kept by `_see`)
        self._seen: dict[str, list[int]] = {}
        self._expect: dict[str, StockEntry] = {}  # stock key -> what this instance's writer wrote last
        self._prefer: dict[str, list[str]] = {}  # product -> its shard keys, this instance's order
        self.writes = 0  # compare-and-set rounds that changed stock (for tests and curiosity)
        self.lost = 0  # compare-and-set rounds lost to another instance (for tests and curiosity)
        seeded = 0
        for product in CATALOG.values():
            keys = shard_keys(product.product_id)
            shares = split(product.initial_stock, len(keys))
            if len(keys) > 1 and await self.stock.get(keys[0]) is not None:
                continue  # seeded already (or by a version without shards: it all stays in keys[0])
            # the product's own key last: once it exists, every shard does
            for key, share in reversed(list(zip(keys, shares, strict=True))):
                level = StockEntry(product.product_id, share, 0)
                if await self.stock.compare_and_set(key, None, level):
                    self._see(key, level)
                    self._expect[key] = level
                    seeded += key == keys[0]
        self.logger.info(
            "inventory instance %d on %s: seeded %d of %d products",
            self.context.instance,
            self.context.node_id,
            seeded,
            len(CATALOG),
        )
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    # --- reading --------------------------------------------------------------------------------

    async def _read(self, key: str) -> StockEntry | None:
        entry = await self.stock.get(key)
        self._see(key, entry)
        return entry

    def _see(self, key: str, entry: StockEntry | None) -> None:
        """`entry` is the value of stock key `key` now (None: there is none): remember it, and keep
        its product's sums over the shards seen (`_estimate` answers from them: summing 16 shards
        per order was 2 % of the CPU of the order demo)."""
        old = self._known.pop(key, None) if entry is None else self._known.get(key)
        if entry is not None:
            self._known[key] = entry
        if old is not None:
            sums = self._seen[old.product_id]
            sums[0] -= old.available
            sums[1] -= old.reserved
            sums[2] -= 1
        if entry is not None:
            sums = self._seen.get(entry.product_id)
            if sums is None:
                sums = self._seen[entry.product_id] = [0, 0, 0]
            sums[0] += entry.available
            sums[1] += entry.reserved
            sums[2] += 1

    async def _read_all(self, product_id: str, keys: list[str] | None = None) -> dict[str, StockEntry | None]:
        keys = shard_keys(product_id) if keys is None else keys
        found = await asyncio.gather(*(self._read(k) for k in keys))
        return dict(zip(keys, found, strict=True))

    @staticmethod
    def _sum(product_id: str, entries: list[StockEntry | None]) -> StockLevel:
        present = [e for e in entries if e is not None]
        if not present:
            raise NotFound(f"no product {product_id}")
        return StockLevel(product_id, sum(e.available for e in present), sum(e.reserved for e in present))

    async def _level(self, product_id: str) -> StockLevel:
        """The product's level now: its shards read (in parallel) and summed."""
        return self._sum(product_id, list((await self._read_all(product_id)).values()))

    async def _estimate(self, product_id: str) -> StockLevel:
        """The product's level as this instance last saw each shard (a shard never seen is read)."""
        sums = self._seen.get(product_id)
        if sums is None or sums[2] < len(_shard_keys(product_id, SHARD_FROM, STOCK_SHARDS)):
            keys = shard_keys(product_id)
            unseen = [k for k in keys if k not in self._known]
            if unseen:
                await self._read_all(product_id, unseen)
            sums = self._seen.get(product_id)
            if sums is None or sums[2] == 0:
                raise NotFound(f"no product {product_id}")
        return StockLevel(product_id, sums[0], sums[1])

    @route("GET", "/api/inventory/{product_id}")
    async def get_stock(self, product_id: str) -> StockLevel:
        """The stock level of one product (404 for a product the inventory does not know)."""
        return await self._level(parse_product_id(product_id, "productId"))

    @entry
    async def check_stock(self, req: CheckStock) -> StockAvailability:
        """Whether `quantity` units of the product could be reserved now (no reservation is made).
        For a product split into shards it is sufficient without a read when the shard this
        instance would take from had enough when it last wrote or read it (`available` then sums
        the shards as it last saw them: the check is advice, `reserve` decides); otherwise every
        shard is read now."""
        pid = parse_product_id(req.product_id, "productId")
        qty = parse_quantity(req.quantity, "quantity")
        keys = shard_keys(pid)
        if len(keys) > 1:
            key = self._pick(pid, qty)
            first = self._known.get(key) or await self._read(key)
            if first is not None and first.available >= qty:
                level = await self._estimate(pid)
                return StockAvailability(pid, qty, max(level.available, first.available), True)
        level = await self._level(pid)
        return StockAvailability(pid, qty, level.available, level.available >= qty)

    # --- shards ---------------------------------------------------------------------------------

    def _preferred(self, product_id: str) -> list[str]:
        keys = self._prefer.get(product_id)
        if keys is None:
            keys = self._prefer[product_id] = self._shard_preference(product_id)
        return keys

    def _shard_preference(self, product_id: str) -> list[str]:
        """Instance k's order of a product's shards: first those whose primary copy is on this
        node (`SliceMap.owned_here`: their writes are decided here, a network hop fewer each way),
        rotated to start at the k-th of them, then the others as `shard_order` has them (instance k
        starts at shard k: instances write apart). Asked again after each sweep (the owners change
        as nodes come and go)."""
        keys = shard_order(shard_keys(product_id), self.context.instance)
        if len(keys) == 1:
            return keys
        here = [k for k in shard_keys(product_id) if self.stock.owned_here(k)]
        if not here:
            return keys
        k = self.context.instance % len(here)
        here = here[k:] + here[:k]
        return here + [key for key in keys if key not in here]

    def _pick(self, product_id: str, quantity: int) -> str:
        """The shard the next take of `quantity` units goes to: among this instance's first
        `SHARDS_IN_USE` preferences that hold enough as far as it knows, the least busy one."""
        keys = self._preferred(product_id)
        if len(keys) == 1:
            return keys[0]
        known = self._known
        fit: list[str] = []
        for k in keys:  # (the first that fit: not all 16 looked at per order)
            e = known.get(k)
            if e is None or e.available >= quantity:
                fit.append(k)
                if len(fit) == SHARDS_IN_USE:
                    break
        if len(fit) < 2:
            return fit[0] if fit else keys[0]
        return min(fit, key=lambda k: len(self._queued.get(k, ())) + (k in self._writers))

    def _demote(self, key: str, product_id: str) -> None:
        """A round on `key` was lost to another instance: prefer the other shards from now on."""
        keys = self._prefer.get(product_id)
        if keys is not None and len(keys) > 1 and key in keys:
            keys.remove(key)
            keys.append(key)

    # --- group commit ---------------------------------------------------------------------------

    def _submit(self, key: str, product_id: str, change: _Change) -> None:
        queue = self._queued.get(key)
        if queue is not None:  # a writer for this key is running: it takes this one next
            queue.append(change)
            return
        self._queued[key] = [change]
        task = asyncio.get_running_loop().create_task(self._writer(key, product_id))
        self._writers[key] = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._writer_done(key, t))

    async def _writer(self, key: str, product_id: str) -> None:
        while batch := self._queued.get(key):
            self._queued[key] = []
            await self._commit(key, product_id, batch)
        # no await between the last empty check and here: nothing can be queued unseen
        del self._queued[key]
        del self._writers[key]

    def _writer_done(self, key: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._writers.get(key) is task:  # cancelled (maybe before it ran) or failed
            del self._writers[key]
            for ch in self._queued.pop(key, []):
                if not ch.done.done():
                    ch.done.set_exception(_stopping())

    async def _commit(self, key: str, product_id: str, batch: list[_Change]) -> None:
        """Apply `batch` to `key` in one compare-and-set. The expected value is the one this
        instance's writer of the key last wrote (no read first; other reads never change it, as one
        that started before the write may end after it); a lost round, or a batch that would write
        nothing on that remembered value, reads the key and tries again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CHANGE_BUDGET_S
        rounds = 0
        try:
            while True:
                cur = self._expect.get(key)
                fresh = cur is None
                if fresh:
                    cur = await self._read(key)
                    if cur is not None:
                        self._expect[key] = cur
                if cur is not None and cur.holds:
                    self._collect(key, product_id, cur)
                settled = self._settled.pop(key, None)
                new, results = _apply(product_id, cur, batch, settled)
                if new == cur:
                    if fresh:
                        break
                    self._expect.pop(key, None)  # decide on what is stored, not on what was seen
                elif await self.stock.compare_and_set(key, cur, new):
                    assert new is not None
                    self._see(key, new)
                    self._expect[key] = new
                    break
                else:
                    self._expect.pop(key, None)
                    self.lost += 1
                    self._demote(key, product_id)
                    rounds += 1
                if settled:  # not written: drop them with the next round
                    self._settled.setdefault(key, set()).update(settled)
                if not fresh and rounds == 0:
                    continue  # only the remembered value was stale: read it, no pause
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

    async def _change(self, piece: Piece, change: _Change) -> StockLevel | None:
        self._submit(piece.key, piece.product_id, change)
        try:
            return await asyncio.shield(change.done)
        except asyncio.CancelledError:
            if change.take:  # the caller is gone: give back what the batch may still take for it
                change.done.add_done_callback(lambda f: self._undo(piece, change, f))
            raise

    def _undo(self, piece: Piece, took: _Change, f: asyncio.Future[StockLevel | None]) -> None:
        if f.cancelled() or f.exception() is not None:
            return
        give = _Change(UNDO, took.quantity, took.order_id, took.hold)
        give.done.add_done_callback(lambda g: g.cancelled() or g.exception())  # nobody awaits it
        self._submit(piece.key, piece.product_id, give)

    # --- entries --------------------------------------------------------------------------------

    async def _give_back(self, order_id: str, hold: str, pieces: list[Piece], kind: str = GIVE) -> None:
        await asyncio.gather(*(self._change(p, _Change(kind, p.quantity, order_id, hold)) for p in pieces))

    async def _levels(self, lines: list[StockLine], after: list[StockLevel | None]) -> list[StockLevel]:
        """Per line, the product's level after a change: the changed key's for an unsplit product,
        the sum of this instance's view of the shards for a split one."""
        out: list[StockLevel] = []
        for line, level in zip(lines, after, strict=True):
            if len(shard_keys(line.product_id)) > 1:
                out.append(await self._estimate(line.product_id))
            elif level is not None:
                out.append(level)
        return out

    async def _swap(self, key: str, held: Reservation, new: Reservation) -> bool:
        """`compare_and_set` of the record `held` (as read) to `new`. A record written by another
        version of this slice may encode differently from `held` re-encoded (compare-and-set
        compares bytes): if the stored bytes decode to `held`, they are what is compared."""
        if await self.reservations.compare_and_set(key, held, new, ttl=RESERVATION_TTL_S):
            return True
        raw = await self._raw.get(key)
        if raw is None or msgspec.msgpack.decode(raw, type=Reservation) != held:
            return False  # someone else changed it
        encoded = msgspec.Raw(msgspec.msgpack.encode(new))
        return await self._raw.compare_and_set(key, raw, encoded, ttl=RESERVATION_TTL_S)

    def _plan(self, lines: list[StockLine]) -> list[Piece]:
        return [Piece(ln.product_id, self._pick(ln.product_id, ln.quantity), ln.quantity) for ln in lines]

    @entry(idempotent=True)
    async def reserve(self, req: ReserveStock) -> list[StockLevel]:
        """Take stock for every line, or none: on a failure the lines already taken are given back.
        Repeating it for the same order leaves the stock as the first one left it (what a repeat
        takes meanwhile, it gives back) and answers what the first one did.

        409 (`Conflict`) names the first line without enough stock (``lines[i]: insufficient stock
        for ...``); 404 one whose product has no stock (``lines[i].productId: no product ...``).
        """
        order_id = parse_order_id(req.order_id, "orderId")
        lines = _checked(req.lines)
        if req.kept:
            raise BadRequest("kept: holds are settled by hold_stock (reserve keeps a record of its own)")
        began = self._clock()
        attempt = new_attempt(began)
        hold = hold_key(order_id, attempt)
        plan = [self._plan(lines)]  # where the lines are taken from (`_take` may change it)
        try:
            levels = await self._take(order_id, hold, lines, plan)
        except (Conflict, NotFound):
            # a repeat of a reservation that took the last units finds none left: the record answers
            held = await self.reservations.get(reservation_key(order_id))
            if held is not None and held.state == RESERVED and held.lines == lines:
                return self._repeated(order_id, held)
            raise
        mine = Reservation(order_id, RESERVED, attempt, lines, levels, plan[0])
        held = await self._record(mine, began)
        if held is not None:  # the order has a reservation already: this attempt's takes go back
            await asyncio.shield(self._give_back(order_id, hold, plan[0], UNDO))
            if held.lines != lines:
                raise Conflict(f"order {order_id} already has a reservation of other lines")
            return self._repeated(order_id, held)
        for piece in plan[0]:  # recorded: the holds go with this instance's next write of the entry
            self._settled.setdefault(piece.key, set()).add(hold)
        return levels

    @entry(idempotent=True)
    async def hold_stock(self, req: ReserveStock) -> StockHeld:
        """Take stock for every line, or none, as `reserve` does, but without a record of its own:
        the answer's hold is recorded by the caller with its order (`Order.reservation` in the
        ``orders`` map) within the answer's `within_s` (what is left of half of ``hold_gc_s``
        since the attempt began; none left: the takes go back, 503), and then settles it as kept:
        with its next ``hold_stock`` (`ReserveStock.kept`, at most `MAX_KEPT`, settled before this
        take, so that its writes drop them) or with `settle`.
        A hold nobody settles is judged by that order after ``hold_gc_s``: stored with this hold,
        its stock stays taken; else it goes back. So a repeat takes anew, and the hold of an
        attempt whose answer was lost goes back.

        409 (`Conflict`) names the first line without enough stock (``lines[i]: insufficient stock
        for ...``); 404 one whose product has no stock (``lines[i].productId: no product ...``).
        """
        order_id = parse_order_id(req.order_id, "orderId")
        lines = _checked(req.lines)
        if len(req.kept) > MAX_KEPT:
            raise BadRequest(f"kept: {len(req.kept)} holds, at most {MAX_KEPT} per call")
        kept = [
            (hold_key(parse_order_id(k.order_id, f"kept[{i}].orderId"), k.hold.attempt),
             _checked_hold(k.hold, f"kept[{i}].hold"))
            for i, k in enumerate(req.kept)
        ]  # fmt: skip
        for hold, pieces in kept:  # as `settle` with keep: before this take, so that its write drops them
            self._keep(hold, pieces)
        began = self._clock()
        attempt = new_attempt(began) + ORDER_KEPT
        hold = hold_key(order_id, attempt)
        plan = [self._plan(lines)]
        levels = await self._take(order_id, hold, lines, plan)
        left = began + self.record_within_s - self._clock()  # as for `reserve`'s record
        if left <= 0:
            await asyncio.shield(self._give_back(order_id, hold, plan[0], UNDO))
            raise SliceHttpError(
                f"holding the stock of order {order_id} took more than {self.record_within_s:g}s: "
                "nothing is held; try again",
                status=503,
            )
        return StockHeld(levels, StockHold(attempt, plan[0]), left)

    @entry(idempotent=True)
    async def settle(self, req: SettleStock) -> int:
        """After `hold_stock`: the order was stored with `hold` (`keep`: its stock stays taken; the
        holds go with this instance's next write of each entry it writes, the others' with the
        collector's judgement) or not (what is still held goes back). Answers the pieces settled."""
        order_id = parse_order_id(req.order_id, "orderId")
        pieces = _checked_hold(req.hold)
        hold = hold_key(order_id, req.hold.attempt)
        if not req.keep:
            await asyncio.shield(self._give_back(order_id, hold, pieces, UNDO))
            return len(pieces)
        self._keep(hold, pieces)
        return len(pieces)

    def _keep(self, hold: str, pieces: list[Piece]) -> None:
        """`hold`'s order was stored with it: its holds go with this instance's next write of each
        key it writes (a key it does not write, or too many waiting: the order is asked, `_collect`)."""
        for piece in pieces:
            if (
                piece.key in self._expect
                and len(held := self._settled.setdefault(piece.key, set())) < MAX_SETTLED
            ):
                held.add(hold)

    def _repeated(self, order_id: str, held: Reservation) -> list[StockLevel]:
        self.duplicates += 1
        self.logger.info(
            "reserve of order %s repeated (idempotency key %s): answering the first one's levels",
            order_id, self.context.idempotency_key,
        )  # fmt: skip
        return held.levels

    async def _record(self, mine: Reservation, began: float) -> Reservation | None:
        """Write the record of the reservation `mine` (its stock taken, held by its attempt): None
        when it is written, else the reservation the order has already (reserved). A record left
        released or releasing (or written by the version before as still reserving) is replaced. Too late
        (`record_within_s` after `began`: a collector may soon judge the attempt dead), the takes
        are given back and it is a 503; if the write fails or does not end by then, the holds wait
        for the collector, which keeps them if the record was written after all and gives them back
        if not."""
        order_id = mine.order_id
        key = reservation_key(order_id)
        left = began + self.record_within_s - self._clock()
        if left <= 0:
            await asyncio.shield(self._give_back(order_id, hold_key(order_id, mine.attempt), mine.plan, UNDO))
            raise SliceHttpError(
                f"the reservation of order {order_id} took more than {self.record_within_s:g}s: "
                "nothing is reserved; try again",
                status=503,
            )
        try:
            async with asyncio.timeout(left):
                held = await self.reservations.put_if_absent(key, mine, ttl=RESERVATION_TTL_S)
                while held is not None:
                    if held.attempt == mine.attempt:  # written by this call, its answer lost and retried
                        return None
                    given_back = held.state in (RELEASED, RELEASING)
                    if held.state == RESERVED or (not given_back and held.lines != mine.lines):
                        return held
                    if await self._swap(key, held, mine):
                        return None
                    held = await self.reservations.put_if_absent(key, mine, ttl=RESERVATION_TTL_S)
        except Exception as e:
            why = f"not written within {self.record_within_s:g}s" if isinstance(e, TimeoutError) else str(e)
            self.logger.warning(
                "recording the reservation of order %s failed (%s): its stock stays held until an "
                "instance collects the holds (after %gs): kept if the record was written, else "
                "given back", order_id, why, self.hold_gc_s,
            )  # fmt: skip
            if isinstance(e, TimeoutError):
                raise SliceHttpError(
                    f"the reservation of order {order_id} could not be recorded within "
                    f"{self.record_within_s:g}s; try again",
                    status=503,
                ) from None
            raise
        return None

    # --- collecting old holds ------------------------------------------------------------------

    def _collect(self, key: str, product_id: str, entry: StockEntry) -> None:
        """Start deciding about the holds of `entry` (the value of `key` about to be written)
        older than `hold_gc_s`: an attempt that took and never recorded, or one recorded on an
        instance that has not written the entry since; and about a `hold_stock` hold older than
        `SETTLE_CHECK_S` this instance was not told to settle (the caller's `settle` went to
        another instance): kept by its order, it goes now, else it waits for the final judgement.
        At most once a second per entry."""
        now = self._clock()
        if now < self._swept.get(key, 0.0):
            return
        self._swept[key] = now + 1.0
        oldest, unsettled = now - self.hold_gc_s, now - SETTLE_CHECK_S
        settled = self._settled.get(key, ())
        for hold, units in entry.holds.items():
            if MARK in hold:
                if units <= oldest and (key, hold) not in self._collecting:
                    self._collecting.add((key, hold))
                    task = asyncio.get_running_loop().create_task(self._unmark(key, product_id, hold, units))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                continue
            began = hold_time(hold)
            if began is None or hold in settled or (key, hold) in self._collecting:
                continue
            final = began <= oldest
            if not final and (began > unsettled or not hold.endswith(ORDER_KEPT)):
                continue
            self._collecting.add((key, hold))
            task = asyncio.get_running_loop().create_task(
                self._resolve(key, product_id, hold, units, began, final)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(
        self, key: str, product_id: str, hold: str, units: int, began: float, final: bool = True
    ) -> None:
        """Keep the stock of an old hold if its order's record says the attempt holding it reserved
        it (`_judge`), else give it back; not `final` (a `hold_stock` hold not settled here yet):
        keep it if its order does, else leave it for later."""
        order_id, _, attempt = hold.partition("/")
        try:
            kind, outcome = await self._judge(key, order_id, attempt, began)
            if kind == UNDO and not final:
                return
            # (a drop and an undo both change the entry only if it still holds the hold)
            await self._change(Piece(product_id, key, units), _Change(kind, units, order_id, hold))
            self.collected += 1
            self.logger.log(
                logging.INFO if final else logging.DEBUG, "hold %s of %d on %s: %s", hold, units, key, outcome
            )
        except Exception as e:
            self.logger.warning("collecting hold %s on %s failed (%s): tried again later", hold, key, e)
        finally:
            self._collecting.discard((key, hold))

    async def _unmark(self, key: str, product_id: str, mark: str, at: int) -> None:
        """Drop the release mark `mark` (given at `at`) from `key` once no repeat of its release
        can need it: its record says released, or twice the records' time to live went by."""
        order_id, _, _ = mark.partition(MARK)
        try:
            if self._clock() - at < 2 * RESERVATION_TTL_S:
                record = await self.reservations.get(reservation_key(order_id))
                if record is None or record.state != RELEASED:
                    return  # releasing (a repeat gives only what is not marked), or expired: wait
            await self._change(Piece(product_id, key, 0), _Change(DROP, 0, order_id, mark))
        except Exception as e:
            self.logger.debug("dropping release mark %s on %s failed (%s): tried again later", mark, key, e)
        finally:
            self._collecting.discard((key, mark))

    async def _judge(self, key: str, order_id: str, attempt: str, began: float) -> tuple[str, str]:
        """DROP (the stock stays taken) or UNDO (it goes back) for an old hold of `attempt` on `key`,
        and why. A `hold_stock` attempt's record is its order: kept if the order holds its stock
        with this attempt and on this key. A `reserve` attempt's is the reservation record: kept
        if written by this attempt, or expired (it can no longer tell)."""
        if attempt.endswith(ORDER_KEPT):
            if self._orders is None:  # on first use: without `hold_stock` callers, no orders map needed
                self._orders = self.map(ORDERS_MAP, Order)
            order = await self._orders.get(order_id)
            held = order.reservation if order is not None else None
            if held is not None and held.attempt == attempt and any(p.key == key for p in held.pieces):
                return DROP, "its order keeps it: kept"
            return UNDO, "no order keeps it: given back"
        record = await self.reservations.get(reservation_key(order_id))
        if record is not None and record.attempt == attempt:
            return DROP, "its reservation is recorded: kept"
        if record is None and self._clock() - began >= RESERVATION_TTL_S:
            return DROP, "its record, if there was one, expired: kept"
        return UNDO, "never recorded: given back"

    async def _sweep(self) -> None:
        """Every quarter of `hold_gc_s` (give or take a fifth), read the catalog's stock entries and
        collect their old holds: also those of an entry nobody writes any more."""
        while True:
            await asyncio.sleep(self.hold_gc_s / SWEEPS * random.uniform(0.8, 1.2))
            self._prefer.clear()  # which shards are owned here may have changed (`_shard_preference`)
            await self.sweep_once()

    async def sweep_once(self) -> None:
        """Read every stock entry of the catalog and start collecting its old holds."""
        for product_id in CATALOG:
            for key in shard_keys(product_id):
                try:
                    entry = await self._read(key)
                except Exception as e:  # the map unavailable for a while: the next sweep
                    self.logger.debug("sweep of %s: %s", key, e)
                    continue
                if entry is not None and entry.holds:
                    self._collect(key, product_id, entry)

    async def stop(self) -> None:
        """Let the writes of stock under way, and the holds being collected, finish (for up to
        `CHANGE_BUDGET_S`)."""
        self._sweeper.cancel()
        await asyncio.gather(self._sweeper, return_exceptions=True)
        pending = set(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=CHANGE_BUDGET_S)

    async def _take(
        self, order_id: str, hold: str, lines: list[StockLine], plan: list[list[Piece]]
    ) -> list[StockLevel]:
        """Take every line's pieces as `plan[0]` says, held by `hold`. A piece its shard cannot give
        makes the line look again over all the product's shards (`plan[0]` then says where the
        line's units come from). Anything fails: what was taken is given back."""
        taken: list[Piece] = []
        after: list[StockLevel | None] = []
        try:
            for i, line in enumerate(lines):
                try:
                    after.append(await self._take_line(order_id, hold, line, taken, plan))
                except NotFound as e:  # named by its line, as the request's fields are
                    raise NotFound(f"lines[{i}].productId: {e}") from None
                except Conflict as e:
                    raise Conflict(f"lines[{i}]: {e}") from None
        except BaseException:
            if taken:
                # shielded: a cancelled caller must not leave the taken lines reserved
                await asyncio.shield(self._give_back(order_id, hold, taken, UNDO))
            raise
        return await self._levels(lines, after)

    async def _take_line(
        self, order_id: str, hold: str, line: StockLine, taken: list[Piece], plan: list[list[Piece]]
    ) -> StockLevel | None:
        """`_take` of one line (the pieces taken go to `taken`): the level after its last piece."""
        level: StockLevel | None = None
        tries = 0
        while True:
            todo = [p for p in plan[0] if p.product_id == line.product_id and p not in taken]
            try:
                for piece in todo:
                    level = await self._change(piece, _Change(TAKE, piece.quantity, order_id, hold))
                    taken.append(piece)
                return level
            except (Conflict, NotFound):
                if len(shard_keys(line.product_id)) == 1:
                    raise
                if tries == REPLANS:
                    raise Conflict(
                        f"insufficient stock for {line.product_id}: its shards ran out "
                        f"{tries + 1} times while order {order_id} took {line.quantity}; try again"
                    ) from None
            tries += 1
            plan[0] = await self._replan(order_id, line, taken, plan[0])

    async def _replan(
        self, order_id: str, line: StockLine, taken: list[Piece], plan: list[Piece]
    ) -> list[Piece]:
        """`plan` with `line`'s untaken pieces replaced by pieces of the fullest other shards."""
        got = [p for p in taken if p.product_id == line.product_id]
        used = {p.key for p in got}
        found = await self._read_all(
            line.product_id, [k for k in shard_keys(line.product_id) if k not in used]
        )
        missing = line.quantity - sum(p.quantity for p in got)
        try:
            extra = _plan_line(line.product_id, missing, found)
        except Conflict:
            have = sum(e.available for e in found.values() if e is not None) + line.quantity - missing
            raise Conflict(
                f"insufficient stock for {line.product_id}: {have} available, {line.quantity} "
                f"requested (order {order_id})"
            ) from None
        if extra:  # prefer, from now on, the shard that had the most
            keys = self._preferred(line.product_id)
            keys.remove(extra[0].key)
            keys.insert(0, extra[0].key)
        return [p for p in plan if p.product_id != line.product_id] + got + extra

    @entry(idempotent=True)
    async def release(self, req: ReleaseStock) -> list[StockLevel]:
        """Give back the stock of an order's lines (after a cancellation); repeating it for the same
        order gives nothing more back (it answers the current levels), and repeating one that
        failed half-way gives back what it had not. `req.hold`: the order's (`hold_stock`), where
        its stock goes back to."""
        order_id = parse_order_id(req.order_id, "orderId")
        lines = _checked(req.lines)
        plan: list[Piece] = _checked_hold(req.hold) if req.hold is not None else []
        attempt = req.hold.attempt if req.hold is not None else ""
        key = reservation_key(order_id)
        # the record says releasing (with the plan) before any give, released after the last
        record = Reservation(order_id, RELEASING, attempt, plan=plan)
        held = await self.reservations.put_if_absent(key, record, ttl=RESERVATION_TTL_S)
        while held is not None:
            if held.state == RELEASED:
                self.duplicates += 1
                return [await self._level(line.product_id) for line in lines]
            if held.state == RELEASING:  # an earlier try that did not finish: the marks say what it gave
                record = held
                break
            # the record keeps the attempt it releases: a collector finding its holds keeps them
            releasing = Reservation(order_id, RELEASING, held.attempt, plan=held.plan)
            if await self._swap(key, held, releasing):
                record = releasing
                break
            held = await self.reservations.put_if_absent(key, record, ttl=RESERVATION_TTL_S)
        plan, attempt = record.plan, record.attempt
        hold = hold_key(order_id, attempt) if attempt else ""
        mark, at = release_mark(order_id, attempt), int(self._clock())
        # back where the plan took it from (a line the plan does not cover: to the product's key)
        pieces: list[Piece] = []
        for line in lines:
            mine = [p for p in plan if p.product_id == line.product_id]
            if sum(p.quantity for p in mine) != line.quantity:
                mine = [Piece(line.product_id, line.product_id, line.quantity)]
            pieces += mine
        levels = await asyncio.gather(
            *(self._change(p, _Change(RELEASE, p.quantity, order_id, hold, mark, at)) for p in pieces)
        )
        try:
            await self._swap(key, record, Reservation(order_id, RELEASED, attempt))
        except Exception as e:  # given back all the same; a repeat finds it releasing and gives nothing
            self.logger.debug("recording the release of order %s failed (%s)", order_id, e)
        by_product = dict(zip((p.product_id for p in pieces), levels, strict=True))
        return await self._levels(lines, [by_product.get(line.product_id) for line in lines])
