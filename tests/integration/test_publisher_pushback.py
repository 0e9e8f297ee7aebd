"""Over the memory high-water mark the heaviest publisher is pushed back in its own
protocol's terms while a light one goes on (issue 9 item 6, bulk publishing).

Goal: one tenant's burst does not stall everyone else: a Kafka connection holding most
of the bytes in flight gets a delayed produce answer whose throttle_time_ms reports the
wait, while another connection's produce is answered at once; when the total falls
back the held produce completes. An AMQP connection whose message is over the mark
gets connection.blocked then unblocked while a light one publishing meanwhile is
never blocked. Method: real servers with a 64 KiB mark; for Kafka the heavy
connection's share is set in the broker's flow directly (a bulk upload in flight, as
the HTTP test does) with raw frames; for AMQP pika publishes a 1 MiB message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pika
from test_kafka_wire import RawClient, batch_of, parse, partition_result, produce, request_frame

from conveyor.testing.server import BrokerThread, run_broker


async def test_heaviest_kafka_publisher_is_throttled_light_one_is_not(tmp_path: Path) -> None:
    async with run_broker(tmp_path / "data", listeners=("kafka",),
                          broker={"memory_high_watermark_bytes": 1 << 16}) as server:
        await server.broker.create_topic("bulk", 1)
        heavy = RawClient(*await asyncio.open_connection("127.0.0.1", server.ports["kafka"]))
        light = RawClient(*await asyncio.open_connection("127.0.0.1", server.ports["kafka"]))
        try:
            assert partition_result(await heavy.call(produce("bulk", batch_of(1)), 1)) \
                .error_code == 0  # both connections are known to the listener now
            assert partition_result(await light.call(produce("bulk", batch_of(1)), 1)) \
                .error_code == 0
            port = heavy.writer.get_extra_info("sockname")[1]
            listener = server.listener("kafka")
            [connection] = [c for c in listener._connections  # type: ignore[attr-defined]
                            if c.state.peer.endswith(f", {port})")]
            flow = server.limits.flow
            flow.add(connection, 1 << 20)  # its bulk upload is in flight

            await heavy.send(request_frame(produce("bulk", batch_of(3)), 2))
            held = asyncio.ensure_future(heavy.read_frame())
            done, _ = await asyncio.wait([held], timeout=0.3)
            assert not done  # the heavy publisher waits: a delayed response
            answer = await asyncio.wait_for(light.call(produce("bulk", batch_of(2)), 2), 5)
            assert partition_result(answer).error_code == 0  # the light one goes on
            assert answer.throttle_time.total_seconds() == 0
            assert flow.pushbacks >= 1

            flow.add(connection, -(1 << 20))  # the upload was stored: under the mark
            response = parse(await asyncio.wait_for(held, 5), produce("bulk", b""))
            assert partition_result(response).error_code == 0
            assert response.throttle_time.total_seconds() >= 0.3  # how long it was held
            assert server.broker.offsets("bulk", 0).high_watermark == 1 + 1 + 2 + 3
        finally:
            heavy.close()
            light.close()


def _until(connection: pika.BlockingConnection, events: list[str], event: str) -> None:
    for _ in range(50):  # process_data_events returns as soon as a frame was handled
        if event in events:
            return
        connection.process_data_events(time_limit=0.2)
    raise AssertionError(f"no {event} in 10 s: {events}")


def test_heaviest_amqp_publisher_is_blocked_light_one_is_not(tmp_path: Path) -> None:
    """AMQP's own terms: connection.blocked / unblocked to the connection whose message
    is over the mark while it is stored; a connection publishing small messages at the
    same time is never blocked, and nothing is lost."""
    with BrokerThread(tmp_path / "data", listeners=("amqp",),
                      broker={"memory_high_watermark_bytes": 1 << 16}) as server:
        parameters = pika.ConnectionParameters("127.0.0.1", server.ports["amqp"])
        heavy, light = pika.BlockingConnection(parameters), pika.BlockingConnection(parameters)
        events: dict[str, list[str]] = {"heavy": [], "light": []}
        for name, connection in (("heavy", heavy), ("light", light)):
            connection.add_on_connection_blocked_callback(
                lambda *_, name=name: events[name].append("blocked"))
            connection.add_on_connection_unblocked_callback(
                lambda *_, name=name: events[name].append("unblocked"))
        try:
            heavy_channel, light_channel = heavy.channel(), light.channel()
            heavy_channel.queue_declare("bulk")
            light_channel.queue_declare("small")
            heavy_channel.basic_publish("", "bulk", b"x" * (1 << 20))  # 16x the mark
            for index in range(20):
                light_channel.basic_publish("", "small", b"%d" % index)
            _until(heavy, events["heavy"], "unblocked")
            light.process_data_events(time_limit=0.2)
            assert events == {"heavy": ["blocked", "unblocked"], "light": []}
            assert server.server.limits.flow.pushbacks >= 1
            assert heavy_channel.queue_declare("bulk", passive=True).method.message_count == 1
            assert light_channel.queue_declare("small", passive=True).method.message_count == 20
        finally:
            heavy.close()
            light.close()
