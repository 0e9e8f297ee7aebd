"""ConsumerCoordinator: KIP-848 consumer groups (the "consumer" group protocol).

Owns: members, member epochs, the group epoch, subscriptions (topic names or a
regular expression), the server-side target assignment (``consumer_assignors``),
incremental reconciliation with revocation first, static membership, and the
member/epoch check of offset commits. Committed offsets themselves stay in the
broker's group offsets (``Broker.commit_offsets``), shared with classic groups. The
groups are written through to the StateStore after each change (group_members.py;
their stored form: consumer_group_state.py), so a restart or the next owner of the
group in a cluster goes on with the same members and epochs.

Must not know: the wire format, sockets, files, real time (the clock comes in).

Rules (KIP-848):
- Epoch 0 joins (a member may bring its own id; an empty one gets a new id), -1
  leaves, -2 is a static member leaving for a while (its assignment waits for it
  until its session times out). Any other epoch must be the member's current one
  (or the one before it, while the member has not caught up): else
  FencedMemberEpochError; an unknown member is UnknownMemberError.
- Any change of members, subscriptions, or subscribed topics' partitions bumps the
  group epoch and recomputes the target assignment.
- Reconciliation: a member first gives up what it owns outside its target (its
  epoch stays; it confirms by heartbeating without those partitions); then it gets
  its target's partitions that nobody else still owns, and the group's assignment
  epoch. A partition is never owned by two members at once.
- A member silent for consumer.session.timeout.ms, or revoking for longer than
  its rebalance timeout, is removed (its partitions go to the others).
- A static member (instance id) replaces the previous member with that id only
  after it left with epoch -2 (else UnreleasedInstanceIdError).
- A regular expression is compiled with the ``regex`` module and matched under one
  time budget per evaluation (cached per topic list), so a pathological pattern cannot
  stall the loop; it is checked before the group changes, so it poisons nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import regex

from conveyor.clock import Clock
from conveyor.errors import (
    FencedMemberEpochError,
    GroupLimitError,
    IllegalGenerationError,
    InvalidRegularExpressionError,
    InvalidRequestError,
    NonEmptyGroupError,
    StaleMemberEpochError,
    UnknownGroupError,
    UnknownMemberError,
    UnreleasedInstanceIdError,
    UnsupportedAssignorError,
)
from conveyor.storage.member_state import CONSUMER

from .consumer_assignors import ASSIGNORS, DEFAULT_ASSIGNOR
from .consumer_group_state import (
    ClassicMetadata,
    ConsumerGroup,
    ConsumerMember,
    Partitions,
    restore_consumer_group,
    stored_consumer_group,
)
from .group_configs import GroupConfigs
from .group_members import GroupMembers, StoredGroups

__all__ = [
    "ClassicMetadata",
    "ConsumerCoordinator",
    "ConsumerGroup",
    "ConsumerHeartbeat",
    "ConsumerMember",
    "Partitions",
]

if TYPE_CHECKING:
    from .broker import Broker

REGEX_CHARS_MAX: Final = 1_000
REGEX_BUDGET_MS: Final = 50  # one evaluation over every topic name; slower is refused
REGEX_CACHE_MAX: Final = 256  # (pattern, topic names) -> matches, oldest dropped first
MEMBERS_MAX: Final = 1_000  # Kafka's group.consumer.max.size is unbounded by default
GROUPS_MAX: Final = 10_000  # consumer groups held in memory (empty ones go first)

@dataclass(frozen=True, slots=True)
class ConsumerHeartbeat:
    member_id: str
    member_epoch: int
    heartbeat_interval_ms: int
    assignment: Partitions | None  # None: unchanged since the last answer


def _minus(left: Partitions, right: Partitions) -> Partitions:
    result = {topic: parts - right.get(topic, frozenset()) for topic, parts in left.items()}
    return {topic: parts for topic, parts in result.items() if parts}


def _union(left: Partitions, right: Partitions) -> Partitions:
    topics = set(left) | set(right)
    return {topic: left.get(topic, frozenset()) | right.get(topic, frozenset())
            for topic in topics}


def _overlaps(left: Partitions, right: Partitions) -> bool:
    return any(parts & right.get(topic, frozenset()) for topic, parts in left.items())


def compile_regex(pattern: str) -> regex.Pattern[str]:
    if len(pattern) > REGEX_CHARS_MAX:
        raise InvalidRegularExpressionError("regular expression too long",
                                            chars=len(pattern), limit=REGEX_CHARS_MAX)
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError) as error:
        raise InvalidRegularExpressionError("regular expression does not compile",
                                            pattern=pattern, reason=str(error)) from None


class ConsumerCoordinator:
    def __init__(self, broker: Broker, clock: Clock, configs: GroupConfigs) -> None:
        self.broker = broker
        self.clock = clock
        self.configs = configs
        self.groups: dict[str, ConsumerGroup] = {}
        self._regex_cache: dict[tuple[str, tuple[str, ...]], frozenset[str]] = {}
        # the groups as stored (group_members.py): restored now, written after changes
        self.stored = StoredGroups(broker.group_members, CONSUMER, self.groups,
                                   stored_consumer_group, restore_consumer_group,
                                   clock.monotonic_ms)
        self.members: GroupMembers = broker.group_members

    async def persist(self, group_id: str) -> None:
        """Write what changed in the group (classic members' changes included)."""
        await self.stored.persist(group_id)

    async def reload_group(self, group_id: str) -> None:
        """Read the group again from the state store (a cluster node claims it): its
        members go on with their epochs and assignments; sessions count from now."""
        await self.stored.reload(group_id)

    # --- heartbeat -----------------------------------------------------------------
    async def heartbeat(
        self, group_id: str, member_id: str, member_epoch: int, *,
        instance_id: str | None = None, rack: str | None = None,
        rebalance_timeout_ms: int = -1, topic_names: Sequence[str] | None = None,
        topic_regex: str | None = None, assignor: str | None = None,
        owned: Partitions | None = None, client_id: str = "", client_host: str = "",
    ) -> ConsumerHeartbeat:
        """One ConsumerGroupHeartbeat; answered once what it changed is written."""
        result = self._heartbeat(
            group_id, member_id, member_epoch, instance_id=instance_id, rack=rack,
            rebalance_timeout_ms=rebalance_timeout_ms, topic_names=topic_names,
            topic_regex=topic_regex, assignor=assignor, owned=owned, client_id=client_id,
            client_host=client_host)
        await self.stored.persist(group_id, result.member_id)
        return result

    def _heartbeat(
        self, group_id: str, member_id: str, member_epoch: int, *,
        instance_id: str | None, rack: str | None, rebalance_timeout_ms: int,
        topic_names: Sequence[str] | None, topic_regex: str | None, assignor: str | None,
        owned: Partitions | None, client_id: str, client_host: str,
    ) -> ConsumerHeartbeat:
        if not group_id:
            raise InvalidRequestError("group id must not be empty")
        if topic_regex:  # evaluated before the group changes: a bad pattern changes nothing
            self._matching(topic_regex, self._topic_names())
        if assignor is not None and assignor not in ASSIGNORS:
            raise UnsupportedAssignorError("unknown server assignor", assignor=assignor)
        group = self.groups.get(group_id)
        if group is None:
            if member_epoch != 0:
                raise UnknownMemberError("unknown consumer group member", group=group_id)
            if len(self.groups) >= GROUPS_MAX:
                self._forget_empty_groups()
            if len(self.groups) >= GROUPS_MAX:
                raise GroupLimitError("too many consumer groups", limit=GROUPS_MAX)
            group = self.groups[group_id] = ConsumerGroup(group_id)
        self._expire(group)
        interval_ms = self.configs.integer(group_id, "consumer.heartbeat.interval.ms")
        if member_epoch in (-1, -2):
            return self._leave(group, member_id, member_epoch, interval_ms)
        if member_epoch == 0:
            member = self._join(group, member_id, instance_id, rack, rebalance_timeout_ms,
                                topic_names, topic_regex, client_id, client_host)
            member.assignor = assignor or member.assignor
        else:
            member = self._known(group, member_id, member_epoch, owned)
        member.last_seen_ms = self.clock.monotonic_ms()
        if rebalance_timeout_ms > 0:
            member.rebalance_timeout_ms = rebalance_timeout_ms
        self._subscribe(group, member, topic_names, topic_regex, assignor)
        self._update_target(group)
        self._reconcile(group, member, owned)
        sent = (member.epoch, dict(member.assigned))
        if sent != member.last_sent:
            member.last_sent = sent
            return ConsumerHeartbeat(member.member_id, member.epoch, interval_ms,
                                     dict(member.assigned))
        return ConsumerHeartbeat(member.member_id, member.epoch, interval_ms, None)

    def _forget_empty_groups(self) -> None:
        """Groups without members hold nothing but an epoch: their offsets are the
        broker's, so they can go when room is needed."""
        for group_id, group in list(self.groups.items()):
            self._expire(group)
            if not group.members:
                del self.groups[group_id]

    def _join(self, group: ConsumerGroup, member_id: str, instance_id: str | None,
              rack: str | None, rebalance_timeout_ms: int, topic_names: Sequence[str] | None,
              topic_regex: str | None, client_id: str, client_host: str) -> ConsumerMember:
        if not member_id:
            member_id = f"{self.broker.rng.getrandbits(128):032x}"
        inherited: ConsumerMember | None = None
        if instance_id is not None:
            previous_id = group.static.get(instance_id)
            previous = group.members.get(previous_id) if previous_id is not None else None
            if previous is not None and previous.member_id != member_id:
                if not previous.left_static:
                    raise UnreleasedInstanceIdError(
                        "static member still active", instance_id=instance_id)
                inherited = group.members.pop(previous.member_id)
        existing = group.members.get(member_id)
        if existing is None and inherited is None:
            if topic_names is None and topic_regex is None:
                raise InvalidRequestError("a joining member must send its subscription")
            if len(group.members) >= MEMBERS_MAX:
                raise GroupLimitError("consumer group is full", group=group.group_id)
        member = ConsumerMember(member_id, instance_id, rack, client_id, client_host,
                                max(rebalance_timeout_ms, 0), self.clock.monotonic_ms())
        if inherited is not None:  # the static member comes back to what it had
            member.topic_names, member.regex = inherited.topic_names, inherited.regex
            member.assignor, member.assigned = inherited.assignor, inherited.assigned
            member.epoch = inherited.epoch
        elif existing is not None:
            member.topic_names, member.regex = existing.topic_names, existing.regex
            member.assignor = existing.assignor
        if topic_names is not None:  # the join's own subscription is no extra epoch
            member.topic_names = tuple(topic_names)
        if topic_regex is not None:
            member.regex = topic_regex or None
        group.members[member_id] = member
        if instance_id is not None:
            group.static[instance_id] = member_id
        if inherited is not None:  # no rebalance: the target moves to the new member id
            group.target[member_id] = group.target.pop(inherited.member_id, {})
        else:
            group.epoch += 1
        return member

    def _known(self, group: ConsumerGroup, member_id: str, member_epoch: int,
               owned: Partitions | None) -> ConsumerMember:
        member = group.members.get(member_id)
        if member is None or member.left_static:
            raise UnknownMemberError("unknown consumer group member", member=member_id)
        if member_epoch == member.epoch:
            return member
        caught_up = owned is not None and not _minus(owned, member.assigned)
        if member_epoch == member.previous_epoch and caught_up:
            return member
        raise FencedMemberEpochError("stale member epoch", member=member_id,
                                     epoch=member_epoch, expected=member.epoch)

    def _leave(self, group: ConsumerGroup, member_id: str, member_epoch: int,
               interval_ms: int) -> ConsumerHeartbeat:
        member = group.members.get(member_id)
        if member is None:
            raise UnknownMemberError("unknown consumer group member", member=member_id)
        if member_epoch == -2:
            if member.instance_id is None:
                raise InvalidRequestError("epoch -2 is for static members only")
            member.left_static = True
            member.last_seen_ms = self.clock.monotonic_ms()
            return ConsumerHeartbeat(member_id, -2, interval_ms, None)
        self._remove(group, member)
        return ConsumerHeartbeat(member_id, -1, interval_ms, None)

    def _remove(self, group: ConsumerGroup, member: ConsumerMember) -> None:
        group.members.pop(member.member_id, None)
        if member.instance_id is not None and group.static.get(member.instance_id) == (
                member.member_id):
            del group.static[member.instance_id]
        group.epoch += 1

    def _expire(self, group: ConsumerGroup) -> None:
        now_ms = self.clock.monotonic_ms()
        timeout_ms = self.configs.integer(group.group_id, "consumer.session.timeout.ms")
        for member in list(group.members.values()):
            session_ms = member.classic.session_timeout_ms if member.classic else timeout_ms
            silent = now_ms - member.last_seen_ms > session_ms
            stuck = bool(member.revoking) and now_ms > member.revoke_deadline_ms
            if silent or stuck:
                self._remove(group, member)

    # --- subscriptions and the target ------------------------------------------------
    def _subscribe(self, group: ConsumerGroup, member: ConsumerMember,
                   topic_names: Sequence[str] | None, topic_regex: str | None,
                   assignor: str | None) -> None:
        changed = False
        if topic_names is not None and tuple(topic_names) != member.topic_names:
            member.topic_names, changed = tuple(topic_names), True
        if topic_regex is not None and (topic_regex or None) != member.regex:
            member.regex, changed = topic_regex or None, True
        if assignor is not None and assignor != member.assignor:
            member.assignor, changed = assignor, True
        if changed:
            group.epoch += 1

    def _topic_names(self) -> tuple[str, ...]:
        return tuple(info.name for info in self.broker.list_topics() if info.kind != "queue")

    def _subscribed(self, member: ConsumerMember, names: tuple[str, ...]) -> frozenset[str]:
        topics = set(member.topic_names)
        if member.regex is not None:
            try:
                topics |= self._matching(member.regex, names)
            except InvalidRegularExpressionError:
                pass  # too slow on today's topics: matches nothing, the group goes on
        return frozenset(topics)

    def _matching(self, pattern_text: str, names: tuple[str, ...]) -> frozenset[str]:
        """The names ``pattern_text`` matches; cached per (pattern, topic list), and the
        whole evaluation has one time budget, so no pattern stalls the loop for long."""
        key = (pattern_text, names)
        cached = self._regex_cache.get(key)
        if cached is not None:
            return cached
        pattern = compile_regex(pattern_text)
        deadline_ms = self.clock.monotonic_ms() + REGEX_BUDGET_MS
        matched = set()
        for name in names:
            left_s = (deadline_ms - self.clock.monotonic_ms()) / 1000
            try:
                if left_s <= 0:
                    raise TimeoutError
                if pattern.fullmatch(name, timeout=left_s):
                    matched.add(name)
            except TimeoutError:
                raise InvalidRegularExpressionError(
                    "regular expression too slow to match", pattern=pattern_text) from None
        if len(self._regex_cache) >= REGEX_CACHE_MAX:
            self._regex_cache.pop(next(iter(self._regex_cache)))
        result = self._regex_cache[key] = frozenset(matched)
        return result

    def _update_target(self, group: ConsumerGroup) -> None:
        names = self._topic_names()
        subscriptions = {member_id: self._subscribed(member, names)
                         for member_id, member in group.members.items()
                         if not member.left_static or member.assigned}
        counts: dict[str, int] = {}
        for topics in subscriptions.values():
            for topic in topics:
                info = self.broker.topics.find(topic)
                counts[topic] = info.partitions if info is not None else 0
        chosen = [member.assignor for member in group.members.values() if member.assignor]
        group.assignor = chosen[0] if chosen else DEFAULT_ASSIGNOR
        # members by instance id where they have one: a static member coming back under a
        # new member id is the same member to the assignment
        signature = (group.assignor, tuple(sorted(counts.items())),
                     tuple(sorted((group.members[key].instance_id or key, tuple(sorted(value)))
                                  for key, value in subscriptions.items())))
        if signature == group.signature and group.epoch == group.assignment_epoch:
            return
        if group.epoch == group.assignment_epoch:
            group.epoch += 1  # only the topics changed: a new group epoch all the same
        current = {member_id: {topic: tuple(sorted(parts))
                               for topic, parts in member.assigned.items()}
                   for member_id, member in group.members.items()}
        target = ASSIGNORS[group.assignor](subscriptions, counts, current)
        group.target = {member_id: {topic: frozenset(parts) for topic, parts in parts_by.items()}
                        for member_id, parts_by in target.items()}
        group.assignment_epoch = group.epoch
        group.signature = signature

    # --- reconciliation -------------------------------------------------------------
    def _reconcile(self, group: ConsumerGroup, member: ConsumerMember,
                   owned: Partitions | None) -> None:
        if member.revoking and owned is not None and not _overlaps(owned, member.revoking):
            member.revoking = {}
        if member.revoking:
            return
        target = group.target.get(member.member_id, {})
        revoke = _minus(member.assigned, target)
        if revoke:
            member.assigned = _minus(member.assigned, revoke)
            member.revoking = revoke
            member.revoke_deadline_ms = (self.clock.monotonic_ms()
                                         + max(member.rebalance_timeout_ms, 1_000))
            return
        taken: Partitions = {}
        for other in group.members.values():
            if other is not member:
                taken = _union(taken, _union(other.assigned, other.revoking))
        member.assigned = {topic: parts for topic, parts in _union(
            member.assigned, _minus(_minus(target, member.assigned), taken)).items() if parts}
        if member.epoch != group.assignment_epoch:
            member.previous_epoch, member.epoch = member.epoch, group.assignment_epoch

    # --- commits and admin ------------------------------------------------------------
    def is_consumer_group(self, group_id: str) -> bool:
        return group_id in self.groups

    def has_members(self, group_id: str) -> bool:
        group = self.groups.get(group_id)
        if group is None:
            return False
        self._expire(group)
        return bool(group.members)

    def has_consumer_members(self, group_id: str) -> bool:
        """Has the group a member speaking the consumer protocol (not a classic one)?"""
        group = self.groups.get(group_id)
        return group is not None and any(member.classic is None
                                         for member in group.members.values())

    def check_commit(self, group_id: str, member_id: str, member_epoch: int) -> None:
        """Raise unless (member, epoch) may commit offsets of this consumer group."""
        group = self.groups[group_id]
        if not member_id and member_epoch < 0:
            if group.members:
                raise UnknownMemberError("simple commit to a group with members",
                                         group=group_id)
            return
        member = group.members.get(member_id)
        if member is None:
            raise UnknownMemberError("unknown consumer group member", member=member_id)
        if member.classic is not None and member_epoch != member.epoch:
            raise IllegalGenerationError("stale generation", member=member_id,
                                         generation=member_epoch, expected=member.epoch)
        if member_epoch not in (member.epoch, member.previous_epoch):
            raise StaleMemberEpochError("stale member epoch", member=member_id,
                                        epoch=member_epoch, expected=member.epoch)

    def check_fetch(self, group_id: str, member_id: str, member_epoch: int) -> None:
        """Raise unless (member, epoch) may fetch this group's offsets (OffsetFetch v9+):
        no member id is an admin's fetch; a member must be known and at its epoch."""
        if not member_id:
            return
        member = self.groups[group_id].members.get(member_id)
        if member is None:
            raise UnknownMemberError("unknown consumer group member", member=member_id)
        if member_epoch != member.epoch:
            raise StaleMemberEpochError("stale member epoch", member=member_id,
                                        epoch=member_epoch, expected=member.epoch)

    def describe(self, group_id: str) -> ConsumerGroup:
        group = self.groups.get(group_id)
        if group is None:
            raise UnknownGroupError("no such consumer group", group=group_id)
        self._expire(group)
        return group

    @staticmethod
    def state(group: ConsumerGroup) -> str:
        if not group.members:
            return "Empty"
        settled = all(not member.revoking and member.epoch == group.assignment_epoch
                      and member.assigned == {topic: parts for topic, parts in
                                              group.target.get(member.member_id, {}).items()
                                              if parts}
                      for member in group.members.values())
        return "Stable" if settled else "Reconciling"

    def list_groups(self) -> list[tuple[str, str]]:
        return [(group_id, self.state(group)) for group_id, group in sorted(self.groups.items())]

    def delete_group(self, group_id: str) -> None:
        group = self.groups.get(group_id)
        if group is not None and group.members:
            raise NonEmptyGroupError("consumer group has members", group=group_id)
        self.groups.pop(group_id, None)
        self.members.delete(CONSUMER, group_id)


def owned_partitions(items: Mapping[str, Sequence[int]]) -> Partitions:
    return {topic: frozenset(parts) for topic, parts in items.items() if parts}
