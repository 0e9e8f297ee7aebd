"""Child process for test_kill9: append forever with fsync=always, print each ack.

Usage: python kill9_child.py <data-dir> <seed>. Each acknowledged record is printed as
``<offset> <crc32 of value>`` and flushed only after its append returned (durable).
"""

from __future__ import annotations

import asyncio
import random
import sys
import zlib

from conveyor.clock import SystemClock
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.record_batch import RecordData, build_batch

CONFIG = LogConfig(segment_bytes=64 * 1024, fsync="always", index_interval_bytes=1024)


async def appender(log_append: object, rng: random.Random) -> None:
    assert callable(log_append)
    while True:
        values = [rng.randbytes(rng.randint(1, 2_000)) for _ in range(rng.randint(1, 5))]
        batch = build_batch([RecordData(None, value, (), 0) for value in values])
        info = await log_append(batch)
        lines = "".join(f"{info.base_offset + index} {zlib.crc32(value)}\n"
                        for index, value in enumerate(values))
        sys.stdout.write(lines)
        sys.stdout.flush()


async def main(directory: str, seed: int) -> None:
    store = FileLogStore(directory, OsFileSystem(), SystemClock())
    await store.open()
    log = await store.create_partition("crash", 0, CONFIG)
    print(f"ready {log.high_watermark}", flush=True)
    await asyncio.gather(*(appender(log.append, random.Random(seed * 100 + task))
                           for task in range(8)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
