"""Human-friendly output of the CLI: rich tables and summary lines (imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from aether.cli.common import Settings
from aether.core.status import KVEntry, NodeStatus

if TYPE_CHECKING:
    from aether.cli.local_cluster import NodeObservation

LEADER_MARK = "★ leader"


# Width of stdout when it is not a terminal (a pipe, a file): wide enough that no table column is
# cut with an ellipsis or folded, and no line wrapped, for `grep`, `awk` and `cut`.
PIPE_WIDTH = 10_000


def console(stderr: bool = False) -> Console:
    """A console bound to the current stdout/stderr (so click's test runner captures it).

    Emoji codes are off: text such as ``G:A:V`` must print as typed, never as ``G🅰V`` (rich
    reads ``:A:`` as an emoji code). When stdout is not a terminal, or `-o wide` was asked for,
    its width is `PIPE_WIDTH`: tables are as wide as their content, nothing is truncated.
    """
    con = Console(stderr=stderr, highlight=False, soft_wrap=False, emoji=False)
    if not stderr and (not con.is_terminal or _wide()):
        con.width = PIPE_WIDTH
    return con


def _wide() -> bool:
    """`-o wide` was given to the running command."""
    import click

    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Settings) if ctx is not None else None
    return obj is not None and obj.output == "wide"


def _state(state: str) -> str:
    if state == "up":
        return "[green]up[/green]"
    if state == "down":
        return "[red]down[/red]"
    return f"[yellow]{state}[/yellow]"


def yes_no(value: bool) -> str:
    return "[green]yes[/green]" if value else "[red]no[/red]"


def node_status_table(st: NodeStatus, address: str) -> Table:
    table = Table(title=f"Cluster as seen by {st.node_id} ({address})", title_justify="left")
    table.add_column("Node")
    table.add_column("Address")
    table.add_column("State")
    table.add_column("Leader")
    for m in st.nodes:
        table.add_row(
            escape(m.id), escape(m.address), _state(escape(m.state)), LEADER_MARK if m.id == st.leader else ""
        )
    return table


def node_status_summary(st: NodeStatus) -> str:
    up = sum(1 for m in st.nodes if m.state == "up")
    leader = st.leader or "[red]none[/red]"
    # a joining node does not know its members' state: no count of them
    known = all(m.state in ("up", "down") for m in st.nodes)
    line = (
        f"Quorum: {yes_no(st.quorum)} · Leader: {leader}"
        + (f" · {up}/{len(st.nodes)} nodes up" if known else "")
        + f" · applied slot {st.applied_slot}"
    )
    if st.not_member:
        line = f"[yellow]Not a member[/yellow]: {escape(st.not_member)}\n{line}"
    return line


def _value_text(value: object) -> str:
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def kv_table(prefix: str, entries: Sequence[KVEntry]) -> Table:
    title = f"Keys with prefix {prefix!r}" if prefix else "All keys"
    table = Table(title=f"{title} ({len(entries)})", title_justify="left")
    table.add_column("Key", overflow="fold")
    table.add_column("Value", overflow="fold")
    for e in entries:
        table.add_row(Text(e.key), Text(_value_text(e.value)))
    return table


def cluster_table(observations: Sequence[NodeObservation], leader: str | None, directory: str) -> Table:
    table = Table(title=f"Local cluster in {directory}", title_justify="left")
    for col in ("Node", "State", "Leader", "PID", "Cluster port", "Mgmt port", "HTTP port"):
        table.add_column(col, justify="right" if "port" in col or col == "PID" else "left")
    for o in observations:
        n = o.node
        if o.up:
            state = _state("up") if o.running else f"{_state('up')} (started elsewhere)"
        elif o.running:
            state = (
                f"[yellow]no answer[/yellow] ({escape(o.error)})" if o.error else "[yellow]no answer[/yellow]"
            )
        else:
            state = _state("down")
        table.add_row(
            n.id,
            state,
            LEADER_MARK if leader is not None and n.id == leader else "",
            str(n.pid) if n.pid and o.running else "-",
            str(n.cluster_port),
            str(n.management_port),
            str(n.http_port),
        )
    return table
