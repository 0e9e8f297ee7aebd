"""Goal: kombu (py-amqp transport, the one Celery uses) works unchanged against Conveyor.

Method: one broker per module (``amqp_target``, or CONVEYOR_AMQP_TEST_URL for RabbitMQ),
unique names per test, publisher confirms on (``confirm_publish``). Covers declaring
through kombu entities, confirmed publish, manual-ack consume with prefetch, requeue
(redelivered flag), reject → dead-letter with x-death, queue TTL and message expiration,
priorities, topic and headers bindings, mandatory returns (on_return), reject-publish
overflow (MessageNacked), 404 / 405 / 406 channel errors, auto-delete and server-named
queues, message properties, basic.get, purge, SimpleQueue, redelivery when a consumer's
connection dies, and a broker restart: unacked durable messages come back and a publish
with ``retry=True`` on the old connection reconnects by itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import amqp.exceptions
import pytest
from amqp_support import (
    QUIET_S,
    ROUND_TRIP_HEADERS,
    WAIT_S,
    AmqpTarget,
    amqp_url,
    unique,
    x_death_entry,
)
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.message import Message

from conveyor.testing.server import BrokerThread


@pytest.fixture
def connection(amqp_target: AmqpTarget) -> Iterator[Connection]:
    with kombu_connection(amqp_target.url) as connected:
        yield connected


def kombu_connection(url: str) -> Connection:
    connected = Connection(url, transport_options={"confirm_publish": True},
                           connect_timeout=WAIT_S)
    connected.connect()
    return connected


class Collector:
    """A kombu Consumer's on_message target; ``wait_for`` drains connection events."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"expected {count} deliveries, got {len(self.messages)}"
            try:
                self.connection.drain_events(timeout=min(remaining, 0.5))
            except TimeoutError:
                continue
        return self.messages

    def settle_quietly(self, quiet_s: float = QUIET_S) -> list[Message]:
        deadline = time.monotonic() + quiet_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.connection.drain_events(timeout=remaining)
            except TimeoutError:
                break
        return self.messages


def consume(connection: Connection, queue: Queue, count: int, no_ack: bool = True,
            **options: Any) -> list[Message]:
    collector = Collector(connection)
    with Consumer(connection.default_channel, queues=[queue], on_message=collector,
                  no_ack=no_ack, **options):
        return collector.wait_for(count)[:count]


def drain(connection: Connection, queue: Queue) -> list[bytes]:
    bound = queue(connection.default_channel)
    bodies: list[bytes] = []
    while (message := bound.get(no_ack=True)) is not None:
        bodies.append(message.body)
    return bodies


def publish(connection: Connection, body: bytes, routing_key: str, exchange: Exchange | str = "",
            **options: Any) -> None:
    Producer(connection.default_channel).publish(
        body, exchange=exchange, routing_key=routing_key, retry=False, **options
    )


def test_declare_publish_confirmed_consume_with_prefetch(connection: Connection) -> None:
    queue = Queue(unique("kombu-basic"), exchange=Exchange("", type="direct"), durable=True)
    queue.routing_key = queue.name
    bound = queue(connection.default_channel)
    assert bound.declare() == queue.name
    assert tuple(bound.queue_declare(passive=True)) == (queue.name, 0, 0)
    for index in range(4):
        publish(connection, f"k{index}".encode(), queue.name, delivery_mode=2)

    collector = Collector(connection)
    with Consumer(connection.default_channel, queues=[queue], on_message=collector,
                  prefetch_count=2):
        collector.wait_for(2)
        assert len(collector.settle_quietly()) == 2, "prefetch_count=2 but more delivered"
        collector.messages[0].ack()
        collector.wait_for(3)
        assert len(collector.settle_quietly()) == 3
        for message in collector.messages[1:]:
            message.ack()
        collector.wait_for(4)
        collector.messages[3].ack()
    assert [message.body for message in collector.messages] == [b"k0", b"k1", b"k2", b"k3"]
    assert all(not message.delivery_info["redelivered"] for message in collector.messages)
    assert all(message.properties["delivery_mode"] == 2 for message in collector.messages)
    bound.delete()


def test_requeue_and_reject_to_dead_letter(connection: Connection) -> None:
    name = unique("kombu-dlx")
    dead_exchange = Exchange(f"{name}.dlx", type="direct")
    dead_letters = Queue(f"{name}.dlq", exchange=dead_exchange, routing_key=name)
    queue = Queue(name, queue_arguments={"x-dead-letter-exchange": dead_exchange.name})
    dead_letters(connection.default_channel).declare()
    queue(connection.default_channel).declare()
    publish(connection, b"bad", name)

    collector = Collector(connection)
    with Consumer(connection.default_channel, queues=[queue], on_message=collector):
        first = collector.wait_for(1)[0]
        assert not first.delivery_info["redelivered"]
        first.requeue()
        second = collector.wait_for(2)[1]
        assert second.body == b"bad"
        assert second.delivery_info["redelivered"]
        second.reject(requeue=False)

    dead = consume(connection, dead_letters, 1)[0]
    assert dead.body == b"bad"
    entry = x_death_entry(dead.headers)
    assert entry["reason"] == "rejected"
    assert entry["queue"] == name
    assert entry["count"] == 1
    assert entry["exchange"] == ""
    assert entry["routing-keys"] == [name]
    queue(connection.default_channel).delete()
    dead_letters(connection.default_channel).delete()
    dead_exchange(connection.default_channel).delete()


def test_queue_ttl_and_message_expiration(connection: Connection) -> None:
    name = unique("kombu-ttl")
    dead_exchange = Exchange(f"{name}.dlx", type="fanout")
    dead_letters = Queue(f"{name}.dlq", exchange=dead_exchange)
    queue_ttl = Queue(f"{name}.q", message_ttl=0.1,
                      queue_arguments={"x-dead-letter-exchange": dead_exchange.name})
    plain = Queue(f"{name}.plain")
    for queue in (dead_letters, queue_ttl, plain):
        queue(connection.default_channel).declare()
    publish(connection, b"queue ttl", queue_ttl.name)
    dead = consume(connection, dead_letters, 1)[0]
    assert dead.body == b"queue ttl"
    assert x_death_entry(dead.headers)["reason"] == "expired"

    # The same expiration on a queue without dead-lettering (published first) and on one
    # with it: once the dead letter arrives, the plain queue's copy has expired too.
    publish(connection, b"expiring", plain.name, expiration=0.1)
    publish(connection, b"expiring", queue_ttl.name, expiration=0.1)
    dead = consume(connection, dead_letters, 1)[0]
    assert dead.body == b"expiring"
    assert x_death_entry(dead.headers)["reason"] == "expired"
    publish(connection, b"lasting", plain.name)
    assert drain(connection, plain) == [b"lasting"]
    for queue in (dead_letters, queue_ttl, plain):
        queue(connection.default_channel).delete()
    dead_exchange(connection.default_channel).delete()


def test_priority_order(connection: Connection) -> None:
    queue = Queue(unique("kombu-priority"), max_priority=10)
    queue(connection.default_channel).declare()
    for priority in (1, 5, 9):
        publish(connection, f"p{priority}".encode(), queue.name, priority=priority)
    assert [message.body for message in consume(connection, queue, 3)] == [b"p9", b"p5", b"p1"]
    queue(connection.default_channel).delete()


def test_topic_and_headers_bindings(connection: Connection) -> None:
    base = unique("kombu-route")
    topic = Exchange(f"{base}.topic", type="topic")
    star = Queue(f"{base}.star", exchange=topic, routing_key="orders.*.created")
    hash_ = Queue(f"{base}.hash", exchange=Exchange("amq.topic", type="topic", passive=True),
                  routing_key=f"{base}.#")
    headers = Exchange(f"{base}.headers", type="headers")
    match_all = Queue(f"{base}.all", exchange=headers,
                      binding_arguments={"x-match": "all", "kind": "a", "zone": "eu"})
    match_any = Queue(f"{base}.any", exchange=headers,
                      binding_arguments={"x-match": "any", "kind": "a", "zone": "eu"})
    for queue in (star, hash_, match_all, match_any):
        queue(connection.default_channel).declare()

    publish(connection, b"eu", "orders.eu.created", exchange=topic)
    publish(connection, b"deep", "orders.eu.x.created", exchange=topic)
    publish(connection, b"hash", f"{base}.x.y", exchange="amq.topic")
    publish(connection, b"both", "", exchange=headers, headers={"kind": "a", "zone": "eu"})
    publish(connection, b"one", "", exchange=headers, headers={"kind": "a", "zone": "us"})
    assert drain(connection, star) == [b"eu"]
    assert drain(connection, hash_) == [b"hash"]
    assert drain(connection, match_all) == [b"both"]
    assert drain(connection, match_any) == [b"both", b"one"]
    for queue in (star, hash_, match_all, match_any):
        queue(connection.default_channel).delete()
    topic(connection.default_channel).delete()
    headers(connection.default_channel).delete()


def test_mandatory_return_and_reject_publish(connection: Connection) -> None:
    returned: list[tuple[Any, str, str, Any]] = []
    producer = Producer(connection.default_channel,
                        on_return=lambda *arguments: returned.append(arguments))
    key = unique("nowhere")
    producer.publish(b"lost", exchange="amq.direct", routing_key=key, mandatory=True, retry=False)
    assert len(returned) == 1, "basic.return precedes the confirm"
    error, exchange, routing_key, message = returned[0]
    assert isinstance(error, amqp.exceptions.AMQPError)
    assert (error.reply_code, error.reply_text) == (312, "NO_ROUTE")
    assert (exchange, routing_key, message.body) == ("amq.direct", key, b"lost")

    queue = Queue(unique("kombu-overflow"), max_length=1,
                  queue_arguments={"x-overflow": "reject-publish"})
    queue(connection.default_channel).declare()
    publish(connection, b"fits", queue.name)
    with pytest.raises(amqp.exceptions.MessageNacked):
        publish(connection, b"full", queue.name)
    assert drain(connection, queue) == [b"fits"]
    queue(connection.default_channel).delete()


def test_channel_errors(amqp_target: AmqpTarget, connection: Connection) -> None:
    with pytest.raises(amqp.exceptions.NotFound) as missing:
        Queue(unique("kombu-missing"))(connection.channel()).queue_declare(passive=True)
    assert missing.value.code == 404

    name = unique("kombu-conflict")
    Queue(name, max_length=3)(connection.default_channel).declare()
    with pytest.raises(amqp.exceptions.PreconditionFailed) as conflict:
        Queue(name, max_length=4)(connection.channel()).declare()
    assert conflict.value.code == 406

    exclusive = Queue(unique("kombu-exclusive"), exclusive=True)
    exclusive(connection.default_channel).declare()
    with kombu_connection(amqp_target.url) as other:
        with pytest.raises(amqp.exceptions.ResourceLocked) as locked:
            exclusive(other.channel()).queue_declare(passive=True)
        assert locked.value.code == 405
    publish(connection, b"usable", name)
    assert drain(connection, Queue(name, max_length=3)) == [b"usable"]
    Queue(name)(connection.default_channel).delete()


def test_properties_round_trip(connection: Connection) -> None:
    queue = Queue(unique("kombu-props"))
    queue(connection.default_channel).declare()
    timestamp_s = int(time.time())
    publish(
        connection, b"\x00binary\xff", queue.name,
        content_type="application/x-test", content_encoding="binary",
        headers=ROUND_TRIP_HEADERS, delivery_mode=1, priority=2,
        correlation_id="kc", reply_to="kr", expiration=60, message_id="km",
        timestamp=timestamp_s, type="kt", user_id="guest", app_id="ka",
    )
    message = consume(connection, queue, 1)[0]
    assert message.body == b"\x00binary\xff"
    assert message.content_type == "application/x-test"
    assert message.content_encoding == "binary"
    assert message.headers == ROUND_TRIP_HEADERS
    properties = message.properties
    assert properties["delivery_mode"] == 1
    assert properties["priority"] == 2
    assert properties["correlation_id"] == "kc"
    assert properties["reply_to"] == "kr"
    assert properties["expiration"] == "60000"
    assert properties["message_id"] == "km"
    timestamp = properties["timestamp"]
    assert (timestamp if isinstance(timestamp, int) else int(timestamp.timestamp())) == timestamp_s
    assert properties["type"] == "kt"
    assert properties["user_id"] == "guest"
    assert properties["app_id"] == "ka"
    queue(connection.default_channel).delete()


def test_get_purge_and_simple_queue(connection: Connection) -> None:
    queue = Queue(unique("kombu-get"))
    bound = queue(connection.default_channel)
    bound.declare()
    assert bound.get() is None
    for body in (b"1", b"2", b"3"):
        publish(connection, body, queue.name)
    message = bound.get()
    assert message is not None and message.body == b"1"
    message.ack()
    assert bound.purge() == 2
    assert bound.get() is None
    bound.delete()

    simple_name = unique("kombu-simple")
    simple = connection.SimpleQueue(simple_name)
    simple.put({"task": "resize", "size": 3})
    received = simple.get(block=True, timeout=WAIT_S)
    assert received.payload == {"task": "resize", "size": 3}
    received.ack()
    with pytest.raises(simple.Empty):
        simple.get_nowait()
    simple.close()
    Queue(simple_name)(connection.default_channel).delete()


def test_dead_consumer_connection_redelivers(amqp_target: AmqpTarget,
                                             connection: Connection) -> None:
    queue = Queue(unique("kombu-killed"))
    queue(connection.default_channel).declare()
    for body in (b"a", b"b", b"c"):
        publish(connection, body, queue.name)
    doomed = kombu_connection(amqp_target.url)
    collector = Collector(doomed)
    Consumer(doomed.default_channel, queues=[queue], on_message=collector,
             prefetch_count=2).consume()
    collector.wait_for(2)
    doomed.release()

    received = consume(connection, queue, 3)
    assert {message.body: message.delivery_info["redelivered"] for message in received} == {
        b"a": True, b"b": True, b"c": False,
    }
    queue(connection.default_channel).delete()


def test_auto_delete_and_server_named_queues(connection: Connection) -> None:
    anonymous = Queue("", exclusive=True)
    bound = anonymous(connection.default_channel)
    name = bound.declare()
    assert name, "the broker must name the queue"
    publish(connection, b"anonymous", name)
    assert drain(connection, Queue(name, exclusive=True)) == [b"anonymous"]

    auto = Queue(unique("kombu-autodelete"), auto_delete=True)
    auto(connection.default_channel).declare()
    consumer = Consumer(connection.default_channel, queues=[auto], on_message=lambda m: None)
    consumer.consume()
    consumer.cancel()
    with pytest.raises(amqp.exceptions.NotFound):
        Queue(auto.name)(connection.channel()).queue_declare(passive=True)


def test_restart_redelivers_unacked_and_publish_retry_reconnects(
    conveyor_thread: BrokerThread,
) -> None:
    url = amqp_url(conveyor_thread.ports["amqp"])
    queue = Queue(unique("kombu-restart"), durable=True)
    bodies = [f"d{index}".encode() for index in range(4)]
    connection = kombu_connection(url)
    try:
        queue(connection.default_channel).declare()
        for body in bodies:
            publish(connection, body, queue.name, delivery_mode=2)
        collector = Collector(connection)
        Consumer(connection.default_channel, queues=[queue], on_message=collector,
                 prefetch_count=2).consume()
        collector.wait_for(2)  # two delivered, never acked

        conveyor_thread.restart()
        before = connection.connection
        Producer(connection).publish(
            b"after restart", routing_key=queue.name, delivery_mode=2, retry=True,
            retry_policy={"max_retries": 5, "interval_start": 0, "interval_step": 0.2},
        )
        assert connection.connection is not before, "kombu did not have to reconnect"
    finally:
        connection.release()

    with kombu_connection(url) as fresh:
        received = consume(fresh, queue, 5, no_ack=False)
        assert sorted(message.body for message in received) == sorted([*bodies, b"after restart"])
        for message in received:
            message.ack()
