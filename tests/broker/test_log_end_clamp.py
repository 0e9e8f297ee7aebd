"""State past the recovered log end (issue 9, suspicion 1), driven directly.

Goal: after a crash under fsync=never loses the log's tail, every piece of state
that named the lost offsets is clamped to the recovered log end and the loss is
reported: shared-group start/ack rows, ordered-group committed offsets, and
idempotent-producer sequences. Method: a Broker on MemoryFileSystem whose crash
keeps only fsynced bytes (a seeded rng may keep a torn prefix of the rest, so the
test forces the loss with a rng whose every draw drops the whole unsynced tail).
"""

from __future__ import annotations

import random
from pathlib import Path

from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.broker.shared_groups import SharedGroups
from conveyor.broker.types import Message, QueueConfig
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.memory_fs import MemoryFileSystem


class DropEverything(random.Random):
    """A fault rng that keeps none of the unsynced bytes and flips nothing."""

    def randint(self, a: int, b: int) -> int:
        return a

    def random(self) -> float:
        return 0.999


async def crash(harness: BrokerHarness, fs: MemoryFileSystem) -> Broker:
    broker = harness.broker
    assert broker is not None and broker._timer_task is not None
    broker._timer_task.cancel()  # the process dies: no close, no final checkpoint
    await broker.state_store.close()  # every reported COMMIT is durable (WAL)
    fs.crash(DropEverything())
    return await harness.start()


def shared(broker: Broker) -> SharedGroups:
    assert isinstance(broker.shared_groups, SharedGroups)
    return broker.shared_groups


async def test_state_is_clamped_to_the_recovered_log_end(tmp_path: Path) -> None:
    fs = MemoryFileSystem()
    fs.make_dirs(str(tmp_path))
    harness = BrokerHarness(tmp_path, fs)
    broker = await harness.start()
    await shared(broker).declare_queue("q", QueueConfig(fsync="never"))
    producer_id, epoch = await broker.init_producer_id()
    lost = build_batch([RecordData(None, b"p0")], producer_id=producer_id,
                       producer_epoch=epoch, base_sequence=0)
    await broker.append_batch("q", 0, lost)
    await broker.publish("q", [Message(b"a"), Message(b"b")])
    taken = await shared(broker).acquire("q", "q", records_max=3)
    await shared(broker).ack([d.receipt for d in taken])  # durable in SQLite, not in the log
    await broker.commit_offsets("readers", {("q", 0): 3})

    broker = await crash(harness, fs)
    assert broker.offsets("q", 0).high_watermark == 0  # the whole tail was lost
    assert {(r.kind, r.log_end, r.state_offset) for r in broker.lost_ranges} >= {
        ("shared-group", 0, 3), ("ordered-group", 0, 3), ("producer", 0, 1)}
    committed = broker.fetch_offsets("readers", [("q", 0)])[("q", 0)]
    assert committed is not None and committed.offset == 0
    retry = await broker.append_batch("q", 0, lost)
    assert not retry.duplicate and retry.base_offset == 0  # appended again, not "duplicate"
    await broker.publish("q", [Message(b"c")])
    again = await shared(broker).acquire("q", "q", records_max=5)
    assert [d.value for d in again] == [b"p0", b"c"]  # the reused offsets are not acked

    broker = await harness.restart()  # the clamp was persisted
    assert broker.lost_ranges == []
    assert [d.value for d in await shared(broker).acquire("q", "q", records_max=5)] == [
        b"p0", b"c"]
    await harness.stop()


class FlipInFirstBatch(random.Random):
    """A fault rng that keeps every unsynced byte and flips one bit in the first batch."""

    def randint(self, a: int, b: int) -> int:
        return b

    def random(self) -> float:
        return 0.0

    def randrange(self, *args: int) -> int:  # type: ignore[override]
        return 70 * 8  # a byte inside the first record of the first unsynced batch


async def test_producer_batch_set_aside_by_recovery_is_not_a_duplicate(tmp_path: Path) -> None:
    """Found by the simulation (seed 364, fsync=never): a crash damaged the unsynced
    batch of an idempotent producer while a later batch survived; recovery set it aside,
    but its sequence stayed in the state and a retry was answered "duplicate"."""
    fs = MemoryFileSystem()
    fs.make_dirs(str(tmp_path))
    harness = BrokerHarness(tmp_path, fs)
    broker = await harness.start()
    await broker.create_topic("t", 1, {"conveyor.fsync": "never"})
    producer_id, epoch = await broker.init_producer_id()
    damaged = build_batch([RecordData(None, b"p0" * 20)], producer_id=producer_id,
                          producer_epoch=epoch, base_sequence=0)
    await broker.append_batch("t", 0, damaged)
    await broker.publish("t", [Message(b"after")])  # a valid batch behind it

    broker._timer_task.cancel()  # type: ignore[union-attr]
    await broker.state_store.close()  # the producer's sequence is durable in SQLite
    fs.crash(FlipInFirstBatch())
    broker = await harness.start()
    recovery = broker.log_store.recovery("t", 0)  # type: ignore[attr-defined]
    assert [first for first, _ in recovery.skipped_offsets] == [0]
    assert ("producer", 0, 1) in {(r.kind, r.log_end, r.state_offset)
                                  for r in broker.lost_ranges}
    retry = await broker.append_batch("t", 0, damaged)
    assert not retry.duplicate and retry.base_offset == 2  # appended again
    await harness.stop()
