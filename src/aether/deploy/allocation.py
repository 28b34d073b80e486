"""Instance allocation: pure functions from (desired counts, live nodes, current placement) to
the target placement.

Owns the placement rules; the cluster deployment manager turns the difference between the
current and the target placement into lifecycle commands. No I/O, no clock, no randomness:
the same input always gives the same output. May import nothing from Aether.

Rules, per artifact (artifacts are processed in sorted order; a "placement" is
`{artifact: {node: [instance ids]}}`, ids unique per artifact):

1. **Keep what is valid.** Instances on live nodes whose placement is not FAILED stay where
   they are with their ids. Instances on dead nodes and FAILED placements are dropped (their ids
   become free). A duplicated id (two nodes claiming it, e.g. after two leaders briefly wrote)
   is kept on the first node in node order only.
2. **Too many** (desired lowered): remove first from nodes whose instances of the artifact do
   not serve (`idle`: not ACTIVE, e.g. just deactivated), then from the node holding the most
   instances of the artifact (ties: most instances overall, then the greatest node id), highest
   id first.
3. **Too few**: each new instance gets the lowest free id and goes to the eligible node with
   the fewest instances of this artifact (ties: fewest instances overall, then the smallest
   node id): no node gets a second instance before every eligible node has one.
   Eligible = live, not excluded (`excluded` pairs: backoff after failures, nodes draining,
   and the FAILED pairs themselves) and below `capacity` (instances of all artifacts on the
   node; admission control's per-node limit). When no node is eligible, the count stays short.
4. **Spread.** Healthy instances are moved only while the spread is violated: while the node
   holding the most instances has more than one instance more than the eligible node holding
   the fewest, move its highest id (the id moves with it) to that node. Without exclusions the
   result always has max - min <= 1 per artifact over the live nodes.

Consequences (tested as properties): counts are exact when there is an eligible node (capacity
permitting; the work is bounded by the capacity, not by the desired count); a
no-op input is a fixed point; losing a node re-places exactly the lost instances and moves
nothing else; a joining node only receives instances when the spread would otherwise exceed 1.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

Placement = dict[str, dict[str, list[int]]]


def allocate(
    desired: Mapping[str, int],
    nodes: Sequence[str],
    current: Mapping[str, Mapping[str, Sequence[int]]],
    *,
    failed: Collection[tuple[str, str]] = (),
    excluded: Collection[tuple[str, str]] = (),
    capacity: int | None = None,
    idle: Collection[tuple[str, str]] = (),
) -> Placement:
    """Return the target placement `{artifact: {node: sorted ids}}` (only non-empty entries).

    `failed` and `excluded` hold `(artifact, node)` pairs: a failed placement's instances are
    dropped and re-placed; an excluded pair receives no new instances (existing healthy ones
    stay). `capacity` caps the instances (all artifacts) a node receives new ones up to. `idle`
    pairs hold instances that do not serve (not ACTIVE: starting, or on their way down after a
    deactivation); too many instances are removed from them first.
    """
    cap = float("inf") if capacity is None else capacity
    live = sorted(set(nodes))
    live_set = set(live)
    failed_set = set(failed)
    blocked = set(excluded) | failed_set
    idle_set = set(idle)

    kept: dict[str, dict[str, list[int]]] = {}
    for a in sorted(current):
        if desired.get(a, 0) <= 0:
            continue
        seen: set[int] = set()
        per: dict[str, list[int]] = {}
        for n in sorted(current[a]):
            if n not in live_set or (a, n) in failed_set:
                continue
            ids = []
            for i in sorted(set(current[a][n])):
                if i >= 0 and i not in seen:
                    seen.add(i)
                    ids.append(i)
            if ids:
                per[n] = ids
        if per:
            kept[a] = per

    totals = dict.fromkeys(live, 0)
    for per in kept.values():
        for n, ids in per.items():
            totals[n] += len(ids)

    out: Placement = {}
    for a in sorted(desired):
        want = desired[a]
        if want <= 0:
            continue
        per = {n: list(ids) for n, ids in kept.get(a, {}).items()}
        eligible = [n for n in live if (a, n) not in blocked]

        def count(n: str, per: dict[str, list[int]] = per) -> int:
            return len(per.get(n, ()))

        have = sum(len(v) for v in per.values())
        # 2. too many
        while have > want:
            victim = max(per, key=lambda n: ((a, n) in idle_set, len(per[n]), totals[n], n))
            per[victim].pop()
            totals[victim] -= 1
            have -= 1
            if not per[victim]:
                del per[victim]
        # 3. too few
        used = {i for ids in per.values() for i in ids}
        nxt = 0
        while have < want and eligible:
            eligible = [n for n in eligible if totals[n] < cap]
            if not eligible:
                break
            while nxt in used:
                nxt += 1
            dst = min(eligible, key=lambda n: (count(n), totals[n], n))
            per.setdefault(dst, []).append(nxt)
            per[dst].sort()
            used.add(nxt)
            totals[dst] += 1
            have += 1
        # 4. spread
        while eligible and per:
            src = max(per, key=lambda n: (len(per[n]), totals[n], n))
            dst = min(eligible, key=lambda n: (count(n), totals[n], n))
            if len(per[src]) - count(dst) <= 1 or totals[dst] >= cap:
                break
            i = per[src].pop()
            totals[src] -= 1
            if not per[src]:
                del per[src]
            per.setdefault(dst, []).append(i)
            per[dst].sort()
            totals[dst] += 1
        if per:
            out[a] = {n: per[n] for n in sorted(per)}
    return out


def spread(placement: Mapping[str, Mapping[str, Sequence[int]]], artifact: str, nodes: Sequence[str]) -> int:
    """max - min instances of `artifact` over `nodes` (0 when nodes is empty)."""
    per = placement.get(artifact, {})
    counts = [len(per.get(n, ())) for n in nodes]
    return max(counts) - min(counts) if counts else 0


def changes(
    current: Mapping[str, Mapping[str, Sequence[int]]], target: Mapping[str, Mapping[str, Sequence[int]]]
) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
    """`{(artifact, node): (current ids, target ids)}` for every pair whose ids differ."""
    out: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for a in set(current) | set(target):
        cur, tgt = current.get(a, {}), target.get(a, {})
        for n in set(cur) | set(tgt):
            c, t = sorted(cur.get(n, ())), sorted(tgt.get(n, ()))
            if c != t:
                out[(a, n)] = (c, t)
    return out
