"""AMQP limits as RabbitMQ 4 applies them, checked with pika against a real listener.

Goal: pika's acceptance suite sends a 15.6 MB message; RabbitMQ 4 accepts bodies up to
16 MiB by default (``max_message_size``). Conveyor must accept them into a durable queue
with a publisher confirm and give the same bytes back, refuse one byte more on that
channel only (406), and treat an unknown exchange type as a channel error (406), as
RabbitMQ >= 3.13 does, leaving the connection open.
"""

from __future__ import annotations

import pika
import pika.exceptions
import pytest
from amqp_support import AmqpTarget, blocking_connection, confirming_channel, unique

PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
SIXTEEN_MIB = 16 << 20


def test_a_large_message_round_trips_with_a_confirm(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-large")
    body = bytes(range(256)) * (15_600_000 // 256)  # pika's acceptance suite: 15.6 MB
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue, durable=True)
        channel.basic_publish("", queue, body, PERSISTENT, mandatory=True)
        method, _properties, received = channel.basic_get(queue, auto_ack=True)
        assert method is not None
        assert received == body
        channel.queue_delete(queue)


def test_a_message_over_16_mib_closes_only_its_channel(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-too-large")
    with blocking_connection(amqp_target.url) as connection:
        channel = confirming_channel(connection)
        channel.queue_declare(queue)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            channel.basic_publish("", queue, b"x" * (SIXTEEN_MIB + 1))
        assert raised.value.reply_code == 406
        assert connection.is_open
        fresh = confirming_channel(connection)
        fresh.basic_publish("", queue, b"x" * SIXTEEN_MIB)  # exactly the limit is accepted
        method, _properties, received = fresh.basic_get(queue, auto_ack=True)
        assert method is not None and len(received) == SIXTEEN_MIB
        fresh.queue_delete(queue)


def test_unknown_exchange_type_is_a_channel_error(amqp_target: AmqpTarget) -> None:
    with blocking_connection(amqp_target.url) as connection:
        channel = connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            channel.exchange_declare(unique("pika-ex"), exchange_type="no-such-type")
        assert raised.value.reply_code == 406
        assert "PRECONDITION_FAILED" in raised.value.reply_text
        assert connection.is_open
        connection.channel().exchange_declare(unique("pika-ex"), exchange_type="fanout")
