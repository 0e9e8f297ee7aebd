"""Over the memory high-water mark the heaviest publisher is pushed back in its own
protocol's terms while a light one goes on (issue 9 item 6, bulk publishing).

Goal: one tenant's burst does not stall everyone else: a Kafka connection holding most
of the bytes in flight gets a delayed produce answer whose throttle_time_ms reports the
wait, while another connection's produce is answered at once; when the total falls
back the held produce completes. Method: a real server in this loop with a 64 KiB
mark; the heavy connection's share is set in the broker's flow directly (a bulk
upload in flight, as the HTTP test does), raw Kafka frames on two connections.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_kafka_wire import RawClient, batch_of, parse, partition_result, produce, request_frame

from conveyor.testing.server import run_broker


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
