"""Goal: no SQS client can hold the listener's connections or memory without bound, and
publishers are pushed back (RequestThrottled) under the disk alarm while receives go on
(issue 9 item 3 and the disk alarm, for the listener added after them).

Method: raw TCP clients against a real server in this loop (run_broker) with short
configured limits, every close awaited; boto3 against a BrokerThread for the alarm.
Checks: a request whose body stops arriving gets 408 and a close after
request_timeout_ms; past connections_max a new connection is closed at once and
counted; unfinished bodies over the server-wide budget shed the largest holder with a
503 while a normal client is served; the disk alarm throttles SendMessage, not
ReceiveMessage, and lifts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from limits_support import closed_by_peer

from conveyor.server.app import Server
from conveyor.testing.server import BrokerThread, run_broker

SETTINGS = {"sqs": {"request_timeout_ms": 300, "connections_max": 4}}
LIST_QUEUES = b"Action=ListQueues&Version=2012-11-05"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("sqs",), settings=SETTINGS,
                          broker={"partial_request_bytes_max": 1 << 20}) as running:
        yield running


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.ports["sqs"])


def post(body: bytes, announced: int | None = None, close: bool = False) -> bytes:
    size = len(body) if announced is None else announced
    return (f"POST / HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n"
            f"{'Connection: close' + chr(13) + chr(10) if close else ''}"
            f"Content-Length: {size}\r\n\r\n").encode() + body


async def list_queues(server: Server) -> bytes:
    reader, writer = await connect(server)
    writer.write(post(LIST_QUEUES, close=True))
    answer = await closed_by_peer(reader)
    writer.close()
    return answer


async def test_unfinished_body_gets_408_after_request_timeout(server: Server) -> None:
    reader, writer = await connect(server)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(post(b"Action=ListQ", announced=100))
    answer = await closed_by_peer(reader)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"RequestTimeout" in answer, answer
    assert loop.time() - started >= 0.25


async def test_connections_beyond_the_maximum_are_refused_and_counted(server: Server) -> None:
    held = [await connect(server) for _ in range(4)]
    async with asyncio.timeout(5):
        await server.limits.gates["sqs"].until_open(4)
    reader, _ = await connect(server)
    assert await closed_by_peer(reader) == b""
    assert server.limits.gates["sqs"].refused == 1
    for _, writer in held:
        writer.close()
    async with asyncio.timeout(5):
        await server.limits.gates["sqs"].until_open(0)
    assert (await list_queues(server)).startswith(b"HTTP/1.1 200 ")


async def test_unfinished_bodies_over_the_budget_shed_the_largest(server: Server) -> None:
    small_reader, small = await connect(server)
    small.write(post(LIST_QUEUES[:10], announced=len(LIST_QUEUES), close=True))
    big_reader, big = await connect(server)
    big.write(post(b"b" * (1 << 20), announced=4 << 20))
    answer = await closed_by_peer(big_reader)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"ServiceUnavailable" in answer, answer
    assert server.limits.budget.shed == 1
    assert server.limits.budget.total <= 1 << 20
    assert (await list_queues(server)).startswith(b"HTTP/1.1 200 ")
    small.write(LIST_QUEUES[10:])  # the light one was not shed and completes
    assert (await closed_by_peer(small_reader)).startswith(b"HTTP/1.1 200 ")


def test_disk_alarm_throttles_sends_not_receives(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", listeners=("sqs",),
                      broker={"disk_free_limit_bytes": 1 << 62}) as server:
        sqs = boto3.client(
            "sqs", endpoint_url=f"http://127.0.0.1:{server.ports['sqs']}",
            region_name="us-east-1", aws_access_key_id="any", aws_secret_access_key="any",
            config=Config(retries={"max_attempts": 1}))
        url = sqs.create_queue(QueueName="alarm")["QueueUrl"]
        with pytest.raises(ClientError) as refused:
            sqs.send_message(QueueUrl=url, MessageBody="while the disk is low")
        assert refused.value.response["Error"]["Code"] == "RequestThrottled"
        assert sqs.receive_message(QueueUrl=url).get("Messages", []) == []  # reads go on
        alarm = server.server.disk_alarm
        alarm.limit_bytes = 0
        assert server.call_sync(alarm.check) is False
        sqs.send_message(QueueUrl=url, MessageBody="after")
        [message] = sqs.receive_message(QueueUrl=url)["Messages"]
        assert message["Body"] == "after"
