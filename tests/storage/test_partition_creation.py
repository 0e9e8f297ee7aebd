"""Creating partitions keeps the event loop free (found by the long Kafka fuzz run).

Goal: the fsyncs of a new partition (directory, config, first segment) run off the event
loop, so a request creating thousands of partitions (a fuzzed CreatePartitions asked for
4096: 50 s with the loop held, every client of every protocol waiting) never stalls the
rest of the broker; concurrent creations of one partition make it once. Method: a
MemoryFileSystem whose directory fsync blocks until the test lets it go; while a
creation is blocked inside it, another partition's appends are served on the loop.
"""

from __future__ import annotations

import asyncio
import threading

from storage_helpers import SMALL, make_batch

from conveyor.storage.log_store import FileLogStore
from conveyor.testing.clock import SimClock
from conveyor.testing.memory_fs import MemoryFileSystem


class SlowDirectorySync(MemoryFileSystem):
    """Directory fsyncs wait for ``release`` while ``hold`` is set (a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def fsync_dir(self, path: str) -> None:
        if self.hold:
            self.entered.set()
            assert self.release.wait(10), "the test never released the fsync"
        super().fsync_dir(path)


async def test_partition_files_are_made_off_the_event_loop(clock: SimClock) -> None:
    fs = SlowDirectorySync()
    store = FileLogStore("/data", fs, clock)
    await store.open()
    busy = await store.create_partition("busy", 0, SMALL)
    fs.hold = True
    creating = asyncio.ensure_future(store.create_partition("new", 0, SMALL))
    again = asyncio.ensure_future(store.create_partition("new", 0, SMALL))
    assert await asyncio.to_thread(fs.entered.wait, 10)
    # the creation is stuck in an fsync; the loop still serves another partition
    info = await busy.append(make_batch([b"served meanwhile"]))
    assert info.base_offset == 0 and not creating.done()
    fs.hold = False
    fs.release.set()
    first, second = await creating, await again
    assert first is second is store.partition("new", 0)
    assert (await first.append(make_batch([b"x"]))).base_offset == 0
    await store.close()
