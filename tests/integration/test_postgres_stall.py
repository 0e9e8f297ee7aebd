"""A stalled PostgreSQL: appends waiting for it are bounded, producers past the bound get
their protocol's retriable error at once, and nothing acknowledged is lost.

Method: a real server on ``--storage postgresql://`` with ``[broker]
storage_queue_appends_max = 3``; another connection holds the lock of every partition
head row, so each append transaction waits (the database stalls for it). Three HTTP
publishes fill the queue; more HTTP publishes get 503 with Retry-After and a Kafka
produce gets KAFKA_STORAGE_ERROR (56, retriable) while the lock is still held. Then the
lock goes: the three waiting publishes are acknowledged and are in the log; the
refused ones are not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from limits_support import closed_by_peer
from test_kafka_wire import RawClient, batch_of, partition_result, produce

from conveyor.storage.postgres_log import PostgresLogStore
from conveyor.storage.record_batch import iter_records
from conveyor.testing.server import run_broker

KAFKA_STORAGE_ERROR = 56
DEADLINE_S = 10


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def test_a_stalled_database_bounds_appends_and_refuses_the_rest_at_once(
        tmp_path: Path, postgres_dsn: str) -> None:
    async with run_broker(tmp_path / "data", listeners=("http", "kafka"), storage=postgres_dsn,
                          broker={"storage_queue_appends_max": 3}) as server:
        await server.broker.create_topic("t", 1)
        store = server.broker.log_store
        assert isinstance(store, PostgresLogStore)
        blocker = await asyncpg.connect(postgres_dsn)
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT * FROM conveyor_log_partitions FOR UPDATE")
        held: list[asyncio.Task[bytes]] = []
        writers: list[asyncio.StreamWriter] = []  # kept open (a collected writer closes)
        try:
            for index in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["http"])
                writer.write(post("/topics/t/messages", b"held-%d" % index))
                writers.append(writer)
                held.append(asyncio.ensure_future(closed_by_peer(reader, 30)))
            # the three appends wait for the database (no event tells when the listener
            # has handed them over: polled, with a deadline)
            async with asyncio.timeout(DEADLINE_S):
                while store.queued()[0] < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            for index in range(4):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["http"])
                writer.write(post("/topics/t/messages", b"refused-%d" % index))
                answer = await closed_by_peer(reader, DEADLINE_S)
                writer.close()
                assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
                assert b"Retry-After: 1" in answer and b"storage_error" in answer
            kafka = RawClient(*await asyncio.open_connection("127.0.0.1",
                                                             server.ports["kafka"]))
            try:
                answer = await kafka.call(produce("t", batch_of(2)), 1)
                assert partition_result(answer).error_code == KAFKA_STORAGE_ERROR
            finally:
                kafka.writer.close()
            assert store.queued()[0] == 3, store.queued()
            assert not any(task.done() for task in held)
        finally:
            await transaction.rollback()
            await blocker.close()
        for task in held:
            assert (await task).startswith(b"HTTP/1.1 20")
        for writer in writers:
            writer.close()
        assert server.broker.offsets("t", 0).high_watermark == 3
        data = (await store.read("t", 0, 0, 1 << 20)).read_bytes()
        assert sorted(record.value or b"" for record in iter_records(data)) == [
            b"held-0", b"held-1", b"held-2"]
