"""Which HTTP stack for the HTTP listener: aiohttp (AppRunner) vs asyncio.Protocol + httptools.

Method: each candidate serves ``POST /topics/t/messages`` (read the body, answer a
small JSON document) on one uvloop loop in a child process; a raw-socket load
generator in this process keeps ``connections`` keep-alive connections busy
(one request in flight per connection, as a real client does) for ``seconds``
and counts responses. Both run with a 1 KiB body and a 100 KiB body.

Run: ``.venv/bin/python -m bench.http.stack_choice`` (prints JSON; the numbers
go into bench/results/http_stack.json and docs/http.md).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import sys
import time
from typing import Any

RESPONSE_BODY = b'{"results":[{"partition":0,"offset":1}]}'


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def serve_aiohttp(port: int, ready: Any) -> None:
    from aiohttp import web

    async def publish(request: web.Request) -> web.Response:
        body = await request.read()
        assert body
        return web.Response(body=RESPONSE_BODY, content_type="application/json")

    app = web.Application(client_max_size=4 << 20)
    app.router.add_post("/topics/{name}/messages", publish)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ready.set()
    await asyncio.Event().wait()


class HttptoolsProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.body = []
        asyncio.get_running_loop().create_task(self.respond())

    async def respond(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(RESPONSE_BODY)).encode() + b"\r\n\r\n" + RESPONSE_BODY
        )


async def serve_httptools(port: int, ready: Any) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(HttptoolsProtocol, "127.0.0.1", port)
    ready.set()
    await asyncio.Event().wait()


def child(stack: str, port: int, ready: Any) -> None:
    import uvloop

    serve = serve_aiohttp if stack == "aiohttp" else serve_httptools
    uvloop.run(serve(port, ready))


async def load(port: int, body: bytes, connections: int, seconds: float) -> float:
    request = (
        b"POST /topics/t/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream"
        b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    deadline = time.perf_counter() + seconds
    counts = [0] * connections

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            counts[index] += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(connections)))
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    import uvloop

    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    results: dict[str, dict[str, float]] = {}
    for stack in ("aiohttp", "httptools"):
        port = free_port()
        ready = multiprocessing.Event()
        process = multiprocessing.Process(target=child, args=(stack, port, ready), daemon=True)
        process.start()
        ready.wait(10)
        results[stack] = {}
        for body_bytes in (1024, 100 * 1024):
            rate = uvloop.run(load(port, b"x" * body_bytes, 16, seconds))
            results[stack][f"requests_per_s_{body_bytes}_bytes"] = round(rate)
        process.kill()
        process.join()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
