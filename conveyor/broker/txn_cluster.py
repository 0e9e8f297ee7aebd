"""Transactions on a cluster node: the log side of transactions coordinated elsewhere.

Owns, for a node of a cluster (conveyor/cluster), what a partition leader needs about
transactions whose coordinator is another node:

- ``LeaderTransactions.rebuild``: at the claim of a partition, its transaction index
  (open transactions, the LSO, aborted transactions) read again from the log, from the
  first transactional offset the state store remembers (the previous leader's index is
  not this node's).
- ``remote_appended``: a marker written by another node (the transaction's coordinator
  writes COMMIT/ABORT to every partition; appends on PostgreSQL are written by any
  node) ends the open transaction in this node's index. The other node's notification
  (cluster/wakeups.py) names the partition; a worker reads the log from where it last
  looked and applies each marker whose transaction it holds open from an earlier
  offset (data batches are written by the leader only, so only markers come from
  elsewhere; a marker already applied, or one of a transaction opened after it, is
  ignored).
- ``verify``: a transactional batch of a producer this node does not coordinate is let
  in only while the producer's transaction, as the state store has it, is ongoing at its
  epoch and holds the partition (AddPartitionsToTxn committed it before answering). The
  row read is kept per producer: a batch the kept row allows is not read again (a batch
  arriving after the end of its transaction is then let in, as before KIP-890).

``ClusterSide`` is the coordinator's own part of it (a base of ``Transactions``): its
switch to cluster mode, the reload of a transactional id it claims, and every write of
a transaction's row under the id's owner fence (``_persist``).

Must not know: protocols, SQL (the TxnStateStore reads), which node owns what.
"""

from __future__ import annotations

import asyncio
import logging

from conveyor.clock import Clock
from conveyor.errors import NotCoordinatorError
from conveyor.storage.control_batch import CONTROL_COMMIT, control_type
from conveyor.storage.log_api import LogStore
from conveyor.storage.record_batch import decode_records, split_batches
from conveyor.storage.txn_state import TransactionRow, TxnStateStore
from conveyor.tasks import Supervisor

from .keyed_locks import KeyedLocks
from .producer_state import ProducerStates
from .topics import TopicRegistry
from .txn_expiry import IdleTransactionalIds
from .txn_index import TransactionIndex
from .txn_model import PREPARING, TransactionState, TxnFence, log_chunks, verify_produce
from .txn_timer import TransactionTimer

logger = logging.getLogger("conveyor.transactions")
_SCAN_BYTES = 1 << 20


class LeaderTransactions:
    def __init__(self, index: TransactionIndex, log_store: LogStore,
                 store: TxnStateStore) -> None:
        self.index = index
        self.log_store = log_store
        self.store = store
        self._looked: dict[tuple[str, int], int] = {}  # next offset to look at for markers
        self._dirty: set[tuple[str, int]] = set()
        self._wake = asyncio.Event()
        self._tasks = Supervisor("conveyor.transactions.markers")
        self._started = False
        self._rows: dict[int, TransactionRow] = {}  # producer id -> row read (verify)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._tasks.start(self._run(), name="conveyor.transactions.markers")

    async def close(self) -> None:
        await self._tasks.close(cancel=True)

    # --- a claimed partition -------------------------------------------------------------
    async def rebuild(self, topic: str, partition: int) -> None:
        """The partition's index from its log (this node now leads it)."""
        first = (await self.store.load_partitions()).get((topic, partition))
        self.index.reset(topic, partition)
        end = self.log_store.offsets(topic, partition).high_watermark
        if first is not None:
            async for raw in log_chunks(self.log_store, topic, partition, first):
                self.index.replay_chunk(topic, partition, raw)
                end = max(end, split_batches(raw)[-1][1].last_offset + 1)
        self._looked[(topic, partition)] = end

    # --- markers written by other nodes ------------------------------------------------
    def remote_appended(self, topic: str, partition: int) -> None:
        """Another node appended to the partition (its notification moved our head)."""
        if not self.index.partitions().get((topic, partition)):
            return
        entry = self.index.partitions()[(topic, partition)]
        if not entry.open:
            return
        self._dirty.add((topic, partition))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                topic, partition = self._dirty.pop()
                try:
                    await self.catch_up(topic, partition)
                except Exception as error:  # logged; the next notification looks again
                    logger.warning("reading markers of %s-%d failed: %s", topic, partition,
                                   error)

    async def catch_up(self, topic: str, partition: int) -> None:
        """Apply the markers between where this node last looked and the log end."""
        entry = self.index.partitions().get((topic, partition))
        if entry is None or not entry.open or not self.log_store.has_partition(
                topic, partition):
            return
        offsets = self.log_store.offsets(topic, partition)
        offset = max(self._looked.get((topic, partition), 0), min(entry.open.values()),
                     offsets.log_start_offset)
        while offset < offsets.high_watermark:
            data = (await self.log_store.read(topic, partition, offset, _SCAN_BYTES)
                    ).read_bytes()
            if not data:
                break
            for position, header in split_batches(data):
                if header.is_control and header.is_transactional and \
                        header.base_offset >= offset:
                    records = decode_records(data, position)
                    kind = control_type(records[0]) if records else None
                    first = entry.open.get(header.producer_id)
                    if kind is not None and first is not None and first < header.base_offset:
                        self.index.observe_marker(topic, partition, header.producer_id,
                                                  header.base_offset, kind == CONTROL_COMMIT)
                offset = max(offset, header.last_offset + 1)
        self._looked[(topic, partition)] = offset

    # --- transactional batches of producers coordinated elsewhere ------------------------
    async def verify(self, topic: str, partition: int, producer_id: int,
                     epoch: int) -> None:
        """Read the producer's transaction from the store unless the row kept allows the
        batch (``row`` then answers ``check_produce``)."""
        kept = self._rows.get(producer_id)
        if kept is not None and allows(kept, topic, partition, epoch):
            return
        found = await self.store.load_by_producer(producer_id)
        if found is None:
            self._rows.pop(producer_id, None)
        else:
            self._rows[producer_id] = found

    def row(self, producer_id: int) -> TransactionRow | None:
        return self._rows.get(producer_id)

    def forget_producer(self, producer_id: int) -> None:
        self._rows.pop(producer_id, None)


def allows(row: TransactionRow, topic: str, partition: int, epoch: int) -> bool:
    return (row.state == TransactionState.ONGOING and row.producer_epoch == epoch
            and (topic, partition) in row.partitions)


class ClusterSide:
    """The coordinator's cluster-node part (``Transactions`` derives from it; on one
    node ``txn_fence`` stays None and ``_persist`` is a plain save and commit)."""

    # the coordinator's state this part works on (set by Transactions.__init__)
    txn_fence: TxnFence | None
    leader: LeaderTransactions | None
    producers: ProducerStates
    topics: TopicRegistry
    clock: Clock
    index: TransactionIndex
    store: TxnStateStore
    idle: IdleTransactionalIds
    _transactions: dict[str, TransactionRow]
    _by_producer: dict[int, str]
    _locks: KeyedLocks
    _timer: TransactionTimer

    def clustered(self, fence: TxnFence) -> None:
        """This coordinator runs on a cluster node: it serves only the transactional ids
        it claims (each is loaded at its claim, ``reload``), and every write of a
        transaction's row is made under the id's owner fence. What ``open`` loaded is
        dropped: another node may own and change any of it."""
        self.txn_fence = fence
        self._transactions.clear()
        self._by_producer.clear()
        self.leader = LeaderTransactions(self.index, self.topics.log_store, self.store)
        self.leader.start()

    async def verify_remote(self, topic: str, partition: int, producer_id: int,
                            epoch: int) -> None:
        """Before a transactional batch's producer lock, on a cluster node: the
        transaction of a producer coordinated elsewhere, read from the store when the
        one kept does not allow the batch (``check_produce`` then decides)."""
        if self.leader is not None and producer_id not in self._by_producer:
            await self.leader.verify(topic, partition, producer_id, epoch)

    async def reload(self, transactional_id: str) -> None:
        """A cluster node claimed the id: its state as the store has it (the previous
        owner wrote every transition there under its fence). What was in flight is
        finished as Kafka's coordinator does on a move: a Prepare* transaction gets its
        markers and completes (the timer's retry pass, woken here, once the claim is
        recorded: its writes need the claim's fence); an Ongoing one keeps its deadline
        (its start plus its timeout, by the wall clock): past it, the timer aborts it
        with an epoch bump at once."""
        async with self._locks.hold(transactional_id):
            old = self._transactions.pop(transactional_id, None)
            if old is not None and self._by_producer.get(old.producer_id) == transactional_id:
                del self._by_producer[old.producer_id]
            row = await self.store.load_one(transactional_id)
            if row is None:
                return
            self._transactions[transactional_id] = row
            self._by_producer[row.producer_id] = transactional_id
            self.producers.adopt(transactional_id, row.producer_id, row.producer_epoch)
            self.idle.loaded(row)
            if row.state == TransactionState.ONGOING:
                left_ms = row.started_ms + row.timeout_ms - self.clock.wall_ms()
                self._timer.arm(transactional_id, row.started_ms, max(left_ms, 0))
            elif row.state in PREPARING:
                logger.warning("completing transaction %s (%s) taken over from another "
                               "node", transactional_id, row.state)
                self._timer.wake()

    async def _persist(self, row: TransactionRow) -> None:
        """``row`` made durable; on a cluster node in a transaction of its own under the
        id's owner fence. Refused (another node claimed the id), this node drops the id
        (the next owner reloads it from the store) and answers NOT_COORDINATOR."""
        if self.txn_fence is None:
            self.store.save(row)
            await self.store.commit()
            return
        if await self.txn_fence.save(self.store, row):
            return
        transactional_id = row.transactional_id
        if self._transactions.get(transactional_id) is row:
            del self._transactions[transactional_id]
        if self._by_producer.get(row.producer_id) == transactional_id:
            del self._by_producer[row.producer_id]
        raise NotCoordinatorError("this node no longer coordinates the transactional id",
                                  transactional_id=transactional_id)

    def check_produce(self, topic: str, partition: int, producer_id: int, epoch: int) -> None:
        """KIP-890 verification, run under the producer's partition lock before an append."""
        transactional_id = self._by_producer.get(producer_id)
        row = None if transactional_id is None else self._transactions.get(transactional_id)
        if row is None and self.leader is not None:  # coordinated by another node
            row = self.leader.row(producer_id)
            if row is not None:
                verify_produce(row, None, topic, partition, producer_id, epoch)
                return
        verify_produce(row, self.producers.current_epoch(producer_id), topic, partition,
                       producer_id, epoch)

    async def _save_completed(self, row: TransactionRow) -> None:
        """A completed transaction's row. On one node committed at the end of this loop
        turn, not awaited: until it is durable the durable Prepare* row makes a restart
        finish this transaction again (markers that end nothing, the same offsets), and
        the next AddPartitionsToTxn waits for both. A cluster node awaits it under the
        id's fence (a node that lost the id leaves the Prepare* row to the new owner,
        which writes the markers again)."""
        if self.txn_fence is None:
            self.store.save(row)
        else:
            await self._persist(row)
