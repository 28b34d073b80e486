"""The node on etcd (`store = "etcd"`; docs/operations.md, *Running on etcd*).

With the etcd backend a node runs no consensus runner and no journal: its cluster state store is an
`aether.etcd.EtcdStore` (keys under ``/aether/{cluster}/kv/``), and the member set and the leader
come from etcd too:

* **Membership by leases.** Each node grants a lease of `etcd_member_ttl` seconds (5 by default),
  writes its member key ``/aether/{cluster}/members/{node_id}`` (value: its cluster address)
  attached to it and renews it while it runs (`EtcdMembership`). A node that stops revokes the
  lease (its key goes at once); a node that is killed or cut off from etcd stops renewing and its
  key expires within the TTL. The live members are the member keys, which every node follows with
  one watch (resumed after reconnects, re-read after a compaction): every node sees the same
  sequence of joins and leaves, in etcd's revision order.
* **The leader** is the live member whose key has the lowest ``create_revision`` (`choose_leader`),
  the etcd election recipe: the oldest live member leads. Unlike "lowest id" a node that was
  killed and comes back does not take the leadership back from the node that took over (one
  leader change per failure, not two), and it needs no quorum computation of our own: etcd's
  quorum decided the order. Every node computes the same answer from the same keys; as with the
  Rabia store, anything the leader writes goes through the store (compare-and-set where it
  matters), so two nodes briefly both believing they lead is harmless.
* `EtcdLeaderManager` is `aether.cluster.leader.LeaderManager` fed by those keys: `members` are the
  live members, `up` those of them the transport reaches, so the cluster deployer, the controller
  and the maps' replan work unchanged.

Adding a node: start it with the same cluster name and etcd; removing: stop it. The membership
routes of the management API answer 409 saying so. The configured `peers` still say whom the
transport dials for node-to-node traffic (invocations, maps, metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from aether.cluster.leader import LeaderChanged, LeaderManager
from aether.core.config import NodeConfig
from aether.core.errors import ConfigError
from aether.etcd import Compacted, EtcdClient, EtcdConfig, EtcdError, EtcdStore, LeaseNotFound
from aether.kv.machine import Cas, Command, Get, Put, Remove, Result

__all__ = [
    "EtcdLeaderManager",
    "EtcdMembership",
    "choose_leader",
    "client_command",
    "etcd_config",
    "etcd_password",
]

MEMBERS_NAMESPACE = "members/"
"""Where the member keys live under ``/aether/{cluster}/`` (outside the data namespace ``kv/``)."""


def etcd_password(config: NodeConfig) -> str | None:
    """The etcd password: `etcd_password` (the CLI fills it from AETHER_ETCD_PASSWORD), else the
    first line of `etcd_password_file`; `ConfigError` naming the file when it cannot be read."""
    if config.etcd_password:
        return config.etcd_password
    if config.etcd_password_file is None:
        return None
    try:
        text = Path(config.etcd_password_file).read_text().strip()
    except OSError as e:
        raise ConfigError(f"etcd password file {config.etcd_password_file}: {e.strerror or e}") from None
    if not text:
        raise ConfigError(f"etcd password file {config.etcd_password_file} is empty")
    return text.splitlines()[0]


def etcd_config(config: NodeConfig) -> EtcdConfig:
    """The `EtcdConfig` of a node with ``store = "etcd"`` (prefix = the cluster name)."""
    return EtcdConfig(
        endpoints=tuple(config.etcd_endpoints),
        cluster=config.cluster_name,
        username=config.etcd_username,
        password=etcd_password(config) if config.etcd_username else None,
        ca_file=config.etcd_ca,
        cert_file=config.etcd_cert,
        key_file=config.etcd_key,
        request_timeout=config.request_timeout,
        attempt_timeout=min(2.0, config.request_timeout),
    )


def choose_leader(live: Mapping[str, int]) -> str | None:
    """The leader among the live members (node id -> ``create_revision`` of its member key): the
    oldest key, ties (keys created in one transaction) by id; None when nobody is live."""
    if not live:
        return None
    return min(live.items(), key=lambda item: (item[1], item[0]))[0]


class EtcdLeaderManager(LeaderManager):
    """`LeaderManager` whose members and leader come from the member keys in etcd (`set_live`);
    the transport's peer up/down still say which members are `up` (reachable for work). While this
    node's own key is not live (not written yet, expired) or etcd is unreachable it sees no leader."""

    def __init__(self, node_id: str, members: Sequence[str] = ()) -> None:
        super().__init__(node_id, members)
        self.leader = None
        self.live: dict[str, int] | None = None  # None: etcd not read yet, or unreachable

    def set_live(self, live: Mapping[str, int] | None) -> None:
        """The live member keys (id -> create_revision), or None when etcd cannot be read."""
        self.live = dict(live) if live is not None else None
        if live is not None:
            self.members = sorted(live)
            self.up = self._up_any & set(self.members)
        self._recompute()

    def _recompute(self) -> None:
        live = self.live
        new = choose_leader(live) if live is not None and self.node_id in live else None
        if new != self.leader:
            self._announce(new)

    def _announce(self, new: str | None) -> None:
        ev = LeaderChanged(new, self.leader, new == self.node_id)
        self.changes += 1
        self.leader = new
        for cb in list(self.listeners):
            cb(ev)


class EtcdMembership:
    """Keeps this node's member key alive under a lease and follows every member key.

    `on_change(live, addresses)` is called with the live members (id -> create_revision) and their
    cluster addresses after every change, and with ``(None, {})`` while etcd cannot be read."""

    def __init__(
        self,
        config: EtcdConfig,
        node_id: str,
        address: str,
        *,
        ttl: int,
        on_change: Callable[[dict[str, int] | None, dict[str, str]], None],
        logger: logging.Logger | None = None,
    ) -> None:
        self.client = EtcdClient(config, namespace=MEMBERS_NAMESPACE)
        self.node_id = node_id
        self.address = address
        self.ttl = ttl
        self.on_change = on_change
        self.log = logger or logging.getLogger(f"aether.node.etcd.{node_id}")
        self.live: dict[str, int] = {}
        self.addresses: dict[str, str] = {}
        self.lease_id: int | None = None
        self.reachable = False  # the last grant or renewal of the member lease got through
        self._tasks: list[asyncio.Task[None]] = []
        self.error: str | None = None  # why the member keys cannot be followed now

    async def start(self) -> None:
        await self.client.open()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep(), name=f"etcd-member-{self.node_id}"),
            loop.create_task(self._follow(), name=f"etcd-members-{self.node_id}"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.lease_id is not None:
            lease, self.lease_id = self.lease_id, None
            try:  # leave at once: the others need not wait for the lease to expire
                await asyncio.wait_for(self.client.revoke(lease), 2.0)
            except (EtcdError, TimeoutError) as e:
                self.log.info("could not revoke the member lease (it expires in %d s): %s", self.ttl, e)
        await self.client.close()

    async def _keep(self) -> None:
        """Grant a lease, write the member key on it, renew it every ttl/4 s; again when it is lost.
        `reachable` says whether the last grant or renewal got through (etcd has a quorum)."""
        loop = asyncio.get_running_loop()
        delay = 0.2
        interval = max(0.2, self.ttl / 4)
        while True:
            try:
                lease = await self.client.grant(self.ttl)
                await self.client.put(self.node_id, self.address.encode(), lease=lease.id)
            except EtcdError as e:
                self._unreachable(f"cannot write the member key of {self.node_id}: {e}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.lease_id, self.reachable, delay = lease.id, True, 0.2
            renewed = loop.time()
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.client.keepalive(lease.id)
                except LeaseNotFound:
                    self.log.warning(
                        "the member lease of %s expired: the other nodes saw it leave; joining again",
                        self.node_id,
                    )
                    break
                except EtcdError as e:
                    self._unreachable(f"cannot renew the member lease of {self.node_id}: {e}")
                    if loop.time() - renewed > self.ttl:
                        break
                    continue
                renewed, self.reachable = loop.time(), True

    def _unreachable(self, why: str) -> None:
        if self.reachable:
            self.log.warning("%s", why)
        self.reachable = False
        self.error = why

    def _report(self) -> None:
        self.on_change(dict(self.live), dict(self.addresses))

    async def _follow(self) -> None:
        """Read the member keys, then watch them from the revision after that read."""
        delay = 0.2
        while True:
            try:
                snap = await self.client.range("")
                self.live = {kv.key: kv.create_revision for kv in snap.items}
                self.addresses = {kv.key: kv.value.decode(errors="replace") for kv in snap.items}
                self.error = None
                self._report()
                delay = 0.2
                watch = self.client.watch("", snap.revision + 1)
                try:
                    async for ev in watch:
                        if ev.type == "delete":
                            self.live.pop(ev.key, None)
                            self.addresses.pop(ev.key, None)
                        else:
                            # a key not known from the read or earlier events was created by this put
                            self.live.setdefault(ev.key, ev.mod_revision)
                            self.addresses[ev.key] = ev.value.decode(errors="replace")
                        self._report()
                finally:
                    with contextlib.suppress(Exception):
                        await watch.aclose()
            except Compacted:
                continue  # fell behind the history: read the keys again
            except EtcdError as e:
                if self.error is None:
                    self.log.warning("cannot follow the member keys in etcd: %s", e)
                self.error = str(e)
                self.on_change(None, {})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def client_command(store: EtcdStore, cmd: Command, timeout: float) -> Result:
    """Run a cluster-port client's command (`aether.client.AetherClient`: get, put, remove,
    compare-and-set of ``user/`` keys) on the etcd store, answering what the Rabia state machine
    answers, except that a put returns no previous value. A command with a session
    (``client``, ``seq``) is written under that request id, so the client's retry through another
    node after a lost answer is applied once. Raises `QuorumLost` / `CommitTimeout` / `BadRequest`."""
    op = cmd.op
    rid = f"{cmd.client}-{cmd.seq}" if cmd.client else f"anon-{store.node_id}-{id(cmd):x}-{time.time_ns()}"
    if isinstance(op, Get):
        value = await store.get(op.key, timeout)
        return Result(True, value, store.revision)
    if isinstance(op, Put):
        res = await store.write_bytes(op.key, op.value, request_id=rid, timeout=timeout)
        return Result(True, None, res.revision)
    if isinstance(op, Remove):
        res = await store.write_bytes(op.key, None, request_id=rid, expect="exists", timeout=timeout)
        return Result(True, b"" if res.outcome != "conflict" else None, res.revision)
    assert isinstance(op, Cas)
    if op.expected is None:
        res = await store.write_bytes(op.key, op.new, request_id=rid, expect="absent", timeout=timeout)
    else:
        res = await store.write_bytes(
            op.key, op.new, request_id=rid, expect="value", expected_value=op.expected, timeout=timeout
        )
    if res.outcome == "conflict":
        current = res.current.value if res.current is not None else None
        return Result(False, current, res.revision)
    return Result(True, op.expected, res.revision)
