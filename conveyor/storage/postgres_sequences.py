"""ProducerSequences: idempotent-producer checks inside a PostgreSQL append transaction.

Owns the producer rows (``conveyor_log_producers``: epoch and last sequence per
partition and producer) of one append transaction. They are read after the
partition heads are locked, so the check and the append that follows it are one
atomic step even when several nodes append to the partition: a retry that reaches
another node (after a lost answer, a failover) is answered with the offsets of the
first write instead of being written twice. Same rules as the broker's in-memory
ProducerStates, which are Kafka's (ProducerAppendInfo): no row for the producer in
the partition accepts any sequence (KIP-360: its state may have gone with retention);
an older epoch is refused; a newer epoch must start at sequence 0 (else out of order);
in one epoch the next batch continues the last sequence, a batch equal to one of the
producer's five latest in the partition is a duplicate, anything else is out of order.
"""

from __future__ import annotations

from typing import Any

from conveyor.errors import InvalidProducerEpochError, OutOfOrderSequenceError
from conveyor.storage import postgres_log_schema as sql
from conveyor.storage.log_api import AppendInfo
from conveyor.storage.record_batch import BatchHeader

SEQUENCE_MAX = (1 << 31) - 1
Outcome = AppendInfo | InvalidProducerEpochError | OutOfOrderSequenceError | None


def _last_sequence(header: BatchHeader) -> int:
    return (header.base_sequence + header.record_count - 1) & SEQUENCE_MAX


def _next_sequence(sequence: int) -> int:
    return 0 if sequence == SEQUENCE_MAX else sequence + 1


class ProducerSequences:
    def __init__(self, states: dict[tuple[int, int], tuple[int, int]]) -> None:
        # (partition id, producer id) -> (epoch, last sequence), as of this transaction
        self._states = states
        self._changed: set[tuple[int, int]] = set()
        # (partition id, producer id) -> (epoch, base sequence, what it got) of the
        # batches accepted in this transaction (not in the table until COPY)
        self._accepted: dict[tuple[int, int], list[tuple[int, int, AppendInfo]]] = {}

    @classmethod
    async def load(cls, connection: Any,
                   wanted: list[tuple[int, int]]) -> ProducerSequences:
        """The rows of these (partition id, producer id) pairs (the heads are locked)."""
        if not wanted:
            return cls({})
        rows = await connection.fetch(sql.LOAD_PRODUCERS, [pid for pid, _ in wanted],
                                      [producer for _, producer in wanted])
        return cls({(row["partition_id"], row["producer_id"]):
                    (row["producer_epoch"], row["last_sequence"]) for row in rows})

    async def check(self, connection: Any, partition_id: int,
                    headers: list[tuple[int, BatchHeader]]) -> Outcome:
        """None: append and ``accept``; a duplicate AppendInfo; or the refusal."""
        first, last = headers[0][1], headers[-1][1]
        state = self._states.get((partition_id, first.producer_id))
        if state is None:  # no state for the producer here: any sequence starts it
            return None
        epoch, last_sequence = state
        if first.producer_epoch > epoch:  # a new epoch starts at sequence 0
            if first.base_sequence == 0:
                return None
            return OutOfOrderSequenceError(
                "a new producer epoch must start at sequence 0",
                producer_id=first.producer_id, epoch=first.producer_epoch,
                current_epoch=epoch, received=first.base_sequence)
        if first.producer_epoch < epoch:
            return InvalidProducerEpochError(
                "producer epoch is stale", producer_id=first.producer_id,
                epoch=first.producer_epoch, current_epoch=epoch)
        if first.base_sequence == _next_sequence(last_sequence):
            return None
        for accepted_epoch, base_sequence, info in self._accepted.get(
                (partition_id, first.producer_id), ()):
            if accepted_epoch == epoch and base_sequence == first.base_sequence:
                return AppendInfo(info.base_offset, info.last_offset, -1, info.max_timestamp_ms,
                                  duplicate=True)
        for row in await connection.fetch(sql.FIND_RETRIED, partition_id, first.producer_id):
            if row["producer_epoch"] == epoch and row["base_sequence"] == first.base_sequence:
                return AppendInfo(row["base_offset"],
                                  row["base_offset"] + _offsets_spanned(headers) - 1, -1,
                                  last.max_timestamp_ms, duplicate=True)
        return OutOfOrderSequenceError(
            "sequence gap or reordering", producer_id=first.producer_id,
            expected=_next_sequence(last_sequence), received=first.base_sequence)

    def accept(self, partition_id: int, headers: list[tuple[int, BatchHeader]],
               placed: AppendInfo) -> None:
        first, last = headers[0][1], headers[-1][1]
        key = (partition_id, first.producer_id)
        self._states[key] = (first.producer_epoch, _last_sequence(last))
        self._changed.add(key)
        self._accepted.setdefault(key, []).append(
            (first.producer_epoch, first.base_sequence, placed))

    async def save(self, connection: Any) -> None:
        if not self._changed:
            return
        keys = sorted(self._changed)
        await connection.execute(
            sql.SAVE_PRODUCERS, [pid for pid, _ in keys], [producer for _, producer in keys],
            [self._states[key][0] for key in keys], [self._states[key][1] for key in keys])


def _offsets_spanned(headers: list[tuple[int, BatchHeader]]) -> int:
    return sum(header.last_offset_delta + 1 for _, header in headers)
