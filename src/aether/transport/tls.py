"""Mutual TLS between nodes: a cluster CA, node certificates bound to node ids, SSL contexts.

`init_ca` writes a cluster CA (``ca.key`` + self-signed ``ca.crt``); `issue_node_cert` writes
``NODE_ID.key`` + ``NODE_ID.crt`` signed by it, with the node id as the subject CN and the first
DNS subjectAltName, followed by the host names and IP addresses HTTPS clients reach the node by
(default ``localhost``, ``127.0.0.1``, ``::1``). Keys are written 0600 in 0700 directories. `server_context` /
`dialer_context` build TLS 1.3 contexts that require and verify the other side's certificate
against the cluster CA; `cert_node_id` reads the node id out of a verified peer certificate, which
the transport compares with the id claimed in the hello (see docs/cluster-security.md).
`https_server_context` is the TLS 1.2+ context of the management API and the HTTP router when
they serve HTTPS (`https_files` picks the certificate a `NodeConfig` names for them).

Keys and certificates are generated with the `cryptography` package: the standard `ssl` module
can load and verify them but cannot create them.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aether.core.errors import ConfigError
from aether.core.files import make_private_dirs, write_private
from aether.core.types import check_node_id

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_SANS",
    "TlsFiles",
    "cert_node_id",
    "dialer_context",
    "file_node_id",
    "https_context",
    "https_server_context",
    "init_ca",
    "issue_node_cert",
    "server_context",
    "tls_files",
    "tls_problem",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
NODE_DAYS = 825
# what a client on the same machine connects to: the names HTTPS certificates carry by default
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """A node's TLS material: its certificate and key, and the cluster CA certificate."""

    cert: str
    key: str
    ca: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[no-any-return]


def init_ca(directory: Path | str, *, cluster_name: str = "aether", force: bool = False) -> tuple[Path, Path]:
    """Create the cluster CA in `directory`: ``ca.key`` (0600) and self-signed ``ca.crt``.

    Refuses (ConfigError) to overwrite an existing CA key unless `force`: every node certificate
    issued by the old one would stop being accepted. Returns (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    make_private_dirs(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if key_path.exists() and not force:
        raise ConfigError(
            f"{key_path} already exists: a new CA would invalidate every node certificate it issued; "
            "use another --dir, or remove it first if that is what you want"
        )
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"aether cluster CA ({cluster_name})")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    write_private(cert_path, _cert_pem(cert))
    return cert_path, key_path


def issue_node_cert(
    directory: Path | str,
    node_id: str,
    *,
    days: int = NODE_DAYS,
    sans: Sequence[str] = DEFAULT_SANS,
    _not_valid_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate for `node_id`, signed by the CA in `directory`: writes
    ``NODE_ID.crt`` and ``NODE_ID.key`` (0600) there and returns (cert path, key path).

    The node id is the subject CN and the first DNS subjectAltName; `sans` (host names or IP
    addresses) follow it, for HTTPS clients of the management API and the HTTP router, which
    check that the certificate names the host they connected to. The certificate may serve as
    both TLS server and client (a node both accepts and dials). `_not_valid_after` is for tests
    (an already expired certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    check_node_id(node_id)
    alt_names = _alt_names(node_id, sans)
    directory = Path(directory)
    ca_cert_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if not ca_key_path.exists() or not ca_cert_path.exists():
        raise ConfigError(
            f"no cluster CA in {directory} ({CA_KEY}, {CA_CERT}): create it with `aether cert init`"
        )
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = _new_key()
    now = _now()
    not_after = _not_valid_after if _not_valid_after is not None else now + datetime.timedelta(days=days)
    not_before = min(now - datetime.timedelta(minutes=5), not_after - datetime.timedelta(days=1))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = directory / f"{node_id}.crt", directory / f"{node_id}.key"
    write_private(key_path, _key_pem(key))
    write_private(cert_path, _cert_pem(cert))
    return cert_path, key_path


def _alt_names(node_id: str, sans: Sequence[str]) -> list[Any]:
    """The subjectAltNames of `node_id`'s certificate: the node id first, then `sans` (an IP
    address becomes an iPAddress entry, anything else a dNSName), without duplicates."""
    import ipaddress

    from cryptography import x509

    out: list[Any] = [x509.DNSName(node_id)]
    for raw in sans:
        name = raw.strip().strip("[]")
        if not name:
            raise ConfigError("--san needs a host name or an IP address (got an empty value)")
        try:
            entry: Any = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            if not all(part and len(part) <= 63 for part in name.lower().split(".")) or not all(
                c.isalnum() or c in "-.*" for c in name
            ):
                raise ConfigError(f"--san {raw!r} is neither an IP address nor a DNS name") from None
            entry = x509.DNSName(name.lower())
        if entry not in out:
            out.append(entry)
    return out


def _check_files(files: TlsFiles) -> None:
    for what, path in (("--tls-cert", files.cert), ("--tls-key", files.key), ("--tls-ca", files.ca)):
        if not Path(path).is_file():
            raise ConfigError(
                f"{what} {path}: no such file (create them with `aether cert init` / `aether cert issue`)"
            )


def _context(purpose: ssl.Purpose, files: TlsFiles) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are dialed by address; the node id is checked against the hello
    ctx.verify_mode = ssl.CERT_REQUIRED
    _check_files(files)
    try:
        ctx.load_verify_locations(cafile=files.ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-ca {files.ca} is not a PEM CA certificate: {exc}") from exc
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"--tls-cert {files.cert} / --tls-key {files.key} cannot be loaded (not PEM, or the key "
            f"does not match the certificate): {exc}"
        ) from exc
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """TLS 1.3, the node's certificate, and a client certificate signed by the CA required."""
    return _context(ssl.Purpose.CLIENT_AUTH, files)


def dialer_context(files: TlsFiles) -> ssl.SSLContext:
    """TLS 1.3, the node's certificate offered, the acceptor's certificate verified against the CA."""
    return _context(ssl.Purpose.SERVER_AUTH, files)


def _pick_node_id(cns: Sequence[str], dns: Sequence[str]) -> str | None:
    """The node id a certificate names: its subject CN if it has exactly one and that CN is also
    among its DNS subjectAltNames (or it has none), else its only DNS subjectAltName; None if
    that leaves no single name. Certificates of `aether cert issue` carry the node id as CN and
    first DNS name, and the host names HTTPS clients use after it."""
    if len(cns) == 1 and (not dns or cns[0] in dns):
        return cns[0]
    return dns[0] if len(dns) == 1 else None


def cert_node_id(peercert: dict[str, Any] | None) -> str | None:
    """The node id a verified certificate (``SSLObject.getpeercert()``) names (`_pick_node_id`)."""
    if not peercert:
        return None
    dns = [v for k, v in peercert.get("subjectAltName", ()) if k == "DNS"]
    cns = [v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return _pick_node_id(cns, dns)


def file_node_id(cert_path: str) -> str | None:
    """The node id named by the PEM certificate at `cert_path` (for checks at start-up)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    dns: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    cns = [str(a.value) for a in cert.subject if a.oid == x509.oid.NameOID.COMMON_NAME]
    return _pick_node_id(cns, dns)


def tls_problem(exc: BaseException) -> str:
    """A sentence for a failed TLS handshake, naming the cause and what to do."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        if "expired" in why:
            return f"its certificate has expired ({why}); issue a new one with `aether cert issue NODE_ID`"
        if "not yet valid" in why:
            return f"its certificate is not valid yet ({why}); check the clocks"
        return (
            f"its certificate is not signed by this cluster's CA (--tls-ca): {why}; issue it with "
            "`aether cert issue NODE_ID` from the same CA directory"
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
                      "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD"):
            return (
                f"it did not start a TLS handshake ({reason}): this node requires TLS on the cluster "
                "port; start the other side with --tls-cert/--tls-key/--tls-ca too (a client: "
                "AetherClient(tls=TlsFiles(cert, key, ca)))"
            )
        if "ALERT" in reason.upper():  # the other side refused *our* certificate
            return (
                f"the other side refused this node's certificate ({reason}): it trusts another CA, or "
                "this node's certificate expired; check both nodes' --tls-ca and `aether cert issue`"
            )
        if "CERTIFICATE" in reason.upper() or "PEER_DID_NOT_RETURN" in reason.upper():
            return (
                f"TLS handshake failed ({reason}): it presented no certificate from this cluster's CA; "
                "start it with --tls-cert/--tls-key/--tls-ca"
            )
        return f"TLS handshake failed ({reason}: {exc})"
    return f"TLS handshake failed ({type(exc).__name__}: {exc})"


def tls_files(config: Any) -> TlsFiles | None:
    """The TLS files a `NodeConfig` names (None without TLS), checked: they exist and the
    certificate is this node's own (a node refuses to start with another node's certificate)."""
    if not config.tls_cert:
        return None
    files = TlsFiles(config.tls_cert, config.tls_key, config.tls_ca)
    _check_files(files)
    try:
        named = file_node_id(files.cert)
    except ValueError as exc:
        raise ConfigError(f"--tls-cert {files.cert} is not a PEM certificate: {exc}") from exc
    if named != config.node_id:
        raise ConfigError(
            f"--tls-cert {files.cert} is issued to node {named!r}, but this is node {config.node_id!r}: "
            f"issue this node its own with `aether cert issue {config.node_id}`"
        )
    return files


def https_context(config: Any) -> ssl.SSLContext | None:
    """The server context the management API and the HTTP router of a `NodeConfig` serve HTTPS
    with, or None for plain HTTP: `http_tls_cert`/`http_tls_key` if given, else (with `https`)
    the node's own `tls_cert`/`tls_key`. `NodeConfig.validate` has checked they come in pairs;
    a file that cannot be used is a ConfigError naming its flag."""
    if config.http_tls_cert:
        return https_server_context(config.http_tls_cert, config.http_tls_key)
    if config.https:
        return https_server_context(config.tls_cert, config.tls_key, cert_flag="--tls-cert",
                                    key_flag="--tls-key")
    return None


def https_server_context(cert: str, key: str, *, cert_flag: str = "--http-tls-cert",
                         key_flag: str = "--http-tls-key") -> ssl.SSLContext:
    """A TLS 1.2+ server context with `cert` (PEM, may hold the chain) and its `key`, for the
    management API and the HTTP router. Raises ConfigError naming the flag of an unreadable,
    malformed or mismatched file. Clients are not asked for a certificate."""
    for flag, path in ((cert_flag, cert), (key_flag, key)):
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
        try:
            with p.open("rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigError(f"{flag} {path} cannot be read: {exc.strerror or exc}") from exc
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert_flag} {cert} / {key_flag} {key} cannot be loaded (not PEM, or the key does not "
            f"match the certificate): {exc}"
        ) from exc
    return ctx
