"""The supervisor of Forge's node processes: start, watch, break and heal a local cluster.

`ForgeCluster` starts N real `aether node` processes on loopback (each in its own session, output
to `WORKDIR/node-K.log`, data in `WORKDIR/node-K/data`), polls every node's management API twice
a second and keeps a `ClusterView` (JSON-able; the dashboard and Forge's REST API serve it as is),
records `ForgeEvent`s (its own actions, what changed between two views, and the leader's event
stream), and offers the controls: kill (SIGKILL), crash (SIGSTOP: the process keeps its sockets
open and stops answering, as a crashed machine looks to its peers), graceful stop, restart, kill
the leader, add and remove a member, a rolling restart, and the network and slice faults it asks
the nodes to inject (`/api/v1/faults/...`, nodes started with `--fault-injection`).

The decisions are pure functions, tested without processes: `leader_and_quorum` (from the nodes'
status answers), `node_state` (from the process and the API), `partition_blocks` (groups to
blocked directed links), `diff_events` (two views to events) and `RollingRestart` (the steps of a
rolling restart, time passed in). `ForgeCluster` is the asyncio adapter around them.

Processes are signalled only while Forge still owns them (its `asyncio.subprocess.Process` has no
return code yet), by process group, and `close()` (also run by `async with` on any exception or
cancellation) stops every process Forge started: SIGCONT, SIGTERM, 5 s, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import msgspec

from aether.core.artifact import Artifact
from aether.core.config import PARENT_PID_ENV
from aether.core.errors import BadRequest, StatusError
from aether.core.files import make_private_dirs, open_private_append, write_private
from aether.core.status import NodeStatus
from aether.forge.errors import ForgeConflict, ForgeError, ForgeUnavailable, NodeNotFound

__all__ = [
    "EXTRA_NODE_FLAGS",
    "ClusterView",
    "ControlResult",
    "ForgeCluster",
    "ForgeConflict",
    "ForgeError",
    "ForgeEvent",
    "LinkFault",
    "LinkView",
    "NodeNotFound",
    "NodeView",
    "PlacementView",
    "RollingRestart",
    "RollingStep",
    "SliceFault",
    "cluster_event_message",
    "diff_events",
    "leader_and_quorum",
    "node_state",
    "partition_blocks",
]

log = logging.getLogger("aether.forge")

EXTRA_NODE_FLAGS: Final[tuple[str, ...]] = ("--fault-injection",)
"""Flags every node gets after its own (drop `--fault-injection` here if `aether node` lacks it)."""

SECRET_FILE: Final = "cluster.secret"
API_KEY_FILE: Final = "api.key"
POLL_INTERVAL: Final = 1.0
POLL_TIMEOUT: Final = 1.0
STOP_GRACE: Final = 5.0
EVENTS_KEPT: Final = 1000
DECISIONS_SHOWN: Final = 20
_API: Final = "/api/v1"

NodeState = Literal["starting", "up", "down", "frozen", "stopped", "removed"]


# -- values at the edges ----------------------------------------------------------------------------


class NodeView(msgspec.Struct, kw_only=True):
    id: str
    state: NodeState
    pid: int | None
    member: bool
    leader: bool
    ready: bool
    cluster_address: str
    management_address: str
    http_address: str
    last_seen: float | None  # epoch seconds of its last answer
    restarts: int


class LinkView(msgspec.Struct, kw_only=True):
    src: str
    dst: str
    up: bool  # src sees dst up (from src's status answer)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    blocked: bool = False


class PlacementView(msgspec.Struct, kw_only=True):
    artifact: str
    node: str
    instances: int
    state: str


class ClusterView(msgspec.Struct, kw_only=True):
    time: float
    nodes: list[NodeView]
    leader: str | None
    quorum: bool
    members: list[str]
    epoch: int
    links: list[LinkView]
    placement: list[PlacementView]
    decisions: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    rolling_restart: str | None = None  # what a running rolling restart is doing


class ForgeEvent(msgspec.Struct, kw_only=True):
    seq: int
    time: float
    kind: str
    node: str | None
    message: str


class ControlResult(msgspec.Struct, kw_only=True):
    action: str
    node: str | None
    message: str


class LinkFault(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Faults on one node's outbound frames to one peer (body of `PUT /api/v1/faults/links/{peer}`)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    blocked: bool = False

    def is_clear(self) -> bool:
        return not (self.delay_ms or self.jitter_ms or self.loss or self.blocked)


class SliceFault(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Faults of one artifact's instances on one node (body of `PUT /api/v1/faults/slices/{artifact}`)."""

    error_rate: float = 1.0
    delay_ms: float = 0.0
    unhealthy: bool = False


class _MemberAddress(msgspec.Struct):
    id: str
    address: str


class _Members(msgspec.Struct):
    epoch: int
    members: list[_MemberAddress]


class _SliceInstance(msgspec.Struct):
    node: str
    state: str
    instance_ids: list[int] = []


class _Slice(msgspec.Struct):
    artifact: str
    instances: list[_SliceInstance] = []


# -- pure decisions ---------------------------------------------------------------------------------


def leader_and_quorum(
    statuses: Mapping[str, NodeStatus | None], members: Sequence[str]
) -> tuple[str | None, bool]:
    """The cluster's leader and whether it has quorum, from the status answers of this poll
    (None: the node did not answer).

    The leader is the one named by most answering nodes that report quorum. The cluster has
    quorum when a majority of `members` answered, report quorum and name that leader (a frozen or
    partitioned-away leader that still believes it leads is outvoted by the rest).
    """
    votes: dict[str, int] = {}
    for st in statuses.values():
        if st is not None and st.quorum and st.leader:
            votes[st.leader] = votes.get(st.leader, 0) + 1
    if not votes:
        return None, False
    leader = max(sorted(votes), key=lambda k: votes[k])
    members = list(members) or list(statuses)
    agreeing = sum(
        1
        for nid, st in statuses.items()
        if nid in members and st is not None and st.quorum and st.leader == leader
    )
    return leader, agreeing >= len(members) // 2 + 1


def node_state(
    *,
    process: Literal["running", "exited", "none"],
    frozen: bool,
    answered: bool,
    seen_since_start: bool,
    stop_requested: bool,
    removed: bool,
) -> NodeState:
    """The state of one node from its process and its management API in this poll.

    `seen_since_start`: it answered at least once since its process started (before that, a
    running node that does not answer is still starting, afterwards it is down).
    """
    if removed:
        return "removed"
    if process != "running":
        return "stopped" if stop_requested else "down"
    if frozen:
        return "frozen"
    if answered:
        return "up"
    return "down" if seen_since_start else "starting"


def partition_blocks(groups: Sequence[Sequence[str]], nodes: Sequence[str]) -> set[tuple[str, str]]:
    """The directed links (src, dst) to block so that nodes in different groups cannot reach each
    other; nodes named in no group form one more group. Raises NodeNotFound for an unknown node and
    BadRequest for a node named twice or fewer than two groups in all."""
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        for n in g:
            if n not in nodes:
                raise NodeNotFound(f"no node {n!r} (nodes: {', '.join(nodes)})")
            if n in seen:
                raise BadRequest(f"{n} is named in two groups of the partition")
            seen[n] = i
    rest = [n for n in nodes if n not in seen]
    for n in rest:
        seen[n] = len(groups)
    if len(set(seen.values())) < 2:
        raise BadRequest("a partition needs at least two non-empty groups")
    return {(a, b) for a in nodes for b in nodes if a != b and seen[a] != seen[b]}


def diff_events(prev: ClusterView | None, cur: ClusterView) -> list[tuple[str, str | None, str]]:
    """What changed from `prev` to `cur` as (kind, node, message): node states, the leader, quorum
    and placement."""
    out: list[tuple[str, str | None, str]] = []
    before = {n.id: n for n in prev.nodes} if prev is not None else {}
    for n in cur.nodes:
        old = before.get(n.id)
        if old is None or old.state != n.state:
            if old is None and n.state == "starting":
                continue
            out.append((f"node-{n.state}", n.id, f"{n.id} {n.state}"))
    if prev is None:
        if cur.leader is not None:
            out.append(("leader", cur.leader, f"leader {cur.leader}"))
        return out
    if prev.leader != cur.leader:
        out.append(("leader", cur.leader, f"leader {prev.leader or 'none'} -> {cur.leader or 'none'}"))
    if prev.quorum != cur.quorum:
        out.append(("quorum", None, "quorum regained" if cur.quorum else "quorum lost"))
    old_p = {(p.artifact, p.node): p for p in prev.placement}
    new_p = {(p.artifact, p.node): p for p in cur.placement}
    for key, p in new_p.items():
        o = old_p.get(key)
        if o is None or (o.instances, o.state) != (p.instances, p.state):
            out.append(("placement", p.node, f"{p.artifact} on {p.node}: {p.instances} {p.state}"))
    for key, o in old_p.items():
        if key not in new_p:
            out.append(("placement", o.node, f"{o.artifact} on {o.node}: gone"))
    return out


def cluster_event_message(kind: str, d: Mapping[str, Any]) -> str:
    """The timeline's line for one event of a node's stream (`GET /api/v1/events`): a rollout's
    step as a sentence (`rollout org.demo:place-order 0.1.0 -> 0.1.1 progressing: step 2: ...`),
    any other event as its fields (`key=value`), at most 300 characters."""
    if kind == "rollout" and d.get("artifact"):
        head = f"rollout {d.get('artifact')}"
        if d.get("old_version") and d.get("new_version"):
            head += f" {d['old_version']} -> {d['new_version']}"
        if d.get("strategy"):
            head += f" ({d['strategy']})"
        if d.get("state"):
            head += f" {d['state']}"
        tail = [str(x) for x in (d.get("message"), d.get("reason")) if x not in (None, "")]
        if d.get("weights"):
            tail.append(f"weights {d['weights']}")
        return (head + (": " + "; ".join(tail) if tail else ""))[:300]
    fields = ", ".join(
        f"{k}={v}" for k, v in d.items() if k not in ("type", "time") and v not in (None, "", [], {})
    )
    return f"{kind}: {fields}"[:300]


class RollingStep(msgspec.Struct, kw_only=True):
    action: Literal["restart", "wait", "done", "failed"]
    node: str | None = None
    reason: str = ""


class RollingRestart:
    """The steps of a rolling restart: one node at a time (followers first, the leader last),
    restart it, wait until it is ready again and the cluster has quorum, then the next.

    `next(now, ready, quorum, removed)` says what to do; the caller restarts the node of a
    "restart" step and then calls `restarted(node, now)`. A node that is not ready within
    `step_timeout` seconds of its restart fails the run; a node removed from the cluster meanwhile
    (`removed`) is skipped, whether or not it was restarted already.
    """

    def __init__(self, nodes: Sequence[str], leader: str | None, *, step_timeout: float = 60.0) -> None:
        self.order: list[str] = [n for n in nodes if n != leader]
        if leader is not None and leader in nodes:
            self.order.append(leader)
        self.step_timeout = step_timeout
        self._i = 0
        self._since: float | None = None  # when the current node's restart was done
        self._left_ready = False  # the restarted node was seen not ready (its new process answers)
        self.skipped: list[str] = []  # removed from the cluster before their turn ended

    def next(
        self, now: float, ready: Mapping[str, bool], quorum: bool, removed: Collection[str] = ()
    ) -> RollingStep:
        while self._i < len(self.order) and self.order[self._i] in removed:
            self.skipped.append(self.order[self._i])
            self._i += 1
            self._since = None
        if self._i >= len(self.order):
            done = len(self.order) - len(self.skipped)
            gone = f" ({', '.join(self.skipped)} removed meanwhile)" if self.skipped else ""
            return RollingStep(action="done", reason=f"{done} nodes restarted{gone}")
        node = self.order[self._i]
        if self._since is None:
            if not quorum:
                return RollingStep(action="wait", node=node, reason="waiting for quorum before restarting")
            return RollingStep(action="restart", node=node, reason=f"restart {node}")
        if ready.get(node, False) and quorum:
            self._i += 1
            self._since = None
            return self.next(now, ready, quorum, removed)
        if now - self._since > self.step_timeout:
            return RollingStep(
                action="failed",
                node=node,
                reason=f"{node} not ready with quorum {self.step_timeout:g} s after its restart",
            )
        return RollingStep(action="wait", node=node, reason=f"waiting for {node} to be ready")

    def restarted(self, node: str, now: float) -> None:
        assert node == self.order[self._i], (node, self.order, self._i)
        self._since = now


# -- the adapter ------------------------------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def _wipe(data_dir: Path) -> None:
    """Remove the data directory of a node id from an earlier run (a new node starts empty)."""
    if data_dir.exists():
        shutil.rmtree(data_dir)


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Node:
    """What Forge knows of one node: its ports and paths, its process, what the last poll saw."""

    def __init__(
        self, node_id: str, host: str, ports: tuple[int, int, int], workdir: Path, join: str | None
    ) -> None:
        self.id = node_id
        self.host = host
        self.cluster_port, self.management_port, self.http_port = ports
        self.data_dir = workdir / node_id / "data"
        self.log = workdir / f"{node_id}.log"
        self.join = join  # an added node: the member address it joins through (else --peers)
        self.proc: asyncio.subprocess.Process | None = None
        self.frozen = False
        self.stop_requested = False
        self.removed = False
        self.seen_since_start = False
        self.faults_stale = False  # resumed from a freeze: sync its faults once it answers
        self.restarts = 0
        self.starts = 0
        self.status: NodeStatus | None = None
        self.ready = False
        self.last_seen: float | None = None
        self.state: NodeState = "starting"
        self.log_offset = 0  # where the current run's output starts in the log

    @property
    def cluster_address(self) -> str:
        return _addr(self.host, self.cluster_port)

    @property
    def management_url(self) -> str:
        return f"http://{_addr(self.host, self.management_port)}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def process_state(self) -> Literal["running", "exited", "none"]:
        if self.proc is None:
            return "none"
        return "running" if self.proc.returncode is None else "exited"


class ForgeCluster:
    """N real node processes on loopback, watched and controlled (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        *,
        nodes: int = 5,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        repository: Path | None = None,
        extra_node_args: Sequence[str] = (),
        fault_injection: bool = True,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        if not 1 <= nodes <= 99:
            raise BadRequest(f"nodes must be between 1 and 99 (got {nodes})")
        self.workdir = Path(workdir).absolute()
        self.host = host
        self.size = nodes
        self.env = env
        self.repository = repository
        # EXTRA_NODE_FLAGS (--fault-injection) unless `fault_injection` is off, then the caller's
        self.extra_node_args = [*(EXTRA_NODE_FLAGS if fault_injection else ()), *extra_node_args]
        self.on_progress = on_progress
        self._nodes: dict[str, _Node] = {}
        self._handed_out: set[int] = set()
        self._api_key = ""
        self._secret_file: Path | None = None
        self._api_key_file: Path | None = None
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stream: asyncio.Task[None] | None = None
        self._streaming_from: str | None = None
        self._rolling: asyncio.Task[None] | None = None
        self._rolling_state: str | None = None
        self._events: deque[ForgeEvent] = deque(maxlen=EVENTS_KEPT)
        self._seq = 0
        self._view: ClusterView | None = None
        self._members: list[str] = []
        self._epoch = 0
        self._placement: list[PlacementView] = []
        self._decisions: list[dict[str, Any]] = []
        self._alerts: list[dict[str, Any]] = []
        self._link_faults: dict[tuple[str, str], LinkFault] = {}
        self._slice_faults: dict[tuple[str, str], SliceFault] = {}  # (artifact, node)
        self._closed = False
        self._lock = asyncio.Lock()  # one control at a time changes processes
        self._watchers: set[asyncio.Task[None]] = set()  # one per process: refresh on its exit

    # -- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> ForgeCluster:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def api_key(self) -> str:
        """The bootstrap admin key of the nodes' management APIs (`Authorization: Bearer KEY`)."""
        return self._api_key

    async def start(self, timeout: float = 60.0, on_progress: Callable[[str], None] | None = None) -> None:
        """Start every node and wait until they have quorum and each is ready (`/readyz` 200);
        `on_progress(text)` hears what it is waiting for. The nodes start empty: the data
        directories `WORKDIR/node-K/data` of an earlier run are removed (their members had other
        ports). On a failure the processes started so far run until `close()` (`async with`
        calls it)."""
        if on_progress is not None:
            self.on_progress = on_progress
        if self._nodes:
            raise ForgeConflict("this Forge cluster was started already")
        make_private_dirs(self.workdir)
        self._secret_file = self._ensure_secret()
        self._api_key_file = self.workdir / API_KEY_FILE
        if not self._api_key_file.exists():
            write_private(self._api_key_file, secrets.token_urlsafe(32).encode() + b"\n")
        self._api_key = self._api_key_file.read_text().strip()
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self._api_key}"},
            timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT * 5),
        )
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._nodes = {}
            for k in range(1, self.size + 1):
                nid = f"node-{k}"
                self._nodes[nid] = _Node(nid, self.host, self._pick_ports(), self.workdir, None)
            self._members = list(self._nodes)
            self._progress(f"starting {self.size} nodes in {self.workdir}")
            for n in self._nodes.values():
                _wipe(n.data_dir)  # a new cluster (its ports are new): no state of an earlier run
                await self._spawn(n)
            try:
                await self._wait(
                    lambda: all(n.ready for n in self._nodes.values()) and self._quorum(),
                    deadline - time.monotonic(),
                    "every node ready with quorum",
                    watch=list(self._nodes.values()),
                    progress=True,
                )
                break
            except _PortClash as e:
                self._progress(f"{e}; starting again on other ports")
                for n in self._nodes.values():
                    await self._terminate(n)
                if attempt == 2:
                    raise ForgeError(str(e)) from None
        self._poller = asyncio.create_task(self._poll_loop(), name="forge-poller")
        self._stream = asyncio.create_task(self._follow_events(), name="forge-events")
        self._progress(f"cluster up: leader {self._leader()}")

    async def close(self) -> None:
        """Stop every process Forge started (SIGCONT, SIGTERM, up to 5 s, SIGKILL); idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in (self._rolling, self._poller, self._stream):
            if t is not None and not t.done():
                t.cancel()
        for t in (self._rolling, self._poller, self._stream):
            if t is not None:
                with contextlib.suppress(BaseException):
                    await t
        try:
            await asyncio.gather(*(self._terminate(n) for n in self._nodes.values()))
        finally:
            # whatever happened above (cancelled, a failing wait): no process outlives close()
            for n in self._nodes.values():
                self._signal(n, signal.SIGKILL)
            for t in list(self._watchers):
                t.cancel()
            if self._session is not None:
                await self._session.close()

    def pids(self) -> dict[str, int]:
        """Pids of the node processes Forge started that have not exited (as far as it knows)."""
        return {n.id: n.proc.pid for n in self._nodes.values() if n.proc is not None and n.running}

    # -- state --------------------------------------------------------------------------------------

    def view(self) -> ClusterView:
        """The cluster as the last poll saw it."""
        return self._view if self._view is not None else self._make_view()

    def http_addresses(self) -> list[str]:
        """HOST:PORT of the HTTP router of every node that is up and ready (`/readyz` answered 200
        at the last poll), as a load balancer with readiness probes would pick them: a node that
        is starting, catching up after joining or cut off from the quorum gets no load."""
        return [_addr(n.host, n.http_port) for n in self._nodes.values() if n.state == "up" and n.ready]

    @property
    def events_from(self) -> str | None:
        """The node whose event stream Forge follows now (the leader's; None while connecting):
        cluster events from before it connected are not in `events`."""
        return self._streaming_from

    def events(self, since: int = 0) -> list[ForgeEvent]:
        """The events after `since` (the last 1000 are kept), oldest first."""
        return [e for e in self._events if e.seq > since]

    @property
    def event_count(self) -> int:
        """The latest event's number (0 before any)."""
        return self._seq

    # -- controls -----------------------------------------------------------------------------------

    async def kill(self, node: str) -> ControlResult:
        """SIGKILL the node's process."""
        n = self._live(node, "kill")
        self._event("control", node, f"kill {node}")
        self._signal(n, signal.SIGKILL)
        n.frozen = False
        await self._reap(n, STOP_GRACE)
        self._refresh()
        return ControlResult(action="kill", node=node, message=f"{node} killed (SIGKILL)")

    async def crash(self, node: str) -> ControlResult:
        """SIGSTOP the node: it keeps its sockets open and answers nothing, as a crashed machine."""
        n = self._live(node, "crash")
        if n.frozen:
            raise ForgeConflict(f"{node} is frozen already; restart it to resume it")
        self._event("control", node, f"crash {node} (SIGSTOP)")
        self._signal(n, signal.SIGSTOP)
        n.frozen = True
        self._refresh()
        return ControlResult(action="crash", node=node, message=f"{node} frozen (SIGSTOP)")

    async def stop(self, node: str) -> ControlResult:
        """Stop the node gracefully (SIGTERM; SIGKILL after 5 s)."""
        n = self._live(node, "stop")
        self._event("control", node, f"stop {node}")
        async with self._lock:
            how = await self._terminate(n)
        self._refresh()
        return ControlResult(action="stop", node=node, message=f"{node} {how}")

    async def restart(self, node: str, timeout: float = 60.0) -> ControlResult:
        """Resume a frozen node; start a down or stopped one again; stop and start an up one
        (same ports and data). Returns once the node answers again (or its process runs)."""
        n = self._get(node)
        if n.removed:
            raise ForgeConflict(f"{node} was removed from the cluster; add a new node instead")
        self._event("control", node, f"restart {node}")
        async with self._lock:
            if n.running and n.frozen:
                self._signal(n, signal.SIGCONT)
                n.frozen = False
                # "starting" until it answers again (not "down": nothing failed), and then its
                # faults are synced: those Forge changed or healed while it was frozen never
                # reached it, and its memory still holds the ones from before the freeze
                n.seen_since_start = False
                n.faults_stale = True
                msg = f"{node} resumed (SIGCONT)"
            else:
                if n.running:
                    await self._terminate(n)
                n.restarts += 1
                await self._spawn(n)
                msg = f"{node} started again (pid {n.proc.pid if n.proc else '?'})"
        self._refresh()
        await self._wait(
            lambda: n.seen_since_start and n.status is not None, timeout, f"{node} answers", watch=[n]
        )
        return ControlResult(action="restart", node=node, message=msg)

    async def kill_leader(self) -> ControlResult:
        """SIGKILL the current leader; the result names it."""
        leader = self._leader()
        if leader is None or leader not in self._nodes or not self._nodes[leader].running:
            raise ForgeConflict("there is no leader to kill right now")
        await self.kill(leader)
        return ControlResult(action="kill_leader", node=leader, message=f"leader {leader} killed (SIGKILL)")

    async def add_node(self, timeout: float = 60.0) -> ControlResult:
        """Start a new node that joins through a member, then make it a member
        (`POST /api/v1/cluster/nodes`); returns once it is a member and ready."""
        via = self._answering_member()
        k = (
            max((int(i.rsplit("-", 1)[1]) for i in self._nodes if i.rsplit("-", 1)[1].isdigit()), default=0)
            + 1
        )
        nid = f"node-{k}"
        self._event("control", nid, f"add {nid} (joining through {via.id})")
        for attempt in range(3):
            n = _Node(nid, self.host, self._pick_ports(), self.workdir, via.cluster_address)
            self._nodes[nid] = n
            _wipe(n.data_dir)
            await self._spawn(n)
            try:
                await self._wait(lambda n=n: n.status is not None, timeout, f"{nid} answers", watch=[n])  # type: ignore[misc]
                break
            except _PortClash as e:
                await self._terminate(n)
                if attempt == 2:
                    raise ForgeError(str(e)) from None
        deadline = time.monotonic() + timeout
        body = {"id": nid, "address": n.cluster_address}
        while True:
            target = self._answering_member()
            status, answer = await self._request(target, "POST", f"{_API}/cluster/nodes", body, timeout=15.0)
            if status == 200:
                break
            if time.monotonic() > deadline or status not in (409, 503, 504, 0):
                raise ForgeError(f"adding {nid} failed: {status} {answer}")
            await asyncio.sleep(1.0)
        self._event("member", nid, f"{nid} is a member")
        await self._wait(
            lambda: nid in self._members and n.ready, deadline - time.monotonic(), f"{nid} ready", watch=[n]
        )
        return ControlResult(action="add_node", node=nid, message=f"{nid} added and ready")

    async def remove_node(self, node: str) -> ControlResult:
        """Remove the node from the member set (`DELETE /api/v1/cluster/nodes/{id}`), then stop it."""
        n = self._get(node)
        if n.removed:
            raise ForgeConflict(f"{node} was removed already")
        if self._members and node not in self._members:
            raise ForgeConflict(f"{node} is not a member (members: {', '.join(self._members)})")
        if self._members == [node]:
            raise ForgeConflict(f"{node} is the last member; it cannot be removed")
        self._event("control", node, f"remove {node}")
        via = self._answering_member(exclude=node)
        status, answer = await self._request(
            via, "DELETE", f"{_API}/cluster/nodes/{node}", None, timeout=15.0
        )
        if status != 200:
            raise ForgeConflict(f"removing {node} failed: {status} {answer}")
        async with self._lock:
            n.removed = True
            if n.running:
                await self._terminate(n)
        self._refresh()
        return ControlResult(action="remove_node", node=node, message=f"{node} removed and stopped")

    async def rolling_restart(self, step_timeout: float = 60.0) -> ControlResult:
        """Start a rolling restart in the background (one node at a time, followers first);
        a second one while it runs is refused (409)."""
        if self._rolling is not None and not self._rolling.done():
            raise ForgeConflict("a rolling restart is running already")
        nodes = [n.id for n in self._nodes.values() if not n.removed]
        plan = RollingRestart(nodes, self._leader(), step_timeout=step_timeout)
        self._event("control", None, f"rolling restart of {', '.join(plan.order)}")
        self._rolling = asyncio.create_task(self._run_rolling(plan), name="forge-rolling-restart")
        return ControlResult(
            action="rolling_restart", node=None, message=f"rolling restart of {len(plan.order)} nodes started"
        )

    async def wait_rolling_restart(self) -> str | None:
        """Wait for a running rolling restart; returns how it ended (None if none ran)."""
        if self._rolling is not None:
            await asyncio.shield(self._rolling)
        return self._rolling_state

    async def _run_rolling(self, plan: RollingRestart) -> None:
        try:
            while True:
                ready = {n.id: n.ready for n in self._nodes.values()}
                removed = {n.id for n in self._nodes.values() if n.removed}
                step = plan.next(time.monotonic(), ready, self._quorum(), removed)
                self._rolling_state = step.reason
                if step.action == "done":
                    self._event("rolling", None, f"rolling restart done: {step.reason}")
                    return
                if step.action == "failed":
                    self._event("rolling", step.node, f"rolling restart failed: {step.reason}")
                    return
                if step.action == "restart" and step.node is not None:
                    self._event("rolling", step.node, f"rolling restart: {step.reason}")
                    n = self._nodes[step.node]
                    async with self._lock:
                        if n.running:
                            if n.frozen:
                                self._signal(n, signal.SIGCONT)
                                n.frozen = False
                            await self._terminate(n)
                        n.restarts += 1
                        await self._spawn(n)
                    plan.restarted(step.node, time.monotonic())
                    self._refresh()
                    continue
                await asyncio.sleep(POLL_INTERVAL / 2)
        except asyncio.CancelledError:
            self._rolling_state = "cancelled"
            raise
        except Exception as e:  # reported as an event; the cluster stays
            self._rolling_state = f"failed: {e}"
            self._event("rolling", None, f"rolling restart failed: {e}")

    # -- faults -------------------------------------------------------------------------------------

    async def partition(self, groups: Sequence[Sequence[str]]) -> ControlResult:
        """Block every link between nodes of different groups, both ways (nodes named in no group
        form one more group); other link faults stay."""
        names = [n.id for n in self._nodes.values() if not n.removed]
        blocks = partition_blocks(groups, names)
        self._event("fault", None, "partition " + " | ".join(",".join(g) for g in groups))
        changes: dict[tuple[str, str], LinkFault] = {}
        for src, dst in sorted(blocks):
            old = self._link_faults.get((src, dst), LinkFault())
            changes[(src, dst)] = msgspec.structs.replace(old, blocked=True)
        await self._apply_links(changes)
        return ControlResult(action="partition", node=None, message=f"{len(blocks)} links blocked")

    async def isolate(self, node: str) -> ControlResult:
        """Cut the node off from every other node, both ways."""
        self._get(node)
        r = await self.partition([[node]])
        return ControlResult(action="isolate", node=node, message=f"{node} isolated ({r.message})")

    async def heal(self) -> ControlResult:
        """Clear every link fault on every node (`DELETE /api/v1/faults/links/...`)."""
        self._event("fault", None, "heal all links")
        touched = {src for src, _ in self._link_faults}
        self._link_faults.clear()
        errors = []
        for src in sorted(touched):
            n = self._nodes[src]
            if not n.running or n.frozen:
                continue  # its faults died with it, or are cleared at its restart
            for dst in self._nodes:
                if dst != src:
                    st, ans = await self._request(n, "DELETE", f"{_API}/faults/links/{dst}", None)
                    if st not in (200, 204, 404):
                        errors.append(f"{src}->{dst}: {st} {ans}")
        if errors:
            raise ForgeError("healing failed on " + "; ".join(errors))
        return ControlResult(action="heal", node=None, message="all link faults cleared")

    async def set_link(
        self,
        src: str,
        dst: str,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        both_ways: bool = True,
    ) -> ControlResult:
        """Delay and drop frames from `src` to `dst` (and back, `both_ways`); zeros clear them."""
        self._get(src)
        self._get(dst)
        if src == dst:
            raise BadRequest("a link joins two different nodes")
        if not 0.0 <= loss <= 1.0 or delay_ms < 0 or jitter_ms < 0:
            raise BadRequest("loss must be within 0..1, delay_ms and jitter_ms not negative")
        pairs = [(src, dst), (dst, src)] if both_ways else [(src, dst)]
        changes = {}
        for p in pairs:
            old = self._link_faults.get(p, LinkFault())
            changes[p] = msgspec.structs.replace(old, delay_ms=delay_ms, jitter_ms=jitter_ms, loss=loss)
        self._event(
            "fault",
            src,
            f"link {src}{'<->' if both_ways else '->'}{dst}: delay {delay_ms:g} ms "
            f"(jitter {jitter_ms:g}), loss {loss:g}",
        )
        await self._apply_links(changes)
        return ControlResult(action="set_link", node=src, message=f"{len(pairs)} links set")

    async def fail_slice(
        self,
        artifact: str,
        node: str | None = None,
        error_rate: float = 1.0,
        delay_ms: float = 0.0,
        unhealthy: bool = False,
    ) -> ControlResult:
        """Make the artifact's instances on one node fail (by default the first up node running it).
        `artifact` is full coordinates, ``group:name:version``, as the placement lists them."""
        if not 0.0 <= error_rate <= 1.0 or delay_ms < 0:
            raise BadRequest("error_rate must be within 0..1 and delay_ms not negative")
        artifact = self._slice_coordinates(artifact)
        if node is None:
            running = [p.node for p in self._placement if p.artifact == artifact and p.instances > 0]
            up = [x for x in running if x in self._nodes and self._nodes[x].state == "up"]
            if not up:
                raise NodeNotFound(f"no up node runs {artifact!r}")
            node = up[0]
        n = self._get(node)
        fault = SliceFault(error_rate=error_rate, delay_ms=delay_ms, unhealthy=unhealthy)
        st, ans = await self._request(
            n, "PUT", f"{_API}/faults/slices/{artifact}", msgspec.to_builtins(fault)
        )
        if st == 0:
            raise ForgeUnavailable(f"{node} cannot be reached to fail {artifact}: {ans}")
        if st not in (200, 201, 204):  # the node's own refusal (e.g. 400), with its status
            detail = ans.get("detail", ans) if isinstance(ans, dict) else ans
            raise StatusError(f"{node} refused the slice fault on {artifact}: {detail}", status=st)
        # the timeline says the fault is in place only once it is
        self._event(
            "fault",
            node,
            f"fail slice {artifact} on {node}: error rate {error_rate:g}, "
            f"delay {delay_ms:g} ms{', unhealthy' if unhealthy else ''}",
        )
        self._slice_faults[(artifact, node)] = fault
        return ControlResult(action="fail_slice", node=node, message=f"{artifact} fails on {node}")

    async def heal_slice(self, artifact: str) -> ControlResult:
        """Clear the artifact's slice faults on every node Forge set them on."""
        artifact = self._slice_coordinates(artifact)
        nodes = sorted(nd for (a, nd) in self._slice_faults if a == artifact)
        self._event("fault", None, f"heal slice {artifact}")
        for nd in nodes:
            del self._slice_faults[(artifact, nd)]
            n = self._nodes[nd]
            if n.running and not n.frozen:
                await self._request(n, "DELETE", f"{_API}/faults/slices/{artifact}", None)
        return ControlResult(
            action="heal_slice", node=None, message=f"{artifact} healed on {len(nodes)} nodes"
        )

    def _slice_coordinates(self, artifact: str) -> str:
        """`artifact` as ``group:name:version`` (slice faults are per deployed version); a
        BadRequest naming the deployed versions when it is not, e.g. ``org.demo:place-order``."""
        try:
            Artifact.parse(artifact)
            return artifact.strip()
        except BadRequest as e:
            name = ":".join(artifact.strip().split(":")[:2])
            deployed = sorted({p.artifact for p in self._placement if p.artifact.startswith(f"{name}:")})
            hint = f"; deployed: {', '.join(deployed)}" if deployed else ""
            raise BadRequest(f"slice faults need the version: {e}{hint}") from None

    async def update(self, artifact: str, version: str, strategy: str | None = None) -> ControlResult:
        """Start a rollout of `artifact` (``group:name``; a version in it is ignored) to `version`
        through the management API (`POST /api/v1/rollouts`), with the blueprint's rollout settings
        or `strategy`. Its steps then show as `cluster:rollout` events; the node's refusals (400 a
        bad version or an artifact no blueprint lists, 409 another rollout runs) are StatusErrors
        with its status and detail."""
        name = ":".join(artifact.split(":")[:2])
        if not version.strip():
            raise BadRequest("version must not be empty")
        body: dict[str, Any] = {"artifact": name, "version": version.strip()}
        if strategy:
            body["strategy"] = strategy
        self._event("control", None, f"update {name} to {body['version']}"
                    + (f" ({strategy})" if strategy else ""))
        status, started = await self.api_status("POST", f"{_API}/rollouts", body)
        old = started.get("old_version") if isinstance(started, dict) else None
        how = started.get("strategy") if isinstance(started, dict) else strategy
        state = started.get("state") if isinstance(started, dict) else None
        what = f"rollout of {name} {old or '?'} -> {body['version']} ({how or 'rolling'})"
        # 200: a rollout to that version already existed (this update repeated an earlier one)
        return ControlResult(
            action="update", node=None,
            message=f"{what} started" if status == 201 else f"{what} already {state or 'started'}",
        )

    def link_faults(self) -> dict[tuple[str, str], LinkFault]:
        """The link faults Forge set, by (src, dst)."""
        return dict(self._link_faults)

    async def _apply_links(self, changes: Mapping[tuple[str, str], LinkFault]) -> None:
        errors = []
        for (src, dst), fault in changes.items():
            if fault.is_clear():
                self._link_faults.pop((src, dst), None)
            else:
                self._link_faults[(src, dst)] = fault
            n = self._nodes[src]
            if not n.running or n.frozen:
                continue  # applied when it is up again
            errors += await self._send_link(n, dst, fault)
        if errors:
            raise ForgeError("the fault API refused: " + "; ".join(errors))

    async def _send_link(self, n: _Node, dst: str, fault: LinkFault) -> list[str]:
        if fault.is_clear():
            st, ans = await self._request(n, "DELETE", f"{_API}/faults/links/{dst}", None)
            ok = st in (200, 204, 404)
        else:
            st, ans = await self._request(n, "PUT", f"{_API}/faults/links/{dst}", msgspec.to_builtins(fault))
            ok = st in (200, 201, 204)
        return [] if ok else [f"{n.id}->{dst}: {st} {ans}"]

    async def _reapply_faults(self, n: _Node) -> None:
        """A node's faults live in its memory: give a restarted node those Forge set."""
        errs: list[str] = []
        for (src, dst), fault in list(self._link_faults.items()):
            if src == n.id:
                errs += await self._send_link(n, dst, fault)
        for (artifact, nd), sf in list(self._slice_faults.items()):
            if nd == n.id:
                st, ans = await self._request(
                    n, "PUT", f"{_API}/faults/slices/{artifact}", msgspec.to_builtins(sf)
                )
                if st not in (200, 201, 204):
                    errs.append(f"slice {artifact}: {st} {ans}")
        if errs:
            self._event("fault", n.id, f"re-applying faults to {n.id} failed: {'; '.join(errs)}")
        elif any(src == n.id for src, _ in self._link_faults) or any(
            nd == n.id for _, nd in self._slice_faults
        ):
            self._event("fault", n.id, f"faults re-applied to {n.id}")

    # -- internals: processes -----------------------------------------------------------------------

    def _ensure_secret(self) -> Path:
        from aether.transport.auth import generate_secret, write_secret_file

        path = self.workdir / SECRET_FILE
        if not path.exists():
            write_secret_file(path, generate_secret())
        return path

    def _pick_ports(self) -> tuple[int, int, int]:
        """Three free ports below the kernel's ephemeral range (a port the kernel picks for an
        outgoing connection can never take one between this probe and the node's bind)."""
        lo, hi = 10_000, max(_ephemeral_low(), 20_000)
        out: list[int] = []
        for _ in range(10_000):
            p = random.randrange(lo, hi)
            if p not in self._handed_out and _bindable(self.host, p):
                self._handed_out.add(p)
                out.append(p)
                if len(out) == 3:
                    return out[0], out[1], out[2]
        raise ForgeError(f"no 3 free ports found in {lo}-{hi}")

    def _argv(self, n: _Node) -> list[str]:
        if n.join is not None:
            where = ["--join", n.join]
        else:
            peers = ",".join(f"{m.id}={m.cluster_address}" for m in self._nodes.values() if m.join is None)
            where = ["--peers", peers]
        return [
            sys.executable, "-m", "aether.cli.main", "node", "--id", n.id, *where,
            "--host", self.host, "--cluster-port", str(n.cluster_port),
            "--management-port", str(n.management_port), "--http-port", str(n.http_port),
            "--data-dir", str(n.data_dir), "--fsync", "snapshot",
            "--api-key-file", str(self._api_key_file), *self.extra_node_args,
        ]  # fmt: skip

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop("AETHER_CLUSTER_SECRET", None)
        env.pop("AETHER_API_KEY", None)
        env["AETHER_CLUSTER_SECRET_FILE"] = str(self._secret_file)
        env[PARENT_PID_ENV] = str(os.getpid())  # the nodes stop themselves if Forge dies (SIGKILL)
        if self.repository is not None:
            env["AETHER_REPOSITORY"] = str(self.repository)
        return env

    async def _spawn(self, n: _Node) -> None:
        make_private_dirs(n.data_dir)
        with open_private_append(n.log) as logf:
            stamp = time.strftime("%H:%M:%S")
            logf.write(f"\n=== aether forge: {n.id} start {n.starts + 1} at {stamp} ===\n".encode())
            logf.flush()
            n.log_offset = logf.tell()
            n.proc = await asyncio.create_subprocess_exec(
                *self._argv(n),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=self._child_env(),
            )
        self._watch_exit(n, n.proc)
        n.starts += 1
        n.frozen = n.stop_requested = n.seen_since_start = n.ready = n.faults_stale = False
        n.status = None
        n.state = "starting"
        log.debug("started %s pid %d", n.id, n.proc.pid)

    def _watch_exit(self, n: _Node, proc: asyncio.subprocess.Process) -> None:
        """Refresh the view the moment the process exits (not at the next poll)."""

        async def watch() -> None:
            await proc.wait()
            if n.proc is proc and not self._closed:
                n.status, n.ready = None, False
                self._refresh()

        task = asyncio.create_task(watch(), name=f"forge-exit-{n.id}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _signal(self, n: _Node, sig: int) -> None:
        """Signal the node's process group, only while its process is ours (not reaped)."""
        if n.proc is None or n.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(n.proc.pid, sig)

    async def _reap(self, n: _Node, timeout: float) -> bool:
        if n.proc is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(n.proc.wait()), timeout)
            return True
        except TimeoutError:
            return False

    async def _terminate(self, n: _Node) -> str:
        """SIGCONT (if frozen), SIGTERM, up to 5 s, SIGKILL. Returns what it took."""
        if not n.running:
            return "not running"
        n.stop_requested = True
        self._signal(n, signal.SIGCONT)
        n.frozen = False
        self._signal(n, signal.SIGTERM)
        if await self._reap(n, STOP_GRACE):
            return "stopped"
        self._signal(n, signal.SIGKILL)
        await self._reap(n, STOP_GRACE)
        return "killed (did not stop within 5 s)"

    def _log_tail(self, n: _Node, lines: int = 20) -> str:
        try:
            with open(n.log, "rb") as f:
                f.seek(n.log_offset)
                data = f.read()[-16384:]
        except OSError as e:
            return f"(cannot read {n.log}: {e})"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # -- internals: lookups -------------------------------------------------------------------------

    def _get(self, node: str) -> _Node:
        n = self._nodes.get(node)
        if n is None:
            raise NodeNotFound(f"no node {node!r} (nodes: {', '.join(self._nodes)})")
        return n

    def _live(self, node: str, what: str) -> _Node:
        n = self._get(node)
        if not n.running:
            raise ForgeConflict(f"cannot {what} {node}: it is {n.state}, not running")
        return n

    def _leader(self) -> str | None:
        return (
            self._view.leader
            if self._view is not None
            else leader_and_quorum(self._statuses(), self._members)[0]
        )

    def _quorum(self) -> bool:
        return leader_and_quorum(self._statuses(), self._members)[1]

    def _statuses(self) -> dict[str, NodeStatus | None]:
        return {n.id: n.status for n in self._nodes.values() if not n.removed}

    def _answering_member(self, exclude: str | None = None) -> _Node:
        leader = self._leader()
        cands = [
            n
            for n in self._nodes.values()
            if n.status is not None
            and n.id != exclude
            and not n.removed
            and (not self._members or n.id in self._members)
            and n.running
            and not n.frozen
        ]
        if not cands:
            raise ForgeConflict("no member answers right now")
        cands.sort(key=lambda n: n.id != leader)
        return cands[0]

    async def api(self, method: str, path: str, body: object | None = None, *, timeout: float = 30.0) -> Any:
        """One management API call on an answering member (the leader first): the decoded answer,
        or a StatusError with the node's status and problem detail (503 when none answers)."""
        return (await self.api_status(method, path, body, timeout=timeout))[1]

    async def api_status(
        self, method: str, path: str, body: object | None = None, *, timeout: float = 30.0
    ) -> tuple[int, Any]:
        """`api`, with the status the node answered (below 400)."""
        n = self._answering_member()
        st, ans = await self._request(n, method, path, body, timeout=timeout)
        if st == 0:
            raise ForgeUnavailable(str(ans))
        if st >= 400:
            detail = ans.get("detail", ans) if isinstance(ans, dict) else ans
            raise StatusError(f"{method} {path} on {n.id}: {detail}", status=st)
        return st, ans

    def _progress(self, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(text)

    def _event(self, kind: str, node: str | None, message: str) -> None:
        self._seq += 1
        self._events.append(
            ForgeEvent(seq=self._seq, time=time.time(), kind=kind, node=node, message=message)
        )

    # -- internals: polling -------------------------------------------------------------------------

    async def _request(
        self, n: _Node, method: str, path: str, body: object | None, *, timeout: float = 3.0
    ) -> tuple[int, Any]:
        """(status, decoded JSON answer or text) of one management API request; (0, reason) when
        the node cannot be reached."""
        assert self._session is not None
        try:
            async with self._session.request(
                method, n.management_url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                raw = await resp.read()
                try:
                    return resp.status, json.loads(raw) if raw else None
                except ValueError:
                    return resp.status, raw.decode(errors="replace")[:500]
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return 0, f"{n.id} unreachable: {e!r}"

    async def _poll_node(self, n: _Node) -> None:
        if not n.running or n.frozen:
            n.status, n.ready = None, False
            return
        st, ans = await self._request(n, "GET", f"{_API}/status", None, timeout=POLL_TIMEOUT)
        status: NodeStatus | None = None
        if st == 200:
            with contextlib.suppress(msgspec.ValidationError, TypeError):
                status = msgspec.convert(ans, NodeStatus)
        if status is None or status.node_id != n.id or n.frozen or not n.running:
            n.status, n.ready = None, False
            return
        rd, _ = await self._request(n, "GET", "/readyz", None, timeout=POLL_TIMEOUT)
        first = not n.seen_since_start
        n.status, n.ready, n.last_seen, n.seen_since_start = status, rd == 200, time.time(), True
        if first and n.faults_stale:  # resumed: clear what it still holds, then give it Forge's
            n.faults_stale = False
            cst, cans = await self._request(n, "DELETE", f"{_API}/faults", None)
            if cst not in (200, 204):
                self._event("fault", n.id, f"clearing {n.id}'s old faults failed: {cst} {cans}")
            await self._reapply_faults(n)
        elif first and n.starts > 1:
            await self._reapply_faults(n)

    async def _poll_once(self) -> None:
        await asyncio.gather(*(self._poll_node(n) for n in self._nodes.values() if not n.removed))
        leader = leader_and_quorum(self._statuses(), self._members)[0]
        src = self._nodes.get(leader) if leader else None
        if src is None or src.status is None:
            src = next((n for n in self._nodes.values() if n.status is not None), None)
        if src is not None:
            await self._poll_cluster(src)
        self._refresh()

    async def _poll_cluster(self, src: _Node) -> None:
        (ms, members), (ss, slices), (ds, decisions), (als, alerts) = await asyncio.gather(
            self._request(src, "GET", f"{_API}/cluster/members", None, timeout=POLL_TIMEOUT),
            self._request(src, "GET", f"{_API}/slices", None, timeout=POLL_TIMEOUT),
            self._request(
                src, "GET", f"{_API}/controller/decisions?limit={DECISIONS_SHOWN}", None, timeout=POLL_TIMEOUT
            ),
            self._request(src, "GET", f"{_API}/alerts", None, timeout=POLL_TIMEOUT),
        )
        if ms == 200:
            with contextlib.suppress(msgspec.ValidationError, TypeError):
                m = msgspec.convert(members, _Members)
                self._members, self._epoch = [x.id for x in m.members], m.epoch
        if ss == 200:
            with contextlib.suppress(msgspec.ValidationError, TypeError):
                self._placement = [
                    PlacementView(
                        artifact=s.artifact, node=i.node, instances=len(i.instance_ids), state=i.state
                    )
                    for s in msgspec.convert(slices, list[_Slice])
                    for i in s.instances
                ]
        if ds == 200 and isinstance(decisions, list):
            self._decisions = [d for d in decisions if isinstance(d, dict)][-DECISIONS_SHOWN:]
        if als == 200 and isinstance(alerts, dict):
            self._alerts = [a for a in alerts.get("alerts", []) if isinstance(a, dict)]

    def _refresh(self) -> None:
        """Recompute every node's state and the view; record what changed as events."""
        for n in self._nodes.values():
            n.state = node_state(
                process=n.process_state(),
                frozen=n.frozen,
                answered=n.status is not None,
                seen_since_start=n.seen_since_start,
                stop_requested=n.stop_requested,
                removed=n.removed,
            )
        view = self._make_view()
        for kind, node, message in diff_events(self._view, view):
            self._event(kind, node, message)
        self._view = view

    def _make_view(self) -> ClusterView:
        statuses = self._statuses()
        leader, quorum = leader_and_quorum(statuses, self._members)
        members = self._members
        links: list[LinkView] = []
        live = [n for n in self._nodes.values() if not n.removed]
        for a in live:
            seen = {m.id: m.state == "up" for m in a.status.nodes} if a.status is not None else {}
            for b in live:
                if a.id == b.id:
                    continue
                f = self._link_faults.get((a.id, b.id), LinkFault())
                links.append(
                    LinkView(
                        src=a.id,
                        dst=b.id,
                        up=seen.get(b.id, False),
                        delay_ms=f.delay_ms,
                        jitter_ms=f.jitter_ms,
                        loss=f.loss,
                        blocked=f.blocked,
                    )
                )
        return ClusterView(
            time=time.time(),
            nodes=[
                NodeView(
                    id=n.id,
                    state=n.state,
                    pid=n.proc.pid if n.proc is not None and n.running else None,
                    member=n.id in members,
                    leader=n.id == leader,
                    ready=n.ready,
                    cluster_address=n.cluster_address,
                    management_address=_addr(n.host, n.management_port),
                    http_address=_addr(n.host, n.http_port),
                    last_seen=n.last_seen,
                    restarts=n.restarts,
                )
                for n in self._nodes.values()
            ],
            leader=leader,
            quorum=quorum,
            members=list(members),
            epoch=self._epoch,
            links=links,
            placement=list(self._placement),
            decisions=list(self._decisions),
            alerts=list(self._alerts),
            rolling_restart=self._rolling_state
            if self._rolling is not None and not self._rolling.done()
            else None,
        )

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed poll is retried; Forge stays up
                log.exception("forge poll failed")
            await asyncio.sleep(max(0.05, POLL_INTERVAL - (loop.time() - started)))

    async def _wait(
        self,
        cond: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        watch: Iterable[_Node] = (),
        progress: bool = False,
    ) -> None:
        """Poll (if the poller does not run) until `cond()`; raise ForgeError with the log tail of
        a watched node whose process exits, or after `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        watch = list(watch)
        last = ""
        while True:
            if self._poller is None or self._poller.done():
                await self._poll_once()
            if cond():
                return
            for n in watch:
                if n.proc is not None and n.proc.returncode is not None and not n.stop_requested:
                    tail = self._log_tail(n)
                    msg = f"{n.id} (pid {n.proc.pid}) exited with code {n.proc.returncode} before {what}"
                    if "address already in use" in tail.lower() or "errno 98" in tail.lower():
                        raise _PortClash(msg)
                    raise ForgeError(f"{msg}; the end of {n.log}:\n{tail}")
            if loop.time() > end:
                states = ", ".join(
                    f"{n.id} {n.state}{' ready' if n.ready else ''}" for n in self._nodes.values()
                )
                raise ForgeError(f"not {what} within {timeout:.0f} s ({states})")
            if progress:
                text = ", ".join(f"{n.id} {n.state}" for n in self._nodes.values())
                if text != last:
                    self._progress(text)
                    last = text
            await asyncio.sleep(POLL_INTERVAL / 2)

    # -- internals: the cluster's event stream ------------------------------------------------------

    async def _follow_events(self) -> None:
        """Follow `GET /api/v1/events` of the leader, reconnecting when the stream ends or the
        leader moves (checked twice a second, so a frozen leader's silent stream is left at once);
        each event becomes a ForgeEvent `cluster:TYPE`."""
        while True:
            leader = self._leader()
            src = self._nodes.get(leader) if leader else None
            if src is None or src.status is None:
                await asyncio.sleep(POLL_INTERVAL)
                continue
            reader = asyncio.create_task(self._read_events(src), name=f"forge-events-{src.id}")
            try:
                while not reader.done() and self._leader() == src.id and src.running and not src.frozen:
                    await asyncio.wait({reader}, timeout=POLL_INTERVAL)
            finally:
                if not reader.done():
                    reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            await asyncio.sleep(POLL_INTERVAL)

    async def _read_events(self, src: _Node) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                src.management_url + f"{_API}/events",
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=30.0),
            ) as resp:
                if resp.status != 200:
                    await asyncio.sleep(2.0)
                    return
                event = ""
                async for raw in resp.content:
                    line = raw.decode(errors="replace").rstrip("\r\n")
                    if line.startswith("event:"):
                        event = line[6:].strip()
                        if event == "hello":
                            self._streaming_from = src.id
                    elif line.startswith("data:") and event not in ("hello", ""):
                        self._cluster_event(event, line[5:].strip())
                    elif not line:
                        event = ""
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        finally:
            if self._streaming_from == src.id:
                self._streaming_from = None

    def _cluster_event(self, kind: str, data: str) -> None:
        try:
            d = json.loads(data)
        except ValueError:
            return
        if not isinstance(d, dict):
            return
        node = d.get("node") if isinstance(d.get("node"), str) else None
        self._event(f"cluster:{kind}", node, cluster_event_message(kind, d))


class _PortClash(ForgeError):
    """A node could not bind a port Forge picked (another program took it meanwhile)."""
