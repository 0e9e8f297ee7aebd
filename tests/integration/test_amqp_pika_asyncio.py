"""Goal: pika's asyncio adapter (AsyncioConnection) works against Conveyor unchanged.

Method: a BrokerThread; pika drives its own asyncio loop in this thread through the
callback API: open, declare, confirm.select, publish three messages, collect their
confirms, consume them with manual acks, close. Every step is an awaited callback;
the loop stops when the last one ran (or the test's deadline fails it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.asyncio_connection import AsyncioConnection

from conveyor.testing.server import BrokerThread

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    path: Path = tmp_path_factory.mktemp("pika-asyncio")
    with BrokerThread(path, listeners=("amqp",)) as running:
        yield running


def test_asyncio_connection_publishes_with_confirms_and_consumes(server: BrokerThread) -> None:
    queue = f"pika-asyncio-{uuid.uuid4().hex[:8]}"
    loop = asyncio.new_event_loop()
    finished = loop.create_future()
    confirms: list[str] = []
    received: list[tuple[bytes, bool]] = []
    state: dict[str, Any] = {}

    def fail(*arguments: Any) -> None:
        if not finished.done():
            finished.set_exception(AssertionError(f"pika reported {arguments!r}"))

    def on_open(connection: AsyncioConnection) -> None:
        state["connection"] = connection
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel: Any) -> None:
        state["channel"] = channel
        channel.queue_declare(queue, durable=True, callback=on_declared)

    def on_declared(_frame: Any) -> None:
        state["channel"].confirm_delivery(on_confirm, callback=on_confirm_mode)

    def on_confirm_mode(_frame: Any) -> None:
        channel = state["channel"]
        for index in range(3):
            channel.basic_publish("", queue, f"m{index}".encode(),
                                  pika.BasicProperties(delivery_mode=2))

    def on_confirm(frame: Any) -> None:
        method = frame.method
        confirms.append(type(method).__name__)
        if method.delivery_tag == 3 or (method.multiple and method.delivery_tag >= 3):
            channel = state["channel"]
            channel.basic_qos(prefetch_count=2, callback=lambda _frame: channel.basic_consume(
                queue, on_message))

    def on_message(channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        received.append((body, bool(method.redelivered)))
        channel.basic_ack(method.delivery_tag)
        if len(received) == 3:
            state["connection"].close()

    def on_closed(_connection: Any, reason: Exception) -> None:
        if not finished.done():
            finished.set_result(reason)

    AsyncioConnection(
        pika.ConnectionParameters("127.0.0.1", server.ports["amqp"]),
        on_open_callback=on_open, on_open_error_callback=fail,
        on_close_callback=on_closed, custom_ioloop=loop,
    )
    try:
        loop.run_until_complete(asyncio.wait_for(finished, DEADLINE_S))
    finally:
        loop.close()
    assert set(confirms) == {"Ack"}
    assert received == [(b"m0", False), (b"m1", False), (b"m2", False)]
