"""Compaction of ``cleanup.policy=compact`` partitions on PostgreSQL (PostgresLogStore).

Same rules as the file backend's cleaner (storage/compaction.py): keep, for every
key, only the record with the highest offset; a tombstone (null value) stays until its
batch is older than ``delete_retention_ms``; records without a key and control
batches stay. Offsets never change (gaps appear). Transactions follow the same rules as
on files, from the same backend-neutral decision (storage/txn_cleaning.py): aborted
records dropped and never shadowing a key, nothing cleaned at or past the first open
transaction, spent COMMIT markers removed after ``delete_retention_ms``. Only batches
below the first batch newer than ``min_compaction_lag_ms`` are rewritten; later ones
are read (their keys shadow older ones) but never rewritten.

How, against appends and crashes:

- The pass bounds itself by the partition's committed end when it starts (the head's
  ``next_offset`` this process saw commit). Appends only add rows at and above the
  head, under the head row's lock; compaction never takes that lock and never touches
  a row at or above the end it started with, so appends neither wait for it nor race
  it. A newer record of a key appended meanwhile only makes an older one obsolete.
- It runs on a pooled connection of its own, not in the append transactions, and
  rewrites at most ``rows_per_transaction`` batch rows per transaction: each
  transaction deletes some batch rows and inserts their cleaned replacement rows
  (one per kept record, at the record's own offset, with its timestamp, producer and
  compression; the original's ``write_id`` so a commit read-back still finds it).
  A transaction is atomic, so a reader, or a crash, sees every batch either whole
  as written or whole as cleaned, never half of one: a crash mid-compaction leaves a
  log in which some batches are cleaned and the rest are not, which the next pass
  continues.
- A row is deleted only if it is still the one planned from (same base offset,
  ``write_id`` and record count); retention dropping its chunk, a truncation, or an
  earlier pass of another node may have removed it, and then nothing is inserted
  for it. Truncation and the rewrite transactions take one advisory lock per
  partition, so a truncation never misses rows a rewrite inserts.
- Batches whose append commit is being read back (its outcome unknown after a lost
  connection) are skipped: the read-back looks for their first row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import asyncpg

from conveyor.errors import OperatingError
from conveyor.storage import postgres_log_schema as sql
from conveyor.storage.log_config import LogConfig
from conveyor.storage.record_batch import (
    NO_SEQUENCE,
    BatchHeader,
    RecordData,
    build_batch,
    decode_records,
    patch_base_offset,
    read_header,
)
from conveyor.storage.txn_cleaning import TransactionCleaning
from conveyor.tasks import Supervisor

logger = logging.getLogger(__name__)

ROWS_PER_TRANSACTION = 64  # batch rows rewritten per compaction transaction
SCAN_ROWS = 256  # rows fetched per query of the key scan
SEQUENCE_MAX = (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class CompactionJob:
    """One partition's pass: its rows in [start, end) as seen when the pass began."""

    partition_id: int
    start: int  # the log start
    end: int  # the committed next offset: nothing at or above is touched
    config: LogConfig
    now_ms: int


@dataclass(slots=True)
class _Rewrite:
    """Planned rewrites of one transaction: originals to delete, replacements to insert."""

    originals: list[tuple[int, int, int]]  # (base offset, write id, record count)
    replacements: dict[int, list[tuple[Any, ...]]]  # original base offset -> rows

    def __len__(self) -> int:
        return len(self.originals)


async def compact_partition(connection: Any, job: CompactionJob, in_doubt: Collection[int],
                            rows_per_transaction: int = ROWS_PER_TRANSACTION,
                            after_transaction: Callable[[], None] | None = None) -> int:
    """Clean one partition (see the module docstring); return the batch rows rewritten.

    ``after_transaction`` (tests): called after each rewrite transaction commits."""
    clean_end = await _clean_end(connection, job)
    if clean_end <= job.start:
        return 0
    latest, transactions = await _scan(connection, job)
    first_open = transactions.first_open_offset()
    if first_open is not None:  # Kafka cleans below the last stable offset only
        clean_end = min(clean_end, first_open)
    rewritten = 0
    pending = _Rewrite([], {})
    position = job.start
    while position < clean_end:
        rows = await connection.fetch(sql.COMPACT_SCAN, job.partition_id, position, clean_end,
                                      SCAN_ROWS)
        for row in rows:
            if row["write_id"] in in_doubt or row["last_offset"] >= clean_end:
                continue
            replacement = _cleaned(row, job, latest, transactions)
            if replacement is None:
                continue
            pending.originals.append((row["base_offset"], row["write_id"], row["record_count"]))
            pending.replacements[row["base_offset"]] = replacement
            if len(pending) >= rows_per_transaction:
                rewritten += await _rewrite(connection, job.partition_id, pending)
                pending = _Rewrite([], {})
                if after_transaction is not None:
                    after_transaction()
        if len(rows) < SCAN_ROWS:
            break
        position = int(rows[-1]["last_offset"]) + 1
    if pending:
        rewritten += await _rewrite(connection, job.partition_id, pending)
        if after_transaction is not None:
            after_transaction()
    return rewritten


async def _clean_end(connection: Any, job: CompactionJob) -> int:
    """The base offset of the first batch too young to clean (else the end)."""
    found = await connection.fetchval(
        sql.FIRST_NEWER_THAN_BEFORE, job.partition_id, job.start, job.end,
        job.now_ms - job.config.min_compaction_lag_ms)
    return job.end if found is None else min(job.end, int(found))


async def _scan(connection: Any, job: CompactionJob
                ) -> tuple[dict[bytes, int], TransactionCleaning]:
    """The highest offset of every key in [start, end) among records that may be a key's
    latest (committed or not transactional), and the fate of the transactions there."""
    latest: dict[bytes, int] = {}
    transactions = TransactionCleaning()
    undecided: list[tuple[BatchHeader, list[tuple[bytes, int]]]] = []  # transactional
    position = job.start
    while position < job.end:
        rows = await connection.fetch(sql.COMPACT_SCAN, job.partition_id, position, job.end,
                                      SCAN_ROWS)
        for row in rows:
            data = bytearray(row["payload"])
            patch_base_offset(data, row["base_offset"])
            header = read_header(data)
            if header.is_control and not header.is_transactional:
                continue
            records = decode_records(data)
            transactions.observe(header, records)
            if header.is_control:
                continue
            keyed = [(record.key, record.offset) for record in records
                     if record.key is not None]
            if header.is_transactional:
                undecided.append((header, keyed))  # its fate may come with a later marker
            else:
                _raise(latest, keyed)
        if len(rows) < SCAN_ROWS:
            break
        position = int(rows[-1]["last_offset"]) + 1
    for header, keyed in undecided:
        if transactions.counts_for_keys(header):
            _raise(latest, keyed)
    return latest, transactions


def _raise(latest: dict[bytes, int], keyed: list[tuple[bytes, int]]) -> None:
    for key, offset in keyed:
        if offset > latest.get(key, -1):
            latest[key] = offset


def _cleaned(row: Any, job: CompactionJob, latest: dict[bytes, int],
             transactions: TransactionCleaning) -> list[tuple[Any, ...]] | None:
    """The replacement rows of one batch row (none: the row goes); None when the batch
    keeps every record."""
    data = bytearray(row["payload"])
    patch_base_offset(data, row["base_offset"])
    header = read_header(data)
    drop_tombstones = header.max_timestamp_ms < job.now_ms - job.config.delete_retention_ms
    if header.is_control:
        return None if transactions.keeps_marker(header, latest, drop_tombstones) else []
    if transactions.is_aborted(header):
        return []
    records = decode_records(data)
    kept = [record for record in records if record.key is None or (
        latest.get(record.key) == record.offset
        and not (drop_tombstones and record.value is None))]
    if len(kept) == len(records):
        return None
    replacements: list[tuple[Any, ...]] = []
    for record in kept:
        delta = record.offset - row["base_offset"]
        sequence = NO_SEQUENCE if header.base_sequence < 0 else \
            (header.base_sequence + delta) & SEQUENCE_MAX
        payload = build_batch(
            [RecordData(record.key, record.value, record.headers, record.timestamp_ms)],
            base_offset=record.offset, compression=header.compression,
            producer_id=header.producer_id, producer_epoch=header.producer_epoch,
            base_sequence=sequence, is_transactional=header.is_transactional)
        replacements.append((job.partition_id, record.offset, record.offset, record.timestamp_ms,
                             header.producer_id, header.producer_epoch, sequence, 1,
                             row["write_id"], payload))
    return replacements


async def _rewrite(connection: Any, partition_id: int, pending: _Rewrite) -> int:
    """One transaction: delete the planned originals still there, insert their rows."""
    async with connection.transaction():
        await connection.execute(sql.PARTITION_WRITE_LOCK, partition_id)
        deleted = await connection.fetch(
            sql.DELETE_COMPACTED, partition_id, [base for base, _, _ in pending.originals],
            [write_id for _, write_id, _ in pending.originals],
            [count for _, _, count in pending.originals])
        rows = [replacement for found in deleted
                for replacement in pending.replacements[found["base_offset"]]]
        if rows:
            await connection.copy_records_to_table(
                "conveyor_log_batches", columns=sql.BATCH_COLUMNS, records=rows)
    return len(deleted)


class BackgroundCompaction:
    """One pass over a list of partitions at a time, as a task ``run_retention`` starts
    and does not wait for; a failure stops that partition's pass (the next one retries)."""

    def __init__(self, compact: Callable[[str, int], Awaitable[int]],
                 exists: Callable[[str, int], bool]) -> None:
        self._compact = compact
        self._exists = exists
        self._task: asyncio.Task[None] | None = None
        self._tasks = Supervisor("conveyor.storage.postgres-compaction")

    def start(self, partitions: list[tuple[str, int]]) -> None:
        if partitions and (self._task is None or self._task.done()):
            self._task = self._tasks.start(self._run(partitions), name="compaction")

    async def _run(self, partitions: list[tuple[str, int]]) -> None:
        for topic, partition in partitions:
            if not self._exists(topic, partition):
                continue  # deleted meanwhile
            try:
                await self._compact(topic, partition)
            except (OperatingError, asyncpg.PostgresError) as error:
                logger.warning("compaction of %s/%d stopped: %s", topic, partition, error)

    async def idle(self) -> None:
        if self._task is not None:
            await asyncio.wait([self._task])

    async def close(self) -> None:
        self._task = None
        await self._tasks.close(cancel=True)


__all__ = ["BackgroundCompaction", "CompactionJob", "compact_partition"]
