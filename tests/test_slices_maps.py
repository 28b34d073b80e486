"""The slice-side distributed map API (`Slice.map` -> `SliceMap`) over the in-process `LocalMaps`."""

from __future__ import annotations

import logging
import math
from typing import Any

import msgspec
import pytest

from aether.core.artifact import Artifact
from aether.core.errors import BadRequest
from aether.core.maps import (
    MapContention,
    MapError,
    MapKeyError,
    MapSpec,
    MapTtlError,
    MapValueDecodeError,
    MapValueTooLarge,
    UnknownMap,
    check_map_name,
)
from aether.slices import Slice, SliceCallError, SliceContext
from aether.slices.testing import FakeInvoker, LocalMaps


class Stock(msgspec.Struct, frozen=True):
    product: str
    available: int


class Shop(Slice):
    pass


def make_slice(maps: LocalMaps | None) -> Shop:
    s = Shop()
    s.context = SliceContext(
        artifact=Artifact.parse("org.test:shop:1.0.0"),
        node_id="node-1",
        instance=1,
        logger=logging.getLogger("test"),
        config={},
        invoker=FakeInvoker(lambda t, m, p: b""),
        maps=maps,
    )
    return s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_typed_put_get_remove_and_keys() -> None:
    shop = make_slice(LocalMaps(["stock"]))
    stock = shop.map("stock", Stock)
    assert await stock.get("PROD-1") is None
    await stock.put("PROD-1", Stock("PROD-1", 5))
    await stock.put("PROD-2", Stock("PROD-2", 0))
    await stock.put("OTHER", Stock("OTHER", 1))
    assert await stock.get("PROD-1") == Stock("PROD-1", 5)
    assert await stock.keys("PROD-") == ["PROD-1", "PROD-2"]
    assert await stock.remove("PROD-1") is True
    assert await stock.remove("PROD-1") is False
    assert await stock.get("PROD-1") is None


async def test_compare_and_set_semantics() -> None:
    counters = make_slice(LocalMaps(["c"])).map("c", int)
    assert await counters.compare_and_set("k", None, 1) is True  # absent -> put
    assert await counters.compare_and_set("k", None, 2) is False  # no longer absent
    assert await counters.compare_and_set("k", 5, 2) is False
    assert await counters.compare_and_set("k", 1, 2) is True
    assert await counters.get("k") == 2
    assert await counters.compare_and_set("k", 2, None) is True  # remove if equal
    assert await counters.get("k") is None


async def test_update_applies_function_and_abort_writes_nothing() -> None:
    m = make_slice(LocalMaps(["c"])).map("c", int)
    assert await m.update("n", lambda v: (v or 0) + 1) == 1
    assert await m.update("n", lambda v: (v or 0) + 1) == 2

    def refuse(v: int | None) -> int:
        raise ValueError("not enough")

    with pytest.raises(ValueError, match="not enough"):
        await m.update("n", refuse)
    assert await m.get("n") == 2
    assert await m.update("n", lambda v: None) is None
    assert await m.get("n") is None


async def test_update_gives_up_after_losing_every_round() -> None:
    maps = LocalMaps(["c"])
    m = make_slice(maps).map("c", int)
    await m.put("n", 0)

    def meddle(v: int | None) -> int:
        maps.data["c"]["n"] = (msgspec.msgpack.encode((v or 0) + 100), None)  # another writer wins
        return (v or 0) + 1

    with pytest.raises(MapContention, match="lost to other writers 3 times") as info:
        await m.update("n", meddle, max_attempts=3)
    assert info.value.status == 503 and isinstance(info.value, MapError)
    with pytest.raises(MapContention, match="lost to other writers"):
        await m.update("n", meddle, budget=0.05)  # the time budget ends it too


async def test_ttl_expires_keys() -> None:
    clock = Clock()
    m = make_slice(LocalMaps(["s"], clock=clock)).map("s", str)
    await m.put("session", "ann", ttl=5)
    await m.put("forever", "bob")
    clock.now += 4.9
    assert await m.get("session") == "ann"
    clock.now += 0.2
    assert await m.get("session") is None
    assert await m.keys() == ["forever"]


async def test_bad_input_errors_name_the_problem() -> None:
    shop = make_slice(LocalMaps(["stock"], max_value_bytes=100))
    stock = shop.map("stock", Stock)
    with pytest.raises(MapKeyError, match="key is empty"):
        await stock.get("")
    with pytest.raises(MapKeyError, match="keys are strings, not int"):
        await stock.get(5)  # type: ignore[arg-type]
    with pytest.raises(MapKeyError, match="longer than 1024 bytes"):
        await stock.put("x" * 2000, Stock("x", 1))
    with pytest.raises(MapValueTooLarge, match="exceeds 100 bytes"):
        await stock.put("big", Stock("x" * 200, 1))
    assert issubclass(MapValueTooLarge, BadRequest) and issubclass(MapKeyError, BadRequest)
    # a lone surrogate (a key decoded from bytes with surrogateescape) has no UTF-8 form: it used to
    # escape as a bare UnicodeEncodeError (HTTP 502) from deep in the map, naming no map or key
    with pytest.raises(MapKeyError, match=r"map 'stock': the key has a lone surrogate '\\udc80' at index 1"):
        await stock.put("a\udc80b", Stock("k", 1))
    with pytest.raises(MapKeyError, match="lone surrogate"):
        await stock.get("\ud800")
    # a bad ttl is the caller's input (400), like a bad key; it was a bare MapError (HTTP 502), and
    # one over ten years was called "not a positive number"
    assert issubclass(MapTtlError, BadRequest)
    too_long = r"ttl must be more than 0 and at most 3.1536e\+08 seconds \(ten years\)"
    with pytest.raises(MapTtlError, match=too_long + ", not -1"):
        await stock.put("k", Stock("k", 1), ttl=-1)
    with pytest.raises(MapTtlError, match=r"at most 3.1536e\+08 seconds \(ten years\), not 1e\+300"):
        await stock.put_if_absent("k", Stock("k", 1), ttl=1e300)
    with pytest.raises(MapTtlError, match=r"not nan"):
        await stock.compare_and_set("k", None, Stock("k", 1), ttl=math.nan)
    with pytest.raises(MapTtlError, match=r"ttl must be a number of seconds, not bool True"):
        await stock.put("k", Stock("k", 1), ttl=True)
    with pytest.raises(MapTtlError, match=r"not str '5'"):
        await stock.put("k", Stock("k", 1), ttl="5")  # type: ignore[arg-type]
    # (max_attempts=0 raised UnboundLocalError: no round ran, and the error named the round count)
    with pytest.raises(MapError, match=r"max_attempts must be a whole number of at least 1, not 0"):
        await stock.update("k", lambda v: v, max_attempts=0)
    with pytest.raises(MapError, match=r"budget must be a positive number of seconds, not -1"):
        await stock.update("k", lambda v: v, budget=-1)
    with pytest.raises(UnknownMap, match="'nope' is not defined; defined maps: stock"):
        await shop.map("nope", int).get("k")
    # a value written as another type does not decode as Stock
    await shop.map("stock", str).put("PROD-9", "not a stock record")
    with pytest.raises(MapValueDecodeError, match=r"'stock' key 'PROD-9'.*does not decode as Stock"):
        await stock.get("PROD-9")


async def test_values_must_be_encodable() -> None:
    m: Any = make_slice(LocalMaps(["x"])).map("x")
    with pytest.raises(MapError, match="cannot encode a object"):
        await m.put("k", object())


async def test_owned_here_asks_the_backend_and_is_false_where_it_cannot_tell() -> None:
    class Owning(LocalMaps):
        def map_owned_here(self, name: str, key: str) -> bool:
            return key.endswith("~1")

    stock = make_slice(Owning(["stock"])).map("stock", Stock)
    assert stock.owned_here("p~1") and not stock.owned_here("p~2")
    assert make_slice(LocalMaps(["stock"])).map("stock", Stock).owned_here("p~1") is False
    with pytest.raises(MapKeyError):
        stock.owned_here("")


def test_slice_without_a_map_backend_says_so() -> None:
    with pytest.raises(SliceCallError, match="no distributed map"):
        make_slice(None).map("stock", Stock)


def test_map_spec_validation() -> None:
    assert MapSpec().validate("orders") == MapSpec(3, 2, "memory")
    with pytest.raises(BadRequest, match="write_quorum must be between 1 and replicas"):
        MapSpec(replicas=2, write_quorum=3).validate("orders")
    with pytest.raises(BadRequest, match="replicas must be between 1 and 9"):
        MapSpec(replicas=0, write_quorum=1).validate("orders")
    with pytest.raises(BadRequest, match="invalid map name"):
        check_map_name("Orders!")
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"engine": "redis"}', type=MapSpec)


async def test_the_example_of_docs_maps_md_runs() -> None:
    """The first example of docs/maps.md, as a newcomer copies it: its `reserve` had no `@entry`,
    so the class described one entry (`check`) and no caller could reach `reserve`."""
    import re
    from pathlib import Path

    from aether.slices import Conflict, NotFound, describe_slice

    doc = (Path(__file__).parents[1] / "docs" / "maps.md").read_text()
    section = doc.split("## Using a map from a slice", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    ns: dict[str, Any] = {"__name__": "maps_md_example"}
    exec(compile(code[1], "docs/maps.md", "exec"), ns)  # the documentation's own code
    inventory_cls = ns["Inventory"]
    assert sorted(describe_slice(inventory_cls).entries) == ["check", "reserve"]

    maps = LocalMaps(["stock"])
    inv = inventory_cls()
    inv.context = SliceContext(
        artifact=Artifact.parse("org.test:inventory:1.0.0"), node_id="node-1", instance=1,
        logger=logging.getLogger("test"), config={}, invoker=FakeInvoker(lambda t, m, p: b""), maps=maps,
    )  # fmt: skip
    await inv.start()
    with pytest.raises(NotFound, match="no product p1"):
        await inv.check("p1")
    await inv.stock.put("p1", ns["Stock"](3))
    assert await inv.reserve("p1", 2) == ns["Stock"](1)
    with pytest.raises(Conflict, match="not enough p1"):
        await inv.reserve("p1", 2)
    assert await inv.check("p1") == ns["Stock"](1)


async def test_compare_and_set_compares_bytes_and_update_does_not_re_encode() -> None:
    """docs/maps.md: a value written with its fields in another order (the management API's JSON)
    never matches the struct read back from it; `update` works on it."""

    class Note(msgspec.Struct):
        text: str
        version: int = 0

    maps = LocalMaps(["notes"])
    notes = make_slice(maps).map("notes", Note)
    await maps.map_put("notes", "k", msgspec.msgpack.encode({"version": 0, "text": "x"}))
    current = await notes.get("k")
    assert current == Note("x", 0)
    assert await notes.compare_and_set("k", current, Note("y", 1)) is False  # the documented trap
    assert await notes.update("k", lambda n: Note("y", n.version + 1) if n else None) == Note("y", 1)
    assert await notes.compare_and_set("k", Note("y", 1), Note("z", 2)) is True  # written by the struct


async def test_a_value_of_another_type_is_refused_before_it_is_written() -> None:
    """`self.map("stock", Stock).put(k, "oops")` stored the string: every later `get` of the key,
    on every node, failed `MapValueDecodeError` (HTTP 502) far from the write that caused it. Every
    write (put, compare_and_set's new value, put_if_absent, update) now checks the value reads back
    as the map's type and raises `MapValueTypeError` naming map, key and type, writing nothing."""
    from aether.core.maps import MapValueTypeError

    maps = LocalMaps(["stock"])
    shop = make_slice(maps)
    stock = shop.map("stock", Stock)
    with pytest.raises(MapValueTypeError, match=r"map 'stock' key 'k': the value \(str\) is not a Stock: "
                       r"Expected `object`, got `str`; nothing was written"):  # fmt: skip
        await stock.put("k", "oops")  # type: ignore[arg-type]
    missing = r"the value \(dict\) is not a Stock: Object missing required field `product`"
    with pytest.raises(MapValueTypeError, match=missing):
        await stock.put_if_absent("k", {"available": 3})  # type: ignore[arg-type]
    with pytest.raises(MapValueTypeError, match=r"the value \(int\) is not a Stock"):
        await stock.compare_and_set("k", None, 5)  # type: ignore[arg-type]
    with pytest.raises(MapValueTypeError, match=r"the value \(int\) is not a Stock"):
        await stock.update("k", lambda s: 5)  # type: ignore[arg-type,return-value]
    assert await maps.map_get("stock", "k") is None  # nothing was written
    await stock.put("k", Stock("k", 1))
    assert await stock.get("k") == Stock("k", 1)
    ints = shop.map("stock", int)
    with pytest.raises(MapValueTypeError, match=r"the value \(bool\) is not a int"):
        await ints.put("n", True)
    await shop.map("stock").put("any", "untyped maps take anything")  # Any: no check
    assert await shop.map("stock", str).get("any") == "untyped maps take anything"
