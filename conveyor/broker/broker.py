"""Broker: the one async, protocol-free API every protocol adapter calls.

A thin facade over peers, each owning its state, the way Kafka separates its
coordinators (docs/architecture.md draws them):

    producer.Producer             appends, idempotence, topic auto-creation
    fetcher.Fetcher               reads, offset lookups, waits for appends
    group_coordinator.GroupCoordinator   ordered (Kafka classic) groups and offsets
    shared_groups.SharedGroups    the share coordinator: queues, shared groups, DLQ,
                                  delays, priorities, FIFO groups
    exchanges.Exchanges           exchanges, bindings, routing plans

Owns: wiring the peers to the two stores, what spans peers (deleting a topic or a
queue, publishing a routing plan), open/close and the background timer (in its
supervisor). Dependencies point one way: the facade calls the peers, the share
coordinator calls the producer, fetcher and exchanges, none calls the facade.
Must not know: sockets, wire formats, file paths. Invariants: nothing fails
validation, a limit or an idempotence check and is appended anyway; a success
returned is durable (log fsync per the topic's policy, state-store COMMIT).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Literal

from conveyor.clock import Clock
from conveyor.errors import OperatingError, TopicExistsError, UnavailableError
from conveyor.storage.log_api import LogSlice
from conveyor.storage.log_store import LogConfig, LogStore
from conveyor.storage.record_batch import Record
from conveyor.storage.state_store import StateStore
from conveyor.tasks import Supervisor

from . import log_admin
from .broker_config import BrokerConfig, Gate
from .exchanges import Exchanges
from .fetcher import DECODED_BATCHES_MAX, READ_CHUNK_BYTES, Fetcher
from .group_configs import GroupConfigs
from .group_coordinator import GroupCoordinator
from .group_members import GroupMembers
from .keyed_locks import KeyedLocks
from .log_end import LostRange
from .ordered_group import (
    CommittedOffset,
    GroupDescription,
    GroupListing,
    GroupState,
    JoinResult,
    Member,
    MemberIdRequired,
    SyncResult,
    decode_assignment,
)
from .producer import Producer, to_record_data
from .producer_state import ProducerStates
from .routing import Destination, RoutingTable
from .shared_groups import SharedGroups, SharedGroupsHost
from .stats import BrokerStats, StatsLimits, TrafficCounters, ordered_group_stats, partition_stats
from .topics import (
    TopicRegistry,
    config_from_mapping,
    config_to_mapping,
    validate_partitions,
    validate_topic_name,
)
from .transactions import Transactions
from .txn_index import TransactionIndex
from .txn_model import TransactionDescription
from .txn_offsets import TxnOffsets
from .types import (
    AppendResult,
    Binding,
    Delivery,
    DestinationKind,
    ExchangeInfo,
    ExchangeType,
    Headers,
    Message,
    PartitionLag,
    PartitionOffsets,
    PublishResult,
    QueueConfig,
    QueueInfo,
    RouteResult,
    TopicConfig,
    TopicInfo,
)

logger = logging.getLogger("conveyor.broker")

__all__ = [
    "DECODED_BATCHES_MAX", "READ_CHUNK_BYTES", "Broker", "BrokerConfig", "CommittedOffset",
    "GroupDescription", "GroupListing", "GroupState", "JoinResult", "MemberIdRequired",
    "PartitionLag", "SyncResult", "to_record_data",
]


class Broker:
    def __init__(
        self,
        log_store: LogStore,
        state_store: StateStore,
        clock: Clock,
        rng: random.Random,
        config: BrokerConfig | None = None,
        *,
        queue_alias: Callable[[str], str] | None = None,
    ) -> None:
        """``queue_alias``: where the default exchange looks when no queue is named by a
        routing key (the AMQP listener's queue-name escaping; identity by default)."""
        self.log_store = log_store
        self.state_store = state_store
        self.clock = clock
        self.rng = rng
        self.config = config or BrokerConfig()
        self.gate = Gate()
        self.supervisor = Supervisor("conveyor.broker")
        self.topics = TopicRegistry(log_store, state_store, clock, LogConfig)
        self.producers = ProducerStates(state_store, clock,
                                        self.config.producer_id_expiration_ms)
        self.traffic = TrafficCounters()  # records and bytes in/out per partition (metrics)
        self.producer = Producer(self.topics, self.producers, state_store, clock, rng,
                                 self.config, self.gate, self.supervisor, self.traffic)
        self.fetcher = Fetcher(self.topics, clock, self.config, self.gate, self.traffic)
        self.group_coordinator = GroupCoordinator(self.topics, log_store, state_store, clock,
                                                  rng, self.config)
        self.exchanges = Exchanges(state_store, self.topics, self._queue_exists, queue_alias)
        # Kafka 4 group configs (KIP-932/848), loaded at open; the Kafka listeners share it
        self.group_configs = GroupConfigs(state_store)
        # KIP-848 / KIP-932 members as stored, loaded at open; the coordinators write them
        self.group_members = GroupMembers(state_store)
        self.producer.on_append = self._appended
        log_store.on_visible = self._appended  # the readers' wake-up a turn earlier
        # a cluster node's catalog hooks (conveyor/cluster/catalog.py): told after this
        # node committed a change of "topics", "queues" or "exchanges" (with bindings);
        # asked to re-read the catalog (rate-limited) before a publish or a passive
        # declare is answered "not found" / "unroutable"
        self.catalog_changed: Callable[[str], None] = _ignore_change
        self.catalog_miss: Callable[[], Awaitable[None]] = _no_refresh
        self.catalog_shared = False  # True on a cluster node (the hooks above are set)
        self.exchanges.on_change = lambda: self.catalog_changed("exchanges")
        # Kafka transactions: the coordinator, and the log side (LSO, aborted index) that
        # the fetcher filters decoded reads with
        self.txn_index = TransactionIndex()
        # the pending offsets of transactions, kept by each group's coordinator
        self.txn_offsets = TxnOffsets(self.topics, state_store, clock, self.group_coordinator,
                                      self.config.transactional_id_expiration_ms)
        self.transactions = Transactions(
            self.producers, self.topics, state_store, clock, self.txn_index,
            self.producer.append_marker, self.txn_offsets,
            self.config.transactional_id_expiration_ms)
        self.transactions.check_member = self.group_coordinator.check_member
        self.producer.check_transactional = self.transactions.check_produce
        self.producer.add_transactional = self.transactions.add_partition_implicitly
        self.producer.on_transactional = self.transactions.on_transactional_append
        self.fetcher.transactions = self.txn_index
        self._timer_task: asyncio.Task[None] | None = None
        self._timer_sleeping = False
        # state found past the recovered log end at the last open (log_end.py)
        self.lost_ranges: list[LostRange] = []
        self._next_retention_ms = 0
        self.shared_groups: SharedGroups | None = None  # created in open()
        self._opened = False

    @property
    def routing(self) -> RoutingTable:
        return self.exchanges.routing

    @property
    def _producer_locks(self) -> KeyedLocks:
        return self.producer.producer_locks

    @property
    def _closing(self) -> bool:  # kept for methods written against the old facade
        return self.gate.closing

    def _appended(self, topic: str, partition: int) -> None:
        """A partition got an append (or went away): wake its fetches and acquires."""
        if self.shared_groups is not None:
            self.shared_groups.notify_appended(topic, partition)
        self.fetcher.wake((topic, partition))

    # --- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        self.gate.closing = False
        await self.state_store.open()
        await self.log_store.open()
        await self.topics.load()
        await self.producers.load()
        self.lost_ranges = []
        self.producers.clamp_to_logs(self.group_coordinator.log_ends(), self.lost_ranges)
        await self.producers.forget_missing(self.log_store, self._damaged_logs(),
                                            self.lost_ranges)
        await self.producers.recover_from_logs(
            self.log_store,
            [key for key in self.log_store.partitions() if self.topics.find(key[0]) is not None],
            self.config.read_bytes_max,
        )
        await self.exchanges.load()
        await self.group_coordinator.load(self.lost_ranges)
        await self.group_configs.load()
        await self.group_members.load()
        await self.txn_offsets.load()  # before transactions: a Prepare* one ends them
        await self.transactions.open()  # before shared groups: their reads need the index
        await self._open_shared_groups()
        if self.shared_groups is not None:
            self.lost_ranges.extend(self.shared_groups.lost_ranges)
        await self.state_store.commit()
        interval_ms = self.config.retention_check_interval_ms
        self._next_retention_ms = self.clock.monotonic_ms() + interval_ms
        self._timer_task = self.supervisor.start(self._run_timers(), name="conveyor.timers")
        self._opened = True

    def _damaged_logs(self) -> set[tuple[str, int]]:
        """Partitions where recovery set corrupt batches aside (their offsets are gone)."""
        return {(topic, partition) for topic, partition in self.log_store.partitions()
                if self.log_store.recovery(topic, partition).skipped_offsets
                and self.topics.find(topic)}

    def _check_open(self) -> None:  # kept for methods written against the old facade
        self.gate.check()

    async def close(self) -> None:
        self.gate.closing = True
        if self._timer_task is not None:
            # A pass in progress finishes (its dead letters and their state rows land
            # together); a sleeping timer is simply cancelled.
            if self._timer_sleeping:
                self._timer_task.cancel()
            try:
                await self._timer_task
            except asyncio.CancelledError:
                if not self._timer_task.cancelled():
                    raise
            self._timer_task = None
        await self.supervisor.close()  # topic auto-creations still running finish
        await self.transactions.close()
        self.fetcher.wake_all()
        if self.shared_groups is not None:
            await self.shared_groups.close()
        self.group_coordinator.close()
        if self._opened:
            for topic, partition in self.log_store.partitions():
                high_watermark = self.log_store.offsets(topic, partition).high_watermark
                self.state_store.save_producer_checkpoint(topic, partition, high_watermark)
        await self.log_store.close()
        await self.state_store.commit()
        await self.state_store.close()
        self._opened = False  # the gate stays closed: a closed broker refuses work

    async def _open_shared_groups(self) -> None:
        self.shared_groups = SharedGroups(SharedGroupsHost(
            state_store=self.state_store, clock=self.clock, rng=self.rng, topics=self.topics,
            read_records=self.fetcher.read_records,
            publish_records=self.producer.publish_records,
            ensure_topic=self.producer.ensure_topic, route=self.exchanges.routing.route,
            read_visible=self.fetcher.read_visible, stable_offset=self.last_stable_offset),
            self.traffic)
        self.producer.on_records = self.shared_groups.appended.remember
        self.producer.is_queue = self.shared_groups.queue_exists
        await self.shared_groups.open()

    async def _run_timers(self) -> None:
        while not self.gate.closing:
            self._timer_sleeping = True
            try:
                await self.clock.sleep_ms(self.config.group_check_interval_ms)
            finally:
                self._timer_sleeping = False
            now_ms = self.clock.monotonic_ms()
            self.group_coordinator.tick(now_ms)
            try:
                if self.shared_groups is not None:
                    await self.shared_groups.tick()
                # idle transactional ids and producer ids: only their heaps' due entries
                await self.transactions.expire_idle()
                if self.producers.expire_idle():
                    await self.state_store.commit()
                if now_ms >= self._next_retention_ms:
                    self._next_retention_ms = now_ms + self.config.retention_check_interval_ms
                    await self.log_store.run_retention()
                    await self.expire_groups()
                    await self.txn_offsets.expire_ended()
            except OperatingError:
                # a full disk or an I/O error must not stop session expiry; the next
                # tick retries, and the error is in the log with its evidence
                logger.exception("background pass failed")
            except Exception:
                # a bug in one pass must not stop every later one (lock and session
                # expiry, retention): reported loudly, retried at the next tick
                logger.exception("background pass failed unexpectedly (a bug); the timers "
                                 "go on")

    async def run_retention(self) -> None:
        """One retention/compaction pass now (also run by the timer)."""
        await self.log_store.run_retention()

    # --- topics ----------------------------------------------------------------------
    async def create_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str | None] | None = None
    ) -> TopicInfo:
        orphan = self.topics.find(name) is None and not self.topics.is_creating(name)
        if orphan and (name, 0) in set(self.log_store.partitions()):
            for topic, partition in list(self.log_store.partitions()):
                if topic == name:  # orphan of a delete interrupted by a crash
                    await self.log_store.delete_partition(topic, partition)
        info = await self.topics.create(name, partitions, config)
        self.catalog_changed("topics")
        return info

    def validate_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str | None] | None = None
    ) -> TopicConfig:
        """Check what create_topic would check, creating nothing (Kafka validate_only)."""
        validate_topic_name(name)
        validate_partitions(partitions)
        topic_config = config_from_mapping(config or {})
        if self.topics.find(name) is not None:
            raise TopicExistsError("topic already exists", topic=name)
        return topic_config

    async def delete_topic(self, name: str) -> None:
        info = await self.topics.delete(name)
        self.producer.forget_topic(name)
        self.exchanges.remove_destination("topic", name)
        self.group_coordinator.forget_topic(name)
        self.transactions.forget_topic(name)
        self.txn_offsets.delete_topic(name)
        self.traffic.forget_topic(name)
        for partition in range(info.partitions):
            self._appended(name, partition)
        await self.state_store.commit()
        self.catalog_changed("topics")
        self.catalog_changed("exchanges")  # the bindings to it went

    def list_topics(self) -> list[TopicInfo]:
        return self.topics.list_topics()

    def get_topic(self, name: str) -> TopicInfo:
        return self.topics.get(name)

    def find_topic(self, name: str) -> TopicInfo | None:
        """The topic, or None when there is none (no auto-creation)."""
        return self.topics.find(name)

    def topic_config(self, name: str) -> dict[str, str]:
        """The topic's settings under their config names (for DescribeConfigs)."""
        return config_to_mapping(self.topics.get(name).config)

    async def alter_topic_config(
        self,
        name: str,
        set: Mapping[str, str | None] | None = None,
        delete: Iterable[str] = (),
    ) -> TopicInfo:
        info = await self.topics.alter_config(name, set, delete)
        self.catalog_changed("topics")
        return info

    async def create_partitions(self, name: str, total: int) -> TopicInfo:
        info = await self.topics.create_partitions(name, total)
        self.catalog_changed("topics")
        return info

    async def ensure_topic(self, name: str) -> TopicInfo:
        """The topic, created with defaults when auto_create_topics allows it."""
        return await self.producer.ensure_topic(name)

    # --- produce (Producer) ------------------------------------------------------------
    async def append_batch(
        self, topic: str, partition: int, batch: bytes | bytearray | memoryview,
        implicit_transaction: bool = False,
    ) -> AppendResult:
        """Append raw Kafka RecordBatch(es): validate, limit, idempotence check, append.
        ``implicit_transaction`` (Produce v12+): a transactional batch adds its partition
        to its producer's transaction (KIP-890 part 2) instead of needing it added."""
        return await self.producer.append_batch(topic, partition, batch, implicit_transaction)

    async def partition_for_key(self, topic: str, key: bytes | None) -> int:
        return await self.producer.partition_for_key(topic, key)

    async def publish(
        self, topic: str, messages: Sequence[Message], partition: int | None = None
    ) -> list[PublishResult]:
        """Build batches (reserved conveyor.* headers included) and append them."""
        info = await self.producer.ensure_topic(topic)
        if self.shared_groups is not None:
            return await self.shared_groups.filter_publish(info.name, messages, partition)
        return await self.producer.publish_records(info, messages, partition)

    async def publish_records(
        self, info: TopicInfo, messages: Sequence[Message], partition: int | None = None
    ) -> list[PublishResult]:
        """Publish without shared-group admission (dedup/overflow): the raw append path."""
        return await self.producer.publish_records(info, messages, partition)

    async def init_producer_id(self, transactional_id: str | None = None,
                               timeout_ms: int = 60_000, producer_id: int = -1,
                               epoch: int = -1) -> tuple[int, int]:
        if transactional_id is None:
            return await self.producer.init_producer_id(None)
        return await self.transactions.init_producer_id(transactional_id, timeout_ms,
                                                        producer_id, epoch)

    # --- transactions (Transactions; docs/kafka.md) ------------------------------------
    async def add_partitions_to_txn(
        self, transactional_id: str, producer_id: int, epoch: int,
        partitions: Iterable[tuple[str, int]], verify_only: bool = False,
    ) -> dict[tuple[str, int], OperatingError | None]:
        return await self.transactions.add_partitions(transactional_id, producer_id, epoch,
                                                      partitions, verify_only)

    async def add_offsets_to_txn(self, transactional_id: str, producer_id: int, epoch: int,
                                 group_id: str) -> None:
        await self.transactions.add_offsets(transactional_id, producer_id, epoch, group_id)

    async def txn_offset_commit(
        self, transactional_id: str, group_id: str, producer_id: int, epoch: int,
        offsets: list[tuple[str, int, int, str | None]], member: tuple[str, int] = ("", -1),
        implicit: bool = False,
    ) -> dict[tuple[str, int], OperatingError | None]:
        """``member``: (member id, generation) of a classic group's consumer (KIP-447);
        ``implicit``: the group joins the transaction here (``transaction.version`` 2)."""
        return await self.transactions.commit_offsets(transactional_id, group_id,
                                                      producer_id, epoch, offsets, member,
                                                      implicit)

    async def end_txn(self, transactional_id: str, producer_id: int, epoch: int,
                      commit: bool, bump_epoch: bool = False) -> tuple[int, int]:
        """The producer id and epoch to use next (bumped with ``bump_epoch``: EndTxn v5)."""
        return await self.transactions.end(transactional_id, producer_id, epoch, commit,
                                           bump_epoch)

    def describe_transaction(self, transactional_id: str) -> TransactionDescription | None:
        return self.transactions.describe(transactional_id)

    def list_transactions(self, states: Iterable[str] = (), producer_ids: Iterable[int] = (),
                          running_ms_min: int = -1) -> list[TransactionDescription]:
        return self.transactions.listing(states, producer_ids, running_ms_min)

    def pending_txn_offsets(self, group_id: str) -> set[tuple[str, int]]:
        """The group's partitions with offsets in an open transaction (KIP-447)."""
        return self.transactions.pending_offsets(group_id)

    def last_stable_offset(self, topic: str, partition: int) -> int:
        """Below it every transaction is decided: what read_committed readers may read."""
        high_watermark = self.topics.offsets(topic, partition).high_watermark
        return self.txn_index.stable_offset(topic, partition, int(high_watermark))

    def aborted_transactions(self, topic: str, partition: int, start: int,
                             end: int) -> list[tuple[int, int]]:
        """(producer id, first offset) of aborted transactions with records in [start, end)."""
        return self.txn_index.aborted_between(topic, partition, start, end)

    # --- read (Fetcher) ----------------------------------------------------------------
    def offsets(self, topic: str, partition: int) -> PartitionOffsets:
        return self.fetcher.offsets(topic, partition)

    async def offset_for_timestamp(self, topic: str, partition: int,
                                   timestamp_ms: int) -> int | None:
        """First offset at or after timestamp_ms (None: none); -1 latest, -2 earliest."""
        return await self.fetcher.offset_for_timestamp(topic, partition, timestamp_ms)

    async def record_for_timestamp(self, topic: str, partition: int,
                                   timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, its record's own timestamp) of the first record at or after
        ``timestamp_ms`` (>= 0), or None: what Kafka's ListOffsets answers."""
        return await self.fetcher.record_for_timestamp(topic, partition, timestamp_ms)

    async def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        bytes_max: int,
        wait_ms: int = 0,
        bytes_min: int = 1,
    ) -> tuple[LogSlice, PartitionOffsets]:
        """Whole batches from ``offset``; waits up to wait_ms for bytes_min bytes."""
        return await self.fetcher.fetch(topic, partition, offset, bytes_max, wait_ms, bytes_min)

    async def wait_for_append(
        self, partitions: Iterable[tuple[str, int]], wait_ms: int
    ) -> bool:
        """Wait until one of ``partitions`` gets an append (True) or wait_ms passes (False)."""
        return await self.fetcher.wait_for_append(partitions, wait_ms)

    async def read_records(
        self, topic: str, partition: int, offset: int, records_max: int, wait_ms: int = 0,
        counted: bool = True,
    ) -> list[Record]:
        """Decoded records from ``offset`` (at most records_max), waiting like fetch."""
        return await self.fetcher.read_records(topic, partition, offset, records_max, wait_ms,
                                               counted)

    # --- ordered groups (GroupCoordinator) ---------------------------------------------
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
        return await self.group_coordinator.join_group(
            group_id, member_id, protocol_type, protocols, session_timeout_ms,
            rebalance_timeout_ms, group_instance_id, client_id, client_host,
            require_known_member_id)

    async def sync_group(
        self,
        group_id: str,
        member_id: str,
        generation: int,
        assignments: Mapping[str, bytes] | None = None,
    ) -> SyncResult:
        """Leader sends assignments; every member waits for its own."""
        return await self.group_coordinator.sync_group(group_id, member_id, generation,
                                                       assignments)

    async def heartbeat(self, group_id: str, member_id: str, generation: int) -> None:
        await self.group_coordinator.heartbeat(group_id, member_id, generation)

    async def leave_group(
        self,
        group_id: str,
        member_id: str = "",
        group_instance_id: str | None = None,
    ) -> None:
        await self.group_coordinator.leave_group(group_id, member_id, group_instance_id)

    async def commit_offsets(
        self,
        group_id: str,
        offsets: Mapping[tuple[str, int], CommittedOffset | int],
        member_id: str = "",
        generation: int = -1,
    ) -> None:
        """Commit per-partition offsets; generation -1 + empty member = simple commit."""
        await self.group_coordinator.commit_offsets(group_id, offsets, member_id, generation)

    def fetch_offsets(
        self, group_id: str, partitions: Iterable[tuple[str, int]] | None = None
    ) -> dict[tuple[str, int], CommittedOffset | None]:
        """Committed offsets (None: nothing committed); partitions None = all committed."""
        return self.group_coordinator.fetch_offsets(group_id, partitions)

    def describe_group(self, group_id: str) -> GroupDescription:
        return self.group_coordinator.describe_group(group_id)

    def release_classic_members(self, group_id: str) -> tuple[int, str, list[Member]] | None:
        """Online upgrade to KIP-848: the classic group's members, the group left Empty."""
        return self.group_coordinator.release_members(group_id)

    def adopt_classic_members(self, group_id: str, generation: int, protocol_type: str,
                              members: Sequence[Member]) -> None:
        """Online downgrade from KIP-848: classic members join the group, which rebalances."""
        self.group_coordinator.adopt_members(group_id, generation, protocol_type, members)

    def list_groups(self) -> list[GroupListing]:
        return self.group_coordinator.list_groups()

    async def delete_groups(self, group_ids: Iterable[str]) -> dict[str, Exception | None]:
        """Delete Empty groups and their offsets (the pending offsets of transactions
        too); per group: None or the error."""
        outcome = await self.group_coordinator.delete_groups(group_ids)
        await self.txn_offsets.forget_groups(
            [group_id for group_id, error in outcome.items() if error is None])
        return outcome

    async def expire_groups(self) -> list[str]:
        """Delete Empty groups with no commit for ``offsets_retention_ms`` (KIP-211)."""
        return await self.group_coordinator.expire_groups()

    def group_lag(self, group_id: str) -> list[PartitionLag]:
        """Lag of every partition of every topic the group committed to."""
        return self.group_coordinator.group_lag(group_id)

    @staticmethod
    def decode_server_assignment(assignment: bytes) -> list[tuple[str, int]]:
        """Partitions of a server-assigned ("conveyor" protocol type) group member."""
        return decode_assignment(assignment)

    async def delete_committed_offsets(
        self, group_id: str, partitions: Iterable[tuple[str, int]]
    ) -> None:
        """Forget the group's committed offsets of these partitions (OffsetDelete)."""
        await self.group_coordinator.delete_committed_offsets(group_id, partitions)

    # --- admin reads and deletions (Kafka 4 admin APIs; log_admin.py) -----------------
    async def delete_records(self, topic: str, partition: int, offset: int) -> int:
        """Drop the records below ``offset`` (-1: the high watermark); the new log start."""
        self.gate.check()
        return await log_admin.delete_records(self.topics, topic, partition, offset)

    def partition_size_bytes(self, topic: str, partition: int) -> int:
        return log_admin.partition_size_bytes(self.topics, topic, partition)

    def max_timestamp(self, topic: str, partition: int) -> int:
        return log_admin.max_timestamp(self.topics, topic, partition)

    def producer_states(self, topic: str, partition: int) -> list[tuple[int, int, int, int]]:
        """(producer id, epoch, last sequence, last offset) per idempotent producer."""
        self.topics.check_partition(topic, partition)
        return self.producers.describe(topic, partition)

    def stats(self, limits: StatsLimits | None = None) -> BrokerStats:
        """A read-only snapshot for metrics and management views; never suspends."""
        limits = limits or StatsLimits()
        partitions, partitions_omitted, segments_total, size_total = partition_stats(
            self.list_topics(), self.log_store, self.traffic, limits.partitions_max)
        queues, queues_omitted = ([], 0) if self.shared_groups is None else \
            self.shared_groups.queue_stats(limits.queues_max)

        def topic_partitions(name: str) -> int | None:
            info = self.topics.find(name)
            return None if info is None else info.partitions

        groups, group_partitions, group_partitions_omitted = ordered_group_stats(
            self.group_coordinator.groups.values(), self.topics.offsets,
            topic_partitions, limits.group_partitions_max)
        return BrokerStats(
            partitions, queues, groups, group_partitions,
            {"partitions": partitions_omitted, "queues": queues_omitted,
             "group_partitions": group_partitions_omitted},
            segments_total, size_total, *self.transactions.counts())

    # --- queues and shared groups (the share coordinator, SharedGroups) ----------------
    def _shared(self) -> SharedGroups:
        if self.shared_groups is None:
            raise UnavailableError("shared groups are not available")
        return self.shared_groups

    def shared_group_start_offsets(self, topic: str, group: str) -> dict[int, int] | None:
        """Per partition, the offset below which every record is settled; None: no group."""
        return self._shared().shared_group_start_offsets(topic, group)

    async def reset_shared_partition(self, topic: str, group: str, partition: int,
                                     offset: int) -> int:
        """Move a shared group's start offset on one partition, forgetting its record
        states there; returns the start offset (the log start if ``offset`` is below it)."""
        return await self._shared().reset_shared_partition(topic, group, partition, offset)

    async def delete_shared_group(self, topic: str, group: str) -> None:
        """Forget a shared group on a plain topic (its record states too)."""
        await self._shared().delete_shared_group(topic, group)

    def queue_alias(self, name: str) -> str:
        """The name a protocol's queue ``name`` is kept under when the broker cannot hold
        it as it is (AMQP's escaping, wired by the server; identity otherwise)."""
        return self.exchanges.routing.queue_alias(name)

    def queue_exists(self, name: str) -> bool:
        """Is ``name`` a declared queue (a work-queue topic with its shared group)?"""
        return self._queue_exists(name)

    async def declare_queue(self, name: str, config: QueueConfig | None = None) -> QueueInfo:
        """A queue = a work-queue topic + a shared group of the same name.

        Redeclaring with another config (or over a plain topic) is PreconditionFailedError.
        """
        existed = self._queue_exists(name)
        if not existed:  # declared on another cluster node: compared, not overwritten
            await self.catalog_miss()
            existed = self._queue_exists(name)
        info = await self._shared().declare_queue(name, config)
        if not existed:
            self.catalog_changed("queues")
        return info

    async def delete_queue(
        self, name: str, if_unused: bool = False, if_empty: bool = False,
        local: bool = False,
    ) -> int:
        """Delete the queue, its topic and bindings to it; returns the ready records dropped.
        A cluster node that does not own the queue has its owner delete it first (the
        owner's window decides ``if_unused`` / ``if_empty``), then drops its own copy;
        ``local``: this node only (a delete another node forwarded)."""
        shared = self._shared()
        remote = shared.remote
        forwarded = None
        if not local and remote is not None and not await remote.serves(name, name):
            forwarded = await remote.delete(name, if_unused, if_empty)
        async with shared.hold_queue(name):  # one at a time with its declare and purge
            dropped = 0
            if forwarded is None:
                dropped = await shared.remove_queue(name, if_unused, if_empty)
            elif shared.queue_exists(name):  # this node's copy (the owner decided)
                await shared.remove_queue(name)
            self.exchanges.remove_destination("queue", name)
            if self.topics.find(name) is not None:
                await self.delete_topic(name)  # commits the queue's rows with it
            await self.state_store.commit()
        self.catalog_changed("queues")
        self.catalog_changed("exchanges")  # the bindings to it went
        return dropped if forwarded is None else forwarded

    async def purge_queue(self, name: str) -> int:
        return await self._shared().purge_queue(name)

    async def alter_queue(self, name: str, config: QueueConfig) -> QueueInfo:
        """Replace a queue's config (same partitions); applies from the next acquire."""
        info = await self._shared().alter_queue(name, config)
        self.catalog_changed("queues")  # the other cluster nodes' copies take it
        return info

    async def get_queue(self, name: str) -> QueueInfo:
        if not self._queue_exists(name):
            await self.catalog_miss()  # declared on another cluster node just now?
        return await self._shared().get_queue(name)

    async def list_queues(self) -> list[QueueInfo]:
        return await self._shared().list_queues()

    async def create_shared_group(
        self,
        topic: str,
        group: str,
        config: QueueConfig | None = None,
        start: Literal["earliest", "latest"] = "latest",
    ) -> None:
        """A shared group (KIP-932 share group) on any topic."""
        await self._shared().create_shared_group(topic, group, config, start)

    async def acquire(
        self,
        topic: str,
        group: str,
        records_max: int = 1,
        lock_ms: int | None = None,
        wait_ms: int = 0,
        consumer_id: str | None = None,
        partitions: Sequence[int] | None = None,
    ) -> list[Delivery]:
        """Lock up to records_max records for this consumer (queue: group == topic);
        ``partitions``: only from these partitions (None: any)."""
        return await self._shared().acquire(
            topic, group, records_max, lock_ms, wait_ms, consumer_id, partitions=partitions
        )

    async def ack(self, receipts: Iterable[str], wait_durable: bool = True,
                  outcomes: list[Exception | None] | None = None,
                  durable_later: bool = False) -> None:
        """``durable_later``: the caller awaits ``acks_durable()`` before it answers
        (shared_groups.SharedGroups.ack)."""
        await self._shared().ack(receipts, wait_durable, outcomes, durable_later=durable_later)

    async def acks_durable(self) -> None:
        """Every ack this node applied so far is saved, committed and fsynced."""
        await self._shared().durable()

    async def release(self, receipts: Iterable[str], delay_ms: int = 0,
                      outcomes: list[Exception | None] | None = None) -> None:
        await self._shared().release(receipts, delay_ms, outcomes)

    async def extend(self, receipts: Iterable[str], lock_ms: int,
                     outcomes: list[Exception | None] | None = None) -> list[int]:
        return await self._shared().extend(receipts, lock_ms, outcomes)

    async def reject(self, receipts: Iterable[str], reason: str = "rejected") -> None:
        await self._shared().reject(receipts, reason)

    async def release_consumer(self, consumer_id: str) -> int:
        return await self._shared().release_consumer(consumer_id)

    async def redrive(self, name: str, records_max: int = 1000) -> int:
        return await self._shared().redrive(name, records_max)

    # --- exchanges (Exchanges) ---------------------------------------------------------
    def _queue_exists(self, name: str) -> bool:
        if self.shared_groups is not None:
            return self.shared_groups.queue_exists(name)
        info = self.topics.find(name)
        return info is not None and info.kind == "queue"

    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        durable: bool = True,
        auto_delete: bool = False,
        internal: bool = False,
        alternate_exchange: str | None = None,
        arguments: Mapping[str, str] | None = None,
    ) -> ExchangeInfo:
        """Declare; redeclaring with another type is PreconditionFailedError."""
        if not self.exchanges.routing.exists(name):
            await self.catalog_miss()  # declared on another cluster node with its type?
        return await self.exchanges.declare(name, type, durable, auto_delete, internal,
                                            alternate_exchange, arguments)

    async def delete_exchange(self, name: str, if_unused: bool = False) -> None:
        await self.exchanges.delete(name, if_unused)

    def get_exchange(self, name: str) -> ExchangeInfo:
        return self.exchanges.get(name)

    async def look_up_exchange(self, name: str) -> ExchangeInfo:
        """get_exchange, after one re-read of the catalog when this node does not know
        the exchange (another cluster node may have declared it just now)."""
        if not self.exchanges.routing.exists(name):
            await self.catalog_miss()
        return self.exchanges.get(name)

    def list_exchanges(self) -> list[ExchangeInfo]:
        return self.exchanges.list_exchanges()

    async def bind(
        self,
        source: str,
        destination_kind: DestinationKind,
        destination: str,
        routing_key: str = "",
        arguments: Mapping[str, str] | None = None,
    ) -> Binding:
        return await self.exchanges.bind(source, destination_kind, destination, routing_key,
                                         arguments)

    async def unbind(
        self,
        source: str,
        destination_kind: DestinationKind,
        destination: str,
        routing_key: str = "",
        arguments: Mapping[str, str] | None = None,
    ) -> bool:
        return await self.exchanges.unbind(source, destination_kind, destination, routing_key,
                                           arguments)

    def list_bindings(
        self,
        source: str | None = None,
        destination_kind: DestinationKind | None = None,
        destination: str | None = None,
    ) -> list[Binding]:
        return self.exchanges.list_bindings(source, destination_kind, destination)

    def route(self, exchange: str, routing_key: str, headers: Headers = ()) -> list[Destination]:
        """Where a message would go (no publish)."""
        return self.exchanges.route(exchange, routing_key, headers)

    def routes_by_key_only(self, exchange: str) -> bool:
        """True when where ``exchange`` routes depends on the routing key alone (no
        headers exchange on the way): a protocol may route a batch once per key."""
        return self.exchanges.routing.routes_by_key_only(exchange)

    def _unrouted_here(self, exchange: str, routing_key: str,
                       messages: Sequence[Message]) -> bool:
        """Does this node know no such exchange, or route some message nowhere?"""
        routing = self.exchanges.routing
        if not routing.exists(exchange):
            return True
        if routing.routes_by_key_only(exchange):
            return not routing.route(exchange, routing_key)
        return not all(routing.route(exchange, routing_key, message.headers)
                       for message in messages)

    async def publish_to_exchange(
        self, exchange: str, routing_key: str, messages: Sequence[Message]
    ) -> RouteResult:
        """Route each message by routing key (+ its headers) and publish it everywhere it goes.

        Messages sharing a destination set are published together (one batch per
        partition). ``routed`` is False when some message reached no destination.
        """
        if self.catalog_shared and self._unrouted_here(exchange, routing_key, messages):
            await self.catalog_miss()  # a bind or declare on another node not seen yet?
        routed, plans = self.exchanges.plan(exchange, routing_key, messages)
        work = [(destination.name, planned) for destinations, planned in plans.items()
                for destination in destinations]
        if len(work) == 1:  # the common case: no task
            ((name, planned),) = work
            return RouteResult(routed=routed, results=tuple(await self.publish(name, planned)))
        # every destination's append is written in this turn and all wait for the same
        # durability barrier pass (not each for its own fsync in turn); each runs to its
        # end, and the first failure is raised as itself afterwards
        outcomes: list[list[PublishResult] | BaseException] = [[] for _ in work]

        async def publish_one(index: int, name: str, planned: Sequence[Message]) -> None:
            try:
                outcomes[index] = await self.publish(name, planned)
            except Exception as error:  # raised below once every destination is done
                outcomes[index] = error

        async with asyncio.TaskGroup() as group:
            for index, (name, planned) in enumerate(work):
                group.create_task(publish_one(index, name, planned))
        results: list[PublishResult] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.extend(outcome)
        return RouteResult(routed=routed, results=tuple(results))


def _ignore_change(kind: str) -> None:
    """One process: nobody else to tell."""


async def _no_refresh() -> None:
    """One process: the catalog in memory is the whole catalog."""
