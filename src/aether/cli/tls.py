"""`aether cert init|issue`: the cluster CA and node certificates for mutual TLS between nodes.

Files are written 0600 in a 0700 directory (default ``.aether/tls``); see
docs/cluster-security.md, *Mutual TLS*.
"""

from __future__ import annotations

import click

from aether.cli.common import EXIT_USAGE, fail
from aether.core.errors import ConfigError

DEFAULT_DIR = ".aether/tls"

dir_option = click.option(
    "--dir",
    "directory",
    default=DEFAULT_DIR,
    show_default=True,
    metavar="DIR",
    help="Directory of the cluster CA (ca.crt, ca.key) and the node certificates.",
)


@click.group()
def cert() -> None:
    """Certificates for mutual TLS between nodes: a cluster CA, one certificate per node id."""


@cert.command("init")
@dir_option
@click.option("--cluster-name", default="aether", show_default=True, help="Named in the CA's subject.")
def cert_init(directory: str, cluster_name: str) -> None:
    """Create the cluster CA: DIR/ca.key (keep it private) and DIR/ca.crt (give it to every node as
    --tls-ca). Refuses to replace an existing CA."""
    from aether.transport.tls import init_ca

    try:
        cert_path, key_path = init_ca(directory, cluster_name=cluster_name)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    click.echo(f"Created the cluster CA: {cert_path} (every node's --tls-ca), {key_path} (keep private).")


@cert.command("issue")
@click.argument("node_id")
@dir_option
@click.option(
    "--san",
    "sans",
    multiple=True,
    metavar="HOST",
    help="A host name or IP address HTTPS clients reach the node by (repeat for several) "
    "[default: localhost, 127.0.0.1, ::1].",
)
def cert_issue(node_id: str, directory: str, sans: tuple[str, ...]) -> None:
    """Issue NODE_ID's certificate, signed by the CA in DIR: DIR/NODE_ID.crt and DIR/NODE_ID.key
    (the node's --tls-cert and --tls-key). Its identity is the node id: no other node can use it.

    For HTTPS (`aether node --https`) the certificate also names the hosts clients connect to:
    --san HOST for each (a name or an IP address); without --san, the loopback names."""
    from aether.transport.tls import DEFAULT_SANS, issue_node_cert

    try:
        cert_path, key_path = issue_node_cert(directory, node_id, sans=sans or DEFAULT_SANS)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    click.echo(f"Issued {node_id}'s certificate: --tls-cert {cert_path} --tls-key {key_path}")
    click.echo(f"HTTPS clients may reach it as: {', '.join(sans or DEFAULT_SANS)}")
