"""Goal: no Kafka client can hold the listener's connections or memory without bound.

Method: raw TCP clients against a real server (run_broker in this loop for the waits;
a real ``conveyor serve`` child for memory, its RSS read from /proc), short configured
timeouts, and every close awaited (never slept for). Checks: a partial frame is closed
after request_timeout_ms; an idle connection after idle_timeout_ms; past
connections_max a new connection is closed at once and counted while the others are
served; five connections sending the start of 99 MiB frames stay within the
server-wide partial-request budget; a consumer that stops reading a 40 MiB fetch does
not pin it in memory; under the disk alarm a produce is answered only once it clears,
while other requests are served.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kio.schema.api_versions.v3.request import ApiVersionsRequest
from kio.schema.fetch.v11.request import FetchPartition, FetchRequest, FetchTopic
from limits_support import (
    closed_by_peer,
    kafka_frame_start,
    rss_bytes,
)
from test_kafka_wire import RawClient, batch_of, parse, partition_result, produce, request_frame

from conveyor.server.app import Server
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.server import BrokerProcess, run_broker

MIB = 1 << 20
VERSIONS = ApiVersionsRequest(client_software_name="raw", client_software_version="1")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    settings = {"kafka": {"request_timeout_ms": 300, "idle_timeout_ms": 600,
                          "connections_max": 3}}
    async with run_broker(tmp_path / "data", listeners=("kafka",), settings=settings) as running:
        yield running


async def connect(server: Server) -> RawClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
    return RawClient(reader, writer)


async def test_partial_frame_is_closed_after_request_timeout(server: Server) -> None:
    client = await connect(server)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.send(kafka_frame_start(100, b"x" * 40))  # 100 bytes announced, 50 sent
    assert await closed_by_peer(client.reader) == b""
    assert 0.25 <= loop.time() - started < 5


async def test_idle_connection_is_closed_and_active_one_is_not(server: Server) -> None:
    idle = await connect(server)
    busy = await connect(server)
    loop = asyncio.get_running_loop()
    started = loop.time()
    closing = asyncio.ensure_future(closed_by_peer(idle.reader))
    while not closing.done():  # requests every 100 ms keep `busy` open past the idle limit
        assert (await busy.call(VERSIONS)).error_code == 0
        await asyncio.wait([closing], timeout=0.1)
    assert await closing == b""
    assert loop.time() - started >= 0.55
    assert (await busy.call(VERSIONS)).error_code == 0
    busy.close()


async def test_connections_beyond_the_maximum_are_refused_and_counted(server: Server) -> None:
    clients = [await connect(server) for _ in range(3)]
    for client in clients:
        assert (await client.call(VERSIONS)).error_code == 0
    refused = await connect(server)
    assert await closed_by_peer(refused.reader) == b""
    assert server.limits.gates["kafka"].refused == 1
    assert (await clients[0].call(VERSIONS)).error_code == 0
    clients[0].close()
    await closed_by_peer(clients[0].reader)
    async with asyncio.timeout(5):  # the slot frees as the server sees the close
        await server.limits.gates["kafka"].until_open(2)
    again = await connect(server)
    assert (await again.call(VERSIONS)).error_code == 0


def _send_start(port: int, announced: int, sent_bytes: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(kafka_frame_start(announced))
    chunk = b"\0" * MIB
    sent = 0
    try:
        while sent < sent_bytes:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server shed this connection
    return sock


def _served(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_frame(VERSIONS, 7))
        return len(sock.recv(1 << 16)) > 8


def test_partial_frames_stay_within_the_server_wide_budget(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", listeners=("kafka",),
                           environ={"CONVEYOR_BROKER__PARTIAL_REQUEST_BYTES_MAX": str(64 * MIB)})
    with broker:
        assert broker.process is not None
        port = broker.ports["kafka"]
        baseline = rss_bytes(broker.process.pid)
        sockets = [_send_start(port, 99 * MIB, 30 * MIB) for _ in range(5)]  # 150 MiB sent
        assert _served(port)
        grown = rss_bytes(broker.process.pid) - baseline
        for sock in sockets:
            sock.close()
        assert grown < 110 * MIB, f"RSS grew {grown / MIB:.0f} MiB"


def test_consumer_that_stops_reading_does_not_pin_its_fetch(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", listeners=("kafka", "http"))
    with broker:
        assert broker.process is not None
        port = broker.ports["kafka"]
        asyncio.run(_fill_topic(broker.ports["http"], "stuck", 40))
        fetch = FetchRequest(
            replica_id=-1, max_wait=datetime.timedelta(0), min_bytes=0, max_bytes=50 * MIB,
            isolation_level=0, session_id=0, session_epoch=-1, topics=(FetchTopic(
                topic="stuck", partitions=(FetchPartition(
                    partition=0, current_leader_epoch=-1, fetch_offset=0, log_start_offset=-1,
                    partition_max_bytes=50 * MIB),)),),
            forgotten_topics_data=(), rack_id="")
        baseline = rss_bytes(broker.process.pid)
        stuck = socket.create_connection(("127.0.0.1", port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        stuck.sendall(request_frame(fetch, 1))
        assert _served(port)  # the server answered another client after the fetch
        assert _served(port)
        grown = rss_bytes(broker.process.pid) - baseline
        stuck.close()
        assert grown < 20 * MIB, f"RSS grew {grown / MIB:.0f} MiB for a stuck 40 MiB fetch"


async def _fill_topic(http_port: int, topic: str, batches: int) -> None:
    """Append ``batches`` record batches of ~1 MiB each through a raw Kafka-free path."""
    from conveyor.client import AsyncClient  # the project's own HTTP client

    async with AsyncClient(f"http://127.0.0.1:{http_port}") as client:
        await client.create_topic(topic, 1)
        value = os.urandom(900_000)
        for _ in range(batches):
            await client.publish(topic, value)





async def test_disk_alarm_delays_produce_until_it_clears(tmp_path: Path) -> None:
    async with run_broker(tmp_path / "data", listeners=("kafka",),
                          broker={"disk_free_limit_bytes": 1 << 62}) as server:
        await server.broker.create_topic("alarm", 1)
        producer = await connect(server)
        await producer.send(request_frame(produce("alarm", batch_of(3)), 5))
        answer = asyncio.ensure_future(producer.read_frame())
        done, _ = await asyncio.wait([answer], timeout=0.3)
        assert not done  # held while the disk is low: a delayed response
        reader = await connect(server)  # other requests are served meanwhile
        assert (await reader.call(VERSIONS)).error_code == 0
        assert server.broker.offsets("alarm", 0).high_watermark == 0
        server.disk_alarm.limit_bytes = 0
        assert not server.disk_alarm.check()
        response = parse(await answer, produce("alarm", b""))
        assert partition_result(response).error_code == 0
        assert response.throttle_time.total_seconds() >= 0.3  # how long it was held
        assert server.broker.offsets("alarm", 0).high_watermark == 3


async def test_consumer_that_never_reads_is_closed_when_idle(tmp_path: Path) -> None:
    async with run_broker(tmp_path / "data", listeners=("kafka",),
                          settings={"kafka": {"idle_timeout_ms": 400}}) as server:
        await server.broker.create_topic("never", 1)
        for _ in range(8):
            await server.broker.append_batch("never", 0, build_batch(
                [RecordData(None, os.urandom(900_000), (), 1)]))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.ports["kafka"]))
        await asyncio.get_running_loop().sock_sendall(sock, request_frame(FETCH_NEVER, 1))
        gate = server.limits.gates["kafka"]
        async with asyncio.timeout(10):
            await gate.until_open(1)
            await gate.until_open(0)  # closed by the server with most of the fetch unsent
        sock.close()


FETCH_NEVER = FetchRequest(
    replica_id=-1, max_wait=datetime.timedelta(0), min_bytes=0, max_bytes=50 * MIB,
    isolation_level=0, session_id=0, session_epoch=-1, topics=(FetchTopic(
        topic="never", partitions=(FetchPartition(
            partition=0, current_leader_epoch=-1, fetch_offset=0, log_start_offset=-1,
            partition_max_bytes=50 * MIB),)),),
    forgotten_topics_data=(), rack_id="")
