"""Group commit: concurrent appends share fdatasyncs; acks wait for durability; policies.

Method: run appends on a MemoryFileSystem, count fdatasync calls, and check what a crash
keeps: after an ``always`` ack, the bytes are durable.
"""

from __future__ import annotations

import asyncio
import random

from storage_helpers import make_batch, values_of

from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem


async def open_log(fs: MemoryFileSystem, clock: SimClock, config: LogConfig) -> FileLogStore:
    store = FileLogStore("/data", fs, clock)
    await store.open()
    await store.create_partition("t", 0, config)
    return store


async def test_one_loop_turn_of_appends_shares_one_fdatasync(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="always"))
    log = store.partition("t", 0)
    before = fs.fdatasync_count
    results = await asyncio.gather(*(log.append(make_batch([b"%d" % i])) for i in range(100)))
    assert fs.fdatasync_count - before == 1
    assert sorted(result.base_offset for result in results) == list(range(100))
    assert log.high_watermark == 100


async def test_appends_during_a_sync_form_the_next_group(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="always"))
    log = store.partition("t", 0)
    before = fs.fdatasync_count
    first = [asyncio.ensure_future(log.append(make_batch([b"a"]))) for _ in range(10)]
    for _ in range(3):  # let the first group write and its sync start
        await asyncio.sleep(0)
    second = [asyncio.ensure_future(log.append(make_batch([b"b"]))) for _ in range(10)]
    await asyncio.gather(*first, *second)
    assert fs.fdatasync_count - before == 2


async def test_acknowledged_appends_survive_a_crash(clock: SimClock) -> None:
    rng = random.Random(7)
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="always"))
    log = store.partition("t", 0)
    for index in range(20):
        await log.append(make_batch([b"%d" % index]))
    unacknowledged = asyncio.ensure_future(log.append(make_batch([b"maybe"])))
    fs.crash(rng)
    unacknowledged.cancel()
    reopened = FileLogStore("/data", fs, clock)
    await reopened.open()
    data = reopened.partition("t", 0).read(0, 10**6).read_bytes()
    assert values_of(data)[:20] == [(i, b"%d" % i) for i in range(20)]


async def test_reads_do_not_see_unsynced_bytes(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="always"))
    log = store.partition("t", 0)
    await log.append(make_batch([b"durable"]))
    pending = asyncio.ensure_future(log.append(make_batch([b"pending"])))
    await asyncio.sleep(0)
    assert log.log_end_offset == 2 and log.high_watermark == 1
    assert values_of(log.read(0, 10**6).read_bytes()) == [(0, b"durable")]
    await pending
    assert log.high_watermark == 2


async def test_never_and_interval_policies(clock: SimClock) -> None:
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="never"))
    log = store.partition("t", 0)
    before = fs.fdatasync_count
    for _ in range(5):
        await log.append(make_batch([b"x"]))
    assert fs.fdatasync_count == before and log.high_watermark == 5
    await store.update_config("t", 0, LogConfig(fsync="interval", fsync_interval_ms=100))
    before = fs.fdatasync_count  # the config file itself is synced
    # The interval sync runs in a worker thread: signal the loop when it happens.
    loop = asyncio.get_running_loop()
    synced = asyncio.Event()
    fdatasync = fs.fdatasync

    def fdatasync_and_signal(handle: int) -> None:
        fdatasync(handle)
        loop.call_soon_threadsafe(synced.set)

    fs.fdatasync = fdatasync_and_signal  # type: ignore[method-assign]
    await log.append(make_batch([b"y"]))
    await asyncio.sleep(0)  # let the interval task start its clock sleep
    assert fs.fdatasync_count == before
    clock.advance(100)
    await asyncio.wait_for(synced.wait(), timeout=10)
    assert fs.fdatasync_count == before + 1
    await store.close()
    assert fs.durable_bytes(log.active_segment.log_path) != b""


async def test_deleting_segments_costs_no_fdatasync_on_the_loop(clock: SimClock) -> None:
    """Retention deletes whole segments below the log start: their records were durable
    before anyone could settle them, so forgetting a segment's handle syncs nothing,
    and the partition keeps acknowledging appends afterwards."""
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="interval", fsync_interval_ms=60_000,
                                                segment_bytes=200))
    log = store.partition("t", 0)
    for i in range(20):
        await log.append(make_batch([b"%d" % i]))  # interval: dirty, never synced yet
    assert len(log.segments) > 2
    before = fs.fdatasync_count
    await log.delete_before(15)
    assert fs.fdatasync_count == before + 1  # the log start file's own; none per segment
    assert log.log_start_offset == 15 and len(log.segments) < 20
    log.config = LogConfig(fsync="always", segment_bytes=200)
    log.committer.policy = "always"
    result = await log.append(make_batch([b"after"]))
    assert result.base_offset == 20 and log.committer.failed is None
    await store.close()
