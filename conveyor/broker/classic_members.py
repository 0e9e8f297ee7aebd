"""Classic members of KIP-848 consumer groups: the online migration between protocols.

Owns: members of a consumer group that speak the classic protocol (JoinGroup,
SyncGroup, Heartbeat, LeaveGroup) while others speak ConsumerGroupHeartbeat; the
upgrade (a classic group's members adopted into a new consumer group) and the
members handed back for the downgrade (a consumer group whose last consumer-protocol
member left). The migration policy is the caller's (the Kafka listener's setting).

Must not know: the wire format (subscriptions arrive as topic names and owned
partitions; assignments leave as partitions), sockets, real time.

Rules (KIP-848, "online migration"):
- A classic member's subscription and the partitions it still owns come with each
  JoinGroup; its generation is its member epoch. The server assignor computes its
  target with everybody else's.
- Its JoinGroup answers at once (no leader: the server assigns): what it owns outside
  its target is to be revoked (not in the SyncGroup answer, held as revoking until a
  later JoinGroup shows it gone), and it gets the target's partitions nobody else still
  owns or revokes. So a partition is never owned by two members at once.
- Eager clients give up everything before they rejoin (an empty owned list); a
  subscription without owned partitions (version 0) owns nothing.
- Its Heartbeat answers REBALANCE_IN_PROGRESS while it is not reconciled (revoking,
  short of its target, or behind the group's assignment epoch): it rejoins to move on.
- It is removed after its own session timeout, or on LeaveGroup.
- A static one (group.instance.id) restarting joins with no member id and gets its
  own back; another member id claiming the instance is FENCED_INSTANCE_ID.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.errors import (
    FencedInstanceIdError,
    GroupLimitError,
    IllegalGenerationError,
    InconsistentGroupProtocolError,
    RebalanceInProgressError,
    UnknownMemberError,
)
from conveyor.storage.member_state import CONSUMER

from .consumer_coordinator import (
    GROUPS_MAX,
    MEMBERS_MAX,
    ClassicMetadata,
    ConsumerCoordinator,
    ConsumerGroup,
    ConsumerMember,
    Partitions,
    _minus,
    _union,
)
from .consumer_group_state import mark_changed

CLASSIC_PROTOCOL_TYPE = "consumer"


@dataclass(frozen=True, slots=True)
class AdoptedMember:
    """A classic group's member as the upgrade finds it."""

    member_id: str
    instance_id: str | None
    client_id: str
    client_host: str
    protocols: tuple[tuple[str, bytes], ...]
    session_timeout_ms: int
    rebalance_timeout_ms: int
    topics: tuple[str, ...]
    assigned: Partitions
    subscription_version: int = 0


@dataclass(frozen=True, slots=True)
class ClassicJoin:
    member_id: str
    generation: int
    protocol_name: str


@dataclass(frozen=True, slots=True)
class ClassicSync:
    protocol_name: str
    assigned: Partitions
    version: int


class ClassicMembers:
    def __init__(self, coordinator: ConsumerCoordinator) -> None:
        self.coordinator = coordinator

    # --- upgrade and downgrade ---------------------------------------------------------
    def adopt(self, group_id: str, generation: int, members: Sequence[AdoptedMember]) -> None:
        """Upgrade: a new consumer group whose members are the classic group's, each
        owning what the classic leader assigned it, at the classic generation."""
        coordinator = self.coordinator
        self.check_room(group_id, len(members))
        group = ConsumerGroup(group_id, epoch=generation, assignment_epoch=generation)
        now_ms = coordinator.clock.monotonic_ms()
        taken: Partitions = {}
        for adopted in members:
            owned = _minus(adopted.assigned, taken)  # a bad leader's overlap goes to the first
            taken = _union(taken, owned)
            member = ConsumerMember(
                adopted.member_id, adopted.instance_id, None, adopted.client_id,
                adopted.client_host, adopted.rebalance_timeout_ms, now_ms,
                topic_names=adopted.topics, epoch=generation, assigned=owned,
                classic=ClassicMetadata(adopted.session_timeout_ms, adopted.protocols,
                                        adopted.subscription_version))
            group.members[member.member_id] = member
            group.target[member.member_id] = owned
            if adopted.instance_id is not None:
                group.static[adopted.instance_id] = member.member_id
        coordinator.groups[group_id] = group

    def check_room(self, group_id: str, members: int) -> None:
        """Raise GroupLimitError unless a group of ``members`` may be adopted (checked
        before the classic group gives its members up)."""
        coordinator = self.coordinator
        if members > MEMBERS_MAX:
            raise GroupLimitError("too many members for a consumer group", limit=MEMBERS_MAX)
        if group_id not in coordinator.groups and len(coordinator.groups) >= GROUPS_MAX:
            coordinator._forget_empty_groups()
        if group_id not in coordinator.groups and len(coordinator.groups) >= GROUPS_MAX:
            raise GroupLimitError("too many consumer groups", limit=GROUPS_MAX)

    def classic_only(self, group_id: str) -> list[ConsumerMember] | None:
        """Downgrade: the group's members when every one of them is classic (None when
        a consumer-protocol member is still in, or nobody is); the group is forgotten
        (its committed offsets are the broker's)."""
        group = self.coordinator.groups.get(group_id)
        if group is None:
            return None
        self.coordinator._expire(group)
        if not group.members or any(m.classic is None for m in group.members.values()):
            return None
        del self.coordinator.groups[group_id]
        self.coordinator.members.delete(CONSUMER, group_id)  # the classic group's now
        return list(group.members.values())

    # --- the classic APIs --------------------------------------------------------------
    def _group(self, group_id: str) -> ConsumerGroup:
        group = self.coordinator.groups.get(group_id)
        if group is None:
            raise UnknownMemberError("unknown consumer group", group=group_id)
        self.coordinator._expire(group)
        return group

    def _member(self, group: ConsumerGroup, member_id: str) -> ConsumerMember:
        member = group.members.get(member_id)
        if member is None or member.classic is None:
            raise UnknownMemberError("unknown member", group=group.group_id, member=member_id)
        mark_changed(group, member_id)  # written at the group's next write
        return member

    def join(self, group_id: str, member_id: str, instance_id: str | None,
             protocols: Sequence[tuple[str, bytes]], topics: Sequence[str], owned: Partitions,
             subscription_version: int, session_timeout_ms: int, rebalance_timeout_ms: int,
             client_id: str = "", client_host: str = "") -> ClassicJoin:
        """A classic JoinGroup to a consumer group (``member_id`` not empty: the caller
        answers MEMBER_ID_REQUIRED first, as Kafka does)."""
        coordinator = self.coordinator
        group = self._group(group_id)
        if not protocols:
            raise InconsistentGroupProtocolError("join without protocols", group=group_id)
        if instance_id is not None:
            known = group.static.get(instance_id)
            if known is not None and known != member_id and known in group.members:
                previous = group.members[known]
                if previous.classic is not None or not previous.left_static:
                    # a restart joins with no member id (the caller maps it to this one)
                    raise FencedInstanceIdError("static member still active",
                                                instance_id=instance_id)
                coordinator._remove(group, previous)  # a consumer member gone for a while
        member = group.members.get(member_id)
        if member is not None and member.classic is None:
            raise InconsistentGroupProtocolError("member uses the consumer protocol",
                                                 member=member_id)
        now_ms = coordinator.clock.monotonic_ms()
        metadata = ClassicMetadata(session_timeout_ms, tuple(
            (name, bytes(data)) for name, data in protocols), subscription_version)
        if member is None:
            if len(group.members) >= MEMBERS_MAX:
                raise GroupLimitError("consumer group is full", group=group_id)
            member = ConsumerMember(member_id, instance_id, None, client_id, client_host,
                                    rebalance_timeout_ms, now_ms, classic=metadata)
            group.members[member_id] = member
            group.epoch += 1
            if instance_id is not None:
                group.static[instance_id] = member_id
        member.classic = metadata
        mark_changed(group, member_id)  # written at the group's next write
        member.last_seen_ms = now_ms
        member.rebalance_timeout_ms = max(rebalance_timeout_ms, 0)
        if tuple(topics) != member.topic_names:
            member.topic_names = tuple(topics)
            group.epoch += 1
        # what it no longer owns is given up; what it owns beyond its assignment is not its
        member.revoking = {topic: parts & owned.get(topic, frozenset())
                           for topic, parts in member.revoking.items()}
        member.revoking = {topic: parts for topic, parts in member.revoking.items() if parts}
        member.assigned = {topic: parts & owned.get(topic, frozenset())
                           for topic, parts in member.assigned.items()}
        member.assigned = {topic: parts for topic, parts in member.assigned.items() if parts}
        coordinator._update_target(group)
        self._reconcile(group, member, now_ms)
        return ClassicJoin(member.member_id, member.epoch, protocols[0][0])

    def _reconcile(self, group: ConsumerGroup, member: ConsumerMember, now_ms: int) -> None:
        target = group.target.get(member.member_id, {})
        revoke = _minus(member.assigned, target)
        if revoke:
            member.revoking = _union(member.revoking, revoke)
            member.revoke_deadline_ms = now_ms + max(member.rebalance_timeout_ms, 1_000)
        taken: Partitions = {}
        for other in group.members.values():
            if other is not member:
                taken = _union(taken, _union(other.assigned, other.revoking))
        kept = _minus(member.assigned, revoke)
        gained = _minus(_minus(_minus(target, kept), taken), member.revoking)
        member.assigned = {topic: parts for topic, parts in _union(kept, gained).items()
                           if parts}
        if member.epoch != group.assignment_epoch:
            member.previous_epoch, member.epoch = member.epoch, group.assignment_epoch

    def sync(self, group_id: str, member_id: str, generation: int) -> ClassicSync:
        group = self._group(group_id)
        member = self._member(group, member_id)
        if generation != member.epoch:
            raise IllegalGenerationError("stale generation", member=member_id,
                                         generation=generation, expected=member.epoch)
        member.last_seen_ms = self.coordinator.clock.monotonic_ms()
        assert member.classic is not None
        name = member.classic.protocols[0][0] if member.classic.protocols else ""
        return ClassicSync(name, dict(member.assigned), member.classic.subscription_version)

    def heartbeat(self, group_id: str, member_id: str, generation: int) -> None:
        """Keeps the member alive; REBALANCE_IN_PROGRESS asks it to rejoin."""
        coordinator = self.coordinator
        group = self._group(group_id)
        member = self._member(group, member_id)
        member.last_seen_ms = coordinator.clock.monotonic_ms()
        if generation != member.epoch:
            raise IllegalGenerationError("stale generation", member=member_id,
                                         generation=generation, expected=member.epoch)
        coordinator._update_target(group)
        if not self.reconciled(group, member):
            raise RebalanceInProgressError("the group's assignment changed", group=group_id)

    @staticmethod
    def reconciled(group: ConsumerGroup, member: ConsumerMember) -> bool:
        target = {topic: parts for topic, parts in group.target.get(member.member_id, {})
                  .items() if parts}
        return (not member.revoking and member.assigned == target
                and member.epoch == group.assignment_epoch)

    def leave(self, group_id: str, member_id: str, instance_id: str | None = None) -> None:
        group = self._group(group_id)
        if not member_id and instance_id is not None:
            member_id = group.static.get(instance_id, "")
        member = self._member(group, member_id)
        self.coordinator._remove(group, member)
        self.coordinator._update_target(group)
