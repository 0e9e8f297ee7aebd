"""Background load for the fault tests: a Kafka idempotent producer (acks=all) and an
AMQP publisher with confirms, each in a thread of its own, recording what was
acknowledged (helpers.History for Kafka, a list of confirmed values for AMQP).

Both run until ``stop()``; the test waits on their progress (``wait_acknowledged``)
rather than sleeping. The AMQP publisher reconnects (to each node in turn) whenever
its connection dies; a publish whose confirm never came is counted as unconfirmed,
not retried, so a confirmed value is expected exactly once in the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pika
import pika.exceptions
from confluent_kafka import KafkaException

from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import History
from tests.cluster.test_cluster_kafka import TOPIC, producer

QUEUE = "q"


class KafkaLoad(threading.Thread):
    def __init__(self, nodes: list[BrokerProcess], prefix: str = "v",
                 rate_per_s: int = 400, restart_on_fatal: bool = False) -> None:
        super().__init__(daemon=True, name="kafka-load")
        self.per_tick = max(rate_per_s // 100, 1)  # records per 10 ms
        self.history = History()
        self.client = producer(nodes)
        self.prefix = prefix
        self.sent = 0
        self.fatal: str | None = None  # a fatal producer error (the thread stops on it)
        # restart_on_fatal: a new producer (a new producer id) carries on instead; what
        # the fatal errors said is kept (an asynchronous failover's lost sequences)
        self.nodes = nodes
        self.restart_on_fatal = restart_on_fatal
        self.fatals: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self._produce()
                return
            except KafkaException as error:
                self.fatals.append(str(error))
                if not self.restart_on_fatal:
                    self.fatal = str(error)
                    return
                self.client = producer(self.nodes)

    def _produce(self) -> None:
        while not self._halt.is_set():
            for _ in range(self.per_tick):  # a steady stream, not a flood
                self.client.produce(TOPIC, f"{self.prefix}{self.sent}".encode(),
                                    key=f"k{self.sent % 17}".encode(),
                                    on_delivery=self.history.on_delivery)
                self.sent += 1
            self.client.poll(0.01)
            while len(self.client) > 2_000 and not self._halt.is_set():
                self.client.poll(0.05)  # the brokers are not answering: do not pile up
        self.client.flush(90)

    def stop(self) -> None:
        self._halt.set()
        self.join(120)

    def acknowledged(self) -> int:
        return len(self.history.acknowledged)


class AmqpLoad(threading.Thread):
    def __init__(self, nodes: list[BrokerProcess]) -> None:
        super().__init__(daemon=True, name="amqp-load")
        self.nodes = nodes
        self.confirmed: list[str] = []
        self.unconfirmed: list[str] = []
        self.reconnects = 0
        self._halt = threading.Event()

    def run(self) -> None:
        index = 0
        attempt = 0
        while not self._halt.is_set():
            node = self.nodes[attempt % len(self.nodes)]
            attempt += 1
            try:
                connection = pika.BlockingConnection(pika.ConnectionParameters(
                    "127.0.0.1", node.ports["amqp"], connection_attempts=1,
                    socket_timeout=5, blocked_connection_timeout=30,
                    credentials=pika.PlainCredentials("guest", "guest")))
            except pika.exceptions.AMQPError:
                self._halt.wait(0.2)
                continue
            self.reconnects += 1
            try:
                channel = connection.channel()
                channel.queue_declare(QUEUE, durable=True)
                channel.confirm_delivery()
                while not self._halt.is_set():
                    value = f"a{index}"
                    index += 1
                    try:
                        channel.basic_publish("", QUEUE, value.encode(),
                                              pika.BasicProperties(delivery_mode=2),
                                              mandatory=True)
                    except pika.exceptions.AMQPError:
                        self.unconfirmed.append(value)
                        raise
                    self.confirmed.append(value)
            except pika.exceptions.AMQPError:
                pass
            finally:
                if connection.is_open:
                    try:
                        connection.close()
                    except pika.exceptions.AMQPError:
                        pass

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


def wait_progress(what: str, count: Callable[[], int], more: int, timeout_s: float) -> float:
    """Wait until ``count()`` has grown by ``more``; the seconds it took."""
    started = time.monotonic()
    target = count() + more
    while count() < target:
        fatal = getattr(getattr(count, "__self__", None), "fatal", None)
        if fatal is not None:
            raise AssertionError(f"{what}: the producer failed: {fatal}")
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: {count()} of {target} within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - started
