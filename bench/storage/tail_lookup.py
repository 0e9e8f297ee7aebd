"""CPU of the storage steps of one Kafka e2e record, in the tree on PYTHONPATH (issue 17).

Prints one JSON line: ``find_batch`` of a tailing reader (the batch appended last, and
5 batches behind) in a segment of 100 B one-record batches on the real file system
(page cache; index_interval_bytes 4096, the default), ``read_header`` of one batch, and
``PartitionLog.write`` per batch (1 x 100 B and 16 x 1 KiB records) on a
MemoryFileSystem with fsync "never" (the write path without the disk). Medians, µs.
Run it for two trees in turn (base first, then this, then again) and compare.

Run:  PYTHONPATH=TREE .venv/bin/python -m bench.storage.tail_lookup [--label NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import tempfile
import time
import timeit

from conveyor.clock import SystemClock
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.record_batch import (
    RecordData,
    build_batch,
    patch_base_offset,
    read_header,
    split_batches,
)
from conveyor.storage.segment import Segment
from conveyor.testing.memory_fs import MemoryFileSystem

TIMESTAMP_MS = 1_700_000_000_000


def find_batch_us(lag: int) -> float:
    segment = Segment.create(OsFileSystem(), tempfile.mkdtemp(), 0, index_interval_bytes=4096,
                             created_ms=0)
    batch = build_batch([RecordData(None, b"x" * 100, (), TIMESTAMP_MS)])
    samples: list[float] = []
    for index in range(2_000):
        payload = bytearray(batch)
        patch_base_offset(payload, segment.next_offset)
        segment.append(payload, split_batches(payload))
        if index >= 200:  # past the first index entries
            offset, end = segment.next_offset - 1 - lag, segment.size_bytes
            seconds = timeit.timeit(functools.partial(segment.find_batch, offset, end),
                                    number=20)
            samples.append(seconds / 20 * 1e6)
    segment.close()
    return statistics.median(samples)


async def write_us(size: int, count: int) -> float:
    store = FileLogStore("/r", MemoryFileSystem(), SystemClock())
    await store.open()
    await store.create_partition("t", 0, LogConfig(fsync="never"))
    log = store.partition("t", 0)
    batch = build_batch([RecordData(None, b"x" * size, (), TIMESTAMP_MS)] * count)
    samples: list[float] = []
    for _ in range(7):
        started = time.process_time()
        for _ in range(1_000):
            log.write(batch)
        samples.append((time.process_time() - started) / 1_000 * 1e6)
    await store.close()
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="tree")
    options = parser.parse_args()
    batch = build_batch([RecordData(None, b"x" * 100, (), TIMESTAMP_MS)])
    result = {
        "label": options.label,
        "find_batch_tail_us": round(find_batch_us(0), 2),
        "find_batch_lag5_us": round(find_batch_us(5), 2),
        "read_header_us": round(timeit.timeit(lambda: read_header(batch), number=100_000) * 10,
                                2),
        "write_1x100B_us": round(asyncio.run(write_us(100, 1)), 1),
        "write_16x1KiB_us": round(asyncio.run(write_us(1024, 16)), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
