"""The state of Kafka share groups (KIP-932) kept by ShareCoordinator: groups, members,
share sessions, and the values its calls take and return.

Owns: these plain records and their comments; no rules (share_coordinator.py).
Must not know: the wire format, the shared groups under a share group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

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
