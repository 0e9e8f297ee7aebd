"""A mixed load under kill -9 of the whole server: 0 acknowledged records lost.

A real ``conveyor serve`` child (BrokerProcess) takes Kafka (confluent-kafka,
idempotent, acks=all), AMQP (pika, publisher confirms, persistent messages to a durable
queue) and HTTP (urllib POSTs) producers at once, each in its own thread, each writing
unique values and remembering the ones the server acknowledged (a delivery report, a
confirm, a 2xx). A killer SIGKILLs the server at random moments and starts it again on
the same directory (or database) and ports. Afterwards every acknowledged value must be
readable: the Kafka and HTTP topics by a Kafka consumer from the beginning, the AMQP
queue by basic_get. Duplicates are allowed (a retried publish whose ack was lost), loss
is not. Run on the file backend and on PostgreSQL. Seed: CONVEYOR_SEED or printed.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pika
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from conveyor.testing.server import BrokerProcess

KAFKA_TOPIC, HTTP_TOPIC, QUEUE = "mix-kafka", "mix-http", "mix-amqp"
KILLS = 3
QUIET = {"log_level": 0, "socket.connection.setup.timeout.ms": 3000,
         "reconnect.backoff.max.ms": 200, "topic.metadata.refresh.interval.ms": 1000}


@pytest.fixture(params=["file", "postgresql"])
def storage(request: pytest.FixtureRequest) -> str:
    if request.param == "file":
        return "file:"
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


class Acked:
    """Values a producer thread saw acknowledged, and the errors it rode through."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.errors = 0
        self.lock = threading.Lock()

    def add(self, value: str) -> None:
        with self.lock:
            self.values.add(value)


def http_call(port: int, method: str, path: str, body: bytes,
              content_type: str = "application/octet-stream") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     method=method, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


def kafka_producer(broker: BrokerProcess, acked: Acked, stop: threading.Event) -> None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{broker.ports['kafka']}",
                         "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                         "message.timeout.ms": 60_000, **QUIET})

    def report(error: object, message: object) -> None:
        if error is None:
            acked.add(message.value().decode())  # type: ignore[attr-defined]
        else:
            acked.errors += 1

    number = 0
    while not stop.is_set():
        producer.produce(KAFKA_TOPIC, f"k-{number}".encode(), partition=0, on_delivery=report)
        number += 1
        producer.poll(0.002)
    assert producer.flush(60) == 0, "Kafka deliveries still pending after 60 s"


def amqp_producer(broker: BrokerProcess, acked: Acked, stop: threading.Event) -> None:
    number = 0
    while not stop.is_set():
        try:
            parameters = pika.ConnectionParameters("127.0.0.1", broker.ports["amqp"],
                                                   socket_timeout=5)
            connection = pika.BlockingConnection(parameters)
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare(QUEUE, durable=True)
            while not stop.is_set():
                value = f"a-{number}"
                number += 1
                channel.basic_publish("", QUEUE, value.encode(),
                                      pika.BasicProperties(delivery_mode=2))
                acked.add(value)  # basic_publish returned: the broker confirmed it
            connection.close()
        except (pika.exceptions.AMQPError, pika.exceptions.NackError,
                pika.exceptions.UnroutableError, OSError):
            acked.errors += 1
            stop.wait(0.05)  # the server is down: its restart is the killer's, not ours


def http_producer(broker: BrokerProcess, acked: Acked, stop: threading.Event) -> None:
    number = 0
    while not stop.is_set():
        value = f"h-{number}"
        number += 1
        try:
            status = http_call(broker.ports["http"], "POST", f"/topics/{HTTP_TOPIC}/messages",
                               value.encode())
        except (urllib.error.URLError, OSError):
            acked.errors += 1
            stop.wait(0.05)
            continue
        if 200 <= status < 300:
            acked.add(value)


def read_topic(broker: BrokerProcess, topic: str) -> set[str]:
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{broker.ports['kafka']}",
                         "group.id": f"check-{topic}", "enable.auto.commit": False,
                         "enable.partition.eof": True, **QUIET})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    values: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            break  # end of the partition
        value = message.value()
        assert value is not None
        values.add(value.decode())
    consumer.close()
    return values


def read_queue(broker: BrokerProcess) -> set[str]:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", broker.ports["amqp"]))
    channel = connection.channel()
    values: set[str] = set()
    while True:
        method, _properties, body = channel.basic_get(QUEUE, auto_ack=True)
        if method is None:
            break
        values.add(body.decode())
    connection.close()
    return values


def test_mixed_load_loses_no_acknowledged_record(tmp_path: Path, storage: str) -> None:
    seed = int(os.environ.get("CONVEYOR_SEED", random.SystemRandom().randrange(2**32)))
    print(f"CONVEYOR_SEED={seed}")
    rng = random.Random(seed)
    broker = BrokerProcess(tmp_path / "data", listeners=("kafka", "amqp", "http"),
                           extra_args=("--storage", storage))
    broker.start()
    try:
        for topic in (KAFKA_TOPIC, HTTP_TOPIC):
            http_call(broker.ports["http"], "POST", "/topics",
                      json.dumps({"name": topic, "partitions": 1}).encode(), "application/json")
        stop = threading.Event()
        producers: dict[str, Callable[[BrokerProcess, Acked, threading.Event], None]] = {
            "kafka": kafka_producer, "amqp": amqp_producer, "http": http_producer}
        acked = {name: Acked() for name in producers}
        failures: list[BaseException] = []

        def guarded(run: Callable[[BrokerProcess, Acked, threading.Event], None],
                    name: str) -> None:
            try:
                run(broker, acked[name], stop)
            except BaseException as failure:  # reported by the test, not lost in a thread
                failures.append(failure)

        threads = [threading.Thread(target=guarded, args=(run, name))
                   for name, run in producers.items()]
        for thread in threads:
            thread.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.5, 2.0))  # a random moment: wall time is the point
            broker.kill()
            broker.start()
        time.sleep(rng.uniform(0.5, 1.0))  # some load on the last incarnation too
        stop.set()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads), "a producer hung"
        assert not failures, failures
        broker.kill()
        broker.start()
        found = {"kafka": read_topic(broker, KAFKA_TOPIC), "http": read_topic(broker, HTTP_TOPIC),
                 "amqp": read_queue(broker)}
    finally:
        if broker.process is not None and broker.process.poll() is None:
            broker.stop()
    for name in producers:
        print(f"{name}: {len(acked[name].values)} acknowledged, {acked[name].errors} errors, "
              f"{len(found[name])} found")
        assert len(acked[name].values) > 20, f"{name}: too few acknowledged records"
        lost = acked[name].values - found[name]
        assert not lost, f"{name}: {len(lost)} acknowledged records lost: {sorted(lost)[:10]}"
