"""The member table: who we know, in which state, at which incarnation.

Theory of operation: entries are immutable `Member` values, replaced on every
change, so that a table can share them. A table is an overlay: a read-only
base (a dict and a name list that many tables may share) under a private
dict of local changes. In a real deployment the base is empty. The simulator
preloads ten thousand members into one shared base, which keeps a
10 000-member simulation at O(N) memory instead of O(N²); a member then pays
only for what it learned itself.

Names are append-only (index → name), so a probe round can walk an implicit
permutation of indices and gossip can pick uniformly random indices, both in
O(1) memory. Dead and left members stay as tombstones: they are skipped by
probes, and they carry the incarnation that a restarted member must beat.
The core reaps old tombstones with `remove`, which moves the last name into
the freed index: a probe round under way may then visit one member twice or
skip one, which the next round makes good. Members of a shared base are
never removed (the simulator's runs are far shorter than any tombstone's life).
"""

from __future__ import annotations

from collections.abc import Iterator

from ._events import Member
from ._messages import MemberState

_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)


class SharedView:
    """A read-only member base that many tables may share (simulation)."""

    __slots__ = ("live", "members", "names")

    def __init__(self, members: list[Member]) -> None:
        self.members = {m.name: m for m in members}
        self.names = [m.name for m in members]
        self.live = sum(1 for m in members if m.state in _LIVE)


_EMPTY = SharedView([])


class MemberTable:
    """Members by name, with an index order and a live count."""

    __slots__ = ("_base", "_live", "_local", "_local_index", "_local_names")

    def __init__(self, base: SharedView = _EMPTY) -> None:
        self._base = base
        self._local: dict[str, Member] = {}
        self._local_names: list[str] = []
        self._local_index: dict[str, int] = {}  # name -> its index in _local_names
        self._live = base.live

    def __len__(self) -> int:
        return len(self._base.names) + len(self._local_names)

    @property
    def live(self) -> int:
        """Members alive or suspect, the local member included."""
        return self._live

    def get(self, name: str) -> Member | None:
        member = self._local.get(name)
        if member is None:
            member = self._base.members.get(name)
        return member

    def put(self, member: Member) -> None:
        old = self.get(member.name)
        if old is None:
            if member.name not in self._base.members:
                self._local_index[member.name] = len(self._local_names)
                self._local_names.append(member.name)
        elif old.state in _LIVE:
            self._live -= 1
        if member.state in _LIVE:
            self._live += 1
        self._local[member.name] = member

    def remove(self, name: str) -> bool:
        """Forget a member learned locally; False for the local base's (kept)."""
        member = self._local.get(name)
        if member is None or name in self._base.members:
            return False
        del self._local[name]
        names, where = self._local_names, self._local_index
        index = where.pop(name)
        last = names.pop()
        if last != name:
            names[index] = last
            where[last] = index
        if member.state in _LIVE:
            self._live -= 1
        return True

    def name_at(self, index: int) -> str:
        base = self._base.names
        if index < len(base):
            return base[index]
        return self._local_names[index - len(base)]

    def __iter__(self) -> Iterator[Member]:
        for name in self._base.names:
            member = self._local.get(name)
            yield member if member is not None else self._base.members[name]
        for name in self._local_names:
            yield self._local[name]
