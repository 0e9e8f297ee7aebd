"""What the key-based cleaner decides about transactions, for every log backend.

Owns the rules Kafka's log cleaner applies to a partition holding transactional batches,
as a pure scan over its batches in offset order (``observe``), so that the file
backend (compaction.py) and any other backend's cleaner share one decision:

- records of an **aborted** transaction are dropped, whatever their keys, and never
  count as a key's latest record (an aborted record must not shadow a committed one);
- records of an **open** transaction (no marker yet) never count as a key's latest
  record either, and nothing at or past the first open offset is cleaned
  (``first_open_offset``: Kafka cleans only below the last stable offset);
- a **COMMIT marker** is removed only once no record of its transaction remains after
  cleaning and its segment is past ``delete.retention.ms`` (the caller's
  ``drop_tombstones``): removing it earlier would reopen the transaction for every
  reader and for the index rebuilt at the next start. A COMMIT that ended nothing (a
  second marker after a crash) has no records: removable on the same age.
- an **ABORT marker** stays (unlike Kafka's cleaner, which also rewrites the segment's
  aborted-transaction index): the broker's in-memory aborted index still lists the
  transaction to read_committed fetches, and a Kafka client drops the producer's
  batches from the listed first offset until it meets that ABORT marker, so without
  it the producer's later committed records would be dropped too. One small batch per
  aborted transaction remains; its records are gone.

A transaction is identified by its marker's offset once the marker is seen (Kafka's
transactions of one producer on one partition never overlap). Pure bookkeeping: no
files, no SQL, no broker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from conveyor.storage.control_batch import CONTROL_ABORT, CONTROL_COMMIT, control_type
from conveyor.storage.record_batch import BatchHeader, Record


@dataclass(slots=True)
class _Transaction:
    first_offset: int
    members: list[tuple[bytes | None, int]] = field(default_factory=list)  # (key, offset)
    ended_by: int | None = None  # COMMIT or ABORT once its marker is seen
    marker_offset: int = -1


class TransactionCleaning:
    """Feed every batch of a partition in offset order, then ask per batch."""

    def __init__(self) -> None:
        self._open: dict[int, _Transaction] = {}  # producer id -> its open transaction
        self._by_batch: dict[int, _Transaction] = {}  # data batch base offset -> its txn
        self._by_marker: dict[int, _Transaction] = {}  # marker offset -> what it ended

    def observe(self, header: BatchHeader, records: Sequence[Record]) -> None:
        """One batch of the log, in offset order, with its decoded records."""
        if not header.is_transactional or header.producer_id < 0:
            return
        if header.is_control:
            kind = control_type(records[0]) if records else None
            if kind not in (CONTROL_COMMIT, CONTROL_ABORT):
                return
            ended = self._open.pop(header.producer_id, None)
            if ended is None:
                ended = _Transaction(header.base_offset)  # a marker that ended nothing
            ended.ended_by, ended.marker_offset = kind, header.base_offset
            self._by_marker[header.base_offset] = ended
            return
        transaction = self._open.get(header.producer_id)
        if transaction is None:
            transaction = self._open[header.producer_id] = _Transaction(header.base_offset)
        transaction.members.extend((record.key, record.offset) for record in records)
        self._by_batch[header.base_offset] = transaction

    def first_open_offset(self) -> int | None:
        """First offset of the oldest transaction without a marker: clean below it only."""
        return min((t.first_offset for t in self._open.values()), default=None)

    def is_aborted(self, header: BatchHeader) -> bool:
        """Whether this data batch belongs to an aborted transaction: drop its records."""
        transaction = self._by_batch.get(header.base_offset) \
            if header.is_transactional and not header.is_control else None
        return transaction is not None and transaction.ended_by == CONTROL_ABORT

    def counts_for_keys(self, header: BatchHeader) -> bool:
        """Whether this data batch's records may be a key's latest (committed, or not
        transactional at all)."""
        if not header.is_transactional or header.is_control:
            return not header.is_control
        transaction = self._by_batch.get(header.base_offset)
        return transaction is None or transaction.ended_by == CONTROL_COMMIT

    def keeps_marker(self, header: BatchHeader, latest: Mapping[bytes, int],
                     drop_tombstones: bool) -> bool:
        """Whether a control batch must stay: some record of its transaction survives
        the cleaning (``latest``: each key's latest offset), or it is not old enough."""
        transaction = self._by_marker.get(header.base_offset)
        if transaction is None or not drop_tombstones:
            return True
        if transaction.ended_by == CONTROL_ABORT:
            return True  # ends the range read_committed clients are told of (above)
        return any(key is None or latest.get(key) == offset
                   for key, offset in transaction.members)


__all__ = ["TransactionCleaning"]
