"""A full disk through every protocol: each client gets its own error, the log gets one
line per condition (issue 9, the full-disk paragraph).

Goal: while the disk is full, Kafka produces answer KAFKA_STORAGE_ERROR, HTTP publishes
507, AMQP confirms are nacks and SQS sends ServiceUnavailable (a server fault SDKs
retry; it was InvalidParameterValue); reads keep working; nothing acknowledged before is
lost; the log says "disk full" once per partition with a count (AMQP used to write one
warning per message: 1,129 lines in a second) and "recovered" once space returns;
appends then resume. Method: a server whose file system raises ENOSPC on every write
while ``FullDisk.full`` is set (the OS file system otherwise), real protocol clients
(raw Kafka frames, httpx, aio-pika with publisher confirms, boto3).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from test_kafka_wire import RawClient, batch_of, partition_result, produce

from conveyor.protocols.kafka import error_codes
from conveyor.storage import fs as storage_fs
from conveyor.testing.server import run_broker

ATTEMPTS = 25


class FullDisk:
    """Switches every pwrite of the OS file system (and its subclasses, such as the
    server's measured one) to ENOSPC while ``full`` is set."""

    full = False


_real_pwrite = storage_fs.OsFileSystem.pwrite


def _pwrite(self: storage_fs.OsFileSystem, handle: int, data: bytes | bytearray | memoryview,
            position: int) -> None:
    if FullDisk.full:
        raise OSError(errno.ENOSPC, "No space left on device (test)")
    _real_pwrite(self, handle, data, position)


def one(value: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"value": value}]}


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FullDisk]]:
    monkeypatch.setattr(storage_fs.OsFileSystem, "pwrite", _pwrite)
    FullDisk.full = False
    yield FullDisk
    FullDisk.full = False


@pytest.mark.file_storage  # ENOSPC from the file system under segment files; PostgreSQL's
# "database full" is tests/storage's (docs/postgres.md: retriable storage errors)
async def test_full_disk_answers_each_protocol_and_logs_once(
    tmp_path: Path, full_disk: type[FullDisk], caplog: pytest.LogCaptureFixture,
) -> None:
    async with run_broker(tmp_path / "data",
                          listeners=("kafka", "amqp", "http", "sqs")) as server:
        await server.broker.create_topic("t", 1)
        sqs = boto3.client(
            "sqs", endpoint_url=f"http://127.0.0.1:{server.ports['sqs']}",
            region_name="us-east-1", aws_access_key_id="any", aws_secret_access_key="any",
            config=Config(retries={"max_attempts": 1}))
        url = (await asyncio.to_thread(sqs.create_queue, QueueName="s"))["QueueUrl"]
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports['http']}")
        amqp = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{server.ports['amqp']}/")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.ports["kafka"])
        kafka = RawClient(reader, writer)
        try:
            channel = await amqp.channel(publisher_confirms=True)
            queue = await channel.declare_queue("q", durable=True)
            kept = await http.post("/topics/t/messages", json=one("kept"))
            assert kept.status_code < 300, kept.text
            await channel.default_exchange.publish(aio_pika.Message(b"kept"), routing_key="q")

            full_disk.full = True
            with caplog.at_level(logging.INFO):
                for attempt in range(ATTEMPTS):
                    response = await kafka.call(produce("t", batch_of(2)), attempt + 1)
                    assert partition_result(response).error_code == \
                        error_codes.KAFKA_STORAGE_ERROR
                    answer = await http.post("/topics/t/messages", json=one("lost"))
                    assert answer.status_code == 507, answer.text
                    with pytest.raises(aio_pika.exceptions.DeliveryError):
                        await channel.default_exchange.publish(aio_pika.Message(b"nacked"),
                                                               routing_key="q")
                    with pytest.raises(ClientError) as refused:
                        await asyncio.to_thread(sqs.send_message, QueueUrl=url,
                                                MessageBody="lost")
                    assert refused.value.response["Error"]["Code"] == "ServiceUnavailable"
                # reads keep working
                read = await http.get("/topics/t/messages", params={"offset": 0, "limit": 10})
                assert read.status_code == 200, read.text
                assert [m["value"] for m in read.json()["messages"]] == ["kept"]
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            full_lines = [line for line in lines if "disk full" in line]
            assert len(full_lines) == 3, lines  # t/0, q/0, s/0: once each, not per message
            assert len(lines) == 3, lines  # nothing else warned per message

            full_disk.full = False
            caplog.clear()
            with caplog.at_level(logging.INFO):
                assert (await http.post("/topics/t/messages",
                                        json=one("after"))).status_code < 300
                await channel.default_exchange.publish(aio_pika.Message(b"after"),
                                                       routing_key="q")
            recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
            assert len(recovered) == 2 and all("failures" in line for line in recovered)
            await asyncio.to_thread(sqs.send_message, QueueUrl=url, MessageBody="after")
            got = []
            for _ in range(2):
                message = await queue.get(timeout=5)
                got.append(message.body)
                await message.ack()
            assert got == [b"kept", b"after"]  # acknowledged before the fault: kept
        finally:
            kafka.close()
            await amqp.close()
            await http.aclose()
