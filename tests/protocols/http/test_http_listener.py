"""The HTTP listener over real sockets (run_broker, raw asyncio streams).

Goal: pipelined requests are answered in order on one connection; an oversized
body gets 413 and the connection closes; past requests_in_flight_max the answer
is 429 with Retry-After; an idle keep-alive connection is closed. Method: write
raw HTTP/1.1 bytes and read the responses.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from conveyor.testing.server import run_broker


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def request(method: str, target: str, body: bytes = b"",
            content_type: str = "application/json") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with run_broker(tmp_path, listeners=("http",)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["http"])
        publish = json.dumps({"messages": [{"value": "a"}, {"value": "b"}]}).encode()
        writer.write(request("POST", "/topics/t/messages", publish)
                     + request("GET", "/topics/t/messages?offset=1")
                     + request("GET", "/nowhere"))
        first, second, third = [await read_response(reader) for _ in range(3)]
        assert first[0] == 200 and [r["offset"] for r in json.loads(first[2])["results"]] == [0, 1]
        assert second[0] == 200 and [m["value"] for m in json.loads(second[2])["messages"]] == ["b"]
        assert third[0] == 404 and json.loads(third[2])["error"]["code"] == "route_not_found"
        writer.close()


async def test_oversized_body_is_413_then_the_connection_closes(tmp_path: Path) -> None:
    async with run_broker(tmp_path, listeners=("http",),
                          settings={"http": {"body_bytes_max": 1024}}) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["http"])
        writer.write(b"POST /topics/t/messages HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 5000\r\n\r\n" + b"x" * 100)
        status, headers, body = await read_response(reader)
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "record_too_large"
        assert await reader.read() == b""  # closed by the server
        writer.close()


async def test_past_the_in_flight_limit_the_answer_is_429(tmp_path: Path) -> None:
    async with run_broker(tmp_path, listeners=("http",),
                          settings={"http": {"requests_in_flight_max": 1}}) as server:
        port = server.ports["http"]
        await server.broker.create_topic("slow")
        waiting_reader, waiting_writer = await asyncio.open_connection("127.0.0.1", port)
        waiting_writer.write(request("POST", "/topics/slow/fetch",
                                     json.dumps({"wait_ms": 500}).encode()))
        await waiting_writer.drain()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Until the server has read the fetch, /health still gets the slot; each round
        # trip gives the server's loop turns to read it.
        for _ in range(100):
            writer.write(request("GET", "/health"))
            status, headers, body = await read_response(reader)
            if status == 429:
                break
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "too_many_requests"
        waiting_status, _, _ = await read_response(waiting_reader)
        assert waiting_status == 200
        writer.close()
        waiting_writer.close()


async def test_idle_keep_alive_connections_are_closed(tmp_path: Path) -> None:
    async with run_broker(tmp_path, listeners=("http",),
                          settings={"http": {"idle_timeout_ms": 100}}) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["http"])
        writer.write(request("GET", "/health"))
        status, _, _ = await read_response(reader)
        assert status == 200
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        writer.close()
