"""An Elle-style checker for list-append histories (lost, duplicated and reordered appends).

Each key holds a list. Clients append unique elements (read the list, then compare-and-set it
to the list plus one element, in a loop) and record every read they observe. Given the final
list of every key, `check_list_append` verifies:

- every acknowledged append is in its key's final list exactly once, and no element appears
  twice anywhere (a duplicated command, or a retry that was applied twice);
- every element of a final list or of a read was appended to that key by some client, with an
  append that was not definitely rejected and was invoked before the read returned;
- every observed list (a read, or the current value a failed compare-and-set returned) is a
  prefix of the final list of its key (no lost or reordered appends in between);
- real time: an append acknowledged before another append was invoked comes before it in the
  list; a read invoked after an append was acknowledged contains it; a read invoked after
  another read returned is at least as long.

Appends whose outcome is unknown (`status="maybe"`) may be present once or absent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Append", "Read", "check_list_append", "decode_list", "encode_list"]


@dataclass(frozen=True, slots=True)
class Append:
    client: str
    key: str
    elem: int
    call: float
    ret: float | None  # when it was acknowledged (status "ok")
    status: str  # "ok" (acknowledged) | "maybe" (outcome unknown) | "fail" (definitely not applied)


@dataclass(frozen=True, slots=True)
class Read:
    client: str
    key: str
    value: tuple[int, ...]
    call: float
    ret: float


def encode_list(items: Sequence[int]) -> bytes:
    return ",".join(str(i) for i in items).encode()


def decode_list(data: bytes | None) -> tuple[int, ...]:
    if not data:
        return ()
    return tuple(int(x) for x in data.decode().split(","))


def check_list_append(
    appends: Iterable[Append], reads: Iterable[Read], final: Mapping[str, Sequence[int]], *, limit: int = 8
) -> list[str]:
    """Return the problems found (empty: the history is consistent); at most `limit` of them."""
    problems: list[str] = []
    appends = list(appends)
    reads = list(reads)
    by_elem: dict[int, Append] = {}
    for a in appends:
        if a.elem in by_elem:
            problems.append(f"element {a.elem} was appended by two operations (use unique elements)")
        by_elem[a.elem] = a
    index: dict[str, dict[int, int]] = {}
    for key, lst in final.items():
        pos: dict[int, int] = {}
        for i, e in enumerate(lst):
            if e in pos:
                problems.append(f"{key}: element {e} appears twice in the final list (positions {pos[e]} and "
                                f"{i}): a command was applied twice")
                continue
            pos[e] = i
            src = by_elem.get(e)
            if src is None or src.key != key:
                problems.append(f"{key}: element {e} in the final list was never appended to this key")
            elif src.status == "fail":
                problems.append(f"{key}: element {e} is in the final list but its append was definitely "
                                f"rejected ({src.client}, invoked at {src.call:.4f})")
        index[key] = pos
    for a in appends:
        if a.status == "ok" and a.elem not in index.get(a.key, {}):
            problems.append(f"{a.key}: acknowledged append of {a.elem} ({a.client}, invoked {a.call:.4f}, "
                            f"acknowledged {a.ret:.4f}) is lost: not in the final list")
    # real-time order of acknowledged appends (per key)
    for key in sorted({a.key for a in appends}):
        pos = index.get(key, {})
        present = sorted((a for a in appends if a.key == key and a.elem in pos), key=lambda a: a.call)
        acked = sorted((a for a in present if a.status == "ok"), key=lambda a: a.ret or 0.0)
        for a in acked:
            assert a.ret is not None
            for b in present:
                if b.call > a.ret and pos[b.elem] < pos[a.elem]:
                    problems.append(
                        f"{key}: append of {a.elem} was acknowledged at {a.ret:.4f} before the append of "
                        f"{b.elem} was invoked at {b.call:.4f}, yet comes after it "
                        f"(positions {pos[a.elem]} > {pos[b.elem]})"
                    )
    # reads
    acked_by_key: dict[str, list[Append]] = {}
    for a in appends:
        if a.status == "ok":
            acked_by_key.setdefault(a.key, []).append(a)
    reads_by_key: dict[str, list[Read]] = {}
    for r in reads:
        reads_by_key.setdefault(r.key, []).append(r)
        lst = tuple(final.get(r.key, ()))
        if r.value != lst[: len(r.value)]:
            problems.append(f"{r.key}: {r.client} read {list(r.value)} at {r.call:.4f}..{r.ret:.4f}, "
                            f"which is not a prefix of the final list {list(lst)}")
            continue
        for e in r.value:
            src = by_elem.get(e)
            if src is not None and src.call > r.ret:
                problems.append(f"{r.key}: {r.client} read element {e} at {r.call:.4f}..{r.ret:.4f}, before "
                                f"its append was invoked at {src.call:.4f}")
        have = set(r.value)
        for a in acked_by_key.get(r.key, []):
            assert a.ret is not None
            if a.ret < r.call and a.elem not in have:
                problems.append(f"{r.key}: {r.client} read {list(r.value)} at {r.call:.4f}..{r.ret:.4f}, "
                                f"missing {a.elem} acknowledged at {a.ret:.4f} (stale read)")
    for key, rs in sorted(reads_by_key.items()):
        rs.sort(key=lambda r: r.ret)
        longest: Read | None = None
        j = 0
        for r in sorted(rs, key=lambda r: r.call):
            while j < len(rs) and rs[j].ret < r.call:
                if longest is None or len(rs[j].value) > len(longest.value):
                    longest = rs[j]
                j += 1
            if longest is not None and len(r.value) < len(longest.value):
                problems.append(f"{key}: {r.client} read {list(r.value)} at {r.call:.4f}, after "
                                f"{longest.client} had read the longer {list(longest.value)} "
                                f"(returned {longest.ret:.4f})")
    return problems[:limit]
