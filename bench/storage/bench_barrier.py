"""fsyncs per acknowledgement across many partitions: the durability barrier's bench.

Run: ``python bench/storage/bench_barrier.py [--seconds S] [--partitions 1,16,64]
[--writers N] [--state]`` (a plain script, not ``-m``: run it with ``PYTHONPATH`` at
another checkout to measure that checkout's storage with the same code).

In one process and one uvloop loop: a FileLogStore over the real disk and a SQLite
state store, ``--partitions`` partitions with ``--writers`` concurrent writers each;
a writer appends one batch of one 1 KiB record (fsync=always) and waits for it to be
durable, like a Kafka acks=all produce; with ``--state`` it then writes a state row
and awaits the state store's commit, like an idempotent producer's checkpoint or a
shared-group ack that must be durable. Counts every ``os.fdatasync``/``os.fsync``
(wrapped; they run in worker threads), the process's CPU time (all threads) and the
records acknowledged. Prints one JSON line per case and writes
``bench/results/storage_barrier.json`` when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvloop

from conveyor.clock import SystemClock
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.storage.state_store import SqliteStateStore

RECORD_BYTES = 1024


class SyncCounter:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def install(self) -> None:
        for name in ("fsync", "fdatasync"):
            original = getattr(os, name)

            def counted(descriptor: int, _original: Any = original) -> None:
                with self._lock:
                    self.count += 1
                _original(descriptor)
            setattr(os, name, counted)


async def run_case(directory: str, partitions: int, writers: int, seconds: float,
                   state: bool, counter: SyncCounter) -> dict[str, Any]:
    store = FileLogStore(os.path.join(directory, "logs"), OsFileSystem(), SystemClock())
    await store.open()
    state_store = SqliteStateStore(os.path.join(directory, "state.sqlite3"))
    await state_store.open()
    config = LogConfig(fsync="always", segment_bytes=256 << 20)
    logs = [await store.create_partition("bench", partition, config)
            for partition in range(partitions)]
    batch = build_batch([RecordData(None, os.urandom(RECORD_BYTES), (), 0)])
    acknowledged = 0
    deadline = 0.0

    async def writer(partition: int) -> None:
        nonlocal acknowledged
        log = logs[partition]
        offset = 0
        while time.perf_counter() < deadline:
            info = await log.append(batch)
            offset = info.last_offset + 1
            if state:
                state_store.save_producer_checkpoint("bench", partition, offset)
                await state_store.commit()
            acknowledged += 1

    syncs_before = counter.count
    cpu_before = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(writer(partition) for partition in range(partitions)
                           for _ in range(writers)))
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_before
    syncs = counter.count - syncs_before
    await store.close()
    await state_store.close()
    return {
        "partitions": partitions, "writers_per_partition": writers, "state_commit": state,
        "acks_per_s": round(acknowledged / elapsed), "fsyncs_per_s": round(syncs / elapsed),
        "fsyncs_per_ack": round(syncs / max(acknowledged, 1), 3),
        "cpu_pct": round(100 * cpu_s / elapsed, 1),
        "cpu_us_per_ack": round(1e6 * cpu_s / max(acknowledged, 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--partitions", default="1,16,64")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writers per partition")
    parser.add_argument("--state", action="store_true", help="a state commit after each append")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None, help="append the cases to this JSON file")
    arguments = parser.parse_args()
    counter = SyncCounter()
    counter.install()
    import conveyor
    source = str(Path(conveyor.__file__).resolve().parents[1])
    revision = subprocess.run(["git", "-C", source, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    cases = []
    for partitions in (int(item) for item in arguments.partitions.split(",")):
        directory = tempfile.mkdtemp(prefix="conveyor-barrier-", dir=arguments.dir)
        try:
            case = uvloop.run(run_case(directory, partitions, arguments.writers,
                                       arguments.seconds, arguments.state, counter))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        case.update(source=source, commit=revision, load=os.getloadavg()[0])
        print(json.dumps(case), flush=True)
        cases.append(case)
    if arguments.out:
        path = Path(arguments.out)
        existing = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(existing + cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
