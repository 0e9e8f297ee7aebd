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
from conveyor.storage import sqlite_engine
from conveyor.storage.durability import barrier_for_loop
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.state_store import SqliteStateStore
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem

PARTITIONS = 16
DEADLINE_S = 30
ANSWERED_S = 5  # a fast partition's append, while another fdatasync hangs


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


class HeldFileSystem(MemoryFileSystem):
    """fdatasync of the handles in ``held`` blocks (in its worker thread) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[int] = set()
        self.release = threading.Event()
        self.holding = threading.Event()  # a held fdatasync has started
        self.synced: list[int] = []

    def fdatasync(self, handle: int) -> None:
        if handle in self.held:
            self.holding.set()
            assert self.release.wait(DEADLINE_S), "the test never released the fdatasync"
        super().fdatasync(handle)
        self.synced.append(handle)


async def test_a_partition_is_answered_without_waiting_for_a_slower_fsync_of_its_pass(
        clock: SimClock) -> None:
    """Partitions 0 and 1 are written in one turn, and 1's fdatasync hangs: 0 is still
    answered. Writes to either made meanwhile wait for the pass to end (one pass at a
    time for the partitions: they batch), then share one pass. The barrier's overlap
    is set beyond the test's deadline here (see the next test for it)."""
    fs = HeldFileSystem()
    store = await open_store(fs, clock)
    slow, fast = store.partition("t", 1), store.partition("t", 0)
    fs.held.add(slow.active_segment.handle)
    barrier = barrier_for_loop()
    barrier.overlap_after_s = DEADLINE_S * 2
    loop = asyncio.get_running_loop()
    try:
        held = loop.create_task(slow.append(make_batch([b"held"])))
        # same turn as the held one: same pass
        await asyncio.wait_for(fast.append(make_batch([b"first"])), ANSWERED_S)
        assert not held.done()
        assert fast.high_watermark == 1 and slow.high_watermark == 0
        passes = barrier.pass_count
        later = [loop.create_task(slow.append(make_batch([b"while held"]))),
                 loop.create_task(fast.append(make_batch([b"second"])))]
        for _ in range(10):  # the turns in which a new pass would have started
            await asyncio.sleep(0)
        assert barrier.pass_count == passes, "no pass starts while one still syncs"
        assert not any(task.done() for task in later)
    finally:
        fs.release.set()
    await asyncio.wait_for(asyncio.gather(held, *later), DEADLINE_S)
    assert barrier.pass_count == passes + 1, "the writes made meanwhile: one pass"
    assert slow.high_watermark == 2 and fast.high_watermark == 2
    assert fs.synced.count(slow.active_segment.handle) == 2
    await store.close()


async def test_writes_behind_a_slow_pass_get_a_pass_beside_it_answered_in_order(
        clock: SimClock) -> None:
    """Partition 1's first fdatasync hangs. Writes to 0 and 1 made behind it get a
    second pass beside it (``overlap_after_s`` is 0 here, so at once): 0's is answered
    while the first pass still hangs; 1's second write, whose own fdatasync returned,
    is answered only after its first (pass order). With two passes hanging, a write to
    a third partition waits for one of them to end (no third pass beside two)."""
    fs = HeldFileSystem()
    store = await open_store(fs, clock)
    slow, fast, other = (store.partition("t", partition) for partition in (1, 0, 2))
    slow_handle = slow.active_segment.handle
    barrier = barrier_for_loop()
    barrier.overlap_after_s = 0.0
    loop = asyncio.get_running_loop()
    try:
        fs.held.add(slow_handle)
        held = loop.create_task(slow.append(make_batch([b"held"])))
        await asyncio.wait_for(loop.run_in_executor(None, fs.holding.wait), ANSWERED_S)
        fs.held.discard(slow_handle)  # its next fdatasync returns at once
        passes, overlaps = barrier.pass_count, barrier.overlap_count
        behind = loop.create_task(slow.append(make_batch([b"behind"])))
        await asyncio.wait_for(fast.append(make_batch([b"beside"])), ANSWERED_S)
        assert barrier.overlap_count == overlaps + 1
        assert fs.synced.count(slow_handle) == 1, "its second fdatasync returned"
        assert not held.done() and not behind.done(), "answered in pass order"
        assert slow.high_watermark == 0 and fast.high_watermark == 1
        fs.held.add(fast.active_segment.handle)
        beside = loop.create_task(fast.append(make_batch([b"held beside"])))
        for _ in range(10):  # the turns in which the passes start
            await asyncio.sleep(0)
        assert barrier.pass_count == passes + 2, "a second pass beside the hanging one"
        waiting = loop.create_task(other.append(make_batch([b"third"])))
        for _ in range(10):
            await asyncio.sleep(0)
        assert barrier.pass_count == passes + 2, "no third pass beside two"
        assert not any(task.done() for task in (held, behind, beside, waiting))
    finally:
        fs.release.set()
    await asyncio.wait_for(asyncio.gather(held, behind, beside, waiting), DEADLINE_S)
    assert slow.high_watermark == 2 and fast.high_watermark == 2
    assert other.high_watermark == 1
    await store.close()


async def test_a_handle_forgotten_during_a_pass_is_still_synced_by_a_pass_beside_it(
        clock: SimClock) -> None:
    """A file closed while a pass syncs it (``forget``) may be skipped by that pass; its
    handle number, given to a new file and written, must be synced by the pass that
    takes it, also one started beside the first (the OS reuses descriptor numbers).
    Method: hang the first pass's fdatasync of the handle, forget the handle and write
    to it again (the number reused), let the overlap pass take it, release: two
    fdatasyncs of it, and the write survives a crash."""
    fs = HeldFileSystem()
    store = await open_store(fs, clock)
    log = store.partition("t", 3)
    handle = log.active_segment.handle
    barrier = barrier_for_loop()
    barrier.overlap_after_s = 0.0
    loop = asyncio.get_running_loop()
    try:
        fs.held.add(handle)
        first = loop.create_task(log.append(make_batch([b"first"])))
        await asyncio.wait_for(loop.run_in_executor(None, fs.holding.wait), ANSWERED_S)
        fs.held.discard(handle)
        overlaps = barrier.overlap_count
        log.committer.forget(handle)  # closed meanwhile, and the number reused:
        second = loop.create_task(log.append(make_batch([b"second"])))
        for _ in range(10):  # the turns in which the overlap pass starts
            await asyncio.sleep(0)
        assert barrier.overlap_count == overlaps + 1
    finally:
        fs.release.set()
    await asyncio.wait_for(asyncio.gather(first, second), DEADLINE_S)
    assert fs.synced.count(handle) == 2, "the pass beside it synced the reused handle"
    fs.crash(random.Random(11))
    reopened = FileLogStore("/data", fs, clock)
    await reopened.open()
    assert reopened.partition("t", 3).high_watermark == 2
    await reopened.close()


async def test_a_slow_wal_fdatasync_does_not_hold_a_log_append(
        clock: SimClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state COMMIT nobody awaited rides along with the next append's pass; while its
    WAL fdatasync hangs, the append is answered, the next append starts a pass of its
    own (the state store's jobs hold no pass), and a commit awaited meanwhile waits for
    a WAL fdatasync that starts after it."""
    fs = MemoryFileSystem()
    store = await open_store(fs, clock)
    state = SqliteStateStore(tmp_path / "state.sqlite3")
    await state.open()
    await state.commit()
    release, holding = threading.Event(), threading.Event()
    wal_syncs: list[int] = []

    def held_fdatasync(descriptor: int) -> None:
        holding.set()
        assert release.wait(DEADLINE_S), "the test never released the WAL fdatasync"
        wal_syncs.append(descriptor)

    monkeypatch.setattr(sqlite_engine, "fdatasync_descriptor", held_fdatasync)
    state.save_producer_checkpoint("t", 0, 1)  # committed at the end of this turn, unsynced
    await asyncio.sleep(0)  # that turn's COMMIT runs
    try:
        await asyncio.wait_for(store.partition("t", 0).append(make_batch([b"x"])), ANSWERED_S)
        # started by that pass, in a thread of its own (which may still be starting)
        assert await asyncio.to_thread(holding.wait, DEADLINE_S), \
            "the unsynced COMMIT rode along with the append's pass"
        assert not wal_syncs
        state.save_producer_checkpoint("t", 0, 2)
        awaited = asyncio.get_running_loop().create_task(state.commit())
        await asyncio.wait_for(store.partition("t", 1).append(make_batch([b"y"])), ANSWERED_S)
        assert not awaited.done()
    finally:
        release.set()
    await asyncio.wait_for(awaited, DEADLINE_S)
    assert len(wal_syncs) == 2, "the awaited commit had a WAL fdatasync of its own"
    assert await state.load_producer_checkpoints() == {("t", 0): 2}
    await state.close()
    await store.close()
