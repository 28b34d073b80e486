"""Leader manager: the leader is the first node id of the sorted active topology.

Active = this node plus the peers the transport reports up, among the members, and only while
that set is a quorum of the member set in effect (a minority side, and a node that is not a
member, has no leader). Every node computes
the same answer once connectivity settles; anything the leader writes goes through
consensus (with compare-and-set where it matters), so two nodes briefly both believing
they lead is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec


class LeaderChanged(msgspec.Struct, frozen=True):
    leader: str | None
    previous: str | None
    is_self: bool


class LeaderManager:
    def __init__(self, node_id: str, members: Sequence[str]) -> None:
        self.node_id = node_id
        self.members = sorted(set(members))
        self.up: set[str] = set()  # up peers that are members (what managers place work on)
        self._up_any: set[str] = set()  # every up peer, members or not (a node may be added later)
        self.leader: str | None = node_id if len(self.members) == 1 else None
        self.listeners: list[Callable[[LeaderChanged], None]] = []
        self.changes = 0
        """How often the leader this node sees changed since it started (to none included)."""

    def set_members(self, members: Sequence[str]) -> None:
        """The committed member set changed (membership changes through the log)."""
        self.members = sorted(set(members))
        self.up = self._up_any & set(self.members)
        self._recompute()

    def _recompute(self) -> None:
        members = set(self.members)
        active = sorted((self.up | {self.node_id}) & members)
        quorum = self.node_id in members and len(active) >= len(self.members) // 2 + 1
        new = active[0] if quorum else None
        if new != self.leader:
            ev = LeaderChanged(new, self.leader, new == self.node_id)
            self.changes += 1
            self.leader = new
            for cb in list(self.listeners):
                cb(ev)

    def peer_up(self, peer: str) -> None:
        if peer != self.node_id:
            self._up_any.add(peer)  # counted while it is a member (set_members may add it later)
            if peer in self.members:
                self.up.add(peer)
            self._recompute()

    def peer_down(self, peer: str) -> None:
        self._up_any.discard(peer)
        self.up.discard(peer)
        self._recompute()

    @property
    def is_leader(self) -> bool:
        return self.leader == self.node_id
