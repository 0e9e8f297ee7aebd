"""Child process for test_kill9: append forever with fsync=always, print each ack.

Usage: python kill9_child.py <data-dir> <seed> [<storage>]. ``storage`` is ``file:``
(the default: FileLogStore under <data-dir>) or a ``postgresql://`` URL
(PostgresLogStore). Each acknowledged record is printed as ``<offset> <crc32 of value>``
and flushed only after its append returned (durable).
"""

from __future__ import annotations

import asyncio
import random
import sys
import zlib

from conveyor.clock import SystemClock
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_api import AppendInfo, AppendRequest, LogStore
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.record_batch import RecordData, build_batch

CONFIG = LogConfig(segment_bytes=64 * 1024, fsync="always", index_interval_bytes=1024)


def open_store(directory: str, storage: str) -> LogStore:
    if storage.startswith("postgresql://"):
        from conveyor.storage.postgres_log import PostgresLogStore

        return PostgresLogStore(storage, SystemClock())
    return FileLogStore(directory, OsFileSystem(), SystemClock())


async def appender(store: LogStore, rng: random.Random) -> None:
    while True:
        values = [rng.randbytes(rng.randint(1, 2_000)) for _ in range(rng.randint(1, 5))]
        batch = build_batch([RecordData(None, value, (), 0) for value in values])
        [info] = await store.append([AppendRequest("crash", 0, batch)])
        if not isinstance(info, AppendInfo):
            continue  # refused: never acknowledged
        lines = "".join(f"{info.base_offset + index} {zlib.crc32(value)}\n"
                        for index, value in enumerate(values))
        sys.stdout.write(lines)
        sys.stdout.flush()


async def main(directory: str, seed: int, storage: str) -> None:
    store = open_store(directory, storage)
    await store.open()
    await store.create_partition("crash", 0, CONFIG)
    print(f"ready {store.offsets('crash', 0).high_watermark}", flush=True)
    await asyncio.gather(*(appender(store, random.Random(seed * 100 + task))
                           for task in range(8)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "file:"))
