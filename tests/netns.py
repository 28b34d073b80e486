"""Separate hosts on one machine: one Linux network namespace per host, each with its own address
on a bridge (veth pairs), created by the test as root and removed afterwards.

`Hosts(n)` makes `n` hosts (`hosts[i].address`); `run(i, argv)` starts a process inside host `i`
(its PID is kept and the process is killed on `close`); `cut(i)` / `heal(i)` take host `i`'s link
down and up (its processes keep running and can still reach their own address); `close()` kills
what it started and removes the namespaces, the veth pairs and the bridge, also after a failure.

Names carry the test process's pid and a counter, and the subnet is chosen free among
10.200-254.x, so parallel runs do not collide. `unavailable()` says why namespaces cannot be made
here (not root, no `ip`, or the kernel refuses), for `pytest.skip`.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_COUNTER = itertools.count(1)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"aeprobe{os.getpid() % 100000}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _used_subnets() -> set[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show", check=False).stdout
    nets: set[ipaddress.IPv4Network] = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


@dataclass
class Host:
    index: int
    netns: str
    address: str
    host_if: str  # the bridge side of its veth pair (in the root namespace)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


class Hosts:
    def __init__(self, n: int) -> None:
        tag = f"{os.getpid() % 100000}{next(_COUNTER)}"
        self.bridge = f"aeb{tag}"[:15]
        used = _used_subnets()
        for third in range(200, 255):
            net = ipaddress.ip_network(f"10.{third}.{os.getpid() % 250}.0/24")
            if not any(net.overlaps(u) for u in used):
                break
        else:
            raise RuntimeError("no free 10.x.y.0/24 subnet for the test hosts")
        self.subnet = net
        hosts = list(net.hosts())
        self.gateway = str(hosts[-1])  # the bridge's own address: how the test process reaches them
        self.hosts: list[Host] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(n):
                ns = f"aen{tag}h{i}"
                host_if, ns_if = f"aev{tag}h{i}"[:15], f"aev{tag}n{i}"[:15]
                address = str(hosts[i])
                _ip("netns", "add", ns)
                self.hosts.append(Host(i, ns, address, host_if))
                _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
                _ip("link", "set", ns_if, "netns", ns)
                _ip("link", "set", host_if, "master", self.bridge)
                _ip("link", "set", host_if, "up")
                _ip("-n", ns, "addr", "add", f"{address}/{net.prefixlen}", "dev", ns_if)
                _ip("-n", ns, "link", "set", ns_if, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def run(
        self, i: int, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside host `i`, output to `log`; killed by `close`."""
        out = open(log, "ab")  # noqa: SIM115 (the child keeps it)
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[i].netns, *argv],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        finally:
            out.close()
        self.hosts[i].procs.append(proc)
        return proc

    def exec(self, i: int, argv: Sequence[str], *, timeout: float = 60, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside host `i` to completion."""
        return subprocess.run(["ip", "netns", "exec", self.hosts[i].netns, *argv], capture_output=True,
                              text=True, timeout=timeout, env=env, check=False)

    def cut(self, i: int) -> None:
        """Host `i` loses its network (its link goes down); its processes keep running."""
        _ip("link", "set", self.hosts[i].host_if, "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.hosts[i].host_if, "up")

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
        """SIGTERM `proc` (its whole session), then SIGKILL after `timeout`."""
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def close(self) -> None:
        for host in self.hosts:
            for proc in host.procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(5)
        for host in self.hosts:
            # the veth pair first: a namespace outlives its name while a socket in it lingers
            _ip("link", "del", host.host_if, check=False)
            _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", self.bridge, check=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            host.netns in _ip("netns", "list", check=False).stdout for host in self.hosts
        ):
            time.sleep(0.05)
