"""Goal: no AMQP client can hold the listener's connections or memory without bound, and
publishers get connection.blocked / unblocked from the disk alarm.

Method: raw AMQP over TCP (frames built with pamqp) against a real server in this loop
for the waits, a real ``conveyor serve`` child for memory (RSS from /proc), pika for the
blocked notifications; short configured timeouts, every close awaited. Checks: a
partial frame is closed after request_timeout_ms, a silent socket after
handshake_timeout_ms; past connections_max a new connection is closed at once and
counted; 300 channels each with an unfinished 1 MB message stay within the server-wide
budget (the connection is closed with 506) while a normal client is served.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pika
import pytest
from limits_support import closed_by_peer, rss_bytes
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header

from conveyor.server.app import Server
from conveyor.testing.server import BrokerProcess, BrokerThread, run_broker

MIB = 1 << 20
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
SETTINGS = {"amqp": {"request_timeout_ms": 300, "handshake_timeout_ms": 400,
                     "connections_max": 2}}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("amqp",), settings=SETTINGS) as running:
        yield running


def marshal(method: object, channel: int = 0) -> bytes:
    return pamqp_frame.marshal(method, channel)  # type: ignore[arg-type]


def handshake_frames() -> list[bytes]:
    return [
        marshal(commands.Connection.StartOk(
            client_properties={}, mechanism="PLAIN", response="\x00guest\x00guest")),
        marshal(commands.Connection.TuneOk(channel_max=2047, frame_max=131072, heartbeat=0)),
        marshal(commands.Connection.Open(virtual_host="/")),
    ]


async def open_raw(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["amqp"])
    writer.write(PROTOCOL_HEADER)
    return reader, writer


async def test_partial_frame_is_closed_after_request_timeout(server: Server) -> None:
    reader, writer = await open_raw(server)
    writer.write(b"".join(handshake_frames()))
    writer.write(b"\x01\x00\x01\x00\x00\x03\xe8" + b"x" * 20)  # 1000 bytes announced, 20 sent
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await closed_by_peer(reader)
    assert 0.25 <= loop.time() - started < 5
    assert b"CONNECTION_FORCED - request timeout" in answer


async def test_silent_connection_is_closed_after_handshake_timeout(server: Server) -> None:
    reader, _ = await asyncio.open_connection("127.0.0.1", server.ports["amqp"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await closed_by_peer(reader) == b""
    assert 0.35 <= loop.time() - started < 5


async def test_connections_beyond_the_maximum_are_refused_and_counted(server: Server) -> None:
    held = [await open_raw(server) for _ in range(2)]
    async with asyncio.timeout(5):
        await server.limits.gates["amqp"].until_open(2)
    reader, _ = await asyncio.open_connection("127.0.0.1", server.ports["amqp"])
    assert await closed_by_peer(reader) == b""
    assert server.limits.gates["amqp"].refused == 1
    for _, writer in held:
        writer.close()


def _unfinished_messages(port: int, channels: int, body_bytes: int, sent_bytes: int) -> bytes:
    """One connection, ``channels`` channels, each with a message of ``body_bytes`` of which
    ``sent_bytes`` arrive. Returns what the server answered."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(PROTOCOL_HEADER + b"".join(handshake_frames()))
    chunk = pamqp_frame.marshal(pamqp_body.ContentBody(b"\0" * 100_000), 0)
    try:
        for channel in range(1, channels + 1):
            sock.sendall(marshal(commands.Channel.Open(), channel))
            sock.sendall(marshal(commands.Basic.Publish(exchange="", routing_key="q"), channel))
            sock.sendall(pamqp_frame.marshal(pamqp_header.ContentHeader(
                0, body_bytes, commands.Basic.Properties()), channel))
            body = chunk[:1] + channel.to_bytes(2, "big") + chunk[3:]
            for _ in range(sent_bytes // 100_000):
                sock.sendall(body)
    except OSError:
        pass  # shed by the server
    sock.settimeout(10)
    received = bytearray()
    try:
        while data := sock.recv(1 << 16):
            received += data
    except OSError:
        pass
    sock.close()
    return bytes(received)


def test_unfinished_messages_stay_within_the_server_wide_budget(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", listeners=("amqp",),
                           environ={"CONVEYOR_BROKER__PARTIAL_REQUEST_BYTES_MAX": str(64 * MIB)})
    with broker:
        assert broker.process is not None
        port = broker.ports["amqp"]
        baseline = rss_bytes(broker.process.pid)
        answer = _unfinished_messages(port, 300, 1_000_000, 900_000)  # 270 MB sent
        grown = rss_bytes(broker.process.pid) - baseline
        assert b"RESOURCE_ERROR" in answer
        assert grown < 110 * MIB, f"RSS grew {grown / MIB:.0f} MiB"
        normal = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
        channel = normal.channel()
        queue = f"normal-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue)
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"served")
        assert channel.queue_declare(queue, passive=True).method.message_count == 1
        normal.close()


def _until(connection: pika.BlockingConnection, events: list[str], event: str) -> None:
    for _ in range(50):  # process_data_events returns as soon as a frame was handled
        if event in events:
            return
        connection.process_data_events(time_limit=0.2)
    raise AssertionError(f"no {event} in 10 s: {events}")


def test_disk_alarm_sends_blocked_then_unblocked(tmp_path: Path) -> None:
    with BrokerThread(tmp_path, listeners=("amqp",),
                      broker={"disk_free_limit_bytes": 1 << 62}) as server:
        alarm = server.server.disk_alarm
        assert server.server.limits.flow.disk_alarm
        events: list[str] = []
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", server.ports["amqp"]))
        connection.add_on_connection_blocked_callback(lambda *_: events.append("blocked"))
        connection.add_on_connection_unblocked_callback(lambda *_: events.append("unblocked"))
        channel = connection.channel()
        queue = f"alarm-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue)
        channel.basic_publish("", queue, b"while the disk is low")
        _until(connection, events, "blocked")
        alarm.limit_bytes = 0
        assert server.call_sync(alarm.check) is False
        _until(connection, events, "unblocked")
        channel.basic_get(queue, auto_ack=True)  # reads worked throughout
        connection.close()
        assert events == ["blocked", "unblocked"]
