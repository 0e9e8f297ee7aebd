"""Kafka group membership in the StateStore: KIP-848 consumer groups and KIP-932 share
groups, so that the next coordinator of a group (after a restart, or another cluster
node after a failover) goes on with the same members and epochs.

Owns: two tables and their queries, written once in the subset SQLite and PostgreSQL
share (as storage/txn_state.py is), and the row type ``StoredGroup``:

- ``kafka_groups``: one row per (protocol, group id): the group's own record as JSON
  (for a consumer group: the group epoch, the target assignment and its epoch, the
  assignor, what the target was computed from; for a share group: its epoch). Kafka
  keeps the same in __consumer_offsets (ConsumerGroupMetadata, TargetAssignment*).
- ``kafka_group_members``: one row per member: its record as JSON (member epoch,
  subscription, current assignment and what it is revoking, client and rack; Kafka's
  ConsumerGroupMemberMetadata and ConsumerGroupCurrentMemberAssignment).

The JSON is the coordinator's business (broker/group_members.py); this module neither
reads nor checks its fields. Writes are changes (``MemberChanges``: the group row, the
members written, the members deleted): a heartbeat that changes nothing writes nothing.
``save`` rides in the store's per-loop-turn transaction; ``save_guarded`` is a cluster
node's write, in a transaction of its own under the owner fence (``WriteGuard``), as
offset commits are.

Must not know: the broker's classes, the protocols.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from conveyor.errors import StorageError
from conveyor.storage.sql_engine import (
    GuardedStatement,
    GuardedWrites,
    SqlEngine,
    SqlValue,
    WriteGuard,
    upsert_sql,
)

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS kafka_groups (
        protocol TEXT NOT NULL, group_id TEXT NOT NULL, state TEXT NOT NULL,
        PRIMARY KEY (protocol, group_id))""",
    """CREATE TABLE IF NOT EXISTS kafka_group_members (
        protocol TEXT NOT NULL, group_id TEXT NOT NULL, member_id TEXT NOT NULL,
        state TEXT NOT NULL, PRIMARY KEY (protocol, group_id, member_id))""",
)

CONSUMER = "consumer"  # KIP-848 consumer groups
SHARE = "share"  # KIP-932 share groups

_GROUP_UPSERT = upsert_sql("kafka_groups", ["protocol", "group_id"], ["state"])
_MEMBER_UPSERT = upsert_sql("kafka_group_members", ["protocol", "group_id", "member_id"],
                            ["state"])
_MEMBER_DELETE = ("DELETE FROM kafka_group_members"
                  " WHERE protocol = ? AND group_id = ? AND member_id = ?")
_GROUP_DELETE = "DELETE FROM kafka_groups WHERE protocol = ? AND group_id = ?"
_MEMBERS_DELETE = "DELETE FROM kafka_group_members WHERE protocol = ? AND group_id = ?"

Statements = list[tuple[str, list[tuple[SqlValue, ...]]]]


@dataclass(frozen=True, slots=True)
class StoredGroup:
    """One group as stored: its record and its members' records (JSON objects)."""

    protocol: str
    group_id: str
    state: dict[str, Any]
    members: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemberChanges:
    """What changed in one group since it was last written. ``state`` None with
    ``deleted_group``: the group and all its members go."""

    protocol: str
    group_id: str
    state: dict[str, Any] | None = None  # the group row, when it changed
    saved: dict[str, dict[str, Any]] = field(default_factory=dict)  # member id -> record
    deleted: tuple[str, ...] = ()  # member ids
    deleted_group: bool = False

    def empty(self) -> bool:
        return (self.state is None and not self.saved and not self.deleted
                and not self.deleted_group)


def _text(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class MemberStateStore:
    """Typed reads and writes of the membership tables over the store's engine."""

    def __init__(self, engine: SqlEngine) -> None:
        self.engine = engine

    def create_schema(self) -> None:
        self.engine.add_schema(SCHEMA)

    def _statements(self, changes: MemberChanges) -> Statements:
        key = (changes.protocol, changes.group_id)
        if changes.deleted_group:
            return [(_MEMBERS_DELETE, [key]), (_GROUP_DELETE, [key])]
        statements: Statements = []
        if changes.state is not None:
            statements.append((_GROUP_UPSERT, [(*key, _text(changes.state))]))
        if changes.saved:
            statements.append((_MEMBER_UPSERT, [(*key, member_id, _text(record))
                                                for member_id, record in changes.saved.items()]))
        if changes.deleted:
            statements.append((_MEMBER_DELETE, [(*key, member_id)
                                                for member_id in changes.deleted]))
        return statements

    def save(self, changes: MemberChanges) -> None:
        """Write ``changes`` in the loop turn's transaction (await ``commit()`` for
        durability)."""
        for query, rows in self._statements(changes):
            self.engine.write_many(query, rows)

    async def save_guarded(self, changes: MemberChanges, guard: WriteGuard) -> bool:
        """Write ``changes`` in a transaction of their own that first takes ``guard`` (a
        cluster node's owner fence); False, nothing written, when the guard finds no row.
        Needs an engine with guarded writes (PostgreSQL)."""
        if not hasattr(self.engine, "write_guarded"):
            raise StorageError("guarded writes need the PostgreSQL state store")
        statements: Sequence[GuardedStatement] = self._statements(changes)
        return await cast(GuardedWrites, self.engine).write_guarded(guard, statements)

    async def commit(self) -> None:
        await self.engine.commit()

    async def load(self, protocol: str, group_id: str | None = None) -> list[StoredGroup]:
        """Every stored group of ``protocol`` (or just ``group_id``), with its members;
        members without a group row are not returned (a group is written first)."""
        where, parameters = " WHERE protocol = ?", [protocol]
        if group_id is not None:
            where, parameters = where + " AND group_id = ?", [protocol, group_id]
        groups = await self.engine.query(
            "SELECT group_id, state FROM kafka_groups" + where + " ORDER BY group_id",
            parameters)
        members = await self.engine.query(
            "SELECT group_id, member_id, state FROM kafka_group_members" + where
            + " ORDER BY group_id, member_id", parameters)
        found = {str(row[0]): StoredGroup(protocol, str(row[0]), json.loads(str(row[1])))
                 for row in groups}
        for row in members:
            stored = found.get(str(row[0]))
            if stored is not None:
                stored.members[str(row[1])] = json.loads(str(row[2]))
        return list(found.values())
