"""Transactions: the coordinator of Kafka-style transactions, protocol-free.

Owns: transactional ids and their state machine (Kafka's TransactionState)

    Empty/CompleteCommit/CompleteAbort --add partitions/offsets--> Ongoing
    Ongoing --end(commit)--> PrepareCommit --markers written--> CompleteCommit
    Ongoing --end(abort) / timeout / a new instance--> PrepareAbort --> CompleteAbort

with every transition persisted (storage/txn_state.py) before it acts: the
Prepare* state is committed before the first marker, so a crash between the
markers of a multi-partition commit is finished on open (every partition gets
its marker, again if it had one: a second marker ends nothing). Offsets
committed in a transaction (TxnOffsetCommit) are kept with it and applied to
their group only on commit.

Fencing: ``init_producer_id`` bumps the epoch of the transactional id (a
transaction the older instance left open is aborted under the new epoch); a
request with an older epoch is ``ProducerFencedError`` (Kafka's PRODUCER_FENCED),
a produce with one ``InvalidProducerEpochError``. A transaction past its timeout
is aborted by the coordinator itself, with an epoch bump that fences the producer
that let it expire: one timer sleeps until the earliest deadline (a heap), it
never scans every transaction.

KIP-890 defences applied here: ``check_produce`` lets a transactional batch in only
while its producer's ongoing transaction holds the partition (a late write of a
finished or timed-out transaction is refused, never starts a hanging one), and
``check_hanging`` reports (log + ``hanging`` count) any open transaction in a log
that no ongoing transaction of the coordinator accounts for.

May call: producer ids (ProducerStates), the producer's marker appends, the topic
registry, the group coordinator's offset store, the transaction index. Never the
facade. Must not know: protocols, files, SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from conveyor.clock import Clock
from conveyor.errors import (
    ConcurrentTransactionsError,
    InvalidProducerEpochError,
    InvalidProducerIdMappingError,
    InvalidTransactionTimeoutError,
    InvalidTxnStateError,
    OperatingError,
    ProducerFencedError,
    UnknownTopicError,
)
from conveyor.storage.log_api import LogStore
from conveyor.storage.record_batch import split_batches
from conveyor.storage.state_store import StateStore
from conveyor.storage.txn_state import TransactionRow
from conveyor.tasks import Supervisor

from .keyed_locks import KeyedLocks
from .producer_state import EPOCH_MAX, ProducerStates
from .topics import TopicRegistry
from .txn_index import TransactionIndex

logger = logging.getLogger("conveyor.transactions")

TIMEOUT_MS_MAX = 900_000  # Kafka's transaction.max.timeout.ms default (15 minutes)
HANGING_CHECK_MS = 60_000  # how often open transactions in logs are checked
RETRY_MS = 1_000  # how often markers that failed to append (a full disk) are retried
COORDINATOR_EPOCH = 0  # one coordinator, never moved: its epoch in every marker
_SCAN_BYTES = 1 << 20


class TransactionState(enum.StrEnum):
    EMPTY = "Empty"
    ONGOING = "Ongoing"
    PREPARE_COMMIT = "PrepareCommit"
    PREPARE_ABORT = "PrepareAbort"
    COMPLETE_COMMIT = "CompleteCommit"
    COMPLETE_ABORT = "CompleteAbort"


_PREPARING = (TransactionState.PREPARE_COMMIT, TransactionState.PREPARE_ABORT)
_OPEN = (TransactionState.ONGOING, *_PREPARING)


class NotAttemptedError(OperatingError):
    """Another partition of the same request failed, so this one was not added."""

    code = "operation_not_attempted"


@dataclass(frozen=True, slots=True)
class TransactionDescription:
    transactional_id: str
    producer_id: int
    producer_epoch: int
    state: str
    timeout_ms: int
    started_ms: int
    partitions: tuple[tuple[str, int], ...]


MarkerWriter = Callable[[str, int, int, int, bool, int], Awaitable[int]]
OffsetsWriter = Callable[[str, list[tuple[str, int, int, str | None]]], None]


class Transactions:
    def __init__(self, producers: ProducerStates, topics: TopicRegistry,
                 state_store: StateStore, clock: Clock, index: TransactionIndex,
                 write_marker: MarkerWriter, write_offsets: OffsetsWriter) -> None:
        self.producers = producers
        self.topics = topics
        self.clock = clock
        self.index = index
        self.store = state_store.txn
        self._write_marker = write_marker  # Producer.append_marker
        self._write_offsets = write_offsets  # GroupCoordinator.apply_offsets (no COMMIT)
        # (group, member id, generation): GroupCoordinator.check_member, set by the facade
        self.check_member: Callable[[str, str, int], None] = _no_member_check
        self._transactions: dict[str, TransactionRow] = {}
        self._by_producer: dict[int, str] = {}  # producer id -> transactional id
        self._known_partitions: dict[tuple[str, int], int] = {}  # -> first txn offset
        self._locks = KeyedLocks()  # per transactional id
        # (deadline_ms, transactional id, started_ms): lazily deleted when stale
        self._deadlines: list[tuple[int, str, int]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._supervisor = Supervisor("conveyor.transactions")
        self.hanging: set[tuple[str, int, int, int]] = set()  # reported open transactions
        self.timed_out = 0  # transactions aborted by their timeout (a counter)

    # --- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Load transactions, rebuild the logs' index, finish what a crash interrupted."""
        self.store.create_schema()
        for row in await self.store.load():
            self._transactions[row.transactional_id] = row
            self._by_producer[row.producer_id] = row.transactional_id
        self._known_partitions = await self.store.load_partitions()
        for (topic, partition), first in sorted(self._known_partitions.items()):
            if self._exists(topic, partition):
                self.index.reset(topic, partition)
                async for raw in _log_chunks(self.topics.log_store, topic, partition, first):
                    self.index.replay_chunk(topic, partition, raw)
        for row in list(self._transactions.values()):
            if row.state in _PREPARING:
                logger.warning("completing transaction %s (%s) interrupted by a restart",
                               row.transactional_id, row.state)
                await self._complete(row)
            elif row.state == TransactionState.ONGOING:
                self._arm(row)  # its timeout counts again from now
        self.check_hanging()
        self._supervisor.start(self._run_timer(), name="conveyor.transactions.timer")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        await self._supervisor.close(cancel=True)

    # --- the API -----------------------------------------------------------------------
    async def init_producer_id(self, transactional_id: str, timeout_ms: int,
                               producer_id: int = -1, epoch: int = -1) -> tuple[int, int]:
        """The id's producer with the next epoch; fences (and aborts) older instances."""
        if not 0 < timeout_ms <= TIMEOUT_MS_MAX:
            raise InvalidTransactionTimeoutError(
                "transaction timeout out of range", timeout_ms=timeout_ms,
                timeout_ms_max=TIMEOUT_MS_MAX)
        async with self._locks.hold(transactional_id):
            row = self._transactions.get(transactional_id)
            if row is not None and producer_id >= 0 and (
                    producer_id, epoch) != (row.producer_id, row.producer_epoch):
                raise ProducerFencedError("producer id and epoch are not the current ones",
                                          transactional_id=transactional_id)
            if row is not None and row.state in _PREPARING:
                await self._complete(row)
            new_id, new_epoch = await self.producers.init_producer_id(transactional_id)
            if row is not None and row.state == TransactionState.ONGOING:
                # the older instance's transaction: aborted under the new epoch
                bumped = new_epoch if new_id == row.producer_id else row.producer_epoch
                await self._prepare(row, TransactionState.PREPARE_ABORT, bumped)
                await self._complete(row)
            if row is not None:
                self._by_producer.pop(row.producer_id, None)
            row = TransactionRow(transactional_id, new_id, new_epoch, timeout_ms,
                                 TransactionState.EMPTY, updated_ms=self.clock.wall_ms())
            self._transactions[transactional_id] = row
            self._by_producer[new_id] = transactional_id
            self.store.save(row)
            await self.store.commit()
            return new_id, new_epoch

    async def add_partitions(self, transactional_id: str, producer_id: int, epoch: int,
                             partitions: Iterable[tuple[str, int]], verify_only: bool = False,
                             ) -> dict[tuple[str, int], OperatingError | None]:
        """Add partitions to the ongoing transaction (starting one); per-partition errors.
        ``verify_only`` (KIP-890): only say whether each is in the ongoing transaction."""
        wanted = list(dict.fromkeys(partitions))
        async with self._locks.hold(transactional_id):
            row = self._checked(transactional_id, producer_id, epoch)
            if verify_only:
                ongoing = row.state == TransactionState.ONGOING
                return {key: None if ongoing and key in row.partitions else
                        InvalidTxnStateError("partition not in the transaction",
                                             topic=key[0], partition=key[1])
                        for key in wanted}
            self._check_addable(row)
            unknown = {key for key in wanted if not self._exists(*key)}
            if unknown:
                return {key: UnknownTopicError("unknown topic or partition", topic=key[0],
                                               partition=key[1]) if key in unknown
                        else NotAttemptedError("not attempted") for key in wanted}
            self._begin(row)
            for topic, partition in wanted:
                if (topic, partition) not in row.partitions:
                    row.partitions.append((topic, partition))
                    self._remember_partition(topic, partition)
            self._touch(row)
            self.store.save(row)
            await self.store.commit()
            return dict.fromkeys(wanted)

    async def add_offsets(self, transactional_id: str, producer_id: int, epoch: int,
                          group_id: str) -> None:
        async with self._locks.hold(transactional_id):
            row = self._checked(transactional_id, producer_id, epoch)
            self._check_addable(row)
            self._begin(row)
            if group_id not in row.groups:
                row.groups.append(group_id)
            self._touch(row)
            self.store.save(row)
            await self.store.commit()

    async def commit_offsets(self, transactional_id: str, group_id: str, producer_id: int,
                             epoch: int, offsets: list[tuple[str, int, int, str | None]],
                             member: tuple[str, int] = ("", -1), implicit: bool = False,
                             ) -> dict[tuple[str, int], OperatingError | None]:
        """TxnOffsetCommit: offsets kept with the transaction, visible on its commit;
        ``member`` (member id, generation) is checked against a classic group.
        ``implicit`` (v5, ``transaction.version`` 2): the group joins the transaction
        here, as AddOffsetsToTxn would have added it (TV2 clients do not send that)."""
        async with self._locks.hold(transactional_id):
            row = self._checked(transactional_id, producer_id, epoch)
            if implicit and (row.state != TransactionState.ONGOING
                             or group_id not in row.groups):
                self.check_member(group_id, *member)
                self._check_addable(row)
                self._begin(row)
                row.groups.append(group_id)
            if row.state != TransactionState.ONGOING or group_id not in row.groups:
                raise InvalidTxnStateError("AddOffsetsToTxn must come first in a transaction",
                                           transactional_id=transactional_id, group=group_id)
            self.check_member(group_id, *member)
            results: dict[tuple[str, int], OperatingError | None] = {}
            pending = {(t, p): (o, m) for t, p, o, m in row.offsets.get(group_id, [])}
            for topic, partition, offset, metadata in offsets:
                if not self._exists(topic, partition):
                    results[(topic, partition)] = UnknownTopicError(
                        "unknown topic or partition", topic=topic, partition=partition)
                    continue
                pending[(topic, partition)] = (offset, metadata)
                results[(topic, partition)] = None
            row.offsets[group_id] = [(t, p, o, m) for (t, p), (o, m) in sorted(pending.items())]
            self._touch(row)
            self.store.save(row)
            await self.store.commit()
            return results

    async def end(self, transactional_id: str, producer_id: int, epoch: int,
                  commit: bool, bump_epoch: bool = False) -> tuple[int, int]:
        """EndTxn: the transaction's markers on every partition, its offsets on commit;
        the producer id and epoch to use next. ``bump_epoch`` (EndTxn v5,
        ``transaction.version`` 2, KIP-890 part 2): the epoch goes up by one before the
        markers (written with it), so every write of the ended transaction is fenced;
        an exhausted epoch moves the id to a fresh producer id."""
        async with self._locks.hold(transactional_id):
            target = TransactionState.PREPARE_COMMIT if commit \
                else TransactionState.PREPARE_ABORT
            done = TransactionState.COMPLETE_COMMIT if commit \
                else TransactionState.COMPLETE_ABORT
            row = self._transactions.get(transactional_id)
            if bump_epoch and row is not None and (producer_id, epoch) == (
                    row.previous_producer_id, row.previous_producer_epoch):
                return self._retried_end(row, target, done)
            row = self._checked(transactional_id, producer_id, epoch)
            if row.state == done and not bump_epoch:
                return row.producer_id, row.producer_epoch  # a retry of the completing one
            if row.state == target:
                raise ConcurrentTransactionsError("the transaction is completing: retry",
                                                  transactional_id=transactional_id)
            if row.state != TransactionState.ONGOING:
                raise InvalidTxnStateError(f"cannot end a transaction in state {row.state}",
                                           transactional_id=transactional_id)
            self._touch(row)
            if not bump_epoch:
                await self._prepare(row, target, row.producer_epoch)
                await self._complete(row)
                return row.producer_id, row.producer_epoch
            row.previous_producer_id, row.previous_producer_epoch = producer_id, epoch
            bumped = min(row.producer_epoch + 1, EPOCH_MAX)
            self.producers.set_epoch(transactional_id, row.producer_id, bumped)
            await self._prepare(row, target, bumped)  # commits the bumped epoch with it
            await self._complete(row)
            if epoch >= EPOCH_MAX - 1:  # Kafka's isProducerEpochExhausted: a new id
                await self._move_to(row, *await self.producers.rotate(transactional_id,
                                                                       row.producer_id))
            return row.producer_id, row.producer_epoch

    @staticmethod
    def _retried_end(row: TransactionRow, target: TransactionState,
                     done: TransactionState) -> tuple[int, int]:
        """An EndTxn v5 with the epoch its first attempt bumped: that attempt's answer."""
        if row.state == done:
            return row.producer_id, row.producer_epoch
        if row.state == target:
            raise ConcurrentTransactionsError("the transaction is completing: retry",
                                              transactional_id=row.transactional_id)
        raise InvalidTxnStateError(f"the previous transaction ended otherwise ({row.state})",
                                   transactional_id=row.transactional_id)

    async def add_partition_implicitly(self, topic: str, partition: int, producer_id: int,
                                       epoch: int) -> None:
        """Produce v12+ (``transaction.version`` 2, KIP-890 part 2): the first
        transactional produce to a partition adds it to the producer's transaction
        (starting one), committed before the append; ``check_produce`` follows as for
        every transactional batch. Called outside the producer's partition lock (the
        marker write takes that lock under the transaction's)."""
        transactional_id = self._by_producer.get(producer_id)
        row = None if transactional_id is None else self._transactions.get(transactional_id)
        if row is None or transactional_id is None:
            return  # check_produce refuses it
        if row.state == TransactionState.ONGOING and row.producer_epoch == epoch \
                and (topic, partition) in row.partitions:
            return  # the common case: already added, nothing to await
        async with self._locks.hold(transactional_id):
            row = self._transactions.get(transactional_id)
            if row is None or row.producer_id != producer_id or row.producer_epoch != epoch:
                return  # check_produce answers the stale epoch
            if row.state == TransactionState.ONGOING and (topic, partition) in row.partitions:
                return
            self._check_addable(row)
            self._begin(row)
            row.partitions.append((topic, partition))
            self._remember_partition(topic, partition)
            self._touch(row)
            self.store.save(row)
            await self.store.commit()

    def check_produce(self, topic: str, partition: int, producer_id: int, epoch: int) -> None:
        """KIP-890 verification, run under the producer's partition lock before an append."""
        transactional_id = self._by_producer.get(producer_id)
        row = None if transactional_id is None else self._transactions.get(transactional_id)
        if row is None:
            known = self.producers.current_epoch(producer_id)
            if known is not None and epoch < known:  # e.g. a producer id rotated away
                raise InvalidProducerEpochError("producer epoch is stale",
                                                producer_id=producer_id, epoch=epoch,
                                                current_epoch=known)
            raise InvalidTxnStateError("transactional batch of a producer without a "
                                       "transactional id", producer_id=producer_id)
        if epoch != row.producer_epoch:
            raise InvalidProducerEpochError("producer epoch is not the current one",
                                            producer_id=producer_id, epoch=epoch,
                                            current_epoch=row.producer_epoch)
        if row.state != TransactionState.ONGOING or (topic, partition) not in row.partitions:
            raise InvalidTxnStateError("partition is not in the ongoing transaction "
                                       "(AddPartitionsToTxn first)", topic=topic,
                                       partition=partition, state=str(row.state))

    def on_transactional_append(self, topic: str, partition: int, producer_id: int,
                                base_offset: int) -> None:
        if self.index.observe_data(topic, partition, producer_id, base_offset):
            self._wake.set()  # a transaction opened in a log: the hanging check runs

    def describe(self, transactional_id: str) -> TransactionDescription | None:
        row = self._transactions.get(transactional_id)
        if row is None:
            return None
        return TransactionDescription(
            row.transactional_id, row.producer_id, row.producer_epoch, str(row.state),
            row.timeout_ms, row.started_ms, tuple(sorted(row.partitions)))

    def listing(self, states: Iterable[str] = (), producer_ids: Iterable[int] = (),
                running_ms_min: int = -1) -> list[TransactionDescription]:
        found = [self.describe(name) for name in sorted(self._transactions)]
        return _filtered([d for d in found if d is not None], set(states), set(producer_ids),
                         running_ms_min, self.clock.wall_ms())

    def pending_offsets(self, group_id: str) -> set[tuple[str, int]]:
        """The group's partitions with offsets in an unfinished transaction (KIP-447)."""
        return {(t, p) for row in self._transactions.values() if row.state in _OPEN
                for t, p, _, _ in row.offsets.get(group_id, ())}

    def counts(self) -> tuple[int, int, int]:
        """(ongoing, hanging, timed out since start): what metrics report."""
        ongoing = sum(1 for row in self._transactions.values()
                      if row.state == TransactionState.ONGOING)
        return ongoing, len(self.hanging), self.timed_out

    def forget_topic(self, topic: str) -> None:
        self.index.forget_topic(topic)
        self.store.delete_topic(topic)
        for key in [key for key in self._known_partitions if key[0] == topic]:
            del self._known_partitions[key]

    # --- transitions -------------------------------------------------------------------
    def _checked(self, transactional_id: str, producer_id: int, epoch: int) -> TransactionRow:
        row = self._transactions.get(transactional_id)
        if row is None or row.producer_id != producer_id:
            raise InvalidProducerIdMappingError(
                "no such transactional producer (InitProducerId first)",
                transactional_id=transactional_id, producer_id=producer_id)
        if epoch != row.producer_epoch:
            raise ProducerFencedError("a newer instance holds this transactional id",
                                      transactional_id=transactional_id, epoch=epoch,
                                      current_epoch=row.producer_epoch)
        return row

    @staticmethod
    def _check_addable(row: TransactionRow) -> None:
        if row.state in _PREPARING:
            raise ConcurrentTransactionsError("the previous transaction is completing",
                                              transactional_id=row.transactional_id)

    def _begin(self, row: TransactionRow) -> None:
        if row.state == TransactionState.ONGOING:
            return
        row.state = TransactionState.ONGOING
        row.partitions, row.groups, row.offsets = [], [], {}
        row.started_ms = self.clock.wall_ms()
        self._arm(row)

    def _touch(self, row: TransactionRow) -> None:
        """The id was used now (``transactional.id.expiration.ms`` counts from here)."""
        row.updated_ms = self.clock.wall_ms()

    def _remember_partition(self, topic: str, partition: int) -> None:
        if (topic, partition) in self._known_partitions:
            return
        first = self.topics.offsets(topic, partition).log_end_offset
        self._known_partitions[(topic, partition)] = first
        self.store.save_partition(topic, partition, first)

    async def _prepare(self, row: TransactionRow, state: TransactionState,
                       epoch: int) -> None:
        """Persist the decision (and a bumped epoch) before any marker is written."""
        row.state = state
        if epoch != row.producer_epoch:
            row.producer_epoch = epoch
        self.store.save(row)
        await self.store.commit()

    async def _complete(self, row: TransactionRow) -> None:
        """Write the markers of a Prepare* transaction, apply its offsets, complete it."""
        commit = row.state == TransactionState.PREPARE_COMMIT
        markers = [key for key in row.partitions if self._exists(*key)]
        async with asyncio.TaskGroup() as group:
            for topic, partition in markers:
                group.create_task(self._marker(row, topic, partition, commit))
        if commit:
            for group_id, offsets in sorted(row.offsets.items()):
                self._write_offsets(group_id, offsets)
        row.state = TransactionState.COMPLETE_COMMIT if commit \
            else TransactionState.COMPLETE_ABORT
        row.partitions, row.groups, row.offsets = [], [], {}
        row.started_ms = -1
        # committed at the end of this loop turn, not awaited: until it is durable the
        # durable Prepare* row makes a restart finish this transaction again (markers that
        # end nothing, the same offsets), and the next AddPartitionsToTxn waits for both
        self.store.save(row)

    async def _marker(self, row: TransactionRow, topic: str, partition: int,
                      commit: bool) -> None:
        offset = await self._write_marker(topic, partition, row.producer_id,
                                          row.producer_epoch, commit, COORDINATOR_EPOCH)
        self.index.observe_marker(topic, partition, row.producer_id, offset, commit)

    async def _expire(self, transactional_id: str, started_ms: int) -> None:
        async with self._locks.hold(transactional_id):
            row = self._transactions.get(transactional_id)
            if row is None or row.state != TransactionState.ONGOING \
                    or row.started_ms != started_ms:
                return  # ended (or restarted) since the deadline was armed
            logger.warning("transaction %s timed out after %d ms: aborting it and fencing "
                           "its producer", transactional_id, row.timeout_ms)
            self.timed_out += 1
            new_id, new_epoch = await self.producers.init_producer_id(transactional_id)
            bumped = new_epoch if new_id == row.producer_id else row.producer_epoch
            await self._prepare(row, TransactionState.PREPARE_ABORT, bumped)
            await self._complete(row)
            if new_id != row.producer_id:  # epochs exhausted: the id moves to a new producer
                await self._move_to(row, new_id, new_epoch)

    async def _move_to(self, row: TransactionRow, producer_id: int, epoch: int) -> None:
        """The transactional id's producer is now ``producer_id`` (old epochs exhausted)."""
        self._by_producer.pop(row.producer_id, None)
        row.producer_id, row.producer_epoch = producer_id, epoch
        self._by_producer[producer_id] = row.transactional_id
        self.store.save(row)
        await self.store.commit()

    # --- the timer: one deadline at a time ---------------------------------------------
    def _arm(self, row: TransactionRow) -> None:
        deadline_ms = self.clock.monotonic_ms() + row.timeout_ms
        first = self._deadlines[0][0] if self._deadlines else None
        heapq.heappush(self._deadlines, (deadline_ms, row.transactional_id, row.started_ms))
        if first is None or deadline_ms < first:
            self._wake.set()

    async def _run_timer(self) -> None:
        """Sleeps until the earliest deadline, the next hanging check (while transactions
        are open in a log) or marker retry; with none of them, until ``_wake``."""
        next_check_ms = self.clock.monotonic_ms() + HANGING_CHECK_MS
        while not self._closing:
            self._wake.clear()  # before looking: a wake during this pass is not lost
            now_ms = self.clock.monotonic_ms()
            while self._deadlines and self._deadlines[0][0] <= now_ms:
                _, transactional_id, started_ms = heapq.heappop(self._deadlines)
                try:
                    await self._expire(transactional_id, started_ms)
                except OperatingError:
                    logger.exception("aborting timed-out transaction %s failed",
                                     transactional_id)
            incomplete = await self._retry_incomplete()
            if now_ms >= next_check_ms:
                self.check_hanging()
                next_check_ms = now_ms + HANGING_CHECK_MS
            waits = [self._deadlines[0][0] - now_ms] if self._deadlines else []
            if self.index.open_transactions() or self.hanging:
                waits.append(next_check_ms - now_ms)
            if incomplete:
                waits.append(RETRY_MS)
            await self._sleep(max(min(waits), 1) if waits else None)

    async def _sleep(self, wait_ms: int | None) -> None:
        if wait_ms is None:
            await self._wake.wait()
            return
        async with asyncio.TaskGroup() as group:
            sleeper = group.create_task(self.clock.sleep_ms(wait_ms))
            woken = group.create_task(self._wake.wait())
            await asyncio.wait([sleeper, woken], return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            woken.cancel()

    async def _retry_incomplete(self) -> bool:
        """Prepare* transactions whose markers failed (a full disk): try again; True
        while some are still unfinished."""
        for row in list(self._transactions.values()):
            if row.state not in _PREPARING:
                continue
            async with self._locks.hold(row.transactional_id):
                if row.state in _PREPARING:
                    with contextlib.suppress(OperatingError):
                        await self._complete(row)
        return any(row.state in _PREPARING for row in self._transactions.values())

    def check_hanging(self) -> list[tuple[str, int, int, int]]:
        """Open transactions in the logs that no ongoing transaction accounts for
        (KIP-890's "hanging transaction"): logged once each, counted in ``hanging``."""
        found = _unaccounted(self.index, self._by_producer, self._transactions)
        for key in found:
            if key not in self.hanging:
                logger.error("hanging transaction: producer %d holds %s-%d open from offset "
                             "%d with no ongoing transaction (last stable offset stuck)",
                             key[2], key[0], key[1], key[3])
        self.hanging = set(found)
        return found

    # --- helpers -----------------------------------------------------------------------
    def _exists(self, topic: str, partition: int) -> bool:
        return self.topics.log_store.has_partition(topic, partition)


def _unaccounted(index: TransactionIndex, by_producer: dict[int, str],
                 transactions: dict[str, TransactionRow]) -> list[tuple[str, int, int, int]]:
    found = []
    for topic, partition, producer_id, first in index.open_transactions():
        transactional_id = by_producer.get(producer_id)
        row = None if transactional_id is None else transactions.get(transactional_id)
        if row is not None and row.state in (TransactionState.ONGOING, *_PREPARING) \
                and (topic, partition) in row.partitions:
            continue
        found.append((topic, partition, producer_id, first))
    return found


async def _log_chunks(store: LogStore, topic: str, partition: int,
                      first: int) -> AsyncIterator[bytes]:
    """A partition log's bytes from ``first`` (or its start) to its high watermark."""
    offset = max(first, store.offsets(topic, partition).log_start_offset)
    while offset < store.offsets(topic, partition).high_watermark:
        data = (await store.read(topic, partition, offset, _SCAN_BYTES)).read_bytes()
        if not data:
            return
        yield data
        last = split_batches(data)[-1][1]
        offset = max(offset + 1, last.last_offset + 1)


def _no_member_check(group_id: str, member_id: str, generation: int) -> None:
    return None


def _filtered(found: list[TransactionDescription], states: set[str], producer_ids: set[int],
              running_ms_min: int, now_ms: int) -> list[TransactionDescription]:
    """ListTransactions' filters: states, producer ids, running for at least a duration."""
    return [description for description in found
            if (not states or description.state in states)
            and (not producer_ids or description.producer_id in producer_ids)
            and (running_ms_min < 0 or (description.started_ms >= 0 and
                                        now_ms - description.started_ms >= running_ms_min))]
