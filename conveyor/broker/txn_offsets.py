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

Fence: on a cluster node every write (a TxnOffsetCommit, an end) is made under the
group's owner fence (``GroupCoordinator.commit_guard``); refused, the node forgets the
group and answers NOT_COORDINATOR. A claim reloads the group's pending offsets from the
store (``reload_group``); the epochs of ended transactions are not stored, so a claim
forgets them (a zombie's write after the claim is not fenced by epoch: Kafka's
verification, KIP-890, is not built for it).

Idempotent: an end repeated for the same producer and epoch finds nothing pending up to
that epoch and changes nothing.
Must not know: protocols, SQL, which node coordinates the transaction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from conveyor.clock import Clock
from conveyor.errors import (
    NotCoordinatorError,
    OperatingError,
    ProducerFencedError,
    UnknownTopicError,
)
from conveyor.storage.sql_engine import WriteGuard
from conveyor.storage.state_store import CommittedOffsetRow, StateStore
from conveyor.storage.txn_offsets_state import PendingOffsetRow
from conveyor.storage.txn_state import PendingOffsets

from .group_coordinator import GroupCoordinator
from .keyed_locks import KeyedLocks
from .ordered_group import CommittedOffset
from .topics import TopicRegistry

# (group, producer id) pairs whose last ended epoch is remembered (for the epoch fence
# after an end); the oldest are forgotten past it (Kafka expires producer state too)
ENDED_EPOCHS_MAX: Final = 100_000

Offsets = list[tuple[str, int, int, str | None]]  # (topic, partition, offset, metadata)


@dataclass(frozen=True, slots=True)
class Pending:
    """One partition's pending offset of one producer in one group."""

    transactional_id: str
    epoch: int
    offset: int
    metadata: str | None
    commit_ms: int


class TxnOffsets:
    def __init__(self, topics: TopicRegistry, state_store: StateStore, clock: Clock,
                 groups: GroupCoordinator) -> None:
        self.topics = topics
        self.state_store = state_store
        self.store = state_store.txn_offsets
        self.clock = clock
        self.groups = groups  # committed offsets in memory; the owner fence (a cluster)
        # group -> producer id -> (topic, partition) -> its pending offset
        self._pending: dict[str, dict[int, dict[tuple[str, int], Pending]]] = {}
        # (group, producer id) -> the epoch of the marker that ended its last transaction
        self._ended: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._locks = KeyedLocks()  # per group

    # --- loading ---------------------------------------------------------------------
    async def load(self) -> None:
        """Every group's pending offsets, as stored (a broker's open)."""
        self._pending.clear()
        self._keep(await self.store.load())

    async def reload_group(self, group_id: str) -> None:
        """One group's pending offsets again (a cluster node claimed the group)."""
        async with self._locks.hold(group_id):
            self._pending.pop(group_id, None)
            for key in [key for key in self._ended if key[0] == group_id]:
                del self._ended[key]
            self._keep(await self.store.load(group_id))

    def _keep(self, rows: Iterable[PendingOffsetRow]) -> None:
        for row in rows:
            self._pending.setdefault(row.group_id, {}).setdefault(row.producer_id, {})[
                (row.topic, row.partition)] = Pending(
                    row.transactional_id, row.producer_epoch, row.offset, row.metadata,
                    row.commit_ms)

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
                by_partition[(row.topic, row.partition)] = Pending(
                    transactional_id, epoch, row.offset, row.metadata, row.commit_ms)
            return results

    def _check_epoch(self, group_id: str, transactional_id: str, producer_id: int,
                     epoch: int) -> None:
        known = [item.epoch for item in self._pending.get(group_id, {}).get(
            producer_id, {}).values()]
        ended = self._ended.get((group_id, producer_id))
        if ended is not None:
            known.append(ended)
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
            guard = self._guard(group_id)
            if (ended or guard is not None) and not await self.store.finish(
                    group_id, producer_id, epoch, applied, guard):
                self._refused(group_id)
            for key in ended:
                del mine[key]
            if not mine:
                self._pending.get(group_id, {}).pop(producer_id, None)
                if not self._pending.get(group_id, True):
                    del self._pending[group_id]
            self._remember_end(group_id, producer_id, epoch)
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

    def _remember_end(self, group_id: str, producer_id: int, epoch: int) -> None:
        key = (group_id, producer_id)
        self._ended[key] = max(epoch, self._ended.get(key, epoch))
        self._ended.move_to_end(key)
        while len(self._ended) > ENDED_EPOCHS_MAX:
            self._ended.popitem(last=False)

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
