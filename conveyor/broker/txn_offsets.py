"""TxnOffsets: a transaction's offsets as the group's coordinator keeps them (KIP-98,
KIP-447), until the transaction coordinator says how it ended.

Owns, per group this node coordinates: the pending offsets of each producer
(TxnOffsetCommit), written to the state store (storage/txn_offsets_state.py) before
they are answered, and their end (``finish``, Kafka's COMMIT/ABORT marker written to
the offsets partition): on a commit they become the group's committed offsets (what
OffsetFetch returns from then on), on an abort they are dropped; both in one write that
also removes them from the pending table. The partitions with pending offsets are what
KIP-447's ``require_stable`` OffsetFetch answers UNSTABLE_OFFSET_COMMIT for.

Checks, as Kafka's group coordinator makes them (it does not ask the transaction
coordinator either): the member and generation when given (the caller), known topics,
and the producer's epoch order: a write with an epoch older than one this group saw
from the same producer id (a pending write, or the marker that ended its last
transaction) is ``ProducerFencedError``. A later epoch's write replaces the earlier
one's rows. What a transaction coordinator checked (the producer id of the
transactional id, the transaction ongoing and holding the group) is checked there, by
the one-node path (transactions.py) or not at all on a cluster (the group's coordinator
does not hold the transaction's row).

The ended epoch of each (group, producer id) is stored with the end, in the same write
(``txn_group_ended``), and loaded at the broker's open and at a claim, so a zombie's
write with an epoch older than the end is fenced after a restart or on the group's next
coordinator too. It is kept while the producer could still write: an entry whose last
end is older than ``transactional.id.expiration.ms`` is pruned (``expire_ended``; the
expired transactional id's next InitProducerId gets a fresh producer id).

Fence: on a cluster node every write (a TxnOffsetCommit, an end) is made under the
group's owner fence (``GroupCoordinator.commit_guard``); refused, the node forgets the
group and answers NOT_COORDINATOR. A claim reloads the group's pending offsets and
ended epochs from the store (``reload_group``).

Deletes: a deleted group's pending offsets go (``forget_groups``), and every group's
pending offsets of a deleted topic (``delete_topic``; ``forget_topic`` when another node
deleted it and the store is already clean), in memory and in the store, so a topic made
again under the name never gets a dead transaction's offsets. The ended epochs stay.

Idempotent: an end repeated for the same producer and epoch finds nothing pending up to
that epoch and changes nothing.
Must not know: protocols, SQL, which node coordinates the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from conveyor.clock import Clock
from conveyor.errors import (
    NotCoordinatorError,
    OperatingError,
    ProducerFencedError,
    UnknownTopicError,
)
from conveyor.storage.sql_engine import WriteGuard
from conveyor.storage.state_store import CommittedOffsetRow, StateStore
from conveyor.storage.txn_offsets_state import EndedEpochRow, PendingOffsetRow
from conveyor.storage.txn_state import PendingOffsets

from .group_coordinator import GroupCoordinator
from .keyed_locks import KeyedLocks
from .ordered_group import CommittedOffset
from .topics import TopicRegistry

Offsets = list[tuple[str, int, int, str | None]]  # (topic, partition, offset, metadata)


@dataclass(frozen=True, slots=True)
class Pending:
    """One partition's pending offset of one producer in one group."""

    transactional_id: str
    epoch: int
    offset: int
    metadata: str | None
    commit_ms: int


@dataclass(frozen=True, slots=True)
class Ended:
    """The highest epoch whose marker ended a transaction of one producer in one group."""

    epoch: int
    ended_ms: int  # wall clock of the last end (the entry expires from it)


class TxnOffsets:
    def __init__(self, topics: TopicRegistry, state_store: StateStore, clock: Clock,
                 groups: GroupCoordinator, ended_expiration_ms: int) -> None:
        """``ended_expiration_ms``: how long an ended epoch fences its producer after its
        last end (the broker passes ``transactional.id.expiration.ms``)."""
        self.topics = topics
        self.state_store = state_store
        self.store = state_store.txn_offsets
        self.clock = clock
        self.groups = groups  # committed offsets in memory; the owner fence (a cluster)
        self.ended_expiration_ms = ended_expiration_ms
        # group -> producer id -> (topic, partition) -> its pending offset
        self._pending: dict[str, dict[int, dict[tuple[str, int], Pending]]] = {}
        # group -> producer id -> the end of its last transaction there (as stored)
        self._ended: dict[str, dict[int, Ended]] = {}
        self._locks = KeyedLocks()  # per group

    # --- loading ---------------------------------------------------------------------
    async def load(self) -> None:
        """Every group's pending offsets and ended epochs, as stored (a broker's open)."""
        self._pending.clear()
        self._ended.clear()
        self._keep(await self.store.load())
        self._keep_ended(await self.store.load_ended())

    async def reload_group(self, group_id: str) -> None:
        """One group's pending offsets and ended epochs again (a cluster node claimed
        the group)."""
        async with self._locks.hold(group_id):
            self._pending.pop(group_id, None)
            self._ended.pop(group_id, None)
            self._keep(await self.store.load(group_id))
            self._keep_ended(await self.store.load_ended(group_id))

    def _keep(self, rows: Iterable[PendingOffsetRow]) -> None:
        for row in rows:
            self._pending.setdefault(row.group_id, {}).setdefault(row.producer_id, {})[
                (row.topic, row.partition)] = Pending(
                    row.transactional_id, row.producer_epoch, row.offset, row.metadata,
                    row.commit_ms)

    def _keep_ended(self, rows: Iterable[EndedEpochRow]) -> None:
        for row in rows:
            self._ended.setdefault(row.group_id, {})[row.producer_id] = Ended(
                row.producer_epoch, row.ended_ms)

    # --- reads -----------------------------------------------------------------------
    def partitions(self, group_id: str) -> set[tuple[str, int]]:
        """The group's partitions with offsets of an unfinished transaction (KIP-447)."""
        return {key for by_partition in self._pending.get(group_id, {}).values()
                for key in by_partition}

    # --- TxnOffsetCommit ---------------------------------------------------------------
    async def commit(self, group_id: str, transactional_id: str, producer_id: int, epoch: int,
                     offsets: Offsets) -> dict[tuple[str, int], OperatingError | None]:
        """Keep the offsets of the producer's transaction, durable before this returns;
        per-partition results (unknown topics refused, the rest written)."""
        async with self._locks.hold(group_id):
            self._check_epoch(group_id, transactional_id, producer_id, epoch)
            results: dict[tuple[str, int], OperatingError | None] = {}
            now_ms = self.clock.wall_ms()
            rows = []
            for topic, partition, offset, metadata in offsets:
                if not self.topics.log_store.has_partition(topic, partition):
                    results[(topic, partition)] = UnknownTopicError(
                        "unknown topic or partition", topic=topic, partition=partition)
                    continue
                results[(topic, partition)] = None
                rows.append(PendingOffsetRow(group_id, transactional_id, producer_id, epoch,
                                             topic, partition, offset, metadata, now_ms))
            if not rows:
                return results
            if not await self.store.save(rows, self._guard(group_id)):
                self._refused(group_id)
            by_partition = self._pending.setdefault(group_id, {}).setdefault(producer_id, {})
            for row in rows:
                if self.topics.find(row.topic) is None:  # deleted while the write waited
                    self.store.delete_topic(row.topic)
                    continue
                by_partition[(row.topic, row.partition)] = Pending(
                    transactional_id, epoch, row.offset, row.metadata, row.commit_ms)
            if not by_partition:
                self._drop_producer(group_id, producer_id)
            return results

    def _check_epoch(self, group_id: str, transactional_id: str, producer_id: int,
                     epoch: int) -> None:
        known = [item.epoch for item in self._pending.get(group_id, {}).get(
            producer_id, {}).values()]
        ended = self._ended.get(group_id, {}).get(producer_id)
        if ended is not None:
            known.append(ended.epoch)
        if known and epoch < max(known):
            raise ProducerFencedError("a newer epoch of this producer wrote to the group",
                                      transactional_id=transactional_id, group=group_id,
                                      epoch=epoch, current_epoch=max(known))

    # --- the end of a transaction (its marker) -----------------------------------------
    async def finish(self, group_id: str, transactional_id: str, producer_id: int,
                     epoch: int, commit: bool) -> None:
        """The transaction of ``producer_id`` ended with a marker of ``epoch``: its
        pending offsets up to that epoch become the group's committed offsets (``commit``)
        or are dropped. Under the group's fence on a cluster node (NotCoordinatorError,
        nothing changed, when it no longer coordinates the group)."""
        async with self._locks.hold(group_id):
            mine = self._pending.get(group_id, {}).get(producer_id, {})
            ended = {key: item for key, item in mine.items() if item.epoch <= epoch}
            applied = [PendingOffsetRow(group_id, item.transactional_id, producer_id,
                                        item.epoch, topic, partition, item.offset,
                                        item.metadata, item.commit_ms)
                       for (topic, partition), item in sorted(ended.items())
                       if commit and self.topics.find(topic) is not None]
            now_ms = self.clock.wall_ms()
            if not await self.store.finish(group_id, producer_id, epoch, applied,
                                           self._guard(group_id), ended_ms=now_ms):
                self._refused(group_id)
            for key in ended:
                del mine[key]
            if not mine:
                self._drop_producer(group_id, producer_id)
            self._remember_end(group_id, producer_id, epoch, now_ms)
            if applied:
                self.groups.show_offsets(group_id, {
                    (row.topic, row.partition): CommittedOffset(
                        row.offset, row.metadata, -1, row.commit_ms) for row in applied})

    def apply_stored(self, offsets: PendingOffsets) -> None:
        """Offsets a committed transaction's row carries (written by a Conveyor before
        this module: they were kept with the transaction), visible now; written into the
        loop turn's state-store transaction, with the row's completion."""
        now_ms = self.clock.wall_ms()
        for group_id, entries in sorted(offsets.items()):
            shown = {(topic, partition): CommittedOffset(offset, metadata, -1, now_ms)
                     for topic, partition, offset, metadata in entries
                     if self.topics.find(topic) is not None}
            self.groups.show_offsets(group_id, shown)
            self.state_store.save_committed_offsets(
                CommittedOffsetRow(group_id, topic, partition, value.offset, value.metadata,
                                   -1, now_ms) for (topic, partition), value in shown.items())

    def _remember_end(self, group_id: str, producer_id: int, epoch: int,
                      now_ms: int) -> None:
        """As the store's upsert: the epoch never goes down; the time is the last end's
        when the epoch was raised or repeated."""
        by_producer = self._ended.setdefault(group_id, {})
        known = by_producer.get(producer_id)
        if known is None or epoch >= known.epoch:
            by_producer[producer_id] = Ended(epoch, now_ms)

    def _drop_producer(self, group_id: str, producer_id: int) -> None:
        by_producer = self._pending.get(group_id)
        if by_producer is None:
            return
        by_producer.pop(producer_id, None)
        if not by_producer:
            del self._pending[group_id]

    async def expire_ended(self) -> int:
        """Forget the ended epochs whose last end is older than the expiration, here
        and in the store (the broker's timer); how many this node forgot."""
        before_ms = self.clock.wall_ms() - self.ended_expiration_ms
        forgotten = 0
        for group_id in list(self._ended):
            by_producer = self._ended[group_id]
            for producer_id in [producer_id for producer_id, ended in by_producer.items()
                                if ended.ended_ms < before_ms]:
                del by_producer[producer_id]
                forgotten += 1
            if not by_producer:
                del self._ended[group_id]
        self.store.prune_ended(before_ms)  # also what other nodes loaded and let lapse
        await self.state_store.commit()
        return forgotten

    # --- deletes -------------------------------------------------------------------------
    async def forget_groups(self, group_ids: Iterable[str]) -> None:
        """These groups were deleted: their pending offsets go, durable on return."""
        for group_id in group_ids:
            async with self._locks.hold(group_id):
                self._pending.pop(group_id, None)
                self.store.delete_group(group_id)
        await self.state_store.commit()

    def delete_topic(self, topic: str) -> None:
        """The topic was deleted here: every group's pending offsets of it go (the store's
        in the loop turn's transaction, which the caller commits)."""
        self.forget_topic(topic)
        self.store.delete_topic(topic)

    def forget_topic(self, topic: str) -> None:
        """Every group's pending offsets of the topic, from memory only (another node
        deleted it and its rows)."""
        for group_id in list(self._pending):
            for producer_id, by_partition in list(self._pending[group_id].items()):
                for key in [key for key in by_partition if key[0] == topic]:
                    del by_partition[key]
                if not by_partition:
                    self._drop_producer(group_id, producer_id)

    # --- the fence (a cluster node) ------------------------------------------------------
    def _guard(self, group_id: str) -> WriteGuard | None:
        """None on one node (plain writes); a cluster node's owner fence of the group,
        refused at once when it has none."""
        if self.groups.commit_guard is None:
            return None
        guard = self.groups.commit_guard(group_id)
        if guard is None:
            self._refused(group_id)
        return guard

    def _refused(self, group_id: str) -> None:
        self.groups.guard_refused(group_id)
        raise NotCoordinatorError("this node no longer coordinates the group",
                                  group_id=group_id)
