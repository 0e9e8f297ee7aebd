"""Transactions: the coordinator of Kafka-style transactions, protocol-free.

Owns: transactional ids and their state machine (Kafka's TransactionState)

    Empty/CompleteCommit/CompleteAbort --add partitions/offsets--> Ongoing
    Ongoing --end(commit)--> PrepareCommit --markers written--> CompleteCommit
    Ongoing --end(abort) / timeout / a new instance--> PrepareAbort --> CompleteAbort

with every transition persisted (storage/txn_state.py) before it acts: the
Prepare* state is committed before the first marker, so a crash between the
markers of a multi-partition commit is finished on open (every partition gets
its marker, again if it had one: a second marker ends nothing). Offsets
committed in a transaction (TxnOffsetCommit) are kept by the group's coordinator
(txn_offsets.py), not in the transaction's row; after the markers, each group the
transaction added (AddOffsetsToTxn) is told the outcome (``finish_offsets``: on one
node a local call, on a cluster node a call to the group's owner over the internal
channel, Kafka's WriteTxnMarkers to the offsets partition). A group not told (its owner
unreachable, or refusing) leaves the transaction Prepare*, finished again by the
timer's retry pass.

Fencing: ``init_producer_id`` bumps the epoch of the transactional id (a
transaction the older instance left open is aborted under the new epoch); a
request with an older epoch is ``ProducerFencedError`` (Kafka's PRODUCER_FENCED),
a produce with one ``InvalidProducerEpochError``. A transaction past its timeout
is aborted by the coordinator itself, with an epoch bump that fences the producer
that let it expire: one timer sleeps until the earliest deadline (a heap,
txn_timer.py), it never scans every transaction.

``transaction.version`` 2 (KIP-890 part 2): ``end(..., bump_epoch=True)`` (EndTxn v5)
bumps the epoch before the markers and answers the producer id and epoch to use next
(a fresh producer id once the epoch is exhausted); ``add_partition_implicitly``
(Produce v12) and ``commit_offsets(..., implicit=True)`` (TxnOffsetCommit v5) add to
the transaction without AddPartitionsToTxn / AddOffsetsToTxn.

KIP-890 defences applied here: ``check_produce`` lets a transactional batch in only
while its producer's ongoing transaction holds the partition (a late write of a
finished or timed-out transaction is refused, never starts a hanging one), and
``check_hanging`` reports (log + ``hanging`` count) any open transaction in a log
that no ongoing transaction of the coordinator accounts for.

Expiry (Kafka's ``transactional.id.expiration.ms``, 7 days by default): a transactional
id with no transaction open and no request for that long is removed from memory and
the state store; a new InitProducerId for it starts over with a fresh producer id. An
``IdleExpiry`` heap holds one entry per id (``updated_ms``, persisted, is its last use),
checked by ``expire_idle`` from the broker's timer: nothing scans every id.

May call: producer ids (ProducerStates), the producer's marker appends, the topic
registry, the groups' pending offsets (TxnOffsets, or the cluster's call to a group's
owner), the transaction index. Never the
facade. Must not know: protocols, files, SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from conveyor.clock import Clock
from conveyor.errors import (
    ConcurrentTransactionsError,
    InvalidProducerIdMappingError,
    InvalidTransactionTimeoutError,
    InvalidTxnStateError,
    OperatingError,
    ProducerFencedError,
    UnavailableError,
    UnknownTopicError,
)
from conveyor.storage.state_store import StateStore
from conveyor.storage.txn_state import TransactionRow

from .keyed_locks import KeyedLocks
from .producer_state import EPOCH_MAX, ProducerStates
from .topics import TopicRegistry
from .txn_cluster import ClusterSide, LeaderTransactions
from .txn_expiry import IdleTransactionalIds
from .txn_index import TransactionIndex
from .txn_model import (
    PREPARING,
    MarkerWriter,
    NotAttemptedError,
    TransactionDescription,
    TransactionState,
    TxnFence,
    check_addable,
    check_holds_group,
    described,
    filtered,
    log_chunks,
    log_hanging,
    no_member_check,
    ongoing_count,
    retried_end,
    unaccounted,
)
from .txn_offsets import TxnOffsets
from .txn_timer import TransactionTimer

logger = logging.getLogger("conveyor.transactions")

TIMEOUT_MS_MAX = 900_000  # Kafka's transaction.max.timeout.ms default (15 minutes)
EXPIRATION_MS = 7 * 24 * 3600 * 1000  # Kafka's transactional.id.expiration.ms default
COORDINATOR_EPOCH = 0  # one coordinator, never moved: its epoch in every marker

# (group, transactional id, producer id, marker epoch, commit): the group's coordinator
# makes the producer's pending offsets visible or drops them (TxnOffsets.finish)
FinishOffsets = Callable[[str, str, int, int, bool], Awaitable[None]]
# (transactional id, producer id, epoch, group): AddOffsetsToTxn at the id's coordinator
AddGroup = Callable[[str, int, int, str], Awaitable[None]]


class Transactions(ClusterSide):
    def __init__(self, producers: ProducerStates, topics: TopicRegistry,
                 state_store: StateStore, clock: Clock, index: TransactionIndex,
                 write_marker: MarkerWriter, group_offsets: TxnOffsets,
                 expiration_ms: int = EXPIRATION_MS) -> None:
        self.producers = producers
        self.topics = topics
        self.clock = clock
        self.index = index
        self.store = state_store.txn
        self._write_marker = write_marker  # Producer.append_marker
        self.group_offsets = group_offsets  # this node's groups' pending offsets
        # a cluster node calls the group's / the id's owner (cluster/txn_offsets_remote.py)
        self.finish_offsets: FinishOffsets = group_offsets.finish
        self.add_group: AddGroup = self.add_offsets  # TxnOffsetCommit v5 (TV2)
        # (group, member id, generation): GroupCoordinator.check_member, set by the facade
        self.check_member: Callable[[str, str, int], None] = no_member_check
        self.txn_fence: TxnFence | None = None  # a cluster node: every row write fenced
        self.leader: LeaderTransactions | None = None  # a cluster node (txn_cluster.py)
        self._transactions: dict[str, TransactionRow] = {}
        self._by_producer: dict[int, str] = {}  # producer id -> transactional id
        self._known_partitions: dict[tuple[str, int], int] = {}  # -> first txn offset
        self._locks = KeyedLocks()  # per transactional id
        self._timer = TransactionTimer(
            clock, self._expire, self._retry_incomplete, self.check_hanging,
            lambda: bool(self.index.open_transactions() or self.hanging))
        self.hanging: set[tuple[str, int, int, int]] = set()  # reported open transactions
        self.timed_out = 0  # transactions aborted by their timeout (a counter)
        self.idle = IdleTransactionalIds(  # transactional.id.expiration.ms (txn_expiry.py)
            clock, expiration_ms, self._transactions, self._locks, self._forget)

    # --- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Load transactions, rebuild the logs' index, finish what a crash interrupted."""
        self.store.create_schema()
        for row in await self.store.load():
            self._transactions[row.transactional_id] = row
            self._by_producer[row.producer_id] = row.transactional_id
            self.idle.loaded(row)
        self._known_partitions = await self.store.load_partitions()
        for (topic, partition), first in sorted(self._known_partitions.items()):
            if self._exists(topic, partition):
                self.index.reset(topic, partition)
                async for raw in log_chunks(self.topics.log_store, topic, partition, first):
                    self.index.replay_chunk(topic, partition, raw)
        for row in list(self._transactions.values()):
            if row.state in PREPARING:
                logger.warning("completing transaction %s (%s) interrupted by a restart",
                               row.transactional_id, row.state)
                await self._complete(row)
            elif row.state == TransactionState.ONGOING:
                self._timer.arm(row.transactional_id, row.started_ms,
                                row.timeout_ms)  # its timeout counts again from now
        self.check_hanging()
        self._timer.start()

    async def close(self) -> None:
        await self._timer.close()
        if self.leader is not None:
            await self.leader.close()

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
            if row is not None and row.state in PREPARING:
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
            self.idle.touch(row)
            await self._persist(row)
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
            check_addable(row)
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
            await self._persist(row)
            return dict.fromkeys(wanted)

    async def add_offsets(self, transactional_id: str, producer_id: int, epoch: int,
                          group_id: str) -> None:
        async with self._locks.hold(transactional_id):
            row = self._checked(transactional_id, producer_id, epoch)
            if row.state == TransactionState.ONGOING and group_id in row.groups:
                self._touch(row)
                return  # nothing to write (a TV2 TxnOffsetCommit asks every time)
            check_addable(row)
            self._begin(row)
            row.groups.append(group_id)
            self._touch(row)
            await self._persist(row)

    async def commit_offsets(self, transactional_id: str, group_id: str, producer_id: int,
                             epoch: int, offsets: list[tuple[str, int, int, str | None]],
                             member: tuple[str, int] = ("", -1), implicit: bool = False,
                             ) -> dict[tuple[str, int], OperatingError | None]:
        """TxnOffsetCommit at the group's coordinator (which keeps them: txn_offsets.py);
        ``member`` (id, generation) checked against a classic group; ``implicit`` (v5,
        TV2): the group joins the transaction first. One node checks the transaction's
        row too; a cluster node's group coordinator has not got it (Kafka's checks)."""
        self.check_member(group_id, *member)
        if implicit:
            await self.add_group(transactional_id, producer_id, epoch, group_id)
        if self.txn_fence is not None:
            return await self.group_offsets.commit(group_id, transactional_id, producer_id,
                                                   epoch, offsets)
        async with self._locks.hold(transactional_id):  # its end waits for this write
            check_holds_group(self._checked(transactional_id, producer_id, epoch), group_id)
            return await self.group_offsets.commit(group_id, transactional_id, producer_id,
                                                   epoch, offsets)

    async def end(self, transactional_id: str, producer_id: int, epoch: int,
                  commit: bool, bump_epoch: bool = False) -> tuple[int, int]:
        """EndTxn: markers on every partition, offsets on commit; the producer id and
        epoch to use next. ``bump_epoch`` (EndTxn v5, TV2): the epoch goes up by one before
        the markers (written with it), fencing every write of the ended transaction; an
        exhausted epoch moves the id to a fresh producer id."""
        async with self._locks.hold(transactional_id):
            target = TransactionState.PREPARE_COMMIT if commit \
                else TransactionState.PREPARE_ABORT
            done = TransactionState.COMPLETE_COMMIT if commit \
                else TransactionState.COMPLETE_ABORT
            row = self._transactions.get(transactional_id)
            if bump_epoch and row is not None and (producer_id, epoch) == (
                    row.previous_producer_id, row.previous_producer_epoch):
                return retried_end(row, target, done)
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
                await self._completed_now(row)
                return row.producer_id, row.producer_epoch
            row.previous_producer_id, row.previous_producer_epoch = producer_id, epoch
            bumped = min(row.producer_epoch + 1, EPOCH_MAX)
            self.producers.set_epoch(transactional_id, row.producer_id, bumped)
            await self._prepare(row, target, bumped)  # commits the bumped epoch with it
            await self._completed_now(row)
            if epoch >= EPOCH_MAX - 1:  # Kafka's isProducerEpochExhausted: a new id
                await self._move_to(row, *await self.producers.rotate(transactional_id,
                                                                       row.producer_id))
            return row.producer_id, row.producer_epoch

    async def add_partition_implicitly(self, topic: str, partition: int, producer_id: int,
                                       epoch: int) -> None:
        """Produce v12+ (TV2): a transactional produce adds its partition (committed before
        the append; ``check_produce`` follows). Called outside the producer's partition
        lock: the marker write takes that lock under the transaction's."""
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
            check_addable(row)
            self._begin(row)
            row.partitions.append((topic, partition))
            self._remember_partition(topic, partition)
            self._touch(row)
            await self._persist(row)

    def on_transactional_append(self, topic: str, partition: int, producer_id: int,
                                base_offset: int) -> None:
        if self.index.observe_data(topic, partition, producer_id, base_offset):
            self._timer.wake()  # a transaction opened in a log: the hanging check runs

    def describe(self, transactional_id: str) -> TransactionDescription | None:
        return described(self._transactions.get(transactional_id))

    def listing(self, states: Iterable[str] = (), producer_ids: Iterable[int] = (),
                running_ms_min: int = -1) -> list[TransactionDescription]:
        found = [described(self._transactions[name]) for name in sorted(self._transactions)]
        return filtered([d for d in found if d is not None], set(states), set(producer_ids),
                        running_ms_min, self.clock.wall_ms())

    def pending_offsets(self, group_id: str) -> set[tuple[str, int]]:
        """The group's partitions with offsets in an unfinished transaction (KIP-447), as
        this node (the group's coordinator) keeps them."""
        return self.group_offsets.partitions(group_id)

    def counts(self) -> tuple[int, int, int]:
        """(ongoing, hanging, timed out since start): what metrics report."""
        return ongoing_count(self._transactions.values()), len(self.hanging), self.timed_out

    def forget_topic(self, topic: str) -> None:
        self.index.forget_topic(topic)
        self.store.delete_topic(topic)
        self._known_partitions = {key: first for key, first in self._known_partitions.items()
                                  if key[0] != topic}

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

    def _begin(self, row: TransactionRow) -> None:
        if row.state == TransactionState.ONGOING:
            return
        row.state = TransactionState.ONGOING
        row.partitions, row.groups, row.offsets = [], [], {}
        row.started_ms = self.clock.wall_ms()
        self._timer.arm(row.transactional_id, row.started_ms, row.timeout_ms)

    def _touch(self, row: TransactionRow) -> None:
        """The id was used now (``transactional.id.expiration.ms`` counts from here)."""
        row.updated_ms = self.clock.wall_ms()
        self.idle.touch(row)

    async def expire_idle(self) -> list[str]:
        """Forget the transactional ids idle past ``transactional.id.expiration.ms``."""
        expired = await self.idle.expire()
        if expired:
            await self.store.commit()
        return expired

    def _forget(self, row: TransactionRow) -> None:
        """An idle transactional id expired (called under its lock): gone everywhere."""
        del self._transactions[row.transactional_id]
        if self._by_producer.get(row.producer_id) == row.transactional_id:
            del self._by_producer[row.producer_id]
        self.producers.forget_transactional(row.transactional_id, row.producer_id)
        self.store.delete(row.transactional_id)

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
        await self._persist(row)

    async def _complete(self, row: TransactionRow) -> None:
        """Write the markers of a Prepare* transaction, apply its offsets, complete it."""
        commit = row.state == TransactionState.PREPARE_COMMIT
        markers = [key for key in row.partitions if self._exists(*key)]
        async with asyncio.TaskGroup() as group:
            for topic, partition in markers:
                group.create_task(self._marker(row, topic, partition, commit))
        for group_id in sorted(row.groups):  # after the markers, as Kafka's last step
            try:
                await self.finish_offsets(group_id, row.transactional_id, row.producer_id,
                                          row.producer_epoch, commit)
            except (ConnectionError, OperatingError) as error:  # not reached, or refused
                raise UnavailableError("the group's coordinator could not be told the end "
                                       "of the transaction: retried", group_id=group_id,
                                       reason=str(error)) from error
        if commit:  # offsets a row written by an older Conveyor carries
            self.group_offsets.apply_stored(row.offsets)
        row.state = TransactionState.COMPLETE_COMMIT if commit \
            else TransactionState.COMPLETE_ABORT
        row.partitions, row.groups, row.offsets = [], [], {}
        row.started_ms = -1
        await self._save_completed(row)

    async def _completed_now(self, row: TransactionRow) -> None:
        """Failed (a marker, a group not told), the timer retries it within a second."""
        try:
            await self._complete(row)
        except OperatingError:
            self._timer.wake()
            raise

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
            # TV2 (KIP-890 part 2): an EndTxn(abort) with this epoch is a retry of this abort
            row.previous_producer_id = row.producer_id
            row.previous_producer_epoch = row.producer_epoch
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
        await self._persist(row)

    async def _retry_incomplete(self) -> bool:
        """Prepare* transactions whose markers failed (a full disk): try again; True
        while some are still unfinished."""
        for row in list(self._transactions.values()):
            if row.state not in PREPARING:
                continue
            async with self._locks.hold(row.transactional_id):
                if row.state in PREPARING:
                    with contextlib.suppress(OperatingError):
                        await self._complete(row)
        return any(row.state in PREPARING for row in self._transactions.values())

    def check_hanging(self) -> list[tuple[str, int, int, int]]:
        """Open transactions in the logs that no ongoing transaction accounts for
        (KIP-890's "hanging transaction"): logged once each, counted in ``hanging``."""
        found = unaccounted(self.index, self._by_producer, self._transactions)
        if self.leader is not None:  # another node's transactions: theirs to account for
            found = [key for key in found if key[2] in self._by_producer]
        log_hanging(found, self.hanging)
        self.hanging = set(found)
        return found

    # --- helpers -----------------------------------------------------------------------
    def _exists(self, topic: str, partition: int) -> bool:
        return self.topics.log_store.has_partition(topic, partition)
