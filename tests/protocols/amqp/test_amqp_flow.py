"""Goal: flow control slows only the publisher that floods the broker, loses nothing.

Method: a BrokerThread with the smallest per-connection inbox (64 KiB); one pika
connection publishes 4 MiB without waiting, then one confirmed message; every message
is in the queue, the broker paused that connection's reading at least once, and a
second connection was served meanwhile.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pika

from conveyor.testing.server import BrokerThread


def test_flooding_publisher_is_paused_and_nothing_is_lost(tmp_path: Path) -> None:
    settings = {"amqp": {"inbox_bytes_max": 1 << 16}}
    queue = f"flood-{uuid.uuid4().hex[:8]}"
    with BrokerThread(tmp_path, listeners=("amqp",), settings=settings) as server:
        port = server.ports["amqp"]
        flooder = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
        bystander = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
        try:
            channel = flooder.channel()
            channel.queue_declare(queue, durable=True)
            body = b"x" * 1024
            for _ in range(4096):
                channel.basic_publish("", queue, body)
            # the bystander is served while the flood is being worked through
            other = bystander.channel()
            assert other.queue_declare(f"{queue}-other").method.message_count == 0
            channel.confirm_delivery()
            channel.basic_publish("", queue, b"last")  # returns once confirmed
            assert channel.queue_declare(queue, passive=True).method.message_count == 4097
            listener = server.server.listener("amqp")
            assert listener.state.reading_pauses >= 1  # type: ignore[attr-defined]
        finally:
            flooder.close()
            bystander.close()
