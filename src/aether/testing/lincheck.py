"""Linearizability checker for key-value register histories.

What this module owns
---------------------
``check_history`` decides whether a concurrent history of ``put`` / ``get`` / ``remove`` / ``cas``
operations (as recorded by clients of a replicated key-value store, e.g. in the deterministic
consensus simulation) is linearizable with respect to a map of independent registers:

* every key starts absent (``None``);
* ``put(k, v)`` sets the value, ``remove(k)`` sets it to ``None`` (putting ``None`` is the same as
  removing);
* ``get(k)`` returns the current value (``None`` = absent);
* ``cas(k, expected, new)`` succeeds (``True``) iff the current value ``== expected`` (``None``
  meaning "absent") and then sets ``new``; otherwise it returns ``False`` and changes nothing.

Values are compared with ``==``; they need not be hashable.

An operation whose outcome is unknown (``ret is None``: the request failed or timed out) may have
taken effect at any single instant after its ``call`` -- or never. Its ``result`` is ignored.

Algorithm
---------
1. *P-compositionality* (Herlihy & Wing): a history of independent objects is linearizable iff the
   sub-history of every object is. The history is split per key and each key is checked on its own,
   in order of first appearance in the input.
2. Per key, the Wing & Gong search with Lowe's memoization, as in G. Lowe, "Testing for
   linearizability" (2017) and ``anishathalye/porcupine``: the ops' call and return events are put
   in one time-ordered doubly linked list. The search repeatedly scans the list from its head:

   * at a *call* event it tries to linearize that op now (apply it to the current register value).
     If the model accepts it and the pair (set of linearized ops as an ``int`` bitset, resulting
     value) has not been seen before, the op's events are lifted out of the list, the choice is
     pushed on an explicit stack and the scan restarts from the head;
   * at a *return* event the op returned without having been linearized -- the current partial
     order is a dead end, so the search backtracks (pops the last choice, relinks its events and
     resumes scanning just after that op's call event).

   The search is iterative (no recursion), so history length is bounded only by memory. Every scan
   step counts against ``max_steps_per_key``; exceeding it gives a *timeout* result.

   **Pure ops first:** completed ops that never change the value (``get``, failed ``cas``, ``cas``
   with ``expected == new``) are taken greedily: each configuration is first scanned for an enabled
   pure op that fits the current value, and if one exists it is the only choice explored there.
   This is sound -- moving such an op to the front of any valid completion keeps it valid, since it
   changes no value and every op that had to precede it is already linearized -- and it removes the
   branching over concurrent reads, which otherwise dominates the cost.

   **Ties:** at equal timestamps, call events are ordered before return events. Ops whose intervals
   merely touch (``a.ret == b.call``) are thus treated as concurrent and may be linearized in either
   order. This is the conservative choice: it never reports a violation that depends on how two
   equal clock readings are interpreted (it can only accept more histories, never fewer).

3. **Indeterminate ops** have no return event (return time = +infinity): they may be linearized at
   any point after their call, and the search succeeds as soon as every *completed* op has been
   linearized -- the still-unlinearized indeterminate ops are the ones that never took effect
   (their results are unconstrained, so "never happened" and "happened at the very end" are the
   same thing). Before the search, three sound reductions keep pending indeterminate ops from
   blowing up the search space (each transformation preserves linearizability exactly):

   * indeterminate gets, indeterminate CASes with ``expected == new`` (no-ops either way) and
     indeterminate ops invoked after the last completed op returned are dropped;
   * an indeterminate write of value ``w`` (``put``/``remove``/``cas``-new) is dropped if nothing
     could ever benefit from it: no completed ``get`` returned ``w``, no ``cas`` expected ``w`` and
     no completed failed ``cas`` returned at or after the write's call. (Any linearization that
     includes such a write is followed, until the next overwrite, only by indeterminate CASes that
     failed; deleting the write and those CASes gives another valid linearization.)
   * an indeterminate write that is the *only* writer of a non-``None`` value ``v`` that some
     completed op observed (a ``get`` returning ``v`` or a successful ``cas`` expecting ``v``) must
     have taken effect before the first such observer returned: it is treated as a completed op
     with that return time.

The failure explanation reports the longest linearizable prefix found, the register value after it,
the op whose return could not be explained and the other ops that were in flight at that point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CheckResult", "Op", "check_history"]

_KINDS = ("put", "get", "remove", "cas")

# Internal op codes of the register model (values are interned to small ints; 0 is None/absent).
_WRITE = 0  # put / remove: value := a
_READ = 1  # completed get: requires value == a
_CAS_OK = 2  # completed successful cas: requires value == a, then value := b
_CAS_FAIL = 3  # completed failed cas: requires value != a
_CAS_MAYBE = 4  # indeterminate cas: if value == a then value := b (any outcome is acceptable)

_INF = math.inf
_SHOW_PREFIX = 12  # how many trailing ops of the longest prefix a failure explanation prints
_SHOW_PENDING = 12  # how many in-flight ops a failure explanation prints
_MAX_REPR = 80


@dataclass(frozen=True, slots=True)
class Op:
    """One client operation on one key, as observed by the client.

    ``ret is None`` marks an indeterminate op (failed/timed out with unknown outcome): it may have
    taken effect at any time after ``call``, or never, and its ``result`` is ignored.
    """

    client: int  # client id (ops of one client never overlap in time; the checker does not rely on it)
    kind: str  # "put" | "get" | "remove" | "cas"
    key: str
    value: object = None  # put: the value written; cas: the new value
    expected: object = None  # cas: expected current value (None means "key absent")
    call: float = 0.0  # invocation time
    ret: float | None = None  # completion time; None = indeterminate
    result: object = None  # get: value read (None = absent); cas: True/False; otherwise ignored


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`check_history`.

    ``ok`` is True iff every key's sub-history is linearizable. On a violation ``key`` names the
    first offending key (in order of first appearance) and ``explanation`` lists the ops that could
    not be linearized, with their times. ``timed_out`` is True (and ``ok`` False) if the search
    budget of some key ran out before a verdict and no key was found to be violated.
    """

    ok: bool
    key: str | None
    explanation: str
    timed_out: bool = False


@dataclass(slots=True)
class _KOp:
    """One op of a single key's sub-history, compiled for the search."""

    op: Op
    code: int
    a: int
    b: int
    call: float
    ret: float  # +inf while indeterminate
    indeterminate: bool  # outcome unknown (result ignored)
    forced: bool = False  # indeterminate, but its value was observed: ret tightened, must be linearized


@dataclass(slots=True)
class _Failure:
    prefix: list[int]  # indices (into the compiled ops) of the longest linearized prefix, in order
    state: int  # register value (interned) after that prefix
    stuck: int  # op whose return event could not be passed
    pending: list[int]  # other ops invoked but not linearized at that point


class _Interner:
    """Maps values to small ints so that ``==``-equal values share one id; 0 is ``None``."""

    __slots__ = ("_hashable", "_unhashable", "values")

    def __init__(self) -> None:
        self._hashable: dict[object, int] = {None: 0}
        self._unhashable: list[tuple[object, int]] = []
        self.values: list[object] = [None]

    def intern(self, value: object) -> int:
        try:
            found = self._hashable.get(value)
        except TypeError:  # unhashable: linear scan with ==
            for other, ident in self._unhashable:
                if other == value:
                    return ident
            ident = len(self.values)
            self.values.append(value)
            self._unhashable.append((value, ident))
            return ident
        if found is None:
            found = len(self.values)
            self.values.append(value)
            self._hashable[value] = found
        return found


def check_history(ops: Iterable[Op], *, max_steps_per_key: int = 2_000_000) -> CheckResult:
    """Check that a key-value register history is linearizable (see the module docstring).

    Keys are checked independently, in order of first appearance. The first key found to be
    non-linearizable is reported (``ok=False``, ``timed_out=False``) even if an earlier key timed
    out; otherwise, if some key exhausted its ``max_steps_per_key`` search budget, the result is
    ``ok=False, timed_out=True`` naming the first such key.

    Raises ``ValueError`` for an unknown ``kind`` or a completed op that returns before its call.
    """
    if max_steps_per_key < 1:
        raise ValueError(f"max_steps_per_key must be positive, got {max_steps_per_key}")
    by_key: dict[str, list[Op]] = {}
    total = 0
    for op in ops:
        if op.kind not in _KINDS:
            raise ValueError(f"unknown op kind {op.kind!r} (expected one of {', '.join(_KINDS)}): {op!r}")
        if op.ret is not None and op.ret < op.call:
            raise ValueError(f"op returns before it is called: {op!r}")
        by_key.setdefault(op.key, []).append(op)
        total += 1

    first_timeout: CheckResult | None = None
    for key, key_ops in by_key.items():
        compiled, values = _compile(key_ops)
        outcome = _search(compiled, max_steps_per_key)
        if outcome is None:
            continue
        if not isinstance(outcome, _Failure):  # "timeout"
            if first_timeout is None:
                first_timeout = CheckResult(
                    ok=False,
                    key=key,
                    explanation=(
                        f"timeout: search budget of {max_steps_per_key} steps exhausted on key {key!r} "
                        f"({len(key_ops)} ops) before a verdict"
                    ),
                    timed_out=True,
                )
            continue
        return CheckResult(ok=False, key=key, explanation=_explain(key, key_ops, compiled, values, outcome))
    if first_timeout is not None:
        return first_timeout
    return CheckResult(ok=True, key=None, explanation=f"linearizable: {total} ops on {len(by_key)} keys")


def _compile(ops: list[Op]) -> tuple[list[_KOp], list[object]]:
    """Translate one key's ops to the integer register model and apply the sound reductions."""
    interner = _Interner()
    intern = interner.intern
    compiled: list[_KOp] = []
    for op in ops:
        indeterminate = op.ret is None
        ret = _INF if op.ret is None else op.ret
        if op.kind == "put":
            code, a, b = _WRITE, intern(op.value), 0
        elif op.kind == "remove":
            code, a, b = _WRITE, 0, 0
        elif op.kind == "get":
            if indeterminate:
                continue  # an unknown read constrains nothing and changes nothing
            code, a, b = _READ, intern(op.result), 0
        else:  # cas
            a, b = intern(op.expected), intern(op.value)
            if indeterminate:
                if a == b:
                    continue  # a no-op whether it succeeded or not
                code = _CAS_MAYBE
            else:
                code = _CAS_OK if op.result else _CAS_FAIL
        compiled.append(_KOp(op, code, a, b, op.call, ret, indeterminate))

    completed = [k for k in compiled if not k.indeterminate]
    if not completed:
        return [], interner.values
    last_ret = max(k.ret for k in completed)

    # Reduction 1/2: drop indeterminate ops that can never matter.
    read_values = {k.a for k in completed if k.code == _READ}
    expected_values = {k.a for k in compiled if k.code in (_CAS_OK, _CAS_MAYBE)}
    last_failed_cas_ret = max((k.ret for k in completed if k.code == _CAS_FAIL), default=-_INF)
    kept: list[_KOp] = []
    for k in compiled:
        if k.indeterminate:
            if k.call > last_ret:
                continue  # may only take effect after everything observable happened
            written = k.b if k.code == _CAS_MAYBE else k.a
            if written not in read_values and written not in expected_values and last_failed_cas_ret < k.call:
                continue  # nothing could observe or benefit from this write
        kept.append(k)

    # Reduction 3: an observed value with a unique (indeterminate) writer pins that writer down.
    writers: dict[int, int] = {}
    for k in kept:
        if k.code == _WRITE:
            writers[k.a] = writers.get(k.a, 0) + 1
        elif k.code == _CAS_MAYBE or (k.code == _CAS_OK and k.a != k.b):
            writers[k.b] = writers.get(k.b, 0) + 1
    first_observed: dict[int, float] = {}
    for k in kept:
        observes = k.code in (_READ, _CAS_OK) and not k.indeterminate and k.a != 0
        if observes and k.ret < first_observed.get(k.a, _INF):
            first_observed[k.a] = k.ret
    for k in kept:
        if not k.indeterminate:
            continue
        written = k.b if k.code == _CAS_MAYBE else k.a
        deadline = first_observed.get(written)
        if written != 0 and deadline is not None and writers.get(written) == 1 and deadline >= k.call:
            k.ret = deadline
            k.forced = True
    return kept, interner.values


def _search(kops: list[_KOp], max_steps: int) -> _Failure | str | None:
    """Wing-Gong/Lowe search over one key. Returns None (linearizable), "timeout" or a _Failure."""
    n = len(kops)
    must = [not k.indeterminate or k.forced for k in kops]
    remaining = sum(must)
    if remaining == 0:
        return None

    # Events: (time, 0=call/1=return, op). Calls sort before returns at equal times (see docstring).
    events: list[tuple[float, int, int]] = []
    for i, k in enumerate(kops):
        events.append((k.call, 0, i))
        if must[i]:
            events.append((k.ret, 1, i))
    events.sort()
    m = len(events)
    # Nodes: 0 = head sentinel, 1..m = events, m + 1 = tail sentinel.
    nxt = [*range(1, m + 2), m + 1]
    prv = [0, *range(m + 1)]
    node_op = [-1] * (m + 2)
    node_is_call = [False] * (m + 2)
    call_node = [0] * n
    ret_node = [-1] * n
    for pos, (_, is_ret, i) in enumerate(events, start=1):
        node_op[pos] = i
        if is_ret:
            ret_node[i] = pos
        else:
            node_is_call[pos] = True
            call_node[i] = pos

    codes = [k.code for k in kops]
    arg_a = [k.a for k in kops]
    arg_b = [k.b for k in kops]
    bits = [1 << i for i in range(n)]

    # Completed ops that never change the value (get, failed cas, cas with expected == new).
    pure = [k.code in (_READ, _CAS_FAIL) or (k.code == _CAS_OK and k.a == k.b) for k in kops]

    seen: set[tuple[int, int]] = set()
    stack: list[tuple[int, int]] = []  # (op linearized, register value before it)
    linearized = 0
    state = 0
    best_depth = -1
    best: _Failure | None = None
    steps = 0
    node = nxt[0]
    # Each configuration is scanned twice: first only for a pure op that fits (taken greedily, with
    # no alternatives -- see the backtracking comment), then, if there is none, for any op.
    pure_pass = True
    while remaining:
        steps += 1
        if steps > max_steps:
            return "timeout"
        if node_is_call[node]:
            i = node_op[node]
            if pure_pass and not pure[i]:
                node = nxt[node]
                continue
            code = codes[i]
            a = arg_a[i]
            if code == _WRITE:
                new_state = a
            elif code == _READ:
                if state != a:
                    node = nxt[node]
                    continue
                new_state = state
            elif code == _CAS_OK:
                if state != a:
                    node = nxt[node]
                    continue
                new_state = arg_b[i]
            elif code == _CAS_FAIL:
                if state == a:
                    node = nxt[node]
                    continue
                new_state = state
            else:  # _CAS_MAYBE
                new_state = arg_b[i] if state == a else state
            new_linearized = linearized | bits[i]
            memo = (new_linearized, new_state)
            if memo not in seen:
                seen.add(memo)
                stack.append((i, state))
                linearized = new_linearized
                state = new_state
                # Lift the op's call (and return) event out of the list.
                p, q = prv[node], nxt[node]
                nxt[p] = q
                prv[q] = p
                r = ret_node[i]
                if r >= 0:
                    p, q = prv[r], nxt[r]
                    nxt[p] = q
                    prv[q] = p
                    remaining -= 1
                node = nxt[0]
                pure_pass = True
                continue
            if not pure[i]:
                node = nxt[node]
                continue
            # A pure op fits, but its successor configuration was already explored without success:
            # since the pure op dominates every alternative, this configuration is dead too.
        elif pure_pass:
            # End of the enabled ops (first pending return) and no pure op fits: branch over the rest.
            pure_pass = False
            node = nxt[0]
            continue
        elif len(stack) > best_depth:
            # A return event of an op not yet linearized: dead end.
            best_depth = len(stack)
            best = _failure_snapshot(stack, state, node, nxt, node_op, node_is_call)
        # Backtrack. Linearizing an enabled pure op that fits is never worse than delaying it: it
        # changes no value, and every op that must precede it is already linearized, so any valid
        # completion that places it later stays valid with it moved to the front. Such a choice has
        # no alternatives worth trying: undo it and keep backtracking to the last non-pure choice,
        # then resume that configuration's scan just after the undone op's call event.
        while stack:
            i, state = stack.pop()
            linearized ^= bits[i]
            r = ret_node[i]
            if r >= 0:
                nxt[prv[r]] = r
                prv[nxt[r]] = r
                remaining += 1
            c = call_node[i]
            nxt[prv[c]] = c
            prv[nxt[c]] = c
            if not pure[i]:
                break
        else:
            break
        node = nxt[c]
        pure_pass = False
    if remaining == 0:
        return None
    assert best is not None
    return best


def _failure_snapshot(
    stack: list[tuple[int, int]],
    state: int,
    stuck_node: int,
    nxt: list[int],
    node_op: list[int],
    node_is_call: list[bool],
) -> _Failure:
    stuck = node_op[stuck_node]
    pending: list[int] = []
    node = nxt[0]
    while node != stuck_node:
        if node_is_call[node] and node_op[node] != stuck:
            pending.append(node_op[node])
        node = nxt[node]
    return _Failure(prefix=[i for i, _ in stack], state=state, stuck=stuck, pending=pending)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _describe(op: Op) -> str:
    """One line per op: times, client and the call with its result."""
    ret = "? (indeterminate)" if op.ret is None else repr(op.ret)
    if op.kind == "put":
        body = f"put({op.key!r}, {_short(op.value)})"
    elif op.kind == "remove":
        body = f"remove({op.key!r})"
    elif op.kind == "get":
        body = f"get({op.key!r}) -> " + ("?" if op.ret is None else _short(op.result))
    else:
        body = f"cas({op.key!r}, expected={_short(op.expected)}, new={_short(op.value)}) -> " + (
            "?" if op.ret is None else str(bool(op.result))
        )
    return f"[call={op.call!r} ret={ret}] client {op.client}: {body}"


def _describe_kop(k: _KOp) -> str:
    text = _describe(k.op)
    if k.forced:
        text += f"  (value observed: must have taken effect by {k.ret!r})"
    return text


def _explain(key: str, key_ops: list[Op], kops: list[_KOp], values: list[object], failure: _Failure) -> str:
    lines = [f"key {key!r}: history is not linearizable ({len(key_ops)} ops on this key)."]
    prefix = failure.prefix
    lines.append(
        f"Longest linearizable prefix found: {len(prefix)} ops; register value after it: "
        f"{_short(values[failure.state])}"
    )
    if len(prefix) > _SHOW_PREFIX:
        lines.append(f"  ... ({len(prefix) - _SHOW_PREFIX} earlier ops)")
    lines.extend(f"  {_describe_kop(kops[i])}" for i in prefix[-_SHOW_PREFIX:])
    lines.append("Could not be linearized (it returned, but no order of the ops before it explains it):")
    lines.append(f"  {_describe_kop(kops[failure.stuck])}")
    if failure.pending:
        lines.append("Other ops in flight at that point (all orders tried):")
        lines.extend(f"  {_describe_kop(kops[i])}" for i in failure.pending[:_SHOW_PENDING])
        if len(failure.pending) > _SHOW_PENDING:
            lines.append(f"  ... ({len(failure.pending) - _SHOW_PENDING} more)")
    return "\n".join(lines)
