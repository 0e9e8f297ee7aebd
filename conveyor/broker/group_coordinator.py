"""GroupCoordinator: ordered (Kafka classic) consumer groups and their committed offsets.

Owns: every ``OrderedGroup`` (the sans-IO state machine in ordered_group.py) by id,
join/sync/heartbeat/leave with their waits, session expiry (``tick``), server-side
assignment for "conveyor" groups, offset commits and fetches, lag, deletion and the
expiry of empty groups (KIP-211), and persisting all of it through the StateStore.
May call: the topic registry (partition counts, topic existence), the log store (log
ends, for clamping and lag), the state store, the clock and rng. Called only by the
facade; it calls nothing above it.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

from conveyor.clock import Clock
from conveyor.errors import (
    InvalidRequestError,
    InvalidSessionTimeoutError,
    NonEmptyGroupError,
    NotCoordinatorError,
    UnavailableError,
    UnknownGroupError,
)
from conveyor.storage.log_api import LogStore
from conveyor.storage.sql_engine import WriteGuard
from conveyor.storage.state_store import CommittedOffsetRow, StateStore

from .broker_config import BrokerConfig
from .log_end import LostRange, clamp
from .ordered_group import (
    ASSIGNORS,
    CommittedOffset,
    GroupDescription,
    GroupListing,
    GroupState,
    JoinResult,
    Member,
    MemberIdRequired,
    OrderedGroup,
    SyncResult,
    decode_assignment,
    encode_assignment,
    parse_subscription,
)
from .topics import TopicRegistry
from .types import PartitionLag

logger = logging.getLogger("conveyor.broker")


class GroupCoordinator:
    def __init__(self, topics: TopicRegistry, log_store: LogStore, state_store: StateStore,
                 clock: Clock, rng: random.Random, config: BrokerConfig) -> None:
        self.topics = topics
        self.log_store = log_store
        self.state_store = state_store
        self.clock = clock
        self.rng = rng
        self.config = config
        # group id -> coordinator state
        self.groups: dict[str, OrderedGroup] = {}
        # a cluster node (conveyor/cluster): the owner fence of a group this node
        # coordinates, None if it does not; an offset commit and a leader's SyncGroup
        # are written under it
        self.commit_guard: Callable[[str], WriteGuard | None] | None = None
        # told the group id when a write under its guard found no row (lost the group)
        self.guard_refused: Callable[[str], None] = _nothing

    def log_ends(self) -> dict[tuple[str, int], int]:
        """Each known partition's log end after recovery (what state is clamped to)."""
        return {(topic, partition): self.log_store.offsets(topic, partition).high_watermark
                for topic, partition in self.log_store.partitions()
                if self.topics.find(topic) is not None}

    def forget_topic(self, name: str) -> None:
        """As Kafka: the committed offsets of a deleted topic go too."""
        for group in self.groups.values():
            if any(topic == name for topic, _ in group.offsets):
                group.offsets = {k: v for k, v in group.offsets.items() if k[0] != name}
                self.state_store.delete_committed_offsets(group.group_id, name)

    def close(self) -> None:
        """Every join or sync still waiting fails with UnavailableError."""
        for group in self.groups.values():
            for member in list(group.members.values()):
                closing = UnavailableError("broker is shutting down", group_id=group.group_id)
                if member.join_waiter is not None and not member.join_waiter.done():
                    member.join_waiter.set_exception(closing)
                if member.sync_waiter is not None and not member.sync_waiter.done():
                    member.sync_waiter.set_exception(closing)

    def _group(self, group_id: str, create: bool = False) -> OrderedGroup:
        group = self.groups.get(group_id)
        if group is None or group.state is GroupState.DEAD:
            if not create:
                raise UnknownGroupError("unknown group", group_id=group_id)
            group = OrderedGroup(group_id, self._member_suffix)
            self.groups[group_id] = group
        return group

    def _member_suffix(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    async def load(self, lost_ranges: list[LostRange]) -> None:
        for group_id, snapshot in (await self.state_store.load_groups()).items():
            self._group(group_id, create=True).restore(snapshot)
        log_ends = self.log_ends()
        for row in await self.state_store.load_committed_offsets():
            log_end = log_ends.get((row.topic, row.partition))
            offset = row.committed_offset
            if log_end is not None:
                offset = clamp("ordered-group", row.group_id, row.topic, row.partition,
                               offset, log_end, lost_ranges)
            if offset != row.committed_offset:
                self.state_store.save_committed_offsets([dataclasses.replace(
                    row, committed_offset=offset)])
            self._group(row.group_id, create=True).offsets[(row.topic, row.partition)] = (
                CommittedOffset(offset, row.metadata, row.leader_epoch, row.commit_ms)
            )

    async def reload_group(self, group_id: str) -> None:
        """Read one group again from the state store (another node coordinated it)."""
        snapshot = (await self.state_store.load_groups()).get(group_id)
        rows = await self.state_store.load_committed_offsets(group_id)
        self.groups.pop(group_id, None)
        if snapshot is None and not rows:
            return
        group = self._group(group_id, create=True)
        if snapshot is not None:
            group.restore(snapshot)
        for row in rows:
            group.offsets[(row.topic, row.partition)] = CommittedOffset(
                row.committed_offset, row.metadata, row.leader_epoch, row.commit_ms)

    def _save_group(self, group: OrderedGroup) -> None:
        self.state_store.save_group(group.group_id, group.snapshot())

    def _server_assign(
        self, protocol_name: str, metadata: Mapping[str, bytes]
    ) -> dict[str, bytes]:
        assignor = ASSIGNORS.get(protocol_name, ASSIGNORS["range"])
        subscriptions = {member: parse_subscription(data) for member, data in metadata.items()}
        counts = {}
        for topics in subscriptions.values():
            for topic in topics:
                info = self.topics.find(topic)
                counts[topic] = info.partitions if info is not None else 0
        assigned = assignor(subscriptions, counts)
        return {member: encode_assignment(parts) for member, parts in assigned.items()}

    def tick(self, now_ms: int) -> None:
        for group in list(self.groups.values()):
            generation = group.generation
            group.tick(now_ms, self._server_assign)
            if group.generation != generation:
                self._save_group(group)

    async def join_group(
        self,
        group_id: str,
        member_id: str,
        protocol_type: str,
        protocols: Sequence[tuple[str, bytes]],
        session_timeout_ms: int,
        rebalance_timeout_ms: int | None = None,
        group_instance_id: str | None = None,
        client_id: str = "",
        client_host: str = "",
        require_known_member_id: bool = True,
    ) -> JoinResult | MemberIdRequired:
        """Join (or rejoin) a group; waits until the rebalance's join phase completes."""
        if not group_id:
            raise InvalidRequestError("group id is empty")
        timeout_min = self.config.session_timeout_ms_min
        timeout_max = self.config.session_timeout_ms_max
        if not timeout_min <= session_timeout_ms <= timeout_max:
            raise InvalidSessionTimeoutError(
                "session timeout out of range", session_timeout_ms=session_timeout_ms,
                minimum=timeout_min, maximum=timeout_max,
            )
        group = self._group(group_id, create=True)
        generation = group.generation
        outcome = group.join(
            self.clock.monotonic_ms(), member_id, group_instance_id, protocol_type, protocols,
            session_timeout_ms, rebalance_timeout_ms or session_timeout_ms, client_id,
            client_host, require_known_member_id, self._server_assign,
        )
        if group.generation != generation or group_instance_id is not None:
            self._save_group(group)
        if isinstance(outcome, JoinResult | MemberIdRequired):
            return outcome
        result = await outcome
        self._save_group(group)
        await self.state_store.commit()
        return result

    async def sync_group(
        self,
        group_id: str,
        member_id: str,
        generation: int,
        assignments: Mapping[str, bytes] | None = None,
    ) -> SyncResult:
        """Leader sends assignments; every member waits for its own."""
        group = self._group(group_id)
        if (self.commit_guard is not None and member_id == group.leader_id
                and group.state is GroupState.COMPLETING_REBALANCE
                and generation == group.generation):
            await self._sync_guarded(group)
        outcome = group.sync(self.clock.monotonic_ms(), member_id, generation, assignments or {})
        if isinstance(outcome, SyncResult):
            return outcome
        return await outcome

    async def _sync_guarded(self, group: OrderedGroup) -> None:
        """A cluster node's leader SyncGroup: the group's state is written under the
        owner fence (owner, epoch, live lease: checked inside the write's transaction)
        before the assignment is handed out. Refused: every member waiting for its
        assignment and the leader are told NOT_COORDINATOR, and nothing is handed out
        (they find the group's coordinator again and rejoin there)."""
        assert self.commit_guard is not None
        guard = self.commit_guard(group.group_id)
        if guard is not None and await self.state_store.save_group_guarded(
                group.group_id, group.snapshot(), guard):
            return
        refused = _refusal(group.group_id, self.guard_refused)
        for member in group.members.values():
            waiter, member.sync_waiter = member.sync_waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(refused)
        raise refused

    async def heartbeat(self, group_id: str, member_id: str, generation: int) -> None:
        self._group(group_id).heartbeat(self.clock.monotonic_ms(), member_id, generation)

    async def leave_group(
        self,
        group_id: str,
        member_id: str = "",
        group_instance_id: str | None = None,
    ) -> None:
        group = self._group(group_id)
        now_ms = self.clock.monotonic_ms()
        if group_instance_id is not None and not member_id:
            group.leave_instance(now_ms, group_instance_id, self._server_assign)
        else:
            if group_instance_id is not None:
                group.static_members.pop(group_instance_id, None)
            group.leave(now_ms, member_id, self._server_assign)
        self._save_group(group)
        await self.state_store.commit()

    def release_members(self, group_id: str) -> tuple[int, str, list[Member]] | None:
        """Online upgrade to a KIP-848 group: the classic group's generation, protocol
        and members (None if it has none), the group left Empty with its committed
        offsets; a join or sync still waiting is told REBALANCE_IN_PROGRESS (it rejoins,
        now in the consumer group)."""
        group = self.groups.get(group_id)
        if group is None or not group.members:
            return None
        released = group.release_members()
        self._save_group(group)
        return released

    def adopt_members(self, group_id: str, generation: int, protocol_type: str,
                      members: Sequence[Member]) -> None:
        """Online downgrade from a KIP-848 group: these classic members become the
        classic group's, which starts a rebalance at once (they rejoin on their next
        heartbeat and the leader assigns)."""
        group = self._group(group_id, create=True)
        group.adopt_members(self.clock.monotonic_ms(), generation, protocol_type, members)
        self._save_group(group)

    async def commit_offsets(
        self,
        group_id: str,
        offsets: Mapping[tuple[str, int], CommittedOffset | int],
        member_id: str = "",
        generation: int = -1,
    ) -> None:
        """Commit per-partition offsets; generation -1 + empty member = simple commit."""
        group = self._group(group_id, create=True)
        group.check_commit(member_id, generation)
        now_ms = self.clock.wall_ms()
        normalized = {
            key: value if isinstance(value, CommittedOffset) else CommittedOffset(value)
            for key, value in offsets.items()
        }
        normalized = {
            key: dataclasses.replace(value, commit_ms=value.commit_ms or now_ms)
            for key, value in normalized.items()
        }
        for topic, _ in normalized:
            self.topics.get(topic)
        rows = [CommittedOffsetRow(group_id, topic, partition, value.offset, value.metadata,
                                   value.leader_epoch, value.commit_ms)
                for (topic, partition), value in normalized.items()]
        if self.commit_guard is not None:
            await self._commit_guarded(group, rows, normalized)
            return
        group.commit(normalized)
        self.state_store.save_committed_offsets(rows)
        await self.state_store.commit()

    async def _commit_guarded(self, group: OrderedGroup, rows: list[CommittedOffsetRow],
                              offsets: dict[tuple[str, int], CommittedOffset]) -> None:
        """A cluster node's commit: written only while its owner row (owner, epoch, live
        lease) holds, checked inside the write's own transaction; shown in memory
        only once written."""
        assert self.commit_guard is not None
        guard = self.commit_guard(group.group_id)
        if guard is None or not await self.state_store.save_committed_offsets_guarded(
                rows, guard):
            raise _refusal(group.group_id, self.guard_refused)
        group.commit(offsets)

    def check_member(self, group_id: str, member_id: str, generation: int) -> None:
        """A transactional offset commit by (member, generation) of a classic group: the
        KIP-447 fence of a zombie member. Standalone consumers (no member, generation -1)
        and groups this coordinator does not hold (KIP-848 ones) are not checked."""
        group = self.groups.get(group_id)
        if group is None or group.state is GroupState.DEAD or (
                generation < 0 and member_id == ""):
            return
        group.check_commit(member_id, generation)

    def show_offsets(self, group_id: str,
                     offsets: Mapping[tuple[str, int], CommittedOffset]) -> None:
        """Offsets a committed transaction carried, already written by the caller
        (txn_offsets.py): visible to OffsetFetch from now on, whoever is in the group."""
        self._group(group_id, create=True).commit(dict(offsets))

    def fetch_offsets(
        self, group_id: str, partitions: Iterable[tuple[str, int]] | None = None
    ) -> dict[tuple[str, int], CommittedOffset | None]:
        """Committed offsets (None: nothing committed); partitions None = all committed."""
        group = self.groups.get(group_id)
        stored = group.offsets if group is not None else {}
        if partitions is None:
            return dict(stored)
        return {key: stored.get(key) for key in partitions}

    def describe_group(self, group_id: str) -> GroupDescription:
        group = self.groups.get(group_id)
        if group is None:
            return GroupDescription(group_id, GroupState.DEAD, "", "", 0, "", ())
        return group.describe()

    def list_groups(self) -> list[GroupListing]:
        return [
            GroupListing(group.group_id, group.protocol_type, group.state)
            for group in sorted(self.groups.values(), key=lambda g: g.group_id)
            if group.state is not GroupState.DEAD
        ]

    async def delete_groups(self, group_ids: Iterable[str]) -> dict[str, Exception | None]:
        """Delete Empty groups and their offsets; per group: None or the error."""
        outcome: dict[str, Exception | None] = {}
        for group_id in group_ids:
            try:
                group = self._group(group_id)
                if self.commit_guard is not None:
                    await self._delete_guarded(group)
                group.delete()
            except (UnknownGroupError, NonEmptyGroupError, NotCoordinatorError) as error:
                outcome[group_id] = error
                continue
            del self.groups[group_id]
            if self.commit_guard is None:
                self.state_store.delete_group(group_id)
            outcome[group_id] = None
        await self.state_store.commit()
        return outcome

    async def _delete_guarded(self, group: OrderedGroup) -> None:
        """A cluster node's delete: the rows go only while its owner row holds (checked
        in the delete's own transaction), and before the group leaves memory."""
        assert self.commit_guard is not None
        if group.members or group.pending_members:
            raise NonEmptyGroupError("group has members", group_id=group.group_id)
        guard = self.commit_guard(group.group_id)
        if guard is None or not await self.state_store.delete_group_guarded(
                group.group_id, guard):
            raise _refusal(group.group_id, self.guard_refused)

    async def expire_groups(self) -> list[str]:
        """Delete Empty ordered groups whose newest commit is older than
        ``offsets_retention_ms`` (wall ms, as commit times are; KIP-211): a simple
        offset commit creates a group, and without this none would ever go."""
        now_ms = self.clock.wall_ms()
        expired = [
            group_id for group_id, group in self.groups.items()
            if group.state is GroupState.EMPTY and not group.members
            and max((o.commit_ms for o in group.offsets.values()), default=0)
            + self.config.offsets_retention_ms <= now_ms
        ]
        for group_id in expired:
            del self.groups[group_id]
            self.state_store.delete_group(group_id)
            logger.info("ordered group %s expired (empty, no commit for %d ms)", group_id,
                        self.config.offsets_retention_ms)
        if expired:
            await self.state_store.commit()
        return expired

    def group_lag(self, group_id: str) -> list[PartitionLag]:
        """Lag of every partition of every topic the group committed to."""
        group = self._group(group_id)
        topics = sorted({topic for topic, _ in group.offsets})
        lags = []
        for topic in topics:
            info = self.topics.find(topic)
            if info is None:
                continue
            for partition in range(info.partitions):
                log = self.log_store.offsets(topic, partition)
                committed = group.offsets.get((topic, partition))
                start = committed.offset if committed is not None else log.log_start_offset
                lags.append(PartitionLag(
                    topic, partition, committed.offset if committed is not None else -1,
                    log.high_watermark, max(0, log.high_watermark - start),
                ))
        return lags

    async def delete_committed_offsets(
        self, group_id: str, partitions: Iterable[tuple[str, int]]
    ) -> None:
        """Forget the group's committed offsets of these partitions (OffsetDelete)."""
        group = self._group(group_id)
        doomed = set(partitions)
        for key in doomed:
            group.offsets.pop(key, None)
        for topic in {topic for topic, _ in doomed}:
            self.state_store.delete_committed_offsets(group_id, topic)
            self.state_store.save_committed_offsets(
                CommittedOffsetRow(group_id, topic, partition, value.offset, value.metadata,
                                   value.leader_epoch, value.commit_ms)
                for (kept_topic, partition), value in group.offsets.items()
                if kept_topic == topic)
        await self.state_store.commit()

    @staticmethod
    def decode_server_assignment(assignment: bytes) -> list[tuple[str, int]]:
        """Partitions of a server-assigned ("conveyor" protocol type) group member."""
        return decode_assignment(assignment)


def _refusal(group_id: str, forget: Callable[[str], None]) -> NotCoordinatorError:
    """A guarded group write found no owner row: the node forgets the group."""
    forget(group_id)
    return NotCoordinatorError("this node no longer coordinates the group",
                               group_id=group_id)


def _nothing(group_id: str) -> None:
    return None
