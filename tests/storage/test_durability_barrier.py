"""The durability barrier: one pass per loop turn for every partition and the state store.

Method: partitions on a MemoryFileSystem (fdatasyncs counted) and a SQLite state store
on a real file, all on the test's loop (so they share its barrier); append to many
partitions and commit state in one turn, then count passes and fdatasyncs, check what
a crash keeps, and fail one partition's fdatasync to see that only it fails.
"""

from __future__ import annotations

import asyncio
import errno
import random
from pathlib import Path

import pytest
from storage_helpers import make_batch

from conveyor.errors import PartitionFailedError
from conveyor.storage.durability import barrier_for_loop
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.state_store import SqliteStateStore
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem

PARTITIONS = 16


async def open_store(fs: MemoryFileSystem, clock: SimClock) -> FileLogStore:
    store = FileLogStore("/data", fs, clock)
    await store.open()
    for partition in range(PARTITIONS):
        await store.create_partition("t", partition, LogConfig(fsync="always"))
    return store


async def test_one_turn_of_appends_to_many_partitions_and_a_commit_is_one_pass(
        clock: SimClock, tmp_path: Path) -> None:
    fs = MemoryFileSystem()
    store = await open_store(fs, clock)
    state = SqliteStateStore(tmp_path / "state.sqlite3")
    await state.open()
    await state.commit()
    barrier = barrier_for_loop()
    passes, syncs = barrier.pass_count, fs.fdatasync_count

    async def commit_state() -> None:
        state.save_producer_checkpoint("t", 0, 1)
        await state.commit()

    appends = [store.partition("t", partition).append(make_batch([b"%d" % index]))
               for partition in range(PARTITIONS) for index in range(3)]
    await asyncio.gather(*appends, commit_state())
    assert barrier.pass_count - passes == 1, "one pass for every partition and the state"
    assert fs.fdatasync_count - syncs == PARTITIONS, "one fdatasync per written file"
    assert all(store.partition("t", partition).high_watermark == 3
               for partition in range(PARTITIONS))
    assert await state.load_producer_checkpoints() == {("t", 0): 1}
    await state.close()
    await store.close()


async def test_acknowledged_appends_of_every_partition_survive_a_crash(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await open_store(fs, clock)
    await asyncio.gather(*(store.partition("t", partition).append(make_batch([b"kept"]))
                           for partition in range(PARTITIONS)))
    fs.crash(random.Random(3))
    reopened = FileLogStore("/data", fs, clock)
    await reopened.open()
    assert all(reopened.partition("t", partition).high_watermark == 1
               for partition in range(PARTITIONS))
    await reopened.close()


class FailingFileSystem(MemoryFileSystem):
    """fdatasync of one chosen handle fails with EIO."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: int | None = None

    def fdatasync(self, handle: int) -> None:
        if handle == self.failing:
            raise OSError(errno.EIO, "Input/output error (simulated)")
        super().fdatasync(handle)


async def test_a_failed_fdatasync_fails_only_its_partition(clock: SimClock) -> None:
    fs = FailingFileSystem()
    store = await open_store(fs, clock)
    fs.failing = store.partition("t", 5).active_segment.handle
    outcomes = await asyncio.gather(
        *(store.partition("t", partition).append(make_batch([b"x"]))
          for partition in range(PARTITIONS)), return_exceptions=True)
    failed = [partition for partition, outcome in enumerate(outcomes)
              if isinstance(outcome, BaseException)]
    assert failed == [5]
    assert isinstance(outcomes[5], PartitionFailedError)
    with pytest.raises(PartitionFailedError):
        await store.partition("t", 5).append(make_batch([b"later"]))
    await store.partition("t", 6).append(make_batch([b"later"]))
    assert store.partition("t", 6).high_watermark == 2
    await store.close()


async def test_a_rolled_segment_is_synced_with_its_directory_in_the_pass(
        clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = FileLogStore("/data", fs, clock)
    await store.open()
    log = await store.create_partition("r", 0, LogConfig(fsync="always", segment_bytes=200))
    for index in range(6):
        await log.append(make_batch([b"%d" % index * 40]))
    assert len(log.segments) > 2, "the appends rolled segments"
    fs.crash(random.Random(5))  # every acknowledged append's segment name must survive
    reopened = FileLogStore("/data", fs, clock)
    await reopened.open()
    assert reopened.partition("r", 0).high_watermark == 6
    await reopened.close()
