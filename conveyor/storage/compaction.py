"""Compaction: the key-based cleaner of ``compact`` partitions.

Keeps, for every key, only the record with the highest offset; a tombstone (null
value) is kept until its segment is older than ``delete_retention_ms`` and then
dropped. Records without a key are kept. Only sealed segments whose newest record is
older than ``min_compaction_lag_ms`` are rewritten; the active segment is read (its
keys shadow older ones) but never rewritten. Offsets never change; gaps appear.

Crash safety: each segment is rewritten to ``<base>.log.cleaned`` (fdatasync), renamed
to ``.log.swap`` (directory fsync), its index files removed, then renamed over
``.log`` (directory fsync). Recovery deletes a ``.cleaned`` (the original is intact)
and completes a ``.swap`` (the new content is complete and durable).
Batches kept whole are copied byte for byte; a batch losing records is rebuilt with
one batch per kept record, keeping the original offsets, timestamps and compression.

Transactions (the decisions in txn_cleaning.py, shared with other backends): records of
aborted transactions are dropped first and never shadow a key; records of open ones
never shadow a key either, and cleaning stops before the segment holding the first
open offset; a COMMIT marker goes once its transaction keeps no record and its segment
is past ``delete_retention_ms``, like a tombstone (ABORT markers stay: txn_cleaning.py).

Off the event loop: the key scan, the cleaning and the whole file replacement (with its
fdatasync and directory fsyncs) run in a worker thread over sealed segments, which no
append touches; only the swap of the new Segment into the log's list (and closing the
old handle, which readers used until then) happens on the loop. The partition's
``maintenance`` lock keeps retention, DeleteRecords and a topic delete out meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.storage import segment_files
from conveyor.storage.fs import FileSystem, in_thread
from conveyor.storage.record_batch import RecordData, build_batch, decode_records
from conveyor.storage.segment import Segment
from conveyor.storage.txn_cleaning import TransactionCleaning

if TYPE_CHECKING:
    from conveyor.storage.partition_log import PartitionLog


def scan(fs: FileSystem, segments: list[Segment]) -> tuple[dict[bytes, int], TransactionCleaning]:
    """Highest offset of every key in ``segments`` (committed or non-transactional
    records only), and the fate of their transactions (a worker thread may run this)."""
    latest: dict[bytes, int] = {}
    transactions = TransactionCleaning()
    for segment in segments:
        for position, header in segment.batch_headers():
            if header.is_control and not header.is_transactional:
                continue
            data = fs.pread(segment.handle, header.size_bytes, position)
            transactions.observe(header, decode_records(data))
    for segment in segments:
        for position, header in segment.batch_headers():
            if not transactions.counts_for_keys(header):
                continue
            data = fs.pread(segment.handle, header.size_bytes, position)
            for record in decode_records(data):
                if record.key is not None:
                    latest[record.key] = record.offset
    return latest, transactions


def clean_segment_bytes(
    fs: FileSystem, segment: Segment, latest: dict[bytes, int], drop_tombstones: bool,
    transactions: TransactionCleaning | None = None,
) -> bytes | None:
    """The cleaned content of ``segment``; None when nothing would change."""
    transactions = transactions if transactions is not None else TransactionCleaning()
    output = bytearray()
    changed = False
    for position, header in segment.batch_headers():
        data = fs.pread(segment.handle, header.size_bytes, position)
        if header.is_control:
            if transactions.keeps_marker(header, latest, drop_tombstones):
                output += data
            else:
                changed = True
            continue
        records = decode_records(data)
        if transactions.is_aborted(header):
            changed = True
            continue
        kept = [record for record in records if record.key is None or (
            latest.get(record.key) == record.offset
            and not (drop_tombstones and record.value is None))]
        if len(kept) == len(records):
            output += data
            continue
        changed = True
        for record in kept:
            output += build_batch(
                [RecordData(record.key, record.value, record.headers, record.timestamp_ms)],
                base_offset=record.offset, compression=header.compression,
                producer_id=header.producer_id, producer_epoch=header.producer_epoch,
                base_sequence=header.base_sequence, is_transactional=header.is_transactional)
    return bytes(output) if changed else None


def rewrite(fs: FileSystem, directory: str, segment: Segment, content: bytes) -> Segment:
    """In a worker thread: replace ``segment``'s log file with ``content`` through
    .cleaned -> .swap -> .log and return the replacement Segment (indexes rebuilt).
    ``segment``'s handle stays open and keeps reading the old bytes until the caller
    closes it."""
    live = segment.log_path
    cleaned, swap = live + segment_files.CLEANED_SUFFIX, live + segment_files.SWAP_SUFFIX
    handle = fs.open(cleaned, create=True)
    try:
        fs.truncate(handle, 0)
        fs.pwrite(handle, content, 0)
        fs.fdatasync(handle)
    finally:
        fs.close(handle)
    fs.rename(cleaned, swap)
    fs.fsync_dir(directory)
    for path in (segment_files.offset_index_path(directory, segment.base_offset),
                 segment_files.time_index_path(directory, segment.base_offset)):
        if fs.exists(path):
            fs.remove(path)
    fs.rename(swap, live)
    fs.fsync_dir(directory)
    replacement = Segment.open(fs, directory, segment.base_offset,
                               index_interval_bytes=segment.index_interval_bytes,
                               created_ms=segment.created_ms)
    replacement.rebuild(validate=False)
    replacement.write_indexes()
    return replacement


async def compact(log: PartitionLog, now_ms: int) -> int:
    """Clean every eligible sealed segment of ``log``; return how many were rewritten."""
    async with log.maintenance:
        if log.closed:
            return 0  # deleted while this pass waited
        config = log.config
        segments = list(log.segments)
        latest, transactions = await in_thread(scan, log.fs, segments)
        first_open = transactions.first_open_offset()
        rewritten = 0
        for index, segment in enumerate(segments[:-1]):
            if segment.max_timestamp_ms > now_ms - config.min_compaction_lag_ms:
                break
            if segment is log.visible_segment:
                break  # its bytes are not all durable yet
            if first_open is not None and segments[index + 1].base_offset > first_open:
                break  # holds an open transaction's records: Kafka cleans below the LSO only
            drop_tombstones = segment.max_timestamp_ms < now_ms - config.delete_retention_ms
            content = await in_thread(clean_segment_bytes, log.fs, segment, latest,
                                      drop_tombstones, transactions)
            if content is None:
                continue
            replacement = await in_thread(rewrite, log.fs, log.directory, segment, content)
            log.segments[log.segments.index(segment)] = replacement
            log.committer.forget(segment.handle)
            segment.close()
            rewritten += 1
        return rewritten


__all__ = ["compact"]
