"""Goal: a node's in-memory producer window never refuses a batch the shared database
would take (issue 12, "fatal OUT_OF_ORDER_SEQUENCE_NUMBER after a cut-off node heals"
and "records written twice after a failover").

Method: a Broker on PostgreSQL in cluster mode (``shared_store``, as ClusterNode.open
sets it) and a second PostgresLogStore on the same database standing for another node.
The other node appends the producer's next batch (the partition moved there, or a retry
of a batch whose first answer was lost went there), so the broker's window is behind
the database. The broker must append the producer's following batch at the next offset
(the database's check under the head lock decides), not answer OUT_OF_ORDER_SEQUENCE:
librdkafka makes that answer fatal for the head-of-line batch, and for a later batch it
bumps the epoch and re-sends the batches before it, writing a committed one twice.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conveyor.broker.broker import Broker
from conveyor.errors import OutOfOrderSequenceError
from conveyor.storage.log_api import AppendInfo, AppendRequest
from conveyor.storage.postgres_log import PostgresLogStore
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.storage.state_store import SqliteStateStore
from conveyor.testing.clock import SimClock


def batch(producer_id: int, epoch: int, sequence: int, count: int = 1) -> bytes:
    records = [RecordData(None, f"v{sequence + i}".encode(), (), 1000) for i in range(count)]
    return build_batch(records, producer_id=producer_id, producer_epoch=epoch,
                       base_sequence=sequence)


async def test_a_stale_window_defers_to_the_database(postgres_dsn: str,
                                                      tmp_path: Path) -> None:
    clock = SimClock()
    broker = Broker(PostgresLogStore(postgres_dsn, clock, random.Random(1), chunk_offsets=8),
                    SqliteStateStore(tmp_path / "state.sqlite3"), clock, random.Random(2))
    await broker.open()
    broker.producers.shared_store = True
    other = PostgresLogStore(postgres_dsn, clock, random.Random(3), chunk_offsets=8)
    try:
        await broker.create_topic("t")
        await other.open()
        producer_id, epoch = await broker.init_producer_id()
        first = await broker.append_batch("t", 0, batch(producer_id, epoch, 0, 2))
        assert (first.base_offset, first.last_offset) == (0, 1)
        # the other node writes the producer's next batch: this broker never saw it
        (moved,) = await other.append([AppendRequest("t", 0, batch(producer_id, epoch, 2, 3),
                                                     check_sequences=True)])
        assert isinstance(moved, AppendInfo) and not moved.duplicate
        assert (moved.base_offset, moved.last_offset) == (2, 4)
        # the producer's following batch reaches this broker: the next one, appended
        following = await broker.append_batch("t", 0, batch(producer_id, epoch, 5))
        assert not following.duplicate and following.base_offset == 5
        # a retry of the batch the other node wrote: its first offsets, not a second copy
        retry = await broker.append_batch("t", 0, batch(producer_id, epoch, 2, 3))
        assert retry.duplicate and (retry.base_offset, retry.last_offset) == (2, 4)
        # a retry of one this broker wrote itself (its window answers)
        again = await broker.append_batch("t", 0, batch(producer_id, epoch, 0, 2))
        assert again.duplicate and (again.base_offset, again.last_offset) == (0, 1)
        # a real gap is still refused, by the database
        with pytest.raises(OutOfOrderSequenceError):
            await broker.append_batch("t", 0, batch(producer_id, epoch, 9))
        # as is a request whose own batches skip a sequence
        gapped = build_batch([RecordData(None, b"x", (), 1000)], producer_id=producer_id,
                             producer_epoch=epoch, base_sequence=6)
        gapped += build_batch([RecordData(None, b"y", (), 1000)], producer_id=producer_id,
                              producer_epoch=epoch, base_sequence=8)
        with pytest.raises(OutOfOrderSequenceError):
            await broker.append_batch("t", 0, gapped)
        assert broker.offsets("t", 0).high_watermark == 6
    finally:
        await other.close()
        await broker.close()
