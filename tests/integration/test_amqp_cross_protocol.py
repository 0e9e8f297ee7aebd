"""Goal: one message is readable over every protocol, whichever protocol wrote it:
AMQP ↔ Kafka ↔ HTTP, with AMQP properties mapped to the documented record headers.

Method: one Conveyor per module with the amqp, kafka and http listeners (BrokerThread);
pika publishes and consumes, confluent-kafka produces and reads from the beginning of
the topic that backs a queue (queue name = topic name), httpx publishes and reads
(ordered fetch). The header contract: ``conveyor.content-type``,
``conveyor.content-encoding``, ``conveyor.correlation-id``, ``conveyor.reply-to``,
``conveyor.message-id``, ``conveyor.type``, ``conveyor.user-id``, ``conveyor.app-id``,
``conveyor.timestamp`` (seconds), ``conveyor.delivery-mode``; AMQP string headers are
plain record headers of the same name with UTF-8 values. Skipped against an external
broker (CONVEYOR_AMQP_TEST_URL), which has no Kafka or HTTP listener.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pika
import pytest
from amqp_support import WAIT_S, amqp_url, blocking_connection, confirming_channel, consume, unique
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from conveyor.testing.server import BrokerThread

TIMESTAMP_S = 1_767_225_600  # 2026-01-01T00:00:00Z
PROPERTIES = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "correlation_id": "corr-42",
    "reply_to": "answers",
    "message_id": "msg-42",
    "type": "order.created",
    "user_id": "guest",
    "app_id": "shop",
    "timestamp": TIMESTAMP_S,
    "delivery_mode": 2,
}
EXPECTED_RECORD_HEADERS = {
    "tenant": b"acme",
    "conveyor.content-type": b"application/json",
    "conveyor.content-encoding": b"utf-8",
    "conveyor.correlation-id": b"corr-42",
    "conveyor.reply-to": b"answers",
    "conveyor.message-id": b"msg-42",
    "conveyor.type": b"order.created",
    "conveyor.user-id": b"guest",
    "conveyor.app-id": b"shop",
    "conveyor.timestamp": str(TIMESTAMP_S).encode(),
    "conveyor.delivery-mode": b"2",
}


@pytest.fixture
def http(conveyor_multi: BrokerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{conveyor_multi.ports['http']}",
                      timeout=WAIT_S) as client:
        yield client


def url(server: BrokerThread) -> str:
    return amqp_url(server.ports["amqp"])


def read_kafka(server: BrokerThread, topic: str, count: int) -> list[Any]:
    """Read ``count`` records of partition 0 from the beginning with confluent-kafka."""
    consumer = Consumer({
        "bootstrap.servers": f"127.0.0.1:{server.ports['kafka']}",
        "group.id": unique("cross-reader"),
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
    })
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        records: list[Any] = []
        deadline = time.monotonic() + WAIT_S
        while len(records) < count and time.monotonic() < deadline:
            record = consumer.poll(0.5)
            if record is None:
                continue
            assert record.error() is None, record.error()
            records.append(record)
        assert len(records) == count, f"read {len(records)} of {count} records from {topic}"
        return records
    finally:
        consumer.close()


def publish_with_properties(server: BrokerThread, queue: str, body: bytes) -> None:
    with blocking_connection(url(server)) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue, durable=True)
        channel.basic_publish("", queue, body, pika.BasicProperties(
            headers={"tenant": "acme"}, **PROPERTIES,
        ))


def test_amqp_publish_is_a_kafka_record_with_property_headers(
    conveyor_multi: BrokerThread,
) -> None:
    queue = unique("cross-amqp-kafka")
    publish_with_properties(conveyor_multi, queue, b'{"order": 1}')

    record = read_kafka(conveyor_multi, queue, 1)[0]
    assert record.value() == b'{"order": 1}'
    headers = record.headers() or []
    for name, value in EXPECTED_RECORD_HEADERS.items():
        assert (name, value) in headers, f"missing record header {name}={value!r} in {headers}"

    # Reading over Kafka does not consume it: AMQP still gets it, properties intact.
    with blocking_connection(url(conveyor_multi)) as connection:
        received = consume(connection.channel(), queue, 1)[0]
        assert received.body == b'{"order": 1}'
        assert received.properties.correlation_id == "corr-42"
        assert received.properties.headers == {"tenant": "acme"}


def test_amqp_publish_is_readable_over_http(
    conveyor_multi: BrokerThread, http: httpx.Client,
) -> None:
    queue = unique("cross-amqp-http")
    publish_with_properties(conveyor_multi, queue, b'{"order": 2}')

    response = http.post(f"/topics/{queue}/fetch", json={"start": "earliest", "limit": 10})
    assert response.status_code == 200, response.text
    messages = response.json()["messages"]
    assert len(messages) == 1
    message = messages[0]
    assert message["value"] == '{"order": 2}'
    headers = {name: value.encode() for name, value in message["headers"].items()}
    headers.update({name: base64.b64decode(value)
                    for name, value in message.get("headers_base64", {}).items()})
    for name, value in EXPECTED_RECORD_HEADERS.items():
        assert headers.get(name) == value, f"header {name}: {headers.get(name)!r} != {value!r}"

    replay = http.get(f"/topics/{queue}/messages", params={"partition": 0, "offset": 0})
    assert replay.status_code == 200, replay.text
    assert [item["value"] for item in replay.json()["messages"]] == ['{"order": 2}']


def test_kafka_record_is_consumed_over_amqp(conveyor_multi: BrokerThread) -> None:
    queue = unique("cross-kafka-amqp")
    with blocking_connection(url(conveyor_multi)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)

        producer = Producer({"bootstrap.servers": f"127.0.0.1:{conveyor_multi.ports['kafka']}",
                             "acks": "all", "linger.ms": 0})
        errors: list[Any] = []
        producer.produce(
            queue, value=b"from kafka",
            headers=[("tenant", b"acme"), ("conveyor.correlation-id", b"c1"),
                     ("conveyor.reply-to", b"kafka-replies"),
                     ("conveyor.content-type", b"text/plain")],
            on_delivery=lambda error, message: errors.append(error),
        )
        assert producer.flush(WAIT_S) == 0
        assert errors == [None]

        received = consume(channel, queue, 1, auto_ack=False)[0]
        assert received.body == b"from kafka"
        assert received.properties.headers is not None
        assert received.properties.headers["tenant"] == "acme"
        assert received.properties.correlation_id == "c1"
        assert received.properties.reply_to == "kafka-replies"
        assert received.properties.content_type == "text/plain"
        assert received.method.routing_key == queue
        channel.basic_ack(received.delivery_tag)
        assert channel.basic_get(queue) == (None, None, None)


def test_http_publish_is_consumed_over_amqp(
    conveyor_multi: BrokerThread, http: httpx.Client,
) -> None:
    queue = unique("cross-http-amqp")
    with blocking_connection(url(conveyor_multi)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True)

        response = http.post(f"/topics/{queue}/messages", json={"messages": [{
            "value": "from http",
            "headers": {"tenant": "acme"},
            "correlation_id": "http-corr",
            "reply_to": "http-replies",
        }]})
        assert response.status_code == 200, response.text

        received = consume(channel, queue, 1)[0]
        assert received.body == b"from http"
        assert received.properties.correlation_id == "http-corr"
        assert received.properties.reply_to == "http-replies"
        assert received.properties.headers is not None
        assert received.properties.headers["tenant"] == "acme"


def test_http_exchange_publish_reaches_amqp_binding(
    conveyor_multi: BrokerThread, http: httpx.Client,
) -> None:
    base = unique("cross-route")
    with blocking_connection(url(conveyor_multi)) as connection:
        channel = connection.channel()
        channel.queue_declare(base)
        channel.queue_bind(base, "amq.topic", routing_key=f"{base}.*")

        response = http.post("/exchanges/amq.topic/messages", json={
            "routing_key": f"{base}.eu", "messages": [{"value": "routed"}],
        })
        assert response.status_code == 200, response.text
        received = consume(channel, base, 1)[0]
        assert received.body == b"routed"
        assert (received.method.exchange, received.method.routing_key) == (
            "amq.topic", f"{base}.eu",
        )
