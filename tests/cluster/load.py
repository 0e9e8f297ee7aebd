"""Background load for the fault tests: a Kafka idempotent producer (acks=all), an
AMQP publisher with confirms, an HTTP publisher and an HTTP queue consumer, each in a
thread of its own, recording what was acknowledged (helpers.History for Kafka, lists
of confirmed values for AMQP and HTTP, a QueueHistory of deliveries and confirmed acks
for the consumer; helpers.check_queue judges the queue side).

Both run until ``stop()``; the test waits on their progress (``wait_acknowledged``)
rather than sleeping. The AMQP publisher reconnects (to each node in turn) whenever
its connection dies; a publish whose confirm never came is counted as unconfirmed,
not retried, so a confirmed value is expected exactly once in the queue.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
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
        self.confirm_times: list[float] = []  # time.monotonic() of each confirm
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
                    self.confirm_times.append(time.monotonic())
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


class HttpLoad(threading.Thread):
    """Publishes ``h0``, ``h1``, ... to the queue, one message a request, through each
    node in turn (a load balancer's round robin, which also moves on from a dead node).
    A 2xx answer acknowledges the value; anything else (an error status, a refused or
    broken connection, a timeout) leaves it unknown: it may or may not be in the queue,
    and it is not sent again, so an acknowledged value is expected exactly once."""

    def __init__(self, nodes: list[BrokerProcess], queue: str = QUEUE, prefix: str = "h",
                 rate_per_s: int = 60) -> None:
        super().__init__(daemon=True, name="http-load")
        self.nodes, self.queue, self.prefix = nodes, queue, prefix
        self.pause_s = 1 / rate_per_s
        self.acknowledged: list[str] = []
        self.ack_times: list[float] = []  # time.monotonic() of each acknowledgement
        self.unknown: list[str] = []
        self.errors: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        index = 0
        with httpx.Client(timeout=5) as client:
            while not self._halt.is_set():
                node = self.nodes[index % len(self.nodes)]
                value = f"{self.prefix}{index}"
                index += 1
                try:
                    answer = client.post(
                        f"http://127.0.0.1:{node.ports['http']}/topics/{self.queue}/messages",
                        json={"messages": [{"value": value}]})
                    outcome = "ok" if 200 <= answer.status_code < 300 else str(answer.status_code)
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                if outcome == "ok":
                    self.acknowledged.append(value)
                    self.ack_times.append(time.monotonic())
                else:
                    self.unknown.append(value)
                    self.errors[outcome] = self.errors.get(outcome, 0) + 1
                self._halt.wait(self.pause_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


@dataclass
class QueueHistory:
    """What a queue consumer saw: every delivery with the time its acquire was *sent*,
    and for each value the time its first confirmed ack was answered."""

    deliveries: list[tuple[str, float]] = field(default_factory=list)
    acked: dict[str, float] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)
    acks_refused: int = 0  # answered ok=false (a lock that had expired, ...)
    acks_unanswered: int = 0  # receipts whose ack call failed or timed out
    held: int = 0  # deliveries deliberately left unacked (they must come back)


class QueueConsumer(threading.Thread):
    """Acquires from the queue over HTTP through each node in turn (moving on after an
    error) and acks what it got through the node it got it from, except every
    ``hold_every``-th delivery, which it leaves locked: that one must be redelivered
    once its lock (``lock_ms``) expires. ``finish()`` then acks everything until every
    expected value has a confirmed ack and a lock's time has passed with nothing new."""

    def __init__(self, nodes: list[BrokerProcess], queue: str = QUEUE, hold_every: int = 10,
                 lock_ms: int = 3000) -> None:
        super().__init__(daemon=True, name="queue-consumer")
        self.nodes, self.queue = nodes, queue
        self.hold_every, self.lock_ms = hold_every, lock_ms
        self.history = QueueHistory()
        self._halt = threading.Event()
        self._draining = threading.Event()
        self._turn = 0

    def acks(self) -> int:
        return len(self.history.ack_times)

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._halt.is_set():
                node = self.nodes[self._turn % len(self.nodes)]
                base = (f"http://127.0.0.1:{node.ports['http']}/topics/{self.queue}"
                        f"/groups/{self.queue}")
                sent = time.monotonic()
                try:
                    answer = client.post(base + "/acquire", json={
                        "limit": 50, "wait_ms": 500, "lock_ms": self.lock_ms})
                except httpx.HTTPError:
                    answer = None
                if answer is None or answer.status_code != 200:
                    self._turn += 1  # a dead node, or one not serving (yet): the next
                    self._halt.wait(0.1)
                    continue
                messages = answer.json()["messages"]
                if not messages:
                    self._turn += 1  # spread the polls over the nodes
                self._settle(client, base, messages, sent)

    def _settle(self, client: httpx.Client, base: str, messages: list[dict[str, Any]],
                sent: float) -> None:
        history = self.history
        receipts: dict[str, str] = {}
        for message in messages:
            history.deliveries.append((message["value"], sent))
            if (not self._draining.is_set() and self.hold_every
                    and len(history.deliveries) % self.hold_every == 0):
                history.held += 1
                continue
            receipts[message["receipt"]] = message["value"]
        if not receipts:
            return
        try:
            answer = client.post(base + "/ack", json={"receipts": list(receipts)})
            results = answer.json()["results"] if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            results = None
        if results is None:
            history.acks_unanswered += len(receipts)
            self._turn += 1
            return
        answered = time.monotonic()
        for result in results:
            if result["ok"]:
                history.acked.setdefault(receipts[result["receipt"]], answered)
                history.ack_times.append(answered)
            else:
                history.acks_refused += 1

    def finish(self, expected: set[str], timeout_s: float) -> None:
        """Ack everything from now on; return once every expected value and every value
        delivered has a confirmed ack, and one more lock time has passed with no
        delivery (what an unconfirmed ack or an expired lock brings back comes by then)."""
        self._draining.set()
        deadline = time.monotonic() + timeout_s
        quiet_s = self.lock_ms / 1000 + 1.5
        while time.monotonic() < deadline:
            delivered = {value for value, _ in list(self.history.deliveries)}
            if not (expected | delivered) - self.history.acked.keys():
                break
            time.sleep(0.1)
        last = len(self.history.deliveries)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
            time.sleep(0.1)
            if len(self.history.deliveries) != last:
                last, quiet_since = len(self.history.deliveries), time.monotonic()
        self._halt.set()
        self.join(30)


def longest_stall(times: list[float], since: float, until: float) -> float:
    """The longest time without an acknowledgement between ``since`` and ``until``
    (how long a protocol's clients waited around a fault)."""
    marks = [since, *sorted(t for t in times if since < t < until), until]
    return max(b - a for a, b in itertools.pairwise(marks))
