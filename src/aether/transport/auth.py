"""Cluster-secret authentication of cluster-port connections (pure, sans-IO).

Threat model: this authenticates *who connects*. A process that does not know the cluster
secret can neither become a peer nor open a client session, and cannot displace an
authenticated peer. Frames after the handshake carry no MAC and nothing is encrypted: someone
who can read or rewrite the traffic on the wire (not merely connect) needs TLS, which this
module does not provide.

Handshake (4 small frames, once per connection; nothing is added to later frames)::

    dialer   -> PeerHello(cluster, node_id, nonce_d)   or  ClientHello(cluster, client_id, nonce_d)
    acceptor -> Challenge(acceptor_id, nonce_a, proof_a)
    dialer   -> Proof(proof_d)
    acceptor -> HelloAck(acceptor_id)                  (or Reject(reason), then close)

    proof_x = HMAC-SHA256(key, label_x | cluster | kind | dialer_id | acceptor_id | nonce_d | nonce_a)

Both sides draw a fresh 16-byte nonce per connection, so a recorded proof is useless on a new
connection, and the two directions use different labels, so a proof cannot be reflected back.
The secret itself never crosses the wire. Proofs are compared with `hmac.compare_digest`.

Keys: peers prove the cluster secret itself; clients prove the *client key*
``HMAC-SHA256(secret, "aether client key v1")``, which nodes derive from the secret. A client
configured with the client key alone cannot authenticate as a peer.

Open mode (no secret, loopback only): proofs are empty and accepted only if the other side is
open too. A node with a secret refuses an open dialer, and a dialer with a secret refuses an
acceptor that cannot prove it (an impostor listening on a member's address).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final, Literal

from aether.core.errors import ConfigError
from aether.core.files import process_temporary, remove_stale_temporaries
from aether.core.types import is_loopback_host

__all__ = [
    "MIN_SECRET_BYTES",
    "NONCE_BYTES",
    "AcceptorHandshake",
    "AuthFailed",
    "Credentials",
    "DialerHandshake",
    "client_key_of",
    "generate_secret",
    "is_loopback_host",
    "load_secret",
    "write_secret_file",
]

NONCE_BYTES: Final = 16
MIN_SECRET_BYTES: Final = 16
SECRET_ENV: Final = "AETHER_CLUSTER_SECRET"
SECRET_FILE_ENV: Final = "AETHER_CLUSTER_SECRET_FILE"
_CLIENT_KEY_LABEL: Final = b"aether client key v1"

Kind = Literal["peer", "client"]


class AuthFailed(Exception):
    """The other side did not prove the secret; the message names the problem and the fix."""


def client_key_of(secret: bytes) -> bytes:
    """The credential clients prove, derived from the cluster secret."""
    return hmac.new(secret, _CLIENT_KEY_LABEL, hashlib.sha256).digest()


def generate_secret() -> str:
    """A new random cluster secret (64 hex characters, 256 bits)."""
    return secrets.token_hex(32)


def check_secret(secret: bytes, source: str) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the cluster secret from {source} is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(generate one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return secret


def load_secret(value: str | bytes | None = None, file: str | Path | None = None) -> bytes | None:
    """The cluster secret from `value`, else the file `file` (surrounding whitespace stripped).

    Returns None if neither is given. Raises ConfigError for an unreadable file or a secret
    shorter than `MIN_SECRET_BYTES`.
    """
    if value:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        return check_secret(raw.strip(), "the configuration")
    if file:
        try:
            raw = Path(file).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read the cluster secret file {file}: {e.strerror or e}") from None
        return check_secret(raw.strip(), f"file {file}")
    return None


def secret_from_env(environ: dict[str, str] | None = None) -> bytes | None:
    """The secret from ``AETHER_CLUSTER_SECRET`` or the file named by ``AETHER_CLUSTER_SECRET_FILE``."""
    env = os.environ if environ is None else environ
    return load_secret(env.get(SECRET_ENV) or None, env.get(SECRET_FILE_ENV) or None)


def write_secret_file(path: str | Path, secret: str) -> None:
    """Write `secret` to `path`, readable by the owner only (0600), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(p)  # of processes killed while writing it: copies of a secret
    tmp = process_temporary(p)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secret.encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a copy of the secret left behind otherwise
        raise


class Credentials:
    """What one endpoint can prove: the cluster secret (nodes) or only the client key (clients)."""

    __slots__ = ("client_key", "cluster", "peer_key")

    def __init__(self, cluster: str, *, secret: bytes | None = None, client_key: bytes | None = None) -> None:
        self.cluster = cluster
        self.peer_key = secret
        self.client_key = client_key_of(secret) if secret is not None else client_key

    @property
    def open(self) -> bool:
        """True when there is nothing to prove (no secret, no client key)."""
        return self.peer_key is None and self.client_key is None

    def key(self, kind: Kind) -> bytes | None:
        return self.peer_key if kind == "peer" else self.client_key


def _proof(
    key: bytes, label: bytes, cluster: str, kind: Kind, dialer: str, acceptor: str,
    nonce_d: bytes, nonce_a: bytes,
) -> bytes:  # fmt: skip
    mac = hmac.new(key, label, hashlib.sha256)
    for part in (cluster.encode(), kind.encode(), dialer.encode(), acceptor.encode(), nonce_d, nonce_a):
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.digest()


_ACCEPTOR_LABEL: Final = b"aether/v1 acceptor"
_DIALER_LABEL: Final = b"aether/v1 dialer"


def _fix(kind: Kind) -> str:
    if kind == "peer":
        return "set the same cluster secret on every node (--cluster-secret-file or AETHER_CLUSTER_SECRET)"
    return "give the client the cluster's secret (AetherClient(secret=...) or AETHER_CLUSTER_SECRET)"


class AcceptorHandshake:
    """The accepting side of one connection: answers a hello with a challenge, then checks the proof."""

    __slots__ = ("_creds", "_node_id", "_nonce", "dialer_id", "kind", "nonce_d")

    def __init__(self, creds: Credentials, node_id: str, *, nonce: bytes | None = None) -> None:
        self._creds = creds
        self._node_id = node_id
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES)
        self.kind: Kind = "peer"
        self.dialer_id = ""
        self.nonce_d = b""

    def challenge(self, kind: Kind, dialer_id: str, nonce_d: bytes) -> tuple[bytes, bytes]:
        """Record the hello; return (our nonce, our proof) for the Challenge frame.

        Raises AuthFailed if the hello's nonce is malformed while a secret is required."""
        self.kind, self.dialer_id, self.nonce_d = kind, dialer_id, nonce_d
        key = self._creds.key(kind)
        if key is None:
            return self._nonce, b""
        if len(nonce_d) != NONCE_BYTES:
            raise AuthFailed(
                f"{kind} {dialer_id!r} sent no valid nonce (an older or open client?); {_fix(kind)}"
            )
        return self._nonce, _proof(
            key, _ACCEPTOR_LABEL, self._creds.cluster, kind, dialer_id, self._node_id, nonce_d, self._nonce
        )

    def verify(self, proof: bytes) -> None:
        """Raise AuthFailed unless `proof` shows the dialer knows the key for its kind."""
        key = self._creds.key(self.kind)
        if key is None:
            if proof:
                raise AuthFailed(
                    f"{self.kind} {self.dialer_id!r} uses a cluster secret but this node {self._node_id!r} "
                    f"runs without one; {_fix(self.kind)}"
                )
            return
        expected = _proof(
            key, _DIALER_LABEL, self._creds.cluster, self.kind, self.dialer_id, self._node_id,
            self.nonce_d, self._nonce,
        )  # fmt: skip
        if not hmac.compare_digest(proof, expected):
            what = "no cluster secret" if not proof else "a wrong cluster secret"
            raise AuthFailed(f"{self.kind} {self.dialer_id!r} presented {what}; {_fix(self.kind)}")


class DialerHandshake:
    """The dialing side: a nonce for the hello, then checks the challenge and answers with a proof."""

    __slots__ = ("_creds", "_expect", "_id", "failure", "kind", "nonce", "proved")

    def __init__(
        self, creds: Credentials, kind: Kind, own_id: str, *,
        expect: str | None = None, nonce: bytes | None = None,
    ) -> None:  # fmt: skip
        self._creds = creds
        self._id = own_id
        self._expect = expect
        self.kind = kind
        self.nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES)
        self.proved = False  # a challenge was answered: only HelloAck or Reject may follow
        # why `answer` refused the acceptor, for a client's hint: "open" (it runs without a secret
        # while we have one), "other_secret" (it proved another secret), "" (not refused, or else)
        self.failure: Literal["", "open", "other_secret"] = ""

    def answer(self, acceptor_id: str, nonce_a: bytes, proof_a: bytes) -> bytes:
        """Check the acceptor's challenge; return our proof. Raises AuthFailed."""
        if self._expect is not None and acceptor_id != self._expect:
            raise AuthFailed(f"the node answering is {acceptor_id!r}, expected {self._expect!r}")
        key = self._creds.key(self.kind)
        if key is None:
            self.proved = True
            return b""  # open: nothing to prove, nothing to check (an acceptor with a secret refuses us)
        if not proof_a:
            self.failure = "open"
            fix = _fix("peer")  # the open node lacks the secret, whoever dials it
            raise AuthFailed(
                f"node {acceptor_id!r} runs without a cluster secret (open) and cannot prove it is a "
                f"member; refusing it. {fix[:1].upper()}{fix[1:]}"
            )
        expected = _proof(
            key, _ACCEPTOR_LABEL, self._creds.cluster, self.kind, self._id, acceptor_id, self.nonce, nonce_a
        )
        if not hmac.compare_digest(proof_a, expected):
            self.failure = "other_secret"
            raise AuthFailed(
                f"node {acceptor_id!r} did not prove the cluster secret (it has a different one, or it "
                f"is not a member of this cluster); {_fix(self.kind)}"
            )
        if len(nonce_a) != NONCE_BYTES:
            raise AuthFailed(f"node {acceptor_id!r} sent a malformed nonce")
        self.proved = True
        return _proof(
            key, _DIALER_LABEL, self._creds.cluster, self.kind, self._id, acceptor_id, self.nonce, nonce_a
        )
