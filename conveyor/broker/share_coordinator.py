"""ShareCoordinator: Kafka share groups (KIP-932) on top of Conveyor's shared groups.

Owns: share-group membership (members, member epochs, the group epoch, the
assignment), share sessions (their epochs and partitions), which records each
member holds (offset -> receipt), and the group configs (``share.*``), which it
persists in its own table. The membership (not sessions or held records) is written
through to the StateStore after each heartbeat that changed it (group_members.py).
The records themselves, their locks, delivery counts and dead-lettering are the
shared group's (``Broker.acquire / ack / release /
reject / extend``): a share group named G reading topic T *is* the shared group
(G, T), so a queue Q read by a share group named Q is split between Kafka share
consumers and AMQP, SQS or HTTP consumers.

Must not know: the Kafka wire format (handlers turn requests into these calls and
outcomes into error codes), sockets, files, real time (the clock comes in).

Rules:
- Assignment: every partition of every subscribed topic goes to every member.
  Records are locked one by one, so members never receive the same record at the
  same time; Kafka's simple assignor spreads partitions only to bound fetch
  fan-out, which one node does not need.
- A heartbeat with epoch 0 joins (or rejoins) with the client's member id; -1
  leaves (what the member holds is released); any other epoch must equal the
  member's current epoch, else FencedMemberEpochError. The member epoch moves to
  the group epoch whenever the member's assignment changes.
- A member silent for ``share.session.timeout.ms`` is removed and its records
  released (checked whenever the group is touched).
- Share sessions: epoch 0 opens (or replaces) the member's session, -1 closes it
  and releases what the member holds, any other epoch must be the next expected
  one (ShareSessionNotFoundError / InvalidShareSessionEpochError otherwise).
- A member may settle only records it holds and whose lock has not expired
  (InvalidRecordStateError otherwise); acknowledgement batches must run forward
  without overlap.
- Several nodes (docs/cluster.md): heartbeats reach the group's coordinator only;
  ShareFetch and ShareAcknowledge reach each partition's leader, which keeps the
  member's share session and what it holds of the partitions it leads. A leader that
  does not coordinate the group (``coordinates`` says no) takes a member it never saw
  at its session's epoch 0 (an *adopted* member, as Kafka's share-partition leaders
  know members by their share sessions only) and forgets it when the session ends.
  Records are acquired only from the session's partitions (``acquire``'s
  ``partitions``); the shared group under them may be owned by a third node, which
  the broker's shared groups forward to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from conveyor.clock import Clock
from conveyor.errors import (
    FencedMemberEpochError,
    GroupLimitError,
    InvalidRecordStateError,
    InvalidRequestError,
    InvalidShareSessionEpochError,
    OperatingError,
    PreconditionFailedError,
    ShareSessionLimitError,
    ShareSessionNotFoundError,
    UnknownMemberError,
)
from conveyor.storage.member_state import SHARE

from .group_configs import GroupConfigs, by_duration_ms
from .group_members import GroupMembers, StoredGroups
from .share_admin import ShareGroupAdmin
from .share_polls import start_by_time, wait_for_any
from .share_state import (
    SHARE_GROUPS_MAX,
    Acknowledgement,
    HeartbeatResult,
    ShareGroup,
    ShareMember,
    ShareSession,
    TopicPartition,
    restore_share_group,
    stored_share_group,
)
from .types import Delivery, QueueConfig

if TYPE_CHECKING:
    from .broker import Broker

SESSION_PARTITIONS_MAX: Final = 10_000  # partitions one share session may name
SESSIONS_MAX: Final = 2_000  # share sessions open at once (Kafka's group.share.max.share.sessions)
MEMBERS_MAX: Final = 1_000  # members per share group (Kafka: group.share.max.size 200)
FIRST_CHUNK_RECORDS: Final = 16  # records acquired before their sizes are known

AcknowledgeType = Literal["gap", "accept", "release", "reject", "renew"]
ACKNOWLEDGE_TYPES: Final[dict[int, AcknowledgeType]] = {
    0: "gap", 1: "accept", 2: "release", 3: "reject", 4: "renew"}


class ShareCoordinator(ShareGroupAdmin):
    def __init__(self, broker: Broker, clock: Clock, configs: GroupConfigs) -> None:
        self.broker = broker
        self.clock = clock
        self.configs = configs
        self.groups: dict[str, ShareGroup] = {}
        # several nodes: does this node coordinate the group? (None: one node, every group)
        self.coordinates: Callable[[str], bool] | None = None
        self._starting: dict[tuple[str, str], asyncio.Lock] = {}  # (group, topic) being made
        # the groups as stored (group_members.py): restored now, written after changes
        self.stored = StoredGroups(broker.group_members, SHARE, self.groups,
                                   stored_share_group, restore_share_group, clock.monotonic_ms)
        self.members: GroupMembers = broker.group_members

    def config(self, group: str) -> dict[str, str]:
        return self.configs.get(group)

    def _int_config(self, group: str, name: str) -> int:
        return self.configs.integer(group, name)

    # --- membership ----------------------------------------------------------------
    async def reload_group(self, group_id: str) -> None:
        """Read the members again (a cluster node claims the group); sessions and held
        records are not stored: clients reopen sessions, locks expire."""
        await self.stored.reload(group_id)

    async def heartbeat(
        self, group_id: str, member_id: str, member_epoch: int,
        topics: Sequence[str] | None, client_id: str = "", client_host: str = "",
        rack: str | None = None,
    ) -> HeartbeatResult:
        """One ShareGroupHeartbeat; answered once what it changed is written."""
        result = await self._heartbeat(group_id, member_id, member_epoch, topics,
                                       client_id, client_host, rack)
        await self.stored.persist(group_id, member_id)
        return result

    async def _heartbeat(
        self, group_id: str, member_id: str, member_epoch: int,
        topics: Sequence[str] | None, client_id: str, client_host: str, rack: str | None,
    ) -> HeartbeatResult:
        if not group_id:
            raise InvalidRequestError("group id must not be empty")
        if not member_id:
            raise InvalidRequestError("a share member generates its own member id")
        group = self.groups.get(group_id)
        if group is None:
            if member_epoch != 0:
                raise UnknownMemberError("unknown share group member", group=group_id)
            if len(self.groups) >= SHARE_GROUPS_MAX:
                raise GroupLimitError("too many share groups", limit=SHARE_GROUPS_MAX)
            group = self.groups[group_id] = ShareGroup(group_id)
        await self._expire_members(group)
        interval_ms = self._int_config(group_id, "share.heartbeat.interval.ms")
        member = group.members.get(member_id)
        now_ms = self.clock.monotonic_ms()
        if member_epoch == -1:
            if member is None:
                raise UnknownMemberError("unknown share group member", member=member_id)
            await self._remove_member(group, member)
            return HeartbeatResult(-1, interval_ms, None)
        if member_epoch == 0:
            if member is None and len(group.members) >= MEMBERS_MAX:
                raise GroupLimitError("share group is full", group=group_id)
            previous = member or group.departed.pop(member_id, None)
            if previous is not None:
                await self._release_held(group, previous)
            member = ShareMember(member_id, 0, tuple(topics or ()), client_id, client_host,
                                 rack, now_ms)
            group.members[member_id] = member
            group.epoch += 1
        elif member is None:
            raise UnknownMemberError("unknown share group member", member=member_id)
        elif member_epoch != member.epoch:
            raise FencedMemberEpochError("stale member epoch", member=member_id,
                                         epoch=member_epoch, expected=member.epoch)
        member.last_seen_ms = now_ms
        if topics is not None and tuple(topics) != member.topics:
            member.topics = tuple(topics)
            group.epoch += 1
        assignment = await self._assign(group, member)
        if assignment != member.assignment or member.epoch == 0:
            member.assignment = assignment
            member.epoch = group.epoch
            return HeartbeatResult(member.epoch, interval_ms, assignment)
        return HeartbeatResult(member.epoch, interval_ms, None)

    async def _assign(self, group: ShareGroup, member: ShareMember) -> dict[str, tuple[int, ...]]:
        assignment: dict[str, tuple[int, ...]] = {}
        for topic in sorted(set(member.topics)):
            info = self.broker.topics.find(topic)
            if info is None:
                continue
            await self._ensure_shared_group(group, topic)
            assignment[topic] = tuple(range(info.partitions))
        return assignment

    async def _ensure_shared_group(self, group: ShareGroup, topic: str) -> None:
        if topic in group.topics:
            return
        # one member creates (and, by_duration, positions) it while the others wait, so
        # none acquires from a start about to move
        key = (group.name, topic)
        try:
            async with self._starting.setdefault(key, asyncio.Lock()):
                if topic not in group.topics:
                    await self._create_shared_group(group.name, topic)
                    group.topics.add(topic)
        finally:
            self._starting.pop(key, None)

    async def _create_shared_group(self, name: str, topic: str) -> None:
        config = self.config(name)
        queue_config = QueueConfig(
            visibility_timeout_ms=int(config["share.record.lock.duration.ms"]),
            max_deliveries=int(config["share.delivery.count.limit"]))
        reset = config["share.auto.offset.reset"]
        start: Literal["earliest", "latest"] = "earliest" if reset == "earliest" else "latest"
        try:
            await self.broker.create_shared_group(topic, name, queue_config, start)
        except PreconditionFailedError:
            return  # the shared group exists (a queue, or one made over another protocol)
        age_ms = by_duration_ms(reset)
        if age_ms is not None:
            await start_by_time(self.broker, topic, name, self.clock.wall_ms() - age_ms)

    async def _expire_members(self, group: ShareGroup) -> None:
        timeout_ms = self._int_config(group.name, "share.session.timeout.ms")
        now_ms = self.clock.monotonic_ms()
        for member in list(group.members.values()):
            if now_ms - member.last_seen_ms > timeout_ms:
                await self._remove_member(group, member, expired=True)
        for member in list(group.departed.values()):
            if now_ms - member.last_seen_ms > timeout_ms:
                del group.departed[member.member_id]
                group.sessions.pop(member.member_id, None)
                await self._release_held(group, member)

    async def _remove_member(self, group: ShareGroup, member: ShareMember,
                             expired: bool = False) -> None:
        group.members.pop(member.member_id, None)
        group.epoch += 1
        if member.member_id in group.sessions and not expired:
            group.departed[member.member_id] = member  # released when the session closes
            return
        group.sessions.pop(member.member_id, None)
        await self._release_held(group, member)

    async def _release_held(self, group: ShareGroup, member: ShareMember) -> None:
        member.held.clear()
        await self.broker.release_consumer(consumer_id(group.name, member.member_id))

    def member(self, group_id: str, member_id: str,
               departed: bool = True) -> tuple[ShareGroup, ShareMember]:
        """The member (or, with ``departed``, one that left with its session open)."""
        group = self.groups.get(group_id)
        member = group.members.get(member_id) if group is not None else None
        if member is None and departed and group is not None:
            member = group.departed.get(member_id)
        if group is None or member is None:
            raise UnknownMemberError("unknown share group member", group=group_id,
                                     member=member_id)
        member.last_seen_ms = self.clock.monotonic_ms()
        return group, member

    # --- sessions ------------------------------------------------------------------
    async def open_session(self, group_id: str, member_id: str, epoch: int,
                           add: Iterable[TopicPartition], forget: Iterable[TopicPartition],
                           ) -> tuple[ShareSession | None, bool]:
        """Check and advance the member's session epoch; returns the session (None once
        closed) and whether this request closed it (epoch -1)."""
        if epoch == 0:
            await self._adopt(group_id, member_id)
        group, _ = self.member(group_id, member_id)
        session = group.sessions.get(member_id)
        if epoch == 0:
            if session is None and self.open_sessions() >= SESSIONS_MAX:
                raise ShareSessionLimitError("too many share sessions", limit=SESSIONS_MAX)
            session = group.sessions[member_id] = ShareSession(1)
        elif session is None:
            raise ShareSessionNotFoundError("no share session for this member",
                                            member=member_id)
        elif epoch == -1:
            return session, True
        elif epoch != session.epoch:
            raise InvalidShareSessionEpochError("unexpected share session epoch",
                                                epoch=epoch, expected=session.epoch)
        else:
            session.epoch = session.epoch + 1 if session.epoch < 2**31 - 1 else 1
        session.partitions.update(add)
        session.partitions.difference_update(forget)
        if len(session.partitions) > SESSION_PARTITIONS_MAX:
            raise InvalidRequestError("too many partitions in the share session",
                                      limit=SESSION_PARTITIONS_MAX)
        return session, False

    async def _adopt(self, group_id: str, member_id: str) -> None:
        """A share session opened on a partition leader that does not coordinate the
        group: take the member as its session names it (its heartbeats go to the
        coordinator). The group's configs are read again: AlterConfigs reached the
        coordinator, not necessarily this node."""
        if self.coordinates is None or not group_id or self.coordinates(group_id):
            return
        group = self.groups.get(group_id)
        if group is not None:
            # members left from when this node coordinated the group, and adopted ones
            # whose client went quiet, go (no heartbeat reaches this node to expire them)
            await self._expire_members(group)
            if member_id in group.members or member_id in group.departed:
                return
        if not member_id:
            raise InvalidRequestError("a share member generates its own member id")
        if group is None:
            if len(self.groups) >= SHARE_GROUPS_MAX:
                raise GroupLimitError("too many share groups", limit=SHARE_GROUPS_MAX)
            group = self.groups[group_id] = ShareGroup(group_id)
        if len(group.members) >= MEMBERS_MAX:
            raise GroupLimitError("share group is full", group=group_id)
        await self.configs.reload_group(group_id)
        group = self.groups.setdefault(group_id, group)  # forgotten while it read
        group.members.setdefault(member_id, ShareMember(
            member_id, 0, (), "", "", None, self.clock.monotonic_ms(), adopted=True))

    def _end_adopted(self, group: ShareGroup, member: ShareMember) -> None:
        if member.adopted and group.members.get(member.member_id) is member:
            del group.members[member.member_id]

    def open_sessions(self) -> int:
        return sum(len(group.sessions) for group in self.groups.values())

    async def session_lost(self, group_id: str, member_id: str, session: ShareSession) -> None:
        """The connection that opened ``session`` closed: end it, releasing what the member
        holds, unless the member opened a newer session elsewhere since."""
        group = self.groups.get(group_id)
        if group is None or group.sessions.get(member_id) is not session:
            return
        member = group.members.get(member_id) or group.departed.get(member_id)
        group.sessions.pop(member_id, None)
        group.departed.pop(member_id, None)
        if member is not None:
            self._end_adopted(group, member)
            try:
                await self._release_held(group, member)
            except OperatingError:
                pass  # the broker is closing: the locks end with it (or expire)

    async def close_session(self, group_id: str, member_id: str) -> None:
        group, member = self.member(group_id, member_id)
        group.sessions.pop(member_id, None)
        group.departed.pop(member_id, None)
        self._end_adopted(group, member)
        await self._release_held(group, member)

    # --- records -------------------------------------------------------------------
    async def acquire(self, group_id: str, member_id: str, topics: Sequence[str],
                      records_max: int, wait_ms: int, bytes_max: int = 1 << 62,
                      partitions: Mapping[str, Sequence[int]] | None = None,
                      ) -> tuple[list[Delivery], int]:
        """Lock records of ``topics`` for the member, up to ``records_max`` and about
        ``bytes_max`` (the first record always; the last chunk may overshoot a little);
        returns them and the lock duration. ``partitions``: per topic, the only
        partitions to take from (a share session's, on the partitions' leader)."""
        group, member = self.member(group_id, member_id, departed=False)
        lock_ms = self._int_config(group_id, "share.record.lock.duration.ms")
        consumer = consumer_id(group_id, member_id)
        self._prune(member)
        if partitions is not None:
            topics = [topic for topic in topics if partitions.get(topic)]
        if not member.adopted:  # else the coordinator made them at the assignment
            for topic in topics:
                await self._ensure_shared_group(group, topic)
        deliveries = await self._take(topics, group_id, consumer, lock_ms, records_max,
                                      bytes_max, [], partitions)
        if not deliveries and len(topics) == 1 and wait_ms > 0:
            # Long-poll the topic for one record (woken by appends, releases and lock
            # expiries), then take what else is ready.
            deliveries = await self.broker.acquire(
                topics[0], group_id, 1, lock_ms, wait_ms, consumer,
                partitions=None if partitions is None else partitions[topics[0]])
            if deliveries:
                deliveries = await self._take(topics, group_id, consumer, lock_ms,
                                              records_max, bytes_max, deliveries, partitions)
        elif not deliveries and topics and wait_ms > 0:
            deliveries = await wait_for_any(
                self.broker, self.clock, topics, wait_ms, lambda: self._take(
                    topics, group_id, consumer, lock_ms, records_max, bytes_max, [],
                    partitions), partitions)
        if group.members.get(member_id) is not member:  # left while waiting
            await self.broker.release([delivery.receipt for delivery in deliveries])
            return [], lock_ms
        for delivery in deliveries:
            member.held[(delivery.topic, delivery.partition, delivery.offset)] = (
                delivery.receipt, delivery.lock_deadline_ms)
        return deliveries, lock_ms

    async def _take(self, topics: Sequence[str], group_id: str, consumer: str, lock_ms: int,
                    records_max: int, bytes_max: int, taken: list[Delivery],
                    partitions: Mapping[str, Sequence[int]] | None = None,
                    ) -> list[Delivery]:
        """Acquire without waiting, in chunks sized by the records seen so far, so a
        fetch of large records stops near ``bytes_max`` instead of locking (and later
        counting a delivery of) records it cannot send."""
        used = sum(map(delivery_bytes, taken))
        largest = max(map(delivery_bytes, taken), default=0)
        for topic in topics:
            while len(taken) < records_max and used < bytes_max:
                room = records_max - len(taken)
                chunk = min(room, FIRST_CHUNK_RECORDS if largest == 0
                            else max(1, (bytes_max - used) // largest))
                got = await self.broker.acquire(
                    topic, group_id, chunk, lock_ms, 0, consumer,
                    partitions=None if partitions is None else partitions.get(topic, ()))
                taken += got
                used += sum(map(delivery_bytes, got))
                largest = max([largest, *map(delivery_bytes, got)])
                if len(got) < chunk:
                    break
        return taken

    def _prune(self, member: ShareMember) -> None:
        now_ms = self.clock.wall_ms()
        for key, (_, deadline_ms) in list(member.held.items()):
            if deadline_ms <= now_ms:
                del member.held[key]

    async def acknowledge(
        self, group_id: str, member_id: str, batches: Sequence[Acknowledgement],
        renew_allowed: bool = False,
    ) -> dict[TopicPartition, OperatingError | None]:
        """Apply the member's acknowledgements; an error per partition (None: all applied)."""
        _, member = self.member(group_id, member_id)
        lock_ms = self._int_config(group_id, "share.record.lock.duration.ms")
        outcome: dict[TopicPartition, OperatingError | None] = {}
        actions: dict[AcknowledgeType, list[tuple[TopicPartition, str]]] = {}
        now_ms = self.clock.wall_ms()
        held_counts: dict[TopicPartition, int] = {}
        for topic, partition, _ in member.held:
            held_counts[(topic, partition)] = held_counts.get((topic, partition), 0) + 1
        for (topic, partition), items in _by_partition(batches).items():
            key = (topic, partition)
            try:
                outcome[key] = None
                for offset, kind in _expand(items, renew_allowed, held_counts.get(key, 0)):
                    if kind == "gap":
                        continue
                    held = member.held.get((topic, partition, offset))
                    if held is None or held[1] <= now_ms:
                        raise InvalidRecordStateError(
                            "record not acquired by this member (or its lock expired)",
                            topic=topic, partition=partition, offset=offset)
                    actions.setdefault(kind, []).append((key, held[0]))
                    if kind != "renew":
                        del member.held[(topic, partition, offset)]
            except OperatingError as error:
                outcome[key] = error
        await self._apply(actions, outcome, lock_ms, member)
        return outcome

    async def _apply(self, actions: dict[AcknowledgeType, list[tuple[TopicPartition, str]]],
                     outcome: dict[TopicPartition, OperatingError | None], lock_ms: int,
                     member: ShareMember) -> None:
        for kind, items in actions.items():
            receipts = [receipt for _, receipt in items]
            try:
                if kind == "accept":
                    await self.broker.ack(receipts)
                elif kind == "release":
                    await self.broker.release(receipts)
                elif kind == "reject":
                    await self.broker.reject(receipts)
                else:
                    deadlines = await self.broker.extend(receipts, lock_ms)
                    for (key, receipt), deadline_ms in zip(items, deadlines, strict=False):
                        offset = int(receipt.split(":")[2])
                        member.held[(key[0], key[1], offset)] = (receipt, deadline_ms)
            except OperatingError as error:  # a lock expired between the check and now
                for key, _ in items:
                    if outcome.get(key) is None:
                        outcome[key] = InvalidRecordStateError(error.message)


def delivery_bytes(delivery: Delivery) -> int:
    """About what a delivery costs in a fetch response (record overhead included)."""
    headers = sum(len(name) + len(value or b"") for name, value in delivery.headers)
    return 32 + len(delivery.key or b"") + len(delivery.value or b"") + headers


def consumer_id(group_id: str, member_id: str) -> str:
    """The consumer id the member's records are locked under in the shared group."""
    return f"kafka-share:{group_id}:{member_id}"


def _by_partition(batches: Sequence[Acknowledgement]) -> dict[TopicPartition, list[Any]]:
    grouped: dict[TopicPartition, list[Acknowledgement]] = {}
    for batch in batches:
        grouped.setdefault((batch.topic, batch.partition), []).append(batch)
    return dict(grouped)


def _expand(batches: Sequence[Acknowledgement], renew_allowed: bool,
            held: int) -> list[tuple[int, AcknowledgeType]]:
    """(offset, type) for every offset of one partition's batches, after checking that
    the batches run forward without overlap and their types fit. ``held``: how many
    records of the partition the member holds. Work stays in proportion to the request
    and to ``held``: a one-type batch is expanded only while what it names could all be
    held (a GAP batch is not expanded at all); per-offset types came over the wire."""
    result: list[tuple[int, AcknowledgeType]] = []
    previous_last = -1
    for batch in batches:
        first, last, types = batch.first_offset, batch.last_offset, batch.types
        if first < 0 or last < first or first <= previous_last:
            raise InvalidRequestError("acknowledgement batches overlap or run backwards",
                                      first_offset=first, last_offset=last)
        if len(types) not in (1, last - first + 1):
            raise InvalidRequestError("one acknowledge type, or one per offset",
                                      first_offset=first, last_offset=last)
        kinds: list[AcknowledgeType] = []
        for code in types:
            kind = ACKNOWLEDGE_TYPES.get(code)
            if kind is None or (kind == "renew" and not renew_allowed):
                raise InvalidRequestError("unknown acknowledge type", type=code)
            kinds.append(kind)
        previous_last = last
        if len(types) == 1:
            if kinds[0] == "gap":
                continue
            if last - first + 1 + len(result) > held:
                raise InvalidRecordStateError(
                    "more records acknowledged than this member holds",
                    first_offset=first, last_offset=last, held=held)
        result.extend((offset, kinds[0] if len(types) == 1 else kinds[offset - first])
                      for offset in range(first, last + 1))
    return result
