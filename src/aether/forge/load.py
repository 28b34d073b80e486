"""The load generator of Forge (docs/forge.md, "Load generator and forge-config.toml").

Sans-IO core, no sockets, sleeps or clocks inside (times and a `random.Random` are passed in):

- `LoadPlan`: the offered rate at time t (current rate, an active ramp, pause, the config's
  schedule, or a replayed `Trace`) and `due(now)`, the target indexes of the requests to send
  now. Tokens accumulate at the exact integral of the rate (piecewise linear), so over any span
  it emits rate x seconds +-1; the total is split over the targets by smooth weighted round robin.
- `LogHistogram`: latencies in log buckets (16 per doubling, relative error under 2.2 %).
- `LoadStats`: per target, per node address and in total, sent / ok / failed by status
  (``"500"``; ``"error:connect"``, ``"error:timeout"``... for transport failures) / dropped
  client side and a latency histogram, cumulative and per second for the last `history` seconds
  (`series(since)` gives the `Point`s a dashboard charts), and the last `FAILURES_KEPT` failed
  requests with what they were told (`FailedRequest`: the problem document's detail, or the
  transport error), numbered so a caller can ask for those after a point (`failures(after)`).
- `NodePicker`: the node address of each request, round robin over the addresses it is given; a
  connect error skips that address for a second.
- `LoadCore`: the above together, plus the in-flight cap (beyond `max_in_flight` a request is
  counted as dropped client side, never queued) and trace recording.

`LoadGenerator` is the asyncio adapter: one aiohttp `ClientSession` with a connection limit, a
ticker every 10 ms that asks the core what is due and sends it, a per-request timeout, an
`on_response` hook, and the CPU time of its event loop thread (`cpu_percent()`).

Traces: `Trace` holds the requests offered per target per second (`LoadGenerator.start_recording`
/ `stop_recording`); `save_trace` / `load_trace` store it as JSON lines (a header line, then one
line of per-target counts per second); `LoadGenerator.replay(trace, speed)` drives the plan from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec

from aether.core.errors import BadRequest
from aether.core.problem import decode_problem
from aether.forge.config import LoadConfig, ScheduleStep, Target, TargetTemplates, compile_target

__all__ = [
    "Dispatch",
    "FailedRequest",
    "LoadCore",
    "LoadGenerator",
    "LoadPlan",
    "LoadStats",
    "LoadView",
    "LogHistogram",
    "NodePicker",
    "OnResponse",
    "Point",
    "SentRequest",
    "Totals",
    "Trace",
    "load_trace",
    "parse_trace",
    "save_trace",
    "trace_lines",
]

log = logging.getLogger(__name__)

_EPS: Final = 1e-9
NO_NODE_DETAIL: Final = "not sent: no node was up and ready (none to send it to)"
SKIP_SECONDS: Final = 1.0
"""How long an address that refused a connection is skipped by `NodePicker`."""


# -- traces -------------------------------------------------------------------------------------------


class Trace(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Requests offered per target per `interval` seconds: ``counts[k][j]`` is the count of
    ``targets[j]`` in the interval starting at ``start + k * interval`` (wall-clock seconds)."""

    start: float
    targets: list[str]
    counts: list[list[int]]
    interval: float = 1.0


class _TraceHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    start: float
    targets: list[str]
    interval: float = 1.0


def trace_lines(trace: Trace) -> bytes:
    """`trace` as JSON lines: a header object, then one array of per-target counts per interval."""
    enc = msgspec.json.Encoder()
    lines = [enc.encode(_TraceHeader(start=trace.start, targets=trace.targets, interval=trace.interval))]
    lines.extend(enc.encode(row) for row in trace.counts)
    return b"\n".join(lines) + b"\n"


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write `trace` to `path` as JSON lines (`trace_lines`)."""
    Path(path).write_bytes(trace_lines(trace))


def load_trace(path: str | Path) -> Trace:
    """Read a trace written by `save_trace`; `BadRequest` naming the file and line if it is not one."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise BadRequest(f"{p}: cannot read the trace: {e}") from None
    return parse_trace(raw, str(p))


def parse_trace(data: bytes, name: str = "trace") -> Trace:
    """A trace from its JSON lines (`trace_lines`); `BadRequest` naming `name` and the line."""
    p = name
    raw = data.splitlines()
    if not raw:
        raise BadRequest(f"{p}: empty trace (expected a header line)")
    try:
        header = msgspec.json.decode(raw[0], type=_TraceHeader)
    except msgspec.DecodeError as e:
        raise BadRequest(f"{p}:1: not a trace header: {e}") from None
    if header.interval <= 0:
        raise BadRequest(f"{p}:1: interval must be above 0")
    counts: list[list[int]] = []
    for n, line in enumerate(raw[1:], start=2):
        if not line.strip():
            continue
        try:
            row = msgspec.json.decode(line, type=list[int])
        except msgspec.DecodeError as e:
            raise BadRequest(f"{p}:{n}: expected an array of counts: {e}") from None
        if len(row) != len(header.targets) or any(c < 0 for c in row):
            raise BadRequest(f"{p}:{n}: expected {len(header.targets)} counts >= 0, got {row}")
        counts.append(row)
    return Trace(start=header.start, targets=header.targets, counts=counts, interval=header.interval)


class _Recorder:
    def __init__(self, targets: list[str], start: float) -> None:
        self.targets = targets
        self.start = start
        self.counts: list[list[int]] = []

    def add(self, target: int, now: float) -> None:
        k = max(0, int(now - self.start))
        while len(self.counts) <= k:
            self.counts.append([0] * len(self.targets))
        self.counts[k][target] += 1

    def trace(self, now: float) -> Trace:
        k = max(0, int(now - self.start))  # the intervals up to now, the last one possibly partial
        counts = [list(r) for r in self.counts[: k + 1]]
        while len(counts) < k:
            counts.append([0] * len(self.targets))
        return Trace(start=self.start, targets=list(self.targets), counts=counts)


# -- the pacer ------------------------------------------------------------------------------------------


class _Replay:
    def __init__(self, trace: Trace, columns: list[int | None], speed: float, start: float) -> None:
        self.trace = trace
        self.columns = columns  # per plan target: its column in the trace (None: not in it)
        self.speed = speed
        self.start = start
        self.step = trace.interval / speed  # wall seconds per trace interval

    @property
    def end(self) -> float:
        return self.start + len(self.trace.counts) * self.step

    def rates(self, k: int) -> list[float]:
        row = self.trace.counts[k]
        return [0.0 if c is None else row[c] / self.step for c in self.columns]


class LoadPlan:
    """The offered load over time and which targets are due (sans-IO; see the module docstring).

    `weights` split the total rate; `schedule` steps are applied at `begin` time + ``step.at``;
    manual changes (`set_rate`, `ramp`) take effect at once and later schedule steps still apply.
    """

    def __init__(
        self,
        rate: float,
        weights: Sequence[float],
        *,
        now: float,
        paused: bool = False,
        schedule: Sequence[ScheduleStep] = (),
    ) -> None:
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError("weights must be >= 0 with at least one above 0")
        self._weights = [float(w) for w in weights]
        self._total_weight = sum(self._weights)
        self._current = [0.0] * len(self._weights)  # smooth weighted round robin state
        self._schedule = list(schedule)
        self._paused = paused
        self._replay: _Replay | None = None
        self._replay_tokens = [0.0] * len(self._weights)
        self.begin(now, rate)

    # -- state

    def begin(self, now: float, rate: float | None = None) -> None:
        """(Re)start the timeline at `now`: schedule times count from here; no tokens carried."""
        r = self.rate_at(now) if rate is None else _check_rate(rate)
        self._origin = now
        self._t = now
        self._tokens = 0.0
        self._next_step = 0
        self._set_segment(r, r, now, now)

    def _set_segment(self, r0: float, r1: float, t0: float, t1: float) -> None:
        self._r0, self._r1, self._t0, self._t1 = r0, r1, t0, t1

    def _rate(self, t: float) -> float:
        if t >= self._t1:
            return self._r1
        if t <= self._t0:
            return self._r0
        return self._r0 + (self._r1 - self._r0) * (t - self._t0) / (self._t1 - self._t0)

    def rate_at(self, now: float) -> float:
        """The offered total rate (requests/s) at `now` (0 while paused), as of the last update."""
        if self._paused:
            return 0.0
        if self._replay is not None:
            k = int((now - self._replay.start) / self._replay.step)
            if 0 <= k < len(self._replay.trace.counts):
                return sum(self._replay.rates(k))
            return 0.0
        return self._rate(now)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    @property
    def ramping_to(self) -> float | None:
        """The target rate of the ramp in progress at the last update, else None."""
        return self._r1 if self._t < self._t1 else None

    # -- controls (each first accounts the time up to `now` at the old rate)

    def set_rate(self, rate: float, now: float) -> None:
        """Go to `rate` at once (ends a ramp; a replay goes on until its end)."""
        self._advance(now)
        r = _check_rate(rate)
        self._set_segment(r, r, now, now)

    def ramp(self, to: float, seconds: float, now: float) -> None:
        """Go linearly from the current rate to `to` over `seconds` (0: at once)."""
        self._advance(now)
        to = _check_rate(to)
        if seconds < 0 or not math.isfinite(seconds):
            raise BadRequest(f"ramp seconds must be >= 0, not {seconds}")
        self._set_segment(self._rate(now), to, now, now + seconds)

    def pause(self, now: float) -> None:
        self._advance(now)
        self._paused = True
        self._tokens = 0.0
        self._replay_tokens = [0.0] * len(self._weights)

    def resume(self, now: float) -> None:
        self._advance(now)
        self._paused = False

    def replay(self, trace: Trace, columns: list[int | None], speed: float, now: float) -> None:
        """Drive the plan from `trace` from `now` on (`columns[j]`: trace column of target j)."""
        if speed <= 0 or not math.isfinite(speed):
            raise BadRequest(f"replay speed must be above 0, not {speed}")
        if len(columns) != len(self._weights):
            raise ValueError("one column per target")
        self._advance(now)
        self._replay = _Replay(trace, columns, speed, now)
        self._replay_tokens = [0.0] * len(self._weights)
        self._tokens = 0.0

    def stop_replay(self, now: float) -> None:
        """Back to the configured rates (the rate before the replay, schedule included)."""
        self._advance(now)
        self._replay = None
        self._tokens = 0.0

    # -- accounting

    def _integral(self, a: float, b: float) -> float:
        """Integral of the rate over [a, b] (exact: the rate is linear between t0 and t1)."""
        points = [a] + [x for x in (self._t0, self._t1) if a < x < b] + [b]
        return sum((y - x) * (self._rate(x) + self._rate(y)) / 2 for x, y in itertools.pairwise(points))

    def _accumulate(self, a: float, b: float) -> None:
        if b <= a or self._paused:
            return
        if self._replay is None:
            self._tokens += self._integral(a, b)
            # a stalled caller gets at most one second's worth at once, not an unbounded burst
            self._tokens = min(self._tokens, max(1.0, self._rate(b)))
            return
        rp = self._replay
        t = a
        # the trace interval `t` is in; afterwards k only moves forward: recomputing it from t at
        # every boundary can give the same k again at wall-clock times (start + (k + 1) * step
        # minus start is not (k + 1) * step in floats), and the loop would never end
        k = max(0, int((t - rp.start) / rp.step + _EPS))
        while t < b and k < len(rp.trace.counts):
            seg_end = min(b, rp.start + (k + 1) * rp.step)
            if seg_end > t:
                for j, r in enumerate(rp.rates(k)):
                    self._replay_tokens[j] += r * (seg_end - t)
                t = seg_end
            if t < b:  # reached the end of interval k
                k += 1

    def _advance(self, now: float) -> None:
        if now <= self._t:
            return
        while self._next_step < len(self._schedule):
            step = self._schedule[self._next_step]
            at = self._origin + step.at
            if at > now:
                break
            at = max(at, self._t)
            self._accumulate(self._t, at)
            self._t = at
            self._set_segment(self._rate(at), step.rate, at, at + step.ramp)
            self._next_step += 1
        self._accumulate(self._t, now)
        self._t = now
        if self._replay is not None and now >= self._replay.end:
            self._replay = None
            self._tokens = 0.0

    def _pick(self) -> int:
        best = 0
        for j, w in enumerate(self._weights):
            self._current[j] += w
            if self._current[j] > self._current[best]:
                best = j
        self._current[best] -= self._total_weight
        return best

    def due(self, now: float) -> list[int]:
        """The target indexes of the requests to send at `now` (in send order)."""
        replaying = self._replay is not None
        self._advance(now)
        if replaying:  # also the tail of a replay that ended within this step
            out: list[int] = []
            ended = self._replay is None
            for j, tok in enumerate(self._replay_tokens):
                # at its end a replay has offered whole counts: round away the float error that
                # absolute wall-clock times leave in the segment lengths (at most ~1e-6 s each)
                n = round(tok) if ended else int(tok + _EPS)
                if n > 0:
                    self._replay_tokens[j] = tok - n
                    out.extend([j] * n)
            return out
        n = int(self._tokens + _EPS)
        if n <= 0:
            return []
        self._tokens -= n
        return [self._pick() for _ in range(n)]


def _check_rate(rate: float) -> float:
    if not (rate >= 0 and math.isfinite(rate)):
        raise BadRequest(f"rate must be a number >= 0, not {rate}")
    return float(rate)


# -- statistics -----------------------------------------------------------------------------------------


class LogHistogram:
    """Latencies (seconds) in log buckets: `SUB` per doubling from `LOW` (1 µs), relative error
    under 2.2 %; sparse, so an idle second costs nothing. Quantiles report the bucket's geometric
    midpoint."""

    SUB: Final = 16
    LOW: Final = 1e-6
    __slots__ = ("buckets", "count")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0

    def record(self, seconds: float) -> None:
        i = 0 if seconds <= self.LOW else int(math.log2(seconds / self.LOW) * self.SUB)
        self.buckets[i] = self.buckets.get(i, 0) + 1
        self.count += 1

    def merge(self, other: LogHistogram) -> None:
        for i, c in other.buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + c
        self.count += other.count

    def quantile(self, q: float) -> float | None:
        """The `q` quantile (0 < q < 1) in seconds; None when empty."""
        if not 0 < q < 1:
            raise ValueError(f"quantile must be between 0 and 1, not {q!r}")
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen >= rank:
                return self.LOW * 2 ** ((i + 0.5) / self.SUB)
        raise AssertionError("unreachable")  # pragma: no cover


class _Cell:
    __slots__ = ("dropped", "errors", "failed", "hist", "ok", "rerouted", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.dropped = 0
        self.rerouted = 0
        self.errors: dict[str, int] = {}
        self.hist = LogHistogram()

    def counts(self) -> dict[str, Any]:
        """The fields a `Point` and a `Totals` share, from this cell."""
        return {
            "sent": self.sent, "ok": self.ok, "failed": self.failed, "dropped": self.dropped,
            "rerouted": self.rerouted, "errors": dict(self.errors), "success_rate": _rate(self),
            "p50_ms": _ms(self.hist.quantile(0.5)), "p90_ms": _ms(self.hist.quantile(0.9)),
            "p99_ms": _ms(self.hist.quantile(0.99)),
        }


class Point(msgspec.Struct, frozen=True):
    """One second of one series: ``scope`` is ``total``, ``target`` or ``node`` and ``name`` the
    target name or node address (``""`` for the total). ``t`` is the second's start; ``sent`` and
    ``dropped`` count requests started in it, ``ok``/``failed``/latencies those finished in it."""

    t: float
    scope: str
    name: str
    sent: int
    ok: int
    failed: int
    dropped: int
    errors: dict[str, int]
    success_rate: float | None  # ok / (ok + failed), None without answers
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    rerouted: int = 0  # refused at connect by this node and sent to another (node scope only)


class FailedRequest(msgspec.Struct, frozen=True):
    """One failed request as the load generator saw it: `seq` counts failures since it started
    (1, 2, ...), `t` is when it ended (the generator's clock), `cause` its status (``"503"``) or
    transport error (``"error:timeout"``) and `detail` what the answer said (the problem
    document's detail, at most `DETAIL_CHARS` characters) or the transport error's text."""

    seq: int
    t: float
    target: str
    node: str | None
    cause: str
    detail: str


FAILURES_KEPT: Final = 200
"""Failed requests `LoadStats` keeps (the latest), for `failures(after)`."""
DETAIL_CHARS: Final = 300


class Totals(msgspec.Struct, frozen=True):
    """Everything since the generator started, for one target, node address, or in total."""

    name: str
    sent: int
    ok: int
    failed: int
    dropped: int
    errors: dict[str, int]  # failures by status ("500") or transport error ("error:connect")
    success_rate: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    rerouted: int = 0  # refused at connect by this node and sent to another (node scope only)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _rate(c: _Cell) -> float | None:
    done = c.ok + c.failed
    return None if done == 0 else c.ok / done


_Key = tuple[str, str]
_TOTAL: Final[_Key] = ("total", "")


class LoadStats:
    """Counts and latency histograms per target, per node address and in total: cumulative, and
    per second for the last `history` seconds (`series`)."""

    def __init__(self, history: int = 300) -> None:
        self._history = history
        self._seconds: deque[tuple[int, dict[_Key, _Cell]]] = deque()
        self._totals: dict[_Key, _Cell] = {_TOTAL: _Cell()}
        self._now = 0
        self._failures: deque[FailedRequest] = deque(maxlen=FAILURES_KEPT)
        self._failure_seq = 0

    def _cells(self, now: float, keys: Iterable[_Key]) -> list[_Cell]:
        sec = int(now)
        self._now = max(self._now, sec)
        if not self._seconds or self._seconds[-1][0] < sec:
            self._seconds.append((sec, {}))
            while self._seconds and self._seconds[0][0] < sec - self._history:  # N complete + 1
                self._seconds.popleft()
            per_second = self._seconds[-1][1]
        else:  # a time before the latest second (clock step back): charge the latest second
            per_second = self._seconds[-1][1]
        out = []
        for k in keys:
            c = per_second.get(k)
            if c is None:
                c = per_second[k] = _Cell()
            t = self._totals.get(k)
            if t is None:
                t = self._totals[k] = _Cell()
            out.append(c)
            out.append(t)
        return out

    @staticmethod
    def _keys(target: str, node: str | None) -> list[_Key]:
        keys = [_TOTAL, ("target", target)]
        if node is not None:
            keys.append(("node", node))
        return keys

    def advance(self, now: float) -> None:
        """Time passes: the seconds before `now` are complete (for `series`). The second of `now`
        gets a point for the total and each target even if no request starts or ends in it (load
        paused, rate 0): the charts then drop to 0 instead of drawing a line across the gap, and the
        dashboard's latest-second numbers do not keep showing the last second with requests."""
        self._now = max(self._now, int(now))
        self._cells(now, [k for k in self._totals if k[0] != "node"])

    def sent(self, target: str, node: str | None, now: float) -> None:
        for c in self._cells(now, self._keys(target, node)):
            c.sent += 1

    def rerouted(self, target: str, old: str, new: str, now: float) -> None:
        """A request `old` refused at connect was sent to `new` instead: the same request for the
        total and its target; per node, `old` counts it as rerouted and `new` as sent."""
        for c in self._cells(now, [("node", old)]):
            c.rerouted += 1
        for c in self._cells(now, [("node", new)]):
            c.sent += 1

    def dropped(self, target: str, now: float) -> None:
        for c in self._cells(now, self._keys(target, None)):
            c.dropped += 1

    def finished(
        self, target: str, node: str | None, failure: str | None, latency: float | None, now: float,
        detail: str = "",
    ) -> None:
        """A request ended: `failure` None is a success, else ``"503"`` or ``"error:connect"``...
        (`detail`: what the answer or the error said); `latency` (seconds) is recorded when there
        was an HTTP answer."""
        if failure is not None:
            self._failure_seq += 1
            self._failures.append(
                FailedRequest(self._failure_seq, now, target, node, failure, detail[:DETAIL_CHARS])
            )
        for c in self._cells(now, self._keys(target, node)):
            if failure is None:
                c.ok += 1
            else:
                c.failed += 1
                c.errors[failure] = c.errors.get(failure, 0) + 1
            if latency is not None:
                c.hist.record(latency)

    @property
    def failure_count(self) -> int:
        """Failed requests since the start (the `seq` of the latest `FailedRequest`)."""
        return self._failure_seq

    def failures(self, after: int = 0) -> list[FailedRequest]:
        """The kept failed requests numbered above `after`, oldest first (at most `FAILURES_KEPT`)."""
        return [f for f in self._failures if f.seq > after]

    def series(self, since: float = 0.0, *, include_current: bool = False) -> list[Point]:
        """Points of the seconds starting at or after `since`, oldest first (total, then targets,
        then nodes within a second); the second in progress only with `include_current`."""
        out: list[Point] = []
        for sec, cells in self._seconds:
            if sec < since or (sec >= self._now and not include_current):
                continue
            for (scope, name), c in sorted(cells.items(), key=lambda kv: (_SCOPE_ORDER[kv[0][0]], kv[0][1])):
                out.append(Point(t=float(sec), scope=scope, name=name, **c.counts()))
        return out

    def totals(self, scope: str, name: str = "") -> Totals:
        """Cumulative counts of one series (zeros if it has none yet)."""
        c = self._totals.get((scope, name)) or _Cell()
        return Totals(name=name, **c.counts())

    def names(self, scope: str) -> list[str]:
        return sorted(name for s, name in self._totals if s == scope)


_SCOPE_ORDER: Final = {"total": 0, "target": 1, "node": 2}


# -- node choice ----------------------------------------------------------------------------------------


class NodePicker:
    """Round robin over the current addresses; one that refused a connection is skipped for
    `SKIP_SECONDS` (unless every address is skipped: then plain round robin, so a recovery shows)."""

    def __init__(self) -> None:
        self._i = 0
        self._skip_until: dict[str, float] = {}

    def pick(self, addresses: Sequence[str], now: float) -> str | None:
        n = len(addresses)
        if n == 0:
            return None
        for k in range(n):
            a = addresses[(self._i + k) % n]
            if self._skip_until.get(a, 0.0) <= now:
                self._i = (self._i + k + 1) % n
                return a
        a = addresses[self._i % n]
        self._i = (self._i + 1) % n
        return a

    def connect_failed(self, address: str, now: float) -> None:
        self._skip_until[address] = now + SKIP_SECONDS
        if len(self._skip_until) > 64:
            self._skip_until = {a: t for a, t in self._skip_until.items() if t > now}

    def skipped(self, now: float) -> list[str]:
        return sorted(a for a, t in self._skip_until.items() if t > now)


# -- the core -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A request to send now: target index and node address."""

    target: int
    node: str


class SentRequest(msgspec.Struct, frozen=True):
    """A rendered request (what `on_response` receives with the answer)."""

    target: str
    node: str
    method: str
    url: str
    headers: dict[str, str]
    body: str | None


class LoadView(msgspec.Struct, frozen=True):
    """The generator at a glance (`LoadGenerator.snapshot`)."""

    running: bool
    paused: bool
    replaying: bool
    recording: bool
    rate: float  # offered requests/s now
    ramping_to: float | None
    in_flight: int
    max_in_flight: int
    cpu_percent: float | None  # of one core, the generator's event loop thread over the last seconds
    total: Totals
    targets: list[Totals]  # in config order
    nodes: list[Totals]  # by address
    skipped_nodes: list[str]  # addresses skipped after a refused connection


def _url(node: str, path: str) -> str:
    return f"{node}{path}" if "://" in node else f"http://{node}{path}"


class LoadCore:
    """Plan, stats, node choice, in-flight cap and trace recording (sans-IO)."""

    def __init__(self, config: LoadConfig, *, now: float, rng: random.Random) -> None:
        if not config.targets:
            raise BadRequest("the load generator needs at least one target ([[load.targets]])")
        self.config = config
        self.targets: list[Target] = list(config.targets)
        self._templates: list[TargetTemplates] = [
            compile_target(t, f"load.targets[{i}] ({t.name})") for i, t in enumerate(self.targets)
        ]
        self.rng = rng
        self.plan = LoadPlan(
            config.rate,
            [t.weight for t in self.targets],
            now=now,
            paused=config.paused,
            schedule=config.schedule,
        )
        self.stats = LoadStats(config.history)
        self.picker = NodePicker()
        self.in_flight = 0
        self._recorder: _Recorder | None = None

    def tick(self, now: float, addresses: Sequence[str]) -> list[Dispatch]:
        """The requests to send now; those beyond `max_in_flight` are counted dropped client side,
        those with no address to send to as failed (``error:no_node``)."""
        out: list[Dispatch] = []
        self.stats.advance(now)
        for j in self.plan.due(now):
            name = self.targets[j].name
            if self._recorder is not None:
                self._recorder.add(j, now)
            if self.in_flight >= self.config.max_in_flight:
                self.stats.dropped(name, now)
                continue
            node = self.picker.pick(addresses, now)
            if node is None:
                self.stats.sent(name, None, now)
                self.stats.finished(name, None, "error:no_node", None, now, NO_NODE_DETAIL)
                continue
            self.in_flight += 1
            self.stats.sent(name, node, now)
            out.append(Dispatch(j, node))
        return out

    def reroute(self, d: Dispatch, now: float, addresses: Sequence[str]) -> Dispatch | None:
        """After node `d.node` refused the connection (the request never reached a server): skip
        that node for a while and send the same request to another one, as a load balancer would
        (None when there is no other). Once per request: a second refusal is a failure."""
        self.picker.connect_failed(d.node, now)
        node = self.picker.pick([a for a in addresses if a != d.node], now)
        if node is None:
            return None
        self.stats.rerouted(self.targets[d.target].name, d.node, node, now)
        return Dispatch(d.target, node)

    def render(self, d: Dispatch) -> SentRequest:
        t, tpl = self.targets[d.target], self._templates[d.target]
        return SentRequest(
            target=t.name,
            node=d.node,
            method=t.method,
            url=_url(d.node, tpl.path.render(self.rng)),
            headers={k: v.render(self.rng) for k, v in tpl.headers.items()},
            body=None if tpl.body is None else tpl.body.render(self.rng),
        )

    def finished(
        self, d: Dispatch, *, status: int | None, error: str | None, latency: float | None, now: float,
        detail: str = "",
    ) -> None:
        """A dispatched request ended with HTTP `status` (and `latency` seconds) or transport
        `error` (``connect``, ``timeout``...; a connect error skips the node for a second);
        `detail`: what a failed one was told (`LoadStats.failures`)."""
        self.in_flight -= 1
        t = self.targets[d.target]
        if status is not None:
            failure = None if t.is_success(status) else str(status)
        else:
            failure = f"error:{error or 'other'}"
            if error == "connect":
                self.picker.connect_failed(d.node, now)
        self.stats.finished(t.name, d.node, failure, latency if status is not None else None, now,
                            detail if failure is not None else "")

    def start_recording(self, now: float) -> None:
        self._recorder = _Recorder([t.name for t in self.targets], float(int(now)))

    def stop_recording(self, now: float) -> Trace:
        if self._recorder is None:
            raise BadRequest("the load generator is not recording")
        trace = self._recorder.trace(now)
        self._recorder = None
        return trace

    def recorded(self, now: float) -> Trace:
        """The trace recorded so far (the recording goes on)."""
        if self._recorder is None:
            raise BadRequest("the load generator is not recording")
        return self._recorder.trace(now)

    @property
    def recording(self) -> bool:
        return self._recorder is not None

    def replay(self, trace: Trace, speed: float, now: float) -> None:
        """Drive the plan from `trace`: its targets must be among the configured ones (by name)."""
        names = {t.name: j for j, t in enumerate(self.targets)}
        unknown = [n for n in trace.targets if n not in names]
        if unknown:
            raise BadRequest(f"the trace has targets the config does not: {', '.join(unknown)}")
        col = {n: c for c, n in enumerate(trace.targets)}
        self.plan.replay(trace, [col.get(t.name) for t in self.targets], speed, now)

    def view(self, *, running: bool, now: float, cpu_percent: float | None) -> LoadView:
        return LoadView(
            running=running,
            paused=self.plan.paused,
            replaying=self.plan.replaying,
            recording=self.recording,
            rate=round(self.plan.rate_at(now), 3),
            ramping_to=self.plan.ramping_to,
            in_flight=self.in_flight,
            max_in_flight=self.config.max_in_flight,
            cpu_percent=cpu_percent,
            total=self.stats.totals("total"),
            targets=[self.stats.totals("target", t.name) for t in self.targets],
            nodes=[self.stats.totals("node", a) for a in self.stats.names("node")],
            skipped_nodes=self.picker.skipped(now),
        )


# -- the asyncio adapter --------------------------------------------------------------------------------

OnResponse = Callable[[str, int, bytes | None, SentRequest], None]
"""``on_response(target_name, status, body, request)``: called for every HTTP answer; `body` is the
response body for targets with ``capture = true``, else None. Exceptions are logged, not raised."""

TICK_SECONDS: Final = 0.01
_CPU_WINDOW: Final = 5.0


class LoadGenerator:
    """Sends the load of `config` to the node HTTP addresses `addresses()` returns (``host:port``
    or a base URL), picked per request round robin (see the module docstring)."""

    def __init__(
        self,
        config: LoadConfig,
        addresses: Callable[[], list[str]],
        *,
        seed: int | None = None,
        on_response: OnResponse | None = None,
        clock: Callable[[], float] = time.time,
        tick: float = TICK_SECONDS,
    ) -> None:
        self._config = config
        self._addresses = addresses
        self._on_response = on_response
        self._clock = clock
        self._tick = tick
        s = seed if seed is not None else config.seed
        self.core = LoadCore(config, now=clock(), rng=random.Random(s))
        self._session: aiohttp.ClientSession | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cpu: deque[tuple[float, float]] = deque()  # (monotonic, thread CPU seconds) samples
        self._cpu_start: tuple[float, float] | None = None

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self._ticker is not None

    async def start(self) -> None:
        """Open the HTTP client and start sending; the schedule's times count from now."""
        if self._ticker is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._config.connections, force_close=False),
            timeout=aiohttp.ClientTimeout(total=self._config.timeout),
            raise_for_status=False,
        )
        self.core.plan.begin(self._clock())
        sample = (time.monotonic(), time.thread_time())
        self._cpu_start = sample
        self._cpu.clear()
        self._cpu.append(sample)
        self._ticker = asyncio.create_task(self._run(), name="forge-load-ticker")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop sending; wait up to `grace` seconds for the requests in flight, cancel the rest."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                self._step()
            except Exception:  # the ticker must not die silently
                log.exception("forge load generator: tick failed")
            await asyncio.sleep(self._tick)

    def _safe_addresses(self) -> list[str]:
        try:
            return list(self._addresses())
        except Exception:
            log.exception("forge load generator: addresses() failed")
            return []

    def _step(self) -> None:
        now = self._clock()
        addresses = self._safe_addresses()
        for d in self.core.tick(now, addresses):
            task = asyncio.create_task(self._send(d))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._sent, d))
        mono = time.monotonic()
        if mono - self._cpu[-1][0] >= 0.5:
            self._cpu.append((mono, time.thread_time()))
            while len(self._cpu) > 2 and mono - self._cpu[1][0] >= _CPU_WINDOW:
                self._cpu.popleft()

    def _sent(self, d: Dispatch, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():  # by stop(), maybe before it ran at all: still no longer in flight
            self.core.finished(d, status=None, error="cancelled", latency=None, now=self._clock())

    async def _send(self, d: Dispatch) -> None:
        req = self.core.render(d)
        status: int | None = None
        error: str | None = None
        detail = ""
        body: bytes | None = None
        started = time.perf_counter()
        latency: float | None = None
        assert self._session is not None
        data = None if req.body is None else req.body.encode()
        try:
            try:
                async with self._session.request(req.method, req.url, headers=req.headers, data=data) as resp:
                    body = await resp.read()
                    status = resp.status
            except aiohttp.ClientConnectorError:
                other = self.core.reroute(d, self._clock(), self._safe_addresses())
                if other is None:
                    raise
                path = req.url[len(_url(d.node, "")):]
                req = msgspec.structs.replace(req, node=other.node, url=_url(other.node, path))
                d = other
                async with self._session.request(req.method, req.url, headers=req.headers, data=data) as resp:
                    body = await resp.read()
                    status = resp.status
            latency = time.perf_counter() - started
        except aiohttp.ClientConnectorError as e:
            error, detail = "connect", str(e)
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            error, detail = "timeout", str(e) or f"no answer within {self._config.timeout:g} s"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            error, detail = "disconnected", str(e) or type(e).__name__
        except aiohttp.ClientError as e:
            error, detail = "other", f"{type(e).__name__}: {e}"
        if status is not None and not self.core.targets[d.target].is_success(status):
            detail = decode_problem(body or b"", status).detail
        self.core.finished(d, status=status, error=error, latency=latency, now=self._clock(), detail=detail)
        if status is not None and self._on_response is not None:
            try:
                captured = body if self.core.targets[d.target].capture else None
                self._on_response(req.target, status, captured, req)
            except Exception:
                log.exception("forge load generator: on_response failed")

    # -- controls

    def set_rate(self, rate: float) -> None:
        self.core.plan.set_rate(rate, self._clock())

    def ramp(self, to: float, seconds: float) -> None:
        self.core.plan.ramp(to, seconds, self._clock())

    def pause(self) -> None:
        self.core.plan.pause(self._clock())

    def resume(self) -> None:
        self.core.plan.resume(self._clock())

    def replay(self, trace: Trace, speed: float = 1.0) -> None:
        """Offer the load of `trace` (per target per second, `speed` times faster) from now on;
        afterwards the configured rate (and schedule) apply again."""
        self.core.replay(trace, speed, self._clock())

    def start_recording(self) -> None:
        """Record the requests offered per target per second from now on (restarts a recording)."""
        self.core.start_recording(self._clock())

    def stop_recording(self) -> Trace:
        return self.core.stop_recording(self._clock())

    def recorded(self) -> Trace:
        """The trace recorded so far, the recording going on (`BadRequest` when not recording)."""
        return self.core.recorded(self._clock())

    # -- views

    def cpu_seconds(self) -> float:
        """CPU seconds the generator's event loop thread used since `start` (0 before)."""
        return 0.0 if self._cpu_start is None else time.thread_time() - self._cpu_start[1]

    def cpu_percent(self) -> float | None:
        """CPU of the generator's event loop thread, % of one core, over the last ~5 s (None
        before a sample). Everything else on the same loop counts too: an upper bound when the
        generator shares its loop (the bench runs it alone)."""
        if not self._cpu:
            return None
        t0, c0 = self._cpu[0]
        dt = time.monotonic() - t0
        if dt <= 0.05:
            return None
        return round(100.0 * (time.thread_time() - c0) / dt, 1)

    def snapshot(self) -> LoadView:
        return self.core.view(running=self.running, now=self._clock(), cpu_percent=self.cpu_percent())

    def failures(self, after: int = 0) -> list[FailedRequest]:
        """The latest failed requests numbered above `after` (`LoadStats.failures`)."""
        return self.core.stats.failures(after)

    @property
    def failure_count(self) -> int:
        return self.core.stats.failure_count

    def series(self, since: float = 0.0) -> list[Point]:
        """Per-second points (total, per target, per node) of the completed seconds since `since`."""
        return self.core.stats.series(since)
