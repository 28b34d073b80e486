"""Attacks on the HTTP servers of a real node process (issue 12): slowloris, bad header bytes,
keys on the command line."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import HOST, ProcessCluster, aether_cli

pytestmark = pytest.mark.timeout(90)

KEY = "bootstrap-admin-key-0123456789"
IDLE = 2.0


def api(port: int, method: str, path: str, *, key: str | None = KEY, body: Any = None,
        timeout: float = 10.0) -> tuple[int, Any]:
    """One request to 127.0.0.1:port with the key in X-API-Key: (status, decoded JSON body)."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}", method=method, headers=headers,
        data=None if body is None else json.dumps(body).encode(),
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, json.loads(raw) if raw else None


def wait_ready(c: ProcessCluster, i: int = 0, key: str | None = KEY, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.check_alive([i])
        try:
            if api(c.management_ports[i], "GET", "/api/v1/health", key=key, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"node not ready within {timeout}s\n{c.log_tail(i)}")


@pytest.fixture(scope="module")
def keyed_node(
    make_module_process_cluster: Callable[..., ProcessCluster], tmp_path_factory: pytest.TempPathFactory
) -> ProcessCluster:
    """One node with a key file, shared by the tests of this module: they only send requests
    (slow, malformed or without a key) and read its log and command line; none stops it or
    changes its settings."""
    key_file = tmp_path_factory.mktemp("keyed") / "api.key"
    key_file.write_text(KEY + "\n")
    c = make_module_process_cluster(
        1, start=False,
        extra_args=["--api-key-file", str(key_file), "--http-idle-timeout", str(IDLE)],
    )
    c.start_all()
    wait_ready(c)
    return c


def _half_open(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=10)
    s.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return s


def test_slowloris_connections_are_closed_within_the_idle_timeout(keyed_node: ProcessCluster) -> None:
    c = keyed_node
    ports = [c.management_ports[0], c.http_ports[0]]
    conns = [(port, _half_open(port)) for port in ports for _ in range(5)]
    t0 = time.monotonic()
    open_socks = dict(enumerate(conns))
    closed_after: dict[int, float] = {}
    # trickle one header byte per connection every 0.3 s, as slowloris does, until each is closed
    while open_socks and time.monotonic() - t0 < IDLE + 6:
        time.sleep(0.3)
        for k, (_, s) in list(open_socks.items()):
            try:
                s.sendall(b"a")
                s.settimeout(0.01)
                if s.recv(1024) == b"":
                    raise ConnectionResetError
            except TimeoutError:
                continue
            except OSError:
                closed_after[k] = time.monotonic() - t0
                del open_socks[k]
                s.close()
    for _, s in open_socks.values():
        s.close()
    assert not open_socks, f"{len(open_socks)} slow connections still open after {IDLE + 6} s"
    assert max(closed_after.values()) < IDLE + 3, closed_after
    assert min(closed_after.values()) > IDLE - 1, closed_after
    # both servers still answer complete requests
    assert api(c.management_ports[0], "GET", "/api/v1/status")[0] == 200
    assert api(c.http_ports[0], "GET", "/no-such-route")[0] == 404
    assert "Traceback" not in c.log_text(0)


@pytest.mark.parametrize("header", [b"X-API-Key: \xff\xfe\xfd", b"Authorization: Bearer \xc3\x28"])
def test_non_utf8_key_bytes_are_401_without_traceback(keyed_node: ProcessCluster, header: bytes) -> None:
    c = keyed_node
    with socket.create_connection((HOST, c.management_ports[0]), timeout=10) as s:
        s.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header + b"\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"401", raw[:300]
    assert json.loads(body)["status"] == 401
    # a control byte the parser refuses: 400 from aiohttp, one log line
    with socket.create_connection((HOST, c.management_ports[0]), timeout=10) as s:
        s.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nX-API-Key: a\x01b\r\n\r\n")
        first = s.recv(65536).split(b"\r\n", 1)[0]
    assert first.split(b" ")[1] == b"400", first
    assert api(c.management_ports[0], "GET", "/api/v1/status")[0] == 200
    log = c.log_text(0)
    assert "Traceback" not in log and " 500" not in log
    assert "malformed HTTP request refused (400" in log


def test_key_file_keeps_the_key_out_of_the_command_line(keyed_node: ProcessCluster) -> None:
    pid = keyed_node.pid(0)
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"--api-key-file" in cmdline and KEY.encode() not in cmdline
    assert "--api-key KEY shows the key" not in keyed_node.log_text(0)
    assert api(keyed_node.management_ports[0], "GET", "/api/v1/status", key=None)[0] == 401


def test_the_flag_form_warns_and_the_environment_does_not(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "AETHER_API_KEY"}
    port = "1"  # nothing listens there: the commands fail after reading their options
    flag = aether_cli("--connect", f"{HOST}:{port}", "--api-key", "k1", "status", env=env, timeout=30)
    assert "warning: --api-key KEY shows the key" in flag.stderr
    env_key = {**env, "AETHER_API_KEY": "k1"}
    quiet = aether_cli("--connect", f"{HOST}:{port}", "status", env=env_key, timeout=30)
    assert "warning" not in quiet.stderr and quiet.returncode == 3
    node = aether_cli("node", "--api-key", "k2", "--peers", "not a peer", env=env, timeout=30)
    assert "warning: --api-key KEY shows the key" in node.stderr and node.returncode == 2
    f = tmp_path / "k"
    f.write_text("k3\n")
    both = aether_cli("node", "--api-key", "k2", "--api-key-file", str(f), env=env, timeout=30)
    assert both.returncode == 2 and "not both" in both.stderr
    f.write_text("\n")
    empty = aether_cli("node", "--api-key-file", str(f), env=env, timeout=30)
    assert empty.returncode == 2 and "printable ASCII" in empty.stderr


def _until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_roles_across_nodes_with_the_cli(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path
) -> None:
    import os

    key_file = tmp_path / "api.key"
    key_file.write_text(KEY)
    c = make_process_cluster(3, start=False, extra_args=["--api-key-file", str(key_file)])
    c.start_all()
    for i in range(3):
        wait_ready(c, i)
    env = {k: v for k, v in os.environ.items() if k != "AETHER_API_KEY"}
    admin_env = {**env, "AETHER_API_KEY": KEY}

    def cli(*args: str, on: int = 0, e: dict[str, str] = admin_env) -> Any:
        return aether_cli("--connect", f"{HOST}:{c.management_ports[on]}", *args, env=e, timeout=60)

    made = cli("key", "create", "reader", "--role", "read")
    assert made.returncode == 0, made.stderr
    reader = made.stdout.strip()
    assert reader.startswith("reader.") and "shown only now" in made.stderr
    made = cli("--json", "key", "create", "ops", "--role", "operate")
    assert made.returncode == 0, made.stderr
    ops = json.loads(made.stdout)["key"]
    # stored hashed in the replicated store: another node knows the keys
    _until(lambda: api(c.management_ports[2], "GET", "/api/v1/status", key=ops)[0] == 200)
    listed = json.loads(cli("--json", "key", "list", on=1).stdout)
    assert [(k["name"], k["role"]) for k in listed] == [("ops", "operate"), ("reader", "read")]
    assert KEY not in c.log_text(0) and reader.split(".")[1] not in c.log_text(0)

    deploy = {"artifact": "org.example:hello:1.0.0", "instances": 1}
    status, doc = api(c.management_ports[1], "POST", "/api/v1/deploy", key=reader, body=deploy)
    assert status == 403 and "'operate' role" in doc["detail"]
    assert api(c.management_ports[1], "GET", "/api/v1/slices", key=reader)[0] == 200
    status, doc = api(c.management_ports[1], "POST", "/api/v1/maps", key=reader, body={"name": "m1"})
    assert status == 403
    status_map, doc = api(c.management_ports[1], "POST", "/api/v1/maps", key=ops, body={"name": "m1"})
    assert status_map in (200, 201), doc
    status, doc = api(c.management_ports[1], "POST", "/api/v1/deploy", key=ops, body=deploy)
    assert status not in (401, 403), doc  # past the role check (the artifact itself may be unknown)
    assert api(c.management_ports[1], "GET", "/api/v1/keys", key=ops)[0] == 403
    denied = cli("key", "list", e={**env, "AETHER_API_KEY": ops})
    assert denied.returncode == 1 and "'admin' role" in denied.stderr

    revoked = cli("key", "revoke", "ops", on=2)
    assert revoked.returncode == 0, revoked.stderr
    for i in range(3):
        _until(lambda i=i: api(c.management_ports[i], "GET", "/api/v1/status", key=ops)[0] == 401)
    assert api(c.management_ports[0], "GET", "/api/v1/status", key=reader)[0] == 200
    assert cli("key", "revoke", "ops").returncode == 1

    # audit: node-2 served the role checks above; each write with who, what, when and result
    out = cli("--json", "audit", "--limit", "50", on=1)
    assert out.returncode == 0, out.stderr
    got = [(e["key"], e["method"], e["path"], e["target"], e["status"]) for e in json.loads(out.stdout)]
    assert got[:3] == [
        ("reader", "POST", "/api/v1/deploy", "org.example:hello:1.0.0", 403),
        ("reader", "POST", "/api/v1/maps", "m1", 403),
        ("ops", "POST", "/api/v1/maps", "m1", status_map),
    ]
    assert got[3][:4] == ("ops", "POST", "/api/v1/deploy", "org.example:hello:1.0.0")
    assert len(got) == 4  # reads are not audited
    entries = json.loads(out.stdout)
    assert all(e["remote"] == HOST and e["node"] == "node-2" and e["time"] > 0 for e in entries)
    assert "audit: key=reader remote=127.0.0.1 POST /api/v1/deploy target=org.example:hello:1.0.0 -> 403" in (
        c.log_text(1)
    )
    table = cli("audit", on=2, e={**admin_env, "COLUMNS": "200"})
    assert table.returncode == 0 and "DELETE" in table.stdout and "/api/v1/keys/ops" in table.stdout
    assert cli("audit", on=1, e={**env, "AETHER_API_KEY": reader}).returncode == 1
    assert "Traceback" not in c.log_text(0) + c.log_text(1) + c.log_text(2)
