"""The transaction coordinator's vocabulary and pure helpers (split from transactions.py).

Owns: the states of a transactional id (Kafka's TransactionState), what Describe/List
answer (``TransactionDescription``), the callables the coordinator is wired with (and a
cluster node's ``TxnFence`` on every write of a transaction's row), and the pure helpers
of its log
scans and listings. Must not know: protocols, files, SQL.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from conveyor.errors import (
    ConcurrentTransactionsError,
    InvalidProducerEpochError,
    InvalidTxnStateError,
    OperatingError,
)
from conveyor.storage.log_api import LogStore
from conveyor.storage.record_batch import split_batches
from conveyor.storage.sql_engine import WriteGuard
from conveyor.storage.txn_state import TransactionRow, TxnStateStore

from .txn_index import TransactionIndex

_SCAN_BYTES = 1 << 20


class TransactionState(enum.StrEnum):
    EMPTY = "Empty"
    ONGOING = "Ongoing"
    PREPARE_COMMIT = "PrepareCommit"
    PREPARE_ABORT = "PrepareAbort"
    COMPLETE_COMMIT = "CompleteCommit"
    COMPLETE_ABORT = "CompleteAbort"


PREPARING = (TransactionState.PREPARE_COMMIT, TransactionState.PREPARE_ABORT)
OPEN = (TransactionState.ONGOING, *PREPARING)


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


def unaccounted(index: TransactionIndex, by_producer: dict[int, str],
                 transactions: dict[str, TransactionRow]) -> list[tuple[str, int, int, int]]:
    found = []
    for topic, partition, producer_id, first in index.open_transactions():
        transactional_id = by_producer.get(producer_id)
        row = None if transactional_id is None else transactions.get(transactional_id)
        if row is not None and row.state in (TransactionState.ONGOING, *PREPARING) \
                and (topic, partition) in row.partitions:
            continue
        found.append((topic, partition, producer_id, first))
    return found


async def log_chunks(store: LogStore, topic: str, partition: int,
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


def no_member_check(group_id: str, member_id: str, generation: int) -> None:
    return None


@dataclass(frozen=True, slots=True)
class TxnFence:
    """A cluster node's fence on the transactional ids it coordinates (conveyor/cluster):
    every write of a transaction's row is made only under ``guard(transactional id)``
    (the id's owner row: owner, epoch, live lease, checked and share-locked inside the
    write's own transaction); ``refused`` is told the id when that finds another node
    owns it."""

    guard: Callable[[str], WriteGuard | None]
    refused: Callable[[str], None]

    async def save(self, store: TxnStateStore, row: TransactionRow) -> bool:
        """Write ``row`` under the fence; False (nothing written, ``refused`` told) when
        this node no longer coordinates the id."""
        guard = self.guard(row.transactional_id)
        if guard is not None and await store.save_guarded(row, guard):
            return True
        self.refused(row.transactional_id)
        return False


def copied(row: TransactionRow) -> TransactionRow:
    return dataclasses.replace(row, partitions=list(row.partitions), groups=list(row.groups),
                               offsets=dict(row.offsets))


def log_hanging(found: list[tuple[str, int, int, int]],
                reported: set[tuple[str, int, int, int]]) -> None:
    for key in found:
        if key not in reported:
            logging.getLogger("conveyor.transactions").error(
                "hanging transaction: producer %d holds %s-%d open from offset %d with no "
                "ongoing transaction (last stable offset stuck)", key[2], key[0], key[1],
                key[3])


def filtered(found: list[TransactionDescription], states: set[str], producer_ids: set[int],
              running_ms_min: int, now_ms: int) -> list[TransactionDescription]:
    """ListTransactions' filters: states, producer ids, running for at least a duration."""
    return [description for description in found
            if (not states or description.state in states)
            and (not producer_ids or description.producer_id in producer_ids)
            and (running_ms_min < 0 or (description.started_ms >= 0 and
                                        now_ms - description.started_ms >= running_ms_min))]


def described(row: TransactionRow | None) -> TransactionDescription | None:
    if row is None:
        return None
    return TransactionDescription(
        row.transactional_id, row.producer_id, row.producer_epoch, str(row.state),
        row.timeout_ms, row.started_ms, tuple(sorted(row.partitions)))


def ongoing_count(rows: Iterable[TransactionRow]) -> int:
    return sum(1 for row in rows if row.state == TransactionState.ONGOING)


def check_addable(row: TransactionRow) -> None:
    if row.state in PREPARING:
        raise ConcurrentTransactionsError("the previous transaction is completing",
                                          transactional_id=row.transactional_id)


def check_holds_group(row: TransactionRow, group_id: str) -> None:
    """One node's TxnOffsetCommit: only into an ongoing transaction holding the group."""
    if row.state != TransactionState.ONGOING or group_id not in row.groups:
        raise InvalidTxnStateError("AddOffsetsToTxn must come first in a transaction",
                                   transactional_id=row.transactional_id, group=group_id)


def retried_end(row: TransactionRow, target: TransactionState,
                done: TransactionState) -> tuple[int, int]:
    """An EndTxn v5 with the epoch its first attempt bumped: that attempt's answer."""
    if row.state == done:
        return row.producer_id, row.producer_epoch
    if row.state == target:
        raise ConcurrentTransactionsError("the transaction is completing: retry",
                                          transactional_id=row.transactional_id)
    raise InvalidTxnStateError(f"the previous transaction ended otherwise ({row.state})",
                               transactional_id=row.transactional_id)


def verify_produce(row: TransactionRow | None, known_epoch: int | None, topic: str,
                   partition: int, producer_id: int, epoch: int) -> None:
    """KIP-890: a transactional batch is let in only while its producer's ongoing
    transaction (``row``) holds the partition; ``known_epoch``: the producer's epoch as
    the idempotence check knows it (a producer id rotated away has no row)."""
    if row is None:
        if known_epoch is not None and epoch < known_epoch:
            raise InvalidProducerEpochError("producer epoch is stale", producer_id=producer_id,
                                            epoch=epoch, current_epoch=known_epoch)
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
