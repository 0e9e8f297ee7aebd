"""Goal: no HTTP client can hold the listener's connections or memory without bound, and
publishers are pushed back (429 + Retry-After) under the disk alarm while reads go on.

Method: raw TCP clients against a real server in this loop (run_broker), short
configured timeouts, every close awaited. Checks: a request whose body stops arriving
gets 408 and a close after request_timeout_ms; an idle keep-alive connection is closed
after idle_timeout_ms; past connections_max a new connection is closed at once and
counted; unfinished bodies over the server-wide budget shed the largest holder with a
503 while a normal client is served; the disk alarm blocks publishes, not reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from limits_support import closed_by_peer

from conveyor.server.app import Server
from conveyor.testing.server import run_broker

SETTINGS = {"http": {"request_timeout_ms": 300, "idle_timeout_ms": 500, "connections_max": 4}}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("http",), settings=SETTINGS,
                          broker={"partial_request_bytes_max": 1 << 20}) as running:
        yield running


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.ports["http"])


async def get_health(server: Server) -> bytes:
    reader, writer = await connect(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await closed_by_peer(reader)
    writer.close()
    return answer


def post(path: str, body: bytes, announced: int | None = None) -> bytes:
    size = len(body) if announced is None else announced
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\n\r\n").encode() + body


async def test_unfinished_body_gets_408_after_request_timeout(server: Server) -> None:
    reader, writer = await connect(server)
    writer.write(post("/topics/t/messages", b"x" * 10, announced=100))
    answer = await closed_by_peer(reader)
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_is_closed(server: Server) -> None:
    reader, writer = await connect(server)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await closed_by_peer(reader)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert loop.time() - started >= 0.45


async def test_connections_beyond_the_maximum_are_refused_and_counted(server: Server) -> None:
    held = [await connect(server) for _ in range(4)]
    async with asyncio.timeout(5):
        await server.limits.gates["http"].until_open(4)
    reader, _ = await connect(server)
    assert await closed_by_peer(reader) == b""
    assert server.limits.gates["http"].refused == 1
    for _, writer in held:
        writer.close()
    async with asyncio.timeout(5):
        await server.limits.gates["http"].until_open(0)
    assert (await get_health(server)).startswith(b"HTTP/1.1 200 ")


async def test_unfinished_bodies_over_the_budget_shed_the_largest(server: Server) -> None:
    small_reader, small = await connect(server)
    small.write(post("/topics/t/messages", b"s" * 1000, announced=10_000))
    big_reader, big = await connect(server)
    big.write(post("/topics/t/messages", b"b" * (1 << 20), announced=4 << 20))
    answer = await closed_by_peer(big_reader)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 1" in answer
    assert server.limits.budget.shed == 1
    assert server.limits.budget.total <= 1 << 20
    assert (await get_health(server)).startswith(b"HTTP/1.1 200 ")
    small.write(b"s" * 9000)  # the light one was not shed and completes
    small.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"HTTP/1.1 200 " in await closed_by_peer(small_reader)


async def test_disk_alarm_blocks_publishes_not_reads(tmp_path: Path) -> None:
    async with run_broker(tmp_path / "data", listeners=("http",),
                          broker={"disk_free_limit_bytes": 1 << 62}) as server:
        assert server.limits.flow.disk_alarm  # far more free space asked than any disk has
        await server.broker.create_topic("t", 1)
        reader, writer = await connect(server)
        writer.write(post("/topics/t/messages", b"hello")[:-5].replace(
            b"Content-Length", b"Connection: close\r\nContent-Length") + b"hello")
        answer = await closed_by_peer(reader)
        assert answer.startswith(b"HTTP/1.1 429 ")
        assert b"Retry-After: 1" in answer
        assert b"publishers_blocked" in answer
        reader, writer = await connect(server)
        writer.write(b"GET /topics/t/messages?partition=0&offset=0 HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        assert (await closed_by_peer(reader)).startswith(b"HTTP/1.1 200 ")
        server.disk_alarm.limit_bytes = 0
        assert not server.disk_alarm.check()
        reader, writer = await connect(server)
        writer.write(post("/topics/t/messages", b"hello")[:-5].replace(
            b"Content-Length", b"Connection: close\r\nContent-Length") + b"hello")
        assert (await closed_by_peer(reader)).startswith(b"HTTP/1.1 20")


async def test_heavy_publisher_gets_429_over_the_high_water_mark(tmp_path: Path) -> None:
    async with run_broker(tmp_path / "data", listeners=("http",),
                          broker={"memory_high_watermark_bytes": 1 << 16}) as server:
        await server.broker.create_topic("t", 1)
        flow = server.limits.flow
        # This host's other in-flight publishes hold 1 MiB (as a concurrent bulk upload
        # would) and a publisher elsewhere a little: this host is the heaviest.
        flow.add("http:127.0.0.1", 1 << 20)
        flow.add("elsewhere", 1000)
        request = post("/topics/t/messages", b"hello")[:-5].replace(
            b"Content-Length", b"Connection: close\r\nContent-Length") + b"hello"
        reader, writer = await connect(server)
        writer.write(request)
        answer = await closed_by_peer(reader)
        assert answer.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 1" in answer
        assert not flow.should_wait("elsewhere")  # the light publisher goes on
        flow.add("http:127.0.0.1", -(1 << 20))  # its bulk upload was stored
        reader, writer = await connect(server)
        writer.write(request)
        assert (await closed_by_peer(reader)).startswith(b"HTTP/1.1 20")
