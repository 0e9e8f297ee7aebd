"""The state of Kafka share groups (KIP-932) kept by ShareCoordinator: groups, members,
share sessions, and the values its calls take and return.

Owns: these plain records and their comments, and a group's stored form
(``StoredGroup``, storage/member_state.py: the group epoch; per member its epoch,
topics, assignment, client and rack); no rules (share_coordinator.py). Not stored, as
Kafka does not store them either: share sessions (clients open new ones on
SHARE_SESSION_NOT_FOUND), the records a member holds (their locks are the shared
group's), members that left with their session open or were adopted from a session on
a node that does not coordinate the group, and when a member was last seen (a restored
member's session counts from the restore).
Must not know: the wire format, the shared groups under a share group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from conveyor.storage.member_state import SHARE, StoredGroup

# Each share group reading a topic is a persisted shared group with its own windows;
# Kafka's group.share.max.groups is 10.
SHARE_GROUPS_MAX: Final = 1_000

TopicPartition = tuple[str, int]


@dataclass
class ShareMember:
    member_id: str
    epoch: int
    topics: tuple[str, ...]
    client_id: str
    client_host: str
    rack: str | None
    last_seen_ms: int  # monotonic
    assignment: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # (topic, partition, offset) -> (receipt, lock deadline wall ms)
    held: dict[tuple[str, int, int], tuple[str, int]] = field(default_factory=dict)
    # known here from its share session only: the group's coordinator is another node
    # (a share-partition leader, docs/cluster.md); it goes when its session ends
    adopted: bool = False


@dataclass
class ShareSession:
    epoch: int  # the epoch the next request must carry
    partitions: set[TopicPartition] = field(default_factory=set)


@dataclass
class ShareGroup:
    name: str
    epoch: int = 0
    members: dict[str, ShareMember] = field(default_factory=dict)
    sessions: dict[str, ShareSession] = field(default_factory=dict)  # by member id
    # members that left while their share session was open: they may still settle
    # what they hold and close the session (a client leaves and closes concurrently)
    departed: dict[str, ShareMember] = field(default_factory=dict)
    topics: set[str] = field(default_factory=set)  # every topic the group has read
    # member id -> changes since its record was last written (not stored; see
    # consumer_group_state.ConsumerGroup.changed)
    changed: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    member_epoch: int
    heartbeat_interval_ms: int
    assignment: dict[str, tuple[int, ...]] | None  # None: unchanged since the last answer


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """One acknowledgement batch of one partition, as the client sent it."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    types: tuple[int, ...]


# --- the stored form ---------------------------------------------------------------------
def _member_record(member: ShareMember) -> dict[str, Any]:
    return {"epoch": member.epoch, "topics": list(member.topics),
            "client_id": member.client_id, "client_host": member.client_host,
            "rack": member.rack,
            "assignment": {topic: list(parts)
                           for topic, parts in sorted(member.assignment.items())}}


def stored_share_group(group: ShareGroup, previous: StoredGroup | None = None,
                       changed: dict[str, int] | None = None) -> StoredGroup:
    """The group's stored form (adopted members left out); with ``previous`` and
    ``changed``, the records of members not changed are ``previous``'s own objects."""
    kept = previous.members if previous is not None and changed is not None else {}
    members = {}
    for member_id, member in group.members.items():
        if member.adopted:
            continue
        record = kept.get(member_id)
        if record is None or member_id in (changed or {}):
            record = _member_record(member)
        members[member_id] = record
    return StoredGroup(SHARE, group.name, {"epoch": group.epoch}, members)


def restore_share_group(stored: StoredGroup, now_ms: int) -> ShareGroup:
    """The group as stored, its members' sessions starting at ``now_ms`` (monotonic)."""
    group = ShareGroup(stored.group_id, int(stored.state.get("epoch", 0)))
    for member_id, record in sorted(stored.members.items()):
        group.members[member_id] = ShareMember(
            member_id, int(record.get("epoch", 0)),
            tuple(str(topic) for topic in record.get("topics", ())),
            str(record.get("client_id", "")), str(record.get("client_host", "")),
            record.get("rack"), now_ms,
            {str(topic): tuple(int(part) for part in parts)
             for topic, parts in dict(record.get("assignment", {})).items()})
    return group
