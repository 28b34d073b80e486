"""HTTPS on the management API and the HTTP router (issue 12; docs/cluster-security.md, *HTTPS*):
a real `aether node --https` process with certificates from the real `aether cert` commands, the
CLI over HTTPS (with and without --ca, plain HTTP to the HTTPS port), a slice route served over
HTTPS, start-up refusals naming the flag, node certificates with extra subjectAltNames, and a
local cluster started with `aether cluster start --tls`."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aether.transport.tls import cert_node_id, file_node_id
from conftest import EXAMPLES, HOST, LocalCluster, ProcessCluster, aether_cli, deploy_hello_examples

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _cli_ok(*args: str, **kw: Any) -> str:
    r = aether_cli(*args, **kw)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def https(port: int, method: str, path: str, *, ca: Path, body: Any = None, host: str = HOST,
          timeout: float = 10.0) -> tuple[int, Any]:
    """One HTTPS request verified against `ca`: (status, decoded JSON body)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(
        f"https://{host}:{port}{path}", method=method, headers={"Content-Type": "application/json"},
        data=None if body is None else json.dumps(body).encode(),
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("https") / "tls"
    _cli_ok("cert", "init", "--dir", str(d))
    for node_id in ("node-1", "node-2"):
        _cli_ok("cert", "issue", node_id, "--dir", str(d))
    return d


# -- certificates --------------------------------------------------------------------------------------


def _sans(cert: Path) -> tuple[list[str], list[str]]:
    from cryptography import x509

    c = x509.load_pem_x509_certificate(cert.read_bytes())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def test_cert_issue_names_the_node_first_then_the_hosts(ca_dir: Path) -> None:
    dns, ips = _sans(ca_dir / "node-1.crt")
    assert dns == ["node-1", "localhost"] and ips == ["127.0.0.1", "::1"]  # the loopback defaults
    out = _cli_ok("cert", "issue", "node-7", "--dir", str(ca_dir), "--san", "api.example.com",
                  "--san", "10.1.2.3", "--san", "[fd00::5]")
    assert "api.example.com, 10.1.2.3" in out
    dns, ips = _sans(ca_dir / "node-7.crt")
    assert dns == ["node-7", "api.example.com"] and ips == ["10.1.2.3", str(ipaddress.ip_address("fd00::5"))]
    # the node id binding still holds with several DNS names
    assert file_node_id(str(ca_dir / "node-7.crt")) == "node-7"
    assert file_node_id(str(ca_dir / "node-1.crt")) == "node-1"
    bad = aether_cli("cert", "issue", "node-8", "--dir", str(ca_dir), "--san", "not a host!")
    assert bad.returncode == 2 and "--san 'not a host!' is neither an IP address nor a DNS name" in bad.stderr


@pytest.mark.parametrize(
    ("subject_cn", "dns", "expected"),
    [
        (["node-1"], ["node-1", "localhost"], "node-1"),  # aether cert issue with SANs
        (["node-1"], ["node-1"], "node-1"),  # aether cert issue before SANs
        ([], ["node-2"], "node-2"),  # no CN: the single DNS name
        (["Node one"], ["node-1"], "node-1"),  # a CN that is not a name of the certificate
        (["node-1"], [], "node-1"),  # CN only
        ([], ["node-1", "node-2"], None),  # ambiguous
        (["other"], ["node-1", "node-2"], None),
    ],
)
def test_cert_node_id(subject_cn: list[str], dns: list[str], expected: str | None) -> None:
    peercert = {
        "subject": tuple((("commonName", cn),) for cn in subject_cn),
        "subjectAltName": (*(("DNS", d) for d in dns), ("IP Address", "127.0.0.1")),
    }
    assert cert_node_id(peercert) == expected


# -- a node serving HTTPS ---------------------------------------------------------------------------------


def _tls_args(d: Path, node_id: str = "node-1") -> list[str]:
    return ["--tls-cert", str(d / f"{node_id}.crt"), "--tls-key", str(d / f"{node_id}.key"),
            "--tls-ca", str(d / "ca.crt")]


def wait_https_ready(c: ProcessCluster, ca: Path, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.check_alive([0])
        try:
            if https(c.management_ports[0], "GET", "/api/v1/health", ca=ca, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"node not ready over HTTPS within {timeout}s\n{c.log_tail(0)}")


@pytest.fixture(scope="module")
def https_node(
    make_module_process_cluster: Callable[..., ProcessCluster], ca_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ProcessCluster:
    """One node serving HTTPS, shared by the tests of this module: they connect to it (over HTTPS,
    plain HTTP, with and without the CA) and one applies the hello blueprint; none stops it or
    depends on what another did."""
    c = make_module_process_cluster(1, start=False, extra_args=[*_tls_args(ca_dir), "--https"])
    deploy_hello_examples(c.repository, tmp_path_factory.mktemp("wheels"))
    c.start_all()
    wait_https_ready(c, ca_dir / "ca.crt")
    return c


def test_cli_over_https_verifies_the_node(https_node: ProcessCluster, ca_dir: Path) -> None:
    c = https_node
    port = c.management_ports[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETHER_")}
    ca = str(ca_dir / "ca.crt")
    for host in (HOST, "localhost"):  # an IP and a DNS subjectAltName
        out = _cli_ok("--connect", f"https://{host}:{port}", "--ca", ca, "status", env=env)
        assert "node-1" in out and "Quorum: yes" in out, out
    assert '"ready": true' in _cli_ok("--connect", f"https://{HOST}:{port}", "--json", "health",
                                      env=dict(env, AETHER_CA=ca))
    # without the CA the certificate cannot be verified: exit 3, naming the problem and --ca
    r = aether_cli("--connect", f"https://{HOST}:{port}", "status", env=env)
    assert r.returncode == 3, r.stderr
    assert "certificate verify failed" in r.stderr and "--ca FILE" in r.stderr, r.stderr
    # another CA does not verify it either
    other = ca_dir.parent / "other-ca"
    _cli_ok("cert", "init", "--dir", str(other))
    r = aether_cli("--connect", f"https://{HOST}:{port}", "--ca", str(other / "ca.crt"), "status", env=env)
    assert r.returncode == 3 and "certificate verify failed" in r.stderr, r.stderr
    # plain HTTP to the HTTPS port: a clear error, at once
    t0 = time.monotonic()
    r = aether_cli("--connect", f"{HOST}:{port}", "--timeout", "20", "status", env=env)
    assert r.returncode == 3 and f"--connect https://{HOST}:{port}" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10
    # HTTPS to a plain HTTP port (the CLI's own check): "does not speak HTTPS"
    with socket.socket() as plain:
        plain.bind((HOST, 0))
        plain.listen()
        plain_port = plain.getsockname()[1]
        # a listener that answers like an HTTP server to whatever arrives
        import threading

        def answer() -> None:
            conn, _ = plain.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        r = aether_cli("--connect", f"https://{HOST}:{plain_port}", "--ca", ca, "status", env=env)
        t.join(10)
    assert r.returncode == 3 and "does not speak HTTPS" in r.stderr, r.stderr
    # a missing --ca file is a usage error
    r = aether_cli("--connect", f"https://{HOST}:{port}", "--ca", str(ca_dir / "nope.crt"), "status", env=env)
    assert r.returncode == 2 and "--ca" in r.stderr and "no such file" in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["management", "http"])
def test_plain_http_to_the_https_port_is_refused_without_hanging(
    https_node: ProcessCluster, which: str
) -> None:
    c = https_node
    port = c.management_ports[0] if which == "management" else c.http_ports[0]
    t0 = time.monotonic()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        try:
            while chunk := s.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 5
    assert b"HTTP/1.1" not in raw and b"node-1" not in raw, raw[:200]  # nothing served in the clear
    # urllib over plain HTTP fails too, and the node still serves HTTPS afterwards
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{HOST}:{port}/api/v1/status", timeout=5)
    assert "Traceback" not in c.log_text(0)


def test_router_serves_a_slice_route_over_https(https_node: ProcessCluster, ca_dir: Path) -> None:
    c = https_node
    ca = ca_dir / "ca.crt"
    text = (EXAMPLES / "hello.blueprint").read_text()
    status, doc = https(c.management_ports[0], "POST", "/api/v1/blueprints", ca=ca,
                        body={"toml": text, "filename": "hello.blueprint"})
    assert status == 201, doc
    status, doc = https(c.management_ports[0], "POST", "/api/v1/blueprints/hello:0.1.0/wait?timeout=60",
                        ca=ca, timeout=70)
    assert status == 200, doc
    deadline = time.monotonic() + 20
    while True:
        status, doc = https(c.http_ports[0], "GET", "/hello/tls", ca=ca, host="localhost")
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, doc
    assert "tls" in json.dumps(doc), doc
    assert c.log_lines(0, "HTTP router of node-1 listening on https://")


def test_https_config_errors_name_the_flag(
    make_process_cluster: Callable[..., ProcessCluster], ca_dir: Path, tmp_path: Path
) -> None:
    c = make_process_cluster(1, start=False)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    cases = [
        (["--http-tls-cert", str(ca_dir / "node-1.crt")], "--http-tls-cert needs --http-tls-key"),
        (["--http-tls-key", str(ca_dir / "node-1.key")], "--http-tls-key needs --http-tls-cert"),
        (["--https"], "--https needs a server certificate"),
        (["--http-tls-cert", str(tmp_path / "missing.crt"), "--http-tls-key", str(ca_dir / "node-1.key")],
         f"--http-tls-cert {tmp_path / 'missing.crt'}: no such file"),
        (["--http-tls-cert", str(ca_dir / "node-1.crt"), "--http-tls-key", str(garbage)],
         "cannot be loaded"),
        (["--http-tls-cert", str(ca_dir / "node-1.crt"), "--http-tls-key", str(ca_dir / "node-2.key")],
         "the key does not"),
        (["--http-tls-cert", str(ca_dir / "node-1.crt"), "--http-tls-key", str(tmp_path)],
         f"--http-tls-key {tmp_path}: no such file"),
    ]
    for args, needle in cases:
        r = aether_cli(*c.command(0)[3:], *args, env=c.env, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)


# -- aether cluster start --tls ------------------------------------------------------------------------------


@pytest.fixture
def tls_local_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    work = tmp_path / "work"
    work.mkdir()
    lc = LocalCluster(work / ".aether" / "cluster", 3)
    try:
        yield lc, work
    finally:
        lc.close()


def test_cluster_start_tls_then_status_over_https(tls_local_cluster: tuple[LocalCluster, Path]) -> None:
    lc, work = tls_local_cluster
    r = aether_cli(
        "cluster", "start", "--tls", "--base-port-offset", str(lc.port_offset), "--timeout", "60",
        env=lc.env, cwd=work, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    tls_dir = lc.dir / "tls"
    ca = tls_dir / "ca.crt"
    assert f"curl --cacert {ca.resolve()} https://{HOST}:{lc.management_port(0)}" in r.stdout, r.stdout
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    for name in ("ca.key", "ca.crt", "node-1.key", "node-1.crt", "node-3.key"):
        assert stat.S_IMODE((tls_dir / name).stat().st_mode) == 0o600, name
    # the nodes linked up over mutual TLS
    for i in range(3):
        assert "mutual TLS" in lc.log_text(i), lc.log_text(i)[-2000:]
    # `aether status` finds the CA of the cluster in ./.aether/cluster: https without --ca
    out = _cli_ok("--connect", lc.connect(1), "status", env=lc.env, cwd=work)
    assert f"https://{lc.connect(1)}" in out and "Quorum: yes" in out and "3/3 nodes up" in out, out
    out = _cli_ok("cluster", "status", env=lc.env, cwd=work)
    assert "3/3 nodes up" in out, out
    # the API is HTTPS only, verified by the generated CA
    status, doc = https(lc.management_port(0), "GET", "/api/v1/status", ca=ca)
    assert status == 200 and doc["quorum"] and {m["state"] for m in doc["nodes"]} == {"up"}, doc
    status, doc = https(lc.http_port(2), "GET", "/no-such-route", ca=ca, host="localhost")
    assert status == 404, doc
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://{HOST}:{lc.management_port(0)}/api/v1/status", timeout=5)
    # from elsewhere (no cluster record beside) the CA is needed
    r = aether_cli("--connect", f"https://{lc.connect(0)}", "status", env=lc.env, cwd=work.parent)
    assert r.returncode == 3 and "certificate verify failed" in r.stderr, r.stderr
    # a restarted node gets its TLS flags back from the record
    r = aether_cli("cluster", "restart", "node-2", "--timeout", "60", env=lc.env, cwd=work, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3/3 nodes up" in r.stdout, r.stdout
    r = aether_cli("cluster", "stop", env=lc.env, cwd=work)
    assert r.returncode == 0, r.stderr


def test_cluster_started_with_tls_comes_back_with_tls_and_its_settings(
    tls_local_cluster: tuple[LocalCluster, Path],
) -> None:
    """A stopped cluster created with --tls starts again with TLS and the recorded secret, node
    count and ports when `aether cluster start` is given no flags (it used to re-plan from the
    flags: the nodes came back on plain TCP and HTTP, on the default ports); flags that conflict
    with what the nodes' data records are refused."""
    lc, work = tls_local_cluster
    r = aether_cli(
        "cluster", "start", "--tls", "--base-port-offset", str(lc.port_offset), "--timeout", "60",
        env=lc.env, cwd=work, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    ca = lc.dir / "tls" / "ca.crt"
    r = aether_cli("cluster", "stop", env=lc.env, cwd=work)
    assert r.returncode == 0, r.stderr
    # a cluster.json of an older release has no secret_id: it must still start
    record = json.loads((lc.dir / "cluster.json").read_text())
    assert record["secret_id"], record
    del record["secret_id"]
    (lc.dir / "cluster.json").write_text(json.dumps(record))
    logs_before = [lc.log_path(i).stat().st_size for i in range(3)]

    r = aether_cli("cluster", "start", "--timeout", "60", env=lc.env, cwd=work, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3/3 nodes up" in r.stdout and f"curl --cacert {ca.resolve()}" in r.stdout, r.stdout
    status, doc = https(lc.management_port(0), "GET", "/api/v1/status", ca=ca)
    assert status == 200 and doc["quorum"] and len(doc["nodes"]) == 3, doc
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://{HOST}:{lc.management_port(1)}/api/v1/status", timeout=5)
    for i in range(3):  # this run of every node linked over mutual TLS
        with lc.log_path(i).open("rb") as f:
            f.seek(logs_before[i])
            assert b"mutual TLS" in f.read(), lc.log_text(i)[-2000:]
    assert json.loads((lc.dir / "cluster.json").read_text())["secret_id"] == record_secret_id(lc)

    r = aether_cli("cluster", "stop", env=lc.env, cwd=work)
    assert r.returncode == 0, r.stderr
    # another node count than the nodes' data records cannot start: refused before starting any
    r = aether_cli("cluster", "start", "--nodes", "5", env=lc.env, cwd=work)
    assert r.returncode == 1 and "was created with 3 node(s)" in r.stderr, r.stderr
    assert "drop --nodes" in r.stderr, r.stderr
    # nor another secret than the one the cluster was started with (its clients hold that one)
    other = dict(lc.env, AETHER_CLUSTER_SECRET="0123456789abcdef0123456789abcdef")
    r = aether_cli("cluster", "start", env=other, cwd=work)
    assert r.returncode == 1 and "not the one the cluster of" in r.stderr, r.stderr
    assert not lc.dir.joinpath("node-1.pid").exists()
    # the cluster's own secret given explicitly is that secret: fine
    same = dict(lc.env, AETHER_CLUSTER_SECRET_FILE=str(lc.dir / "cluster.secret"))
    r = aether_cli("cluster", "start", "--timeout", "60", env=same, cwd=work, timeout=120)
    assert r.returncode == 0 and "3/3 nodes up" in r.stdout, r.stdout + r.stderr
    status, _ = https(lc.management_port(2), "GET", "/api/v1/status", ca=ca)
    assert status == 200
    # a node restarted with another secret could not link with the running ones: refused
    r = aether_cli("cluster", "restart", "node-3", env=other, cwd=work)
    assert r.returncode == 1 and "running nodes" in r.stderr, r.stderr
    r = aether_cli("cluster", "status", env=lc.env, cwd=work)  # refused before stopping node-3
    assert r.returncode == 0 and "3/3 nodes up" in r.stdout, r.stdout
    r = aether_cli("cluster", "stop", env=lc.env, cwd=work)
    assert r.returncode == 0, r.stderr


def record_secret_id(lc: LocalCluster) -> str:
    from aether.cli.local_cluster import secret_id

    return secret_id(lc.secret)
