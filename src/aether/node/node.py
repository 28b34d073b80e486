"""`Node`: assembles and runs every component of one cluster member."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, Union

import msgspec

from aether import __version__
from aether.cluster.leader import LeaderChanged, LeaderManager
from aether.consensus.engine import EngineConfig, MembersChanged, MembershipRefused
from aether.consensus.messages import MemberChange, MemberResult, RabiaMessage
from aether.consensus.runner import ConsensusRunner
from aether.consensus.storage import DiskStore, JournalError
from aether.controller.recording import ObservationRecorder
from aether.controller.service import ControllerService
from aether.controller.types import CONTROLLER_MESSAGE_TYPES, ControllerMessage
from aether.core.artifact import Artifact
from aether.core.config import NodeConfig
from aether.core.context import current_node_id
from aether.core.errors import BadRequest, CommitTimeout, ConfigError, QuorumLost, StatusError
from aether.core.files import prepare_private_dir
from aether.core.logs import LogBuffer
from aether.core.status import KVEntry, MemberStatus, NodeStatus
from aether.core.tracing import Tracer
from aether.core.types import Address, check_node_id, open_management_api_problem
from aether.deploy import (
    ClusterDeploymentManager,
    DeploymentService,
    EndpointRegistry,
    NodeDeploymentManager,
    SliceState,
)
from aether.deploy.admission import InstanceLimits
from aether.deploy.config import SliceConfigs, slices_of
from aether.deploy.traffic import TrafficTable
from aether.etcd import EtcdStore
from aether.http import HttpRouter
from aether.invoke import INVOKE_MESSAGE_TYPES, InvokeMessage, Invoker, InvokeServer, StoreCatalog
from aether.kv.keys import BlueprintValue, NodeInfoKey, NodeInfoValue, RolloutValue
from aether.kv.machine import Command, KVStateMachine, Result
from aether.kv.protocol import (
    ClientMembers,
    ClientMessage,
    ClientReadLocal,
    ClientRequest,
    ClientResponse,
    MembersInfo,
    client_key_refusal,
)
from aether.kv.store import KVStore
from aether.maps import MAP_MESSAGE_TYPES, MapMessage, MapService
from aether.metrics import METRICS_MESSAGE_TYPES, MetricsMessage, MetricsService
from aether.metrics.cluster import ClusterFigures, MapFigures
from aether.metrics.collector import BUCKET_BOUNDS
from aether.metrics.messages import ClusterMetricsSnapshot, InstanceCounters, InstanceStats, SliceLoad
from aether.node.etcd_wiring import EtcdLeaderManager, EtcdMembership, client_command, etcd_config
from aether.node.faults import FaultInjector
from aether.node.looplag import LoopLagProbe
from aether.node.tracing import make_tracer
from aether.repository.cache import ClusterRepository
from aether.repository.service import ArtifactService
from aether.slices.capacity import SliceLimits
from aether.slices.isolation import BlockPolicy, BlockReport, SliceBlockedNotice
from aether.slices.repository import Repository
from aether.slices.runtime import SliceRuntime
from aether.transport import ClientSession, DuplicateNode, EventBus, PeerDown, PeerUp, Transport
from aether.transport.auth import load_secret
from aether.transport.framing import DEFAULT_MAX_FRAME
from aether.transport.tcp import open_cluster_port_problem
from aether.transport.tls import https_context, tls_files

_cmd_decoder = msgspec.msgpack.Decoder(Command)
_result_encoder = msgspec.msgpack.Encoder()
PeerMessage = Union[  # noqa: UP007 - a runtime Union for the transport
    RabiaMessage, InvokeMessage, MapMessage, MetricsMessage, ControllerMessage
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": msgspec.json.decode(msgspec.json.encode(value))}
    return msgspec.to_builtins(value)


class _NodeInvoker:
    """The node's invoker, for the slice runtime, which is built before it (see `Node.__init__`)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def invoke(
        self, target: str, method: str, payload: bytes, *, request_id: str | None = None,
        timeout: float | None = None, idempotency_key: str | None = None,
    ) -> bytes:
        invoker = self._node.invoker
        return await invoker.invoke(
            target, method, payload, request_id=request_id, timeout=timeout, idempotency_key=idempotency_key
        )

    def direct_ready(self, target: str, method: str, timeout: float | None) -> float | None:
        """`Invoker.direct_ready` (calls between slices on the node's shared loop)."""
        return self._node.invoker.direct_ready(target, method, timeout)

    def direct_error(
        self, exc: BaseException | None, target: str, method: str, rid: str, *, expired: bool = False
    ) -> Exception | None:
        """`Invoker.direct_error`."""
        return self._node.invoker.direct_error(exc, target, method, rid, expired=expired)


class _ControllerMetrics:
    """The node's metrics as the controller reads them (`aether.controller.service.MetricsInputs`)."""

    def __init__(self, metrics: MetricsService) -> None:
        self._metrics = metrics

    def snapshot(self) -> ClusterMetricsSnapshot | None:
        return self._metrics.latest

    def slice_loads(self) -> dict[str, SliceLoad]:
        return self._metrics.aggregator.slice_loads(time.monotonic())

    def instance_stats(self) -> list[InstanceStats]:
        return self._metrics.aggregator.instance_stats(time.monotonic())


class HostedAPI(Protocol):
    """The management API server a node hosts (`aether.api.server.ManagementServer`)."""

    @property
    def port(self) -> int: ...

    @property
    def url(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def listen_problem(config: NodeConfig, *, management: bool) -> str | None:
    """Why the node of `config` must not start, from its configuration alone: a cluster port
    beyond loopback with nothing to prove (no cluster secret, no mutual TLS), or, when it runs the
    management API (`management`), that API beyond loopback without an API key; else None.
    `run_node` asks before it locks or writes the data directory (a refused start used to leave
    a new ``node.lock`` and ``consensus/incarnation`` behind), `Node.start` again. ConfigError for
    an unreadable secret or TLS file."""
    secret = load_secret(config.cluster_secret, config.cluster_secret_file)
    proves = secret is not None or tls_files(config) is not None
    problem = open_cluster_port_problem(config.host, authenticated=proves)
    if problem is None and management:
        problem = open_management_api_problem(config.host, config.api_key)
    return problem


async def _check_can_listen(what: str, host: str, port: int) -> None:
    """OSError naming `what` when host:port cannot be bound now (another process listens there, the
    address is not this host's); port 0 (a free port) always can. Binds as asyncio's servers do
    (SO_REUSEADDR, IPv6 only on IPv6 sockets) and closes at once."""
    if port == 0:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise OSError(getattr(e, "errno", None), f"{what} cannot listen on {host}:{port}: {e}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise OSError(e.errno, f"{what} cannot listen on {host}:{port}: {e.strerror or e}") from None


class ManagementFactory(Protocol):
    """Builds the management server for a node: `aether.api.server.ManagementServer` itself."""

    def __call__(
        self, node: Any, *, host: str, port: int, api_key: str | None, idle_timeout: float,
        ssl_context: ssl.SSLContext | None, logger: logging.Logger, metrics_public: bool = False,
    ) -> HostedAPI: ...


class Node:
    """A cluster member. `await start()`, then serve until `await stop()`.

    `management_api` builds the management API server the node hosts (the `aether node` command
    passes `aether.api.server.ManagementServer`); without it the node runs no management API. The API
    sits above the node in the layering, so it is handed in rather than imported.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        logger: logging.Logger | None = None,
        management_api: ManagementFactory | None = None,
        tracer: Tracer | None = None,
        own_process: bool = False,
    ) -> None:
        self.config = config.validate()
        self.node_id = config.node_id
        # spans of the router, the invoker, the invoke server and the maps (docs/operations.md,
        # *Tracing*): the given tracer (tests), else the one config.tracing asks for, else none
        self.tracer: Tracer = tracer if tracer is not None else make_tracer(
            config.tracing, config.cluster_name, config.node_id, config.otlp_endpoint
        )
        self.log = logger or logging.getLogger(f"aether.node.{self.node_id}")
        # the recent log records of this node (`GET /api/v1/logs`, docs/operations.md *Logs*);
        # `own_process`: the only node of its process, so records of no node are its own too
        self.logs = LogBuffer(self.node_id, max_records=config.log_buffer, claim_all=own_process)
        self._own_process = own_process
        # `stop()` has begun: the router drains (up to 5 s) while the management API still answers,
        # and `/readyz` says the node is stopping (a load balancer sends nothing new here)
        self.stopping = False
        self.members = {p.id: p.address for p in config.peers}
        self.bus = EventBus(self.log)
        self.sm = KVStateMachine()
        # the journal holds the whole KV, map files the maps: the data dir is for this user only
        prepare_private_dir(config.data_path, self.log)
        # the cluster state store: the embedded Rabia consensus (runner + journal), or etcd
        # (`store = "etcd"`: no runner, no journal; members and leader from etcd, etcd_wiring.py)
        self.store: DiskStore | None = None
        self.runner: ConsensusRunner | None = None
        self.etcd_members: EtcdMembership | None = None
        self._client_tasks: set[asyncio.Task[None]] = set()  # clients' commands on the etcd store
        self.waiting_for_store = False  # start() waits for etcd's first answer (etcd store)
        self.kv: KVStore | EtcdStore
        self.leader: LeaderManager
        if config.store == "etcd":
            self._make_etcd_store()
        else:
            self.store = DiskStore(config.data_path / "consensus", config.fsync)
            self.runner = ConsensusRunner(
                self.node_id,
                list(self.members),
                self.sm,
                self.store,
                seed=config.cluster_name.encode(),
                # no message larger than the transport's max_frame (the default, on every node)
                config=EngineConfig(
                    snapshot_every=config.snapshot_every, max_message_bytes=DEFAULT_MAX_FRAME
                ),
                logger=logging.getLogger(f"aether.consensus.{self.node_id}"),
                learner=config.join is not None,
            )
            self.runner.on_members.append(self._on_members_changed)
            self.kv = KVStore(self.runner, self.sm, self.node_id)
            self.leader = LeaderManager(self.node_id, list(self.members))
        self._candidates: dict[str, Address] = {}  # nodes being added: dialed before they commit
        # members the latest change removed: still linked (as learners) until the next change, so a
        # removed node that was cut off mid-slot still learns that it was removed
        self._retired: dict[str, Address] = {}
        self._epoch_seen = -1
        self.leader.listeners.append(self._on_leader_change)
        own = self.members[self.node_id]
        secret = load_secret(config.cluster_secret, config.cluster_secret_file)
        tls = tls_files(config)
        self.https = https_context(config)  # the management API and the router serve HTTPS with it
        self.transport = Transport(
            self.node_id,
            self.members,
            listen=Address(config.host, config.cluster_port or own.port),
            cluster_name=config.cluster_name,
            message_type=PeerMessage,
            on_message=self._on_peer_message,
            bus=self.bus,
            client_message_type=ClientMessage,
            on_client_message=self._on_client_message,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout=config.heartbeat_timeout,
            logger=logging.getLogger(f"aether.transport.{self.node_id}"),
            secret=secret,
            tls=tls,
            max_connections=config.max_connections,
            max_connections_per_host=config.max_connections_per_host,
            max_buffered_bytes=config.max_buffered_bytes,
            pre_auth_max_frame=config.pre_auth_max_frame,
            handshake_timeout=config.handshake_timeout,
        )
        self.bus.subscribe(PeerUp, self._on_peer_up)
        self.bus.subscribe(PeerDown, self._on_peer_down)
        # this node's id already runs in the cluster as another process (the members say so): this
        # process must stop; `duplicate` says why and `on_fatal` callbacks stop it (`aether node`
        # then exits with status 2)
        self.duplicate: str | None = None
        self.on_fatal: list[Callable[[], None]] = []
        self.bus.subscribe(DuplicateNode, self._on_duplicate)

        # slices, invocation and deployment
        self.endpoints = EndpointRegistry(self.kv, logger=logging.getLogger(f"aether.deploy.{self.node_id}"))
        # the rollouts' traffic weights between versions (the invoker and so the HTTP router apply them)
        self.traffic = TrafficTable(
            self.kv, logger=logging.getLogger(f"aether.deploy.traffic.{self.node_id}")
        )
        self.maps = MapService(
            self.node_id, self.kv, self.transport, config.data_path / "maps", bus=self.bus,
            is_leader=lambda: self.leader.is_leader, up_peers=lambda: self.transport.up_peers,
            has_quorum=self.transport.has_quorum,
            logger=logging.getLogger(f"aether.maps.{self.node_id}"), tracer=self.tracer,
        )
        # the cluster's artifact repository (docs/repository.md); the local directory is its cache
        self.artifacts = ArtifactService(
            self.kv, self.maps, members=len(self.members), cache=Repository(config.repository),
            work_dir=config.data_path / "repository", partition_table=lambda: self.maps.table,
            logger=logging.getLogger(f"aether.repository.{self.node_id}"),
            orphan_age=config.repository_orphan_age, is_leader=lambda: self.leader.is_leader,
            has_quorum=self.has_quorum,
        )
        self.repository = ClusterRepository(config.repository, self.artifacts)
        # metrics: entry calls are recorded by the slice runtime (on the node that runs the instance);
        # once a second the service pushes them to the leader, which broadcasts the cluster snapshot
        self.loop_lag = LoopLagProbe()
        self.metrics = MetricsService(
            self.node_id, self.transport, self.leader,
            logger=logging.getLogger(f"aether.metrics.{self.node_id}"),
            instances=self._instance_counters, loop_lag=self.loop_lag.max_recent,
            cluster=self._cluster_figures,
        )
        self._block_policies: dict[str, BlockPolicy] = {}
        self.slice_blocks = 0  # slice loops found blocked since start (node status)
        # slice configs: the blueprints' [slices.NAME.config] with their secrets, from this replica
        self.slice_configs = SliceConfigs(self.kv)
        # Slices call each other through the invoker, and the invoker runs local calls in the slice
        # store: the store gets a forwarder to the invoker built right after it.
        self.slice_runtime = SliceRuntime(
            self.node_id, self.repository, config.data_path / "runtime", invoker=_NodeInvoker(self),
            config_for=self.slice_configs.resolved, limits_for=self._slice_limits,
            logger=logging.getLogger(f"aether.slices.{self.node_id}"), maps=self.maps,
            recorder=self.metrics.entries,
            health_interval=config.health_interval, health_timeout=config.health_timeout,
            isolation_for=self._slice_isolation, max_workers=config.max_workers,
            # slice code runs on its own loops; one that keeps blocking its loop is quarantined
            on_block=[self._on_slice_block],
        )
        # No per-attempt timeout: a slow entry must not be retried (and run again) elsewhere while
        # it is still running; lost nodes are detected by the transport (PeerDown) instead.
        self.invoker = Invoker(
            self.node_id, self.slice_runtime, self.endpoints, self.transport, bus=self.bus,
            attempt_timeout=None, catalog=StoreCatalog(self.kv), traffic=self.traffic,
            logger=logging.getLogger(f"aether.invoke.{self.node_id}"), tracer=self.tracer,
        )
        self.invoke_server = InvokeServer(
            self.node_id, self.slice_runtime, self.transport, invoker=self.invoker,
            logger=logging.getLogger(f"aether.invoke.{self.node_id}"), tracer=self.tracer,
        )
        self.node_deployer = NodeDeploymentManager(
            self.kv, self.node_id, self.slice_runtime, config_version=self.slice_configs.fingerprint,
            policies_for=self.slice_configs.entry_policies,
            logger=logging.getLogger(f"aether.deploy.node.{self.node_id}"),
        )
        # the layer-1 controller (docs/controller.md): steps once a second on the leader, syncs its
        # memory and decisions to every node; the reconciler keeps new instances off the nodes it
        # avoids and reports its own recoveries to it
        self.controller = ControllerService(
            self.kv, self.leader, self.transport, _ControllerMetrics(self.metrics), publish=self.bus.publish,
            logger=logging.getLogger(f"aether.controller.{self.node_id}"),
            recorder=ObservationRecorder(config.controller_record) if config.controller_record else None,
        )
        self.cluster_deployer = ClusterDeploymentManager(
            self.kv, self.leader, max_instances_per_node=config.max_instances_per_node,
            logger=logging.getLogger(f"aether.deploy.cluster.{self.node_id}"),
            avoid=self.controller.avoided, on_write=self.controller.on_write,
            counters=lambda a: self.metrics.aggregator.artifact_counters(a, time.monotonic()),
            latency_bounds=list(BUCKET_BOUNDS),
        )
        self.deployments = DeploymentService(
            self.kv, dependencies_of=self.repository.dependencies, resolve=self.repository.resolve_pattern,
            limits=InstanceLimits(config.max_instances_per_node, config.max_instances_per_cluster),
            members=len(self.members),
            maps_of=self.repository.maps, repository=str(self.repository.root),
        )
        # faults injected on purpose (docs/management-api.md, *Fault injection*): refused unless
        # the node runs with fault_injection (Aether Forge, tests)
        self.faults = FaultInjector(
            self.node_id, enabled=config.fault_injection, links=self.transport, slices=self.slice_runtime,
            publish=self.bus.publish, logger=logging.getLogger(f"aether.faults.{self.node_id}"),
        )
        self._management_factory = management_api
        self.management: HostedAPI | None = None
        self.http: HttpRouter | None = None
        self._publisher: asyncio.Task[None] | None = None  # records this node's addresses (nodes/{id})
        self.started_at = 0.0

    # --- the cluster state store: Rabia or etcd (docs/operations.md, *Running on etcd*) ---------

    def _make_etcd_store(self) -> None:
        """`store = "etcd"`: the store, the leader and the membership from etcd (`etcd_wiring`)."""
        cfg = etcd_config(self.config)
        self.kv = EtcdStore(cfg, self.node_id)
        self.leader = EtcdLeaderManager(self.node_id)
        self.etcd_members = EtcdMembership(
            cfg, self.node_id, str(self.members[self.node_id]), ttl=self.config.etcd_member_ttl,
            on_change=self._on_etcd_members, logger=logging.getLogger(f"aether.node.etcd.{self.node_id}"),
        )

    def has_quorum(self) -> bool:
        """Can the cluster state store take writes now: etcd answers (etcd store), or this node
        reaches a majority of the members (Rabia)? The router's 503 and `/readyz` follow it."""
        if isinstance(self.kv, EtcdStore):  # the cache follows etcd and the member lease renews
            return self.kv.has_quorum() and self.etcd_members is not None and self.etcd_members.reachable
        return self.transport.has_quorum()

    def _consensus(self) -> ConsensusRunner:
        """The consensus runner; with the etcd store there is none, and membership changes are
        refused (409) naming how membership works there."""
        if self.runner is None:
            name = self.config.cluster_name
            raise StatusError(
                f"node {self.node_id} keeps the cluster state in etcd: the members are the nodes running "
                f"with cluster name {name!r} on the same etcd (their lease-backed keys under "
                f"/aether/{name}/members/); add a node by starting it with them, remove one by stopping it",
                status=409,
            )
        return self.runner

    async def _start_etcd(self) -> None:
        """Start the etcd store and wait until its cache holds the cluster's state (retried, with a
        log line, while etcd is unreachable), then write and follow the member keys."""
        assert isinstance(self.kv, EtcdStore) and self.etcd_members is not None
        await self.kv.start()
        endpoints = ", ".join(self.config.etcd_endpoints)
        self.waiting_for_store = True
        try:
            while True:
                try:
                    await self.kv.wait_synced(timeout=2.0)
                    break
                except QuorumLost as e:
                    self.log.warning("node %s waits for etcd at %s: %s", self.node_id, endpoints, e)
        finally:
            self.waiting_for_store = False
        self.log.info(
            "cluster state store: etcd at %s, prefix /aether/%s/ (revision %d)",
            endpoints, self.config.cluster_name, self.kv.revision,
        )
        self.maps.set_members(list(self.members))  # the configured peers, as the transport dials them
        await self.etcd_members.start()

    async def abandon_start(self) -> None:
        """Close what `start()` opened when it was cancelled while `waiting_for_store` (nothing
        else had started then)."""
        await self._stop_etcd()
        self.logs.detach()

    async def _stop_etcd(self) -> None:
        for task in list(self._client_tasks):
            task.cancel()
        await asyncio.gather(*self._client_tasks, return_exceptions=True)
        if self.etcd_members is not None:
            await self.etcd_members.stop()
        if isinstance(self.kv, EtcdStore):
            await self.kv.stop()

    def _etcd_error(self) -> str:
        """Why the etcd store cannot take writes now (for the status and `aether doctor`)."""
        assert isinstance(self.kv, EtcdStore)
        members = self.etcd_members
        why = [
            self.kv.watch_error, self.kv.last_write_error,
            members.error if members is not None and not members.reachable else None,
        ]
        shown = "; ".join(w for w in why if w) or "the first read of the cluster's state is not in yet"
        return f"etcd at {', '.join(self.config.etcd_endpoints)}: {shown}"

    def _etcd_revision(self) -> int:
        """The etcd revision this node's cache holds (0 with the Rabia store)."""
        return self.kv.revision if isinstance(self.kv, EtcdStore) else 0

    def _on_etcd_members(self, live: dict[str, int] | None, addresses: dict[str, str]) -> None:
        if live is not None and isinstance(self.leader, EtcdLeaderManager) and live != self.leader.live:
            self.log.info("live members (etcd): %s", ", ".join(sorted(live)) or "none")
            self.deployments.members = max(1, len(live))  # admission: the cluster's instance capacity
        if isinstance(self.leader, EtcdLeaderManager):
            self.leader.set_live(live)

    # --- capacity signals (issue 15) -------------------------------------------------------------

    def _slice_limits(self, artifact: Artifact) -> SliceLimits:
        """The concurrency limits the blueprints give `artifact`'s instances (`SliceRuntime.limits_for`)."""
        s = self.slice_configs.limits(artifact)
        if s is None:
            return SliceLimits()
        return SliceLimits(s.max_concurrency, s.max_queue, dict(s.entry_concurrency))

    def _slice_isolation(self, artifact: Artifact) -> str:
        """``process`` when a blueprint on this replica says `isolation = "process"` for `artifact`,
        else ``auto`` when one says ``auto`` (its own thread), else ``shared`` when one says so, else
        ``inline`` (`SliceRuntime.isolation_for`): the more contained wins when blueprints disagree."""
        # a version no blueprint lists (a rollout's old one) keeps what the rollout recorded for it
        bps = [v for _, v in self.kv.list_local("blueprints/") if isinstance(v, BlueprintValue)]
        rollouts = [v for _, v in self.kv.list_local("rollouts/") if isinstance(v, RolloutValue)]
        said = {s.isolation for s in slices_of(bps, str(artifact), rollouts)}
        if "process" in said:
            return "process"
        if said == {"inline"}:
            return "inline"
        return "shared" if said and said <= {"inline", "shared"} else "auto"

    def _cluster_figures(self) -> ClusterFigures:
        """This node's view of the cluster for `/metrics` (`MetricsService.cluster`), read at scrape
        time from the components' own counters."""
        leader = self.leader
        member = self.node_id in leader.members
        maps: list[MapFigures] = []
        now = self.maps.now()
        for name in sorted(self.maps.specs):
            try:
                st = self.maps.core.local_stats(name, now)
            except Exception:  # a map whose storage is broken or not open yet: no figures
                continue
            maps.append(MapFigures(
                name, st.entries, st.bytes, st.primary_partitions, st.replica_partitions,
                st.syncing_partitions, st.pending_acks, st.oldest_pending_ms / 1000,
                self.maps.core.retry_counts(name),
            ))
        slices = dict.fromkeys((str(s) for s in SliceState), 0)
        for state in self.node_deployer.states().values():
            slices[state] = slices.get(state, 0) + 1
        routes = len(self.http.table) if self.http is not None else 0
        if self.runner is None:  # etcd: no slots, no commit histogram; the revision as applied slot
            return ClusterFigures(
                members=len(leader.members), reachable_members=len(leader.up) + int(member),
                quorum=self.has_quorum(), is_leader=leader.is_leader, leader_changes=leader.changes,
                slots=0, null_slots=0, commands=0, applied_slot=self._etcd_revision(),
                commit_buckets=[(float("inf"), 0)], commit_seconds=0.0, slices=slices, routes=routes,
                maps=maps, invoke=self.invoker.stats.as_dict(),
            )
        engine = self.runner.engine
        commit = self.runner.commit_latency
        return ClusterFigures(
            members=len(leader.members), reachable_members=len(leader.up) + int(member),
            quorum=engine.has_quorum, is_leader=leader.is_leader, leader_changes=leader.changes,
            slots=engine.stats["slots"], null_slots=engine.stats["null_slots"],
            commands=engine.stats["commands"], applied_slot=engine.applied,
            commit_buckets=commit.cumulative(), commit_seconds=commit.sum, slices=slices,
            routes=routes, maps=maps, invoke=self.invoker.stats.as_dict(),
        )

    def _instance_counters(self) -> list[InstanceCounters]:
        """The slice runtime's instance loads as metrics counters (`MetricsService.instances`)."""
        uptime = self.metrics.uptime_of
        return [
            InstanceCounters(
                x.artifact, x.instance, x.in_flight, x.queued, x.admitted, x.rejected, x.calls,
                x.failures, round(x.busy_seconds, 6), uptime(x.started), x.healthy,
                x.health_failures, x.health_reason,
            )
            for x in self.slice_runtime.instance_loads()
        ]

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, *, management: bool = True) -> None:
        """Start every component; the management API too when `management` and the node was
        given a factory for it. The tasks the components start carry the node's id in their
        context (`current_node_id`): their log records are this node's."""
        self.logs.attach()
        token = current_node_id.set(self.node_id)
        try:
            await self._start(management=management)
        finally:
            current_node_id.reset(token)

    async def _start(self, *, management: bool) -> None:
        # Refuse a port open beyond loopback with nothing to prove before anything starts. The
        # transport and the management server check again when they bind, but the management API
        # binds last: by then the node had joined the cluster, taken map partitions, started its
        # slices and its router, and left again at once (every RestartSec under systemd).
        problem = self.transport.listen_problem()
        if problem is None and management and self._management_factory is not None:
            problem = open_management_api_problem(self.config.host, self.config.api_key)
        if problem is not None:
            raise ConfigError(problem)
        # the same for a port another process holds: the router and the management API bind after
        # the node joined (and the process then left at once, every RestartSec under systemd)
        await _check_can_listen("HTTP router", self.config.host, self.config.http_port)
        if management and self._management_factory is not None:
            await _check_can_listen("management API", self.config.host, self.config.management_port)
        self.started_at = time.time()
        if self.runner is not None:
            self.runner.recover()
            self._follow_members()  # the member set of the snapshot and journal, not the configured one
        else:
            await self._start_etcd()
        self.loop_lag.start()
        # the maps' files are opened (a log engine's replayed) before the links are up: on the
        # loop with the links up, a big one kept the node from answering heartbeats
        await self.maps.prepare()
        if self._own_process:
            # What the node loaded so far (its maps' records: a full collection walked 20,000
            # keys' for 0.06-0.13 s) lives as long as the process: out of the cyclic collector's
            # full scans before the links are up (the process's own full collection once the
            # node is up, `runner._serve`, then walks only what came after)
            gc.collect()
            gc.freeze()
        await self.transport.start()
        if self.runner is not None:
            self.runner.start(self.transport)
        await self.maps.start()
        # the node of rank k publishes its directory's wheels after 1 + 2k s (docs/repository.md)
        self.artifacts.start_bootstrap(delay=1.0 + 2.0 * sorted(self.members).index(self.node_id))
        self.artifacts.start_collector()  # the leader removes the chunks interrupted uploads left
        self.endpoints.start()
        self.traffic.start()
        await self.node_deployer.start()
        await self.cluster_deployer.start()
        self.http = HttpRouter(
            self.node_id, self.kv, self.invoker, host=self.config.host, port=self.config.http_port,
            idle_timeout=self.config.http_idle_timeout, ssl_context=self.https,
            logger=logging.getLogger(f"aether.http.{self.node_id}"),
            has_quorum=self.has_quorum, tracer=self.tracer,
        )
        await self.http.start()
        self.metrics.start()
        await self.controller.start()
        if management and self._management_factory is not None:
            self.management = self._management_factory(
                self, host=self.config.host, port=self.config.management_port, api_key=self.config.api_key,
                idle_timeout=self.config.http_idle_timeout, ssl_context=self.https,
                logger=logging.getLogger(f"aether.api.{self.node_id}"),
                metrics_public=self.config.metrics_public,
            )
            await self.management.start()
        self._publisher = asyncio.create_task(self._publish_info(), name=f"node-info-{self.node_id}")
        self.log.info(
            "node %s started: cluster %s:%d, management %s, %d members",
            self.node_id, self.config.host, self.transport.port,
            self.management.url if self.management else "off", len(self.members),
        )
        if self.config.fault_injection:
            self.log.warning(
                "node %s accepts fault injection (--fault-injection): admin keys may delay, drop or block "
                "its links and fail its slice instances through /api/v1/faults; for Forge and tests only",
                self.node_id,
            )

    async def stop(self) -> None:
        try:
            await self._stop()
        finally:
            self.logs.detach()

    async def _stop(self) -> None:
        self.stopping = True
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
            self._publisher = None
        if self.http is not None:  # first: requests in flight still have the invoker
            await self.http.stop()
            self.http = None
        if self.management is not None:
            await self.management.stop()
            self.management = None
        await self.controller.stop()
        await self.metrics.stop()
        await self.cluster_deployer.stop()
        await self.node_deployer.stop()
        await self.slice_runtime.close()
        await self.artifacts.stop()
        await self.maps.stop()
        self.invoker.close()
        await self.invoke_server.stop()
        self.endpoints.close()
        self.traffic.close()
        await self.transport.stop()
        if self.runner is not None:
            await self.runner.stop()
        else:
            await self._stop_etcd()
        await self.loop_lag.stop()
        await asyncio.to_thread(self.tracer.shutdown)  # exports the spans left (blocking I/O)
        if self.runner is not None:
            self.log.info(
                "node %s stopped at slot %d; consensus stats %s",
                self.node_id, self.runner.engine.applied, self.runner.engine.stats,
            )
        else:
            self.log.info("node %s stopped at etcd revision %d", self.node_id, self._etcd_revision())

    def node_info(self) -> NodeInfoValue:
        """Where this node serves its management API and HTTP router (``HOST:PORT`` as others reach
        it: the configured host, or the host of its cluster address when it listens on every
        interface), as published under `nodes/{id}`."""

        def where(port: int, tls: bool) -> str:
            host = self.config.host
            if host in ("", "0.0.0.0", "::"):
                host = self.members.get(self.node_id, Address(host, 0)).host
            shown = f"[{host}]" if ":" in host else host
            return f"{'https://' if tls else ''}{shown}:{port}"

        tls = self.https is not None
        return NodeInfoValue(
            management=where(self.management.port, tls) if self.management is not None else None,
            http=where(self.http.port, tls) if self.http is not None else None,
            version=__version__,
            started=self.started_at,
        )

    async def _publish_info(self) -> None:
        """Record `node_info()` under `nodes/{id}` once the cluster takes writes (retried with
        backoff while it has no quorum); nothing is written when the record already says so."""
        key, delay = NodeInfoKey(self.node_id), 0.2
        while True:
            info = self.node_info()
            stored = self.kv.get_local(key)
            if isinstance(stored, NodeInfoValue) and msgspec.structs.replace(stored, started=0.0) == (
                msgspec.structs.replace(info, started=0.0)
            ):
                return
            try:
                await self.kv.put(key, info)
                return
            except Exception as e:  # no quorum yet, a timeout: the outcome is unknown, so look again
                self.log.debug("cannot record this node's addresses yet: %s", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # --- events ---------------------------------------------------------------------------------

    def _on_peer_message(self, sender: str, msg: Any) -> None:
        if isinstance(msg, INVOKE_MESSAGE_TYPES):
            self.invoke_server.dispatch(sender, msg)
        elif isinstance(msg, MAP_MESSAGE_TYPES):
            self.maps.dispatch(sender, msg)
        elif isinstance(msg, METRICS_MESSAGE_TYPES):
            self.metrics.on_message(sender, msg)
        elif isinstance(msg, CONTROLLER_MESSAGE_TYPES):
            self.controller.on_message(sender, msg)
        elif self.runner is not None:
            self.runner.on_message(sender, msg)

    def _on_peer_up(self, ev: PeerUp) -> None:
        if self.runner is not None:
            self.runner.peer_up(ev.node_id)
        self.leader.peer_up(ev.node_id)
        self.invoke_server.peer_up(ev.node_id)

    def _on_duplicate(self, ev: DuplicateNode) -> None:
        if self.duplicate is not None:
            return
        self.duplicate = f"{ev.reason} (said by {ev.refused_by})"
        self.log.critical(
            "%s is a second process with the id of a running member: %s; this process stops",
            self.node_id, self.duplicate,
        )
        for callback in self.on_fatal:
            callback()

    def _on_peer_down(self, ev: PeerDown) -> None:
        if self.runner is not None:
            self.runner.peer_down(ev.node_id)
        self.leader.peer_down(ev.node_id)

    # --- membership (changes go through the log: docs/consensus.md) -----------------------------

    def _member_map(self) -> dict[str, Address]:
        """Addresses of the members in effect and pending (and nodes being added), this node too."""
        eng = self._consensus().engine
        pend = eng.pending_config
        ids = set(eng.members) | set(pend.members if pend is not None else ()) | {self.node_id}
        book = eng.member_addresses()
        out: dict[str, Address] = {}
        for i in sorted(ids):
            text = book.get(i)
            addr = self.members.get(i)
            if text is not None:
                try:
                    addr = Address.parse(text)
                except Exception:
                    self.log.warning("member %s has an invalid address %r in the log", i, text)
            if addr is None:
                self.log.warning("no cluster address known for member %s", i)
                continue
            out[i] = addr
        for i, a in self._retired.items():
            out.setdefault(i, a)
        out.update(self._candidates)
        return out

    def _follow_members(self) -> None:
        eng = self._consensus().engine
        book = self._member_map()
        if book != self.members:
            self.members = book
            self.transport.set_members(book)
        # the map also holds nodes being added and just removed: quorum counts the members only
        self.transport.set_voters(eng.members)
        self.leader.set_members(list(eng.members))
        self.maps.set_members(eng.members)
        self.deployments.members = len(eng.members)  # admission: the cluster's instance capacity
        if not eng.is_member:
            self.log.warning(
                "%s is not a member of the cluster (members: %s): it takes part in no decision; add "
                "it with `aether cluster add-node %s HOST:PORT`, or stop it if it was removed",
                self.node_id, ", ".join(eng.members), self.node_id,
            )

    def _on_members_changed(self, ev: MembersChanged) -> None:
        pend = f"; {', '.join(ev.pending)} from slot {ev.pending_from}" if ev.pending is not None else ""
        self.log.info("member set epoch %d: %s%s", ev.epoch, ", ".join(ev.members), pend)
        if ev.pending is None and ev.epoch != self._epoch_seen:
            # a change took effect: keep the nodes it removed linked until the next one
            self._epoch_seen = ev.epoch
            self._retired = {m: a for m, a in self.members.items()
                             if m not in ev.members and m != self.node_id}
        for m in (ev.members + (ev.pending or ())):
            self._candidates.pop(m, None)
        self._follow_members()

    def not_member_reason(self) -> str | None:
        """Why this node takes part in no decision (it is joining, or not a member: removed, or
        joined and not added yet), for the readiness probe; None for a member, and with etcd."""
        if self.runner is None:
            return None
        eng = self.runner.engine
        add = f"`aether cluster add-node {self.node_id} HOST:PORT`"
        if eng.awaiting_snapshot:
            return (f"{self.node_id} is joining through {self.config.join}: it takes part in no decision "
                    f"until a member adds it ({add}) and sends it the cluster's state")
        if not eng.is_member:
            return (f"{self.node_id} is not a member of the cluster (members: {', '.join(eng.members)}): "
                    f"add it with {add}, or stop it if it was removed")
        return None

    def member_info(self) -> tuple[int, list[tuple[str, str]], list[tuple[str, str]] | None]:
        if self.etcd_members is not None:  # the live member keys in etcd; no epochs, nothing pending
            live = self.etcd_members.addresses
            return 0, [(m, live[m]) for m in sorted(live)], None
        eng = self._consensus().engine
        book = self._member_map()
        pend = eng.pending_config
        cur = [(m, str(book[m])) for m in eng.members if m in book]
        return eng.epoch, cur, (
            [(m, str(book[m])) for m in pend.members if m in book] if pend is not None else None
        )

    async def add_member(self, node_id: str, address: str, *, wait: float = 10.0) -> MemberResult:
        """Add `node_id` (started with `aether node --join`) at `address`: dial it, wait until it
        caught up, then commit the change. StatusError 409 with the reason when refused."""
        try:
            addr = Address.parse(address)
            check_node_id(node_id)
        except ConfigError as e:
            raise BadRequest(str(e)) from None
        runner = self._consensus()
        eng = runner.engine
        if node_id in eng.members:
            raise StatusError(f"node {node_id} is already a member", status=409)
        if not eng.is_member:
            raise StatusError(f"node {self.node_id} is not a member; ask a member", status=409)
        self._candidates[node_id] = addr
        self._follow_members()
        committed = False
        try:
            deadline = time.monotonic() + wait
            while node_id not in self.transport.up_peers:
                if time.monotonic() > deadline:
                    if self.config.tls_cert:  # mutual TLS: it proves its id with its certificate
                        proof = f" with its certificate from the cluster CA (`aether cert issue {node_id}`)"
                    elif self.config.cluster_secret or self.config.cluster_secret_file:
                        proof = " with the same cluster secret"
                    else:
                        proof = ""
                    raise StatusError(
                        f"node {node_id} cannot be reached at {addr} from {self.node_id} within {wait:g}s; "
                        f"start it with `aether node --id {node_id} --join {self.members[self.node_id]}`"
                        f"{proof} first", status=409)
                await asyncio.sleep(0.05)
            # it counts only once it caught up (by snapshot): wait until it applied what we had
            target = eng.applied
            while eng.peer_applied.get(node_id, -1) < target:
                if time.monotonic() > deadline:
                    raise StatusError(
                        f"node {node_id} has not caught up within {wait:g}s (at slot "
                        f"{eng.peer_applied.get(node_id, 0)} of {target}); is it a learner started "
                        "with --join?", status=409)
                await asyncio.sleep(0.05)
            book = {m: str(a) for m, a in self._member_map().items() if m != node_id}
            change = MemberChange("add", node_id, str(addr), addresses=book)
            try:
                res = await runner.change_members(change, timeout=self.config.request_timeout)
            except MembershipRefused as e:
                raise StatusError(str(e), status=409) from None
            if not res.ok:
                raise StatusError(res.error or "refused", status=409)
            committed = True
            return res
        finally:
            if not committed:
                self._candidates.pop(node_id, None)
                self._follow_members()

    async def remove_member(self, node_id: str) -> MemberResult:
        """Remove `node_id` from the member set; StatusError 409 with the reason when refused."""
        if not node_id:
            raise BadRequest("a node id is required")
        runner = self._consensus()
        try:
            res = await runner.change_members(
                MemberChange("remove", node_id), timeout=self.config.request_timeout)
        except MembershipRefused as e:
            raise StatusError(str(e), status=409) from None
        if not res.ok:
            raise StatusError(res.error or "refused", status=409)
        try:  # its addresses go with it (a node added again publishes them when it starts)
            await self.kv.remove(NodeInfoKey(node_id))
        except (QuorumLost, CommitTimeout, StatusError) as e:
            self.log.info("%s removed, but its record nodes/%s stays: %s", node_id, node_id, e)
        return res

    def _on_leader_change(self, ev: LeaderChanged) -> None:
        self.log.info("leader is now %s (was %s)", ev.leader, ev.previous)
        self.bus.publish(ev)
        if ev.is_self:
            self.maps.replan()

    def _on_slice_block(self, artifact: Artifact, report: BlockReport) -> None:
        coords = str(artifact)
        self.slice_blocks += 1
        if report.entry is not None and not report.entry.endswith(")"):  # an entry, not start()/stop()
            self.metrics.entries.record_block(coords, report.entry)  # the key SliceRuntime records by
        policy = self._block_policies.setdefault(coords, BlockPolicy())
        quarantine = policy.blocked(time.monotonic())
        self.bus.publish(SliceBlockedNotice(
            self.node_id, coords, report.entry, round(report.seconds, 3), report.where, quarantine
        ))  # fmt: skip
        if quarantine:
            reason = (
                f"{report.entry or 'its code'} blocked the slice's event loop for over "
                f"{self.slice_runtime.block_limit:g} s {policy.strikes} times within {policy.window:g} s "
                f"(last at {report.where})"
            )
            self.log.error("%s: quarantining %s on this node: %s", self.node_id, coords, reason)
            self.node_deployer.quarantine(coords, reason)

    # --- clients on the cluster port ------------------------------------------------------------

    def _on_client_message(self, session: ClientSession, msg: Any) -> None:
        # External clients are scoped here, where their commands enter the node, not in the state
        # machine (which must apply every replicated command the same way on every replica).
        if isinstance(msg, ClientRequest):
            try:
                cmd = _cmd_decoder.decode(msg.command)
            except msgspec.DecodeError as e:
                session.send(ClientResponse(msg.id, None, f"malformed command: {e}", "bad_request"))
                return
            refused = client_key_refusal(cmd.op.key)
            if refused is not None:
                session.send(ClientResponse(msg.id, None, refused, "bad_request"))
                return
            if isinstance(self.kv, EtcdStore):
                call = client_command(self.kv, cmd, self.config.request_timeout)
                self._etcd_client_request(session, msg.id, call)
                return
            assert self.runner is not None
            (fut,) = self.runner.submit([msg.command])
            rid = msg.id

            def done(f: asyncio.Future[bytes], rid: int = rid) -> None:
                if session.closed:
                    if not f.cancelled():
                        f.exception()  # retrieve it so asyncio does not log it
                    return
                if f.cancelled():
                    session.send(ClientResponse(rid, None, "cancelled", "timeout"))
                    return
                exc = f.exception()
                if exc is None:
                    session.send(ClientResponse(rid, f.result()))
                elif isinstance(exc, QuorumLost):
                    session.send(ClientResponse(rid, None, str(exc), "quorum"))
                elif isinstance(exc, JournalError):
                    # This replica stopped (its disk is full or failing); the others go on and may
                    # still commit the command. "quorum" sends the client to another node with
                    # the same session sequence, which applies it at most once.
                    session.send(ClientResponse(
                        rid, None, f"{self.node_id} stopped, so the outcome is unknown here: {exc}", "quorum",
                    ))
                elif isinstance(exc, CommitTimeout):
                    session.send(ClientResponse(rid, None, str(exc), "timeout"))
                elif isinstance(exc, BadRequest):  # TooLarge: a command consensus does not carry
                    session.send(ClientResponse(rid, None, str(exc), "bad_request"))
                else:
                    session.send(ClientResponse(rid, None, f"internal error: {exc}", "internal"))

            fut.add_done_callback(done)
        elif isinstance(msg, ClientMembers):
            epoch, cur, pend = self.member_info()
            session.send(ClientResponse(msg.id, _result_encoder.encode(MembersInfo(epoch, cur, pend))))
        elif isinstance(msg, ClientReadLocal):
            refused = client_key_refusal(msg.key)
            if refused is not None:
                session.send(ClientResponse(msg.id, None, refused, "bad_request"))
                return
            if isinstance(self.kv, EtcdStore):  # this node's cache of etcd
                try:
                    local = self.kv.get_local(msg.key)
                except BadRequest as e:
                    session.send(ClientResponse(msg.id, None, str(e), "bad_request"))
                    return
                result = Result(True, local, self.kv.revision)
                session.send(ClientResponse(msg.id, _result_encoder.encode(result)))
                return
            v = self.sm.get(msg.key)
            session.send(ClientResponse(msg.id, _result_encoder.encode(Result(True, v, self.sm.revision))))

    def _etcd_client_request(
        self, session: ClientSession, rid: int, call: Coroutine[Any, Any, Result]
    ) -> None:
        """Run a client's command on the etcd store (`etcd_wiring.client_command`) and answer it
        as the Rabia path does (errors with their kind)."""

        async def run() -> None:
            try:
                res = await call
            except QuorumLost as e:
                reply = ClientResponse(rid, None, str(e), "quorum")
            except CommitTimeout as e:
                reply = ClientResponse(rid, None, str(e), "timeout")
            except BadRequest as e:
                reply = ClientResponse(rid, None, str(e), "bad_request")
            except Exception as e:
                self.log.exception("client command on the etcd store failed")
                reply = ClientResponse(rid, None, f"internal error: {e}", "internal")
            else:
                reply = ClientResponse(rid, _result_encoder.encode(res))
            if not session.closed:
                session.send(reply)

        task = asyncio.get_running_loop().create_task(run())
        self._client_tasks.add(task)
        task.add_done_callback(self._client_tasks.discard)

    # --- views for the management API -----------------------------------------------------------

    def status(self) -> NodeStatus:
        if self.runner is None:
            return self._etcd_status()
        up = self.transport.up_peers
        # the member set in effect (and a pending one), as the log made it
        eng = self.runner.engine
        pend = eng.pending_config
        shown = set(eng.members) | set(pend.members if pend is not None else ())
        published = {k[len(NodeInfoKey.prefix):]: v for k, v in self.kv.list_local(NodeInfoKey.prefix)}
        # joining: the set is what it was told, itself included, and the members refuse its hello
        # until they add it: it lists them, their state unknown, and not itself (it used to list
        # itself as a member, up, and the members as down)
        joining = eng.awaiting_snapshot
        nodes = []
        for m, addr in sorted(self.members.items()):
            if m in shown and not (joining and m == self.node_id):
                info = published.get(m)
                info = info if isinstance(info, NodeInfoValue) else NodeInfoValue()
                state = "unknown" if joining else "up" if (m == self.node_id or m in up) else "down"
                nodes.append(MemberStatus(m, str(addr), state, info.management, info.http))
        failed = self.store.failed if self.store is not None else None
        return self._node_status(
            nodes,
            self.transport.has_quorum(),
            self.runner.engine.applied,
            journal_error=str(failed) if failed is not None else None,
            not_member=self.not_member_reason(),
        )

    def _node_status(
        self, nodes: list[MemberStatus], quorum: bool, applied_slot: int, **store: Any
    ) -> NodeStatus:
        """The status answer with what the store decides (`nodes`, `quorum`, `applied_slot` and the
        `store` fields: the journal's error; or etcd, its endpoints and error) and this node's own
        figures: ports, pid, instances, loop lag, store write failures, blocked slices."""
        return NodeStatus(
            node_id=self.node_id,
            leader=self.leader.leader,
            quorum=quorum,
            nodes=nodes,
            applied_slot=applied_slot,
            management_port=self.management.port if self.management else 0,
            cluster_port=self.transport.port,
            http_port=self.http.port if self.http is not None else self.config.http_port,
            pid=os.getpid(),
            local_instances={
                str(a): ids for a in self.slice_runtime.artifacts()
                if (ids := self.slice_runtime.local_instances(a))
            },
            loop_lag_max_ms=round(self.loop_lag.max_recent() * 1000, 1),
            store_write_failures=self.kv.write_failures,
            store_write_failing_for=(
                None if self.kv.failing_since is None else round(time.monotonic() - self.kv.failing_since, 1)
            ),
            store_write_error=self.kv.last_write_error,
            slice_blocks=self.slice_blocks,
            **store,
        )

    def kv_list(self, prefix: str) -> list[KVEntry]:
        return [KVEntry(k, _jsonable(v)) for k, v in self.kv.list_local(prefix)]

    def _etcd_status(self) -> NodeStatus:
        """`status()` with the etcd store: the nodes are the configured peers and the live members
        (up when their member key in etcd is live), quorum is etcd's, the applied slot the revision
        this node's cache holds."""
        assert isinstance(self.kv, EtcdStore)
        live = set(self.etcd_members.addresses) if self.etcd_members is not None else set()
        book = {m: str(a) for m, a in self.members.items()}
        if self.etcd_members is not None:
            book.update(self.etcd_members.addresses)
        published = {k[len(NodeInfoKey.prefix):]: v for k, v in self.kv.list_local(NodeInfoKey.prefix)}
        nodes = []
        for m, addr in sorted(book.items()):
            info = published.get(m)
            info = info if isinstance(info, NodeInfoValue) else NodeInfoValue()
            nodes.append(MemberStatus(m, addr, "up" if m in live else "down", info.management, info.http))
        return self._node_status(
            nodes,
            self.has_quorum(),
            self.kv.revision,
            store="etcd",
            store_endpoints=list(self.config.etcd_endpoints),
            store_error=None if self.has_quorum() else self._etcd_error(),
        )
