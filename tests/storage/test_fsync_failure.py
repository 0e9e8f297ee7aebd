"""A failed fdatasync stops the partition acknowledging (issue 9 item 7, "fsyncgate").

Method: MemoryFileSystem.fdatasync_errors makes the next fdatasync raise EIO; the
appends waiting on it, and every later one, fail with PartitionFailedError, the
failure is logged once, and a successful later fsync is never used to ack them.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from storage_helpers import make_batch

from conveyor.errors import PartitionFailedError, StorageError
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem


async def open_log(fs: MemoryFileSystem, clock: SimClock, config: LogConfig) -> FileLogStore:
    store = FileLogStore("/data", fs, clock)
    await store.open()
    await store.create_partition("t", 0, config)
    return store


async def test_failed_fdatasync_fails_the_group_and_every_later_append(
    clock: SimClock, caplog: pytest.LogCaptureFixture,
) -> None:
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="always"))
    log = store.partition("t", 0)
    await log.append(make_batch([b"durable"]))
    fs.fdatasync_errors = 1
    with caplog.at_level(logging.ERROR):
        results = await asyncio.gather(*(log.append(make_batch([b"%d" % i])) for i in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(result, PartitionFailedError) for result in results)
        assert isinstance(results[0], StorageError)  # each protocol's storage error
        assert log.failed is not None and log.high_watermark == 1
        for _ in range(3):  # the next fsync would succeed: still refused, not retried
            with pytest.raises(PartitionFailedError):
                await log.append(make_batch([b"later"]))
    assert caplog.text.count("fdatasync failed") == 1
    assert log.high_watermark == 1  # nothing written after the failure became visible
    await store.close()  # shutdown still completes


async def test_interval_sync_failure_marks_the_partition_failed(
    clock: SimClock, caplog: pytest.LogCaptureFixture,
) -> None:
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="interval", fsync_interval_ms=100))
    log = store.partition("t", 0)
    loop = asyncio.get_running_loop()
    attempted = asyncio.Event()
    fdatasync = fs.fdatasync

    def fdatasync_and_signal(handle: int) -> None:
        try:
            fdatasync(handle)
        finally:
            loop.call_soon_threadsafe(attempted.set)

    fs.fdatasync = fdatasync_and_signal  # type: ignore[method-assign]
    fs.fdatasync_errors = 1
    with caplog.at_level(logging.ERROR):
        await log.append(make_batch([b"x"]))
        await asyncio.sleep(0)  # let the interval task start its clock sleep
        clock.advance(100)
        await asyncio.wait_for(attempted.wait(), timeout=10)
        task = log.committer._interval_task
        assert task is not None
        await asyncio.wait_for(task, timeout=10)  # it ends (marked failed), does not die
    assert "fdatasync failed" in caplog.text
    with pytest.raises(PartitionFailedError):
        await log.append(make_batch([b"y"]))
    await store.close()


async def test_full_disk_is_logged_once_per_condition_with_a_count(
    clock: SimClock, caplog: pytest.LogCaptureFixture,
) -> None:
    fs = MemoryFileSystem()
    store = await open_log(fs, clock, LogConfig(fsync="always"))
    log = store.partition("t", 0)
    fs.free_bytes = 10
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            with pytest.raises(StorageError):
                await log.append(make_batch([b"x" * 100]))
        assert caplog.text.count("disk full writing") == 1
        assert log.faults.count(f"disk full writing {log.directory}") == 50
        fs.free_bytes = None
        await log.append(make_batch([b"fits"]))
    assert "recovered after 50 failures" in caplog.text
    await store.close()
