"""GroupMembers: KIP-848 and KIP-932 group membership written through to the StateStore.

Owns: what the store holds of each (protocol, group) as last written or read
(``saved``), the write of what changed since (``flush``), the loads at open and at a
cluster node's claim of a group, and ``StoredGroups``: one coordinator's side of it
(restore, reload, persist with only the changed members' records rebuilt). The
coordinators (consumer_coordinator.py, share_coordinator.py) hand it their group in
the stored form (consumer_group_state.py, share_state.py) and answer the client
only after it is written, as Kafka's coordinator answers after its records are
appended to __consumer_offsets.

Rules:
- A flush compares the group's stored form with what was last written and writes
  only the difference: a heartbeat that changes nothing writes nothing.
- Flushes of one group run one at a time and compute their difference under that
  group's lock, so a later state is never overwritten by an earlier one.
- Only the records of members marked changed (``changed``: the heartbeating member,
  a classic request's member) are rebuilt; the others are the stored objects
  themselves, so a heartbeat costs one member record, not the whole group. Members
  added or removed are found by their ids.
- On a cluster node (``guard`` set) the write is a transaction of its own under the
  node's owner fence for the group (the ``WriteGuard`` offset commits carry); no fence,
  or a fence that no longer holds, is NotCoordinatorError and nothing is written. Else
  the write rides in the loop turn's transaction and is committed before the answer.

Must not know: the wire format, SQL, the coordinators' classes.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from conveyor.errors import NotCoordinatorError
from conveyor.storage.member_state import CONSUMER, SHARE, MemberChanges, StoredGroup
from conveyor.storage.sql_engine import WriteGuard
from conveyor.storage.state_store import StateStore

GroupKey = tuple[str, str]  # (protocol, group id)
GroupT = TypeVar("GroupT", bound="ChangedGroup")


def changes_between(before: StoredGroup | None, after: StoredGroup | None,
                    protocol: str, group_id: str) -> MemberChanges:
    """What to write so that the store holding ``before`` holds ``after``."""
    if after is None:
        return MemberChanges(protocol, group_id, deleted_group=before is not None)
    before_members = before.members if before is not None else {}
    state = None if before is not None and (
        before.state is after.state or before.state == after.state) else after.state
    saved = {}
    for member_id, record in after.members.items():
        before_record = before_members.get(member_id)
        if before_record is not record and before_record != record:
            saved[member_id] = record
    deleted = tuple(member_id for member_id in before_members
                    if member_id not in after.members)
    return MemberChanges(protocol, group_id, state, saved, deleted)


class GroupMembers:
    def __init__(self, state_store: StateStore) -> None:
        self.state_store = state_store
        self.saved: dict[GroupKey, StoredGroup] = {}  # what the store holds, as we know it
        # a cluster node: the owner fence of a group it coordinates (None: it does not),
        # and what to do when a write's fence no longer holds (forget the group)
        self.guard: Callable[[str], WriteGuard | None] | None = None
        self.guard_refused: Callable[[str], None] | None = None
        self._locks: weakref.WeakValueDictionary[GroupKey, asyncio.Lock] = (
            weakref.WeakValueDictionary())
        self.writes = 0  # flushes that wrote something (tests, diagnostics)

    async def load(self) -> None:
        """Every stored group (at open)."""
        self.saved = {}
        for protocol in (CONSUMER, SHARE):
            for stored in await self.state_store.members.load(protocol):
                self.saved[(protocol, stored.group_id)] = stored

    def stored(self, protocol: str) -> list[StoredGroup]:
        return [stored for (kind, _), stored in self.saved.items() if kind == protocol]

    async def reload(self, protocol: str, group_id: str) -> StoredGroup | None:
        """Read one group again (a cluster node claims it: another node may have changed
        it since)."""
        key = (protocol, group_id)
        async with self._lock(key):
            found = await self.state_store.members.load(protocol, group_id)
            if found:
                self.saved[key] = found[0]
                return found[0]
            self.saved.pop(key, None)
            return None

    def _lock(self, key: GroupKey) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def flush(self, protocol: str, group_id: str,
                    current: Callable[[], StoredGroup | None]) -> None:
        """Write what changed in the group (``current()``: its stored form now, None once
        it is gone) since the store last had it."""
        key = (protocol, group_id)
        async with self._lock(key):
            after = current()
            changes = changes_between(self.saved.get(key), after, protocol, group_id)
            if changes.empty():
                return
            if self.guard is not None:
                guard = self.guard(group_id)
                if guard is None or not await self.state_store.members.save_guarded(
                        changes, guard):
                    if guard is not None and self.guard_refused is not None:
                        self.guard_refused(group_id)  # claimed again before serving it
                    raise NotCoordinatorError("this node no longer coordinates the group",
                                              group_id=group_id)
            else:
                self.state_store.members.save(changes)
                await self.state_store.commit()
            self.writes += 1
            if after is None:
                self.saved.pop(key, None)
            else:
                self.saved[key] = after

    def delete(self, protocol: str, group_id: str) -> None:
        """Forget a deleted group (DeleteGroups, or a consumer group going back to the
        classic protocol): in the loop turn's transaction, not fenced (admin paths)."""
        if self.saved.pop((protocol, group_id), None) is not None:
            self.state_store.members.save(MemberChanges(protocol, group_id,
                                                        deleted_group=True))


class ChangedGroup(Protocol):
    changed: dict[str, int]  # member id -> changes since its record was last written


class StoredGroups(Generic[GroupT]):
    """One coordinator's groups (``groups``, the coordinator's own dict) and the store:
    restored at construction (one node; a cluster node, which is built after it joined
    the cluster, reads a group when it claims it), read again at a claim, written after
    a change."""

    def __init__(self, members: GroupMembers, protocol: str, groups: dict[str, GroupT],
                 to_stored: Callable[[GroupT, StoredGroup | None, dict[str, int]],
                                     StoredGroup],
                 restore: Callable[[StoredGroup, int], GroupT], now_ms: Callable[[], int]
                 ) -> None:
        self.members = members
        self.protocol = protocol
        self.groups = groups
        self.to_stored = to_stored
        self.restore = restore
        self.now_ms = now_ms
        if members.guard is None:  # a cluster node reads a group when it claims it
            for stored in members.stored(protocol):
                groups[stored.group_id] = restore(stored, now_ms())

    async def persist(self, group_id: str, member_id: str | None = None) -> None:
        """Write what changed in the group (``member_id``: a member just changed) since
        it was last written; nothing if nothing did. NotCoordinatorError on a cluster
        node that no longer owns the group."""
        group = self.groups.get(group_id)
        if group is not None and member_id is not None:
            group.changed[member_id] = group.changed.get(member_id, 0) + 1
        written: dict[str, int] = {}

        def current() -> StoredGroup | None:
            group = self.groups.get(group_id)
            if group is None:
                return None
            written.update(group.changed)
            return self.to_stored(group, self.members.saved.get((self.protocol, group_id)),
                                  written)

        await self.members.flush(self.protocol, group_id, current)
        group = self.groups.get(group_id)
        if group is not None:
            for changed_id, count in written.items():  # changes made since stay
                if group.changed.get(changed_id) == count:
                    del group.changed[changed_id]

    async def reload(self, group_id: str) -> None:
        """Read the group again (a cluster node claims it: another node may have served
        it meanwhile); its members' sessions count from now."""
        stored = await self.members.reload(self.protocol, group_id)
        if stored is None:
            self.groups.pop(group_id, None)
        else:
            self.groups[group_id] = self.restore(stored, self.now_ms())
