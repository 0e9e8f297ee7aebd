"""Goal: pika (BlockingConnection and the asynchronous SelectConnection) works unchanged
against Conveyor's AMQP 0-9-1 listener, exactly as against RabbitMQ.

Method: one broker per module (``amqp_target``; set CONVEYOR_AMQP_TEST_URL to run the
same assertions against RabbitMQ), unique names per test. Covers declare / confirmed
publish / manual-ack consume, prefetch limits, nack-requeue redelivery, dead-lettering
with x-death (rejected, expired, delivery limit), queue and message TTL, priorities,
topic and headers routing, mandatory returns, exclusive / auto-delete / server-named
queues, channel errors (404, 405, 406) that leave the connection usable, the full set of
message properties, basic.get, purge, redelivery after a consumer's connection dies,
direct reply-to RPC, reject-publish overflow, and durability across a broker restart
(in-process restart and kill -9 of a ``conveyor serve`` child). Beyond that: transactions,
basic.recover, alternate exchanges and exchange-to-exchange bindings, consumer cancel
notifications, single active consumer, drop-head overflow with x-dead-letter-routing-key,
406 on an unknown delivery tag, a refused password and heartbeats on an idle connection.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from amqp_support import (
    ROUND_TRIP_HEADERS,
    WAIT_S,
    AmqpTarget,
    PikaConsumer,
    amqp_url,
    blocking_connection,
    confirming_channel,
    consume,
    get_all,
    publish_confirmed,
    skip_if_external,
    unique,
    wait_until,
    x_death_entry,
)

from conveyor.testing.server import BrokerProcess, BrokerThread

PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)


def test_declare_confirmed_publish_and_manual_ack_consume(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-basic")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        declared = channel.queue_declare(queue, durable=True)
        assert declared.method.queue == queue
        assert declared.method.message_count == 0
        assert declared.method.consumer_count == 0

        bodies = [f"message {index}".encode() for index in range(5)]
        publish_confirmed(channel, "", queue, bodies, PERSISTENT)
        assert channel.queue_declare(queue, passive=True).method.message_count == 5

        consumer = PikaConsumer(channel, queue)
        received = consumer.wait_for(5)
        assert [message.body for message in received] == bodies
        assert all(not message.redelivered for message in received)
        assert all(message.method.routing_key == queue for message in received)
        assert all(message.method.exchange == "" for message in received)
        channel.basic_ack(received[-1].delivery_tag, multiple=True)
        consumer.cancel()
        channel.queue_delete(queue)


def test_prefetch_limits_unacked_deliveries(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-prefetch")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue)
        publish_confirmed(channel, "", queue, [f"m{index}".encode() for index in range(6)])
        channel.basic_qos(prefetch_count=2)

        consumer = PikaConsumer(channel, queue)
        consumer.wait_for(2)
        assert len(consumer.settle_quietly()) == 2, "prefetch_count=2 but more were delivered"

        channel.basic_ack(consumer.messages[0].delivery_tag)
        consumer.wait_for(3)
        assert len(consumer.settle_quietly()) == 3, "one ack must free exactly one slot"

        channel.basic_ack(consumer.messages[2].delivery_tag, multiple=True)
        consumer.wait_for(5)
        assert [message.body for message in consumer.settle_quietly()] == [
            b"m0", b"m1", b"m2", b"m3", b"m4",
        ]
        consumer.cancel()
        channel.queue_delete(queue)


def test_nack_with_requeue_redelivers_with_flag(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-nack")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue)
        publish_confirmed(channel, "", queue, [b"again"])

        consumer = PikaConsumer(channel, queue)
        first = consumer.wait_for(1)[0]
        assert not first.redelivered
        channel.basic_nack(first.delivery_tag, requeue=True)
        second = consumer.wait_for(2)[1]
        assert second.body == b"again"
        assert second.redelivered
        channel.basic_reject(second.delivery_tag, requeue=True)
        third = consumer.wait_for(3)[2]
        assert third.redelivered
        channel.basic_ack(third.delivery_tag)
        consumer.cancel()
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
        channel.queue_delete(queue)


def declare_dead_letter_pair(channel: Any, queue: str, arguments: dict[str, Any]) -> str:
    """A queue whose dead letters go through a direct exchange to ``<queue>.dlq``."""
    exchange = f"{queue}.dlx"
    dead_letters = f"{queue}.dlq"
    channel.exchange_declare(exchange, "direct")
    channel.queue_declare(dead_letters)
    channel.queue_bind(dead_letters, exchange, routing_key=queue)
    channel.queue_declare(queue, arguments={"x-dead-letter-exchange": exchange, **arguments})
    return dead_letters


def cleanup(channel: Any, queue: str) -> None:
    channel.queue_delete(queue)
    channel.queue_delete(f"{queue}.dlq")
    channel.exchange_delete(f"{queue}.dlx")


def test_reject_without_requeue_dead_letters_with_x_death(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-reject")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        dead_letters = declare_dead_letter_pair(channel, queue, {})
        publish_confirmed(channel, "", queue, [b"poison"],
                          pika.BasicProperties(headers={"origin": "test"}))

        # The dead-letter consumer is already waiting when the message is rejected.
        dead_consumer = PikaConsumer(channel, dead_letters, auto_ack=True)
        consumer = PikaConsumer(channel, queue)
        delivery = consumer.wait_for(1)[0]
        channel.basic_reject(delivery.delivery_tag, requeue=False)
        consumer.cancel()

        dead = dead_consumer.wait_for(1)[0]
        dead_consumer.cancel()
        assert dead.body == b"poison"
        assert (dead.method.exchange, dead.method.routing_key) == (f"{queue}.dlx", queue)
        assert dead.properties.headers["origin"] == "test"
        entry = x_death_entry(dead.properties.headers)
        assert entry["queue"] == queue
        assert entry["reason"] == "rejected"
        assert entry["count"] == 1
        assert entry["exchange"] == ""
        assert entry["routing-keys"] == [queue]
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
        cleanup(channel, queue)


def test_queue_ttl_dead_letters_as_expired(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-qttl")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        dead_letters = declare_dead_letter_pair(channel, queue, {"x-message-ttl": 100})
        plain = f"{queue}.plain"
        channel.queue_declare(plain, arguments={"x-message-ttl": 100})
        fanout = f"{queue}.fan"
        channel.exchange_declare(fanout, "fanout")
        channel.queue_bind(queue, fanout)
        channel.queue_bind(plain, fanout)
        publish_confirmed(channel, fanout, queue, [b"short-lived"])

        dead = consume(channel, dead_letters, 1)[0]
        assert dead.body == b"short-lived"
        entry = x_death_entry(dead.properties.headers)
        assert entry["reason"] == "expired"
        assert entry["queue"] == queue
        assert entry["exchange"] == fanout
        # The twin in the queue without a dead-letter exchange expired at the same time: gone.
        assert channel.basic_get(plain, auto_ack=True)[0] is None
        assert channel.basic_get(queue, auto_ack=True)[0] is None
        channel.queue_delete(plain)
        channel.exchange_delete(fanout)
        cleanup(channel, queue)


def test_message_expiration_dead_letters_or_drops(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-mttl")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        dead_letters = declare_dead_letter_pair(channel, queue, {})
        plain = f"{queue}.plain"
        channel.queue_declare(plain)
        fanout = f"{queue}.fan"
        channel.exchange_declare(fanout, "fanout")
        channel.queue_bind(queue, fanout)
        channel.queue_bind(plain, fanout)
        publish_confirmed(channel, fanout, queue, [b"ephemeral"],
                          pika.BasicProperties(expiration="100"))
        publish_confirmed(channel, "", plain, [b"durable"])

        dead = consume(channel, dead_letters, 1)[0]
        assert dead.body == b"ephemeral"
        entry = x_death_entry(dead.properties.headers)
        assert entry["reason"] == "expired"
        assert entry["queue"] == queue
        # The expired twin is gone from the plain queue; the message without expiration stays.
        assert get_all(channel, plain) == [b"durable"]
        channel.queue_delete(plain)
        channel.exchange_delete(fanout)
        cleanup(channel, queue)


def test_priority_queue_delivers_highest_first(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-priority")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue, arguments={"x-max-priority": 10})
        for priority in (1, 5, 9):
            publish_confirmed(channel, "", queue, [f"p{priority}".encode()],
                              pika.BasicProperties(priority=priority))
        received = consume(channel, queue, 3)
        assert [message.body for message in received] == [b"p9", b"p5", b"p1"]
        assert [message.properties.priority for message in received] == [9, 5, 1]
        channel.queue_delete(queue)


@pytest.mark.parametrize("predeclared", [True, False], ids=["amq.topic", "declared"])
def test_topic_routing_with_wildcards(amqp_target: AmqpTarget, predeclared: bool) -> None:
    base = unique("pika-topic")
    exchange = "amq.topic" if predeclared else f"{base}.x"
    star, hash_ = f"{base}.star", f"{base}.hash"
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        if not predeclared:
            channel.exchange_declare(exchange, "topic")
        channel.queue_declare(star)
        channel.queue_declare(hash_)
        channel.queue_bind(star, exchange, routing_key=f"{base}.*.created")
        channel.queue_bind(hash_, exchange, routing_key=f"{base}.#")
        for key in ("eu.created", "eu.x.created", "", "eu.deleted"):
            routing_key = f"{base}.{key}" if key else base
            publish_confirmed(channel, exchange, routing_key, [routing_key.encode()])
        publish_confirmed(channel, exchange, "other.eu.created", [b"nobody"])

        assert get_all(channel, star) == [f"{base}.eu.created".encode()]
        assert get_all(channel, hash_) == [
            f"{base}.eu.created".encode(), f"{base}.eu.x.created".encode(),
            base.encode(), f"{base}.eu.deleted".encode(),
        ]
        channel.queue_delete(star)
        channel.queue_delete(hash_)
        if not predeclared:
            channel.exchange_delete(exchange)


def test_headers_exchange_all_and_any(amqp_target: AmqpTarget) -> None:
    base = unique("pika-headers")
    exchange, match_all, match_any = f"{base}.x", f"{base}.all", f"{base}.any"
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.exchange_declare(exchange, "headers")
        channel.queue_declare(match_all)
        channel.queue_declare(match_any)
        channel.queue_bind(match_all, exchange,
                           arguments={"x-match": "all", "format": "pdf", "type": "report"})
        channel.queue_bind(match_any, exchange,
                           arguments={"x-match": "any", "format": "pdf", "type": "log"})
        messages = {
            b"both": {"format": "pdf", "type": "report"},
            b"any-only": {"format": "zip", "type": "log"},
            b"none": {"format": "zip", "type": "report"},
            b"no-headers": None,
        }
        for body, headers in messages.items():
            publish_confirmed(channel, exchange, "", [body], pika.BasicProperties(headers=headers))

        assert get_all(channel, match_all) == [b"both"]
        assert get_all(channel, match_any) == [b"both", b"any-only"]
        channel.queue_delete(match_all)
        channel.queue_delete(match_any)
        channel.exchange_delete(exchange)


def test_mandatory_unroutable_publish_is_returned(amqp_target: AmqpTarget) -> None:
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        with pytest.raises(pika.exceptions.UnroutableError) as raised:
            channel.basic_publish("amq.direct", unique("nowhere"), b"lost", mandatory=True)
        returned = raised.value.messages[0]
        assert returned.body == b"lost"
        assert returned.method.reply_code == 312
        assert returned.method.reply_text == "NO_ROUTE"
        assert returned.method.exchange == "amq.direct"
        # Without mandatory the same publish is simply confirmed (and dropped).
        channel.basic_publish("amq.direct", unique("nowhere"), b"dropped")
        assert channel.is_open


def test_exclusive_queue_is_locked_for_other_connections(amqp_target: AmqpTarget) -> None:
    with blocking_connection(amqp_target.url) as owner, \
            blocking_connection(amqp_target.url) as other:
        owner_channel = owner.channel()
        queue = owner_channel.queue_declare(unique("pika-exclusive"), exclusive=True).method.queue
        other_channel = other.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            other_channel.basic_consume(queue, lambda *arguments: None)
        assert raised.value.reply_code == 405
        assert "RESOURCE_LOCKED" in raised.value.reply_text
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised_again:
            other.channel().queue_declare(queue, passive=True)
        assert raised_again.value.reply_code == 405
        assert other.is_open
        # The owner still uses it; when the owner's connection closes, the queue goes.
        owner_channel.basic_publish("", queue, b"mine")
        assert consume(owner_channel, queue, 1)[0].body == b"mine"
        owner.close()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as missing:
            other.channel().queue_declare(queue, passive=True)
        assert missing.value.reply_code == 404


def test_auto_delete_queue_goes_with_last_consumer(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-autodelete")
    with blocking_connection(amqp_target.url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, auto_delete=True)
        first = channel.basic_consume(queue, lambda *arguments: None)
        second = channel.basic_consume(queue, lambda *arguments: None)
        channel.basic_cancel(first)
        assert channel.queue_declare(queue, passive=True).method.consumer_count == 1
        channel.basic_cancel(second)

        probe = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            probe.queue_declare(queue, passive=True)
        assert raised.value.reply_code == 404


def test_server_named_queue(amqp_target: AmqpTarget) -> None:
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        declared = channel.queue_declare("", exclusive=True)
        name = declared.method.queue
        assert name, "the broker must name the queue"
        other = channel.queue_declare("", exclusive=True).method.queue
        assert other != name
        channel.basic_publish("", name, b"to a generated name")
        assert get_all(channel, name) == [b"to a generated name"]


def test_passive_declare_of_missing_queue_closes_only_the_channel(
    amqp_target: AmqpTarget,
) -> None:
    with blocking_connection(amqp_target.url) as connection:
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            channel.queue_declare(unique("pika-missing"), passive=True)
        assert raised.value.reply_code == 404
        assert "NOT_FOUND" in raised.value.reply_text
        assert channel.is_closed
        assert connection.is_open
        fresh = confirming_channel(connection)
        queue = unique("pika-after-404")
        fresh.queue_declare(queue)
        fresh.basic_publish("", queue, b"still works")
        assert get_all(fresh, queue) == [b"still works"]
        fresh.queue_delete(queue)


def test_redeclare_with_other_arguments_is_precondition_failed(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-conflict")
    with blocking_connection(amqp_target.url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, arguments={"x-max-length": 10})
        # The identical declaration is fine.
        channel.queue_declare(queue, arguments={"x-max-length": 10})
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            channel.queue_declare(queue, arguments={"x-max-length": 20})
        assert raised.value.reply_code == 406
        assert "PRECONDITION_FAILED" in raised.value.reply_text
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as durable:
            connection.channel().queue_declare(queue, durable=True, arguments={"x-max-length": 10})
        assert durable.value.reply_code == 406
        assert connection.is_open
        connection.channel().queue_delete(queue)


def test_message_properties_round_trip(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-props")
    timestamp_s = int(time.time())
    properties = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=ROUND_TRIP_HEADERS,
        delivery_mode=2,
        priority=3,
        correlation_id="corr-1",
        reply_to="reply-queue",
        expiration="60000",
        message_id="msg-1",
        timestamp=timestamp_s,
        type="greeting",
        user_id="guest",
        app_id="pika-tests",
    )
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue)
        channel.basic_publish("", queue, b'{"hello": "world"}', properties)
        received = consume(channel, queue, 1)[0]
        got = received.properties
        assert received.body == b'{"hello": "world"}'
        assert got.content_type == "application/json"
        assert got.content_encoding == "utf-8"
        assert got.delivery_mode == 2
        assert got.priority == 3
        assert got.correlation_id == "corr-1"
        assert got.reply_to == "reply-queue"
        assert got.expiration == "60000"
        assert got.message_id == "msg-1"
        assert got.timestamp == timestamp_s
        assert got.type == "greeting"
        assert got.user_id == "guest"
        assert got.app_id == "pika-tests"
        assert got.headers == ROUND_TRIP_HEADERS

        # A user_id that is not the connection's user is refused (406, channel closed).
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            channel.basic_publish("", queue, b"x", pika.BasicProperties(user_id="mallory"))
        assert raised.value.reply_code == 406
        connection.channel().queue_delete(queue)


def test_basic_get_and_get_empty(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-get")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue)
        assert channel.basic_get(queue) == (None, None, None)
        publish_confirmed(channel, "", queue, [b"one", b"two"],
                          pika.BasicProperties(correlation_id="c"))

        method, properties, body = channel.basic_get(queue)
        assert isinstance(method, pika.spec.Basic.GetOk)
        assert body == b"one"
        assert method.message_count == 1
        assert not method.redelivered
        assert properties.correlation_id == "c"
        channel.basic_nack(method.delivery_tag, requeue=True)

        method, _properties, body = channel.basic_get(queue)
        assert body == b"one" and method.redelivered
        channel.basic_ack(method.delivery_tag)
        method, _properties, body = channel.basic_get(queue, auto_ack=True)
        assert body == b"two" and method.message_count == 0
        assert channel.basic_get(queue) == (None, None, None)
        channel.queue_delete(queue)


def test_purge_drops_ready_messages(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-purge")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue)
        publish_confirmed(channel, "", queue, [b"a", b"b", b"c"])
        assert channel.queue_purge(queue).method.message_count == 3
        assert channel.basic_get(queue) == (None, None, None)
        publish_confirmed(channel, "", queue, [b"after"])
        assert get_all(channel, queue) == [b"after"]
        assert channel.queue_delete(queue).method.message_count == 0


def test_consumer_connection_lost_redelivers_unacked(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-killed")
    bodies = [f"job {index}".encode() for index in range(5)]
    with blocking_connection(amqp_target.url) as survivor:
        channel = confirming_channel(survivor)
        channel.queue_declare(queue)
        publish_confirmed(channel, "", queue, bodies)

        doomed = pika.BlockingConnection(pika.URLParameters(amqp_target.url))
        doomed_channel = doomed.channel()
        doomed_channel.basic_qos(prefetch_count=3)
        victim = PikaConsumer(doomed_channel, queue)
        taken = victim.wait_for(3)
        doomed_channel.basic_ack(taken[0].delivery_tag)
        victim.wait_for(4)  # the ack freed one slot
        assert [message.body for message in victim.settle_quietly()] == bodies[:4]
        doomed.close()  # jobs 1..3 delivered, never acked

        received = consume(channel, queue, 4, auto_ack=False)
        by_body = {message.body: message for message in received}
        assert set(by_body) == set(bodies[1:])
        assert [by_body[body].redelivered for body in bodies[1:]] == [True, True, True, False]
        channel.queue_delete(queue)


def publish_durable_and_leave_unacked(url: str, queue: str, bodies: list[bytes]) -> None:
    """Declare a durable queue, publish persistent messages with confirms, then take two
    of them without acking (the connection is left to die with the broker)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = confirming_channel(connection)
    channel.queue_declare(queue, durable=True)
    publish_confirmed(channel, "", queue, bodies, PERSISTENT)
    channel.basic_qos(prefetch_count=2)
    PikaConsumer(channel, queue).wait_for(2)


def assert_all_back(url: str, queue: str, bodies: list[bytes]) -> None:
    with blocking_connection(url) as connection:
        channel = connection.channel()
        declared = channel.queue_declare(queue, durable=True, passive=True)
        assert declared.method.message_count == len(bodies)
        received = consume(channel, queue, len(bodies), auto_ack=False)
        assert sorted(message.body for message in received) == sorted(bodies)
        assert all(message.properties.delivery_mode == 2 for message in received)
        channel.basic_ack(received[-1].delivery_tag, multiple=True)


def test_durable_queue_survives_broker_restart(conveyor_thread: BrokerThread) -> None:
    url = amqp_url(conveyor_thread.ports["amqp"])
    queue = unique("pika-restart")
    bodies = [f"durable {index}".encode() for index in range(5)]
    publish_durable_and_leave_unacked(url, queue, bodies)
    conveyor_thread.restart()
    assert_all_back(url, queue, bodies)


def test_durable_queue_survives_kill_9(tmp_path: Path) -> None:
    skip_if_external("kills the broker")
    queue = unique("pika-kill9")
    bodies = [f"survivor {index}".encode() for index in range(5)]
    process = BrokerProcess(tmp_path / "data", listeners=("amqp",))
    with process:
        url = amqp_url(process.ports["amqp"])
        publish_durable_and_leave_unacked(url, queue, bodies)
        process.kill()
        process.start()
        assert_all_back(url, queue, bodies)


def test_direct_reply_to_rpc(amqp_target: AmqpTarget) -> None:
    requests = unique("pika-rpc")
    with blocking_connection(amqp_target.url) as server_connection, \
            blocking_connection(amqp_target.url) as client_connection:
        server_channel = server_connection.channel()
        server_channel.queue_declare(requests)

        def serve(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            channel.basic_publish(
                "", properties.reply_to, body.upper(),
                pika.BasicProperties(correlation_id=properties.correlation_id),
            )
            channel.basic_ack(method.delivery_tag)

        server_channel.basic_consume(requests, serve)

        client_channel = client_connection.channel()
        replies: list[tuple[Any, bytes]] = []
        client_channel.basic_consume(
            "amq.rabbitmq.reply-to",
            lambda channel, method, properties, body: replies.append((properties, body)),
            auto_ack=True,
        )
        for index in range(2):
            client_channel.basic_publish(
                "", requests, f"ping {index}".encode(),
                pika.BasicProperties(reply_to="amq.rabbitmq.reply-to",
                                     correlation_id=f"call-{index}"),
            )
        deadline = time.monotonic() + WAIT_S
        while len(replies) < 2 and time.monotonic() < deadline:
            server_connection.process_data_events(time_limit=0.05)
            client_connection.process_data_events(time_limit=0.05)
        assert [(properties.correlation_id, body) for properties, body in replies] == [
            ("call-0", b"PING 0"), ("call-1", b"PING 1"),
        ]
        server_channel.queue_delete(requests)


def test_quorum_delivery_limit_dead_letters(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-quorum")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        exchange, dead_letters = f"{queue}.dlx", f"{queue}.dlq"
        channel.exchange_declare(exchange, "fanout")
        channel.queue_declare(dead_letters)
        channel.queue_bind(dead_letters, exchange)
        channel.queue_declare(queue, durable=True, arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": exchange,
        })
        publish_confirmed(channel, "", queue, [b"flaky"], PERSISTENT)

        consumer = PikaConsumer(channel, queue)
        deliveries = 0
        for _ in range(3):
            message = consumer.wait_for(deliveries + 1)[deliveries]
            deliveries += 1
            assert message.redelivered == (deliveries > 1)
            channel.basic_nack(message.delivery_tag, requeue=True)
        dead = consume(channel, dead_letters, 1)[0]
        assert len(consumer.settle_quietly()) == 3, "delivered again past x-delivery-limit"
        consumer.cancel()
        assert dead.body == b"flaky"
        entry = x_death_entry(dead.properties.headers)
        assert entry["queue"] == queue
        assert entry["reason"] == "delivery_limit"
        channel.queue_delete(queue)
        channel.queue_delete(dead_letters)
        channel.exchange_delete(exchange)


def test_max_length_reject_publish_nacks_the_publisher(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-overflow")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
        publish_confirmed(channel, "", queue, [b"one", b"two"])
        with pytest.raises(pika.exceptions.NackError):
            channel.basic_publish("", queue, b"three")
        assert channel.is_open
        assert get_all(channel, queue) == [b"one", b"two"]
        publish_confirmed(channel, "", queue, [b"room again"])
        assert get_all(channel, queue) == [b"room again"]
        channel.queue_delete(queue)


class AsyncScenario:
    """SelectConnection: connect, declare, confirm-publish, consume with manual ack (prefetch 1)."""

    def __init__(self, url: str, queue: str, count: int) -> None:
        self.queue = queue
        self.count = count
        self.confirmed: set[int] = set()
        self.nacked: set[int] = set()
        self.received: list[tuple[bytes, bool]] = []
        self.unacked_peak = 0
        self.unacked = 0
        self.error: str | None = None
        self.channel: Any = None
        self.connection = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=self.on_open,
            on_open_error_callback=self.on_failure,
            on_close_callback=self.on_closed,
        )

    def run(self) -> None:
        self.connection.ioloop.call_later(WAIT_S, self.on_timeout)
        self.connection.ioloop.start()

    def on_timeout(self) -> None:
        self.error = self.error or "timed out"
        self.connection.ioloop.stop()

    def on_failure(self, connection: Any, error: Any) -> None:
        self.error = f"connection failed: {error!r}"
        connection.ioloop.stop()

    def on_closed(self, connection: Any, reason: Any) -> None:
        if len(self.received) < self.count:
            self.error = self.error or f"connection closed early: {reason!r}"
        connection.ioloop.stop()

    def on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self.on_channel)

    def on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.confirm_delivery(self.on_confirm, callback=lambda frame: self.declare())

    def on_channel_closed(self, channel: Any, reason: Any) -> None:
        if len(self.received) < self.count:
            self.error = self.error or f"channel closed: {reason!r}"
            self.connection.close()

    def declare(self) -> None:
        self.channel.queue_declare(self.queue, durable=True, callback=self.on_declared)

    def on_declared(self, frame: Any) -> None:
        assert frame.method.queue == self.queue
        for index in range(self.count):
            self.channel.basic_publish("", self.queue, f"async {index}".encode(), PERSISTENT)

    def on_confirm(self, frame: Any) -> None:
        tags = self.confirmed if isinstance(frame.method, pika.spec.Basic.Ack) else self.nacked
        last = frame.method.delivery_tag
        settled = self.confirmed | self.nacked
        first = last if not frame.method.multiple else min(
            (tag for tag in range(1, last + 1) if tag not in settled), default=last
        )
        tags.update(range(first, last + 1))
        if len(self.confirmed) + len(self.nacked) < self.count:
            return
        if self.nacked:
            self.error = f"publishes nacked: {sorted(self.nacked)}"
            self.connection.close()
        else:
            self.channel.basic_qos(prefetch_count=1, callback=lambda frame: self.consume())

    def consume(self) -> None:
        self.channel.basic_consume(self.queue, self.on_message)

    def on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.unacked += 1
        self.unacked_peak = max(self.unacked_peak, self.unacked)
        self.received.append((body, method.redelivered))
        # Ack on a later loop turn, so that prefetch could be exceeded if not enforced.
        self.connection.ioloop.call_later(0.01, lambda: self.ack(method.delivery_tag))

    def ack(self, delivery_tag: int) -> None:
        self.unacked -= 1
        self.channel.basic_ack(delivery_tag)
        if len(self.received) == self.count:
            self.channel.queue_delete(self.queue, callback=lambda frame: self.connection.close())


def test_select_connection_scenario(amqp_target: AmqpTarget) -> None:
    scenario = AsyncScenario(amqp_target.url, unique("pika-async"), count=5)
    scenario.run()
    assert scenario.error is None, scenario.error
    assert scenario.confirmed == {1, 2, 3, 4, 5}
    assert scenario.received == [(f"async {index}".encode(), False) for index in range(5)]
    assert scenario.unacked_peak == 1


# --- Beyond the list: more of what docs/amqp.md promises, checked against RabbitMQ too.


def test_transactions_commit_and_rollback(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-tx")
    with blocking_connection(amqp_target.url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue)
        channel.tx_select()
        channel.basic_publish("", queue, b"rolled back")
        channel.tx_rollback()
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
        channel.basic_publish("", queue, b"committed")
        channel.tx_commit()
        assert channel.queue_declare(queue, passive=True).method.message_count == 1

        # Acks inside a transaction take effect on commit only.
        method, _properties, body = channel.basic_get(queue)
        assert body == b"committed"
        channel.basic_ack(method.delivery_tag)
        channel.tx_rollback()
        channel.basic_recover(requeue=True)
        method, _properties, body = channel.basic_get(queue)
        assert body == b"committed" and method.redelivered
        channel.basic_ack(method.delivery_tag)
        channel.tx_commit()
        assert channel.queue_declare(queue, passive=True).method.message_count == 0
        channel.queue_delete(queue)


def test_basic_recover_redelivers_unacked(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-recover")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue)
        publish_confirmed(channel, "", queue, [b"r1", b"r2"])
        consumer = PikaConsumer(channel, queue)
        consumer.wait_for(2)
        channel.basic_recover(requeue=True)
        again = consumer.wait_for(4)[2:]
        assert sorted(message.body for message in again) == [b"r1", b"r2"]
        assert all(message.redelivered for message in again)
        channel.basic_ack(again[-1].delivery_tag, multiple=True)
        consumer.cancel()
        channel.queue_delete(queue)


def test_alternate_exchange_and_exchange_to_exchange_bindings(amqp_target: AmqpTarget) -> None:
    base = unique("pika-ae")
    front, alternate, inner = f"{base}.front", f"{base}.alt", f"{base}.inner"
    fallback, bound = f"{base}.fallback", f"{base}.bound"
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.exchange_declare(alternate, "fanout")
        channel.exchange_declare(front, "direct", arguments={"alternate-exchange": alternate})
        channel.exchange_declare(inner, "topic")
        channel.exchange_bind(destination=inner, source=front, routing_key="orders")
        channel.queue_declare(fallback)
        channel.queue_declare(bound)
        channel.queue_bind(fallback, alternate)
        channel.queue_bind(bound, inner, routing_key="#")
        # Routed through the exchange-to-exchange binding; unroutable ones reach the
        # alternate exchange, so a mandatory publish is not returned.
        publish_confirmed(channel, front, "orders", [b"order"], mandatory=True)
        publish_confirmed(channel, front, "unknown", [b"stray"], mandatory=True)
        assert get_all(channel, bound) == [b"order"]
        assert get_all(channel, fallback) == [b"stray"]
        channel.exchange_unbind(destination=inner, source=front, routing_key="orders")
        publish_confirmed(channel, front, "orders", [b"after unbind"])
        assert get_all(channel, fallback) == [b"after unbind"]
        for queue in (fallback, bound):
            channel.queue_delete(queue)
        for exchange in (front, alternate, inner):
            channel.exchange_delete(exchange)


def test_deleting_a_queue_cancels_its_consumers(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-cancel-notify")
    with blocking_connection(amqp_target.url) as connection, \
            blocking_connection(amqp_target.url) as admin:
        channel = connection.channel()
        channel.queue_declare(queue)
        cancelled: list[Any] = []
        channel.add_on_cancel_callback(cancelled.append)
        channel.basic_consume(queue, lambda *arguments: None)
        admin.channel().queue_delete(queue)
        assert wait_until(connection, lambda: bool(cancelled)), "no basic.cancel from the broker"
        assert isinstance(cancelled[0].method, pika.spec.Basic.Cancel)
        assert channel.is_open


def test_single_active_consumer(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-sac")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue, arguments={"x-single-active-consumer": True})
        first = PikaConsumer(connection.channel(), queue, auto_ack=True)
        second = PikaConsumer(connection.channel(), queue, auto_ack=True)
        publish_confirmed(channel, "", queue, [b"s1", b"s2", b"s3"])
        assert [message.body for message in first.wait_for(3)] == [b"s1", b"s2", b"s3"]
        assert second.settle_quietly() == []
        first.cancel()
        publish_confirmed(channel, "", queue, [b"s4"])
        assert [message.body for message in second.wait_for(1)] == [b"s4"]
        second.cancel()
        channel.queue_delete(queue)


def test_drop_head_overflow_dead_letters_with_routing_key(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-maxlen")
    dead_letters = f"{queue}.dlq"
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(dead_letters)
        channel.queue_declare(queue, arguments={
            "x-max-length": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead_letters,
        })
        publish_confirmed(channel, "", queue, [b"oldest", b"middle", b"newest"])
        assert get_all(channel, queue) == [b"middle", b"newest"]
        dead = consume(channel, dead_letters, 1)[0]
        assert dead.body == b"oldest"
        entry = x_death_entry(dead.properties.headers)
        assert entry["reason"] == "maxlen"
        assert entry["queue"] == queue
        assert entry["routing-keys"] == [queue]
        assert (dead.method.exchange, dead.method.routing_key) == ("", dead_letters)
        channel.queue_delete(queue)
        channel.queue_delete(dead_letters)


def test_ack_of_unknown_delivery_tag_closes_the_channel(amqp_target: AmqpTarget) -> None:
    with blocking_connection(amqp_target.url) as connection:
        channel = connection.channel()
        channel.basic_ack(delivery_tag=999)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            channel.queue_declare(unique("pika-after-bad-ack"))
        assert raised.value.reply_code == 406
        assert connection.is_open


def test_wrong_password_is_refused(amqp_target: AmqpTarget) -> None:
    parameters = pika.URLParameters(amqp_target.url)
    parameters.credentials = pika.PlainCredentials("guest", "not-the-password")
    parameters.connection_attempts = 1
    with pytest.raises((pika.exceptions.ProbableAuthenticationError,
                        pika.exceptions.AuthenticationError)):
        pika.BlockingConnection(parameters)


def test_idle_connection_with_short_heartbeat_stays_open(amqp_target: AmqpTarget) -> None:
    parameters = pika.URLParameters(amqp_target.url)
    parameters.heartbeat = 1
    connection = pika.BlockingConnection(parameters)
    try:
        assert connection._impl._heartbeat_checker is not None  # heartbeats were negotiated
        received_before = connection._impl.bytes_received
        connection.process_data_events(time_limit=3.5)  # idle: only heartbeats flow
        assert connection.is_open
        assert connection._impl.bytes_received > received_before, "no heartbeat from broker"
        queue = connection.channel().queue_declare("", exclusive=True).method.queue
        assert queue
    finally:
        if connection.is_open:
            connection.close()
