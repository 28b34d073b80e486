"""Validated identifiers and addresses used throughout the cluster."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

import msgspec

from aether.core.errors import ConfigError

NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")]
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

# Default port bases: node k (1-based) uses base + k - 1.
CLUSTER_PORT_BASE = 7000
MANAGEMENT_PORT_BASE = 9000
HTTP_PORT_BASE = 8080


def check_node_id(value: str) -> str:
    """Return `value` if it is a valid node id, else raise ConfigError naming the problem."""
    if not _NODE_ID_RE.match(value):
        raise ConfigError(
            f"invalid node id {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def default_node_id(k: int) -> str:
    """The id of the k-th (1-based) node of a local cluster."""
    return f"node-{k}"


def is_loopback_host(host: str) -> bool:
    """True if `host` names only the loopback interface (`localhost`, 127.0.0.0/8, `::1`)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def open_management_api_problem(host: str, api_key: str | None) -> str | None:
    """Why a management API must not listen on `host` (beyond loopback without an API key), else None."""
    if api_key or is_loopback_host(host):
        return None
    return (
        f"the management API would listen on {host!r}, beyond loopback, without an API key: "
        "set one (--api-key-file FILE, AETHER_API_KEY or --api-key) or bind it to 127.0.0.1"
    )


class Address(msgspec.Struct, frozen=True):
    """A host:port pair."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse `host:port`; raise ConfigError with the offending text otherwise."""
        host, sep, port_s = text.rpartition(":")
        if not sep or not host or not port_s.isdigit():
            raise ConfigError(f"invalid address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7000")
        port = int(port_s)
        if not 0 < port < 65536:
            raise ConfigError(f"invalid port in {text!r}: must be 1-65535")
        return cls(host, port)


class PeerSpec(msgspec.Struct, frozen=True):
    """A cluster member: its id and cluster (node-to-node) address."""

    id: str
    address: Address

    @classmethod
    def parse(cls, text: str) -> PeerSpec:
        """Parse `ID=HOST:PORT`."""
        ident, sep, addr = text.partition("=")
        if not sep:
            raise ConfigError(f"invalid peer {text!r}: expected ID=HOST:PORT, e.g. node-2=127.0.0.1:7001")
        return cls(check_node_id(ident.strip()), Address.parse(addr.strip()))
