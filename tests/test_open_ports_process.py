"""A node listening beyond loopback without an API key refuses to start BEFORE it joins the cluster.

Real `aether node` processes, each host in its own network namespace (tests/netns.py; skipped
where namespaces cannot be made). Found walking docs/operations.md: the management API, which
refuses to listen beyond loopback without a key, binds last; by then the node had dialed the
members, taken part in consensus, taken map partitions over and started its HTTP router, and then
it exited (status 2) and left again. Under the guide's systemd unit (`Restart=on-failure`,
`RestartSec=2s`) it did so every 2 s.
"""

from __future__ import annotations

import time

import pytest

import test_netns_cluster as netns_cluster
from test_netns_cluster import CLUSTER_PORT, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

cluster = netns_cluster.cluster  # the fixture: 4 hosts, their certificates, the API key file


def test_a_node_without_an_api_key_beyond_loopback_never_joins(cluster: Cluster) -> None:
    c = cluster
    for i in (0, 1):
        c.start(i, [0, 1, 2])
    c.wait_ready([0, 1])
    argv = c.node_argv(2, [0, 1, 2])
    k = argv.index("--api-key-file")
    del argv[k : k + 2]  # node-3 as an operator forgot its key
    (c.dir / c.ids[2]).mkdir(exist_ok=True)
    t0 = time.monotonic()
    res = c.hosts.exec(2, argv, timeout=60, env=netns_cluster._env())
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.startswith(
        f"error: the management API would listen on '{c.address(2)}', beyond loopback, without an API key"
    ), res.stderr
    # it did not start anything before refusing: no cluster port, no router, no consensus
    for started in (f"listening on {c.address(2)}:{CLUSTER_PORT}", "HTTP router", "quorum gained"):
        assert started not in res.stderr, res.stderr
    # and the members never saw it (give a link that came up time to show in their logs)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    for i in (0, 1):
        log = (c.dir / f"{c.ids[i]}.log").read_text()
        assert "peer node-3 up" not in log, log[-3000:]
