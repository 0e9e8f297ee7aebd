"""Handlers against a real broker (run_broker), without sockets.

Goal: the long-poll rule — a client that vanished before its acquire response
was written keeps nothing locked: records acquired for it are released at once,
and a waiting acquire is abandoned when the client goes away. Method: call
Handlers.acquire with a RequestContext whose connection is gone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor.broker.types import Message
from conveyor.protocols.http.codec import ApiRequest
from conveyor.protocols.http.handlers import Handlers, RequestContext
from conveyor.protocols.http.openapi import build_document
from conveyor.protocols.http.routes import ROUTES
from conveyor.testing.server import run_broker

ACQUIRE = next(route for route in ROUTES if route.operation == "acquire")


def acquire_request(queue: str, wait_ms: int) -> ApiRequest:
    return ApiRequest("acquire", ACQUIRE, {"topic": queue, "group": queue}, {},
                      {"limit": 5, "wait_ms": wait_ms})


def gone_context() -> RequestContext:
    disconnected = asyncio.Event()
    disconnected.set()
    return RequestContext(lambda: False, disconnected, "127.0.0.1:1")


async def test_records_acquired_for_a_vanished_client_are_released(tmp_path: Path) -> None:
    async with run_broker(tmp_path) as server:
        broker = server.broker
        await broker.shared_groups.declare_queue("q")
        await broker.publish("q", [Message(b"one"), Message(b"two")])
        handlers = Handlers(broker, build_document)

        response = await handlers.handle(acquire_request("q", 0), gone_context())

        assert response.status == 200 and response.document == {"messages": []}
        info = await broker.shared_groups.get_queue("q")
        assert (info.ready, info.in_flight) == (2, 0)


async def test_a_waiting_acquire_ends_when_the_client_goes_away(tmp_path: Path) -> None:
    async with run_broker(tmp_path) as server:
        broker = server.broker
        await broker.shared_groups.declare_queue("q")
        handlers = Handlers(broker, build_document)
        disconnected = asyncio.Event()
        context = RequestContext(lambda: not disconnected.is_set(), disconnected, "peer")
        waiting = asyncio.ensure_future(handlers.handle(acquire_request("q", 30_000), context))
        await asyncio.sleep(0)  # let the acquire start waiting
        disconnected.set()
        response = await asyncio.wait_for(waiting, timeout=5)  # not the 30 s long poll
        assert response.document == {"messages": []}
        await broker.publish("q", [Message(b"later")])
        [delivery] = await broker.shared_groups.acquire("q", "q", 1)
        assert delivery.delivery_count == 1  # never handed to the vanished client
