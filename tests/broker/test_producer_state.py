"""Goal: the idempotent producer drops retried batches, rejects gaps and stale epochs,
and keeps doing so after a restart, including one where the SQLite write was lost.

Method: append raw batches carrying producer id/epoch/sequence through the Broker
on the real FileLogStore; restart (and roll the state store back) between steps."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from broker_harness import BrokerHarness, seed

from conveyor.broker.broker import Broker
from conveyor.errors import (
    InvalidProducerEpochError,
    OutOfOrderSequenceError,
    UnknownProducerIdError,
)
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.memory_fs import MemoryFileSystem


def batch(producer_id: int, epoch: int, sequence: int, count: int = 1) -> bytes:
    records = [RecordData(None, f"{sequence}+{i}".encode(), (), 1000) for i in range(count)]
    return build_batch(records, producer_id=producer_id, producer_epoch=epoch,
                       base_sequence=sequence)


async def test_duplicate_returns_original_offsets(broker: Broker) -> None:
    await broker.create_topic("t")
    producer_id, epoch = await broker.init_producer_id()
    first = await broker.append_batch("t", 0, batch(producer_id, epoch, 0, 2))
    second = await broker.append_batch("t", 0, batch(producer_id, epoch, 2, 3))
    retry = await broker.append_batch("t", 0, batch(producer_id, epoch, 0, 2))
    assert (first.base_offset, first.last_offset) == (0, 1)
    assert (second.base_offset, second.last_offset) == (2, 4)
    assert retry.duplicate and (retry.base_offset, retry.last_offset) == (0, 1)
    assert broker.offsets("t", 0).high_watermark == 5


async def test_only_last_five_batches_are_remembered(broker: Broker) -> None:
    await broker.create_topic("t")
    producer_id, epoch = await broker.init_producer_id()
    for sequence in range(7):
        await broker.append_batch("t", 0, batch(producer_id, epoch, sequence))
    retry = await broker.append_batch("t", 0, batch(producer_id, epoch, 2))
    assert retry.duplicate and retry.base_offset == 2
    with pytest.raises(OutOfOrderSequenceError):
        await broker.append_batch("t", 0, batch(producer_id, epoch, 1))


async def test_gap_and_stale_epoch_rejected_nothing_appended(broker: Broker) -> None:
    await broker.create_topic("t")
    producer_id, epoch = await broker.init_producer_id()
    await broker.append_batch("t", 0, batch(producer_id, epoch, 0))
    with pytest.raises(OutOfOrderSequenceError):
        await broker.append_batch("t", 0, batch(producer_id, epoch, 5))
    # a newer epoch (same producer id) must restart at sequence 0 (Kafka's
    # ProducerAppendInfo), and then fences the old one
    with pytest.raises(OutOfOrderSequenceError):
        await broker.append_batch("t", 0, batch(producer_id, epoch + 1, 1))
    await broker.append_batch("t", 0, batch(producer_id, epoch + 1, 0))
    with pytest.raises(InvalidProducerEpochError):
        await broker.append_batch("t", 0, batch(producer_id, epoch, 1))
    with pytest.raises(UnknownProducerIdError):
        await broker.append_batch("t", 0, batch(producer_id + 100, 0, 0))
    assert broker.offsets("t", 0).high_watermark == 2


async def test_a_partition_without_state_for_the_producer_takes_any_sequence(
        broker: Broker) -> None:
    """As Kafka since KIP-360: no state for the producer in the partition (never written
    there, or forgotten), so its first batch there may carry any sequence; the next one
    must follow it."""
    await broker.create_topic("t", 2)
    producer_id, epoch = await broker.init_producer_id()
    await broker.append_batch("t", 0, batch(producer_id, epoch, 0, 3))
    first = await broker.append_batch("t", 1, batch(producer_id, epoch, 7))
    assert first.base_offset == 0 and not first.duplicate
    with pytest.raises(OutOfOrderSequenceError):
        await broker.append_batch("t", 1, batch(producer_id, epoch, 9))
    assert (await broker.append_batch("t", 1, batch(producer_id, epoch, 8))).base_offset == 1


async def test_transactional_id_bumps_epoch(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    first = await broker.init_producer_id("tx-1")
    second = await broker.init_producer_id("tx-1")
    other = await broker.init_producer_id()
    assert second == (first[0], first[1] + 1)
    assert other[0] != first[0]
    broker = await harness.restart()
    third = await broker.init_producer_id("tx-1")
    assert third == (first[0], first[1] + 2)
    fresh = await broker.init_producer_id()
    assert fresh[0] > other[0]


async def test_sequences_survive_restart(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("t", 2)
    producer_id, epoch = await broker.init_producer_id()
    await broker.append_batch("t", 1, batch(producer_id, epoch, 0, 4))
    broker = await harness.restart()
    retry = await broker.append_batch("t", 1, batch(producer_id, epoch, 0, 4))
    assert retry.duplicate and (retry.base_offset, retry.last_offset) == (0, 3)
    with pytest.raises(OutOfOrderSequenceError):
        await broker.append_batch("t", 1, batch(producer_id, epoch, 9))
    following = await broker.append_batch("t", 1, batch(producer_id, epoch, 4))
    assert following.base_offset == 4 and not following.duplicate


@pytest.mark.file_storage  # edits state.sqlite3 (SQLite-only fault injection)
async def test_rebuilt_from_log_when_state_write_was_lost(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("t")
    producer_id, epoch = await broker.init_producer_id()
    await broker.append_batch("t", 0, batch(producer_id, epoch, 0))
    await broker.close()
    # simulate a crash after the log fsync but before the SQLite commit of the sequences
    with sqlite3.connect(harness.directory / "state.sqlite3") as connection:
        connection.execute("DELETE FROM producer_sequences")
        connection.execute("DELETE FROM producer_checkpoints")
    connection.close()
    broker = await harness.start()
    retry = await broker.append_batch("t", 0, batch(producer_id, epoch, 0))
    assert retry.duplicate and retry.base_offset == 0
    assert broker.offsets("t", 0).high_watermark == 1


async def test_acked_appends_and_dedup_survive_a_crash(tmp_path: Path) -> None:
    """Crash (MemoryFileSystem keeps only fsynced bytes) instead of a clean close."""
    fs = MemoryFileSystem()
    fs.make_dirs(str(tmp_path))
    harness = BrokerHarness(tmp_path, fs)
    broker = await harness.start()
    await broker.create_topic("t")
    producer_id, epoch = await broker.init_producer_id()
    for sequence in range(3):
        await broker.append_batch("t", 0, batch(producer_id, epoch, sequence))
    assert broker._timer_task is not None
    broker._timer_task.cancel()  # the process dies: no close, no final checkpoint
    fs.crash(random.Random(seed()))
    await broker.state_store.close()
    broker = await harness.start()
    assert broker.offsets("t", 0).high_watermark == 3
    retry = await broker.append_batch("t", 0, batch(producer_id, epoch, 2))
    assert retry.duplicate and retry.base_offset == 2
    following = await broker.append_batch("t", 0, batch(producer_id, epoch, 3))
    assert following.base_offset == 3
    await harness.stop()
