"""Goal: no fsync, fdatasync or SQLite checkpoint ever runs on the event-loop thread.

Method: wrap ``os.fsync``, ``os.fdatasync`` (every sync of storage/fs.py and of the
SQLite engine goes through them) and the engine's checkpoint to record the calling
thread; run a server in the test's own loop and drive through it, with real
clients, the paths that sync: Kafka produce (idempotent, acks=all) and fetch on a
topic whose segments roll, AMQP publish with confirms and consume with acks on a
work queue whose log start then advances, Kafka DeleteRecords, a compacted topic
compacting, a topic config change and a topic delete. Assert that syncs did happen
(the wrapper sees them) and that none of them ran on the loop's thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from conveyor.broker.types import Message
from conveyor.server.app import Server
from conveyor.storage.sqlite_engine import SqliteEngine
from conveyor.testing.server import run_broker

DEADLINE_S = 30
RECORD = b"x" * 1024


class SyncRecorder:
    """Every sync call: the thread it ran on and where it was called from."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []  # (what, thread id, stack)
        self._lock = threading.Lock()

    def wrap(self, what: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            stack = "".join(traceback.format_stack(limit=12)[:-1])
            with self._lock:
                self.calls.append((what, threading.get_ident(), stack))
            return function(*args, **kwargs)
        return recorded

    def on_thread(self, thread_id: int) -> dict[str, str]:
        """The distinct call sites (what + the innermost conveyor frames) -> one stack."""
        with self._lock:
            calls = [(what, stack) for what, ident, stack in self.calls if ident == thread_id]
        sites: dict[str, str] = {}
        for what, stack in calls:
            frames = [line.strip() for line in stack.splitlines()
                      if line.strip().startswith("File") and "/conveyor/" in line]
            sites.setdefault(f"{what} at {' <- '.join(reversed(frames[-3:]))}", stack)
        return sites


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncRecorder]:
    recorder = SyncRecorder()
    monkeypatch.setattr(os, "fsync", recorder.wrap("fsync", os.fsync))
    monkeypatch.setattr(os, "fdatasync", recorder.wrap("fdatasync", os.fdatasync))
    monkeypatch.setattr(SqliteEngine, "_run_checkpoint",
                        recorder.wrap("checkpoint", SqliteEngine._run_checkpoint))
    yield recorder


async def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def kafka_produce_fetch(server: Server, bootstrap: str) -> None:
    # small segments: the produce rolls several of them
    await server.broker.create_topic("rolled", 2, {"segment.bytes": "16384"})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=2)
    await producer.start()
    try:
        sent = [producer.send("rolled", RECORD, partition=index % 2) for index in range(120)]
        await asyncio.gather(*[await future for future in sent])
    finally:
        await producer.stop()
    assert server.broker.partition_size_bytes("rolled", 0) > 3 * 16384
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                fetch_max_wait_ms=50)
    await consumer.start()
    try:
        consumer.assign([TopicPartition("rolled", 0), TopicPartition("rolled", 1)])
        read = 0
        deadline = time.monotonic() + DEADLINE_S
        while read < 120:
            assert time.monotonic() < deadline, "fetch timed out"
            batches = await consumer.getmany(timeout_ms=200)
            read += sum(len(records) for records in batches.values())
        assert read == 120
    finally:
        await consumer.stop()
    # Kafka DeleteRecords moves the log start and deletes whole segments
    assert await server.broker.delete_records("rolled", 0, 40) == 40


async def amqp_publish_consume(server: Server) -> None:
    connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{server.ports['amqp']}/")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("jobs", durable=True)
        for index in range(100):
            await channel.default_exchange.publish(
                aio_pika.Message(RECORD + str(index).encode(),
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="jobs")
        received = 0
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                received += 1
                if received == 100:
                    break
    # work-queue retention: acked records go, the log start file is written
    topic = server.broker.queue_alias("jobs")
    await poll(lambda: server.broker.offsets(topic, 0).log_start_offset == 100,
               "the work queue's log start to pass the acked records")


async def compact_and_delete(server: Server) -> None:
    await server.broker.create_topic("compacted", 1, {
        "cleanup.policy": "compact", "segment.bytes": "4096", "min.compaction.lag.ms": "0"})
    info = server.broker.get_topic("compacted")
    for round_index in range(4):
        await server.broker.publish_records(info, [
            _message(f"key-{key}".encode(), f"{round_index}".encode() * 200)
            for key in range(8)])
    size_before = server.broker.partition_size_bytes("compacted", 0)
    await server.broker.run_retention()
    assert server.broker.partition_size_bytes("compacted", 0) < size_before
    await server.broker.alter_topic_config("compacted", {"retention.ms": "3600000"})
    await server.broker.delete_topic("compacted")
    await server.broker.delete_topic("rolled")


def _message(key: bytes, value: bytes) -> Message:
    return Message(value=value, key=key)


# the file LogStore's segment files and state.sqlite3: on PostgreSQL the database syncs
@pytest.mark.file_storage
async def test_no_sync_runs_on_the_event_loop(tmp_path: Path, recorder: SyncRecorder) -> None:
    loop_thread = threading.get_ident()
    async with run_broker(tmp_path / "data", listeners=("kafka", "amqp")) as server:
        started = len(recorder.calls)
        await kafka_produce_fetch(server, f"127.0.0.1:{server.ports['kafka']}")
        await amqp_publish_consume(server)
        await compact_and_delete(server)
        assert len(recorder.calls) > started + 10, "the workload made the syncs it should"
    on_loop = recorder.on_thread(loop_thread)
    assert not on_loop, "synced on the event loop:\n" + "\n".join(on_loop)
