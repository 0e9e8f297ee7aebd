"""Goal: one unacked AMQP delivery does not stop a queue once a full in-flight window of
later deliveries has been acked (the window bounds records in flight, not acked ones
behind an unacked one). Method: pika over a real Conveyor AMQP listener; publish one
window and a few more, hold the first delivery, ack the rest, expect the rest to come.
"""

from __future__ import annotations

from amqp_support import AmqpTarget, PikaConsumer, blocking_connection, unique

from conveyor.broker.shared_group import WINDOW_RECORDS_MAX

EXTRA = 5


def test_unacked_head_with_acked_window_keeps_delivering(amqp_target: AmqpTarget) -> None:
    queue = unique("pika-window")
    total = WINDOW_RECORDS_MAX + EXTRA
    with blocking_connection(amqp_target.url) as connection:
        channel = connection.channel()
        channel.queue_declare(queue)
        for index in range(total):
            channel.basic_publish("", queue, f"m{index}".encode())
        consumer = PikaConsumer(channel, queue)
        first = consumer.wait_for(WINDOW_RECORDS_MAX)[:WINDOW_RECORDS_MAX]
        for message in first[1:]:  # the first stays unacked
            channel.basic_ack(message.delivery_tag)
        received = consumer.wait_for(total)
        assert [m.body for m in received] == [f"m{i}".encode() for i in range(total)]
        channel.basic_ack(received[-1].delivery_tag, multiple=True)
        consumer.cancel()
        channel.queue_delete(queue)
