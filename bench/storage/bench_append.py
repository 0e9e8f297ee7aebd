"""Append throughput of FileLogStore next to the raw disk, measured in the same run.

Run: ``python -m bench.storage.bench_append [--dir PATH] [--seconds S]``.
Measures (1) raw sequential write + one fdatasync bandwidth, (2) raw 1 KiB
pwrite+fdatasync rate, (3) PartitionLog.append with 1 KiB records in batches of 1, 100
and 1000 under each fsync policy, with several appends in flight so group commit can
share fdatasyncs. Writes bench/results/storage.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from conveyor.clock import SystemClock
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_store import FileLogStore, FsyncPolicy, LogConfig
from conveyor.storage.record_batch import RecordData, build_batch

RECORD_BYTES = 1024
BATCH_SIZES = (1, 100, 1000)
POLICIES = ("always", "interval", "never")
IN_FLIGHT = 8
MIB = 1024 * 1024
RESULTS = Path(__file__).resolve().parents[1] / "results" / "storage.json"


def raw_sequential_bandwidth(directory: str, total_bytes: int) -> float:
    """MiB/s of 1 MiB sequential writes followed by a single fdatasync."""
    path = os.path.join(directory, "raw-sequential")
    chunk = os.urandom(MIB)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    started = time.perf_counter()
    for position in range(0, total_bytes, MIB):
        os.pwrite(descriptor, chunk, position)
    os.fdatasync(descriptor)
    elapsed = time.perf_counter() - started
    os.close(descriptor)
    os.remove(path)
    return total_bytes / MIB / elapsed


def raw_small_sync_rate(directory: str, seconds: float) -> float:
    """Appends per second of 1 KiB pwrite + fdatasync, one at a time."""
    path = os.path.join(directory, "raw-small")
    record = os.urandom(RECORD_BYTES)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        os.pwrite(descriptor, record, count * RECORD_BYTES)
        os.fdatasync(descriptor)
        count += 1
    elapsed = time.perf_counter() - started
    os.close(descriptor)
    os.remove(path)
    return count / elapsed


async def log_append_rate(directory: str, batch_size: int, policy: str,
                          seconds: float) -> dict[str, float]:
    """Records/s and MiB/s of concurrent appends of one prebuilt batch to one partition."""
    store = FileLogStore(directory, OsFileSystem(), SystemClock())
    await store.open()
    config = LogConfig(fsync=cast(FsyncPolicy, policy), fsync_interval_ms=50,
                       segment_bytes=256 * MIB)
    log = await store.create_partition(f"bench-{batch_size}-{policy}", 0, config)
    value = os.urandom(RECORD_BYTES)
    batch = build_batch([RecordData(None, value, (), 0)] * batch_size)
    appended = 0
    started = time.perf_counter()
    deadline = started + seconds

    async def producer() -> None:
        nonlocal appended
        while time.perf_counter() < deadline:
            await log.append(batch)
            appended += 1

    await asyncio.gather(*(producer() for _ in range(IN_FLIGHT)))
    await store.close()
    elapsed = time.perf_counter() - started
    shutil.rmtree(os.path.join(directory, f"bench-{batch_size}-{policy}-0"))
    return {"records_per_s": appended * batch_size / elapsed,
            "mib_per_s": appended * len(batch) / MIB / elapsed,
            "fdatasync_groups": float(log.committer.sync_count)}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each case")
    arguments = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="conveyor-bench-", dir=arguments.dir)
    try:
        raw_mib_per_s = raw_sequential_bandwidth(directory, 256 * MIB)
        raw_sync_rate = raw_small_sync_rate(directory, arguments.seconds)
        cases = []
        for batch_size in BATCH_SIZES:
            for policy in POLICIES:
                result = asyncio.run(log_append_rate(directory, batch_size, policy,
                                                     arguments.seconds))
                cases.append({"batch_records": batch_size, "fsync": policy, **result})
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    report = {
        "commit": commit(), "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "record_bytes": RECORD_BYTES, "appends_in_flight": IN_FLIGHT,
        "raw_sequential_write_fdatasync_mib_per_s": raw_mib_per_s,
        "raw_1kib_append_fdatasync_per_s": raw_sync_rate, "cases": cases,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    raw = report["raw_sequential_write_fdatasync_mib_per_s"]
    print(f"raw sequential write + fdatasync: {raw:8.1f} MiB/s")
    print(f"raw 1 KiB pwrite + fdatasync:     {report['raw_1kib_append_fdatasync_per_s']:8.0f} /s")
    print(f"{'batch':>6} {'fsync':>9} {'records/s':>12} {'MiB/s':>9} {'% raw':>6} {'syncs':>7}")
    for case in report["cases"]:
        print(f"{case['batch_records']:>6} {case['fsync']:>9} {case['records_per_s']:>12.0f} "
              f"{case['mib_per_s']:>9.1f} {100 * case['mib_per_s'] / raw:>6.0f} "
              f"{case['fdatasync_groups']:>7.0f}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
