"""Fixtures and helpers shared by the AMQP 0-9-1 client tests (pika, aio-pika, kombu, celery).

Every test targets either a Conveyor broker started by a fixture, or — when the
environment variable ``CONVEYOR_AMQP_TEST_URL`` is set (for example
``amqp://guest:guest@127.0.0.1:5672/``) — an external broker such as RabbitMQ, so
the same assertions can be checked against the reference implementation. Tests
that need to restart the broker or need Conveyor's Kafka/HTTP listeners are
skipped in that mode only. Every queue and exchange name is unique per test
(``unique``), so runs against a shared RabbitMQ do not collide.

Fixtures (re-exported by ``conftest.py``):
- ``amqp_target``: one broker per test module in a background thread (blocking clients).
- ``conveyor_thread``: a private Conveyor in a thread, for tests that restart it.
- ``conveyor_multi``: one Conveyor per module with the amqp, kafka and http listeners.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.spec
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from conveyor.testing.server import BrokerThread

EXTERNAL_URL_ENV = "CONVEYOR_AMQP_TEST_URL"
WAIT_S = 10.0
# How long a test waits to be sure that something does NOT happen (no event to await).
QUIET_S = 0.3


def external_url() -> str | None:
    """The URL of an external AMQP broker to test instead of Conveyor, if one is configured."""
    return os.environ.get(EXTERNAL_URL_ENV) or None


def skip_if_external(reason: str) -> None:
    if external_url() is not None:
        pytest.skip(f"{reason}: not available against the external broker {EXTERNAL_URL_ENV}")


def amqp_url(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class AmqpTarget:
    """Where the tests connect: a Conveyor in a thread, or an external broker."""

    url: str
    thread: BrokerThread | None = None

    @property
    def external(self) -> bool:
        return self.thread is None


@contextmanager
def open_target(data_dir: Path, listeners: tuple[str, ...] = ("amqp",)) -> Iterator[AmqpTarget]:
    url = external_url()
    if url is not None:
        yield AmqpTarget(url)
        return
    with BrokerThread(data_dir, listeners=listeners) as server:
        yield AmqpTarget(amqp_url(server.ports["amqp"]), server)


@pytest.fixture(scope="module")
def amqp_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AmqpTarget]:
    with open_target(tmp_path_factory.mktemp("amqp") / "data") as target:
        yield target


@pytest.fixture
def conveyor_thread(tmp_path: Path) -> Iterator[BrokerThread]:
    """A private Conveyor (amqp listener) for tests that restart the broker."""
    skip_if_external("restarts the broker")
    with BrokerThread(tmp_path / "data", listeners=("amqp",)) as server:
        yield server


@pytest.fixture(scope="module")
def conveyor_multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    """One Conveyor per module with the amqp, kafka and http listeners."""
    skip_if_external("needs Conveyor's kafka and http listeners")
    data_dir = tmp_path_factory.mktemp("multi") / "data"
    with BrokerThread(data_dir, listeners=("amqp", "kafka", "http")) as server:
        yield server


# ---------------------------------------------------------------------------------------------
# pika (blocking) helpers


def pika_parameters(url: str) -> pika.URLParameters:
    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = WAIT_S
    parameters.stack_timeout = WAIT_S
    parameters.blocked_connection_timeout = WAIT_S
    return parameters


@contextmanager
def blocking_connection(url: str) -> Iterator[pika.BlockingConnection]:
    connection = pika.BlockingConnection(pika_parameters(url))
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


@dataclass
class Received:
    """One message as a pika consumer or basic.get saw it."""

    method: pika.spec.Basic.Deliver | pika.spec.Basic.GetOk
    properties: pika.spec.BasicProperties
    body: bytes

    @property
    def delivery_tag(self) -> int:
        tag: int = self.method.delivery_tag
        return tag

    @property
    def redelivered(self) -> bool:
        return bool(self.method.redelivered)


def wait_until(
    connection: pika.BlockingConnection,
    condition: Callable[[], bool],
    timeout_s: float = WAIT_S,
) -> bool:
    """Process I/O events of ``connection`` until ``condition()`` holds or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        connection.process_data_events(time_limit=min(remaining, 0.5))
    return True


class PikaConsumer:
    """A basic.consume on a blocking channel collecting deliveries into ``messages``."""

    def __init__(self, channel: BlockingChannel, queue: str, auto_ack: bool = False,
                 arguments: dict[str, Any] | None = None) -> None:
        self.channel = channel
        self.messages: list[Received] = []
        self.tag = channel.basic_consume(
            queue, self._on_message, auto_ack=auto_ack, arguments=arguments
        )

    def _on_message(self, channel: BlockingChannel, method: Any, properties: Any,
                    body: bytes) -> None:
        self.messages.append(Received(method, properties, body))

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[Received]:
        """Wait until at least ``count`` messages arrived; fails the test otherwise."""
        connection = self.channel.connection
        arrived = wait_until(connection, lambda: len(self.messages) >= count, timeout_s)
        assert arrived, f"expected {count} deliveries, got {len(self.messages)}"
        return self.messages

    def settle_quietly(self, quiet_s: float = QUIET_S) -> list[Received]:
        """Process events for ``quiet_s`` (to see that nothing more arrives)."""
        self.channel.connection.process_data_events(time_limit=quiet_s)
        return self.messages

    def cancel(self) -> None:
        self.channel.basic_cancel(self.tag)


def consume(channel: BlockingChannel, queue: str, count: int, auto_ack: bool = True,
            timeout_s: float = WAIT_S) -> list[Received]:
    """Consume exactly ``count`` messages (waiting for them), then cancel the consumer."""
    consumer = PikaConsumer(channel, queue, auto_ack=auto_ack)
    try:
        return consumer.wait_for(count, timeout_s)
    finally:
        consumer.cancel()


def get_all(channel: BlockingChannel, queue: str) -> list[bytes]:
    """Drain ``queue`` with basic.get (auto ack) until it answers get-empty."""
    bodies: list[bytes] = []
    while True:
        method, _properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)


def publish_confirmed(channel: BlockingChannel, exchange: str, routing_key: str,
                      bodies: list[bytes], properties: pika.BasicProperties | None = None,
                      mandatory: bool = False) -> None:
    """basic.publish on a channel in confirm mode: each call returns once the broker acked."""
    for body in bodies:
        channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)


def confirming_channel(connection: pika.BlockingConnection) -> BlockingChannel:
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


def x_death_entry(headers: dict[str, Any] | None) -> dict[str, Any]:
    """The first (most recent) x-death table of a dead-lettered message, with its shape checked."""
    assert headers is not None and "x-death" in headers, f"no x-death header in {headers!r}"
    deaths = headers["x-death"]
    assert isinstance(deaths, list) and deaths, f"x-death is not a non-empty list: {deaths!r}"
    entry = deaths[0]
    assert isinstance(entry, dict)
    for key in ("queue", "reason", "count", "exchange", "routing-keys"):
        assert key in entry, f"x-death entry lacks {key!r}: {entry!r}"
    return entry


ROUND_TRIP_HEADERS: dict[str, Any] = {
    "text": "héllo",
    "number": 42,
    "negative": -7,
    "flag": True,
    "off": False,
    "nested": {"inner": "value", "count": 3, "deeper": {"ok": True}},
    "list": [1, "two", False, {"k": "v"}],
}
