"""`aether node --join HOST:PORT`: ask a member for the member set before the node starts.

The joining node connects to the member's cluster port as a client (proving the cluster secret,
with TLS when the node has it), asks `ClientMembers` and gets a `MembersInfo`: the member set in
effect (and a pending one) with cluster addresses. The node then starts with those members plus
itself as its configured set, as a *learner*: it catches up by snapshot and takes part in no
decision until a member commits `add-node` for it (docs/consensus.md, "Membership changes").
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from aether.core.config import NodeConfig
from aether.core.errors import ConfigError
from aether.core.types import Address, PeerSpec
from aether.kv.protocol import ClientMembers, ClientResponse, MembersInfo, ServerMessage
from aether.transport.auth import load_secret
from aether.transport.client import open_client_connection
from aether.transport.tls import dialer_context, tls_files

_info_decoder = msgspec.msgpack.Decoder(MembersInfo)


async def fetch_members(config: NodeConfig, timeout: float = 5.0) -> MembersInfo:
    """The member set as the member at `config.join` knows it; ConnectionError if unreachable."""
    assert config.join is not None
    addr = Address.parse(config.join)
    files = tls_files(config)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[ClientResponse] = loop.create_future()

    def on_message(msg: object) -> None:
        if isinstance(msg, ClientResponse) and not answer.done():
            answer.set_result(msg)

    def on_close(exc: Exception | None) -> None:
        if not answer.done():
            answer.set_exception(ConnectionError(f"{addr} closed the connection before answering"))

    link = await open_client_connection(
        addr, cluster_name=config.cluster_name, client_id=f"join-{config.node_id}",
        message_type=ServerMessage, on_message=on_message, on_close=on_close, timeout=timeout,
        secret=load_secret(config.cluster_secret, config.cluster_secret_file),
        ssl_context=dialer_context(files) if files is not None else None,
    )
    try:
        link.send(ClientMembers(1))
        try:
            resp = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            raise ConnectionError(f"{addr} did not answer the member query within {timeout:g}s") from None
    finally:
        link.close()
    if resp.error is not None or resp.result is None:
        raise ConnectionError(f"{addr} refused the member query: {resp.error} ({resp.kind})")
    return _info_decoder.decode(resp.result)


async def joined_config(config: NodeConfig, logger: logging.Logger) -> NodeConfig:
    """`config` with the member set fetched from `config.join` (and this node) as its peers.

    If the member cannot be reached and the node already has local state (a restart), the node
    starts with what it has: its snapshot and journal hold the member set and addresses."""
    own = Address(config.host, config.cluster_port)
    consensus_dir = config.data_path / "consensus"
    try:
        info = await fetch_members(config)
    except (ConnectionError, OSError, msgspec.DecodeError) as e:
        if (consensus_dir / "snapshot.bin").exists():
            logger.warning("cannot ask %s for the member set (%s); starting from local state", config.join, e)
            return config
        raise ConfigError(f"--join {config.join}: cannot get the member set: {e}") from None
    peers: dict[str, Address] = {}
    for node_id, text in [*info.members, *(info.pending or [])]:
        peers[node_id] = Address.parse(text)
    listed = peers.get(config.node_id)
    # a node listening on every interface (`--host 0.0.0.0`, as docs/operations.md starts one) is
    # reached at the address the member set gives it: only a different port is a mismatch
    wildcard = config.host in ("", "0.0.0.0", "::")
    if listed is not None and listed != own and not (wildcard and listed.port == own.port):
        # A node with no state of its own claiming a member's id at another address is not that
        # member restarting: it is a second process with the id (a copied command line). Started,
        # it took the member's place on every link (the member's links dropped and its leadership
        # flapped) and would vote as that member with none of its journal: refuse it.
        if not any((consensus_dir / name).exists() for name in ("snapshot.bin", "journal.bin")):
            raise ConfigError(
                f"--join {config.join}: {config.node_id} is already a member of the cluster, at {listed}, "
                f"and this node ({own}) has no state of its own in {consensus_dir}: give it an id "
                f"that is not a member's (members: {', '.join(i for i, _ in info.members)}), or start "
                f"{config.node_id} at {listed} with its own data directory"
            )
        logger.warning("the member set has %s at %s; this node listens on %s", config.node_id,
                       peers[config.node_id], own)
    peers.setdefault(config.node_id, own)
    logger.info("joining through %s: member set epoch %d: %s", config.join, info.epoch,
                ", ".join(f"{i}={a}" for i, a in sorted(peers.items())))
    return msgspec.structs.replace(
        config, peers=[PeerSpec(i, a) for i, a in sorted(peers.items())]
    ).validate()
