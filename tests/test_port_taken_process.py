"""A node whose management API or HTTP router port another process holds exits BEFORE it joins.

Real `aether node` processes on loopback. Found walking docs/operations.md: the HTTP router and
the management API bind after the node has recovered its journal, opened its cluster port and
dialed the members; with the port taken the node joined the cluster (quorum, map partitions,
slices placed on it), then exited with status 1 and left again, every `RestartSec` (2 s) under
the guide's systemd unit.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from conftest import HOST, ProcessCluster

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("which", ["management", "http"])
def test_a_node_whose_port_is_taken_exits_before_joining(
    make_process_cluster: Callable[..., ProcessCluster], which: str
) -> None:
    c = make_process_cluster(3, start=False)
    c.start(0)
    c.start(1)
    c.wait_quorum(30, nodes=[0, 1])
    port = c.management_ports[2] if which == "management" else c.http_ports[2]
    what = "management API" if which == "management" else "HTTP router"
    with socket.socket() as holder:  # another service on node-3's port
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((HOST, port))
        holder.listen()
        c.start(2)
        proc = c.procs[2]
        assert proc is not None
        rc = proc.wait(timeout=30)
        c.procs[2] = None
    log = c.log_text(2)
    assert rc == 1, log
    assert f"cannot start node node-3: [Errno 98] {what} cannot listen on {HOST}:{port}" in log, log
    # nothing started before the refusal: no cluster port, no consensus, no member reached
    assert f"listening on {HOST}:{c.cluster_ports[2]}" not in log, log
    assert "recovered at slot" not in log and "quorum gained" not in log, log
    time.sleep(0.5)  # (a link that came up would show in the members' logs by now)
    for i in (0, 1):
        assert "peer node-3 up" not in c.log_text(i), c.log_text(i)[-3000:]
