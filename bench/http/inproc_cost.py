"""The broker's CPU per HTTP publish, in process, split into the HTTP layer and the rest.

For a shared machine: no socket and no client process, so what is measured is the
broker's own CPU (``time.thread_time`` of the event-loop thread; the other threads —
the fdatasync threads — as process time minus that), in blocks of ``--block`` requests
of each kind in turn, in one process on one broker (fsync=always), so a neighbour's
load falls on every kind alike. One ``HttpConnection`` is fed the request bytes through
``data_received``; its answer is taken from a stub transport's ``write``. Kinds:

- ``health``: ``GET /health``, the floor of any request (framing, the connection's
  task, routing, the answer);
- ``http``: publish batch 1 (1 KiB, JSON), the whole path;
- ``http_stub``: the same request with ``Broker.publish`` replaced by a coroutine that
  returns one result: the HTTP layer of a publish alone;
- ``direct``: ``await Broker.publish`` of the same message: the broker, storage and
  the wait for the fdatasync, without HTTP.

``http`` minus ``direct`` is what HTTP adds to a publish (its layer, plus whatever the
two paths' loop turns cost differently). Prints µs per request per kind: the loop
thread's CPU, the other threads' CPU and the wall time of one request in lockstep (the
round trip without a socket: for a publish, mostly the wait for its fdatasync), with the
load average.

Run:  .venv/bin/python -m bench.http.inproc_cost [--requests 3000] [--block 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

from bench.http.request_cost import request_bytes
from conveyor.broker.types import Message, PublishResult
from conveyor.protocols.http.listener import HttpConnection, HttpListener
from conveyor.testing.server import run_broker

KINDS = ("health", "http", "http_stub", "direct")


class AnswerTransport(asyncio.Transport):
    """What the connection writes completes ``answer``; reading is never paused."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: asyncio.Future[bytes] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.answer is not None
        self.answer.set_result(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        return None

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


async def measure(requests: int, block: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as directory:
        async with run_broker(Path(directory), listeners=("http",)) as server:
            broker = server.broker
            await broker.declare_queue("q")
            listener = next(item for item in gc.get_objects()
                            if isinstance(item, HttpListener))
            connection, transport = HttpConnection(listener), AnswerTransport()
            connection.connection_made(transport)
            loop = asyncio.get_running_loop()
            message = [Message(b"x" * 1024)]

            def over_http(data: bytes) -> Callable[[], Awaitable[None]]:
                async def one() -> None:
                    transport.answer = loop.create_future()
                    connection.data_received(data)
                    answer = await transport.answer
                    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
                return one

            async def direct() -> None:
                await broker.publish("q", message)

            async def stub_publish(topic: str, messages: Sequence[Message],
                                   partition: int | None = None) -> list[PublishResult]:
                return [PublishResult(topic, 0, 0)]

            publish = over_http(request_bytes("publish", 1))
            runs = {"health": over_http(request_bytes("health", 1)), "http": publish,
                    "http_stub": publish, "direct": direct}
            real_publish = broker.publish
            for kind in KINDS:  # warm: caches, the first segment
                for _ in range(200):
                    await runs["direct" if kind == "direct" else "http"]()
            loop_s = dict.fromkeys(KINDS, 0.0)
            others_s = dict.fromkeys(KINDS, 0.0)
            wall_s = dict.fromkeys(KINDS, 0.0)
            blocks = max(1, requests // block)
            try:
                for _ in range(blocks):
                    for kind in KINDS:
                        broker.publish = (  # type: ignore[method-assign]
                            stub_publish if kind == "http_stub" else real_publish)
                        thread_started, process_started = time.thread_time(), time.process_time()
                        wall_started = time.perf_counter()
                        for _ in range(block):
                            await runs[kind]()
                        thread_s = time.thread_time() - thread_started
                        wall_s[kind] += time.perf_counter() - wall_started
                        loop_s[kind] += thread_s
                        others_s[kind] += time.process_time() - process_started - thread_s
            finally:
                broker.publish = real_publish  # type: ignore[method-assign]
                connection.connection_lost(None)
            count = blocks * block
            return {kind: {"loop_us": round(loop_s[kind] / count * 1e6, 1),
                           "other_threads_us": round(others_s[kind] / count * 1e6, 1),
                           "wall_us": round(wall_s[kind] / count * 1e6, 1)}
                    for kind in KINDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="per kind")
    parser.add_argument("--block", type=int, default=100, help="requests per kind in turn")
    options = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = uvloop.run(measure(options.requests, options.block))
    print(json.dumps({**result, "load_average_1m": [round(load_before, 2),
                                                    round(os.getloadavg()[0], 2)]}))


if __name__ == "__main__":
    main()
