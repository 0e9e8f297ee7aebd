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
import threading
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


class GatedFileSystem(MemoryFileSystem):
    """Once ``armed``, the first fdatasync blocks (in its worker thread) until ``release``
    is set, then succeeds or, with ``fail_first``, fails with EIO; every later one runs
    at once."""

    def __init__(self, fail_first: bool = False) -> None:
        super().__init__()
        self.fail_first = fail_first
        self.armed = False
        self.first_entered = threading.Event()
        self.release = threading.Event()
        self.later_done = threading.Event()
        self._calls = 0
        self._lock = threading.Lock()

    def fdatasync(self, handle: int) -> None:
        if not self.armed:
            super().fdatasync(handle)
            return
        with self._lock:
            self._calls += 1
            first = self._calls == 1
        if not first:
            super().fdatasync(handle)
            self.later_done.set()
            return
        self.first_entered.set()
        assert self.release.wait(10), "the test never released the first fdatasync"
        if self.fail_first:
            raise OSError(errno.EIO, "Input/output error (simulated)")
        super().fdatasync(handle)


async def _wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


async def test_a_write_during_a_pass_is_synced_without_waiting_for_it_and_answered_in_order(
        clock: SimClock) -> None:
    """Goal: a write that comes while a pass runs goes into an fdatasync at once (the
    Kafka latency tail waited behind the running pass), yet is reported durable only
    after the earlier write. Method: the first pass's fdatasync blocks in its thread; a
    second append must get its own fdatasync done meanwhile, stay unanswered until the
    first is released, and both then land in write order."""
    fs = GatedFileSystem()
    store = FileLogStore("/data", fs, clock)
    await store.open()
    log = await store.create_partition("g", 0, LogConfig(fsync="always"))
    fs.armed = True
    answered: list[str] = []

    async def append(name: str) -> None:
        await log.append(make_batch([name.encode()]))
        answered.append(name)

    async with asyncio.TaskGroup() as group:
        group.create_task(append("first"))
        await _wait_for(fs.first_entered)
        group.create_task(append("second"))
        await _wait_for(fs.later_done)  # the second pass synced while the first runs
        assert barrier_for_loop().passes_running == 2
        assert answered == [] and log.high_watermark == 0
        fs.release.set()
    assert answered == ["first", "second"]
    assert log.high_watermark == 2
    await store.close()


async def test_a_failed_pass_fails_the_later_pass_of_its_partition_that_ended_first(
        clock: SimClock) -> None:
    """Goal: a write synced by a later pass is not durable when the earlier pass of its
    partition failed (fsyncgate: the failed pass's pages may be gone). Method: the first
    fdatasync blocks and then fails; the second append's own fdatasync succeeds first;
    both appends must fail and the high watermark must not move."""
    fs = GatedFileSystem(fail_first=True)
    store = FileLogStore("/data", fs, clock)
    await store.open()
    log = await store.create_partition("g", 0, LogConfig(fsync="always"))
    fs.armed = True
    first = asyncio.ensure_future(log.append(make_batch([b"first"])))
    await _wait_for(fs.first_entered)
    second = asyncio.ensure_future(log.append(make_batch([b"second"])))
    await _wait_for(fs.later_done)
    fs.release.set()
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(outcome, PartitionFailedError) for outcome in outcomes), outcomes
    assert log.high_watermark == 0
    await store.close()
