"""The state of a KIP-848 consumer group, and its stored form.

Owns: ``ConsumerGroup`` and ``ConsumerMember`` (what consumer_coordinator.py and
classic_members.py work on), and their translation to and from the StateStore's
``StoredGroup`` (storage/member_state.py): the group record (group epoch, target
assignment and its epoch, assignor, what the target was computed from) and one record
per member (member and previous epoch, subscription, assignor, current assignment,
what it is revoking, static membership, client, rack, classic-protocol metadata).

Not stored: when a member was last seen, its revocation deadline and what it was last
answered. A restored member's session and revocation deadline start at the restore
(a member whose session lapsed while no node owned the group is expired a session
timeout later by the new owner, not at load); its next heartbeat is answered with its
whole assignment.

Must not know: the wire format, SQL, real time (``now_ms`` comes in).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from conveyor.storage.member_state import CONSUMER, StoredGroup

from .consumer_assignors import DEFAULT_ASSIGNOR

Partitions = dict[str, frozenset[int]]  # topic -> partitions


@dataclass
class ConsumerMember:
    member_id: str
    instance_id: str | None
    rack: str | None
    client_id: str
    client_host: str
    rebalance_timeout_ms: int
    last_seen_ms: int  # monotonic
    topic_names: tuple[str, ...] = ()
    regex: str | None = None
    assignor: str | None = None
    epoch: int = 0
    previous_epoch: int = -1
    assigned: Partitions = field(default_factory=dict)  # what the member was told it owns
    revoking: Partitions = field(default_factory=dict)  # told to give up, not yet confirmed
    revoke_deadline_ms: int = 0
    left_static: bool = False  # left with epoch -2: its instance id may come back
    last_sent: tuple[int, Partitions] | None = None
    classic: ClassicMetadata | None = None  # joined with JoinGroup (online migration)


@dataclass
class ClassicMetadata:
    """What a member speaking the classic protocol inside a consumer group brings: its
    session timeout and JoinGroup protocols (name, metadata) in preference order."""

    session_timeout_ms: int
    protocols: tuple[tuple[str, bytes], ...]
    subscription_version: int = 0


@dataclass
class ConsumerGroup:
    group_id: str
    epoch: int = 0
    assignment_epoch: int = 0
    members: dict[str, ConsumerMember] = field(default_factory=dict)
    static: dict[str, str] = field(default_factory=dict)  # instance id -> member id
    target: dict[str, Partitions] = field(default_factory=dict)
    signature: tuple[object, ...] = ()  # what the target was computed from
    assignor: str = DEFAULT_ASSIGNOR
    # member id -> changes since its record was last written (not stored): only these
    # members' records are rebuilt when the group is written, so a heartbeat's write
    # costs one member, not the whole group
    changed: dict[str, int] = field(default_factory=dict)


def mark_changed(group: ConsumerGroup, member_id: str) -> None:
    group.changed[member_id] = group.changed.get(member_id, 0) + 1



# --- the stored form ---------------------------------------------------------------------
def _partitions_out(partitions: Partitions) -> dict[str, list[int]]:
    return {topic: sorted(parts) for topic, parts in sorted(partitions.items()) if parts}


def _partitions_in(value: Any) -> Partitions:
    return {str(topic): frozenset(int(part) for part in parts)
            for topic, parts in dict(value).items() if parts}


def _lists(value: Any) -> Any:
    """The signature's tuples as JSON lists, so a stored record equals a fresh one."""
    if isinstance(value, tuple | list):
        return [_lists(item) for item in value]
    return value


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the signature was made of."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def _member_record(member: ConsumerMember) -> dict[str, Any]:
    record: dict[str, Any] = {
        "instance_id": member.instance_id, "rack": member.rack,
        "client_id": member.client_id, "client_host": member.client_host,
        "rebalance_timeout_ms": member.rebalance_timeout_ms,
        "topic_names": list(member.topic_names), "regex": member.regex,
        "assignor": member.assignor, "epoch": member.epoch,
        "previous_epoch": member.previous_epoch,
        "assigned": _partitions_out(member.assigned),
        "revoking": _partitions_out(member.revoking), "left_static": member.left_static,
    }
    if member.classic is not None:
        record["classic"] = {
            "session_timeout_ms": member.classic.session_timeout_ms,
            "protocols": [[name, base64.b64encode(metadata).decode("ascii")]
                          for name, metadata in member.classic.protocols],
            "subscription_version": member.classic.subscription_version,
        }
    return record


def _state_unchanged(group: ConsumerGroup, state: dict[str, Any]) -> bool:
    """The target changes only with a new assignment epoch, or when a static member
    comes back under a new member id (the static map changes)."""
    return (state.get("epoch") == group.epoch
            and state.get("assignment_epoch") == group.assignment_epoch
            and state.get("assignor") == group.assignor
            and state.get("static") == group.static)


def stored_consumer_group(group: ConsumerGroup, previous: StoredGroup | None = None,
                          changed: dict[str, int] | None = None) -> StoredGroup:
    """The group's stored form. With ``previous`` (what the store holds) and ``changed``
    (the members changed since), the group record and the records of members not
    changed are ``previous``'s own objects: cheap to build and to compare."""
    if previous is not None and _state_unchanged(group, previous.state):
        state = previous.state
    else:
        state = {
            "epoch": group.epoch, "assignment_epoch": group.assignment_epoch,
            "assignor": group.assignor,
            "target": {member_id: _partitions_out(parts)
                       for member_id, parts in sorted(group.target.items())},
            "signature": _lists(group.signature), "static": dict(group.static),
        }
    kept = previous.members if previous is not None and changed is not None else {}
    members = {}
    for member_id, member in group.members.items():
        record = kept.get(member_id)
        if record is None or member_id in (changed or {}):
            record = _member_record(member)
        members[member_id] = record
    return StoredGroup(CONSUMER, group.group_id, state, members)


def _restore_member(member_id: str, record: dict[str, Any], now_ms: int) -> ConsumerMember:
    member = ConsumerMember(
        member_id, record.get("instance_id"), record.get("rack"),
        str(record.get("client_id", "")), str(record.get("client_host", "")),
        int(record.get("rebalance_timeout_ms", 0)), now_ms,
        topic_names=tuple(str(name) for name in record.get("topic_names", ())),
        regex=record.get("regex"), assignor=record.get("assignor"),
        epoch=int(record.get("epoch", 0)), previous_epoch=int(record.get("previous_epoch", -1)),
        assigned=_partitions_in(record.get("assigned", {})),
        revoking=_partitions_in(record.get("revoking", {})),
        left_static=bool(record.get("left_static", False)))
    member.revoke_deadline_ms = now_ms + max(member.rebalance_timeout_ms, 1_000)
    classic = record.get("classic")
    if classic is not None:
        member.classic = ClassicMetadata(
            int(classic["session_timeout_ms"]),
            tuple((str(name), base64.b64decode(metadata))
                  for name, metadata in classic["protocols"]),
            int(classic.get("subscription_version", 0)))
    return member


def restore_consumer_group(stored: StoredGroup, now_ms: int) -> ConsumerGroup:
    """The group as stored, its members' sessions starting at ``now_ms`` (monotonic)."""
    state = stored.state
    group = ConsumerGroup(stored.group_id, int(state.get("epoch", 0)),
                          int(state.get("assignment_epoch", 0)))
    group.assignor = str(state.get("assignor", DEFAULT_ASSIGNOR))
    group.target = {str(member_id): _partitions_in(parts)
                    for member_id, parts in dict(state.get("target", {})).items()}
    group.signature = _tuples(state.get("signature", []))
    for member_id, record in sorted(stored.members.items()):
        member = group.members[member_id] = _restore_member(member_id, record, now_ms)
        if member.instance_id is not None:
            group.static[member.instance_id] = member_id
    return group
