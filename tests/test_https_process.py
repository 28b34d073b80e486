"""Node certificates for HTTPS clients (issue 12): `aether cert issue --san`, and the node id
binding of certificates that name hosts besides the node id."""

from __future__ import annotations

import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aether.transport.tls import cert_node_id, file_node_id
from conftest import HOST, aether_cli

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
